#!/usr/bin/env bash
# Builds Gitea from Go modules (no binary download) into a cache outside the repository and
# prints the binary's path on stdout. The tests of the pull-request path run it for real.
#
# The pinned version lives in gitea/go.mod (the only source of truth), with go.sum committed so
# every build resolves the same modules. A second run with the binary present does nothing.
# REACTOR_GITEA_BIN pointing at an executable skips the build.
#
# Environment: XDG_CACHE_HOME (cache root), GO (the go binary), FORGE_BUILD_JOBS (go build -p,
# default nproc).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { printf 'hack/forge/build.sh: %s\n' "$*" >&2; exit 1; }
log() { printf 'forge: %s\n' "$*" >&2; }

if [[ -n ${REACTOR_GITEA_BIN:-} ]]; then
  [[ -x $REACTOR_GITEA_BIN ]] || die "REACTOR_GITEA_BIN=$REACTOR_GITEA_BIN is not an executable file"
  echo "$REACTOR_GITEA_BIN"
  exit 0
fi

# The version comes from go.mod with sed, not `go list`, so the fast path needs no Go.
version=$(sed -nE 's#^(require)?[[:space:]]*code\.gitea\.io/gitea (v[^ ]+).*#\2#p' "$here/gitea/go.mod" | head -n1)
[[ -n $version ]] || die "cannot read the pinned Gitea version from $here/gitea/go.mod"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/reactor-forge"
bin="$cache/gitea-${version#v}"
# The stamp pins the module graph too: a changed go.sum rebuilds.
stamp="gitea=$version go.sum=$(sha256sum "$here/gitea/go.sum" | cut -c1-16)"

is_current() { [[ -x $bin && $(cat "$bin.reactor-build" 2>/dev/null) == "$stamp" ]]; }
if is_current; then
  echo "$bin"
  exit 0
fi

hint="Alternatively, point REACTOR_GITEA_BIN at a Gitea (or Forgejo) binary"
go=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
[[ -x $go ]] || die "Go is not installed (need Go >= 1.26.2 to build Gitea $version; tried '$go'): install it. $hint"
command -v gcc >/dev/null || die "gcc is missing: Gitea's SQLite driver needs cgo. $hint"

mkdir -p "$cache"
# Serialise concurrent builds (parallel `make test` runs); the loser finds the result.
exec 9>"$cache/.reactor-build.lock"
flock 9
if is_current; then
  echo "$bin"
  exit 0
fi

log "building Gitea $version into $bin"
log "a cold build takes ~3 min on 2 quiet cores (up to 9 under load); later runs are instant"

export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly" CGO_ENABLED=1
(cd "$here/gitea" && "$go" mod download) \
  || die "cannot download the Go modules of $here/gitea: is the Go module proxy (GOPROXY=$("$go" env GOPROXY)) reachable? $hint"

# Gitea's own Makefile stamps these (the module zip has no git metadata to read them from).
ldflags="-s -w -X main.Version=${version#v} -X 'main.Tags=sqlite sqlite_unlock_notify'"
jobs=${FORGE_BUILD_JOBS:-$(nproc)}
tmp=$(mktemp "$cache/.build.XXXXXX")
trap 'rm -f "$tmp"' EXIT
# sqlite: the test forge keeps its database in one file; sqlite_unlock_notify: Gitea's
# recommended tag for SQLite under concurrent requests.
(cd "$here/gitea" && "$go" build -p "$jobs" -trimpath -tags "sqlite sqlite_unlock_notify" \
  -ldflags "$ldflags" -o "$tmp" code.gitea.io/gitea)

"$tmp" --version | grep -q "version ${version#v}" \
  || die "built gitea reports '$("$tmp" --version)', expected ${version#v}"
chmod 0755 "$tmp"
mv "$tmp" "$bin"
trap - EXIT
echo "$stamp" >"$bin.reactor-build"
log "done"
echo "$bin"
