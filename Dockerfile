# The lamina-llm-cache daemon as a container image. Its entrypoint mounts the manifest at
# /host/models, inside a bind mount of a host directory with shared propagation, so the host
# and other containers see the models and a restarted daemon heals them (docs/DEPLOY.md).
#
#   docker build -t lamina-llm-cache .
#   docker build --build-arg BASE_IMAGE=my-bookworm-base -t lamina-llm-cache .
#
# BASE_IMAGE may be any Debian bookworm image with python3 and python3-venv: the build makes
# its own venvs and installs its own Debian packages; it needs no pip in the base.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
# A C compiler builds libfuse 3.17 and pyfuse3 (contrib/build-passthrough.sh); dpkg-dev and
# patch unpack and patch their sources. All of it stays in this stage. Python.h comes with
# the official python images; Debian's python3 needs python3-dev.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        gcc=4:12.2.0-3 libc6-dev=2.36-9+deb12u14 pkg-config=1.8.1-1 dpkg-dev=1.21.23 patch=2.7.6-7+deb12u1 \
 && if ! python3 -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")'; then \
        apt-get install -y --no-install-recommends python3-dev=3.11.2-1+b1; fi \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# Two venvs: one to build the wheel with, and the image's own, whose pip is removed below.
RUN python3 -m venv /opt/build-venv \
 && python3 -m venv /opt/lamina-llm-cache
# pip settings for an offline or mirrored build (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX)
# are build arguments of this stage only: nothing of them reaches the final image.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
COPY contrib/docker/requirements.txt contrib/docker/build-requirements.txt /tmp/
# The pinned dependencies but pyfuse3, which comes next.
RUN /opt/build-venv/bin/pip install --no-cache-dir -c /tmp/build-requirements.txt setuptools \
 && grep -iv '^pyfuse3==' /tmp/requirements.txt > /tmp/without-pyfuse3.txt \
 && /opt/build-venv/bin/pip --python /opt/lamina-llm-cache/bin/python install --no-cache-dir --no-deps \
        -r /tmp/without-pyfuse3.txt
# pyfuse3 with FUSE passthrough and the hand-over (the keeper's restarts, `upgrade`), on
# libfuse 3.17 built from Debian trixie's source into the venv, as `make install` builds
# it: contrib/build-passthrough.sh. Every Python package it fetches (meson, ninja,
# pyfuse3's build requirements) is held to build-requirements.txt by PIP_CONSTRAINT. Then
# requirements.txt once more: its pyfuse3 pin must be the version just built (else pip
# would replace it, and the check below fails the build).
COPY contrib/build-passthrough.sh contrib/pyfuse3-passthrough.patch contrib/pyfuse3-handover.patch /src/contrib/
RUN PIP_CONSTRAINT=/tmp/build-requirements.txt /src/contrib/build-passthrough.sh /opt/lamina-llm-cache \
 && /opt/build-venv/bin/pip --python /opt/lamina-llm-cache/bin/python install --no-cache-dir --no-deps \
        -r /tmp/requirements.txt
COPY pyproject.toml README.md LICENSE /src/
COPY vfs /src/vfs
# `pip check` fails the build if pyproject.toml needs a package requirements.txt does not pin.
RUN /opt/build-venv/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation -w /tmp/dist /src \
 && /opt/build-venv/bin/pip --python /opt/lamina-llm-cache/bin/python install --no-cache-dir --no-deps \
        /tmp/dist/lamina_llm_cache-*.whl \
 && /opt/build-venv/bin/pip --python /opt/lamina-llm-cache/bin/python check \
 && /opt/lamina-llm-cache/bin/python -c 'import pyfuse3; pyfuse3.backing_open; pyfuse3.adopt' \
 && /opt/lamina-llm-cache/bin/python -m pip uninstall --yes --quiet pip setuptools

FROM ${BASE_IMAGE}
# fusermount3 (unmounting, clearing a dead mount) and CAs for the Hub's TLS. pyfuse3 loads
# the venv's own libfuse 3.17 (an rpath to /opt/lamina-llm-cache/libfuse/lib), not Debian's.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        fuse3=3.14.0-4 ca-certificates=20250419~deb12u2 \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/lamina-llm-cache /opt/lamina-llm-cache
COPY contrib/docker/entrypoint.sh /usr/local/bin/lamina-llm-cache-entrypoint
COPY contrib/docker/fdholder.py /usr/local/bin/lamina-llm-cache-fdholder
ENV PATH=/opt/lamina-llm-cache/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    LAMINA_MOUNTPOINT=/host/models \
    LAMINA_MANIFEST=/etc/lamina-llm-cache/models.yaml \
    LAMINA_CACHE_DIR=/var/cache/lamina-llm-cache \
    LAMINA_API=0.0.0.0:8765
# Liveness as the API tells it: 200 only while the loop answers and the mount serves.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['LAMINA_API'].rpartition(':')[2], timeout=4)"]
ENTRYPOINT ["lamina-llm-cache-entrypoint"]
