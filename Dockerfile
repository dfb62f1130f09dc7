# syntax=docker/dockerfile:1
# The lume-operator image: the package the tests run, on a slim CPython 3.11, installed from
# requirements/operator.txt (every dependency pinned), run as a non-root user with a numeric uid
# (so the kubelet can verify runAsNonRoot) that writes nothing outside /tmp.
#
#   docker build -t lume-operator:0.1.0 .
#
# Built by the tests exactly so (tests/containers/images.py: the classic builder, which ignores
# the syntax line, on a stand-in for the slim Python image) and linted with hadolint.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- deps: a virtualenv with the pinned dependencies, rebuilt only when the pins change ---
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/lume
# `--no-deps` with a complete lock: nothing unpinned can slip in through a transitive requirement.
COPY requirements/operator.txt /src/requirements/operator.txt
RUN /opt/lume/bin/pip install --no-deps --require-virtualenv -r /src/requirements/operator.txt

# --- build: the project's wheel, apart from the dependencies ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The build backend is pinned too, and used without build isolation (no unpinned download).
RUN python -m pip install --no-deps setuptools==80.9.0
COPY pyproject.toml README.md /src/
COPY operator /src/operator
RUN python -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- runtime ---
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="lume-operator" \
      org.opencontainers.image.description="Prefect 3 workflows as Kubernetes objects (kopf operator)" \
      org.opencontainers.image.licenses="BSD-3-Clause"
RUN groupadd --system --gid 10001 lume \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin lume
# The dependencies, then the project on top: a change of the sources rebuilds only the layers
# from here on (a small wheel), never the large layer of the dependencies.
COPY --from=deps /opt/lume /opt/lume
COPY --from=build /wheels /wheels
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
       /opt/lume/bin/pip install --no-deps --require-virtualenv /wheels/lume_operator-*.whl \
    && /opt/lume/bin/pip check \
    && /opt/lume/bin/lume-operator --help > /dev/null
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
