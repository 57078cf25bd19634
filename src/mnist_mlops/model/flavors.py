"""The models each run logs to MLflow, with their signatures and pinned requirements.

`train` saves the Keras model (`model`, Keras flavor) and, with the ONNX
runtime, its export (`onnx_model`, ONNX flavor) into the run as MLflow model
folders: `runs:/RUN/model` loads them as before, but they are not MLflow 3
LoggedModels, so the experiment's Models tab is not three rows a run with
the same numbers. `evaluate` logs the servable `classifier` (classifier.py
as models from code), the one LoggedModel of a run, that the registry
versions and that metrics name by its model id (pipeline/evaluate.py).
The classifier's requirements follow its runtime: with ONNX they are MLflow,
onnxruntime, numpy and pandas, with no TensorFlow and no Keras.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mnist_mlops.model.architectures import IMAGE_SHAPE, NUM_CLASSES

if TYPE_CHECKING:
    import keras
    import mlflow

MODEL_ARTIFACT = "model"
ONNX_ARTIFACT = "onnx_model"
CLASSIFIER_ARTIFACT = "classifier"
CLASSIFIER_STEP = -1

_KERAS_REQUIREMENTS = ("mlflow", "tensorflow", "keras")
# mlflow-skinny is MLflow without its server, UI and SQL stores, and serves
# models all the same; MLflow's pyfunc needs pandas, which skinny leaves out.
_ONNX_REQUIREMENTS = ("mlflow-skinny", "onnxruntime", "numpy", "pandas")


@contextmanager
def _pinned_requirements_trusted() -> Iterator[None]:
    """Within the block, MLflow logs a model without checking its requirements again.

    MLflow checks a model's pip requirements against the installed packages
    when it saves the model and again when it loads it back to validate the
    input example, and its first check maps every installed package to its
    modules: 0.8 CPU-seconds here, in every process that logs a model. The
    project's requirements come from `pinned`, which reads them from the
    installed packages themselves, so they match by construction. Loading a
    model elsewhere still checks (`mlflow.pyfunc.load_model` in `serve`):
    there the environment may differ from the one that saved it.
    """
    import mlflow.pyfunc
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    checking = [module for module in (environment, mlflow.pyfunc) if hasattr(module, name)]
    checks = [getattr(module, name) for module in checking]
    for module in checking:  # another MLflow may check elsewhere, as it likes
        setattr(module, name, lambda requirements: None)
    try:
        yield
    finally:
        for module, check in zip(checking, checks, strict=True):
            setattr(module, name, check)


def pinned(names: tuple[str, ...]) -> list[str]:
    """The exact installed versions of `names`, as pip requirements.

    Listing them is also much faster than MLflow's inference, which reloads
    the model in a subprocess to see what it imports.
    """
    return [f"{name}=={metadata.version(name)}" for name in names]


def model_signature() -> mlflow.models.ModelSignature:
    """Input: a batch of raw 28×28 images with pixels in 0–255; output: 10 probabilities."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
    )


def _save_keras_model(path: str, **save_arguments) -> None:
    import mlflow.keras

    # mlflow 3.17's Keras flavor writes input_example.json before it creates
    # the model folder, so any input example fails with FileNotFoundError.
    # Creating the folder first lets the flavor save the example as designed.
    os.makedirs(path, exist_ok=True)
    mlflow.keras.save_model(path=path, **save_arguments)


def _into_the_run(name: str, save) -> str:
    """Save a model folder with `save(path)` and log it into the active run as `name`."""
    import mlflow

    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.join(scratch, name)
        with _pinned_requirements_trusted():
            save(folder)
        mlflow.log_artifacts(folder, name)
    return f"runs:/{mlflow.active_run().info.run_id}/{name}"


def log_keras_model(model: keras.Model, input_example: np.ndarray) -> str:
    """Save `model` into the active run with the Keras flavor, its signature and an input example.

    Returns its URI, `runs:/RUN/model`.
    """
    return _into_the_run(
        MODEL_ARTIFACT,
        lambda path: _save_keras_model(
            path,
            model=model,
            signature=model_signature(),
            input_example=input_example.astype(np.float32),
            pip_requirements=pinned(_KERAS_REQUIREMENTS),
        ),
    )


def log_onnx_model(model_file: Path, input_example: np.ndarray) -> str:
    """Save the exported ONNX model into the active run with MLflow's ONNX flavor."""
    import mlflow.onnx
    import onnx

    return _into_the_run(
        ONNX_ARTIFACT,
        lambda path: mlflow.onnx.save_model(
            onnx.load(str(model_file)),
            path,
            signature=model_signature(),
            input_example=input_example.astype(np.float32),
            # The flavor's own loader also needs onnx itself.
            pip_requirements=pinned((*_ONNX_REQUIREMENTS, "onnx")),
            onnx_execution_providers=["CPUExecutionProvider"],
        ),
    )


def classifier_signature() -> mlflow.models.ModelSignature:
    """Input: a batch of raw 28×28 images (pixel values 0–255); output: digit and probabilities."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))]))


def log_classifier(
    runtime: str,
    model_file: Path,
    input_example: np.ndarray,
    max_batch_size: int,
    known_digits: tuple[np.ndarray, np.ndarray] | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log the servable classifier around `model_file` (ONNX or Keras) to the active run,
    with the `known_digits` (images, labels) that a following server checks it on."""
    import mlflow

    from mnist_mlops.model import classifier

    model_artifact = classifier.ONNX_ARTIFACT if runtime == "onnx" else classifier.KERAS_ARTIFACT
    requirements = _ONNX_REQUIREMENTS if runtime == "onnx" else _KERAS_REQUIREMENTS
    with tempfile.TemporaryDirectory() as scratch:
        settings_file = Path(scratch) / "serving.json"
        settings_file.write_text(json.dumps({"max_batch_size": max_batch_size, "runtime": runtime}))
        known = {}
        if known_digits is not None:
            known[classifier.KNOWN_DIGITS_ARTIFACT] = str(Path(scratch) / "known_digits.npz")
            np.savez(
                known[classifier.KNOWN_DIGITS_ARTIFACT],
                images=known_digits[0],
                labels=known_digits[1],
            )
        with _pinned_requirements_trusted():
            return mlflow.pyfunc.log_model(
                name=CLASSIFIER_ARTIFACT,
                python_model=classifier.__file__,
                artifacts={
                    model_artifact: str(model_file),
                    classifier.SETTINGS_ARTIFACT: str(settings_file),
                    **known,
                },
                signature=classifier_signature(),
                input_example=input_example.astype(np.float32),
                pip_requirements=pinned(requirements),
                # MLflow copies onto a new model every metric of the run logged at
                # its step without a model id (the epochs' and the system's at 0).
                # No metric of the run has this step: the model's metrics are only
                # those logged with its id (tracking/datasets.py).
                step=CLASSIFIER_STEP,
            )
