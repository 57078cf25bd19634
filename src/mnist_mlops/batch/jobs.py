"""One batch-scoring job: resolve the version once, score with an engine, write atomically, log.

The alias is resolved at the start and the job loads that version by number,
so one job scores with one version even if the champion moves meanwhile.
OUTPUT is written into a folder beside it and renamed into place at the end:
it appears complete or not at all, and an existing OUTPUT is replaced only
with `overwrite`. Each job is a run of the MLflow experiment
`mnist-batch-scoring`: the version, the row counts, the throughput and the
predicted-digit mix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.atomic import atomic_directory
from mnist_mlops.batch.formats import BatchError, input_dataset
from mnist_mlops.model.architectures import NUM_CLASSES

EXPERIMENT = "mnist-batch-scoring"
ENGINES = ("local", "spark")
EXPERIMENT_NOTE = (
    "Batch-scoring jobs (`mnist-mlops score INPUT OUTPUT`): one run per job, with the "
    "model version used, rows scored and rejected, images per second and the digits predicted."
)


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path
    model_uri: str = "models:/mnist-classifier@champion"
    engine: str = "local"
    master: str = "local[*]"
    batch_size: int = 8192
    overwrite: bool = False


@dataclass(frozen=True)
class Outcome:
    scored: int
    rejected: int
    seconds: float
    startup_seconds: float
    name: str
    version: str
    run_id: str

    @property
    def rate(self) -> float:
        return self.scored / self.seconds if self.seconds else 0.0

    def line(self, job: Job) -> str:
        model = f"{self.name} v{self.version}" if self.version else job.model_uri
        engine = "local" if job.engine == "local" else f"spark {job.master}"
        return (
            f"scored {self.scored} images, rejected {self.rejected}, {self.rate:,.0f} images/s "
            f"({engine}; {self.startup_seconds:.1f} s to start), with {model} → {job.output} "
            f"(MLflow run {self.run_id})"
        )


def resolve(model_uri: str) -> tuple[str, str, str]:
    """(name, version, the URI of that exact version); a URI that is not registered as it is."""
    from mnist_mlops.tracking.registry import registered_version

    version = registered_version(model_uri)
    if version is None:
        return "", "", model_uri
    return version.name, str(version.version), f"models:/{version.name}/{version.version}"


def check(job: Job) -> None:
    if job.engine not in ENGINES:
        raise BatchError(f"--engine must be one of {', '.join(ENGINES)}, got {job.engine!r}")
    if job.batch_size < 1:
        raise BatchError(f"--batch-size must be positive, got {job.batch_size}")
    if job.output.exists() and not job.overwrite:
        raise BatchError(f"{job.output} exists: pass --overwrite to replace it")
    if job.output.resolve() == job.input.resolve():
        raise BatchError("OUTPUT must not be INPUT")


def run_job(job: Job) -> Outcome:
    """Score INPUT into OUTPUT as one MLflow run; BatchError for what a user can fix."""
    import mlflow

    from mnist_mlops.config import MlflowConfig
    from mnist_mlops.tracking.runs import active_run
    from mnist_mlops.tracking.store import NOTE_TAG, use_experiment

    check(job)
    dataset = input_dataset(job.input)
    session = None
    started = time.perf_counter()
    if job.engine == "spark":
        from mnist_mlops.batch import spark

        # Java and the master are checked before anything else is loaded.
        session = spark.start_session(job.master)
    try:
        use_experiment(MlflowConfig(experiment_name=EXPERIMENT))
        mlflow.set_experiment_tag(NOTE_TAG, EXPERIMENT_NOTE)
        name, version, exact_uri = resolve(job.model_uri)
        with active_run(run_name=f"score {name or 'model'} v{version or '?'}") as run:
            mlflow.log_params(
                {
                    "model_uri": job.model_uri,
                    "model.name": name,
                    "model.version": version,
                    "engine": job.engine,
                    "master": job.master if job.engine == "spark" else "",
                    "input": str(job.input),
                    "output": str(job.output),
                    "batch_size": job.batch_size,
                }
            )
            with atomic_directory(job.output) as staging:
                if session is None:
                    from mnist_mlops.batch import local

                    model = mlflow.pyfunc.load_model(exact_uri)
                    scoring = time.perf_counter()
                    counts = local.score(
                        dataset, job.input, model, staging, job.batch_size, name, version
                    )
                else:
                    archive = spark.ship(session, exact_uri, staging)
                    scoring = time.perf_counter()
                    counts = spark.score(
                        session, archive, job.input, staging, job.batch_size, name, version
                    )
            seconds = time.perf_counter() - scoring
            startup = scoring - started
            _log_outcome(counts, seconds, startup)
    finally:
        if session is not None:
            session.stop()
    return Outcome(counts.scored, counts.rejected, seconds, startup, name, version, run.info.run_id)


def _log_outcome(counts, seconds: float, startup: float) -> None:
    import mlflow

    mix = counts.digits / max(1, counts.scored)
    mlflow.log_metrics(
        {
            "rows_scored": counts.scored,
            "rows_rejected": counts.rejected,
            "seconds": seconds,
            "startup_seconds": startup,
            "images_per_second": counts.scored / seconds if seconds else 0.0,
            **{f"digit_share_{digit}": float(mix[digit]) for digit in range(NUM_CLASSES)},
        }
    )
    mlflow.log_dict(
        {str(digit): int(count) for digit, count in enumerate(np.asarray(counts.digits))},
        "predicted_digits.json",
    )
