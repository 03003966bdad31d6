#!/usr/bin/env bash
# Start-up time of droverd on an empty data directory: from launch until /readyz answers 200
# (data dir, config file, database and migrations, the first admin with its argon2 hash).
#
#   scripts/bench-startup.sh                     # SQLite in the data directory
#   BENCH_PG=postgres://postgres@127.0.0.1:5432/test scripts/bench-startup.sh   # a fresh schema per run
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin droverd >/dev/null 2>&1
runs=${RUNS:-10}
port=${PORT:-18181}
for i in $(seq "$runs"); do
  dir=$(mktemp -d)
  url_args=()
  if [ -n "${BENCH_PG:-}" ]; then
    schema="bench_startup_$$_$i"
    psql -q "$BENCH_PG" -c "CREATE SCHEMA $schema" >/dev/null
    url_args=(--database-url "$BENCH_PG?options=-c%20search_path%3D$schema")
  fi
  start=$(date +%s%N)
  DROVER_ADMIN_PASSWORD=benchmark-password target/release/droverd --data-dir "$dir/data" \
    --http-listen "127.0.0.1:$port" "${url_args[@]}" >/dev/null 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do sleep 0.002; done
  end=$(date +%s%N)
  kill "$pid"; wait "$pid" || true
  echo $(((end - start) / 1000000))
  rm -rf "$dir"
  if [ -n "${BENCH_PG:-}" ]; then PGOPTIONS=--client-min-messages=warning psql -q "$BENCH_PG" -c "DROP SCHEMA $schema CASCADE" >/dev/null; fi
done | sort -n | awk '{a[NR]=$1} END {printf "runs=%d min=%dms median=%dms max=%dms\n", NR, a[1], a[int((NR+1)/2)], a[NR]}'
