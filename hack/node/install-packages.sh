#!/usr/bin/env bash
# Installs the Debian packages the dev node and the image build need, if any is missing:
#   node:  containerd, runc, containernetworking-plugins (bridge, loopback, host-local),
#          iptables + conntrack (kube-proxy), iproute2 (netns, veth), util-linux (nsenter)
#   image: podman, buildah, mmdebstrap (stand-in base images), skopeo (image copies)
#   observe: prometheus, chromium (the observability tests drive both for real)
# Usage: hack/node/install-packages.sh [node] [image] [observe]   (default: node image)
# Installing never starts a service: containerd runs only when the dev node starts it.
set -euo pipefail

want=("$@")
[[ ${#want[@]} -gt 0 ]] || want=(node image)
packages=()
for group in "${want[@]}"; do
  case $group in
    node) packages+=(containerd runc containernetworking-plugins iptables conntrack iproute2 util-linux) ;;
    image) packages+=(podman buildah mmdebstrap skopeo uidmap fuse-overlayfs) ;;
    observe) packages+=(prometheus chromium) ;;
    *) echo "usage: $0 [node] [image] [observe]" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "hack/node/install-packages.sh: need root to apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]}" >&2
# Lock-protected: parallel `make` runs must not race on dpkg.
exec 9>/var/lib/dpkg/.reactor-install.lock
flock 9
export DEBIAN_FRONTEND=noninteractive
# Packages' maintainer scripts must not start containerd (or anything) system-wide.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
