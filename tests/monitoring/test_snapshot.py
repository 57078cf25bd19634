"""`mnist-mlops feedback snapshot`: labelled traffic from a real inference log into a DVC repo."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings, save_feedback
from mnist_mlops.monitoring.snapshot import COLUMNS

from ..conftest import copy_project, run, subprocess_env
from .test_inference_log import answers_for, images


def log_traffic(log_dir, requests: dict, pixels: bool = True) -> None:
    """Serve-like traffic: each request's images through the real writer, one file per flush."""
    log = InferenceLog(LogSettings(log_dir, flush_seconds=0.02, pixels=pixels), "model", "1")
    for request_id, batch in requests.items():
        assert log.submit_rows(request_id, batch, answers_for(batch))
    log.close()


def snapshot_command(project, log_dir, check=True):
    command = [sys.executable, "-m", "mnist_mlops", "feedback", "snapshot", "--log-dir", log_dir]
    return run([str(part) for part in command], project, subprocess_env(), check=check)


@pytest.fixture
def project(tmp_path):
    project = copy_project(tmp_path / "clone")
    run(["dvc", "init", "-q", "-f"], project, subprocess_env())
    return project


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_snapshot_holds_exactly_the_labelled_images_once_and_is_tracked(project, tmp_path):
    log_dir = tmp_path / "log"
    first, second = images(3, seed=1), images(2, seed=2)
    repeat = first[:1]  # the same scan sent again, later, with the same true digit
    log_traffic(log_dir, {"a": first, "b": second, "c": repeat, "unlabelled": images(4, seed=3)})
    save_feedback(log_dir, [("a", 0, 7), ("a", 2, 1), ("b", 1, 4), ("c", 0, 7)])
    # The same true digit recorded twice for one image counts once.
    save_feedback(log_dir, [("b", 1, 4)])

    result = snapshot_command(project, log_dir)
    target = project / "data" / "feedback" / "feedback.npz"
    assert result.stdout.splitlines()[0] == (
        "feedback snapshot: 3 images with true digits in data/feedback/feedback.npz "
        "(3 new, 1 duplicates dropped, 0 logged without pixels skipped)"
    )
    with np.load(target, allow_pickle=False) as archive:
        snapshot = {name: archive[name] for name in archive.files}
    assert sorted(snapshot) == sorted(COLUMNS)
    assert snapshot["request_id"].tolist() == ["a", "a", "b"]
    assert snapshot["position"].tolist() == [0, 2, 1]
    assert snapshot["labels"].tolist() == [7, 1, 4] and snapshot["labels"].dtype == np.uint8
    assert np.array_equal(snapshot["images"][0], first[0].astype(np.uint8))
    assert np.array_equal(snapshot["images"][2], second[1].astype(np.uint8))
    assert np.all(np.diff(snapshot["time"]) >= 0)

    # DVC tracks it: the .dvc file names the file's md5 and the file is git-ignored.
    pointer = (project / "data" / "feedback" / "feedback.npz.dvc").read_text()
    assert hashlib.md5(target.read_bytes()).hexdigest() in pointer
    status = run(["git", "status", "--porcelain"], project, subprocess_env()).stdout
    assert "feedback.npz.dvc" in status and "feedback.npz\n" not in status
    assert run(["dvc", "status", str(target)], project, subprocess_env()).stdout.strip() in (
        "Data and pipelines are up to date.",
        "",
    )

    # The same feedback again: byte for byte the same snapshot, and nothing new for DVC.
    before = digest(target)
    again = snapshot_command(project, log_dir)
    assert "(0 new," in again.stdout and digest(target) == before

    # The log expires; the snapshot keeps what it held and adds what is new.
    for path in log_dir.iterdir():
        path.unlink()
    log_traffic(log_dir, {"d": images(1, seed=4)})
    save_feedback(log_dir, [("d", 0, 2)])
    grown = snapshot_command(project, log_dir)
    assert grown.stdout.startswith("feedback snapshot: 4 images with true digits")
    with np.load(target, allow_pickle=False) as archive:
        assert archive["request_id"].tolist() == ["a", "a", "b", "d"]


def test_bad_feedback_is_refused_in_one_line_and_the_snapshot_stays(project, tmp_path):
    log_dir = tmp_path / "log"
    log_traffic(log_dir, {"a": images(2, seed=1)})
    save_feedback(log_dir, [("a", 0, 3)])
    snapshot_command(project, log_dir)
    target = project / "data" / "feedback" / "feedback.npz"
    before = digest(target)

    # A true digit outside 0–9, written around the validated paths.
    save_feedback(log_dir, [("a", 1, 12)])
    result = snapshot_command(project, log_dir, check=False)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mnist-mlops feedback snapshot: ") and "outside 0–9" in line
    assert digest(target) == before
    assert not [path for path in target.parent.iterdir() if ".partial" in path.name]


def test_images_logged_without_pixels_are_counted_not_snapshotted(project, tmp_path):
    log_dir = tmp_path / "log"
    log_traffic(log_dir, {"private": images(2, seed=1)}, pixels=False)
    save_feedback(log_dir, [("private", 0, 3), ("private", 1, 5)])
    result = snapshot_command(project, log_dir)
    assert "0 images with true digits" in result.stdout
    assert "2 logged without pixels skipped" in result.stdout
    assert not (project / "data" / "feedback" / "feedback.npz").exists()


def test_a_killed_snapshot_leaves_the_previous_one(project, tmp_path):
    log_dir = tmp_path / "log"
    log_traffic(log_dir, {"a": images(1, seed=1)})
    save_feedback(log_dir, [("a", 0, 3)])
    snapshot_command(project, log_dir)
    target = project / "data" / "feedback" / "feedback.npz"
    before = digest(target)
    log_traffic(log_dir, {f"r{number}": images(50, seed=number) for number in range(40)})
    save_feedback(log_dir, [(f"r{number}", 0, 1) for number in range(40)])
    # Killed while writing: the writer's temporary file may remain, the snapshot does not change.
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITE, str(log_dir), str(target)], cwd=project
    )
    assert process.wait(timeout=120) == -9
    assert digest(target) == before


# Writes the snapshot and is SIGKILLed half-way through the zip.
KILLED_WRITE = """
import os, signal, sys, zipfile
from pathlib import Path
from mnist_mlops.monitoring import snapshot

real_open = zipfile.ZipFile.open
calls = []

def open_then_die(self, *arguments, **keywords):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_open(self, *arguments, **keywords)

zipfile.ZipFile.open = open_then_die
snapshot.snapshot(Path(sys.argv[1]), Path(sys.argv[2]))
"""
