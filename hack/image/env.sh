# Sourced by hack/image/*.sh: podman/buildah with a private configuration and storage under
# ${XDG_CACHE_HOME:-~/.cache}/reactor-images (outside the repo; nothing system-wide).
image_cache="${REACTOR_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/reactor-images}"
image_run="${REACTOR_IMAGE_RUN:-/run/reactor-images}"  # podman's runroot: tmpfs, as podman expects
mkdir -p "$image_cache/config" "$image_cache/bases" "$image_run"

cat >"$image_cache/config/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$image_cache/storage"
runroot = "$image_run/storage"
CONF
# The ulimits: root here lacks CAP_SYS_RESOURCE, and podman's defaults (above the hard
# limits) fail in runc with "error setting rlimit ... operation not permitted".
cat >"$image_cache/config/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "$image_run/libpod"
CONF
cat >"$image_cache/config/registries.conf" <<CONF
# No registry is reachable: short names resolve to local images only (build --pull=never).
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
CONF
export CONTAINERS_STORAGE_CONF="$image_cache/config/storage.conf"
export CONTAINERS_CONF="$image_cache/config/containers.conf"
export CONTAINERS_REGISTRIES_CONF="$image_cache/config/registries.conf"

# docker when a daemon answers (what users have), else podman (what these machines have).
image_tool() {
  if [[ -n ${REACTOR_IMAGE_TOOL:-} ]]; then echo "$REACTOR_IMAGE_TOOL"
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker
  else echo podman
  fi
}

# A Pod's `image: reactor:0.1.0` means docker.io/library/reactor:0.1.0.
qualified_name() {
  local name=$1 first=${1%%/*}
  if [[ $name != */* ]]; then echo "docker.io/library/$name"
  elif [[ $first == *.* || $first == *:* || $first == localhost ]]; then echo "$name"
  else echo "docker.io/$name"
  fi
}
