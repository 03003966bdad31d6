#!/usr/bin/env bash
# Drover's whole test suite, exactly as CI runs it.
#
# On a fresh Debian machine it first installs what the tests need: Chromium and chromedriver
# (Debian packages) for the browser tests, the OpenAPI validator and moto's S3-compatible
# server (Python packages). Then it
# checks formatting and lints, and runs every test on SQLite and on PostgreSQL.
#
# PostgreSQL: DROVER_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test);
# each test makes a schema of its own there and drops it when it passes.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
  echo "test.sh: installing openapi-spec-validator"
  python3 -m pip install --quiet --disable-pip-version-check 'openapi-spec-validator==0.9.0'
fi
if ! python3 -c 'import moto.server' 2>/dev/null; then
  echo "test.sh: installing moto (a local S3-compatible server for the artifact store tests)"
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]==5.2.1'
fi

export DROVER_TEST_DATABASE_URL="${DROVER_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
if ! pg_isready -q -d "$DROVER_TEST_DATABASE_URL" 2>/dev/null; then
  echo "test.sh: PostgreSQL does not answer at $DROVER_TEST_DATABASE_URL; start it or set DROVER_TEST_DATABASE_URL" >&2
  exit 1
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
