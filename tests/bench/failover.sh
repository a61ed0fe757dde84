#!/usr/bin/env bash
# Failover of a 2 GiB image of realistic content (as the replicate benchmark makes it) to a
# recovery host on this machine, through the CLI (FAILOVER_MODE=test, the default: `ferry
# failover test VM`; FAILOVER_MODE=planned: `ferry failover planned VM --wait`): time from the
# command to the driver's start call (rto_s), materialise rate (mb_per_s), against `restic
# restore` of the same image from a local repository in the same run. SIZE_MIB=N for a
# smaller image. Two runs by default: cold (the whole point from the store: cold_rto_s) and
# from a standby copy at the latest point (rto_s); `--cold` or `--standby` runs one of them
# (a planned failover runs once: the standby run unless --cold).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
source deploy/packages.sh
ensure_packages
command -v restic >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic; }
cargo build --release -q -p ferry --bin ferry -p ferry-tests --bin bench-failover
RUST_LOG="${RUST_LOG:-warn}" exec "$repo/target/release/bench-failover" "$@"
