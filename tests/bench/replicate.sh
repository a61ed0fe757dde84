#!/usr/bin/env bash
# Replicates a 2 GiB image of realistic content through the whole mesh; compares with restic
# backup and qemu-img convert of the same file in the same run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
source deploy/packages.sh
ensure_packages
command -v restic >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic; }
cargo build --release -q -p ferry-tests --bin bench-replicate
RUST_LOG="${RUST_LOG:-warn}" exec "$repo/target/release/bench-replicate" "$@"
