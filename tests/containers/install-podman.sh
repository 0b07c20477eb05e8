#!/usr/bin/env bash
# Installs what the container test needs from Debian's packages, if missing: podman 4.3 with runc
# (crun fails on this kind of machine), catatonit (compose `init: true`), netavark + aardvark-dns
# (networks with name resolution), iptables, debootstrap (the stand-in base image). Needs root.
# Exits non-zero when podman cannot be installed: the container test must then fail, not skip.
set -euo pipefail
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v iptables >/dev/null || need+=(iptables)
[ -x /usr/libexec/podman/catatonit ] || need+=(catatonit)
[ -x /usr/lib/podman/netavark ] || need+=(netavark)
[ -x /usr/lib/podman/aardvark-dns ] || need+=(aardvark-dns)
if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "error: ${need[*]} missing and not root: install them (apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing ${need[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
podman --version
