"""mnist-mlops: the classic MNIST network as a tracked, reproducible DVC pipeline.

The package is a house in wings, one subpackage per concern, on shared ground:

    ground      paths.py, atomic.py, processes.py, untrusted.py   where things
                are; how files are written; how a command runs a server in the
                foreground; how a file someone else made is read
    model/      the network's architectures, its ONNX export, the served
                classifier and how models are logged to MLflow
    config.py   params.yaml validated against the schema (model/ gives the
                architectures' and optimizers' options)
    tracking/   the MLflow store, runs, the registry and its gate, the
                leaderboard, the UI
    monitoring/ watching the served model: image features, the inference
                log, feedback, drift
    serving/    the model server, its client, its health check, the HTTPS
                front door          team/  the tracking server on PostgreSQL
    batch/      `mnist-mlops score`: a Parquet dataset through one registered
                version, locally or on Apache Spark
    pipeline/   the four DVC stages: fetch, preprocess, train, evaluate
    tuning/     Optuna studies over conf/search/
    __main__    the command line, assembled from each wing's commands.py

A module imports only from its own wing and from the rows above it (serving
and team share a row and stay apart); `LAYERS` says the same for the test
that enforces it.
"""

__version__ = "0.1.0"

LAYERS = (
    ("paths", "atomic", "processes", "untrusted"),
    ("model",),
    ("config",),
    ("tracking",),
    ("monitoring",),
    ("serving", "team"),
    ("batch",),
    ("pipeline",),
    ("tuning",),
    ("__main__",),
)
