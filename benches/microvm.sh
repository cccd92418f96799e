#!/usr/bin/env bash
# The sandbox launcher's cost: time from `tollgate-launcher up` to the VM's first request at
# the gateway, and the memory per microVM, for one VM and for two started at once.
#
#   sudo bash benches/microvm.sh             # 3 rounds
#   sudo bash benches/microvm.sh --quick     # 1 round: a smoke run
#
# Needs root, QEMU (apt-get install -y qemu-system-x86 busybox-static xz-utils); builds the
# guest image into target/bench/guest-image if there is none (without the sessions' root file
# system: `up` boots the initramfs alone). Other flags are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tollgate-gateway -p tollgate-launcher -p tollgate-benches
mkdir -p target/bench
image=target/bench/guest-image
[ -f "$image/image.json" ] || target/release/tollgate-launcher image build --without-root --out "$image"
args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then args+=(--rounds 1); else args+=("$a"); fi
done
exec target/release/tollgate-microvm-bench --gateway target/release/tollgate \
  --launcher target/release/tollgate-launcher --image "$image" --out target/bench/microvm.md "${args[@]}"
