#!/usr/bin/env bash
# Failback with checksum sync of a 2 GiB disk after 1 % of its 64 KiB blocks were rewritten at
# the recovery site, against rsync --no-whole-file --inplace of the recovered disk onto the
# original, in one run (bench-failback's header says what is timed). --size-mib N for another
# size.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
source deploy/packages.sh
ensure_packages
command -v rsync >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync; }
cargo build --release -q -p ferry --bin ferry -p ferry-tests --bin bench-failback
RUST_LOG="${RUST_LOG:-warn}" exec "$repo/target/release/bench-failback" "$@"
