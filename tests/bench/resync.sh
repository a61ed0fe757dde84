#!/usr/bin/env bash
# Checksum resync of a 2 GiB disk after 1 % of its 64 KiB blocks were rewritten behind the
# tracker's back, against rsync --no-whole-file --inplace --ignore-times of the same change,
# in one run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
source deploy/packages.sh
ensure_packages
command -v rsync >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync; }
cargo build --release -q -p ferry-tests --bin bench-resync
RUST_LOG="${RUST_LOG:-warn}" exec "$repo/target/release/bench-resync" "$@"
