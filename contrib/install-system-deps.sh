#!/bin/sh
# Installs the Debian/Ubuntu packages a mount needs (FUSE 3 and what pyfuse3 and libfuse
# build with), plus any tools named as arguments: COMMAND, or COMMAND=PACKAGE when the
# package is named otherwise.
set -eu
missing=""
command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"
pkg-config --exists fuse3 2>/dev/null || missing="$missing libfuse3-dev"
command -v pkg-config >/dev/null 2>&1 || missing="$missing pkg-config"
# the README's getfattr examples (how much of a file is cached)
command -v getfattr >/dev/null 2>&1 || missing="$missing attr"
# what contrib/build-passthrough.sh builds pyfuse3 and libfuse with
command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
command -v patch >/dev/null 2>&1 || missing="$missing patch"
command -v dpkg-source >/dev/null 2>&1 || missing="$missing dpkg-dev"
for tool in "$@"; do
    command -v "${tool%%=*}" >/dev/null 2>&1 || missing="$missing ${tool#*=}"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages:$missing (run: sudo apt-get install$missing)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq $missing >/dev/null
