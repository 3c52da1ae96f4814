#!/usr/bin/env bash
# Runs every check and test. Installs what it needs when it is missing: redis-server,
# chromium, haproxy, prometheus, podman, runc and mmdebstrap (apt), a Python venv with
# SecantusDB (the MongoDB-protocol test server) and python-socketio, the npm packages of the
# JavaScript suite, the deploy check tools (deploy/check.sh tools), the container stand-ins
# (deploy/images.sh prepare), cargo-deny and cargo-machete.
#
# Where the time goes on two cores: the installs, which mostly wait on the network, run in
# the background while the compiler works; every test binary is built once (`cargo test
# --no-run`) and then run directly, two at a time, then again with the Redis Cluster or the
# embedded mode in the environment; the suites that start their own servers on free ports
# run side by side, while the release binaries of the container images build at the lowest
# priority. Each background job's output is in target/ci/<job>.log and is printed
# when the job ends, with its time; the run fails after every job has ended if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
logs=target/ci
rm -rf "$logs"
mkdir -p "$logs"

step() { printf '\n==> [%4ds] %s\n' "$SECONDS" "$*"; }

# Background jobs: `spawn NAME COMMAND...` starts one; `finish NAME...` waits for them and
# prints their logs. `pool WIDTH NAME=COMMAND...` runs commands WIDTH at a time.
declare -A job_pid=() job_start=()
failed=()
spawn() {
  local name=$1; shift
  (
    # Not `( … ) || status=$?`: on the left of `||` bash ignores `set -e` in the job.
    set +e
    ( set -euo pipefail; "$@" ) > "$logs/$name.log" 2>&1
    status=$?
    echo "$SECONDS" > "$logs/$name.end"
    exit "$status"
  ) &
  job_pid[$name]=$! job_start[$name]=$SECONDS
}
report() {
  local name=$1 status=$2 end
  end=$(cat "$logs/$name.end" 2>/dev/null || echo "$SECONDS")
  printf '\n==> [%4ds] %s: %s, %ds from %ds to %ds\n' "$SECONDS" "$name" \
    "$([ "$status" -eq 0 ] && echo passed || echo "FAILED (exit $status)")" \
    "$((end - job_start[$name]))" "${job_start[$name]}" "$end"
  cat "$logs/$name.log"
  [ "$status" -eq 0 ] || failed+=("$name")
}
finish() {
  local name status
  for name in "$@"; do
    status=0
    wait "${job_pid[$name]}" || status=$?
    report "$name" "$status"
    unset "job_pid[$name]"
  done
}
pool() {
  local width=$1; shift
  local -A running=()
  local entry name pid status
  for entry in "$@"; do
    while [ ${#running[@]} -ge "$width" ]; do
      status=0
      wait -n -p pid "${!running[@]}" || status=$?
      report "${running[$pid]}" "$status"
      unset "running[$pid]"
    done
    name=${entry%%=*}
    # A new bash has no `set -e` of its own: without it a job would answer for its last
    # command only.
    spawn "$name" bash -euo pipefail -c "${entry#*=}"
    running[${job_pid[$name]}]=$name
  done
  while [ ${#running[@]} -gt 0 ]; do
    status=0
    wait -n -p pid "${!running[@]}" || status=$?
    report "${running[$pid]}" "$status"
    unset "running[$pid]"
  done
}
# However the run ends, it waits for its background jobs: no server or install is left behind.
trap 'wait' EXIT
# Stops the run when a job failed (after every job has ended, so no server is left behind).
check_failed() {
  if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
  fi
}

step "dependencies (in the background: apt, the Python venvs, npm, the container stand-ins; cargo-deny and cargo-machete)"
install_packages() {
  # Debian packages: Redis for the integration tests, Chromium for the chat page's browser
  # test, HAProxy for the load-balancer test, promtool (package prometheus) for the deploy
  # checks, podman, runc and mmdebstrap for the container images (deploy/images.sh).
  local missing=() tool
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    local sudo_=(); [ "$(id -u)" -eq 0 ] || sudo_=(sudo)
    "${sudo_[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
    echo "[${SECONDS}s] apt done"
  fi
  local requirements=tests/python/requirements.txt
  if [ ! -x .venv/bin/secantusd-py ] || ! cmp -s "$requirements" .venv/.requirements 2>/dev/null; then
    echo "creating .venv (SecantusDB, python-socketio)"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check --pre -r "$requirements"
    cp "$requirements" .venv/.requirements
    echo "[${SECONDS}s] .venv done"
  fi
  if ! cmp -s tests/js/package-lock.json tests/js/node_modules/.installed-lock 2>/dev/null; then
    echo "installing JavaScript test packages"
    (cd tests/js && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.installed-lock)
  fi
  deploy/check.sh tools
  echo "[${SECONDS}s] npm and the deploy check tools done"
  bash deploy/images.sh prepare
  echo "[${SECONDS}s] container stand-ins done"
}
install_cargo_tools() {
  # Built from crates.io, as nothing else ships them here. Their speed matters little (a few
  # seconds of checks), so they are built with little optimisation: half the build time.
  local tool
  for tool in cargo-deny cargo-machete; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "installing $tool"
      CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_DEBUG=false \
        cargo install --locked --quiet "$tool"
      echo "[${SECONDS}s] $tool installed"
    fi
  done
}
spawn packages install_packages
spawn cargo-tools install_cargo_tools
export SECANTUSD="$root/.venv/bin/secantusd-py"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

finish cargo-tools
check_failed
step "cargo deny (licences, bans, sources)"
cargo deny check licenses bans sources
# Advisories, offline: the RustSec snapshot beside the project (../shared/advisory-db, see
# its SNAPSHOT.md) becomes the one-commit git repository cargo-deny reads (deny.toml's
# db-path), dated as the snapshot.
advisories=target/advisory-dbs/advisory-db-3157b0e258782691
snapshot=../shared/advisory-db
if [ -d "$snapshot/crates" ] && ! cmp -s "$snapshot/SNAPSHOT.md" "$advisories/SNAPSHOT.md" 2>/dev/null; then
  rm -rf "$advisories"
  mkdir -p "$advisories"
  cp -R "$snapshot/." "$advisories/"
  when=$(grep -o '([0-9]\{4\}-[0-9][0-9]-[0-9][0-9])' "$snapshot/SNAPSHOT.md" | head -1 | tr -d '()')
  (cd "$advisories" && git init -q && git add -A \
    && GIT_AUTHOR_DATE="${when}T00:00:00Z" GIT_COMMITTER_DATE="${when}T00:00:00Z" \
       git -c user.name=snapshot -c user.email=snapshot@localhost commit -q -m "RustSec snapshot $when")
fi
if [ -d "$advisories/.git" ]; then
  cargo deny --offline check advisories
elif [ -n "${CI:-}" ]; then
  echo "no RustSec snapshot in $snapshot: cargo deny check advisories cannot run offline" >&2
  exit 1
else
  echo "no RustSec snapshot in $snapshot: advisories not checked (CI requires it)"
fi

step "unused dependencies (cargo machete)"
cargo machete

step "cargo build (the binaries, as users build them)"
cargo build --workspace --locked --bins
# The README's run command builds with `--bin`: it must reuse what a workspace build made.
rebuilt=$(cargo build --locked --bin gateway 2>&1)
if grep -q Compiling <<< "$rebuilt"; then
  echo "cargo build --bin gateway compiled again what the workspace build made" >&2
  exit 1
fi

step "cargo test --no-run (every test binary, built once)"
# The test build enables the dev-dependencies' features too, so it compiles part of the tree
# again; its gateway and persister binaries (next to the test binaries, which start them as
# processes) are the ones every later suite runs.
cargo test --workspace --locked --no-run --message-format=json-render-diagnostics \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        t = m["target"]
        kind = "lib" if t["kind"][0] in ("lib", "rlib", "proc-macro") else t["kind"][0]
        print(m["manifest_path"].rsplit("/", 1)[0], kind, t["name"], m["executable"])
' > "$logs/tests.tsv"
export CHAT_BINARIES_BUILT=1
# The release binaries of the runtime images (deploy/Dockerfile's runtime stages), built at
# the lowest priority from here on: they take what the cores have left while the tests run.
spawn release-build nice -n 19 cargo build --release --locked --bin gateway --bin persister
# `run_test NAME [ARGS]`: the integration test binary NAME (tests/NAME.rs), from its
# package's folder as cargo runs it.
run_test() {
  local name=$1; shift
  local dir exe
  read -r dir exe < <(awk -v n="$name" '$2 == "test" && $3 == n { print $1, $4; exit }' "$logs/tests.tsv")
  [ -n "${exe:-}" ] || { echo "no test binary tests/$name.rs in $logs/tests.tsv" >&2; return 1; }
  run_exe "$dir" "$exe" "$@"
}
run_exe() {
  local dir=$1 exe=$2; shift 2
  (cd "$dir" && CARGO_MANIFEST_DIR=$dir "$exe" "$@")
}
export -f run_test run_exe
export logs

finish packages
check_failed

step "unit and integration tests (real Redis and SecantusDB), two binaries at a time"
# The longest first (as measured: tests/gaps.rs takes about 90 s, rest and socket 40 s,
# cluster and faults 30 s), so that the last to end is a short one.
longest=(gaps rest socket cluster faults presence ingest)
tests=()
for name in "${longest[@]}"; do
  read -r dir exe < <(awk -v n="$name" '$2 == "test" && $3 == n { print $1, $4; exit }' "$logs/tests.tsv") \
    || { echo "no test binary tests/$name.rs: update the list of the longest" >&2; exit 1; }
  tests+=("test-$name=run_exe $dir $exe")
done
while read -r dir kind name exe; do
  [[ $kind == test && " ${longest[*]} " == *" $name "* ]] || tests+=("test-$kind-$name=run_exe $dir $exe")
done < "$logs/tests.tsv"
pool 2 "${tests[@]}"
check_failed
# Doc tests (rustdoc compiles them itself).
cargo test --workspace --locked --doc

step "the suites that start their own deployment, side by side"
# Their servers take free ports (the compose topology alone publishes :3000), and none of
# them builds: each runs the binaries built above.
chaos() {
  while read -r redis seed seconds faults; do
    [ -n "$redis" ] || continue
    target/debug/loadtest chaos --redis "$redis" --seed "$seed" --duration "$seconds" \
      ${faults:+--faults "$faults"} --out target/chaos
  done < <(sed 's/#.*//' loadtest/chaos-seeds)
}
cluster_contract() {
  # The contract tests on a Redis Cluster (3 masters, 3 replicas; 2 gateways, 3
  # persisters), and the gap tests that take their Redis from the environment (the
  # 1,000-message ones run on a cluster in the plain run already).
  export CHAT_TEST_REDIS=cluster
  run_test socket
  run_test rest
  run_test presence
  run_test server_api
  run_test gaps a_hole a_gap a_client a_removed
}
embedded_contract() {
  # The same contract tests against the embedded mode (one process, SQLite).
  export CHAT_TEST_MODE=embedded
  local name
  for name in socket rest gaps presence server_api; do run_test "$name"; done
}
export -f chaos cluster_contract embedded_contract
pool 3 \
  "chaos=chaos" \
  "cluster-contract=cluster_contract" \
  "deploy-checks=deploy/check.sh" \
  "js=cd tests/js && npm test && CHAT_MODE=embedded npm run test:contract && CHAT_REDIS=cluster npm run test:contract" \
  "embedded-contract=embedded_contract" \
  "openapi=bash scripts/check-openapi.sh" \
  "python=.venv/bin/python -m unittest discover -s tests/python -v && CHAT_MODE=embedded .venv/bin/python -m unittest discover -s tests/python -v" \
  "asyncapi=cd tests/js && node --input-type=module -e \"
    const { loadSchemas } = await import('./asyncapi.mjs');
    const { validators } = await loadSchemas();
    console.log('docs/asyncapi.yaml: valid, ' + validators.size + ' messages');\""
finish release-build
check_failed

step "container images: deploy/Dockerfile's runtime stages on local stand-in bases, from the release binaries; the compose topology on podman, the socket.io-client suite through its HAProxy"
bash deploy/images.sh runtime target/release
bash deploy/images.sh compose

echo
echo "all checks passed in ${SECONDS}s"
