#!/usr/bin/env bash
# The sandbox service's cost per backend, with 1 and 4 sessions at once: cold start, the warm
# round trip of an execution of `true` (p50/p99), resume after an idle stop, memory per session.
#
#   sudo bash benches/sessions.sh                 # both backends, 200 executions per session
#   sudo bash benches/sessions.sh --quick         # 20 executions per session: a smoke run
#   sudo bash benches/sessions.sh --backends netns
#
# Needs root; the qemu backend also QEMU and a guest image (built into target/bench/guest-image
# if there is none). Other flags are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tollgate-gateway -p tollgate-launcher -p tollgate-guest -p tollgate-benches
mkdir -p target/bench
image=target/bench/guest-image
grep -q '"ext4"' "$image/image.json" 2>/dev/null || target/release/tollgate-launcher image build --out "$image"
args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then args+=(--executions 20); else args+=("$a"); fi
done
exec target/release/tollgate-sessions-bench --gateway target/release/tollgate \
  --launcher target/release/tollgate-launcher --image "$image" --out target/bench/sessions.md "${args[@]}"
