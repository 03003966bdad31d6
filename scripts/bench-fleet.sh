#!/usr/bin/env bash
# Fleet connections: one droverd (SQLite in a temporary directory, embedded broker) against
# SIMS drover-sim processes of DEVICES devices each (default 3 x 5,000 = 15,000: one process
# may hold only about 20,000 open files here). Measures
#   1. enroll + connect: time until every device is enrolled and connected, from the
#      simulators' start;
#   2. connect: droverd restarted on the same data, the simulators started again from their
#      state directories (no enrollment): full mutual-TLS connections (handshake, CONNECT,
#      registry check, status/hello/inventory ingested) per second of droverd CPU;
#   3. droverd's resident memory after the restart and with the fleet connected -> per device;
#   4. droverd's CPU over two windows of IDLE_SECS (default 30) with the fleet connected.
#
#   scripts/bench-fleet.sh                       # 3 x 5,000
#   SIMS=2 DEVICES=1000 scripts/bench-fleet.sh   # smaller
# Other knobs: RATE (connections/s per simulator, default 1000), HEARTBEAT (s, default 60),
# TIMEOUT (s per phase, default 900), HTTP_PORT/MQTT_PORT/DEV_PORT (default 38080/38883/38443).
set -euo pipefail
cd "$(dirname "$0")/.."
sims=${SIMS:-3}
devices=${DEVICES:-5000}
rate=${RATE:-1000}
heartbeat=${HEARTBEAT:-60}
idle_secs=${IDLE_SECS:-30}
timeout=${TIMEOUT:-900}
http=127.0.0.1:${HTTP_PORT:-38080}
mqtt_port=${MQTT_PORT:-38883}
dev_port=${DEV_PORT:-38443}
total=$((sims * devices))

cargo build --release --locked --bin droverd --bin drover-sim >/dev/null 2>&1
droverd=target/release/droverd
sim=target/release/drover-sim
dir=$(mktemp -d)
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_all
  [ -n "${server:-}" ] && kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT

tck=$(getconf CLK_TCK)
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
now() { date +%s.%N; }
mqtt_connections() {
  curl -sf "http://$http/metrics" | awk '/^drover_mqtt_connections / {print $2}'
}

start_server() {
  DROVER_LOG=warn "$droverd" --data-dir "$dir/data" --http-listen "$http" \
    --mqtt-listen "127.0.0.1:$mqtt_port" --device-listen "127.0.0.1:$dev_port" >>"$dir/droverd.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do curl -sf "http://$http/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://$http/readyz" >/dev/null || { cat "$dir/droverd.log"; exit 1; }
}
start_server
"$droverd" --data-dir "$dir/data" ca cert >"$dir/ca.pem"
admin=$("$droverd" --data-dir "$dir/data" token create --role admin --name bench 2>/dev/null | grep -o 'drv_[A-Za-z0-9_-]*')
token=$(curl -sf -X POST -H "Authorization: Bearer $admin" -H 'content-type: application/json' \
  -d "{\"name\":\"bench-fleet\",\"max_uses\":$total}" "http://$http/api/v1/enrollment-tokens" |
  sed -n 's/.*"secret":"\(dre_[^"]*\)".*/\1/p')

# Starts the simulators; waits until each has printed "all N devices connected".
run_sims() { # $1: phase name
  local phase=$1
  for k in $(seq "$sims"); do
    "$sim" --server "https://localhost:$dev_port" --ca "$dir/ca.pem" --mqtt "localhost:$mqtt_port" \
      --token "$token" -n "$devices" --prefix "bench-$k" --state-dir "$dir/sim-$k" \
      --connect-rate "$rate/s" --heartbeat "$heartbeat" --max-backoff 30 --report 10 \
      >"$dir/sim-$k.$phase.log" 2>&1 &
    pids+=($!)
  done
  local deadline=$((SECONDS + timeout))
  while :; do
    local done_count=0
    for k in $(seq "$sims"); do
      grep -q "^all $devices devices connected in" "$dir/sim-$k.$phase.log" && done_count=$((done_count + 1))
    done
    [ "$done_count" -eq "$sims" ] && break
    if [ $SECONDS -ge $deadline ]; then
      echo "phase $phase: not all connected after ${timeout}s:"
      for k in $(seq "$sims"); do tail -n 2 "$dir/sim-$k.$phase.log"; done
      echo "broker connections: $(mqtt_connections)"
      exit 1
    fi
    sleep 0.2
  done
}

echo "fleet: $sims simulators x $devices devices = $total, connect rate $rate/s per simulator, heartbeat ${heartbeat}s"

# 1. Enroll and connect.
t0=$(now); c0=$(cpu_ticks "$server")
run_sims enroll
t1=$(now); c1=$(cpu_ticks "$server")
for k in $(seq "$sims"); do grep "^all " "$dir/sim-$k.enroll.log" | sed "s/^/  sim $k: /"; done
awk -v a="$t0" -v b="$t1" -v c=$((c1 - c0)) -v t="$tck" -v n="$total" 'BEGIN {
  printf "enroll + connect: all %d enrolled and connected in %.1f s (%.0f devices/s); droverd CPU %.1f s\n", n, b - a, n / (b - a), c / t }'
echo "broker connections (devices + droverd's own client): $(mqtt_connections)"

# A fresh droverd on the same data, so that its memory holds connections, not what enrolling
# 15,000 devices left behind.
stop_all
kill -TERM "$server"; wait "$server" || true
start_server
sleep 3
rss_before=$(rss_kb "$server")
echo "droverd restarted: RSS $((rss_before / 1024)) MiB with no device connected"

# 2. Reconnect from the state directories: connections per droverd CPU second.
t0=$(now); c0=$(cpu_ticks "$server")
run_sims reconnect
t1=$(now); c1=$(cpu_ticks "$server")
for k in $(seq "$sims"); do grep "^all " "$dir/sim-$k.reconnect.log" | sed "s/^/  sim $k: /"; done
awk -v a="$t0" -v b="$t1" -v c=$((c1 - c0)) -v t="$tck" -v n="$total" 'BEGIN {
  printf "connect (enrolled devices): %d mutual-TLS connections in %.1f s (%.0f/s); droverd CPU %.1f s = %.0f connections per core-second\n", n, b - a, n / (b - a), c / t, n / (c / t) }'
echo "broker connections (devices + droverd's own client): $(mqtt_connections)"

# 3. Memory with the fleet connected (after it settled).
sleep 10
rss_after=$(rss_kb "$server")
awk -v a="$rss_before" -v b="$rss_after" -v n="$total" 'BEGIN {
  printf "droverd RSS: %.0f MiB -> %.0f MiB with %d devices connected: %.1f KiB per device\n", a / 1024, b / 1024, n, (b - a) / n }'

# 4. Idle CPU: two windows of IDLE_SECS; with the default 30 s and 60 s heartbeats, together
# they hold one heartbeat of every device (the first window may hold none of them).
for w in 1 2; do
  c0=$(cpu_ticks "$server"); t0=$(now)
  sleep "$idle_secs"
  c1=$(cpu_ticks "$server"); t1=$(now)
  awk -v c=$((c1 - c0)) -v t="$tck" -v a="$t0" -v b="$t1" -v n="$total" -v hb="$heartbeat" -v w="$w" 'BEGIN {
    printf "droverd CPU, window %d, %d devices connected (heartbeat every %d s): %.2f s over %.0f s = %.1f%% of one core\n", w, n, hb, c / t, b - a, 100 * c / t / (b - a) }'
done
stop_all
grep -ciE "error|panic" "$dir/droverd.log" | sed 's/^/droverd log lines with error or panic: /' || true
