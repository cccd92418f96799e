#!/usr/bin/env bash
# Soak run: mixed load against the release gateway for a long time, sampling its resident
# memory and open file descriptors; prints the samples and their slopes over the second half.
# Not part of CI (it runs for minutes).
#
#   bash benches/soak.sh                # 10 minutes, a sample every 10 s
#   bash benches/soak.sh --minutes 60   # longer
#   bash benches/soak.sh --quick        # 20 s, a sample every 2 s (smoke run)
#
# Builds in release mode, then runs the driver (benches/src/soak.rs), which starts the
# origins, the gateway and its load on loopback; the Markdown is also written to
# target/bench/soak.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tollgate-gateway -p tollgate-benches
mkdir -p target/bench
exec target/release/tollgate-soak --gateway target/release/tollgate --out target/bench/soak.md "$@"
