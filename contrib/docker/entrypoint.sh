#!/bin/sh
# The image's entrypoint: mount the manifest at $LAMINA_MOUNTPOINT (default /host/models) and
# serve in the foreground; extra arguments are passed to `lamina-llm-cache mount`.
#
# The mount goes to a directory *inside* a bind mount with shared propagation (run with
# `-v /var/lib/lamina-llm-cache:/host:rshared`): the host and other containers then see it,
# and when this container is replaced, the new daemon's unmount of the dead mount and its new
# mount both reach them (docs/DEPLOY.md, "the layout that heals"). Each check below fails
# early, naming what the `docker run` line lacks. With LAMINA_FD_HOLDER (a directory where
# lamina-llm-cache-fdholder listens), the FUSE connection is also kept outside the container.
set -eu

mountpoint=${LAMINA_MOUNTPOINT:-/host/models}
manifest=${LAMINA_MANIFEST:-/etc/lamina-llm-cache/models.yaml}
cache_dir=${LAMINA_CACHE_DIR:-/var/cache/lamina-llm-cache}
api=${LAMINA_API:-}
holder=${LAMINA_FD_HOLDER:-}

fail() {
    echo "lamina-llm-cache-entrypoint: $*" >&2
    exit 2
}

[ -c /dev/fuse ] || fail "no /dev/fuse: run with --device /dev/fuse --cap-add SYS_ADMIN"
[ -f "$manifest" ] || fail "no manifest at $manifest: bind one there (-v ./models.yaml:$manifest:ro)"

# A mountpoint that is itself a mount point (a volume's target, or the dead mount a killed
# daemon left) is for `mount` to judge: it clears a dead mount and refuses a volume target.
is_mount_point() {
    awk -v target="$1" '$5 == target { found = 1 } END { exit !found }' /proc/self/mountinfo
}

parent=$(dirname "$mountpoint")
mkdir -p "$parent"
if ! is_mount_point "$mountpoint"; then
    propagation=$(findmnt --noheadings --output PROPAGATION --target "$parent")
    case $propagation in
        shared*) ;;
        *) fail "$parent is not on a shared mount (propagation: $propagation), so the host would" \
                "never see the models: bind a host directory there with shared propagation" \
                "(-v /var/lib/lamina-llm-cache:$parent:rshared)" ;;
    esac
fi

# No daemon of ours runs in a container that is starting: a pid file in the run directory
# (a restarted container's, or one kept across containers for a holder) names a dead one,
# possibly by this very pid (1), and `mount` would take it for a live daemon to take over.
rm -f /run/lamina-llm-cache/*.pid

set -- "$mountpoint" -m "$manifest" --cache-dir "$cache_dir" --allow-other ${api:+--api "$api"} "$@"
if [ -n "$holder" ]; then
    # The connection kept outside this container (lamina-llm-cache-fdholder, docs/DEPLOY.md,
    # "A restart of the whole container"): fetched, and adopted as systemd's store would hand it.
    exec lamina-llm-cache-fdholder exec "$holder" -- lamina-llm-cache mount "$@"
fi
exec lamina-llm-cache mount "$@"
