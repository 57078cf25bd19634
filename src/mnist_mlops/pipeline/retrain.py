"""`mnist-mlops retrain`: snapshot the feedback, `dvc repro`, say what the gate decided.

It never runs by itself: a person or a scheduler calls it, after the monitor
reports drift or an alert fires and enough true digits have come back
(docs/closing-the-loop.md). The pipeline does the work; this command only
chains the two steps and reads the reports that evaluate wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.monitoring.snapshot import SnapshotSummary, snapshot
from mnist_mlops.paths import FEEDBACK_SNAPSHOT_FILE, METRICS_FILE, REGISTRY_FILE


@dataclass(frozen=True)
class Retraining:
    snapshot: SnapshotSummary
    seconds: float
    registry: dict | None
    metrics: dict | None

    def report(self) -> str:
        """What happened, before and after, in a few lines."""
        lines: list[str] = []
        if self.registry is None:
            lines.append(
                f"retrain: the pipeline was up to date; no new version ({self.seconds:.0f} s)"
            )
            return "\n".join(lines)
        registry, metrics = self.registry, self.metrics
        version = registry["version"]
        if registry["promoted"]:
            outcome = f"v{version} is the new champion"
        else:
            outcome = f"v{version} not promoted; v{registry['champion_version']} stays champion"
        lines.append(f"retrain: {outcome} ({self.seconds:.0f} s). {registry['reason']}")
        before = registry.get("before", {})
        for name in ("test_accuracy", "recent_accuracy"):
            if name not in metrics:
                continue
            was = f"{before[name]:.4f} (v{before['version']})" if name in before else "-"
            lines.append(f"  {name:16} before {was}  after {metrics[name]:.4f} (v{version})")
        if metrics.get("recent_examples"):
            lines.append(f"  recent split: the newest {metrics['recent_examples']} feedback images")
        return "\n".join(lines)


def retrain(log_dir: Path, feedback_file: Path = FEEDBACK_SNAPSHOT_FILE) -> Retraining:
    """Snapshot `log_dir`'s labelled traffic, then `dvc repro`; raise on a failed step."""
    from mnist_mlops.pipeline.params_check import warn_if_different

    summary = snapshot(log_dir, feedback_file)
    print(summary, flush=True)
    warn_if_different("mnist-mlops retrain")
    before = REGISTRY_FILE.stat().st_mtime_ns if REGISTRY_FILE.exists() else None
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "dvc", "repro"])
    seconds = time.perf_counter() - started
    if completed.returncode:
        raise RetrainError(f"`dvc repro` failed (exit status {completed.returncode})")
    evaluated = REGISTRY_FILE.exists() and REGISTRY_FILE.stat().st_mtime_ns != before
    if not evaluated:
        return Retraining(summary, seconds, None, None)
    return Retraining(
        summary,
        seconds,
        json.loads(REGISTRY_FILE.read_text()),
        json.loads(METRICS_FILE.read_text()),
    )


class RetrainError(RuntimeError):
    """A step of the retraining failed; what it wrote is what DVC and MLflow made of it."""
