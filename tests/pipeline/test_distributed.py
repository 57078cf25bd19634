"""Data-parallel training on Keras's JAX backend: real processes, real collectives, 127.0.0.1 only.

The stage is `python -m mnist_mlops train` as DVC runs it; the other
processes are `mnist-mlops train-worker` (or the stage's own local workers).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mnist_mlops.config import validate
from mnist_mlops.pipeline.evaluate import evaluate
from mnist_mlops.pipeline.fetch import fetch
from mnist_mlops.pipeline.preprocess import preprocess
from mnist_mlops.pipeline.worker import epoch_order, share

from ..conftest import (
    compose_config,
    descendants,
    free_port,
    run,
    subprocess_env,
    tcp_sockets,
    tiny_overrides,
)

pytest.importorskip("jax", reason="make install-jax")

DIGEST = re.compile(r"process (\d+)/\d+ done: weights sha256 ([0-9a-f]{64})")


def test_every_global_batch_is_split_evenly_and_completely():
    order = epoch_order(1000, seed=7, epoch=3)
    shares = [share(order, 128, process, 4) for process in range(4)]
    assert {len(rows) for rows in shares} == {(1000 // 128) * 32 + (1000 % 128) // 4}
    for batch in range(1000 // 128):
        together = np.concatenate([rows[batch * 32 : (batch + 1) * 32] for rows in shares])
        assert sorted(together) == sorted(order[batch * 128 : (batch + 1) * 128])
    used = np.concatenate(shares)
    assert len(set(used)) == len(used) == 1000 - 1000 % 4
    # The same global batches, and so the same training, for any number of processes.
    assert (epoch_order(1000, 7, 3) == order).all() and (epoch_order(1000, 7, 4) != order).any()


SEEDED = """
import json, random, sys
import numpy as np
from mnist_mlops.model.architectures import import_keras, set_random_seed

keras = import_keras()
def draws():
    return [random.random(), float(np.random.rand()), float(keras.random.uniform(()))]
set_random_seed(7)
ours, tensorflow = draws(), "tensorflow" in sys.modules
keras.utils.set_random_seed(7)
print(json.dumps({"ours": ours, "keras": draws(), "tensorflow": tensorflow}))
"""


def test_a_process_on_jax_is_seeded_as_keras_seeds_it_without_loading_tensorflow():
    """Keras's own seeding loads TensorFlow (5 CPU-seconds) into every JAX process."""
    env = subprocess_env(KERAS_BACKEND="jax")
    result = run([sys.executable, "-c", SEEDED], Path.cwd(), env)
    seeded = json.loads(result.stdout.splitlines()[-1])
    assert seeded["ours"] == seeded["keras"] and not seeded["tensorflow"], seeded


ON_TENSORFLOW = """
import json, sys
from mnist_mlops.model.architectures import import_keras

keras = import_keras()
during = sorted(name for name in ("jax", "sklearn", "matplotlib") if name in sys.modules)
import jax, matplotlib.pyplot, sklearn.base

then = [jax.__name__, matplotlib.pyplot.__name__, sklearn.base.__name__]
print(json.dumps({"backend": keras.backend.backend(), "during": during, "then": then}))
"""


def test_a_process_on_tensorflow_never_loads_jax_scikit_learn_or_pyplot_and_can_still_import_them():
    """What TensorFlow and Keras import as an option wherever installed (2 CPU-s a process)."""
    result = run([sys.executable, "-c", ON_TENSORFLOW], Path.cwd(), subprocess_env())
    loaded = json.loads(result.stdout.splitlines()[-1])
    then = ["jax", "matplotlib.pyplot", "sklearn.base"]
    assert loaded == {"backend": "tensorflow", "during": [], "then": then}, loaded


@pytest.fixture
def tiny_project(workdir, mirror):
    """Tiny fetched and preprocessed data, params.yaml for 2 processes on a free port."""
    raw = compose_config(
        *tiny_overrides(mirror),
        "train.epochs=3",
        "train.distributed.processes=2",
        f"train.distributed.coordinator=127.0.0.1:{free_port()}",
        "train.distributed.timeout_seconds=10",
    )
    config = validate(raw)
    fetch(config.data)
    preprocess(config)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return workdir, config


def stage_env(_directory: Path) -> dict:
    """The stage's environment: its MLflow store is the project's own mlflow.db."""
    return subprocess_env()


def one_run(directory: Path):
    client = MlflowClient(f"sqlite:///{directory / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "mnist"]
    (logged,) = client.search_runs([experiment.experiment_id])
    return client, logged


def worker_module(directory: Path, process: int, processes: int, coordinator: str, *more: str):
    command = [
        sys.executable,
        "-m",
        "mnist_mlops.pipeline.worker",
        "--params",
        "params.yaml",
        "--process-id",
        str(process),
        "--processes",
        str(processes),
        "--coordinator",
        coordinator,
        *more,
    ]
    return subprocess.Popen(
        command,
        cwd=directory,
        env=stage_env(directory),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.heavy
def test_two_processes_train_like_one_on_the_same_global_batches(tiny_project):
    directory, config = tiny_project
    coordinator = config.train.distributed.coordinator
    # Global batches of 8 (4 from each process): the 180 training images make 20 of them.
    raw = yaml.safe_load((directory / "params.yaml").read_text())
    raw["train"]["batch_size"] = 8
    (directory / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    alone = directory / "alone"
    together = directory / "together"
    alone.mkdir(), together.mkdir()
    one = worker_module(directory, 0, 1, coordinator, "--result", str(alone), "--steps", "20")
    assert one.wait(timeout=300) == 0, one.stderr.read()
    pair = [
        worker_module(directory, 0, 2, coordinator, "--result", str(together), "--steps", "20"),
        worker_module(directory, 1, 2, coordinator, "--steps", "20"),
    ]
    outputs = [process.communicate(timeout=300) for process in pair]
    assert [process.returncode for process in pair] == [0, 0], [err for _, err in outputs]

    # The same 20 global batches make the same weights in one process as in two.
    with np.load(alone / "weights.npz") as a, np.load(together / "weights.npz") as b:
        weights = [name for name in a.files if name.startswith("weight_")]
        assert weights and sorted(weights) == sorted(n for n in b.files if n.startswith("weight_"))
        largest = max(float(np.abs(a[name] - b[name]).max()) for name in weights)
        moved = max(float(np.abs(a[name]).max()) for name in weights)
    assert largest < 1e-6 and moved > 0
    # Both processes end with byte-identical weights.
    digests = dict(DIGEST.search(out).groups() for out, _ in outputs)
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]


@pytest.mark.heavy
def test_the_stage_with_two_local_processes_logs_one_run_and_evaluates_unchanged(tiny_project):
    directory, config = tiny_project
    command = [sys.executable, "-m", "mnist_mlops", "train", "--local-processes", "2"]
    with open(directory / "stage.log", "w+") as log:
        stage = subprocess.Popen(
            command, cwd=directory, env=stage_env(directory), stdout=log, stderr=log, text=True
        )
        seen: set[tuple[str, int]] = set()
        while stage.poll() is None:
            seen |= tcp_sockets(descendants(stage.pid))
            time.sleep(0.2)
        log.seek(0)
        output = log.read()
    assert stage.returncode == 0, output
    # Every socket of the stage and its processes (coordinator, gloo, MLflow's SQLite has
    # none) is on 127.0.0.1, the coordinator's port among them.
    assert seen and {host for host, _port in seen} == {"127.0.0.1"}, seen
    assert int(config.train.distributed.coordinator.rsplit(":", 1)[1]) in {p for _h, p in seen}

    client, logged = one_run(directory)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["train.distributed.processes"] == "2"
    assert logged.data.tags["train.backend"] == "jax"
    assert logged.data.tags["train.processes"] == "2"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        steps = [point.step for point in client.get_metric_history(logged.info.run_id, metric)]
        assert sorted(steps) == [0, 1, 2], (metric, steps)
    assert logged.data.metrics["onnx_max_probability_difference"] <= 1e-5
    # process 0's digest is the run's, and the model saved is the one trained.
    (digest,) = [d for p, d in DIGEST.findall(output) if p == "0"]
    assert logged.data.tags["train.weights_sha256"] == digest
    assert {p.name for p in (directory / "models").iterdir()} == {
        "model.keras",
        "model.onnx",
        "mlflow_run.json",
    }

    # evaluate and the gate see nothing different: the first version becomes the champion.
    metrics = evaluate(config)
    version = client.get_model_version_by_alias("mnist-classifier", "champion")
    assert version.run_id == logged.info.run_id and str(version.version) == "1"
    assert 0 < metrics["test_accuracy"] <= 1


def failed_stage(directory: Path, stage: subprocess.Popen, started: float, bound: float):
    output, errors = stage.communicate(timeout=bound)
    elapsed = time.monotonic() - started
    lines = [line for line in errors.splitlines() if line.startswith("mnist-mlops train")]
    _client, logged = one_run(directory)
    return stage.returncode, lines, elapsed, logged, output


@pytest.mark.heavy
def test_a_worker_killed_mid_fit_fails_the_stage_within_the_bound(tiny_project):
    directory, config = tiny_project
    raw = yaml.safe_load((directory / "params.yaml").read_text())
    raw["train"]["epochs"] = 200
    (directory / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = stage_env(directory)
    stage = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlops", "train"],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlops", "train-worker", "--process-id", "1"],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        # Wait for the first epoch on the worker's side, then kill it and its child outright.
        for line in worker.stdout:
            if "epoch 1/200" in line:
                break
        os.killpg(worker.pid, signal.SIGKILL)
        started = time.monotonic()
        status, lines, elapsed, logged, _output = failed_stage(directory, stage, started, 600)
    finally:
        stage.kill()
        worker.kill()
    assert status == 1
    assert len(lines) == 1 and "process 1" in lines[0], lines
    # What this guards is a stage that never notices (a collective waits for its peer
    # forever): the stage's 10 s of silence, then its teardown, about 15 s idle and 52 s
    # seen while a container build held both cores; 120 s holds at twice that.
    assert elapsed < config.train.distributed.timeout_seconds + 120
    assert logged.info.status == "FAILED"
    assert not (directory / "models").exists()


@pytest.mark.heavy
def test_a_worker_that_never_joins_fails_the_stage_within_the_bound(tiny_project):
    directory, config = tiny_project
    stage = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlops", "train"],
        cwd=directory,
        env=stage_env(directory),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The bound runs from the moment the stage starts waiting: its start-up (TensorFlow's
    # import) is the machine's business. What the bound guards is a hang; process 0's own
    # start (JAX's import) comes before its 10 s, hence the margin.
    before = []
    for line in stage.stdout:
        before.append(line)
        if "waiting up to" in line:
            break
    started = time.monotonic()
    status, lines, elapsed, logged, output = failed_stage(directory, stage, started, 120)
    output = "".join(before) + output
    assert status == 1
    assert lines == [
        "mnist-mlops train: data-parallel fit failed: not every process joined within 10 s: "
        "process 1 must run `mnist-mlops train-worker --coordinator "
        f"{config.train.distributed.coordinator} --process-id I --processes 2`"
    ]
    assert "waiting up to 10 s for process 1" in output
    assert elapsed < config.train.distributed.timeout_seconds + 60
    assert logged.info.status == "FAILED"
    assert not (directory / "models").exists()


def test_processes_on_other_data_or_settings_refuse_to_train_together(tiny_project):
    directory, _config = tiny_project
    raw = yaml.safe_load((directory / "params.yaml").read_text())
    # The worker must join for the mismatch to show: give its start all the time a busy
    # machine needs (the stage stops waiting the moment it joins).
    raw["train"]["distributed"]["timeout_seconds"] = 600
    (directory / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    raw["optimizer"]["learning_rate"] = 0.5
    (directory / "other.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = stage_env(directory)
    command = [sys.executable, "-m", "mnist_mlops", "train-worker", "--process-id", "1"]
    worker = subprocess.Popen(
        [*command, "--params", "other.yaml"],
        cwd=directory,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    stage = run([sys.executable, "-m", "mnist_mlops", "train"], directory, env, check=False)
    _output, worker_errors = worker.communicate(timeout=660)
    expected = (
        "process 1 would train on other data or settings than process 0 (data/processed or "
        "params.yaml differ): run every process on the same commit after `dvc pull`"
    )
    assert stage.returncode == 1 and worker.returncode == 1
    assert f"mnist-mlops train: data-parallel fit failed: {expected}" in stage.stderr.splitlines()
    assert f"mnist-mlops train-worker: {expected}" in worker_errors.splitlines()
    assert one_run(directory)[1].info.status == "FAILED"
    assert not (directory / "models").exists()


def test_a_worker_says_in_one_line_what_is_wrong(tiny_project):
    directory, _config = tiny_project
    env = stage_env(directory)
    command = [sys.executable, "-m", "mnist_mlops", "train-worker"]
    wrong_id = run([*command, "--process-id", "2"], directory, env, check=False)
    assert wrong_id.returncode == 2
    assert wrong_id.stderr.strip() == (
        "mnist-mlops train-worker: invalid config: --process-id must be 1 … 1 "
        "(0 is the train stage), got 2"
    )
    uneven = run([*command, "--process-id", "1", "--processes", "3"], directory, env, check=False)
    assert uneven.returncode == 2
    assert "must be a multiple of distributed.processes (3)" in uneven.stderr


@pytest.mark.heavy
def test_sigterm_on_the_stage_stops_its_local_workers_and_ends_the_run_killed(tiny_project):
    directory, _config = tiny_project
    raw = yaml.safe_load((directory / "params.yaml").read_text())
    raw["train"]["epochs"] = 200
    (directory / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    stage = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlops", "train", "--local-processes", "2"],
        cwd=directory,
        env=stage_env(directory),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in stage.stdout:
            if "epoch 1/200" in line:
                break
        family = descendants(stage.pid) - {stage.pid}
        workers = [
            pid for pid in family if b"pipeline.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 2, family
        stage.send_signal(signal.SIGTERM)
        assert stage.wait(timeout=60) == 130
    finally:
        stage.kill()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    _client, logged = one_run(directory)
    assert logged.info.status == "KILLED"
    assert not (directory / "models").exists()
