#!/usr/bin/env bash
# The sandbox service's cost per backend, with 1 and 4 sessions at once: cold start to the first
# execution's end, the first Python call, the warm round trips of `true` and of Python's `1+1`
# (p50/p99), the first `import pandas`, resume after an idle stop, memory per session.
#
#   sudo bash benches/sessions.sh                 # both backends, 200 executions per session
#   sudo bash benches/sessions.sh --quick         # 20 executions per session: a smoke run
#   sudo bash benches/sessions.sh --backends netns
#
# Needs root; the qemu backend also QEMU and the guest image in /var/lib/tollgate-launcher/image
# (built there if it has no root file system: debootstrap and erofs-utils). Other flags are
# passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tollgate-gateway -p tollgate-launcher -p tollgate-guest -p tollgate-benches
mkdir -p target/bench
image=/var/lib/tollgate-launcher/image
grep -q '"erofs"' "$image/image.json" 2>/dev/null || target/release/tollgate-launcher image build --out "$image"
args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then args+=(--executions 20); else args+=("$a"); fi
done
exec target/release/tollgate-sessions-bench --gateway target/release/tollgate \
  --launcher target/release/tollgate-launcher --image "$image" --out target/bench/sessions.md "${args[@]}"
