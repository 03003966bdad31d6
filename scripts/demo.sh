#!/usr/bin/env bash
# Runs Drover for a first look: droverd on http://127.0.0.1:8080 with its data in ./demo-data,
# and a simulated fleet of 50 devices (drover-sim) that enroll, connect over mutual-TLS MQTT,
# report their inventory and health metrics every 10 s, take software updates with the agent's
# own update engine, and now and then drop off and come back. On the first run it also makes
# release keys and a trust root (./demo-data/release), uploads two signed versions of a sample
# artifact to deploy, and adds an alert rule.
# Sign in as admin with the password printed below. Ctrl-C stops both; run it again to
# continue where you left off (the same devices come back from ./demo-data/sim), or delete
# ./demo-data to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
export DROVER_ADMIN_PASSWORD="${DROVER_ADMIN_PASSWORD:-drover-demo-admin}"
LISTEN="${DROVER_HTTP_LISTEN:-127.0.0.1:8080}"
MQTT_LISTEN="${DROVER_MQTT_LISTEN:-127.0.0.1:8883}"
DEVICE_LISTEN="${DROVER_DEVICE_LISTEN:-127.0.0.1:8443}"
DEVICES="${DEMO_DEVICES:-50}"
data=demo-data
sim_dir=$data/sim

cargo build --release --locked --bin droverd --bin drover-sim --bin drover
droverd=target/release/droverd
drover=target/release/drover

server=""
sim=""
stop() { # $1: exit status
  trap - INT TERM EXIT
  if [ -n "$sim" ]; then kill -TERM "$sim" 2>/dev/null; wait "$sim" 2>/dev/null || true; fi
  if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; fi
  exit "$1"
}
trap 'stop 0' INT TERM
trap 'stop $?' EXIT

"$droverd" --data-dir "$data" --http-listen "$LISTEN" --mqtt-listen "$MQTT_LISTEN" \
  --device-listen "$DEVICE_LISTEN" &
server=$!
for _ in $(seq 600); do
  curl -sf "http://$LISTEN/readyz" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "droverd did not start (see above)" >&2; server=""; exit 1; }
  sleep 0.1
done
curl -sf "http://$LISTEN/readyz" >/dev/null || { echo "droverd is not ready after 60 s" >&2; exit 1; }

# The simulated fleet's credentials live in demo-data/sim: the fleet CA, an admin API token
# (kept while it works), and the devices' keys and certificates.
mkdir -p "$sim_dir"
chmod 700 "$sim_dir"
"$droverd" --data-dir "$data" ca cert >"$sim_dir/ca.pem"
admin=$(cat "$sim_dir/admin-token" 2>/dev/null || true)
if [ -z "$admin" ] || ! curl -sf -o /dev/null -H "Authorization: Bearer $admin" "http://$LISTEN/api/v1/users"; then
  admin=$("$droverd" --data-dir "$data" token create --role admin --name "demo fleet $(date +%Y%m%d-%H%M%S)" 2>/dev/null |
    grep -o 'drv_[A-Za-z0-9_-]*')
  (umask 077 && echo "$admin" >"$sim_dir/admin-token")
fi
# An enrollment token only when some device still has to enroll.
token_args=()
enrolled=0
[ -d "$sim_dir/devices" ] && enrolled=$(find "$sim_dir/devices" -name '*.id' | wc -l)
if [ "$enrolled" -lt "$DEVICES" ]; then
  secret=$(curl -sf -X POST -H "Authorization: Bearer $admin" -H 'content-type: application/json' \
    -d "{\"name\":\"demo fleet $(date +%Y%m%d-%H%M%S)\",\"max_uses\":$((DEVICES - enrolled)),\"tags\":{\"env\":\"demo\"}}" \
    "http://$LISTEN/api/v1/enrollment-tokens" | sed -n 's/.*"secret":"\(dre_[^"]*\)".*/\1/p')
  token_args=(--token "$secret")
fi

# What a release pipeline does, once: a root key and a release key (kept here, never on the
# server), the trust root the devices are provisioned with, and two signed versions of a sample
# artifact for the `demo-sim` device type, uploaded to the server.
release=$data/release
api() { # METHOD PATH [curl args...]
  local m=$1 p=$2
  shift 2
  curl -sf -X "$m" -H "Authorization: Bearer $admin" "$@" "http://$LISTEN/api/v1$p"
}
if [ ! -f "$release/root.json" ]; then
  mkdir -p "$release"
  chmod 700 "$release"
  "$drover" artifact keygen --force --out "$release/root.key" >/dev/null
  "$drover" artifact keygen --force --out "$release/release.key" >/dev/null
  "$drover" artifact root create --root-key "$release/root.key" --release-key "$release/release.key.pub" \
    --out "$release/root.json.new" >/dev/null
  mv "$release/root.json.new" "$release/root.json"
fi
if ! api GET /trust-root >/dev/null 2>&1; then
  api PUT /trust-root -H 'content-type: application/json' --data-binary "@$release/root.json" >/dev/null
fi
if [ "$(api GET '/artifacts?limit=1' | grep -c '"name"')" = 0 ]; then
  for version in 1.0.0 1.1.0; do
    printf 'greeting = "hello from demo-app %s"\n' "$version" >"$release/demo-app.conf"
    "$drover" artifact build --name demo-app --version "$version" --device-type demo-sim --type file \
      --payload "$release/demo-app.conf" --arg path=/demo-app.conf --key "$release/release.key" \
      --out "$release/demo-app-$version.drover" >/dev/null
    api POST /artifacts -H 'content-type: application/octet-stream' \
      --data-binary "@$release/demo-app-$version.drover" >/dev/null
  done
  api POST /alert-rules -H 'content-type: application/json' -d '{"name": "device running hot",
    "condition": {"kind": "threshold", "metric": "temp.zone0_celsius", "op": ">", "threshold": 75,
    "window_s": 300, "aggregate": "avg"}}' >/dev/null || true
fi

target/release/drover-sim --server "https://localhost:${DEVICE_LISTEN##*:}" --ca "$sim_dir/ca.pem" \
  --mqtt "localhost:${MQTT_LISTEN##*:}" "${token_args[@]}" -n "$DEVICES" --state-dir "$sim_dir" \
  --prefix demo --churn 0.02 --report 60 --telemetry-interval 10 --health \
  --device-type demo-sim --root-file "$release/root.json" --update-dir "$sim_dir/updates" &
sim=$!

echo
echo "Drover: open http://$LISTEN and sign in as admin / $DROVER_ADMIN_PASSWORD"
echo "        $DEVICES simulated devices are joining: see Devices (2% of them drop off and return each minute)."
echo "        Their health metrics arrive every 10 s; Updates has demo-app 1.0.0 and 1.1.0 to deploy."
echo "        Ctrl-C stops the server and the fleet."
echo
wait "$server" || true
server=""
stop 0
