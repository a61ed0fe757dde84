#!/usr/bin/env bash
# The registry's start-up with 100,000 catalog entries: a full replay against the newest
# snapshot plus the entries after it, in one run (bench-catalog --entries N to change it).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
cargo build --release -q -p ferry-tests --bin bench-catalog
RUST_LOG="${RUST_LOG:-warn}" exec "$repo/target/release/bench-catalog" "$@"
