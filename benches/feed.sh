#!/usr/bin/env bash
# The live feed of approvals under load: event latency with 1 and with 1,000 listeners while
# 100 requests a second are held and denied, and the gateway's memory per listener.
#
#   bash benches/feed.sh            # 1,000 listeners, 100 approvals/s, 20 s per round
#   bash benches/feed.sh --quick    # 100 listeners, 3 s: a smoke run (CI)
#
# Builds in release mode, then runs the driver, which starts the gateway and the listeners
# on loopback and prints a Markdown table (also written to target/bench/feed.md). Other
# flags (--listeners N, --rate R, --seconds S) are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every listener and every held request is a socket in the driver and one in the gateway.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ]; then hard=1048576; fi
ulimit -n "$hard" 2>/dev/null || true
cargo build --release -q -p tollgate-gateway -p tollgate-benches
mkdir -p target/bench
exec target/release/tollgate-feed-bench --gateway target/release/tollgate --out target/bench/feed.md "$@"
