# First image of comfy-machine (the shipping issue hardens it: CUDA base, non-root, hooks).
# The agent and supervisord live here; ComfyUI is cloned into the /workspace volume at boot.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY machine ./machine
COPY config ./config
COPY services ./services
COPY health ./health
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# git: ComfyUI and custom nodes are git checkouts; tini: PID 1 that forwards signals and
# reaps zombies, so `comfy-machine up` (PID 2) gets SIGTERM and stops every instance.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY entrypoint.sh /usr/local/bin/entrypoint.sh
ENV MACHINE_WORKSPACE=/workspace \
    MACHINE_HEALTH_PORT=9188 \
    COMFYUI_PORT_START=8188 \
    PYTHONUNBUFFERED=1
VOLUME ["/workspace"]
EXPOSE 9188 8188-8195
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9188/livez', timeout=2)"
ENTRYPOINT ["tini", "--", "/usr/local/bin/entrypoint.sh"]
CMD ["up"]
