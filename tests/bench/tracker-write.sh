#!/usr/bin/env bash
# Write throughput through the tracker (every write applied to the image and recorded in its
# .hrl before the answer) against qemu-nbd serving the same image file, same client
# (`qemu-img bench -w`, queue depth 16, over a Unix socket), same fresh 1 GiB image each run:
# raw and dynamic VHDX; sequential and scattered (a prime step, so every offset is visited in
# a pseudo-random order) 4 KiB and 64 KiB writes. Best of N runs each.
# Last line: key=value figures (MB/s), ratio_vs_qemu_nbd = the lowest of the ratios.
set -euo pipefail
shopt -s inherit_errexit
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
runs="${FERRY_BENCH_RUNS:-3}"
work="${FERRY_BENCH_DIR:-${TMPDIR:-/tmp}/ferry-bench-tracker}"
depth="${FERRY_BENCH_DEPTH:-16}"
size=$((1024 * 1024 * 1024))
rm -rf "$work"; mkdir -p "$work"
export BC_LINE_LENGTH=0

# The tracker server is an ignored harness entry of the tracker tests (release build).
bin=$(cargo test --release -q -p ferry-agent --test tracker --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*\/deps\/tracker-[^"]*\)".*/\1/p' | tail -1)
[[ -x "$bin" ]] || { echo "cannot build the tracker test binary" >&2; exit 1; }

now() { date +%s.%N; }
server_pid=""
stop_server() {
  if [[ -n "$server_pid" ]]; then
    exec 9>&-   # closing the server's stdin stops it (the tracker seals its log)
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

# start_server KIND FMT IMG: serves IMG over $work/sock*; sets $uri.
start_server() {
  local kind=$1 fmt=$2 img=$3
  rm -rf "$work/sock" "$work/uri"; mkdir -p "$work/sock"
  if [[ $kind == tracker ]]; then
    exec 9> >(FERRY_BENCH_DISK="$img" FERRY_BENCH_SOCK_DIR="$work/sock" FERRY_BENCH_URI_FILE="$work/uri" \
      RUST_LOG=warn "$bin" --ignored --exact bench_server --nocapture >"$work/server.log" 2>&1)
    server_pid=$!
    for _ in $(seq 1 400); do [[ -s "$work/uri" ]] && break; sleep 0.05; done
    [[ -s "$work/uri" ]] || { echo "tracker did not start:" >&2; cat "$work/server.log" >&2; exit 1; }
    uri=$(cat "$work/uri")
  else
    # Same cache mode as the tracker (page cache, writeback; flushes sync).
    exec 9> >(exec qemu-nbd --persistent -f "$fmt" --cache=writeback --aio=threads -x disk \
      -k "$work/sock/nbd.sock" "$img" >"$work/server.log" 2>&1)
    server_pid=$!
    for _ in $(seq 1 400); do [[ -S "$work/sock/nbd.sock" ]] && break; sleep 0.05; done
    [[ -S "$work/sock/nbd.sock" ]] || { echo "qemu-nbd did not start:" >&2; cat "$work/server.log" >&2; exit 1; }
    uri="nbd+unix:///disk?socket=$work/sock/nbd.sock"
  fi
}

# One timed run on a fresh image: prints MB/s.
one_run() {
  local kind=$1 fmt=$2 opts=$3 bs=$4 step=$5 count=$6
  rm -f "$work"/img*
  qemu-img create -q -f "$fmt" ${opts:+-o "$opts"} "$work/img" "$size"
  start_server "$kind" "$fmt" "$work/img"
  local t0 t1
  t0=$(now)
  qemu-img bench -q -w -f raw -d "$depth" -c "$count" -s "$bs" -S "$step" --pattern=0x5a "$uri" >/dev/null
  t1=$(now)
  if [[ $kind == qemu ]]; then kill "$server_pid" 2>/dev/null || true; fi
  stop_server
  echo "$count * $bs / ($t1 - $t0) / 1000000" | bc -l
}

best_of() {
  local best=0 v
  for _ in $(seq 1 "$runs"); do
    v=$(one_run "$@")
    if (( $(echo "$v > $best" | bc -l) )); then best=$v; fi
  done
  printf '%.1f' "$best"
}

declare -A fig
min_ratio=""
for spec in "raw:raw:" "vhdx:vhdx:subformat=dynamic"; do
  IFS=: read -r name fmt opts <<<"$spec"
  for io in "seq4k:4096:4096:65536" "rand4k:4096:$((7919 * 4096)):65536" \
            "seq64k:65536:65536:8192" "rand64k:65536:$((7919 * 65536)):8192"; do
    IFS=: read -r ioname bs step count <<<"$io"
    # FERRY_BENCH_CASES="raw:seq4k vhdx:rand64k" runs only those cases.
    if [[ -n "${FERRY_BENCH_CASES:-}" && " $FERRY_BENCH_CASES " != *" $name:$ioname "* ]]; then continue; fi
    ours=$(best_of tracker "$fmt" "$opts" "$bs" "$step" "$count")
    theirs=$(best_of qemu "$fmt" "$opts" "$bs" "$step" "$count")
    ratio=$(printf '%.2f' "$(echo "$ours / $theirs" | bc -l)")
    echo "$name $ioname: tracker ${ours} MB/s, qemu-nbd ${theirs} MB/s, ratio ${ratio}"
    fig[${name}_${ioname}_tracker_mbs]=$ours
    fig[${name}_${ioname}_qemu_nbd_mbs]=$theirs
    if [[ -z "$min_ratio" ]] || (( $(echo "$ratio < $min_ratio" | bc -l) )); then min_ratio=$ratio; fi
  done
done
line=""
for k in $(printf '%s\n' "${!fig[@]}" | sort); do line+="$k=${fig[$k]} "; done
echo "${line}depth=$depth runs=$runs ratio_vs_qemu_nbd=$min_ratio"
