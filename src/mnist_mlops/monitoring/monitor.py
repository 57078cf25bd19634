"""`mnist-mlops monitor`: one check of one served version's traffic, against its reference.

Reads the inference log and the feedback, keeps the rows of the version
behind `--model-uri` (by default the champion, resolved once) in the window
asked for, compares them with the reference profile stored with that
version's run (`drift.py`), writes `reports/monitoring/` at once, logs one
MLflow run in an experiment of its own, and optionally pushes the verdict to
a Prometheus Pushgateway. The exit status says the verdict: 0 ok, 3 drift,
4 too few rows; 2 when something a user can fix stops it.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mnist_mlops.monitoring.calibration import estimate_words, health, per_digit_metrics
from mnist_mlops.monitoring.drift import DRIFT, OK, TOO_FEW, Check, check
from mnist_mlops.monitoring.log_files import read_feedback, read_rows
from mnist_mlops.monitoring.log_store import unreadable
from mnist_mlops.monitoring.reference import REFERENCE_ARTIFACT_DIR, load_reference

EXIT_STATUS = {OK: 0, DRIFT: 3, TOO_FEW: 4}
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


EXPERIMENT_NOTE = """\
**Checks of the served traffic**, one run per `mnist-mlops monitor`: the rows
checked, each drift test's p-value, the mean top probability, the realized
accuracy on rows with true digits, the verdict (tag `verdict`) and the model
version (tag `model_version`), with the report as artifacts. Chart
`p_mean_intensity`, `mean_top_probability` or `accuracy` over time to watch
the model age.
"""


class MonitorError(Exception):
    """The check cannot be made as asked; the message says what to do."""


@dataclass(frozen=True)
class MonitorSettings:
    model_uri: str
    log_dir: Path | str  # a folder or an s3:// URL
    reports_dir: Path
    since: str = ""
    last: int = 0
    alpha: float = 0.05
    min_rows: int = 200
    min_effect: float = 0.1
    experiment: str = "mnist-monitoring"
    pushgateway: str = ""


def window_seconds(since: str) -> float:
    match = DURATION.match(since)
    if not match:
        raise MonitorError(f"--since takes a duration such as 30m, 24h or 7d, got {since!r}")
    return float(match.group(1)) * SECONDS[match.group(2)]


def select(rows: dict[str, np.ndarray], name: str, version: str, since: str, last: int) -> dict:
    """The rows of one model version, in the window asked for (all of them by default)."""
    if not rows:
        return {}
    keep = (rows["model_name"] == name) & (rows["model_version"] == version)
    if since:
        keep &= rows["time"] >= time.time() - window_seconds(since)
    chosen = {field: values[keep] for field, values in rows.items()}
    if last:
        chosen = {field: values[-last:] for field, values in chosen.items()}
    return chosen


def true_digits(rows: dict[str, np.ndarray], log_dir: Path | str) -> np.ndarray:
    """The true digit of each row, -1 where none came back."""
    truth = read_feedback(log_dir)
    return np.array(
        [
            truth.get((request_id, int(position)), -1)
            for request_id, position in zip(
                rows["request_id"].tolist(), rows["position"].tolist(), strict=True
            )
        ],
        dtype=np.int16,
    )


def fetch_reference(run_id: str, version: str) -> dict[str, np.ndarray]:
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as scratch:
        try:
            folder = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=REFERENCE_ARTIFACT_DIR, dst_path=scratch
            )
            return load_reference(Path(folder) / "reference.npz")
        except (MlflowException, OSError, KeyError, ValueError):
            raise MonitorError(
                f"model version {version} has no reference profile (its run {run_id} "
                "predates monitoring): evaluate its model again (`dvc repro -f evaluate` at "
                "the commit that trained it), or check a newer version with --model-uri"
            ) from None


def run_monitor(settings: MonitorSettings) -> tuple[int, str]:
    """Make one check; return the exit status and the line to print."""
    from mlflow.exceptions import MlflowException

    from mnist_mlops.config import MlflowConfig
    from mnist_mlops.monitoring.report import figure, foreign_files, write_reports
    from mnist_mlops.tracking.registry import registered_version
    from mnist_mlops.tracking.store import NOTE_TAG, use_experiment

    if settings.since:
        window_seconds(settings.since)
    problem = unreadable(settings.log_dir)
    if problem:
        raise MonitorError(f"{problem}: serve with --log-dir there")
    others = foreign_files(settings.reports_dir)
    if others:
        raise MonitorError(
            f"{settings.reports_dir} holds other files ({', '.join(others[:3])}): the report "
            "replaces its folder whole, so give --reports-dir a folder of its own"
        )
    use_experiment(MlflowConfig(experiment_name=settings.experiment))
    import mlflow

    # The experiment is made like the pipeline's; its description says what these runs are.
    mlflow.set_experiment_tag(NOTE_TAG, EXPERIMENT_NOTE)
    try:
        version = registered_version(settings.model_uri)
    except MlflowException as error:
        raise MonitorError(f"cannot resolve {settings.model_uri}: {error.message}") from None
    if version is None:
        raise MonitorError(f"--model-uri must name a registered version, got {settings.model_uri}")
    name, number = version.name, str(version.version)
    reference = fetch_reference(version.run_id, number)
    logged = read_rows(settings.log_dir)
    rows = select(logged, name, number, settings.since, settings.last)
    count = len(rows.get("request_id", []))
    truth = true_digits(rows, settings.log_dir) if count else None
    if count:
        top = rows["probabilities"].max(axis=1)
        result = check(
            rows["features"],
            rows["digit"],
            top,
            reference,
            truth,
            settings.alpha,
            settings.min_rows,
            settings.min_effect,
        )
    else:
        result = Check(TOO_FEW, 0, settings.alpha, settings.alpha / 9, settings.min_effect)
    test_accuracy = version.tags.get("test_accuracy")
    estimated = health(rows["probabilities"], reference, truth) if count else None
    context = {
        "estimated": estimated,
        "model_name": name,
        "model_version": number,
        "model_uri": settings.model_uri,
        "test_accuracy": float(test_accuracy) if test_accuracy else None,
        "window": _window(rows),
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    png = figure(rows["features"], top, reference) if count else None
    summary = write_reports(settings.reports_dir, result, context, png)
    _log_run(settings, summary)
    if settings.pushgateway:
        _push(settings.pushgateway, summary)
    line = _line(summary, logged, count, rows, settings.min_rows)
    return EXIT_STATUS[result.verdict], line + _next_step(summary, settings.reports_dir, count)


def _window(rows: dict) -> dict[str, str]:
    if not len(rows.get("time", [])):
        return {"first": "-", "last": "-"}
    stamp = lambda seconds: datetime.fromtimestamp(seconds, UTC).isoformat(  # noqa: E731
        timespec="seconds"
    )
    return {"first": stamp(rows["time"].min()), "last": stamp(rows["time"].max())}


def _line(summary: dict, logged: dict, count: int, rows: dict, min_rows: int) -> str:
    where = f"{summary['model_name']} v{summary['model_version']}"
    line = f"monitor: {where}, {count} rows: {summary['verdict']}"
    if summary["verdict"] == TOO_FEW:
        line += f" ({count} of the {min_rows} a check needs{_wait(rows, count, min_rows)})"
    if summary["drifted"]:
        line += f" in {', '.join(summary['drifted'])}"
    if not count and logged:
        versions = sorted(set(logged["model_version"].tolist()))
        line += f" (the log holds rows of version(s) {', '.join(versions)})"
    if summary.get("estimated"):
        line += f"; {estimate_words(summary['estimated'])}"
    if summary["accuracy"]:
        accuracy = summary["accuracy"]
        line += (
            f"; accuracy {accuracy['value']:.4f} on {accuracy['rows']} rows with true digits "
            f"(95 % {accuracy['low']:.4f}–{accuracy['high']:.4f}; test {summary['test_accuracy']})"
        )
    return line


def _wait(rows: dict, count: int, min_rows: int) -> str:
    """How long the window's own traffic takes to bring the rows a check needs."""
    times = np.asarray(rows.get("time", []), dtype=float)
    if count < 2 or len(times) < 2 or times.max() <= times.min():
        return "; wait for traffic, or lower --min-rows"
    per_second = (count - 1) / (times.max() - times.min())
    seconds = (min_rows - count) / per_second
    pace = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
    return f"; at this window's traffic, about {pace} more, or lower --min-rows"


def _next_step(summary: dict, reports_dir: Path, count: int) -> str:
    """Where the report is and, for drift, the runbook's next step."""
    if not count:
        return ""
    step = f"; report {reports_dir / 'report.html'}"
    if summary["verdict"] == DRIFT:
        step += (
            "; next: send the true digits back (POST /feedback or mnist-mlops feedback record), "
            "then make retrain (docs/closing-the-loop.md)"
        )
    return step


def _metrics(summary: dict) -> dict[str, float]:
    metrics = {"rows": summary["rows"]}
    for test in summary["tests"]:
        metrics[f"p_{test['name']}"] = test["p_value"]
        if test["name"] == "top_probability":
            metrics["mean_top_probability"] = test["current"]
            metrics["reference_mean_top_probability"] = test["reference"]
    if summary["accuracy"]:
        metrics["accuracy"] = summary["accuracy"]["value"]
        metrics["labelled_rows"] = summary["accuracy"]["rows"]
    if summary.get("estimated"):
        estimated = summary["estimated"]["estimated_accuracy"]
        metrics["estimated_accuracy"] = estimated["value"]
        metrics["estimated_accuracy_low"] = estimated["low"]
        metrics["estimated_accuracy_high"] = estimated["high"]
    if summary["test_accuracy"] is not None:
        metrics["test_accuracy"] = summary["test_accuracy"]
    return metrics


def _log_run(settings: MonitorSettings, summary: dict) -> None:
    import mlflow

    from mnist_mlops.tracking.runs import active_run

    run_name = f"v{summary['model_version']}-{summary['checked_at']}"
    with active_run(run_name=run_name):
        mlflow.set_tags(
            {
                "verdict": summary["verdict"],
                "model_name": summary["model_name"],
                "model_version": summary["model_version"],
                "mlflow.note.content": _line(summary, {}, summary["rows"], {}, settings.min_rows),
            }
        )
        mlflow.log_metrics(_metrics(summary))
        mlflow.log_metrics(per_digit_metrics(summary.get("estimated")))
        mlflow.log_artifacts(str(settings.reports_dir), "monitoring")


def _push(gateway: str, summary: dict) -> None:
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    values = {
        "mnist_monitor_drift": float(summary["verdict"] == DRIFT),
        "mnist_monitor_too_few_rows": float(summary["verdict"] == TOO_FEW),
        "mnist_monitor_rows": float(summary["rows"]),
        "mnist_monitor_last_check_timestamp_seconds": time.time(),
        **{f"mnist_monitor_{name}": value for name, value in _metrics(summary).items()},
    }
    for name, value in values.items():
        Gauge(name, f"mnist-mlops monitor: {name}", registry=registry).set(value)
    push_to_gateway(
        gateway,
        job="mnist-monitor",
        registry=registry,
        grouping_key={"model_version": summary["model_version"]},
        timeout=10,
    )
