"""`mnist-mlops score`: a Parquet dataset through one registered version, locally and on Spark.

The champion is trained by the real stages on tiny data; Spark is real:
`local[2]`, and a standalone master and worker started here on 127.0.0.1.
"""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from ..conftest import (
    command_lines,
    descendants,
    free_port,
    run,
    subprocess_env,
    tcp_sockets,
    train_champion,
)

MODEL = "mnist-classifier"
# A driver that does not know the cluster's secret, trying to run a job on it.
ANONYMOUS_DRIVER = """
import sys
from pyspark.sql import SparkSession
session = SparkSession.builder.master(sys.argv[1]).config("spark.authenticate", "false")
session.getOrCreate().range(1).count()
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A project folder whose store holds a champion; (folder, env, test images, test labels)."""
    directory = tmp_path_factory.mktemp("batch")
    uri, images = train_champion(directory)
    with np.load(directory / "data" / "processed" / "test.npz") as test:
        labels = test["labels"]
    return directory, subprocess_env(MLFLOW_TRACKING_URI=uri), images, labels


def batch_file(path: Path, images: np.ndarray, extra_rows=()) -> Path:
    """The batch format: ids 0…N−1 with the images' bytes, then the extra (id, bytes) rows."""
    ids = list(range(len(images))) + [row_id for row_id, _ in extra_rows]
    blobs = [image.tobytes() for image in images] + [blob for _, blob in extra_rows]
    table = pa.table({"id": pa.array(ids, pa.int64()), "image": pa.array(blobs, pa.binary())})
    pq.write_table(table, path)
    return path


BAD_ROWS = [(1000, b"\x00" * 100), (1001, None), (None, b"\x00" * 784)]


def score(store, *arguments: str, check: bool = True, env: dict | None = None):
    directory, store_env, _images, _labels = store
    command = [sys.executable, "-m", "mnist_mlops", "score", *arguments]
    return run(command, directory, env or store_env, check=check)


def read_output(path: Path) -> dict:
    table = ds.dataset(path, format="parquet").to_table().sort_by("id")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def probabilities(output: dict) -> np.ndarray:
    return np.stack([output[f"probability_{digit}"] for digit in range(10)], axis=1)


def rejected(path: Path) -> dict:
    table = ds.dataset(path / "_rejected", format="parquet").to_table()
    return dict(
        zip(table.column("id").to_pylist(), table.column("reason").to_pylist(), strict=True)
    )


@contextmanager
def standalone_cluster(tmp_path: Path):
    """`mnist-mlops spark-cluster` on free ports; yields the master's URL, the cluster's pid,
    the environment that holds its secret, and its UI's port, once a worker is in."""
    port, ui, worker_ui = free_port(), free_port(), free_port()
    command = [
        *(sys.executable, "-m", "mnist_mlops", "spark-cluster", "--port", str(port)),
        *("--ui-port", str(ui), "--worker-ui-port", str(worker_ui), "--memory", "1g"),
    ]
    env = subprocess_env(MNIST_SPARK_SECRET_FILE=str(tmp_path / "spark.secret"))
    log = tmp_path / "cluster.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while f"spark://127.0.0.1:{port} with one worker" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert master_state(ui)["aliveworkers"] == 1
        yield f"spark://127.0.0.1:{port}", process.pid, env, ui
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0, log.read_text()


def watch_command_lines():
    """Read every process's command line until the returned function is called; it returns them."""
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(command_lines().splitlines())
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def finish() -> str:
        stop.set()
        watcher.join()
        return "\n".join(seen)

    return finish


def master_state(ui_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json", timeout=5) as answer:
        return json.load(answer)


@pytest.mark.heavy
def test_local_and_spark_agree_and_bad_rows_are_rejected(store, tmp_path):
    _directory, _env, images, labels = store
    source = batch_file(tmp_path / "batch.parquet", images, BAD_ROWS)
    local = score(store, str(source), str(tmp_path / "local"))
    line = local.stdout.strip().splitlines()[-1]
    assert line.startswith(f"scored {len(images)} images, rejected 3, ")
    assert "(local; " in line and f"with {MODEL} v1 → " in line

    spark = score(
        store, str(source), str(tmp_path / "spark"), "--engine", "spark", "--master", "local[2]"
    )
    assert (
        spark.stdout.strip().splitlines()[-1].startswith(f"scored {len(images)} images, rejected 3")
    )
    # Spark's logs stay out of the way: only the JVM's own notice of its vector module remains.
    noise = [line for line in spark.stderr.splitlines() if "WARN" in line or "Warning" in line]
    assert noise == ["WARNING: Using incubator modules: jdk.incubator.vector"], noise

    ours, theirs = read_output(tmp_path / "local"), read_output(tmp_path / "spark")
    assert ours["id"].tolist() == theirs["id"].tolist() == list(range(len(images)))
    assert np.array_equal(ours["digit"], theirs["digit"])
    assert np.abs(probabilities(ours) - probabilities(theirs)).max() <= 1e-6
    assert (ours["digit"] == labels).mean() >= 0.9
    assert set(ours["model_version"]) == set(theirs["model_version"]) == {"1"}
    assert set(ours["model_name"]) == {MODEL}
    for output in ("local", "spark"):
        assert rejected(tmp_path / output) == {
            1000: "image of 100 bytes, expected 784",
            1001: "null image",
            None: "null id",
        }

    # Each job is a run of its own experiment, with the version and the counts.
    client = MlflowClient(store[1]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mnist-batch-scoring")
    runs = client.search_runs([experiment.experiment_id])
    assert {run.data.params["engine"] for run in runs} >= {"local", "spark"}
    for logged in runs:
        assert logged.data.params["model.version"] == "1"
        assert logged.data.metrics["rows_scored"] == len(images)
        assert logged.data.metrics["rows_rejected"] == 3
        shares = [logged.data.metrics[f"digit_share_{digit}"] for digit in range(10)]
        assert sum(shares) == pytest.approx(1.0)


@pytest.mark.heavy
def test_a_standalone_cluster_scores_the_same(store, tmp_path):
    _directory, _env, images, _labels = store
    source = batch_file(tmp_path / "batch.parquet", images, BAD_ROWS[:1])
    score(store, str(source), str(tmp_path / "local"))
    with standalone_cluster(tmp_path) as (master, cluster, env, ui):
        secret = (tmp_path / "spark.secret").read_text().strip()
        seen = watch_command_lines()
        result = score(
            store,
            *(str(source), str(tmp_path / "cluster"), "--engine", "spark", "--master", master),
            env={**store[1], "MNIST_SPARK_SECRET_FILE": env["MNIST_SPARK_SECRET_FILE"]},
        )
        shown = seen()
        # The driver, the master, the worker and the executor all ran, none with the secret in argv.
        assert "SparkSubmit" in shown and "CoarseGrainedExecutorBackend" in shown
        assert secret not in shown
        assert [app["name"] for app in master_state(ui)["completedapps"]] == ["mnist-mlops score"]
        # No route to run code without the secret: no REST submission server,
        # every listening socket on 127.0.0.1, and a driver without the secret
        # never gets an application registered (so never an executor).
        listening = tcp_sockets(descendants(cluster), listening=True)
        assert {address for address, _port in listening} == {"127.0.0.1"}
        assert 6066 not in {port for _address, port in listening}
        stranger = subprocess.Popen(
            [sys.executable, "-c", ANONYMOUS_DRIVER, master],
            env={key: value for key, value in store[1].items() if key != "_SPARK_AUTH_SECRET"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and stranger.poll() is None:
                assert master_state(ui)["activeapps"] == []
                time.sleep(1)
        finally:
            stranger.kill()
            stranger.wait()
        assert len(master_state(ui)["completedapps"]) == 1
    assert (tmp_path / "spark.secret").stat().st_mode & 0o777 == 0o600
    assert f"(spark {master}; " in result.stdout
    ours, theirs = read_output(tmp_path / "local"), read_output(tmp_path / "cluster")
    assert np.array_equal(ours["digit"], theirs["digit"])
    assert np.abs(probabilities(ours) - probabilities(theirs)).max() <= 1e-6
    assert rejected(tmp_path / "cluster") == {1000: "image of 100 bytes, expected 784"}


@pytest.mark.heavy
def test_output_is_atomic_and_only_overwritten_when_asked(store, tmp_path):
    _directory, _env, images, _labels = store
    source = batch_file(tmp_path / "batch.parquet", np.tile(images, (4000, 1, 1)))
    output = tmp_path / "out"
    # Killed half-way: no OUTPUT, not even a partial one under its name.
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlops", "score", str(source), str(output)],
        cwd=store[0],
        env=store[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*/part-00000.parquet")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not output.exists()

    small = batch_file(tmp_path / "small.parquet", images[:5])
    score(store, str(small), str(output))
    again = score(store, str(small), str(output), check=False)
    assert again.returncode == 2
    assert (
        again.stderr.strip()
        == f"mnist-mlops score: {output} exists: pass --overwrite to replace it"
    )
    score(
        store, str(batch_file(tmp_path / "three.parquet", images[:3])), str(output), "--overwrite"
    )
    assert len(read_output(output)["id"]) == 3


@pytest.mark.heavy
def test_the_alias_is_resolved_once_at_the_start(store, tmp_path):
    directory, env, images, _labels = store
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    source = batch_file(tmp_path / "batch.parquet", images)
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "mnist_mlops", "score", str(source), str(tmp_path / "out")),
            *("--engine", "spark", "--master", "local[1]"),
        ],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        experiment = None
        deadline = time.monotonic() + 120
        # The job logs the version it resolved first; then the champion moves.
        while True:
            experiment = experiment or client.get_experiment_by_name("mnist-batch-scoring")
            if experiment and any(
                run.info.status == "RUNNING"
                for run in client.search_runs([experiment.experiment_id])
            ):
                break
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        moved = client.create_model_version(MODEL, champion.source, run_id=champion.run_id)
        client.set_registered_model_alias(MODEL, "champion", moved.version)
        output, errors = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
        client.set_registered_model_alias(MODEL, "champion", champion.version)
    assert process.returncode == 0, errors
    assert f"with {MODEL} v{champion.version} → " in output
    assert set(read_output(tmp_path / "out")["model_version"]) == {str(champion.version)}


def test_bad_input_and_a_missing_engine_fail_in_one_line(store, tmp_path):
    _directory, env, images, _labels = store
    source = batch_file(tmp_path / "batch.parquet", images[:3])
    missing = score(store, str(tmp_path / "nothing.parquet"), str(tmp_path / "a"), check=False)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"id": [1], "pixels": [b"\x00" * 784]}), wrong)
    schema = score(store, str(wrong), str(tmp_path / "b"), check=False)
    text = tmp_path / "text.parquet"
    text.write_text("not parquet")
    started = time.monotonic()
    garbage = score(store, str(text), str(tmp_path / "c"), check=False)
    # What the command costs to start and refuse, on this machine at this moment.
    refusal_seconds = time.monotonic() - started
    closed = f"spark://127.0.0.1:{free_port()}"
    started = time.monotonic()
    no_master = score(
        store,
        str(source),
        str(tmp_path / "d"),
        "--engine",
        "spark",
        "--master",
        closed,
        check=False,
    )
    no_master_seconds = time.monotonic() - started
    no_java_env = {**env, "PATH": str(Path(sys.executable).parent) + ":/nonexistent"}
    no_java_env.pop("JAVA_HOME", None)
    no_java = score(
        store, str(source), str(tmp_path / "e"), "--engine", "spark", check=False, env=no_java_env
    )
    for result, expected in (
        (missing, "nothing.parquet: no such file or folder"),
        (schema, "no column image"),
        (garbage, "not a Parquet dataset"),
        (no_master, f"no Spark master answers at {closed}"),
        (no_java, "the spark engine needs Java 17 and found none"),
    ):
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("mnist-mlops score: ") and expected in line, line
    # A closed master is refused at once (one connection attempt, 5 s at most), not after
    # Spark's own retries: the command's own start, the attempt, and a margin.
    assert no_master_seconds < 2 * refusal_seconds + 5 + 15, (no_master_seconds, refusal_seconds)
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_batch_input_from_an_npz_and_a_folder_of_images(store, tmp_path):
    from PIL import Image

    directory, env, images, labels = store
    npz = directory / "data" / "processed" / "test.npz"
    command = [sys.executable, "-m", "mnist_mlops", "batch-input"]
    result = run([*command, str(npz), str(tmp_path / "from-npz.parquet")], directory, env)
    assert result.stdout.strip().endswith(
        f"wrote {len(images)} images in the batch format to {tmp_path / 'from-npz.parquet'}"
    )
    table = pq.read_table(tmp_path / "from-npz.parquet")
    assert table.column("id").to_pylist() == list(range(len(images)))
    assert table.column("image")[0].as_py() == images[0].tobytes()
    assert table.column("label").to_pylist() == labels.tolist()

    folder = tmp_path / "scans"
    folder.mkdir()
    for index in range(3):
        # Dark ink on white paper, larger than 28×28, as a scanner gives it.
        Image.fromarray(255 - images[index]).resize((84, 84)).save(folder / f"scan-{index}.png")
    run([*command, str(folder), str(tmp_path / "scans.parquet")], directory, env)
    # The champion named by its MLflow 3 model id scores as well as by its alias.
    champion = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(
        "mnist-classifier", "champion"
    )
    assert champion.source.startswith("models:/m-")
    scans = (str(tmp_path / "scans.parquet"), str(tmp_path / "scans-out"))
    scored = score(store, *scans, "--model-uri", champion.source)
    assert scored.stdout.strip().splitlines()[-1].startswith("scored 3 images, rejected 0")
    output = ds.dataset(tmp_path / "scans-out", format="parquet").to_table()
    assert sorted(output.column("id").to_pylist()) == ["scan-0.png", "scan-1.png", "scan-2.png"]

    bad = run(
        [*command, str(tmp_path / "none.npz"), str(tmp_path / "x.parquet")],
        directory,
        env,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.strip().endswith("none.npz: no such file or folder")
