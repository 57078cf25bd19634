"""The server follows the champion: a new version swaps in under load, a broken one is refused.

A real `mnist-mlops serve` of `models:/mnist-classifier@champion` on
127.0.0.1 with two worker processes, a champion trained by the real stages
on tiny data, 8 clients.
"""

import re
import shutil
import threading
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from mnist_mlops.monitoring.log_files import read_rows
from mnist_mlops.serving.follow import HINT_SECONDS
from mnist_mlops.tracking.registry import CHAMPION

from ..conftest import free_port, serving, subprocess_env, train_champion
from .test_observed import call, serve_command

MODEL = "mnist-classifier"
CLIENTS = 8
WORKERS = 2
# Longer than a swap takes here: a worker that waited for its own next look
# would answer with the old version for up to this long after the first swap.
FOLLOW_SECONDS = 10


class Load:
    """Clients that send one image after another and keep (version answering, status, when)."""

    def __init__(self, url: str, image) -> None:
        self.url, self.body = url, {"inputs": [image.tolist()]}
        self.answers: list[list[tuple[str, int, float]]] = [[] for _ in range(CLIENTS)]
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(number,)) for number in range(CLIENTS)
        ]

    def _client(self, number: int) -> None:
        while not self.stop.is_set():
            status, _answer, headers = call(self.url, "/invocations", self.body)
            version = headers.get("x-model-version", "")
            self.answers[number].append((version, status, time.monotonic()))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exception) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def seen(self, version: str) -> bool:
        return any(answer[0] == version for answers in self.answers for answer in answers)


def metric(url: str, name: str, **labels: str) -> float | None:
    _status, answer, _headers = call(url, "/metrics")
    for family in text_string_to_metric_families(answer["text"]):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def broken_copy(client: MlflowClient, version) -> str:
    """Register the champion's model again with its ONNX file cut short: it cannot load."""
    source = mlflow.artifacts.download_artifacts(version.source)
    run = client.get_run(version.run_id)
    target = f"{run.info.artifact_uri.removeprefix('file://')}/broken-model"
    shutil.copytree(source, target)
    (onnx_file,) = Path(target).rglob("*.onnx")
    with open(onnx_file, "r+b") as stream:
        stream.truncate(100)
    created = client.create_model_version(MODEL, target, run_id=version.run_id)
    return str(created.version)


def test_the_server_swaps_to_a_new_champion_under_load_and_refuses_a_broken_one(tmp_path):
    directory = tmp_path / "project"
    directory.mkdir()
    uri, images = train_champion(directory)
    log_dir = tmp_path / "log"
    port = free_port()
    command = serve_command(
        port, log_dir, "--follow-seconds", str(FOLLOW_SECONDS), "--workers", str(WORKERS)
    )
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    server_log = tmp_path / "server.log"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias(MODEL, CHAMPION)
    with (
        serving(command, env, f"http://127.0.0.1:{port}", "/ping", directory, server_log) as url,
        Load(url, images[0]) as load,
    ):
        wait_for(lambda: load.seen(f"{MODEL}/1"))
        wait_for(lambda: metric(url, "mnist_serving_worker_processes") == WORKERS)
        # A new version of the same classifier becomes champion (as evaluate would make it).
        second = client.create_model_version(MODEL, champion.source, run_id=champion.run_id)
        client.set_registered_model_alias(MODEL, CHAMPION, second.version)
        # Every worker on version 2: none still describes version 1.
        wait_for(lambda: metric(url, "mnist_serving_model_info", version="1") == 0)
        assert metric(url, "mnist_serving_model_swaps_total", outcome="swapped") == WORKERS
        # A broken version becomes champion: refused by each worker, version 2 keeps answering.
        broken = broken_copy(client, second)
        client.set_registered_model_alias(MODEL, CHAMPION, broken)
        refused = "mnist_serving_model_swaps_total"
        wait_for(lambda: metric(url, refused, outcome="refused") == WORKERS, 3 * FOLLOW_SECONDS)
        time.sleep(0.5)
        assert metric(url, "mnist_serving_model_swaps_total", outcome="swapped") == WORKERS
        assert metric(url, "mnist_serving_model_info", version="2") == 1
        status, _answer, headers = call(url, "/version")
        assert status == 200 and headers["x-model-version"] == f"{MODEL}/2"

    # No request failed; each client ended on version 2.
    every = [answer for answers in load.answers for answer in answers]
    assert len(every) > 100 and all(status == 200 for _version, status, _at in every)
    assert all(answers[-1][0] == f"{MODEL}/2" for answers in load.answers)
    # Two versions answered side by side only while the second worker loaded the new one:
    # it learned of the swap from the first within HINT_SECONDS, not at its own next look.
    text = server_log.read_text()
    loads = [float(took) for took in re.findall(r"checked on .*; loaded in ([\d.]+) s\)", text)]
    assert len(loads) == WORKERS, text
    first_new = min(at for version, _status, at in every if version == f"{MODEL}/2")
    last_old = max(at for version, _status, at in every if version == f"{MODEL}/1")
    assert last_old - first_new < HINT_SECONDS + max(loads) + 1, (last_old - first_new, loads)
    refusals = [line for line in text.splitlines() if "refused" in line]
    assert len(refusals) == WORKERS
    for refusal in refusals:
        assert refusal.startswith(f"mnist-mlops serve: refused {MODEL} v{broken}, still serving v2")
    # The inference log names the version that answered each row.
    rows = read_rows(log_dir)
    assert set(rows["model_version"].tolist()) == {"1", "2"}
    assert rows["model_version"][-1] == "2"
