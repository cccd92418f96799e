#!/usr/bin/env bash
# Builds and runs a benchmark driver that holds many connections open (held requests, feed
# listeners): each is a socket in the driver and one in the gateway, each process under its
# own open-files limit (the gateway inherits this one), so the soft limit is raised to the
# hard one first.
#
#   bash benches/many-sockets.sh DRIVER NAME [flags passed to the driver]
#
# runs target/release/DRIVER against target/release/tollgate and writes its Markdown table
# to target/bench/NAME.md too.
set -euo pipefail
cd "$(dirname "$0")/.."
driver=$1 name=$2
shift 2
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ]; then hard=1048576; fi
ulimit -n "$hard" 2>/dev/null || true
cargo build --release -q -p tollgate-gateway -p tollgate-benches
mkdir -p target/bench
exec "target/release/$driver" --gateway target/release/tollgate --out "target/bench/$name.md" "$@"
