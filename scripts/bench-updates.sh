#!/usr/bin/env bash
# Software update rollout: one droverd (SQLite in a temporary directory, embedded broker, local
# artifact store) deploys a signed SIZE_MB artifact (default 20 MB, `file` module) to DEVICES
# simulated devices (default 1,000) in one drover-sim process. Every simulated device runs the
# agent's own update engine: HTTPS download with its certificate, signature and digest
# verification against the trust root, install into its own folder, report. Measures
#   1. the time from the deployment's creation until every device reports success;
#   2. droverd's CPU over that time, and the bytes it served (drover_artifact_bytes_served_total);
#   3. served throughput per droverd CPU second (the issue's "Gbit/s per core");
#   4. devices the embedded broker disconnected as "server busy", and the device-traffic
#      worker's time per message by channel (and the wait before it).
# The simulator (TLS decryption, SHA-256 and signature checks, writing 20 GB) shares the same
# two cores with droverd, so the wall-clock rollout time is bounded by this machine, not by
# the server's bookkeeping: compare droverd's CPU with the simulator's.
#
#   scripts/bench-updates.sh                        # 1,000 devices, 20 MB
#   DEVICES=100 SIZE_MB=5 scripts/bench-updates.sh  # smaller
# The simulator runs at `nice` SIM_NICE (default 10): on a machine this small its 1,000 devices'
# work (32 threads decrypting, hashing and writing) would otherwise take droverd's CPU time, and
# its device traffic would wait behind a server the load generator starves — devices in the
# field bring their own CPUs. SIM_NICE=0 measures both on equal terms.
# Other knobs: SIM_LOG (the simulated agents' log level, default error; warn shows why a
# device reconnected), SLOTS (downloads at once in the simulator, default 32), TIMEOUT (s, default
# 1800), HTTP_PORT/MQTT_PORT/DEV_PORT (default 39080/39883/39443), KEEP=1 keeps the directory,
# BIN_DIR=DIR runs the droverd, drover-sim and drover found there instead of building them (to
# compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${DEVICES:-1000}
size_mb=${SIZE_MB:-20}
slots=${SLOTS:-32}
timeout=${TIMEOUT:-1800}
http=127.0.0.1:${HTTP_PORT:-39080}
mqtt_port=${MQTT_PORT:-39883}
dev_port=${DEV_PORT:-39443}

bin=${BIN_DIR:-target/release}
[ -n "${BIN_DIR:-}" ] || cargo build --release --locked --bin droverd --bin drover-sim --bin drover >/dev/null 2>&1
droverd=$bin/droverd
sim=$bin/drover-sim
drover=$bin/drover
dir=$(mktemp -d)
sim_pid=
cleanup() {
  [ -n "$sim_pid" ] && kill -TERM "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
  [ -n "${server:-}" ] && kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
now() { date +%s.%N; }
metric() { curl -sf "http://$http/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
api() { # METHOD PATH [curl args...]
  local m=$1 p=$2
  shift 2
  curl -sf -X "$m" -H "Authorization: Bearer $admin" "$@" "http://$http/api/v1$p"
}

DROVER_LOG=warn "$droverd" --data-dir "$dir/data" --http-listen "$http" \
  --mqtt-listen "127.0.0.1:$mqtt_port" --device-listen "127.0.0.1:$dev_port" >>"$dir/droverd.log" 2>&1 &
server=$!
for _ in $(seq 300); do curl -sf "http://$http/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://$http/readyz" >/dev/null || { cat "$dir/droverd.log"; exit 1; }
"$droverd" --data-dir "$dir/data" ca cert >"$dir/ca.pem"
admin=$("$droverd" --data-dir "$dir/data" token create --role admin --name bench 2>/dev/null | grep -o 'drv_[A-Za-z0-9_-]*')
token=$(api POST /enrollment-tokens -H 'content-type: application/json' \
  -d "{\"name\":\"bench-updates\",\"max_uses\":$devices}" | sed -n 's/.*"secret":"\(dre_[^"]*\)".*/\1/p')

# Release keys, the trust root, and a signed artifact: what a release pipeline does.
"$drover" artifact keygen --out "$dir/root.key" >/dev/null 2>&1
"$drover" artifact keygen --out "$dir/release.key" >/dev/null 2>&1
"$drover" artifact root create --root-key "$dir/root.key" --release-key "$dir/release.key.pub" --out "$dir/root.json" >/dev/null
api PUT /trust-root -H 'content-type: application/json' --data-binary "@$dir/root.json" >/dev/null
head -c $((size_mb * 1024 * 1024)) /dev/urandom >"$dir/firmware.bin"
"$drover" artifact build --name bench-firmware --version 1.0.0 --device-type bench-sim --type file \
  --payload "$dir/firmware.bin" --arg path=/firmware.bin --key "$dir/release.key" --out "$dir/firmware.drover" >/dev/null
artifact_size=$(stat -c %s "$dir/firmware.drover")
artifact=$(api POST /artifacts -H 'content-type: application/octet-stream' --data-binary "@$dir/firmware.drover" |
  sed -n 's/^{"id":"\([0-9a-f]*\)".*/\1/p')
[ -n "$artifact" ] || { echo "upload failed"; exit 1; }

echo "rollout: $devices simulated devices, artifact $artifact_size bytes, $slots downloads at once in the simulator (nice ${SIM_NICE:-10})"
DROVER_LOG=${SIM_LOG:-error} nice -n "${SIM_NICE:-10}" "$sim" --server "https://localhost:$dev_port" --ca "$dir/ca.pem" --mqtt "localhost:$mqtt_port" \
  --token "$token" -n "$devices" --prefix bench --state-dir "$dir/sim" --connect-rate 500/s \
  --device-type bench-sim --root-file "$dir/root.json" --update-dir "$dir/updates" --update-slots "$slots" \
  --report 30 >"$dir/sim.log" 2>&1 &
sim_pid=$!
deadline=$((SECONDS + timeout))
until grep -qs "^all $devices devices connected in" "$dir/sim.log"; do
  [ $SECONDS -lt $deadline ] || { echo "not all connected:"; tail -n 5 "$dir/sim.log"; exit 1; }
  kill -0 "$sim_pid" 2>/dev/null || { echo "drover-sim exited:"; tail -n 20 "$dir/sim.log"; exit 1; }
  sleep 0.2
done
# The clock starts once droverd has recorded every device's hello and inventory: the rollout,
# not the fleet's arrival, is measured.
recorded() { curl -sf "http://$http/metrics" | awk -v c="channel=\"up/$1\"" 'index($0, "drover_device_message_seconds_count{" c "}") == 1 {print $2}'; }
t_conn=$SECONDS
until [ "$(recorded hello)" = "$devices" ] && [ "$(recorded inventory)" = "$devices" ]; do
  [ $SECONDS -lt $deadline ] || { echo "droverd did not record every device: hello $(recorded hello), inventory $(recorded inventory)"; exit 1; }
  sleep 0.5
done
echo "droverd recorded all $devices hellos and inventories $((SECONDS - t_conn)) s after the last connection"

bytes0=$(metric drover_artifact_bytes_served_total); bytes0=${bytes0:-0}
t0=$(now); c0=$(cpu_ticks "$server"); s0=$(cpu_ticks "$sim_pid")
deployment=$(api POST /deployments -H 'content-type: application/json' \
  -d "{\"artifact\":\"$artifact\",\"filter\":\"status = accepted\",\"name\":\"bench\"}" | sed -n 's/^{"id":"\([^"]*\)".*/\1/p')
[ -n "$deployment" ] || { echo "deployment failed"; exit 1; }
last=
while :; do
  d=$(api GET "/deployments/$deployment")
  status=$(sed -n 's/.*"status":"\([a-z]*\)".*/\1/p' <<<"$d")
  counts=$(sed -n 's/.*"counts":\({[^}]*}\).*/\1/p' <<<"$d")
  if [ "$counts" != "$last" ]; then
    printf '  %6.1f s  %s\n' "$(awk -v a="$t0" -v b="$(now)" 'BEGIN {print b - a}')" "$counts"
    last=$counts
  fi
  [ "$status" = active ] || break
  [ $SECONDS -lt $deadline ] || { echo "deployment still active after ${timeout}s"; exit 1; }
  sleep 1
done
t1=$(now); c1=$(cpu_ticks "$server"); s1=$(cpu_ticks "$sim_pid")
bytes1=$(metric drover_artifact_bytes_served_total)
echo "deployment $status"
awk -v a="$t0" -v b="$t1" -v c=$((c1 - c0)) -v s=$((s1 - s0)) -v t="$tck" -v n="$devices" \
  -v bytes=$((bytes1 - bytes0)) -v size="$artifact_size" 'BEGIN {
  wall = b - a; cpu = c / t
  printf "all %d devices final in %.1f s; droverd CPU %.1f s (%.0f%% of one core), drover-sim CPU %.1f s\n", n, wall, cpu, 100 * cpu / wall, s / t
  printf "bytes served %d (%.2f x the artifact per device); %.0f MB/s wall\n", bytes, bytes / size / n, bytes / wall / 1e6
  printf "served per droverd CPU second: %.0f MB = %.2f Gbit/s per core\n", bytes / cpu / 1e6, bytes * 8 / cpu / 1e9 }'
echo "broker: $(metric drover_mqtt_busy_disconnects_total) devices disconnected as server busy, $(metric drover_mqtt_dropped_total) messages dropped"
# The device-traffic worker: messages recorded by channel, mean time to record, mean wait before.
curl -sf "http://$http/metrics" | awk '
  /^drover_device_message(_wait)?_seconds_(sum|count)/ {
    split($1, a, "{"); name = a[1]; label = (a[2] == "" ? "all" : a[2]); sub(/}$/, "", label)
    key = (name ~ /wait/ ? "waited" : "recorded") " " label
    if (name ~ /_sum$/) sum[key] = $2; else count[key] = $2
  }
  END { for (k in count) if (count[k] > 0) printf "worker: %s: %d messages, mean %.1f ms\n", k, count[k], 1000 * sum[k] / count[k] }' | sort
[ "$status" = succeeded ] || { echo "failed devices:"; api GET "/deployments/$deployment/devices?state=failure" | head -c 2000; exit 1; }
