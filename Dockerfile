# syntax=docker/dockerfile:1
# The teamgpu gateway image: multi-stage, slim, non-root.
#
#   docker build -t teamgpu:local .            (deploy/compose.yaml builds it for you)
#   docker run --rm -p 8080:8080 teamgpu:local serve --backend http://vllm:8000
#
# Stage 1 builds a virtual environment with teamgpu and its dependencies (all of them ship
# manylinux wheels, so no compiler is needed); stage 2 copies only that venv onto a fresh
# slim base and runs as the unprivileged user `teamgpu` (uid 10001). No secret is ever
# passed to the build: API keys live in the data volume, created at run time
# (`docker compose exec gateway teamgpu keys create NAME`).
# Not built on this project's machines (no Docker engine there); checked statically by
# tests/deploy/test_dockerfile.py.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/teamgpu
WORKDIR /src
# dependencies first, so that code changes do not reinstall them
COPY pyproject.toml README.md ./
COPY teamgpu ./teamgpu
RUN /opt/teamgpu/bin/pip install . \
    && /opt/teamgpu/bin/teamgpu --version

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="teamgpu" \
      org.opencontainers.image.description="OpenAI-compatible gateway that shares one vLLM GPU server across a team" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 teamgpu \
    && useradd --system --uid 10001 --gid teamgpu --home-dir /var/lib/teamgpu \
       --shell /usr/sbin/nologin teamgpu \
    && install -d -o teamgpu -g teamgpu -m 0750 /var/lib/teamgpu
COPY --from=build /opt/teamgpu /opt/teamgpu
ENV PATH=/opt/teamgpu/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TEAMGPU_DATA_DIR=/var/lib/teamgpu \
    TEAMGPU_HOST=0.0.0.0 \
    TEAMGPU_PORT=8080
WORKDIR /var/lib/teamgpu
USER teamgpu:teamgpu
EXPOSE 8080
VOLUME ["/var/lib/teamgpu"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["teamgpu"]
CMD ["serve", "--backend", "http://vllm:8000"]
