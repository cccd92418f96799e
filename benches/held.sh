#!/usr/bin/env bash
# The memory cost of held requests: the gateway's RSS with N requests held open for approval
# (vs. idle) and the latency of releasing one after it is approved.
#
#   bash benches/held.sh            # 10,000 held, 200 released (release build)
#   bash benches/held.sh --quick    # 1,000 held, 50 released: a smoke run (CI)
#
# Builds everything in release mode, then runs the benchmark driver, which starts the
# origin, the gateway and the held clients on loopback and prints a Markdown table (also
# written to target/bench/held.md). Other flags (--held N, --releases M, ...) are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every held request is a socket in the driver and one in the gateway, each process under
# its own open-files limit (the gateway inherits this one): raise the soft limit to the hard.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ]; then hard=1048576; fi
ulimit -n "$hard" 2>/dev/null || true
cargo build --release -q -p tollgate-gateway -p tollgate-benches
mkdir -p target/bench
exec target/release/tollgate-held-bench --gateway target/release/tollgate --out target/bench/held.md "$@"
