"""The leaderboard: every run of the experiment, best test accuracy first.

Reads the tracking store (the embedded one, or MLFLOW_TRACKING_URI's server)
and leads from each MLflow run to its DVC experiment and registered version.
"""

from __future__ import annotations

from dataclasses import dataclass

from mnist_mlops.tracking.registry import CHAMPION, current_champion
from mnist_mlops.tracking.store import tracking_uri

COLUMNS = (
    ("run", "run name"),
    ("dvc_experiment", "DVC experiment"),
    ("model", "model"),
    ("optimizer", "optimizer"),
    ("epochs", "epochs"),
    ("val_accuracy", "val acc"),
    ("test_accuracy", "test acc"),
    ("duration", "duration"),
    ("version", "version"),
    ("runtime", "runtime"),
    ("champion", CHAMPION),
)
# One Optuna study's trials (`mnist-mlops runs --study NAME`): epochs run of planned.
STUDY_COLUMNS = (
    ("run", "run name"),
    ("state", "state"),
    ("model", "model"),
    ("optimizer", "optimizer"),
    ("learning_rate", "learning rate"),
    ("batch_size", "batch"),
    ("epochs", "epochs"),
    ("val_accuracy", "val acc"),
    ("duration", "duration"),
)


@dataclass(frozen=True)
class Row:
    run: str
    run_id: str
    status: str
    dvc_experiment: str
    model: str
    optimizer: str
    epochs: str
    val_accuracy: float | None
    test_accuracy: float | None
    duration_seconds: float | None
    version: str
    runtime: str
    champion: bool
    state: str = ""
    learning_rate: str = ""
    batch_size: str = ""

    def cells(self) -> dict[str, str]:
        def accuracy(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        duration = "-" if self.duration_seconds is None else f"{self.duration_seconds:.1f} s"
        return {
            "run": self.run,
            "dvc_experiment": self.dvc_experiment or "-",
            "model": self.model,
            "optimizer": self.optimizer,
            "epochs": self.epochs,
            "val_accuracy": accuracy(self.val_accuracy),
            "test_accuracy": accuracy(self.test_accuracy),
            "duration": duration if self.status == "FINISHED" else self.status,
            "version": self.version or "-",
            "runtime": self.runtime or "-",
            "champion": "*" if self.champion else "",
            "state": self.state or "-",
            "learning_rate": self.learning_rate or "-",
            "batch_size": self.batch_size or "-",
        }


def rows(
    experiment_name: str, model_name: str, top: int, filter_string: str = "", study: str = ""
) -> list[Row]:
    """The runs of `experiment_name` matching an MLflow filter, best test_accuracy first.

    With `study`, the trials of that Optuna study instead, best val_accuracy first.
    """
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    order_by = ["metrics.test_accuracy DESC", "attributes.start_time DESC"]
    if study:
        trials = f"tags.`optuna.study` = '{study}' and tags.`optuna.role` = 'trial'"
        filter_string = f"{trials} and {filter_string}" if filter_string else trials
        order_by = ["metrics.val_accuracy DESC", "attributes.start_time DESC"]
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=filter_string,
        order_by=order_by,
        max_results=top,
    )
    champion = current_champion(client, model_name)
    champion_version = str(champion.version) if champion else None
    table = []
    for run in runs:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        ended = run.info.end_time
        version = tags.get("registry.version", "")
        table.append(
            Row(
                run=run.info.run_name or run.info.run_id,
                run_id=run.info.run_id,
                status=run.info.status,
                dvc_experiment=tags.get("dvc.exp_name", ""),
                model=params.get("model.name", "?"),
                optimizer=params.get("optimizer.name", "?"),
                epochs=_epochs(params, metrics),
                val_accuracy=metrics.get("val_accuracy"),
                test_accuracy=metrics.get("test_accuracy"),
                duration_seconds=(ended - run.info.start_time) / 1000 if ended else None,
                version=version,
                # Runs from before the ONNX runtime existed were all served by Keras.
                runtime=tags.get("serving.runtime", "keras" if version else ""),
                champion=bool(version) and version == champion_version,
                state=tags.get("optuna.state", ""),
                learning_rate=_number(params.get("optimizer.learning_rate", "")),
                batch_size=params.get("train.batch_size", ""),
            )
        )
    return table


def _number(text: str) -> str:
    try:
        return f"{float(text):.3g}"
    except ValueError:
        return text


def _epochs(params: dict, metrics: dict) -> str:
    planned = params.get("train.epochs", "?")
    if "epochs_run" in metrics:  # a tuning trial, perhaps pruned
        return f"{int(metrics['epochs_run'])}/{planned}"
    return planned


def render(table: list[Row], columns=COLUMNS) -> str:
    """An aligned text table, one line per run."""
    lines = [[title for _key, title in columns]]
    lines += [[row.cells()[key] for key, _title in columns] for row in table]
    widths = [max(len(line[index]) for line in lines) for index in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
