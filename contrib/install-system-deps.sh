#!/bin/sh
# Installs the system packages a mount needs (Debian/Ubuntu): FUSE 3 and what pyfuse3 builds with.
set -eu
missing=""
command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"
pkg-config --exists fuse3 2>/dev/null || missing="$missing libfuse3-dev"
command -v pkg-config >/dev/null 2>&1 || missing="$missing pkg-config"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages:$missing (run: sudo apt-get install$missing)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq fuse3 libfuse3-dev pkg-config >/dev/null
