"""The served model observed: /metrics, request ids, the inference log and feedback, over real HTTP.

Every server here is `mnist-mlops serve` on a champion trained by the real
stages on tiny data, on 127.0.0.1.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from mnist_mlops.monitoring.features import image_features
from mnist_mlops.monitoring.inference_log import REQUEST_ID
from mnist_mlops.monitoring.log_files import log_files, read_feedback, read_rows
from mnist_mlops.serving.exchange import new_request_id

from ..conftest import free_port, listeners_of, run, serving, subprocess_env, train_champion

MAX_BATCH = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("observed")
    uri, images = train_champion(directory, f"serving.max_batch_size={MAX_BATCH}")
    return directory, uri, images


def serve_command(port: int, log_dir: Path, *options: str) -> list[str]:
    return [
        *(sys.executable, "-m", "mnist_mlops", "serve", "--port", str(port)),
        *("--log-dir", str(log_dir), *options),
    ]


@pytest.fixture(scope="module")
def replicas(store, tmp_path_factory):
    """Two servers of the champion writing into one inference log; yields their URLs and the log."""
    directory, uri, _images = store
    log_dir = tmp_path_factory.mktemp("shared-log")
    ports = [free_port(), free_port()]
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    first, second = (serve_command(port, log_dir) for port in ports)
    with (
        serving(first, env, f"http://127.0.0.1:{ports[0]}", "/ping", directory) as url_a,
        serving(second, env, f"http://127.0.0.1:{ports[1]}", "/ping", directory) as url_b,
    ):
        yield url_a, url_b, log_dir


def call(url: str, path: str, body=None, headers=None) -> tuple[int, dict, dict]:
    """POST `body` as JSON (GET without one); return the status, the JSON answer and the headers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}{path}", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            text = answer.read().decode()
            status, answer_headers = answer.status, dict(answer.headers)
    except urllib.error.HTTPError as error:
        text, status, answer_headers = error.read().decode(), error.code, dict(error.headers)
    return status, (json.loads(text) if text.startswith("{") else {"text": text}), answer_headers


def predict(url: str, images: np.ndarray, request_id: str | None = None) -> tuple[str, list[int]]:
    headers = {"X-Request-ID": request_id} if request_id else {}
    status, answer, answer_headers = call(url, "/invocations", {"inputs": images.tolist()}, headers)
    assert status == 200, answer
    if request_id and REQUEST_ID.match(request_id):
        assert answer_headers["x-client-request-id"] == request_id
    else:
        assert "x-client-request-id" not in answer_headers
    return answer_headers["x-request-id"], [row["digit"] for row in answer["predictions"]]


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def rows_of(log_dir: Path, request_ids: set[str], expected: int, seconds: float = 10) -> dict:
    """The logged rows of these requests, once all `expected` of them are on disk."""
    deadline = time.monotonic() + seconds
    while True:
        rows = read_rows(log_dir)
        if rows:
            mine = np.isin(rows["request_id"], list(request_ids))
            if mine.sum() >= expected or time.monotonic() > deadline:
                return {name: values[mine] for name, values in rows.items()}
        elif time.monotonic() > deadline:
            return {}
        time.sleep(0.2)


def test_metrics_count_exactly_what_was_served(store, replicas):
    _directory, uri, images = store
    url = replicas[0]
    before = metrics(url)
    digits = []
    for start in range(0, 8, 2):
        digits += predict(url, images[start : start + 2])[1]
    for bad in ({"inputs": [[[300] * 28] * 28]}, {"inputs": [[1, 2]]}, {"nothing": 1}):
        assert call(url, "/invocations", bad)[0] == 400
    # The other worker's counts arrive within its flush (FLUSH_SECONDS).
    deadline = time.monotonic() + 30
    latency = "mnist_serving_request_duration_seconds_count"
    while True:
        after = metrics(url)
        done = value(after, latency, path="/invocations") - value(
            before, latency, path="/invocations"
        )
        if done >= 7 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    count = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert count("mnist_serving_requests_total", path="/invocations", status="200") == 4
    assert count("mnist_serving_requests_total", path="/invocations", status="400") == 3
    for digit in range(10):
        assert count("mnist_serving_predictions_total", digit=str(digit)) == digits.count(digit)
    assert count("mnist_serving_top_probability_count") == 8
    assert count("mnist_serving_request_duration_seconds_count", path="/invocations") == 7
    champion = MlflowClient(uri).get_model_version_by_alias("mnist-classifier", "champion")
    info = {
        dict(labels)["version"]: dict(labels)
        for (name, labels), _ in after.items()
        if name == "mnist_serving_model_info"
    }
    assert info[str(champion.version)]["run_id"] == champion.run_id
    assert info[str(champion.version)]["runtime"] == "onnx"


def test_the_log_holds_exactly_the_rows_sent_with_the_ids_returned(store, replicas):
    _directory, _uri, images = store
    url_a, url_b, log_dir = replicas
    # The id that names a request is always the server's; the client's own is kept beside it.
    given, _ = predict(url_a, images[:3], request_id="client-chosen-1")
    assert given != "client-chosen-1" and len(given) == 32
    generated, _ = predict(url_b, images[3:5], request_id="not a valid id!")
    assert generated != "not a valid id!" and len(generated) == 32
    rows = rows_of(log_dir, {given, generated}, 5)
    assert sorted(rows["request_id"].tolist()) == sorted([given] * 3 + [generated] * 2)
    clients = dict(
        zip(rows["request_id"].tolist(), rows["client_request_id"].tolist(), strict=True)
    )
    assert clients == {given: "client-chosen-1", generated: ""}
    for request_id, sent in ((given, images[:3]), (generated, images[3:5])):
        mine = rows["request_id"] == request_id
        assert rows["position"][mine].tolist() == list(range(len(sent)))
        assert np.array_equal(rows["pixels"][mine], sent.astype(np.uint8))
        assert np.allclose(rows["features"][mine], image_features(sent))
    # Both replicas wrote into the folder, each under its own name.
    writers = {path.name.split("-")[1] for path in log_files(log_dir, "rows")}
    assert len(writers) >= 2
    written = value(metrics(url_a), "mnist_serving_inference_log_rows_written_total")
    assert written >= 3


def test_feedback_by_endpoint_joins_to_the_logged_rows(store, replicas):
    _directory, _uri, images = store
    url_a, url_b, log_dir = replicas
    request_id, _digits = predict(url_a, images[:2])
    rows_of(log_dir, {request_id}, 2)
    # Feedback may reach another replica than the one that answered.
    status, answer, _ = call(url_b, "/feedback", {"request_id": request_id, "digits": [3, 7]})
    assert (status, answer["recorded"], answer["duplicate"]) == (200, 2, False)
    status, answer, _ = call(url_b, "/feedback", {"request_id": request_id, "digits": [3, 7]})
    assert (status, answer["recorded"], answer["duplicate"]) == (200, 0, True)
    deadline = time.monotonic() + 10
    while (request_id, 1) not in read_feedback(log_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    truth = read_feedback(log_dir)
    assert truth[(request_id, 0)] == 3 and truth[(request_id, 1)] == 7

    # An id as a server issues them that none answered: refused once every writer has marked
    # that it wrote what it held when the feedback came, not after the whole wait for a replica.
    unknown = new_request_id()
    status, answer, _ = call(url_b, "/feedback", {"request_id": unknown, "digits": [1]})
    assert status == 404 and "every writer has written what it held" in answer["message"], answer
    marks = {path.name.removeprefix("written-") for path in log_dir.glob("written-*")}
    writers = {path.name.split("-")[1] for path in log_files(log_dir, "rows")}
    assert len(marks) == 2 and writers <= marks, (marks, writers)  # one per server process

    refusals = [
        ({"request_id": "never-seen", "digits": [1]}, 404, "no request 'never-seen'"),
        ({"request_id": request_id, "digits": [1]}, 400, "had 2 image(s); got 1 digit(s)"),
        ({"request_id": request_id, "digits": [1, 10]}, 400, "integer in 0–9, got 10"),
        ({"request_id": request_id, "digits": [1, True]}, 400, "integer in 0–9, got True"),
        ({"request_id": request_id}, 400, "expected {"),
    ]
    for body, expected_status, message in refusals:
        status, answer, _ = call(url_a, "/feedback", body)
        assert status == expected_status and message in answer["message"], answer
    assert call(url_a, "/feedback")[0] == 405


def test_feedback_from_a_csv_reports_matched_unknown_and_duplicated(store, replicas, tmp_path):
    directory, _uri, images = store
    url_a, _url_b, log_dir = replicas
    request_id, _ = predict(url_a, images[:3])
    rows_of(log_dir, {request_id}, 3)
    call(url_a, "/feedback", {"request_id": request_id, "digits": [1, 2, 3]})
    other, _ = predict(url_a, images[3:5])
    rows_of(log_dir, {other}, 2)
    time.sleep(1.5)  # the endpoint's feedback reaches the disk
    labels = tmp_path / "labels.csv"
    labels.write_text(
        f"request_id,position,digit\n{other},0,4\n{other},1,5\n"
        f"{request_id},0,9\nmissing,0,1\n{other},7,1\n"
    )
    command = [
        sys.executable,
        "-m",
        "mnist_mlops",
        "feedback",
        "record",
        str(labels),
        "--log-dir",
        str(log_dir),
    ]
    result = run(command, directory, subprocess_env())
    assert result.stdout.strip() == "feedback: 2 matched, 2 unknown, 1 duplicated"
    truth = read_feedback(log_dir)
    assert truth[(other, 0)] == 4 and truth[(other, 1)] == 5 and truth[(request_id, 0)] == 1

    before = sorted(path.name for path in log_files(log_dir, "feedback"))
    labels.write_text(f"request_id,position,digit\n{other},0,4\n{other},1,12\n")
    result = run(command, directory, subprocess_env(), check=False)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"mnist-mlops feedback record: {labels}:3: the digit must be in 0–9, got '12'"
    )
    assert sorted(path.name for path in log_files(log_dir, "feedback")) == before


def test_a_bare_server_has_neither_metrics_nor_a_log(store, tmp_path):
    directory, uri, images = store
    port, log_dir = free_port(), tmp_path / "log"
    command = serve_command(port, log_dir, "--no-metrics", "--no-log", "--follow-seconds", "0")
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping", directory) as url:
        status, _answer, _headers = call(url, "/invocations", {"inputs": images[:1].tolist()})
        assert status == 200
        assert call(url, "/metrics")[0] == 404
        # The request limits hold without metrics or a log too.
        too_many = {"inputs": [[0]] * (MAX_BATCH * 100)}
        status, answer, _headers = call(url, "/invocations", too_many)
        assert status == 400 and f"more than {MAX_BATCH} images" in answer["message"]
        assert call(url, "/feedback", {"request_id": "any", "digits": [1]})[0] == 404
    assert not log_dir.exists()


def test_an_unwritable_log_never_fails_a_request(store, tmp_path):
    directory, uri, images = store
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    port, output = free_port(), tmp_path / "server.log"
    command = serve_command(port, blocker / "log")
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping", directory, output) as url:
        for _ in range(3):
            predict(url, images[:2])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            dropped = value(metrics(url), "mnist_serving_inference_log_rows_dropped_total")
            if dropped >= 6:
                break
            time.sleep(0.2)
    assert dropped == 6
    # At most one warning a minute from each worker process (a worker per core), each
    # naming the log's folder; the one that dropped the rows says so.
    warnings = [line for line in output.read_text().splitlines() if "warning" in line]
    assert 1 <= len(warnings) <= len(os.sched_getaffinity(0)), warnings
    assert all(f"the inference log: [Errno 20] Not a directory: '{blocker}" in w for w in warnings)
    assert any("cannot write the inference log" in line for line in warnings), warnings


def test_sigterm_flushes_everything(store, tmp_path):
    images, log_dir = store[2], tmp_path / "log"
    process, url = start_server(store, log_dir)
    try:
        ids = {predict(url, images[:2])[0] for _ in range(5)}
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        process.kill()
    rows = read_rows(log_dir)
    assert sorted(set(rows["request_id"].tolist())) == sorted(ids) and len(rows["request_id"]) == 10


def test_a_killed_server_leaves_only_complete_segments(store, tmp_path):
    images, log_dir = store[2], tmp_path / "log"
    process, url = start_server(store, log_dir)
    answered: list[tuple[float, str]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                answered.append((time.monotonic(), predict(url, images[:2])[0]))
            except Exception:  # the server is gone: whatever broke, the traffic ends
                return

    try:
        sender = threading.Thread(target=traffic)
        sender.start()
        time.sleep(3)
        killed_at = time.monotonic()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        stop.set()
        sender.join(timeout=30)
    finally:
        process.kill()
    files = log_files(log_dir, "rows")
    assert files
    for file in files:
        with np.load(file.path, allow_pickle=False) as archive:
            assert len(archive["request_id"]) == len(archive["pixels"]) > 0
    logged = set(read_rows(log_dir)["request_id"].tolist())
    settled = {request_id for at, request_id in answered if at < killed_at - 1.5}
    assert settled and settled <= logged


def start_server(store, log_dir: Path) -> tuple[subprocess.Popen, str]:
    """`mnist-mlops serve` on the champion, for a test that stops it by a signal of its own."""
    directory, uri, _images = store
    port = free_port()
    process = subprocess.Popen(
        serve_command(port, log_dir),
        cwd=directory,
        env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return process, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"{url} did not answer within 120 s")


def worker_pids(supervisor: int) -> set[int]:
    """The pids of a server's worker processes: the supervisor's children."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {int(pid) for pid in children}


def writers_of(log_dir: Path) -> set[str]:
    """The pids that wrote the inference log's row files (`rows-HOST.PID.…`)."""
    return {path.name.split("-", 1)[1].split(".")[1] for path in log_files(log_dir, "rows")}


class Clients:
    """8 threads sending 2 images per request until stopped or refused; the ids answered."""

    def __init__(self, url: str, images: np.ndarray) -> None:
        self.url, self.images, self.ids = url, images, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send) for _ in range(8)]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        while not self.stop.is_set():
            try:
                self.ids.append(predict(self.url, self.images[:2])[0])
            except OSError:  # the server stopped taking connections
                return

    def join(self) -> list[str]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        return self.ids


@pytest.mark.heavy
def test_workers_count_and_log_every_request_once_and_sigterm_drains_them_all(store, tmp_path):
    directory, uri, images = store
    log_dir, port = tmp_path / "log", free_port()
    begun = time.clock_gettime(time.CLOCK_BOOTTIME)
    process = subprocess.Popen(
        serve_command(port, log_dir, "--workers", "2"),
        cwd=directory,
        env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _worker_count(url) == 0:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        first_answer = time.clock_gettime(time.CLOCK_BOOTTIME) - begun
        # The second worker was forked with the first, not after its first answer: it imports
        # meanwhile and then only loads the model, listening a model load later, not a start.
        started = sorted(_started(pid) for pid in worker_pids(process.pid))
        assert len(started) == 2 and started[1] - started[0] < first_answer / 2, started
        while (workers := _worker_count(url)) != 2:
            assert process.poll() is None and time.monotonic() < deadline, workers
            time.sleep(0.2)
        folder = _metrics_folder(process.pid, worker_pids(process.pid))
        clients = Clients(url, images)
        time.sleep(3)
        answered = clients.join()
        # Whichever worker answers /metrics, it counts the requests of both (the other
        # worker's within its flush, FLUSH_SECONDS).
        key = ("mnist_serving_requests_total", (("path", "/invocations"), ("status", "200")))
        deadline = time.monotonic() + 30
        while (counted := metrics(url)[key]) != len(answered):
            assert counted < len(answered) and time.monotonic() < deadline, counted
            time.sleep(0.2)
        assert all(metrics(url)[key] == len(answered) for _ in range(4))
        rows = rows_of(log_dir, set(answered), 2 * len(answered))
        assert len(rows["request_id"]) == 2 * len(answered)
        assert len(writers_of(log_dir)) == 2  # both workers answered, each into its own files

        # SIGTERM with requests in flight: every answered request is in the log, once.
        workers = worker_pids(process.pid)
        clients = Clients(url, images)
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM
        in_flight = clients.join()
    finally:
        process.kill()
    rows = read_rows(log_dir)
    ids, counts = np.unique(rows["request_id"], return_counts=True)
    assert set(ids) == set(answered) | set(in_flight) and set(counts) == {2}
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert not Path(folder).exists()


def _started(pid: int) -> float:
    """When process `pid` started, in seconds since boot (CLOCK_BOOTTIME)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return ticks / os.sysconf("SC_CLK_TCK")


def _worker_count(url: str) -> float:
    try:
        return metrics(url).get(("mnist_serving_worker_processes", ()), 0)
    except OSError:
        return 0


def _metrics_folder(supervisor: int, workers: list[int]) -> Path:
    """The supervisor's private folder, once every worker keeps its metrics in it."""
    (folder,) = Path(tempfile.gettempdir()).glob(f"mnist-serve-{supervisor}-*")
    assert folder.stat().st_mode & 0o777 == 0o700
    written = {path.stem.rsplit("_", 1)[1] for path in (folder / "metrics").glob("*.db")}
    assert {str(pid) for pid in workers} <= written, (workers, written)
    return folder


@pytest.mark.heavy
def test_a_worker_that_dies_is_replaced_and_its_counts_are_kept(store, tmp_path):
    directory, uri, images = store
    port = free_port()
    command = serve_command(port, tmp_path / "log", "--workers", "2")
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    output = tmp_path / "server.out"
    # The folder of a server killed outright (its pid no longer runs) goes at the next start.
    gone = subprocess.Popen(["true"])
    gone.wait()
    abandoned = Path(tempfile.gettempdir()) / f"mnist-serve-{gone.pid}-left"
    (abandoned / "metrics").mkdir(parents=True)
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping", directory, log=output) as url:
        assert not abandoned.exists()
        wait = time.monotonic() + 120
        while _worker_count(url) != 2:
            assert time.monotonic() < wait
            time.sleep(0.2)
        for _ in range(20):
            predict(url, images[:1])
        # The workers listen; their parent is the supervisor.
        (supervisor,) = {
            int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            for pid in listeners_of(port)
        }
        before = worker_pids(supervisor)
        killed = min(before)
        os.kill(killed, signal.SIGKILL)
        wait = time.monotonic() + 120
        while not (len(worker_pids(supervisor)) == 2 and killed not in worker_pids(supervisor)):
            assert time.monotonic() < wait
            time.sleep(0.2)
        while _worker_count(url) != 2:
            assert time.monotonic() < wait
            time.sleep(0.2)
        for _ in range(20):
            predict(url, images[:1])
        key = ("mnist_serving_requests_total", (("path", "/invocations"), ("status", "200")))
        deadline = time.monotonic() + 30
        while (counted := metrics(url)[key]) != 40:  # the dead worker's answers still counted
            assert counted < 40 and time.monotonic() < deadline, counted
            time.sleep(0.2)
    assert f"(pid {killed}) ended (signal 9); starting another" in output.read_text()
