#!/usr/bin/env bash
# End-to-end load comparison: direct vs. through Tollgate, side by side in one run.
#
#   bash benches/e2e.sh            # 10 s per configuration (release build)
#   bash benches/e2e.sh --quick    # a 1 s smoke run (CI)
#
# Builds everything in release mode, then runs the benchmark driver, which starts the
# origin, the gateway and its own load generator on loopback and prints a Markdown table
# (also written to target/bench/e2e.md).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tollgate-gateway -p tollgate-benches
mkdir -p target/bench
exec target/release/tollgate-e2e-bench --gateway target/release/tollgate \
  --passthrough target/release/tollgate-passthrough --out target/bench/e2e.md "$@"
