# One image that runs the pipeline and serves the champion model.
#
#   docker build -t mnist-mlops .
#   docker run --rm -p 127.0.0.1:5000:5000 -v "$PWD:$PWD" -w "$PWD" mnist-mlops serve
#   docker run --rm -v "$PWD:$PWD" -w "$PWD" -e MNIST_MIRROR=/mirror \
#       -v /path/to/mirror:/mirror:ro --entrypoint dvc mnist-mlops repro
#
# The project is mounted at its own path because the embedded MLflow store
# records absolute artifact paths; with a tracking server, set
# MLFLOW_TRACKING_URI instead and mount nothing.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true

# DVC needs git to run the pipeline in a working copy.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git=1:2.39.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mnist-mlops
# The same locked dependencies as `make install`, then the project itself.
COPY requirements-lock.txt pyproject.toml README.md ./
RUN pip install -r requirements-lock.txt
COPY src ./src
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 mlops

USER 1000

# Inside a container the server must listen on all of the container's
# interfaces; `-p 127.0.0.1:5000:5000` keeps it private to the host.
ENV MNIST_SERVE_HOST=0.0.0.0
EXPOSE 5000
ENTRYPOINT ["mnist-mlops"]
CMD ["serve"]
