#!/usr/bin/env bash
# Device-registry listing speed at fleet scale: seeds DEVICES (default 100,000) devices with
# tags, inventory attributes and presence, then times first and deep pages, a filter, sorts,
# search, and a dynamic group's count, members and preview (20 runs each; median, min, max).
#
#   scripts/bench-devices.sh                     # SQLite file in a temporary directory
#   BENCH_PG=postgres://postgres@127.0.0.1:5432/test scripts/bench-devices.sh   # a fresh schema
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${DEVICES:-100000}
cargo build --release --locked -p drover-server --example bench_devices >/dev/null 2>&1
bin=target/release/examples/bench_devices
if [ -n "${BENCH_PG:-}" ]; then
  schema="bench_devices_$$"
  psql -q "$BENCH_PG" -c "CREATE SCHEMA $schema" >/dev/null
  trap 'PGOPTIONS=--client-min-messages=warning psql -q "$BENCH_PG" -c "DROP SCHEMA $schema CASCADE" >/dev/null' EXIT
  "$bin" "$BENCH_PG?options=-c%20search_path%3D$schema" "$devices"
else
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  "$bin" "sqlite://$dir/drover.db?mode=rwc" "$devices"
fi
