#!/usr/bin/env bash
# Ferry's main job on one machine, end to end: bring the mesh up (embedded default: local
# filesystem store, a redis-server it starts itself), make a sample VM with two VHDX disks
# written by qemu-io, register a host agent, protect the VM, test-fail it over and report
# whether the recovered disks are identical to the source (qemu-img compare).
#   deploy/demo.sh [WORKDIR]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source deploy/packages.sh
ensure_packages
cargo build --release --bins -q
bin="$repo/target/release"

work="${1:-$(mktemp -d /tmp/ferry-demo.XXXXXX)}"
mkdir -p "$work/host"
work="$(cd "$work" && pwd)"
cfg="$work/mesh/ferry.toml"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== ferry up --data-dir $work/mesh"
"$bin/ferry" up --data-dir "$work/mesh" >"$work/mesh.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
  [[ -f "$cfg" ]] && "$bin/ferry" --config "$cfg" status >/dev/null 2>&1 && break
  sleep 0.5
done
"$bin/ferry" --config "$cfg" status

echo "== a sample VM: web01 with two dynamic VHDX disks written by qemu-io"
qemu-img create -q -f vhdx -o subformat=dynamic "$work/host/web01-os.vhdx" 512M
qemu-io -f vhdx -c 'write -P 0xab 0 64M' -c 'write -P 0xcd 200M 16M' -c 'write -z 16M 8M' \
  -c 'write -P 0x5a 511M 1M' "$work/host/web01-os.vhdx" >/dev/null
qemu-img create -q -f vhdx -o subformat=dynamic "$work/host/web01-data.vhdx" 256M
qemu-io -f vhdx -c 'write -P 0x42 1M 32M' -c 'write -P 0x17 100M 3M' "$work/host/web01-data.vhdx" >/dev/null

echo "== register the host agent"
"$bin/ferry" --config "$cfg" vault registration-key --out "$work/host/key.json"
cat >"$work/host/agent.toml" <<TOML
registration_key = "key.json"
data_dir = "agent-data"
[host]
name = "hv01"
site = "site-a"
[[vm]]
name = "web01"
disks = ["web01-os.vhdx", "web01-data.vhdx"]
[tracker]
TOML
"$bin/ferry-agent" --config "$work/host/agent.toml" >"$work/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
  "$bin/ferry" --config "$cfg" vm list -o json 2>/dev/null | grep -q '"web01"' && break
  sleep 0.5
done
"$bin/ferry" --config "$cfg" vm list

echo "== protect web01"
"$bin/ferry" --config "$cfg" vm protect web01 --frequency 5m --wait
"$bin/ferry" --config "$cfg" points list web01

# A folder the mesh may write into lies under its export_roots (default D/exports).
out="$work/mesh/exports/failover"
echo "== test failover to $out"
"$bin/ferry" --config "$cfg" failover test web01 --point latest --target "$out"
result=0
for d in web01-os.vhdx web01-data.vhdx; do
  if qemu-img compare -q -f vhdx -F vhdx "$work/host/$d" "$out/$d"; then
    echo "$d: identical"
  else
    echo "$d: DIFFERENT"; result=1
  fi
done
"$bin/ferry" --config "$cfg" failover cleanup web01 >/dev/null
if ((result == 0)); then echo "demo: recovered disks are identical to the source"; else echo "demo: recovered disks differ"; fi
exit $result
