#!/bin/sh
# Installs pyfuse3 with FUSE passthrough and hand-over into a venv: pyfuse3's sdist
# with contrib/pyfuse3-passthrough.patch and then contrib/pyfuse3-handover.patch,
# built against libfuse >= 3.17.
#
# Usage: contrib/build-passthrough.sh VENV
#
# libfuse: the system's when pkg-config finds >= 3.17; otherwise Debian's source
# package from trixie (apt-get source through a private sources list, lists and
# cache, so the system's apt state is untouched), built with meson and ninja
# from PyPI into VENV/libfuse. pyfuse3's extension finds it through an rpath
# relative to itself ($ORIGIN), so the wheel works in any venv of the same layout.
#
# Everything fetched or built is kept in $LAMINA_BUILD_CACHE (default
# ~/.cache/lamina-llm-cache-build/passthrough), keyed by the patch, this script, the
# libfuse version and the Python ABI: a rerun installs from there in seconds. Not
# under ~/.cache/lamina-llm-cache: that is the block cache's default directory, and
# a mount refuses a directory that holds anything but a block cache.
set -eu

VENV=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
PY="$VENV/bin/python"
PATCHES="$HERE/pyfuse3-passthrough.patch $HERE/pyfuse3-handover.patch"
PYFUSE3_VERSION=3.5.0
LIBFUSE_MIN=3.17
LIBFUSE_SUITE=trixie
PREFIX="$VENV/libfuse"
USER_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}
CACHE=${LAMINA_BUILD_CACHE:-$USER_CACHE/lamina-llm-cache-build/passthrough}

# Earlier versions kept the build cache inside the block cache's default directory,
# which `mount` then refused; move it out (and the directory goes if nothing else is in it).
move_old_build_cache() {
    old="$USER_CACHE/lamina-llm-cache/passthrough"
    [ -z "${LAMINA_BUILD_CACHE:-}" ] && [ -d "$old" ] && [ ! -e "$CACHE" ] || return 0
    mkdir -p "$(dirname "$CACHE")"
    mv "$old" "$CACHE"
    rmdir "$USER_CACHE/lamina-llm-cache" 2>/dev/null || true
}

log() { echo "build-passthrough: $*" >&2; }

sha() { cat "$@" | sha256sum | cut -c1-16; }

# Runs a build step with its output in $BUILD/log, shown only if it fails.
quiet() {
    "$@" >>"$BUILD/log" 2>&1 || { cat "$BUILD/log" >&2; log "failed: $*"; exit 1; }
}

# Debian's fuse3 source into $CACHE/src/<version>/ (download once), unpacked
# with Debian's patches applied; prints the source tree's path.
fetch_libfuse_source() {
    apt_dir="$CACHE/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$CACHE/src"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
        "http://deb.debian.org/debian $LIBFUSE_SUITE main" > "$apt_dir/sources.list"
    set -- -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" \
        -o APT::Sandbox::User=root -q
    if ! ls "$CACHE"/src/fuse3_*.dsc >/dev/null 2>&1; then
        quiet apt-get "$@" update
        (cd "$CACHE/src" && quiet apt-get "$@" source --download-only "fuse3/$LIBFUSE_SUITE")
    fi
    dsc=$(ls "$CACHE"/src/fuse3_*.dsc | sort -V | tail -1)
    tree="$BUILD/fuse3-src"
    quiet dpkg-source -x "$dsc" "$tree"
    echo "$tree"
}

# meson + ninja from PyPI in a throwaway venv; builds only the library.
build_libfuse() {
    src=$1
    quiet python3 -m venv "$BUILD/tools"
    quiet "$BUILD/tools/bin/pip" install meson ninja
    PATH="$BUILD/tools/bin:$PATH"
    quiet meson setup "$BUILD/fuse3-build" "$src" \
        --prefix="$PREFIX" --libdir=lib --buildtype=release -Ddefault_library=shared \
        -Dexamples=false -Dtests=false -Dutils=false -Duseroot=false
    quiet ninja -C "$BUILD/fuse3-build" install
}

libfuse_version_in() { sed -n "s/^ *version *: *'\([0-9.]*\)'.*/\1/p" "$1/meson.build" | head -1; }

# A venv-owned libfuse: from the cache, else fetched and built, then cached.
install_private_libfuse() {
    src=$(fetch_libfuse_source)
    version=$(libfuse_version_in "$src")
    dpkg --compare-versions "$version" ge "$LIBFUSE_MIN" ||
        { log "Debian $LIBFUSE_SUITE has libfuse $version (< $LIBFUSE_MIN)"; exit 1; }
    tarball="$CACHE/libfuse-$version-$(sha "$0").tar"
    if [ ! -f "$tarball" ]; then
        log "building libfuse $version into $PREFIX"
        rm -rf "$PREFIX"
        build_libfuse "$src"
        tar -C "$VENV" -cf "$tarball.tmp" libfuse || exit 1
        mv "$tarball.tmp" "$tarball"
    fi
    rm -rf "$PREFIX"
    tar -C "$VENV" -xf "$tarball"
    echo "$version"
}

# pyfuse3's sdist, patched, built into a wheel; prints the wheel's path.
build_pyfuse3_wheel() {
    key=$1
    out="$CACHE/wheels/$key"
    wheel=$(ls "$out"/pyfuse3-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then echo "$wheel"; return; fi
    # pyfuse3 from source, its build requirements as wheels (--no-binary :all: would build Cython too).
    quiet "$PY" -m pip download --no-deps --no-binary pyfuse3 "pyfuse3==$PYFUSE3_VERSION" -d "$BUILD"
    tar -C "$BUILD" -xzf "$BUILD/pyfuse3-$PYFUSE3_VERSION.tar.gz"
    for patch in $PATCHES; do
        patch -d "$BUILD/pyfuse3-$PYFUSE3_VERSION" -p1 --quiet < "$patch"
    done
    log "building pyfuse3 $PYFUSE3_VERSION with the passthrough and hand-over patches"
    quiet "$PY" -m pip wheel --no-deps --no-cache-dir -w "$BUILD/wheel" "$BUILD/pyfuse3-$PYFUSE3_VERSION"
    mkdir -p "$out"
    cp "$BUILD"/wheel/pyfuse3-*.whl "$out"/ || exit 1
    ls "$out"/pyfuse3-*.whl
}

main() {
    move_old_build_cache
    mkdir -p "$CACHE"
    # One build at a time per cache: make install may run in several checkouts at once.
    exec 9>"$CACHE/lock"
    flock 9
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    abi=$("$PY" -c 'import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())')
    if pkg-config --atleast-version="$LIBFUSE_MIN" fuse3 2>/dev/null; then
        libfuse="system-$(pkg-config --modversion fuse3)"
        rm -rf "$PREFIX"
    else
        libfuse="private-$(install_private_libfuse)"
        export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig"
        # site-packages/pyfuse3/__init__*.so -> VENV/libfuse/lib
        export LDFLAGS='-Wl,-rpath,$ORIGIN/../../../../libfuse/lib'
    fi
    # shellcheck disable=SC2086
    key=$(echo "$libfuse $abi $(sha $PATCHES "$0")" | sha256sum | cut -c1-16)
    wheel=$(build_pyfuse3_wheel "$key")
    quiet "$PY" -m pip install --no-deps --force-reinstall "$wheel"
    "$PY" -c 'import pyfuse3; pyfuse3.backing_open; pyfuse3.adopt' ||
        { log "the installed pyfuse3 has no passthrough or no hand-over"; exit 1; }
    log "pyfuse3 $PYFUSE3_VERSION with passthrough and hand-over, libfuse $libfuse"
}

main
