#!/bin/sh
# Build the CPU image of deploy/Dockerfile without a Docker daemon or a registry:
#   deploy/build-cpu-image.sh <image name> [more `buildah build` arguments, e.g. --build-arg MODEL_SRC=<dir>]
# buildah builds with vfs storage and chroot isolation (no overlay mounts, no namespaces needed). The base image is
# Debian bookworm made with debootstrap from the Debian mirror and committed locally as $BASE_IMAGE, once.
# pip inside the build: behind a TLS-intercepting proxy it needs this host's CA bundle, and it can take torch from
# a local wheel directory. Both are mounted into the build only (never into the image), taken from PIP_CERT and
# PIP_FIND_LINKS, or else from pip's configuration on this host (`pip config get global.cert`, ...).
set -eu
[ $# -ge 1 ] || { echo "usage: $0 <image name> [buildah build arguments]" >&2; exit 2; }
image=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
base=${BASE_IMAGE:-localhost/debian-bookworm-python:12}
buildah="buildah --storage-driver vfs"

if ! $buildah inspect --type image "$base" >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
    container=$($buildah from scratch)
    $buildah copy --quiet "$container" "$rootfs" /
    $buildah commit --quiet "$container" "$base" >/dev/null
    $buildah rm "$container" >/dev/null
    rm -rf "$rootfs"
fi

pip_setting() {  # the environment variable, else pip's own configuration, else nothing
    eval "value=\${$1:-}"
    [ -n "$value" ] || value=$(python3 -m pip config get "global.$2" 2>/dev/null || true)
    echo "$value"
}
# Mounted over /mnt and /media, directories every Debian and Ubuntu base has, empty: a mount at a path that does
# not exist leaves an empty file or directory behind in the image, where it was created as the mount point.
cert=$(pip_setting PIP_CERT cert)
wheels=$(pip_setting PIP_FIND_LINKS find-links)
if [ -n "$cert" ]; then
    cert_dir=$(mktemp -d)
    trap 'rm -rf "$cert_dir"' EXIT
    cp "$cert" "$cert_dir/ca.crt"
    set -- -v "$cert_dir:/mnt:ro" --build-arg PIP_CERT=/mnt/ca.crt "$@"
fi
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
    set -- -v "$wheels:/media:ro" --build-arg PIP_FIND_LINKS=/media "$@"
fi

# torch: the version the README pins, from PyTorch's CPU index (or the local wheel directory).
# --format docker keeps the HEALTHCHECK (OCI image configs have none); the ignore file is the one BuildKit reads.
exec $buildah build --isolation chroot --format docker --file "$root/deploy/Dockerfile" --tag "$image" \
    --ignorefile "$root/deploy/Dockerfile.dockerignore" \
    --build-arg BASE_IMAGE="$base" \
    --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
    --build-arg TORCH_REQUIREMENT="${TORCH_REQUIREMENT:-torch==2.13.0}" \
    "$@" "$root"
