#!/usr/bin/env bash
# Telemetry on the server (docs/telemetry-server.md). One droverd (embedded broker; SQLite in a
# temporary directory, or PostgreSQL with DATABASE_URL=postgres://…, given an empty database
# or schema) and one drover-sim of DEVICES devices sending METRICS points each every second
# through the agent's own telemetry core. Measures
#   1. sustained ingest: points stored per second (droverd's drover_telemetry_points_total)
#      over WINDOW seconds once the fleet is connected, and droverd's CPU seconds (utime +
#      stime from /proc/PID/stat) per 100,000 points stored;
#   2. a fleet aggregation over 10,000 devices x 24 hours: devices, series and rollups seeded
#      with SQL (1-hour, 15-minute and 1-minute rollups of one metric), then
#      GET /api/v1/metrics/fleet timed with step=1h (1-hour rollups), step=15m (15-minute
#      rollups) and step=5m (1-minute rollups).
#
#   scripts/bench-telemetry.sh                                   # SQLite, 1,000 x 100/s
#   DATABASE_URL=postgres://postgres@127.0.0.1/bench scripts/bench-telemetry.sh
# Knobs: DEVICES (1000), METRICS (100), WINDOW (30 s), SEED_DEVICES (10000), SKIP_SEED=1,
# SKIP_INGEST=1, STEPS ("1h 15m 5m"), RUNS (3),
# HTTP_PORT/MQTT_PORT/DEV_PORT (default 39080/39883/39443).
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${DEVICES:-1000}
metrics=${METRICS:-100}
window=${WINDOW:-30}
seed_devices=${SEED_DEVICES:-10000}
http=127.0.0.1:${HTTP_PORT:-39080}
mqtt_port=${MQTT_PORT:-39883}
dev_port=${DEV_PORT:-39443}
db_url=${DATABASE_URL:-}

[ -n "${SKIP_BUILD:-}" ] || cargo build --release --locked --bin droverd --bin drover-sim >/dev/null 2>&1
droverd=target/release/droverd
sim=target/release/drover-sim
dir=$(mktemp -d)
cleanup() {
  [ -n "${simpid:-}" ] && kill -TERM "$simpid" 2>/dev/null && wait "$simpid" 2>/dev/null
  [ -n "${server:-}" ] && kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null
  if [ -n "${KEEP:-}" ]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT
tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
now() { date +%s.%N; }

db_args=()
[ -n "$db_url" ] && db_args=(--database-url "$db_url")
DROVER_LOG=warn "$droverd" --data-dir "$dir/data" --http-listen "$http" "${db_args[@]}" \
  --mqtt-listen "127.0.0.1:$mqtt_port" --device-listen "127.0.0.1:$dev_port" >>"$dir/droverd.log" 2>&1 &
server=$!
for _ in $(seq 300); do curl -sf "http://$http/readyz" >/dev/null && break; sleep 0.1; done
"$droverd" --data-dir "$dir/data" "${db_args[@]}" ca cert >"$dir/ca.pem"
admin=$("$droverd" --data-dir "$dir/data" "${db_args[@]}" token create --role admin --name bench 2>/dev/null | grep -o 'drv_[A-Za-z0-9_-]*')
token=$(curl -sf -X POST -H "Authorization: Bearer $admin" -H 'content-type: application/json' \
  -d "{\"name\":\"bench-telemetry\",\"max_uses\":$devices}" "http://$http/api/v1/enrollment-tokens" |
  sed -n 's/.*"secret":"\(dre_[^"]*\)".*/\1/p')
stored() { curl -sf -H "Authorization: Bearer $admin" "http://$http/metrics/fleet" | awk '/^drover_telemetry_points_total / {print $2}'; }

if [ -z "${SKIP_INGEST:-}" ]; then
echo "== ingest: $devices devices x $metrics points/s, $( [ -n "$db_url" ] && echo PostgreSQL || echo SQLite )"
"$sim" --server "https://localhost:$dev_port" --ca "$dir/ca.pem" --mqtt "localhost:$mqtt_port" \
  --token "$token" -n "$devices" --prefix bench --state-dir "$dir/sim" --connect-rate 500/s \
  --telemetry-interval 1 --metrics "$metrics" --report 10 >"$dir/sim.log" 2>&1 &
simpid=$!
for _ in $(seq 600); do grep -q "all $devices devices connected" "$dir/sim.log" && break; sleep 0.5; done
grep -q "all $devices devices connected" "$dir/sim.log" || { tail -20 "$dir/sim.log"; exit 1; }
sleep 10 # past the first batches
p0=$(stored); c0=$(cpu_ticks "$server"); t0=$(now)
sleep "$window"
p1=$(stored); c1=$(cpu_ticks "$server"); t1=$(now)
awk -v p0="$p0" -v p1="$p1" -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v tck="$tck" -v offered=$((devices * metrics)) 'BEGIN {
  pts = p1 - p0; secs = t1 - t0; cpu = (c1 - c0) / tck;
  printf "offered %d points/s; stored %.0f points/s over %.1f s\n", offered, pts / secs, secs;
  printf "droverd CPU: %.2f s per 100,000 points (%.0f%% of one core); %.0f points per CPU second\n",
    cpu * 100000 / pts, 100 * cpu / secs, pts / cpu }'
echo "simulator: $(grep -v '^$' "$dir/sim.log" | tail -1)"
echo "droverd warnings: $(grep -c WARN "$dir/droverd.log" || true)"
kill -TERM "$simpid"; wait "$simpid" 2>/dev/null || true; simpid=
fi

[ -n "${SKIP_SEED:-}" ] && exit 0
echo "== fleet aggregation: $seed_devices devices x 24 h (seeded)"
start=$(( ($(date +%s) / 3600 - 24) * 3600000 ))
if [ -n "$db_url" ]; then
  run_sql() { psql -q "$db_url" -v ON_ERROR_STOP=1; }
  seq_devices="generate_series(0, $seed_devices - 1) AS n(i)"
  seq_hours="generate_series(0, 23) AS h(k)"
  seq_minutes="generate_series(0, 1439) AS m(k)"
  fmt="'seed-' || lpad(i::text, 6, '0')"
  pre=""
else
  run_sql() { { echo ".timeout 60000"; cat; } | sqlite3 "$dir/data/drover.db"; }
  pre="WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < $seed_devices - 1), \
h(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM h WHERE k < 23), m(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM m WHERE k < 1439) "
  seq_devices="n"; seq_hours="h"; seq_minutes="m"
  fmt="printf('seed-%06d', i)"
fi
ts=$(now)
run_sql <<SQL
BEGIN;
$pre INSERT INTO devices (id, org_id, status, identity, identity_hash, key_fingerprint, csr_pem, enrolled_via, created_at, updated_at)
  SELECT $fmt, (SELECT id FROM organizations LIMIT 1), 'accepted', '{}', 'seed-' || i, 'seed-fp-' || i, '', 'seed', 0, 0 FROM $seq_devices;
INSERT INTO metric_series (device_id, name) SELECT id, 'seed.load' FROM devices WHERE id LIKE 'seed-%';
$pre INSERT INTO metric_rollup_1h (series_id, bucket, count, sum, min, max)
  SELECT s.id, $start + k * 3600000, 60, 60 * (s.id % 100 + k), s.id % 100 + k - 1, s.id % 100 + k + 1
  FROM metric_series s, $seq_hours WHERE s.name = 'seed.load';
$pre INSERT INTO metric_rollup_1m (series_id, bucket, count, sum, min, max)
  SELECT s.id, $start + k * 60000, 1, s.id % 100 + k / 60, s.id % 100 + k / 60, s.id % 100 + k / 60
  FROM metric_series s, $seq_minutes WHERE s.name = 'seed.load';
INSERT INTO metric_rollup_15m (series_id, bucket, count, sum, min, max)
  SELECT r.series_id, r.bucket - r.bucket % 900000, SUM(r.count), SUM(r.sum), MIN(r.min), MAX(r.max)
  FROM metric_rollup_1m r JOIN metric_series s ON s.id = r.series_id WHERE s.name = 'seed.load'
  GROUP BY r.series_id, r.bucket - r.bucket % 900000;
COMMIT;
SQL
echo "seeded in $(awk -v a="$ts" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}') s"
for step in ${STEPS:-1h 15m 5m}; do
  for i in $(seq "${RUNS:-3}"); do
    out=$(curl -sf -o "$dir/fleet.json" -w '%{time_total}' -H "Authorization: Bearer $admin" \
      "http://$http/api/v1/metrics/fleet?metric=seed.load&from=$start&to=$((start + 86400000))&step=$step")
    echo "step=$step run $i: ${out} s, $(grep -o '"devices":[0-9]*' "$dir/fleet.json" | head -1), $(grep -o '"t":' "$dir/fleet.json" | wc -l) buckets"
  done
done
