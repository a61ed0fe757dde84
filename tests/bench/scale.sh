#!/usr/bin/env bash
# Scale on one machine: 100 VMs with small tracked disks (16 MiB), a 5 s policy, a 64 KiB
# write on every VM every 5 s: cycles per second sustained and p50/p99 RPO (bench-rpo); then
# the registry's start-up with 100,000 catalog entries (bench-catalog). Two key=value lines.
# SCALE_VMS and SCALE_SECONDS change the first.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
source deploy/packages.sh
ensure_packages
cargo build --release -q -p ferry-tests --bin bench-rpo --bin bench-catalog
export RUST_LOG="${RUST_LOG:-warn}"
"$repo/target/release/bench-rpo" --vms "${SCALE_VMS:-100}" --seconds "${SCALE_SECONDS:-60}" \
  --disk-mib 16 --write-kib 64 --write-every-ms 5000
"$repo/target/release/bench-catalog" --entries 100000
