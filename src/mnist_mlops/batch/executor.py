"""What runs on Spark's executors: the registered pyfunc, loaded once per Python worker.

The job ships the model's folder once as an archive (`SparkContext.addArchive`:
a standalone cluster refuses to ship a folder) and this package as a zip
(`addPyFile`), so an executor needs neither the registry nor the project
installed: only a Python with the model's requirements (mlflow-skinny,
onnxruntime, numpy, pandas) and pyarrow. ONNX Runtime runs one thread per
task, since Spark already runs a task per core.
"""

from __future__ import annotations

import os

import numpy as np

from mnist_mlops.batch.formats import ID, IMAGE, PROBABILITIES
from mnist_mlops.batch.local import answer

_LOADED: dict[str, object] = {}


def load(archive: str):
    """The pyfunc unpacked from `archive` on this worker, loaded on first use."""
    if archive not in _LOADED:
        import mlflow
        from pyspark import SparkFiles

        os.environ["MNIST_ONNX_THREADS"] = "1"
        _LOADED[archive] = mlflow.pyfunc.load_model(SparkFiles.get(archive))
    return _LOADED[archive]


def score_frames(archive: str, name: str, version: str, frames):
    """mapInPandas: frames of (id, image) in, one scored frame out for each."""
    import pandas as pd

    model = load(archive)
    for frame in frames:
        pixels = np.frombuffer(b"".join(frame[IMAGE].tolist()), np.uint8).reshape(-1, 28, 28)
        digits, probabilities = answer(model, pixels)
        scored = pd.DataFrame({ID: frame[ID].to_numpy(), "digit": digits})
        for digit, column in enumerate(PROBABILITIES):
            scored[column] = probabilities[:, digit]
        scored["model_name"] = name
        scored["model_version"] = version
        scored["scored_at"] = pd.Timestamp.now(tz="UTC")
        yield scored
