#!/usr/bin/env bash
# Delta replication of 1 % random 64 KiB rewrites of a 2 GiB disk through the tracker, against
# rsync --no-whole-file --inplace and restic backup of the same change, in one run.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
source deploy/packages.sh
ensure_packages
for p in restic rsync; do
  command -v "$p" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p"; }
done
cargo build --release -q -p ferry-tests --bin bench-delta
RUST_LOG="${RUST_LOG:-warn}" exec "$repo/target/release/bench-delta" "$@"
