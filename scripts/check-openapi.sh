#!/usr/bin/env bash
# The REST API's OpenAPI description, checked against the running server: an embedded
# gateway serves /openapi.json; openapi-spec-validator checks the document, and schemathesis
# (property-based, from that document) calls every operation with a real access token, and
# the server API with its key. Fails on any 5xx or any answer the document does not describe
# (status, content type, headers, body schema). Run by scripts/test.sh; needs the debug
# gateway binary and .venv (both made by the test command).
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
admin=$(free_port)
data=$(mktemp -d)
key=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
# Low limits, so that the tester meets the 429 of every limited route and checks it too.
PORT=$port METRICS_PORT=$admin HOST=127.0.0.1 REDIS_URL= MONGODB_URI= SERVER_API_KEY=$key \
  EVENTS_PER_SECOND=2 EVENT_BURST=2 JOINS_PER_SECOND=2 JOIN_BURST=2 USER_LOOKUPS_PER_USER=5 \
  ROOM_CREATIONS_PER_USER=5 REGISTER_MAX_PER_IP=5 LOGIN_MAX_FAILURES_PER_IP=5 \
  RUST_LOG=warn target/debug/gateway --embedded --data-dir "$data" &
gateway=$!
trap 'kill "$gateway" 2>/dev/null; wait "$gateway" 2>/dev/null; rm -rf "$data"' EXIT
base=http://127.0.0.1:$port
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break
  kill -0 "$gateway" || { echo "the gateway exited"; exit 1; }
  sleep 0.1
done

curl -sf "$base/openapi.json" -o target/openapi.json
.venv/bin/openapi-spec-validator target/openapi.json

token=$(curl -sf -X POST "$base/auth/register" -H 'content-type: application/json' \
  -d '{"email": "openapi@example.com", "password": "password123"}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["accessToken"])')
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance
run() {
  .venv/bin/schemathesis run "$base/openapi.json" --checks "$checks" --max-examples 25 \
    --seed 1 --no-color "$@"
}
run -H "Authorization: Bearer $token" --exclude-path '/server/rooms/{id}/events'
run -H "Authorization: Bearer $key" --include-path '/server/rooms/{id}/events'
# The limited answers the run met (429s): every kind, or the limits above need lowering.
metrics=$(curl -sf "http://127.0.0.1:$admin/metrics")
for counter in chat_gateway_rate_limited_total chat_gateway_login_rate_limited_total; do
  met=$(awk -v name="$counter" '$1 == name { print $2 }' <<<"$metrics")
  echo "$counter ${met:-0}"
  [ "${met:-0}" != 0 ] || { echo "the run met no $counter answer"; exit 1; }
done
