# Sourced by the deploy scripts: installs what Ferry needs on this machine when it is missing
# (Debian packages; run as root).
ensure_packages() {
  local need=()
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  { command -v qemu-img >/dev/null 2>&1 && command -v qemu-io >/dev/null 2>&1; } || need+=(qemu-utils)
  # virsh for the libvirt driver; its tests use libvirt's in-process test driver
  # (test:///default), which needs no libvirt daemon.
  command -v virsh >/dev/null 2>&1 || need+=(libvirt-clients)
  if ((${#need[@]})); then
    echo "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  fi
}
