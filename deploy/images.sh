#!/usr/bin/env bash
# The container images, built and run for real with podman where the registries' base
# images cannot be pulled: local stand-ins are made for the bases deploy/Dockerfile and the
# compose file name, and the Dockerfile is built as users build it, unchanged.
#
#   deploy/images.sh standins   Debian bookworm (mmdebstrap) imported into podman, and the
#                               stand-ins built on it (deploy/standins/*.Containerfile)
#   deploy/images.sh prepare    the stand-ins and podman-compose: what `runtime` and
#                               `compose` need, fetched ahead (the test command does it while
#                               it compiles)
#   deploy/images.sh build      the full build of deploy/Dockerfile: both images from source
#   deploy/images.sh runtime [DIR]
#                               only the runtime stages, from the binaries in DIR
#                               (target/release: `cargo build --release --workspace` first;
#                               the test command gives target/debug, which it has built)
#   deploy/images.sh compose    deploy/docker-compose.yml on these images (podman-compose,
#                               with deploy/compose.standins.yml), the socket.io-client
#                               contract suite through its HAProxy, then everything removed
#
# Needs podman, runc and mmdebstrap (Debian packages; installed when missing). Containers run
# with runc, cgroupfs and lowered ulimits (deploy/standins/containers.conf), which
# sandboxes without systemd or with low limits need.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export CONTAINERS_CONF="$root/deploy/standins/containers.conf"
podman_=(podman)

need() {
  local missing=()
  for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return
  echo "installing ${missing[*]}"
  local sudo_=(); [ "$(id -u)" -eq 0 ] || sudo_=(sudo)
  "${sudo_[@]}" apt-get update -qq
  "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Tools that are not installed here, with what to do.
require() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool is needed: install it first"; exit 1; }
  done
}

build() { "${podman_[@]}" build --network host "$@"; }

# The stand-ins of the runtime bases and of the compose topology's services; with `rust`,
# the build stages' base too.
standins() {
  if ! "${podman_[@]}" image exists localhost/debian-base:bookworm; then
    local tar; tar=$(mktemp --suffix .tar)
    # With the certificate authorities this machine adds to Debian's (a proxy's, say), so
    # that apt, pip and cargo inside the builds trust what the machine trusts.
    mmdebstrap --variant=minbase --quiet --include=ca-certificates \
      --customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share' \
      --customize-hook='chroot "$1" update-ca-certificates' \
      bookworm "$tar" || { rm -f "$tar"; exit 1; }
    "${podman_[@]}" import "$tar" localhost/debian-base:bookworm
    rm -f "$tar"
  fi
  if [ "${1:-}" = rust ]; then
    local rust_version toolchain
    rust_version=$(sed -n 's/^ARG RUST_VERSION=//p' deploy/Dockerfile)
    require rustc
    toolchain=$(rustc --print sysroot)
    case "$toolchain" in
      /usr | /usr/local) echo "rustc is not a rustup toolchain ($toolchain): the stand-in copies a whole toolchain folder"; exit 1 ;;
    esac
    build -t "docker.io/library/rust:${rust_version}-slim-bookworm" \
      -f deploy/standins/rust.Containerfile "$toolchain"
  fi
  build -t gcr.io/distroless/cc-debian12:nonroot -f deploy/standins/distroless-cc.Containerfile deploy/standins
  build -t docker.io/library/redis:7.2-alpine -f deploy/standins/redis.Containerfile deploy/standins
  build -t docker.io/library/haproxy:2.8-alpine -f deploy/standins/haproxy.Containerfile deploy/standins
  build -t localhost/secantusdb:0.7.0b3 -f deploy/standins/secantusdb.Containerfile deploy/standins
}

full() {
  for target in gateway persister; do
    build --pull=never -f deploy/Dockerfile --target "$target" -t "chat-$target:local" .
  done
}

runtime() {
  local from=${1:-target/release}
  # The builder stage replaced by a folder laid out as it is: /src/target/release/<binary>.
  local context=target/image-context
  rm -rf "$context" && mkdir -p "$context/src/target/release"
  for binary in gateway persister; do
    [ -x "$from/$binary" ] || { echo "$from/$binary missing: cargo build --release --workspace"; exit 1; }
    cp "$from/$binary" "$context/src/target/release/"
    build --pull=never -f deploy/Dockerfile --target "$binary" --build-context "builder=$context" \
      -t "chat-$binary:local" .
  done
  rm -rf "$context"
  # Each image answers its own --help, as the non-root user, on the stand-in base.
  for binary in gateway persister; do
    "${podman_[@]}" run --rm --network host "chat-$binary:local" "/usr/local/bin/$binary" --help >/dev/null
    echo "chat-$binary:local runs ($("${podman_[@]}" image inspect --format '{{.Size}}' "chat-$binary:local") bytes)"
  done
}

# podman-compose, in its own venv.
compose_tools() {
  local pin=podman-compose==1.6.0
  if [ "$(cat .tools/compose-venv/.pin 2>/dev/null)" != "$pin" ]; then
    python3 -m venv .tools/compose-venv
    .tools/compose-venv/bin/pip install -q --disable-pip-version-check "$pin"
    echo "$pin" > .tools/compose-venv/.pin
  fi
}

compose() {
  # Not local: the EXIT trap below runs after the function has returned.
  compose_=("$root/.tools/compose-venv/bin/podman-compose" -p chat
    -f deploy/docker-compose.yml -f deploy/compose.standins.yml)
  # 1.6: earlier releases mangle a health check's quoting (`mongosh --eval "…('ping')…"`).
  require curl npm
  local image
  for image in chat-gateway:local chat-persister:local docker.io/library/redis:7.2-alpine \
    docker.io/library/haproxy:2.8-alpine localhost/secantusdb:0.7.0b3; do
    # Else compose would pull it from a registry, or build the Dockerfile.
    "${podman_[@]}" image exists "$image" \
      || { echo "no image $image: run deploy/images.sh build (or runtime) first"; exit 1; }
  done
  if ! cmp -s tests/js/package-lock.json tests/js/node_modules/.installed-lock 2>/dev/null; then
    (cd tests/js && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.installed-lock)
  fi
  compose_tools
  if (exec 3<>/dev/tcp/127.0.0.1/3000) 2>/dev/null; then
    echo "port 3000 is taken: the compose file publishes HAProxy there"; exit 1
  fi
  export JWT_SECRET; JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
  # The key of the JavaScript suite (tests/js/harness.mjs).
  export SERVER_API_KEY=js-suite-server-api-key-of-32-bytes-or-more
  trap '"${compose_[@]}" down --volumes >/dev/null 2>&1 || echo "podman-compose down failed: remove the chat_* containers by hand"' EXIT
  # No --build: the images are the ones `build` or `runtime` made.
  "${compose_[@]}" up -d
  # Health checks run on a timer only under systemd, and `depends_on: service_healthy`
  # waits for none: run every image's check by hand until all pass (HAProxy has none; it
  # must answer).
  local names pending
  names=$("${podman_[@]}" ps --filter label=io.podman.compose.project=chat --format '{{.Names}}' | grep -v _lb_)
  # 120 rounds: a check that does not answer takes its timeout (3 to 5 s) per round.
  for _ in $(seq 120); do
    pending=()
    for name in $names; do
      "${podman_[@]}" healthcheck run "$name" >/dev/null 2>&1 || pending+=("$name")
    done
    curl -sf http://127.0.0.1:3000/openapi.json >/dev/null 2>&1 || pending+=(haproxy)
    [ ${#pending[@]} -eq 0 ] && break
    sleep 1
  done
  "${compose_[@]}" ps
  if [ ${#pending[@]} -ne 0 ]; then
    "${compose_[@]}" logs --tail 30 || true
    echo "not healthy after 120 rounds of checks: ${pending[*]}"; exit 1
  fi
  echo "healthy: $(echo $names)"
  (cd tests/js && CHAT_URL=http://127.0.0.1:3000 npm run test:contract)
}

case "${1:-}" in
  standins) need; standins ;;
  prepare) need; standins; compose_tools ;;
  build) need; standins rust; full ;;
  runtime) need; standins; runtime "${2:-}" ;;
  compose) need; compose ;;
  *) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
