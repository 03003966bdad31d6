#!/usr/bin/env bash
# The agent's footprint: stripped size of the release-small build, and resident memory and CPU
# of a real drover-agent enrolled with, and connected to, a local droverd (embedded broker),
# idle for 60 s. Prints the figures BENCHMARKS.md records.
# DROVERD=path uses that droverd instead of building a release one (the figures are the
# agent's own; the server's build does not change them).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --locked --profile release-small -p drover-agent
if [ -z "${DROVERD:-}" ]; then
  cargo build -q --locked --release --bin droverd
  DROVERD=target/release/droverd
fi
D=$(mktemp -d)
cleanup() { kill "${AGENT:-}" "${SERVER:-}" 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
"$DROVERD" --data-dir "$D/srv" --http-listen 127.0.0.1:18080 \
  --mqtt-listen 127.0.0.1:18883 --device-listen 127.0.0.1:18443 >"$D/srv.log" 2>&1 &
SERVER=$!
for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:18080/readyz && break; sleep 0.2; done
TOKEN=$("$DROVERD" --data-dir "$D/srv" token create --role admin --name bench | grep -o 'drv_[A-Za-z0-9_-]*' | head -1)
"$DROVERD" --data-dir "$D/srv" ca cert >"$D/ca.pem"
SECRET=$(curl -sf -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d '{"name":"bench"}' http://127.0.0.1:18080/api/v1/enrollment-tokens |
  python3 -c 'import sys, json; print(json.load(sys.stdin)["secret"])')
cat >"$D/agent.toml" <<EOF
server_url = "https://localhost:18443"
mqtt_url = "mqtts://localhost:18883"
ca_file = "$D/ca.pem"
data_dir = "$D/data"
enrollment_token = "$SECRET"
inventory_scripts_dir = "$D/inventory.d"
EOF
target/release-small/drover-agent --config "$D/agent.toml" run >"$D/agent.log" 2>&1 &
AGENT=$!
sleep 5
grep -q connected "$D/agent.log" || { cat "$D/agent.log"; echo "the agent did not connect" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$AGENT/stat"; }
before=$(ticks)
sleep 60
after=$(ticks)
echo "binary (stripped, release-small): $(stat -c %s target/release-small/drover-agent) bytes"
echo "resident, connected and idle: $(awk '/VmRSS/ {print $2, $3}' "/proc/$AGENT/status")"
echo "CPU over 60 s idle: $((after - before)) ticks of $(getconf CLK_TCK)/s"
