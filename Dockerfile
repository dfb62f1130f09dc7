# syntax=docker/dockerfile:1
# The lume-operator image: the package the tests run, on a slim CPython 3.11, installed from
# requirements/operator.txt (every dependency pinned), run as a non-root user with a numeric uid
# (so the kubelet can verify runAsNonRoot) that writes nothing outside /tmp.
#
#   docker build -t lume-operator:0.1.0 .
#
# Not built on the machines this was written on (no Docker engine there); checked with hadolint
# (tests/test_chart.py).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: the project's wheel and a virtualenv with the pinned dependencies ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/lume
# Dependencies first, in their own layer: it is rebuilt only when the pins change. `--no-deps`
# with a complete lock: nothing unpinned can slip in through a transitive requirement.
COPY requirements/operator.txt /src/requirements/operator.txt
# The build backend is pinned too, and used without build isolation (no unpinned download).
RUN /opt/lume/bin/pip install --no-deps --require-virtualenv -r requirements/operator.txt \
    && python -m pip install --no-deps setuptools==80.9.0
COPY pyproject.toml README.md /src/
COPY operator /src/operator
RUN python -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && /opt/lume/bin/pip install --no-deps /wheels/lume_operator-*.whl \
    && /opt/lume/bin/pip check \
    && /opt/lume/bin/lume-operator --help > /dev/null

# --- runtime ---
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="lume-operator" \
      org.opencontainers.image.description="Prefect 3 workflows as Kubernetes objects (kopf operator)" \
      org.opencontainers.image.licenses="BSD-3-Clause"
RUN groupadd --system --gid 10001 lume \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin lume
COPY --from=build /opt/lume /opt/lume
# HOME and PREFECT_HOME under /tmp: the chart mounts an emptyDir there and keeps the root
# filesystem read-only.
ENV PATH=/opt/lume/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    PREFECT_HOME=/tmp/prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
USER 10001:10001
WORKDIR /tmp
# kopf's liveness endpoint (--liveness http://0.0.0.0:8080/healthz).
EXPOSE 8080
ENTRYPOINT ["lume-operator"]
CMD ["operator", "--liveness", "http://0.0.0.0:8080/healthz"]
