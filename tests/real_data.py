"""One `dvc repro` of the default pipeline on the real MNIST, shared by the slow tests.

The slow tests that start from the default pipeline's results (its accuracy,
its champion, its run) no longer each run the same 5-epoch `dvc repro` of
their own. The first worker that needs it runs it, once, in a clone of the
project under the session's base temporary folder, holding a file lock; the
others wait on the lock and find it done. Nobody writes into that clone:

- a test that only reads its results uses it as it is (`real_pipeline`);
- a test that goes on from it (another experiment, a study, a retrain, a
  monitor run logged in its store) gets its own copy (`copy_of_real_pipeline`):
  the files, the git history and DVC's cache, and the MLflow store, whose
  absolute paths (artifact locations, model sources) are moved to the copy,
  as if the pipeline had run there.
"""

import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from .conftest import REAL_MNIST, copy_project, run, subprocess_env


@dataclass(frozen=True)
class RealPipeline:
    project: Path
    output: str  # what `dvc repro` printed
    seconds: float

    @property
    def metrics(self) -> dict:
        return json.loads((self.project / "reports" / "metrics.json").read_text())


@pytest.fixture(scope="session")
def real_pipeline(tmp_path_factory, worker_id) -> RealPipeline:
    if not REAL_MNIST.is_dir():
        pytest.skip(f"real MNIST mirror not found at {REAL_MNIST}")
    # Shared by every xdist worker of this run: the parent of the workers' own folders.
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    folder, record = root / "real-pipeline", root / "real-pipeline.json"
    with FileLock(str(root / "real-pipeline.lock")):
        if not record.exists():
            shutil.rmtree(folder, ignore_errors=True)
            project = copy_project(folder)
            started = time.perf_counter()
            result = run(["dvc", "repro"], project, subprocess_env(MNIST_MIRROR=str(REAL_MNIST)))
            seconds = time.perf_counter() - started
            record.write_text(json.dumps({"output": result.stdout, "seconds": seconds}))
    done = json.loads(record.read_text())
    return RealPipeline(folder, done["output"], done["seconds"])


def relocate_store(database: Path, old: Path, new: Path) -> int:
    """Move every absolute path under `old` in an MLflow SQLite store to `new`; the count."""
    changed = 0
    with sqlite3.connect(database) as connection:
        tables = [
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        for table in tables:
            columns = [
                row[1]
                for row in connection.execute(f'PRAGMA table_info("{table}")')
                if "CHAR" in row[2].upper() or "TEXT" in row[2].upper()
            ]
            for column in columns:
                changed += connection.execute(
                    f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) '
                    f'WHERE instr("{column}", ?) > 0',
                    (str(old), str(new), str(old)),
                ).rowcount
    return changed


@pytest.fixture
def copy_of_real_pipeline(real_pipeline, tmp_path) -> Path:
    """A project of its own where the default pipeline has run on the real MNIST."""
    target = tmp_path / "clone"
    shutil.copytree(real_pipeline.project, target, symlinks=True)
    assert relocate_store(target / "mlflow.db", real_pipeline.project, target) > 0
    return target
