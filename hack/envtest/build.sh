#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kubectl from Go modules (no binary downloads) into
# setup-envtest's store layout and prints the assets directory on stdout.
#
# The pinned versions live in kubernetes/go.mod and etcd/go.mod (the only source of
# truth). A second run with the binaries present does nothing. Skips the build when
# USE_EXISTING_CLUSTER=true, KUBEBUILDER_ASSETS or all TEST_ASSET_* point at binaries.
#
# Environment: XDG_DATA_HOME (store root), GO (the go binary), ENVTEST_BUILD_JOBS (go build -p,
# default nproc).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { printf 'hack/envtest/build.sh: %s\n' "$*" >&2; exit 1; }
log() { printf 'envtest: %s\n' "$*" >&2; }
have_all() { local d=$1; [[ -x $d/etcd && -x $d/kube-apiserver && -x $d/kubectl ]]; }

# Versions come from go.mod with sed, not `go list`, so the fast path needs no Go.
mod_version() { sed -nE "s#^(require)?[[:space:]]*$2 (v[^ ]+).*#\2#p" "$here/$1/go.mod" | head -n1; }
k8s_version=$(mod_version kubernetes k8s.io/kubernetes)
etcd_version=$(mod_version etcd go.etcd.io/etcd/server/v3)
[[ -n $k8s_version && -n $etcd_version ]] || die "cannot read the pinned versions from $here/*/go.mod"

if [[ ${USE_EXISTING_CLUSTER:-} == true ]]; then
  log "USE_EXISTING_CLUSTER=true: using the current kubeconfig, nothing to build"
  exit 0
fi
if [[ -n ${TEST_ASSET_ETCD:-} && -n ${TEST_ASSET_KUBE_APISERVER:-} && -n ${TEST_ASSET_KUBECTL:-} ]]; then
  for b in "$TEST_ASSET_ETCD" "$TEST_ASSET_KUBE_APISERVER" "$TEST_ASSET_KUBECTL"; do
    [[ -x $b ]] || die "TEST_ASSET_* is set but $b is not an executable file"
  done
  log "using TEST_ASSET_ETCD/TEST_ASSET_KUBE_APISERVER/TEST_ASSET_KUBECTL, nothing to build"
  exit 0
fi
if [[ -n ${KUBEBUILDER_ASSETS:-} ]]; then
  have_all "$KUBEBUILDER_ASSETS" \
    || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks etcd, kube-apiserver or kubectl (unset it to build them)"
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

case $(uname -m) in
  x86_64) arch=amd64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac
os=$(uname -s | tr '[:upper:]' '[:lower:]')
store="${XDG_DATA_HOME:-$HOME/.local/share}/kubebuilder-envtest/k8s"
assets="$store/${k8s_version#v}-$os-$arch"
# The directory name carries only the Kubernetes version; the stamp also pins etcd.
stamp="kubernetes=$k8s_version etcd=$etcd_version"

is_current() { have_all "$assets" && [[ $(cat "$assets/.reactor-build" 2>/dev/null) == "$stamp" ]]; }
if is_current; then
  echo "$assets"
  exit 0
fi

# --- slow path: build ------------------------------------------------------------
hint="Alternatively, point KUBEBUILDER_ASSETS at a directory holding etcd, kube-apiserver and kubectl"
# GO overrides which go to use; /usr/local/go is where the official tarball installs.
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $go ]] || die "Go is not installed (need Go >= 1.26 to build $k8s_version; tried '$go'): install it. $hint"

mkdir -p "$store"
# Serialise concurrent builds (parallel `make test` runs); the loser finds the result.
exec 9>"$store/.reactor-build.lock"
flock 9
if is_current; then
  echo "$assets"
  exit 0
fi

log "building etcd $etcd_version, kube-apiserver and kubectl $k8s_version into $assets"
log "a cold build takes ~5 min and ~3 GiB of memory on 2 cores; later runs are instant"

# Reading go.mod must not change it, and the module proxy must answer.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly" CGO_ENABLED=0
for m in kubernetes etcd; do
  (cd "$here/$m" && "$go" mod download) \
    || die "cannot download the Go modules of $here/$m: is the Go module proxy (GOPROXY=$("$go" env GOPROXY)) reachable? $hint"
done

# Stamp the real version so /version and `kubectl version` do not say v0.0.0-master.
# The module zip has no git metadata: the build date is the release's proxy timestamp
# (reproducible) and the commit stays empty.
release_time=$(cd "$here/kubernetes" && "$go" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
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
(cd "$here/kubernetes" && "$go" build -p "$jobs" -trimpath -ldflags "$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
(cd "$here/etcd" && "$go" build -p "$jobs" -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)

"$tmp/kube-apiserver" --version | grep -qx "Kubernetes $k8s_version" \
  || die "built kube-apiserver reports '$("$tmp/kube-apiserver" --version)', expected $k8s_version"
echo "$stamp" >"$tmp/.reactor-build"
chmod 0755 "$tmp"
# Swap the finished directory in whole, so a failed build never leaves a partial one.
rm -rf "$assets"
mv "$tmp" "$assets"
trap - EXIT
log "done"
echo "$assets"
