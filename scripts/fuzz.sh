#!/usr/bin/env bash
# Runs every fuzz target (FUZZING.md) for FUZZ_SECS seconds each (default 60) with the
# stable toolchain's test harness, and prints per target the executions, the seconds and
# "no crash" or the file the crashing input was saved to (under fuzz/corpus/<target>/).
#
#   FUZZ_SECS=3600 scripts/fuzz.sh            # every target, an hour each
#   FUZZ_SECS=300 scripts/fuzz.sh broker      # the targets of one crate (proto, artifact, broker, agent)
#
# FUZZ_THREADS (default 2) targets run at once; DROVER_FUZZ_SEED fixes the RNG seed.
set -u
cd "$(dirname "$0")/.."
secs="${FUZZ_SECS:-60}"
threads="${FUZZ_THREADS:-2}"
log="$(mktemp -t drover-fuzz.XXXXXX)"
trap 'rm -f "$log"' EXIT

# crate, test binary, test name filter
suites=(
  "proto drover-proto fuzz -"
  "artifact drover-artifact it fuzz::"
  "broker drover-broker it fuzz::"
  "agent drover-agent it fuzz::"
)
status=0
for s in "${suites[@]}"; do
  read -r short pkg bin filter <<<"$s"
  if [ $# -gt 0 ] && [[ " $* " != *" $short "* ]]; then
    continue
  fi
  echo "== $pkg: every target for ${secs} s" >&2
  args=()
  [ "$filter" != - ] && args=("$filter")
  DROVER_FUZZ_SECS="$secs" RUST_BACKTRACE=0 cargo test -p "$pkg" --test "$bin" -- "${args[@]}" \
    --nocapture --test-threads "$threads" >"$log" 2>&1
  rc=$?
  # The driver prints "fuzz NAME: N execs in S s, seed X, no crash", or panics with
  # "fuzz NAME: a ... input panicked ...; saved to PATH".
  grep -oE 'fuzz [a-z_]+: [0-9]+ execs in .*, no crash' "$log" | sed -E \
    -e 's/^fuzz ([a-z_]+): ([0-9]+) execs in ([0-9.]+) s, seed ([0-9]+), no crash$/\1\t\2 execs\t\3 s\tno crash (seed \4)/'
  grep -oE 'fuzz [a-z_]+: a .* input .*' "$log" | sed -E 's/^fuzz ([a-z_]+): (.*)$/\1\tCRASH: \2/'
  if [ "$rc" -ne 0 ]; then
    status=1
    if ! grep -qE 'fuzz [a-z_]+: a .* input ' "$log"; then
      echo "$pkg: the test run failed:" >&2
      tail -30 "$log" >&2
    fi
  fi
done
exit "$status"
