"""Every file and folder the pipeline reads or writes, in one place.

Stage paths are relative to the working directory, which DVC sets to the
project root (or to the temporary copy of it that `dvc exp run --queue` uses).
The MLflow store is anchored to `project_root()` instead, so that runs from
temporary copies land in the same store.
"""

import os
from pathlib import Path

CONFIG_DIR = Path("conf")
PARAMS_FILE = Path("params.yaml")

DATA_DIR = Path("data")
RAW_DATA_DIR = DATA_DIR / "raw"
PROCESSED_DATA_DIR = DATA_DIR / "processed"
PROCESSED_MANIFEST = PROCESSED_DATA_DIR / "manifest.json"
# Served images with their true digits (`mnist-mlops feedback snapshot`), tracked by
# DVC: the folder is a dependency of preprocess, the snapshot file a `dvc add`.
FEEDBACK_DATA_DIR = DATA_DIR / "feedback"
FEEDBACK_SNAPSHOT_FILE = FEEDBACK_DATA_DIR / "feedback.npz"

MODELS_DIR = Path("models")
MODEL_FILE = MODELS_DIR / "model.keras"
ONNX_MODEL_FILE = MODELS_DIR / "model.onnx"
RUN_FILE = MODELS_DIR / "mlflow_run.json"

REPORTS_DIR = Path("reports")
TRAINING_CURVES_FILE = REPORTS_DIR / "training.csv"
METRICS_FILE = REPORTS_DIR / "metrics.json"
PER_CLASS_FILE = REPORTS_DIR / "per_class_accuracy.json"
PREDICTIONS_FILE = REPORTS_DIR / "predictions.csv"
MISTAKES_FILE = REPORTS_DIR / "mistakes.png"
REGISTRY_FILE = REPORTS_DIR / "registry.json"
# The temperature fitted on the validation split, and its reliability diagram.
CALIBRATION_FILE = REPORTS_DIR / "calibration.json"
RELIABILITY_FILE = REPORTS_DIR / "reliability.png"
# Features and predictions of the validation split: what the monitor compares traffic with.
REFERENCE_FILE = REPORTS_DIR / "reference.npz"
MONITORING_REPORTS_DIR = REPORTS_DIR / "monitoring"

# Prometheus' and Alertmanager's configurations and the alert rules.
MONITORING_CONFIG_DIR = Path("deploy") / "monitoring"

# The model server's inference log: images, answers and true digits.
INFERENCE_LOG_DIR_ENV = "MNIST_INFERENCE_LOG_DIR"
INFERENCE_SPOOL_DIR_ENV = "MNIST_INFERENCE_SPOOL_DIR"

MLFLOW_DB_NAME = "mlflow.db"
MLFLOW_ARTIFACTS_NAME = "mlartifacts"
# The embedded Optuna storage of `mnist-mlops tune`, beside the MLflow store.
OPTUNA_DB_NAME = "optuna.db"


def processed_split_file(split: str) -> Path:
    """The arrays of one split (`train`, `validation`, `test` or `recent`)."""
    return PROCESSED_DATA_DIR / f"{split}.npz"


def project_root() -> Path:
    """The repository that runs belong to.

    DVC sets DVC_ROOT for every stage, and for queued or `--temp` experiments it
    points at the parent repository rather than the temporary copy, which is
    deleted afterwards. Outside DVC the working directory is the project root.
    """
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def inference_log_dir() -> Path | str:
    """Where `serve` logs and `feedback` records: MNIST_INFERENCE_LOG_DIR, else logs/inference."""
    chosen = os.environ.get(INFERENCE_LOG_DIR_ENV) or "logs/inference"
    return chosen if chosen.startswith("s3://") else Path(chosen)


def inference_spool_dir() -> Path:
    """Where a server's log files wait for the object store: MNIST_INFERENCE_SPOOL_DIR, else
    logs/inference-spool."""
    return Path(os.environ.get(INFERENCE_SPOOL_DIR_ENV) or "logs/inference-spool")
