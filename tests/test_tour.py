"""The first hour, verbatim: the README's tour and the runbooks, in a fresh clone, unactivated.

In one `git clone` of this repository whose `PATH` holds the system's
folders alone (no `.venv/bin`; the system's `python3` has none of the
project's packages), the test runs, exactly as written and in order
(`tests/runbooks.py`): the README's tour and its batch scoring, the
monitoring page (serve, metrics, feedback, the monitor, Prometheus), the
closing-the-loop runbook (retrain on that feedback, commit, push) and the
team page's object store (store, keys, the tracking server on S3, DVC's
push and pull through it). What the test adds is only the world a user
would have: served traffic whose true digits come back in `labels.csv`, and
the PostgreSQL the team page's first block asks for. The clone shares this
checkout's `.venv` (a symlink), so the install is not timed here; on real
MNIST (the offline mirror) the pipeline trains three times.
"""

import json
import os
import re
import time
import urllib.request

import numpy as np
import pytest

from .conftest import REAL_MNIST, REPO_ROOT, run, tracking_server
from .runbooks import Terminal, blocks, section

TRAFFIC = 600  # digits like the training ones, sent before the monitor runs, with their true digits
MOST_SKIPPED = 2  # blocks the docs mark as not runnable, of all those read here


def documents() -> dict[str, list]:
    """The blocks the test runs, by where they come from."""
    readme = (REPO_ROOT / "README.md").read_text()
    team = (REPO_ROOT / "docs" / "team.md").read_text()
    return {
        "tour": blocks(section(readme, "--8<-- [start:tour]", "--8<-- [end:tour]")),
        "scoring": blocks(section(readme, "## Scoring a whole dataset", "\n## ")),
        "monitoring": blocks((REPO_ROOT / "docs" / "monitoring.md").read_text()),
        "loop": blocks((REPO_ROOT / "docs" / "closing-the-loop.md").read_text()),
        "object store": blocks(section(team, "**Storage on S3.**", "Measured here")),
    }


def test_the_runbooks_mark_few_blocks_and_say_why():
    found = [block for parts in documents().values() for block in parts]
    skipped = [block.skipped for block in found if block.skipped]
    assert len(found) >= 12 and len(skipped) <= MOST_SKIPPED, skipped
    assert all(len(reason) > 20 for reason in skipped), skipped


def fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], tmp_path, os.environ)
    (clone / ".venv").symlink_to(REPO_ROOT / ".venv")
    # Fresh files are newer than the shared .venv's markers: age them, so that
    # make sees the install as done instead of installing into the shared .venv.
    for name in os.listdir(clone):
        if name.startswith("requirements") or name == "pyproject.toml":
            os.utime(clone / name, (0, 0))
    for name in ("package.json", "package-lock.json"):
        os.utime(clone / "docs" / "javascripts" / name, (0, 0))
    return clone


def user_env(home) -> dict:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "MNIST_MIRROR": str(REAL_MNIST),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        # A user's git knows who they are; this HOME has no .gitconfig.
        "GIT_AUTHOR_NAME": "Tour",
        "GIT_AUTHOR_EMAIL": "tour@example.invalid",
        "GIT_COMMITTER_NAME": "Tour",
        "GIT_COMMITTER_EMAIL": "tour@example.invalid",
    }


def send_traffic(clone) -> float:
    """What users do between the pages: ask the served model, and later learn the true digits.

    Sends TRAFFIC digits of the validation split (the monitor's reference: no
    drift to report) to `make serve` and writes their true digits to
    `labels.csv`, as the monitoring page's `feedback record` reads them.
    Returns the served accuracy.
    """
    with np.load(clone / "data" / "processed" / "validation.npz") as split:
        images, labels = split["images"][:TRAFFIC], split["labels"][:TRAFFIC]
    rows, right = ["request_id,position,digit"], 0
    for start in range(0, TRAFFIC, 100):
        body = json.dumps({"inputs": images[start : start + 100].tolist()}).encode()
        request = urllib.request.Request(
            "http://127.0.0.1:5000/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            request_id = answer.headers["X-Request-ID"]
            digits = [row["digit"] for row in json.load(answer)["predictions"]]
        truth = labels[start : start + 100].tolist()
        right += sum(int(a == b) for a, b in zip(digits, truth, strict=True))
        rows += [f"{request_id},{position},{digit}" for position, digit in enumerate(truth)]
    (clone / "labels.csv").write_text("\n".join(rows) + "\n")
    # The true digits come back later than the answers: after the server's
    # writer has put every row into the inference log (once a second).
    deadline = time.monotonic() + 120
    while logged_rows() < TRAFFIC:
        assert time.monotonic() < deadline, f"{logged_rows()} of {TRAFFIC} rows logged in 120 s"
        time.sleep(0.5)
    return right / TRAFFIC


def logged_rows() -> float:
    """The rows the model server says its inference log has written (its /metrics)."""
    with urllib.request.urlopen("http://127.0.0.1:5000/metrics", timeout=30) as answer:
        text = answer.read().decode()
    found = re.search(r"^mnist_serving_inference_log_rows_written_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def team_env(postgres) -> dict:
    """What the team page's first block exports (its `…` are a user's own passwords)."""
    # A database of its own: the team tests on this session's cluster use `mlflow`.
    command, env, _password = tracking_server(
        postgres, "mlflow_tour", "mlflow-team-artifacts", 5001
    )
    return {
        "MLFLOW_TRACKING_ADMIN_PASSWORD": env["MLFLOW_TRACKING_ADMIN_PASSWORD"],
        "MNIST_TEAM_POSTGRES_ADMIN_URI": command[command.index("--admin-uri") + 1],
        "MNIST_TEAM_BACKEND_STORE_URI": command[command.index("--backend-store-uri") + 1],
    }


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST mirror not found at {REAL_MNIST}")
def test_the_tour_and_the_runbooks_run_verbatim_with_nothing_activated(tmp_path, postgres):
    clone = fresh_clone(tmp_path)
    parts = documents()
    assert parts["tour"][0].commands[0] == "make repro"
    shell = Terminal(clone, user_env(tmp_path), tmp_path)
    try:
        shell.run_blocks(parts["tour"] + parts["scoring"])
        shell.stop_servers()
        transcript = "\n".join(shell.transcript)
        assert '"test_accuracy": 0.97' in transcript or '"test_accuracy": 0.98' in transcript
        assert "digit.png: 7 (probability" in transcript
        assert "wrote 10000 images in the batch format to scans.parquet" in transcript
        assert (clone / "predictions").is_dir() and (clone / "predictions-spark").is_dir()
        # The experiment ran in a temporary copy: the workspace's parameters are conf/'s.
        assert (clone / "params.yaml").read_text() == (REPO_ROOT / "params.yaml").read_text()

        monitoring = parts["monitoring"]
        recording = next(i for i, b in enumerate(monitoring) if "feedback record" in b.commands[0])
        shell.run_blocks(monitoring[:recording])
        assert "mnist_serving_requests_total{" in shell.transcript[-1]
        accuracy = send_traffic(clone)
        shell.run_blocks(monitoring[recording:])
        shell.stop_servers()
        transcript = "\n".join(shell.transcript)
        assert f"feedback: {TRAFFIC} matched, 0 unknown, 0 duplicated" in transcript
        assert f"accuracy {accuracy:.4f} on {TRAFFIC} rows with true digits" in transcript
        assert "report reports/monitoring/report.html" in transcript

        shell.run_blocks(parts["loop"])
        transcript = "\n".join(shell.transcript)
        assert "retrain: v" in transcript and "recent_accuracy  before" in transcript
        assert "feedback snapshot: 600 images with true digits" in transcript
        assert not run(["git", "status", "--porcelain", "dvc.lock"], clone, os.environ).stdout
        assert (tmp_path / "mnist-mlops-storage" / "files").is_dir()  # the default remote

        shell.env = {**shell.env, **team_env(postgres)}
        shell.run_blocks(parts["object store"])
        shell.stop_servers()
        assert "export AWS_ACCESS_KEY_ID=" in "\n".join(shell.transcript)
        assert "Everything is up to date." in shell.transcript[-1]
    finally:
        shell.stop_servers()
