#!/usr/bin/env bash
# Sequential read of a 2 GiB dynamic VHDX and VHD (qemu-made, deterministic content written by
# qemu-io): ferry-disk's reader (examples/readbench: 8 MiB page-aligned reads handed out in
# order to one thread per core, as qemu-img keeps several requests in flight) against
# `qemu-img convert` into qemu's null target (the /dev/null of its block layer), same files,
# warm page cache, best of N runs each.
# Last line: key=value figures, ratio_vs_qemu = the lower of the two throughput ratios.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
runs="${FERRY_BENCH_RUNS:-3}"
work="${FERRY_BENCH_DIR:-${TMPDIR:-/tmp}/ferry-bench-read}"
size=$((2 * 1024 * 1024 * 1024))
mkdir -p "$work"
export BC_LINE_LENGTH=0

cargo build --release -q -p ferry-disk --example readbench
bin="$root/target/release/examples/readbench"

# 2 GiB: 32 regions of 64 MiB, each filled with its own byte, every 8th left unwritten (a hole),
# plus zero-writes and small writes so block maps are not trivially contiguous.
make_image() {
  local fmt=$1 opts=$2 out=$3
  [[ -f "$out" ]] && return 0
  qemu-img create -q -f "$fmt" -o "$opts" "$out.tmp" "$size"
  local cmds=() i
  for i in $(seq 0 31); do
    (( i % 8 == 7 )) && continue
    cmds+=(-c "write -P $(( (i * 37 + 1) % 256 )) $(( i * 64 * 1024 * 1024 )) 64M")
  done
  cmds+=(-c "write -z $(( 100 * 1024 * 1024 )) 4M" -c "write -P 0x5a $(( 1500 * 1024 * 1024 + 512 )) 4k")
  qemu-io -f "$fmt" "${cmds[@]}" "$out.tmp" >/dev/null
  mv "$out.tmp" "$out"
}

now() { date +%s.%N; }

# Prints the best (smallest) wall time of $runs runs of a command.
best_of() {
  local best="" t0 t1 t
  for _ in $(seq 1 "$runs"); do
    t0=$(now); "$@" >/dev/null; t1=$(now)
    t=$(echo "$t1 - $t0" | bc -l)
    if [[ -z "$best" ]] || (( $(echo "$t < $best" | bc -l) )); then best=$t; fi
  done
  echo "$best"
}

declare -A fig
for spec in "vhdx:vhdx:subformat=dynamic" "vhd:vpc:subformat=dynamic,force_size=on"; do
  IFS=: read -r name fmt opts <<<"$spec"
  img="$work/bench.$name"
  make_image "$fmt" "$opts" "$img"
  # The top-level virtual-size (format-specific data may carry another one).
  vsize=$(qemu-img info -f "$fmt" --output=json "$img" | sed -n 's/^    "virtual-size": \([0-9]*\).*/\1/p')
  # Warm the page cache for both readers.
  cat "$img" >/dev/null
  ours=$(best_of "$bin" "$img")
  qemu=$(best_of qemu-img convert -n -f "$fmt" "$img" --target-image-opts "driver=null-co,size=$vsize")
  ours_mbs=$(echo "$vsize / $ours / 1000000" | bc -l)
  qemu_mbs=$(echo "$vsize / $qemu / 1000000" | bc -l)
  ratio=$(echo "$ours_mbs / $qemu_mbs" | bc -l)
  printf '%-5s ferry %8.1f MB/s (%.3f s)   qemu-img convert %8.1f MB/s (%.3f s)   ratio %.2f\n' \
    "$name" "$ours_mbs" "$ours" "$qemu_mbs" "$qemu" "$ratio"
  fig[${name}_ours_mbs]=$(printf '%.1f' "$ours_mbs")
  fig[${name}_qemu_mbs]=$(printf '%.1f' "$qemu_mbs")
  fig[${name}_ratio]=$(printf '%.3f' "$ratio")
done
min=$(echo "if (${fig[vhdx_ratio]} < ${fig[vhd_ratio]}) ${fig[vhdx_ratio]} else ${fig[vhd_ratio]}" | bc -l)
echo "vhdx_ours_mbs=${fig[vhdx_ours_mbs]} vhdx_qemu_mbs=${fig[vhdx_qemu_mbs]} vhdx_ratio=${fig[vhdx_ratio]} vhd_ours_mbs=${fig[vhd_ours_mbs]} vhd_qemu_mbs=${fig[vhd_qemu_mbs]} vhd_ratio=${fig[vhd_ratio]} ratio_vs_qemu=$(printf '%.3f' "$min")"
