#!/bin/sh
# Remote access throughput and latency (BENCHMARKS.md, "Remote access"): release builds of
# droverd, drover-agent and drover; Mosquitto on loopback as the broker (see the test's
# Broker); keystroke round trips (BENCH_KEYS, default 1000) through a PTY running `cat`,
# 256 MB through `drover forward`, 64 MiB through the web UI proxy, 100 MiB each way through
# `drover cp`.
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p drover-agent --bin drover-agent -p drover-cli --bin drover
cargo test --release -p drover-server --test it remote::bench_remote -- --ignored --nocapture 2>&1 | grep '^BENCH'
