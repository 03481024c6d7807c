#!/usr/bin/env bash
# Local stand-ins for the Dockerfile's base images, built from Debian packages with
# mmdebstrap and stored in podman's storage under the names the Dockerfile uses:
#   docker.io/library/python:3.11-slim-bookworm  Debian's python3.11 (+venv), /usr/local/bin/python*
#   docker.io/library/node:22-bookworm-slim      Debian's nodejs + npm (node 18: enough to npm install)
# No container registry is reachable from these machines, so no base image can be pulled;
# with docker (where the real bases can be pulled) this script is not used. Each rootfs
# tarball is cached in ~/.cache/reactor-images/bases; a second run does nothing.
# The host's CA bundle goes into the bases: the build's RUN steps reach the package
# registries (npm, PyPI, Debian) through this network's TLS proxy.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/env.sh"

suite=bookworm
mirrors=("deb http://deb.debian.org/debian $suite main"
         "deb http://deb.debian.org/debian $suite-updates main"
         "deb http://deb.debian.org/debian-security $suite-security main")
# The base definitions are part of the cache key: change one and it is rebuilt.
recipe_hash=$(sha256sum "$0" | cut -c1-12)

build_base() {  # name packages [customize-hook...]
  local name=$1 packages=$2
  shift 2
  local tarball="$image_cache/bases/${name//[:\/]/_}-$recipe_hash.tar"
  if ! podman image exists "$name" || [[ ! -f $tarball ]] \
      || [[ $(podman image inspect --format '{{index .Labels "dev.reactor.base-recipe"}}' "$name" 2>/dev/null) != "$recipe_hash" ]]; then
    if [[ ! -f $tarball ]]; then
      echo "image: building stand-in $name with mmdebstrap ($packages)" >&2
      local hooks=(--customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs')
      for hook in "$@"; do hooks+=(--customize-hook="$hook"); done
      mmdebstrap --quiet --format=tar --variant=minbase --include="$packages" "${hooks[@]}" \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$suite" "$tarball.partial" "${mirrors[@]}"
      mv "$tarball.partial" "$tarball"
    fi
    podman import --quiet --change "LABEL dev.reactor.base-recipe=$recipe_hash" \
      --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$name" >/dev/null
  fi
}

build_base docker.io/library/python:3.11-slim-bookworm python3.11,python3.11-venv,ca-certificates,netbase \
  'for p in python python3 python3.11; do ln -sf /usr/bin/python3.11 "$1/usr/local/bin/$p"; done'
build_base docker.io/library/node:22-bookworm-slim nodejs,npm,ca-certificates
