#!/usr/bin/env bash
# Runs Drover for a first look: droverd on http://127.0.0.1:8080 with its data in ./demo-data.
# Sign in as admin with the password printed below. Ctrl-C stops it; run it again to
# continue where you left off, or delete ./demo-data to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
export DROVER_ADMIN_PASSWORD="${DROVER_ADMIN_PASSWORD:-drover-demo-admin}"
LISTEN="${DROVER_HTTP_LISTEN:-127.0.0.1:8080}"
cargo build --release --locked --bin droverd
echo
echo "Drover: open http://$LISTEN and sign in as admin / $DROVER_ADMIN_PASSWORD"
echo
exec target/release/droverd --data-dir demo-data --http-listen "$LISTEN"
