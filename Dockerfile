# syntax=docker/dockerfile:1.7
# comfy-machine: boots one ComfyUI instance per GPU under supervisord, with a health API.
#
#   docker build -t comfy-machine .                     the full image (default target):
#                                                       the agent + a ComfyUI Python env
#                                                       (CUDA torch + ComfyUI's requirements)
#   docker build --target agent -t comfy-machine:agent .   the agent only: the installer makes
#                                                       ComfyUI's env in /workspace/venv at boot
#
#   docker run --gpus all -p 9188:9188 -p 8188-8195:8188-8195 -v comfy-ws:/workspace comfy-machine
#
# PID 1 is tini: it forwards SIGTERM to the agent (which stops every instance and exits 0) and
# reaps the orphans a ComfyUI custom node or a pre-start hook leaves behind, which the agent
# does not. The container starts as root only so that entrypoint.sh can give /workspace (a new
# volume, a hostPath, a rented GPU's disk: all root's) to the `comfy` user (UID 1000) and drop
# to it; the NVIDIA runtime's device nodes work for any user. See deploy/README.md.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5
# The ComfyUI release of the full image: its environment is made from that release's
# requirements, and it is the image's default COMFYUI_REF. For another release pass
# --build-arg COMFYUI_REF=<tag> and --build-arg RESOLVE_AS_OF=<that release's date> together.
ARG COMFYUI_REF=v0.3.64

FROM ${UV_IMAGE} AS uv

# Python 3.11 (Ubuntu 24.04 ships 3.12): a python-build-standalone CPython installed by uv,
# self-contained (needs only glibc), its patch release fixed by the uv version.
FROM ${CUDA_IMAGE} AS python
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1
RUN uv python install 3.11

# The comfy-machine wheel, installed into its own virtualenv (/opt/venv).
FROM python AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY machine ./machine
COPY config ./config
COPY services ./services
COPY health ./health
RUN uv build --wheel --python 3.11 --out-dir /wheels . \
    && uv venv --python 3.11 /opt/venv \
    && uv pip install --python /opt/venv/bin/python /wheels/*.whl

# ComfyUI's Python environment (/opt/comfyui-venv), apart from the agent's so that no custom
# node's requirement can break the agent: the torch family pinned, then ComfyUI's requirements
# at COMFYUI_REF resolved as of a date, so that a rebuild gets the same versions.
FROM python AS comfyui-env
ARG COMFYUI_REF
ARG TORCH_PACKAGES="torch==2.8.0 torchvision==0.23.0 torchaudio==2.8.0"
ARG RESOLVE_AS_OF=2025-10-14T00:00:00Z
ADD https://raw.githubusercontent.com/Comfy-Org/ComfyUI/${COMFYUI_REF}/requirements.txt /tmp/comfyui-requirements.txt
# TORCH_PACKAGES is a list of requirements: unquoted on purpose. `requests`: ComfyUI imports it
# without listing it (it used to come with transformers).
RUN uv venv --seed --python 3.11 /opt/comfyui-venv \
    && UV_EXCLUDE_NEWER=${RESOLVE_AS_OF} uv pip install --python /opt/comfyui-venv/bin/python \
        -r /tmp/comfyui-requirements.txt requests ${TORCH_PACKAGES}

# The agent image: CUDA runtime base, Python 3.11, comfy-machine, tini, Caddy, the comfy user.
FROM ${CUDA_IMAGE} AS agent
# Versions come with the base image's Ubuntu release; pinning them would break every rebuild
# after a security update. caddy: the authenticating proxy of COMFYUI_EXPOSE=proxy (run by the
# agent under supervisord, never as a system service).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates caddy git tini \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 24.04 images come with a user `ubuntu` holding UID 1000: comfy takes that UID, the
# one most volumes and hosts expect of a first user.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid 1000 comfy \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash comfy \
    && mkdir -p /workspace \
    && chown comfy:comfy /workspace
COPY --from=python /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 entrypoint.sh /usr/local/bin/entrypoint.sh
# XDG_CACHE_HOME: pip, uv, Hugging Face and torch hub caches live on the volume, so a restart
# downloads nothing twice. UV_LINK_MODE: that cache and the environments are on two filesystems.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    MACHINE_USER=comfy \
    MACHINE_WORKSPACE=/workspace \
    MACHINE_HEALTH_PORT=9188 \
    COMFYUI_PORT_START=8188 \
    COMFYUI_LISTEN=0.0.0.0 \
    XDG_CACHE_HOME=/workspace/.cache \
    UV_LINK_MODE=copy
WORKDIR /workspace
VOLUME ["/workspace"]
# The health API, and instance ports for up to 8 GPUs (instance i: COMFYUI_PORT_START + i).
EXPOSE 9188 8188-8195
# /livez: the agent answers and supervisord runs (instances do not count: they have /readyz).
# The start period covers pre-start hooks, which run before the agent listens.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('MACHINE_HEALTH_PORT', '9188'), timeout=4)"]
ENTRYPOINT ["tini", "--", "/usr/local/bin/entrypoint.sh"]
CMD ["up"]

# The full image (default): the agent plus ComfyUI's environment, owned by comfy so that the
# installer can add custom nodes' requirements to it (the torch family stays pinned).
# libgl1, libglib2.0-0t64: what opencv, used by many custom nodes, loads.
FROM agent AS full
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0t64 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=comfyui-env --chown=1000:1000 /opt/comfyui-venv /opt/comfyui-venv
ARG COMFYUI_REF
ENV COMFYUI_PYTHON=/opt/comfyui-venv/bin/python \
    COMFYUI_REF=${COMFYUI_REF}
