#!/usr/bin/env bash
# Installs the Debian packages the dev node and the image build need, if any is missing:
#   node:  containerd, runc, containernetworking-plugins (bridge, loopback, host-local),
#          iptables + conntrack (kube-proxy), iproute2 (netns, veth), util-linux (nsenter)
#   image: podman, buildah, mmdebstrap (stand-in base images), skopeo (image copies)
#   observe: prometheus, chromium (the observability tests drive both for real)
# Usage: hack/node/install-packages.sh [--optional] [node] [image] [observe]   (default: node image)
#   --optional: without root, say what is missing and succeed (`make test` as a user: the
#   tests that need the packages are then skipped and named at the end of the run).
#
# Installing never starts a service nor enables one at boot: containerd runs only when the
# dev node starts it, prometheus only when a test does. Debian's maintainer scripts start
# services through invoke-rc.d/deb-systemd-invoke (refused here by a policy-rc.d answering
# 101) and enable them at boot (deb-systemd-helper, update-rc.d): every boot-time link the
# install added is disabled again; services the machine had enabled before stay as they were.
# REACTOR_INSTALL_SYSROOT (tests only) prefixes the paths written: /etc, policy-rc.d, the lock.
set -euo pipefail

optional=false
want=()
for arg in "$@"; do
  case $arg in --optional) optional=true ;; *) want+=("$arg") ;; esac
done
[[ ${#want[@]} -gt 0 ]] || want=(node image)
packages=()
for group in "${want[@]}"; do
  case $group in
    node) packages+=(containerd runc containernetworking-plugins iptables conntrack iproute2 util-linux) ;;
    image) packages+=(podman buildah mmdebstrap skopeo uidmap fuse-overlayfs) ;;
    observe) packages+=(prometheus chromium) ;;
    *) echo "usage: $0 [--optional] [node] [image] [observe]" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  if $optional; then
    echo "hack/node/install-packages.sh: not root, so not installing ${missing[*]} (${want[*]}):" \
      "the tests that need them are skipped (named at the end of the run); \`sudo make test\` runs them" >&2
    exit 0
  fi
  echo "hack/node/install-packages.sh: need root to apt-get install ${missing[*]}" >&2
  exit 1
fi

sysroot=${REACTOR_INSTALL_SYSROOT:-}
etc="$sysroot/etc"
echo "installing ${missing[*]}" >&2
# Lock-protected: parallel `make` runs must not race on dpkg.
mkdir -p "$sysroot/var/lib/dpkg"
exec 9>"$sysroot/var/lib/dpkg/.reactor-install.lock"
flock 9
export DEBIAN_FRONTEND=noninteractive

# What starts at boot: systemd's wants/requires links and SysV start links.
boot_links() {
  { find "$etc/systemd/system" -mindepth 2 -maxdepth 2 \( -path '*.wants/*' -o -path '*.requires/*' \) 2>/dev/null
    find "$etc"/rc[2-5S].d -mindepth 1 -maxdepth 1 -name 'S*' 2>/dev/null; } | sort
}
before=$(boot_links)

# Packages' maintainer scripts must not start containerd (or anything) system-wide.
policy="$sysroot/usr/sbin/policy-rc.d"
if [[ ! -e $policy ]]; then
  mkdir -p "$(dirname "$policy")"
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2

# ... nor enable anything at boot: undo the links this install added (only those).
added=$(comm -13 <(echo "$before") <(boot_links))
units=() scripts=()
while IFS= read -r link; do
  [[ -n $link ]] || continue
  case $link in
    "$etc"/systemd/*) units+=("$(basename "$link")") ;;
    *) name=$(basename "$link"); scripts+=("${name#S[0-9][0-9]}") ;;
  esac
done <<<"$added"
if [[ ${#units[@]} -gt 0 ]]; then
  mapfile -t units < <(printf '%s\n' "${units[@]}" | sort -u)
  echo "not enabling at boot what the install enabled: ${units[*]}" >&2
  if command -v systemctl >/dev/null; then
    systemctl ${sysroot:+--root="$sysroot"} disable --quiet "${units[@]}"
  else  # no systemd here (a container): its links alone would start them on a systemd boot
    while IFS= read -r link; do [[ $link == "$etc"/systemd/* ]] && rm -f "$link"; done <<<"$added"
  fi
fi
if [[ ${#scripts[@]} -gt 0 ]]; then
  mapfile -t scripts < <(printf '%s\n' "${scripts[@]}" | sort -u)
  echo "not starting at boot (SysV) what the install added: ${scripts[*]}" >&2
  for name in "${scripts[@]}"; do
    if [[ -z $sysroot ]] && command -v update-rc.d >/dev/null; then update-rc.d "$name" disable >/dev/null
    else find "$etc"/rc[2-5S].d -mindepth 1 -maxdepth 1 -name "S[0-9][0-9]$name" -delete
    fi
  done
fi
