# Two images from one Dockerfile:
#   serve     serves a registered model with ONNX Runtime: requirements-serve.txt
#             only (MLflow's scoring server, onnxruntime, numpy, pandas), no
#             TensorFlow, no DVC. Models registered with serving.runtime=keras
#             need the pipeline image instead.
#   pipeline  the whole locked stack (requirements-lock.txt): runs `dvc repro`,
#             and serves any model. The default target.
#
#   docker build --target serve -t mnist-mlops-serve .
#   docker build -t mnist-mlops .
#   docker run --rm -p 127.0.0.1:5000:5000 -v "$PWD:$PWD" -w "$PWD" mnist-mlops-serve
#   docker run --rm -v "$PWD:$PWD" -w "$PWD" -e MNIST_MIRROR=/mirror \
#       -v /path/to/mirror:/mirror:ro --entrypoint dvc mnist-mlops repro
#
# The project is mounted at its own path because the embedded MLflow store
# records absolute artifact paths; with a tracking server, set
# MLFLOW_TRACKING_URI instead and mount nothing.
FROM python:3.11.7-slim-bookworm AS base

# Inside a container the server must listen on all of the container's
# interfaces (MNIST_SERVE_HOST); `-p 127.0.0.1:5000:5000` keeps it private to
# the host.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    MNIST_SERVE_HOST=0.0.0.0

WORKDIR /opt/mnist-mlops
EXPOSE 5000


FROM base AS serve

# Exactly the pinned set, checked complete; then the project without its
# pipeline dependencies (`mnist-mlops serve` imports none of them).
COPY requirements-serve.txt pyproject.toml README.md ./
RUN pip install --no-deps -r requirements-serve.txt \
    && pip check
COPY src ./src
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 mlops

USER 1000
ENTRYPOINT ["mnist-mlops"]
CMD ["serve"]


FROM base AS pipeline

ENV TF_CPP_MIN_LOG_LEVEL=2 \
    DVC_NO_ANALYTICS=1

# DVC needs git to run the pipeline in a working copy.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git=1:2.39.* \
    && rm -rf /var/lib/apt/lists/*

# The same locked dependencies as `make install`, then the project itself.
COPY requirements-lock.txt pyproject.toml README.md ./
RUN pip install -r requirements-lock.txt
COPY src ./src
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 mlops

USER 1000
ENTRYPOINT ["mnist-mlops"]
CMD ["serve"]
