"""One inference log for servers on many machines: the log on the team's object store.

Real SeaweedFS (`mnist-mlops object-store`), two real `mnist-mlops serve`
processes (two workers each) with `--log-dir s3://inference/team` and a
spool each, and the store restarted on its port while they answer.
"""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_mlops.monitoring.log_files import log_files, read_feedback, read_rows
from mnist_mlops.monitoring.log_store import S3Store
from mnist_mlops.team.object_store import keys_for

from ..conftest import free_port, run, subprocess_env, train_champion
from ..serving.test_observed import call, metrics, predict
from .test_object_store import free_port_run, object_store

LOG = "s3://inference/team"

pytestmark = pytest.mark.heavy


def serve(directory: Path, env: dict, spool: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        *(sys.executable, "-m", "mnist_mlops", "serve", "--port", str(port)),
        *("--log-dir", LOG, "--log-spool", str(spool), "--workers", "2"),
    ]
    output = open(spool.parent / f"{spool.name}.out", "w")  # noqa: SIM115 (closed with the test)
    process = subprocess.Popen(command, cwd=directory, env=env, stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, (spool.parent / f"{spool.name}.out").read_text()
        assert time.monotonic() < deadline, "the server did not answer in 120 s"
        try:
            if call(url, "/ping", None, {})[0] == 200:
                return process, url
        except OSError:
            time.sleep(0.2)


class Traffic:
    """One thread sending 2 images per request to each server in turn; who answered what."""

    def __init__(self, urls: list[str], images: np.ndarray) -> None:
        self.urls, self.images = urls, images
        self.answered: list[tuple[str, str]] = []  # (server URL, request id)
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._send)
        self.thread.start()

    def _send(self) -> None:
        turn = 0
        while not self.stop.is_set():
            url = self.urls[turn % len(self.urls)]
            turn += 1
            # Each request's images unique (a corner pixel numbers them), as people's are.
            batch = self.images[turn % 8 : turn % 8 + 2].copy()
            batch[:, 0, 0], batch[:, 0, 1] = turn % 256, [turn // 256, 255 - turn // 256]
            try:
                request_id, _digits = predict(url, batch)
                self.answered.append((url, request_id))
            except (OSError, AssertionError) as error:
                self.failures.append(repr(error))
            time.sleep(0.01)

    def join(self) -> list[tuple[str, str]]:
        self.stop.set()
        self.thread.join(timeout=60)
        return self.answered


def send_feedback(url: str, request_id: str, digits: list[int]) -> dict:
    """POST /feedback until the log holds the request (404 says: try again), at most 60 s."""
    deadline = time.monotonic() + 60
    while True:
        status, answer, _headers = call(
            url, "/feedback", {"request_id": request_id, "digits": digits}, {}
        )
        if status != 404 or time.monotonic() > deadline:
            assert status == 200, answer
            return answer
        time.sleep(0.5)


def test_two_servers_one_log_on_the_store_through_a_restart_every_row_once(tmp_path):
    directory = tmp_path / "project"
    directory.mkdir()
    uri, images = train_champion(directory)
    port = free_port_run()
    with object_store(tmp_path, port) as (endpoint, secret, _process, _port):
        env = subprocess_env(
            MLFLOW_TRACKING_URI=uri,
            AWS_ENDPOINT_URL=endpoint,
            **keys_for(secret, "serving").environment(),
        )
        spools = [tmp_path / "spool-a", tmp_path / "spool-b"]
        (a, url_a), (b, url_b) = (serve(directory, env, spool) for spool in spools)
        try:
            traffic = Traffic([url_a, url_b], images.astype(np.float32))
            time.sleep(3)
            # Feedback for requests A answered, sent to B, which did not answer them.
            early = [rid for url, rid in traffic.answered if url == url_a][:5]
            for request_id in early:
                assert send_feedback(url_b, request_id, [1, 2])["recorded"] == 2
        except BaseException:
            a.kill(), b.kill()
            raise
    # The store is away: the servers keep answering, their files wait in the spools.
    time.sleep(3)
    assert not traffic.failures, traffic.failures[:3]
    assert any(spool.is_dir() and any(spool.glob("rows-*.npz")) for spool in spools)
    with object_store(tmp_path, port) as (endpoint, secret, _process, _port):
        try:
            time.sleep(3)
            # The store was away: the passes it refused are counted.
            counted = metrics(url_a)
            assert counted[("mnist_serving_inference_log_ship_failures_total", ())] > 0
            assert counted[("mnist_serving_inference_log_files_shipped_total", ())] > 0
            answered = traffic.join()
            assert not traffic.failures, traffic.failures[:3]
            late = [rid for url, rid in answered if url == url_a][-5:]
            for request_id in late:
                assert send_feedback(url_b, request_id, [3, 4])["recorded"] == 2
            # Sent again to the same server: a duplicate. To the other: recorded there,
            # and the readers keep the first (checked below).
            assert send_feedback(url_b, late[0], [3, 4])["duplicate"] is True
            assert send_feedback(url_a, late[0], [5, 6])["recorded"] == 2
            time.sleep(0.5)
        finally:
            for server in (a, b):
                server.send_signal(signal.SIGTERM)
            for server in (a, b):
                assert server.wait(timeout=60) == -signal.SIGTERM
        # SIGTERM flushed and shipped everything: the spools are empty.
        assert not [path for spool in spools for path in spool.glob("*.npz")]

        log_env = {"AWS_ENDPOINT_URL": endpoint, **keys_for(secret, "serving").environment()}
        with pytest.MonkeyPatch.context() as patch:
            for name, value in log_env.items():
                patch.setenv(name, value)
            rows = read_rows(LOG)
            truth = read_feedback(LOG)
            files = log_files(S3Store(LOG), "rows")
        logged = rows["request_id"].tolist()
        # Every answered image once: two rows per request, none twice, none missing.
        assert sorted(logged) == sorted(rid for _url, rid in answered for _ in range(2))
        writers = {file.name.split("-")[1].split(".")[1] for file in files}
        assert len(writers) == 4, writers  # two servers × two workers
        assert truth == {
            **{(rid, position): [1, 2][position] for rid in early for position in (0, 1)},
            **{(rid, position): [3, 4][position] for rid in late for position in (0, 1)},
        }

        # The commands read it as they read a folder, and `feedback record` writes to it.
        cli_env = subprocess_env(MLFLOW_TRACKING_URI=uri, **log_env)
        by_b = next(rid for url, rid in answered if url == url_b)
        labels = tmp_path / "labels.csv"
        labels.write_text(f"request_id,position,digit\n{by_b},0,7\n{by_b},1,8\nnone,0,1\n")
        record = [sys.executable, "-m", "mnist_mlops", "feedback", "record", str(labels)]
        recorded = run([*record, "--log-dir", LOG], directory, cli_env)
        assert recorded.stdout.strip() == "feedback: 2 matched, 1 unknown, 0 duplicated"
        again = run([*record, "--log-dir", LOG], directory, cli_env)
        assert again.stdout.strip() == "feedback: 0 matched, 1 unknown, 2 duplicated"
        early.append(by_b)  # two more true digits for the monitor and the snapshot
        reports = tmp_path / "reports"
        monitor = run(
            [
                *(sys.executable, "-m", "mnist_mlops", "monitor", "--log-dir", LOG),
                *("--reports-dir", str(reports), "--min-rows", "10"),
            ],
            directory,
            cli_env,
            check=False,
        )
        summary = json.loads((reports / "summary.json").read_text())
        assert summary["rows"] == len(logged), monitor.stdout + monitor.stderr
        assert summary["accuracy"]["rows"] == 2 * len(early + late)
        run(["dvc", "init", "--no-scm", "-q"], directory, cli_env)
        snapshot = run(
            [sys.executable, "-m", "mnist_mlops", "feedback", "snapshot", "--log-dir", LOG],
            directory,
            cli_env,
        )
        assert snapshot.stdout.startswith(
            f"feedback snapshot: {2 * len(early + late)} images with true digits"
        ), snapshot.stdout
        trace = run(
            [sys.executable, "-m", "mnist_mlops", "lineage", late[0], "--log-dir", LOG],
            directory,
            cli_env,
            check=False,
        )
        assert late[0] in trace.stdout, trace.stdout + trace.stderr
