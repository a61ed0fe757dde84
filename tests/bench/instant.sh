#!/usr/bin/env bash
# Instant recovery of a 10 GiB raw disk holding 2 GiB of data: time from `ferry failover test
# VM --instant` to the driver's start call (ready_s, target < 2 s), and a full read of the
# disk through its NBD export while the background copy runs, against a copy-first failover
# of the same point read the same way, in the same run (speedup_vs_copy_first).
# Flags: --size-gib N --data-gib N --dir DIR (the image and the mesh; default $TMPDIR).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
source deploy/packages.sh
ensure_packages
cargo build --release -q -p ferry --bin ferry -p ferry-tests --bin bench-instant
RUST_LOG="${RUST_LOG:-warn}" exec "$repo/target/release/bench-instant" "$@"
