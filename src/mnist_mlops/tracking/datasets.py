"""The data a model was trained and measured on, as MLflow datasets that carry DVC's hashes.

MLflow 3 links a metric to the model it measures and the dataset it was
measured on. Each dataset here is named after what it is (`mnist-raw`,
`mnist-train`, `mnist-validation`, `mnist-test`, `mnist-recent`,
`mnist-feedback`); its digest is DVC's content hash of the file or folder,
the same md5 that `dvc.lock` records (a folder's ends in `.dir`); its source
(type `dvc`) names the path in the project and, when the project has a
default DVC remote, the URL that `dvc push` stores that content under.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_mlops.paths import (
    FEEDBACK_DATA_DIR,
    FEEDBACK_SNAPSHOT_FILE,
    PROCESSED_DATA_DIR,
    RAW_DATA_DIR,
    processed_split_file,
)

SOURCE_TYPE = "dvc"
# The folders whose DVC hashes dvc.lock records for a training run's data:
# fetch's output, preprocess's output and its feedback input.
DVC_FOLDERS = {"raw": RAW_DATA_DIR, "processed": PROCESSED_DATA_DIR, "feedback": FEEDBACK_DATA_DIR}
_CHUNK = 1 << 20


def dvc_md5(path: Path) -> str:
    """DVC's hash of `path`: a file's md5, or a folder's listing md5 followed by `.dir`.

    A folder's listing is every file below it (DVC's default ignores: .git,
    .hg, .dvc) as {"md5", "relpath"} sorted by path, in JSON with sorted keys.
    """
    if path.is_file():
        digest = hashlib.md5()
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
    entries = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = [name for name in subfolders if name not in (".git", ".hg", ".dvc")]
        for name in files:
            if name == ".git":
                continue
            file = Path(folder) / name
            entries.append({"md5": dvc_md5(file), "relpath": file.relative_to(path).as_posix()})
    entries.sort(key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def default_remote(root: Path = Path(".")) -> str | None:
    """The URL of the project's default DVC remote (.dvc/config, then config.local), if any."""
    parser = configparser.ConfigParser(interpolation=None)
    files = [root / ".dvc" / "config", root / ".dvc" / "config.local"]
    try:
        parser.read([file for file in files if file.is_file()])
    except configparser.Error:
        return None
    name = parser.get("core", "remote", fallback=None)
    url = parser.get(f"'remote \"{name}\"'", "url", fallback=None) if name else None
    if not url:
        return None
    if "://" not in url and not os.path.isabs(url):
        # A local remote's relative path is resolved from the .dvc folder.
        url = os.path.normpath(root.resolve() / ".dvc" / url)
    return url.rstrip("/")


def remote_url(remote: str | None, md5: str) -> str | None:
    """Where DVC 3 keeps content `md5` in `remote`: files/md5/<2>/<rest>."""
    return f"{remote}/files/md5/{md5[:2]}/{md5[2:]}" if remote else None


def _dataset_source_class():
    from mlflow.data.dataset_source import DatasetSource

    class DvcSource(DatasetSource):
        """A path that DVC versions, and the remote URL of its content."""

        def __init__(self, path: str, url: str | None = None):
            self.path, self.url = path, url

        @staticmethod
        def _get_source_type() -> str:
            return SOURCE_TYPE

        def load(self, **_kwargs) -> str:
            return self.path

        @staticmethod
        def _can_resolve(_raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> DatasetSource:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"path": self.path, **({"url": self.url} if self.url else {})}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> DatasetSource:
            return cls(source_dict["path"], source_dict.get("url"))

    return DvcSource


@dataclass(frozen=True)
class DataVersion:
    """One DVC-versioned input of a run: its dataset name, path, DVC md5 and remote URL."""

    name: str
    path: str
    md5: str
    url: str | None

    def dataset(self):
        """As an MLflow dataset: DVC's md5 is the digest, the path and URL the source."""
        from mlflow.data.meta_dataset import MetaDataset

        source = _dataset_source_class()(self.path, self.url)
        return MetaDataset(source=source, name=self.name, digest=self.md5)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "md5": self.md5, "url": self.url or ""}


def data_version(name: str, path: Path, remote: str | None = None) -> DataVersion:
    md5 = dvc_md5(path)
    return DataVersion(name, path.as_posix(), md5, remote_url(remote, md5))


def training_data(remote: str | None) -> list[DataVersion]:
    """The raw download, the training split and, when there is one, the feedback snapshot."""
    versions = [
        data_version("mnist-raw", RAW_DATA_DIR, remote),
        data_version("mnist-train", processed_split_file("train"), remote),
    ]
    if FEEDBACK_SNAPSHOT_FILE.is_file():
        versions.append(data_version("mnist-feedback", FEEDBACK_SNAPSHOT_FILE, remote))
    return versions


def split_data(split: str, remote: str | None) -> DataVersion:
    """A processed split that a model is measured on (`validation`, `test`, `recent`)."""
    return data_version(f"mnist-{split}", processed_split_file(split), remote)


def run_datasets(run) -> list[dict]:
    """The DVC-versioned datasets `run` logged, by name: name, link (path), dvc_md5 and url."""
    found = {}
    for logged in run.inputs.dataset_inputs if run.inputs else []:
        dataset = logged.dataset
        if dataset.source_type != SOURCE_TYPE:
            continue
        source = json.loads(dataset.source or "{}")
        found[dataset.name] = {
            "name": dataset.name,
            "link": source.get("path", ""),
            "dvc_md5": dataset.digest,
            **({"url": source["url"]} if source.get("url") else {}),
        }
    return [found[name] for name in sorted(found)]


def log_training_data() -> None:
    """Name the data of the active run's fit, by DVC's hashes.

    Inputs: the raw download, the training split and any feedback snapshot
    (context `training`), the validation split (`validation`). Tags: the DVC
    hashes of the folders that dvc.lock records (`data.dvc.raw`,
    `data.dvc.processed`, `data.dvc.feedback`).
    """
    import mlflow

    from mnist_mlops.tracking.runs import log_dataset

    remote = default_remote()
    for version in training_data(remote):
        log_dataset(version.dataset(), context="training")
    log_dataset(split_data("validation", remote).dataset(), context="validation")
    mlflow.set_tags(
        {
            f"data.dvc.{name}": dvc_md5(folder)
            for name, folder in DVC_FOLDERS.items()
            if folder.exists()
        }
    )


def log_measured(run_id: str, model_id: str, values: dict, measured_on: DataVersion, **at) -> None:
    """Log `values` (name: number) in the run, each linked to `model_id` and its dataset.

    The dataset is logged as an input of the run first (with log_dataset's
    retries), so that the metrics' own bookkeeping never inserts it.
    `at` may give the `step` and `timestamp` of metrics already in the run:
    the run keeps one copy, the model gains its link.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    from mnist_mlops.tracking.runs import log_dataset

    dataset = measured_on.dataset()
    log_dataset(dataset, context=measured_on.name.removeprefix("mnist-"))
    timestamp, step = at.get("timestamp") or get_current_time_millis(), at.get("step", 0)
    metrics = [
        Metric(
            key,
            float(value),
            timestamp,
            step,
            model_id=model_id,
            dataset_name=dataset.name,
            dataset_digest=dataset.digest,
        )
        for key, value in values.items()
    ]
    MlflowClient().log_batch(run_id, metrics=metrics)


def log_last_epoch(run_id: str, model_id: str, names: tuple[str, ...], measured_on) -> None:
    """Link the last logged value of each of `names` (say, val_accuracy) to `model_id`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for name in names:
        history = client.get_metric_history(run_id, name)
        if history:
            last = max(history, key=lambda metric: (metric.step, metric.timestamp))
            log_measured(
                run_id,
                model_id,
                {name: last.value},
                measured_on,
                step=last.step,
                timestamp=last.timestamp,
            )


def log_model_metrics(run_id: str, model_id: str, metrics: dict, per_class: dict) -> None:
    """The evaluation's metrics, each linked to the served model and the split it was measured on.

    Validation: the last epoch's val_accuracy and val_loss; test: accuracy,
    loss, accuracy per digit, on each perturbation of the robustness suite
    (made from the test split) and of the worst digit; recent: accuracy and
    the number of images.
    Without a recent split, recent_examples (0) goes to the run alone.
    """
    import mlflow

    remote = default_remote()
    log_last_epoch(run_id, model_id, ("val_accuracy", "val_loss"), split_data("validation", remote))
    test = {
        name: value
        for name, value in metrics.items()
        if name.startswith(("test_", "robustness_", "worst_class"))
    }
    test.update({f"test_accuracy_digit_{digit}": value for digit, value in per_class.items()})
    log_measured(run_id, model_id, test, split_data("test", remote))
    names = ("recent_accuracy", "recent_examples")
    recent = {name: metrics[name] for name in names if name in metrics}
    if "recent_accuracy" in recent:
        log_measured(run_id, model_id, recent, split_data("recent", remote))
    else:
        mlflow.log_metrics(recent)
