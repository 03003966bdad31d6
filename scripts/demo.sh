#!/usr/bin/env bash
# Runs Drover for a first look: droverd on http://127.0.0.1:8080 with its data in ./demo-data,
# and a simulated fleet of 50 devices (drover-sim) that enroll, connect over mutual-TLS MQTT,
# report their inventory and health metrics every 10 s, take software updates with the agent's
# own update engine (at 64 KiB/s each, slow enough to watch), open terminals and take file
# transfers with the agent's own remote-access code (each device confined to its own folder
# under ./demo-data/sim/remote), and now and then drop off and come back. On the first run it
# also makes release keys and a trust root (./demo-data/release), uploads two signed versions
# of a sample artifact to deploy, and adds an alert rule.
#
# Sign in as admin with the password printed below. Ctrl-C stops both; run it again to
# continue where you left off (the same devices come back from ./demo-data/sim), or delete
# ./demo-data to start over.
#
# Settings (environment): DEMO_DEVICES (50), DEMO_DATA (./demo-data), DROVER_HTTP_LISTEN
# (127.0.0.1:8080), DROVER_MQTT_LISTEN (127.0.0.1:8883), DROVER_DEVICE_LISTEN (127.0.0.1:8443),
# DROVER_ADMIN_PASSWORD (drover-demo-admin), DEMO_BIN_DIR (use the binaries there instead of
# building them, e.g. target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
export DROVER_ADMIN_PASSWORD="${DROVER_ADMIN_PASSWORD:-drover-demo-admin}"
LISTEN="${DROVER_HTTP_LISTEN:-127.0.0.1:8080}"
MQTT_LISTEN="${DROVER_MQTT_LISTEN:-127.0.0.1:8883}"
DEVICE_LISTEN="${DROVER_DEVICE_LISTEN:-127.0.0.1:8443}"
DEVICES="${DEMO_DEVICES:-50}"
data="${DEMO_DATA:-demo-data}"
sim_dir=$data/sim

if [ -n "${DEMO_BIN_DIR:-}" ]; then
  bin=$DEMO_BIN_DIR
else
  # Wherever cargo builds (CARGO_TARGET_DIR, a config's build.target-dir): ask it.
  target=$(cargo metadata --format-version 1 --no-deps --locked | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  bin=$target/release
  if [ ! -x "$bin/droverd" ]; then
    echo "demo: building droverd, drover-sim and drover (release) into $bin — the first build takes several minutes"
  fi
  cargo build --release --locked --bin droverd --bin drover-sim --bin drover
fi
droverd=$bin/droverd
drover=$bin/drover

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
# for this script (kept while it works), an enrollment token, and the devices' keys and
# certificates. Secrets go through files (mode 0600), never the command line (`ps`).
mkdir -p "$sim_dir"
chmod 700 "$sim_dir"
"$droverd" --data-dir "$data" ca cert >"$sim_dir/ca.pem"
admin=$(cat "$sim_dir/admin-token" 2>/dev/null || true)
if [ -z "$admin" ] || ! curl -sf -o /dev/null -H "Authorization: Bearer $admin" "http://$LISTEN/api/v1/users"; then
  admin=$("$droverd" --data-dir "$data" token create --role admin --name "demo script $(date +%Y%m%d-%H%M%S)" 2>/dev/null |
    grep -o 'drv_[A-Za-z0-9_-]*')
  (umask 077 && echo "$admin" >"$sim_dir/admin-token")
fi
# An enrollment token only when some device still has to enroll.
token_args=()
enrolled=0
[ -d "$sim_dir/devices" ] && enrolled=$(find "$sim_dir/devices" -name '*.id' | wc -l)
if [ "$enrolled" -lt "$DEVICES" ]; then
  curl -sf -X POST -H "Authorization: Bearer $admin" -H 'content-type: application/json' \
    -d "{\"name\":\"demo devices $(date +%Y%m%d-%H%M%S)\",\"max_uses\":$((DEVICES - enrolled)),\"tags\":{\"env\":\"demo\"}}" \
    "http://$LISTEN/api/v1/enrollment-tokens" | sed -n 's/.*"secret":"\(dre_[^"]*\)".*/\1/p' |
    (umask 077 && cat >"$sim_dir/enroll-token")
  token_args=(--token-file "$sim_dir/enroll-token")
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
    # About 1 MiB: at the simulated 64 KiB/s a device takes some 16 s to download it.
    { printf 'greeting = "hello from demo-app %s"\n' "$version"; head -c 1048576 /dev/zero | tr '\0' '#'; } \
      >"$release/demo-app.conf"
    "$drover" artifact build --name demo-app --version "$version" --device-type demo-sim --type file \
      --payload "$release/demo-app.conf" --arg path=/demo-app.conf --key "$release/release.key" \
      --out "$release/demo-app-$version.drover" >/dev/null
    api POST /artifacts -H 'content-type: application/octet-stream' \
      --data-binary "@$release/demo-app-$version.drover" >/dev/null
  done
  # Hot for ten minutes on average, not one hot reading: a believable alert, not a flapping one.
  api POST /alert-rules -H 'content-type: application/json' -d '{"name": "device running hot",
    "condition": {"kind": "threshold", "metric": "temp.zone0_celsius", "op": ">", "threshold": 75,
    "window_s": 600, "aggregate": "avg"}, "pending_s": 600}' >/dev/null || true
fi

remote_args=(--remote)
# Terminals run as the simulator's user; as root only when asked (as the agent's allow_root).
[ "$(id -u)" = 0 ] && remote_args+=(--remote-allow-root)
"$bin/drover-sim" --server "https://localhost:${DEVICE_LISTEN##*:}" --ca "$sim_dir/ca.pem" \
  --mqtt "localhost:${MQTT_LISTEN##*:}" "${token_args[@]}" -n "$DEVICES" --state-dir "$sim_dir" \
  --prefix demo --churn 0.02 --report 60 --telemetry-interval 10 --health \
  --device-type demo-sim --root-file "$release/root.json" --update-dir "$sim_dir/updates" \
  --download-rate 64KiB "${remote_args[@]}" &
sim=$!

echo
echo "Drover: open http://$LISTEN and sign in as admin / $DROVER_ADMIN_PASSWORD"
echo "        $DEVICES simulated devices are joining: see Devices (2% of them drop off and return each minute)."
echo "        Their health metrics arrive every 10 s (Metrics); Artifacts has demo-app 1.0.0 and 1.1.0,"
echo "        Deployments rolls them out; a device's page opens a terminal on it."
echo "        The command line: $drover (export PATH=\"$(cd "$bin" && pwd):\$PATH\")."
echo "        Ctrl-C stops the server and the fleet."
echo
wait "$server" || true
server=""
stop 0
