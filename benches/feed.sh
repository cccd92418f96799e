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
exec bash "$(dirname "$0")/many-sockets.sh" tollgate-feed-bench feed "$@"
