#!/usr/bin/env bash
# `make image`: builds the operator image from the repository's Dockerfile (unchanged).
#   docker, when a daemon answers: `docker build` as users run it;
#   else podman (Debian's 4.3, installed if missing) against local stand-in bases
#   (hack/image/bases.sh), with private storage in ~/.cache/reactor-images.
# Then saves it as a docker-archive for loading into a node (`make node-load`):
#   ~/.cache/reactor-images/archives/<name>-<tag>-<checkout>.tar; the path is printed on stdout.
# An unchanged image (every layer from the cache: same image id as the archive's) is not
# saved again: the archive stays, and so does what a node loaded from it.
# The layer cache is shared by every checkout on this machine, but each checkout builds
# and saves under a tag of its own (localhost/reactor-build-<checkout>/...): two checkouts
# building at once never ship each other's code. The loader adds the name Pods use.
# Usage: hack/image/build.sh IMAGE OPENCODE_VERSION
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
image=${1:?usage: $0 IMAGE OPENCODE_VERSION} opencode_version=${2:?usage: $0 IMAGE OPENCODE_VERSION}
source "$here/env.sh"
qualified=$(qualified_name "$image")
checkout=$(printf '%s' "$root" | sha256sum | cut -c1-8)
own_tag="localhost/reactor-build-$checkout/$(basename "$image")"
mkdir -p "$image_cache/archives"
archive="$image_cache/archives/$(basename "${image//:/-}")-$checkout.tar"
tool=$(image_tool)
started=$(date +%s%N)
rm -f "$archive.partial"  # a save interrupted before (podman refuses to write into one)

# The archive is current when it was saved from the image id just built.
current() { [[ -f $archive && -f $archive.id && $(cat "$archive.id") == "$1" ]]; }

if [[ $tool == docker ]]; then
  docker build --build-arg "OPENCODE_VERSION=$opencode_version" -t "$image" "$root" >&2
  id=$(docker image inspect --format '{{.Id}}' "$image")
  current "$id" || docker save -o "$archive.partial" "$image"
else
  "$here/../node/install-packages.sh" image
  "$here/bases.sh"
  # --pull=never: the stand-ins, never a registry. --format docker keeps the Dockerfile's
  # SHELL (OCI images have no SHELL). --network host: RUN steps reach the package
  # registries (and podman adds no iptables rules, no ip_forward). runc: Debian's crun
  # does not support this host's hybrid cgroups.
  # TARGETARCH: BuildKit sets it, podman 4.3 does not.
  case $(uname -m) in x86_64) targetarch=amd64 ;; aarch64 | arm64) targetarch=arm64 ;; *) targetarch=$(uname -m) ;; esac
  podman --runtime runc build --pull=never --format docker --network host \
    --build-arg "OPENCODE_VERSION=$opencode_version" --build-arg "TARGETARCH=$targetarch" -t "$own_tag" "$root" >&2
  id=$(podman image inspect --format '{{.Id}}' "$own_tag")
  current "$id" || podman save --quiet --format docker-archive -o "$archive.partial" "$own_tag"
  podman tag "$own_tag" "$qualified"  # for `podman run $image` here; the last build wins it
  qualified=$own_tag
fi
if current "$id"; then
  saved="unchanged, archive kept"
else
  mv "$archive.partial" "$archive" && echo "$id" >"$archive.id"
  saved="saved"
fi
size=$("$tool" image inspect --format '{{.Size}}' "$qualified" 2>/dev/null || "$tool" image inspect --format '{{.Size}}' "$image")
elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
printf 'image: %s built with %s in %d.%03ds, %d MB (%s: %s)\n' "$qualified" "$tool" \
  $((elapsed_ms / 1000)) $((elapsed_ms % 1000)) "$((size / 1000000))" "$saved" "$archive" >&2
echo "$archive"
