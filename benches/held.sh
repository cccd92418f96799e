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
exec bash "$(dirname "$0")/many-sockets.sh" tollgate-held-bench held "$@"
