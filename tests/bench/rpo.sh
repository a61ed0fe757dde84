#!/usr/bin/env bash
# RPO under load: 8 VMs each writing 2 MB/s through the tracker with a 5 s policy; p50/p99 RPO.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
source deploy/packages.sh
ensure_packages
cargo build --release -q -p ferry-tests --bin bench-rpo
RUST_LOG="${RUST_LOG:-warn}" exec "$repo/target/release/bench-rpo" "$@"
