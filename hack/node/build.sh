#!/usr/bin/env bash
# Builds the dev node's binaries from Go modules (no binary downloads) and prints their
# directory on stdout:
#   kubelet, kube-controller-manager, kube-scheduler, kube-proxy  from the Kubernetes module
#       pinned in ../envtest/kubernetes/go.mod (the same module, go.sum and Go build cache
#       as the control plane of ../envtest/build.sh, so the versions always match)
#   pause  the pod sandbox process (./pause), a static binary
# into ${XDG_DATA_HOME:-~/.local/share}/reactor/node/<version>-<os>-<arch>, outside the repo.
# A second run with the binaries present does nothing. REACTOR_NODE_ASSETS pointing at a
# directory holding all five skips the build.
#
# Environment: XDG_DATA_HOME, GO (the go binary), ENVTEST_BUILD_JOBS (go build -p).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
module="$here/../envtest/kubernetes"
binaries=(kubelet kube-controller-manager kube-scheduler kube-proxy pause)

die() { printf 'hack/node/build.sh: %s\n' "$*" >&2; exit 1; }
log() { printf 'node: %s\n' "$*" >&2; }
have_all() { local b; for b in "${binaries[@]}"; do [[ -x $1/$b ]] || return 1; done; }

if [[ -n ${REACTOR_NODE_ASSETS:-} ]]; then
  have_all "$REACTOR_NODE_ASSETS" || die "REACTOR_NODE_ASSETS=$REACTOR_NODE_ASSETS lacks one of ${binaries[*]}"
  echo "$REACTOR_NODE_ASSETS"
  exit 0
fi

k8s_version=$(sed -nE 's#^(require)?[[:space:]]*k8s.io/kubernetes (v[^ ]+).*#\2#p' "$module/go.mod" | head -n1)
[[ -n $k8s_version ]] || die "cannot read the pinned Kubernetes version from $module/go.mod"
case $(uname -m) in
  x86_64) arch=amd64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac
os=$(uname -s | tr '[:upper:]' '[:lower:]')
store="${XDG_DATA_HOME:-$HOME/.local/share}/reactor/node"
assets="$store/${k8s_version#v}-$os-$arch"
# The pause source is ours: a change to it must rebuild too.
stamp="kubernetes=$k8s_version pause=$(cat "$here/pause/main.go" "$here/pause/go.mod" | sha256sum | cut -c1-16)"

is_current() { have_all "$assets" && [[ $(cat "$assets/.reactor-build" 2>/dev/null) == "$stamp" ]]; }
if is_current; then
  echo "$assets"
  exit 0
fi

go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $go ]] || die "Go is not installed (need Go >= 1.26 to build Kubernetes $k8s_version; tried '$go')"
mkdir -p "$store"
exec 9>"$store/.reactor-build.lock"
flock 9
if is_current; then
  echo "$assets"
  exit 0
fi

log "building kubelet, kube-controller-manager, kube-scheduler, kube-proxy $k8s_version and pause into $assets"
log "~1.5 min on top of a built control plane (shared Go cache), ~5 min cold, on 2 cores"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly" CGO_ENABLED=0
(cd "$module" && "$go" mod download) || die "cannot download the Go modules of $module (is the Go module proxy reachable?)"

# The same version stamping as ../envtest/build.sh, so every component reports one version.
release_time=$(cd "$module" && "$go" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
minor=${k8s_version#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean -X $pkg.buildDate=$release_time"
done

jobs=${ENVTEST_BUILD_JOBS:-$(nproc)}
tmp=$(mktemp -d "$store/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$module" && "$go" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy)
(cd "$here/pause" && "$go" build -trimpath -ldflags "-s -w" -o "$tmp/pause" .)

"$tmp/kubelet" --version | grep -qx "Kubernetes $k8s_version" \
  || die "built kubelet reports '$("$tmp/kubelet" --version)', expected $k8s_version"
echo "$stamp" >"$tmp/.reactor-build"
chmod 0755 "$tmp"
rm -rf "$assets"
mv "$tmp" "$assets"
trap - EXIT
log "done"
echo "$assets"
