"""Serving the champion with the real `mlflow models serve`, over real HTTP on 127.0.0.1."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.pyfunc.scoring_server.client import ScoringServerClient
from PIL import Image, ImageDraw

from mnist_mlops.serving.client import to_mnist

from ..conftest import (
    free_port,
    run,
    serving,
    subprocess_env,
    train_champion,
)

CHAMPION_URI = "models:/mnist-classifier@champion"
MAX_BATCH = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A project folder whose store holds a champion trained by the real stages."""
    directory = tmp_path_factory.mktemp("serving")
    return train_champion(directory, f"serving.max_batch_size={MAX_BATCH}")


@pytest.fixture(scope="module")
def server(store):
    """`mlflow models serve` on the champion, as the README runs it, on a free port."""
    uri, _images = store
    port = free_port()
    command = [
        *("mlflow", "models", "serve", "-m", CHAMPION_URI),
        *("--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)),
    ]
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping") as url:
        yield url


def test_the_serve_command_serves_the_champion_of_the_project_store(store, in_process):
    """`mnist-mlops serve` (`make serve`, the images' entry point) finds the store at the root.

    It runs MLflow's scoring server in its own process: the same answers and
    the same 400s as `mlflow models serve`, and it stops cleanly on SIGTERM.
    """
    uri, images = store
    project = Path(uri.removeprefix("sqlite:///")).parent
    port = free_port()
    command = [sys.executable, "-m", "mnist_mlops", "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        command, cwd=project, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_until_it_answers(process, url)
        status, answer = post(url, json.dumps({"inputs": images[:2].tolist()}))
        assert status == 200
        answer_of_two = expected(in_process, images[:2])
        assert answer["predictions"] == answer_of_two
        status, answer = post(url, image_body(value=256))
        assert status == 400 and "0–255" in answer["message"]
        # MLflow's own client of the scoring protocol.
        client = ScoringServerClient("127.0.0.1", port)
        assert client.invoke(images[:2].astype(np.float32))["predictions"] == answer_of_two
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        process.kill()
    # uvicorn finishes its shutdown, then ends by the signal it was sent.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Finished server process" in output.decode()


def test_the_serve_command_imports_no_tensorflow_dvc_or_hydra(store, tmp_path, in_process):
    """A fresh interpreter serving the champion, a prediction answered: no pipeline library loaded.

    `-X importtime` lists every module the process imports in its whole life,
    the command line's assembly from all the wings included. The champion is
    named by its MLflow 3 model id (`models:/m-…`), which serves it the same.
    """
    uri, images = store
    project = Path(uri.removeprefix("sqlite:///")).parent
    champion = MlflowClient(uri).get_model_version_by_alias("mnist-classifier", "champion")
    assert champion.source.startswith("models:/m-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "imports.log"
    command = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "mnist_mlops",
        "serve",
        "--port",
        str(port),
        "--model-uri",
        champion.source,
    ]
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, cwd=project, env=subprocess_env(), stdout=output, stderr=output
        )
        try:
            wait_until_it_answers(process, url, log)
            status, answer = post(url, json.dumps({"inputs": images[:1].tolist()}))
            assert status == 200
            assert answer["predictions"] == expected(in_process, images[:1])
        finally:
            process.terminate()
            process.wait(timeout=20)
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in log.read_text().splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"mlflow", "onnxruntime", "mnist_mlops"} <= imported
    assert not imported & {"tensorflow", "keras", "dvc", "hydra", "omegaconf", "tf2onnx", "optuna"}


def wait_until_it_answers(process: subprocess.Popen, url: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text() if log else process.stdout.read().decode()
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer within 120 s")


def serve_refused(directory: Path) -> str:
    """Run `mnist-mlops serve` in `directory`, expect exit 1; return its one line of error."""
    result = run(
        [sys.executable, "-m", "mnist_mlops", "serve", "--port", str(free_port())],
        directory,
        subprocess_env(),
        check=False,
    )
    assert result.returncode == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mnist-mlops")]
    return line


def test_the_serve_command_explains_a_missing_model_in_one_line(tmp_path):
    assert serve_refused(tmp_path) == (
        f"mnist-mlops serve: no MLflow store at {tmp_path}/mlflow.db: run `make repro` first, "
        "or set MLFLOW_TRACKING_URI"
    )
    assert not (tmp_path / "mlflow.db").exists()


def test_the_serve_command_explains_a_store_without_a_champion(tmp_path):
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    line = serve_refused(tmp_path)
    assert line.startswith(f"mnist-mlops serve: cannot load {CHAMPION_URI} from sqlite:///")


def test_the_serve_command_fails_when_its_port_is_taken(store):
    uri, _images = store
    project = Path(uri.removeprefix("sqlite:///")).parent
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            [sys.executable, "-m", "mnist_mlops", "serve", "--port", str(port)],
            project,
            subprocess_env(),
            check=False,
            timeout=120,
        )
    # One line, before anything is loaded and before any "serving on" banner.
    assert result.returncode == 1
    assert "serving" not in result.stdout and "startup" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"mnist-mlops serve: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another server? choose another port: make serve PORT=…, or --port)"
    )


@pytest.fixture(scope="module")
def in_process(store):
    uri, _images = store
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(CHAMPION_URI)


def post(url: str, body: bytes | str, content_type="application/json"):
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_standard_endpoints_answer(server):
    for endpoint in ("ping", "health", "version"):
        with urllib.request.urlopen(f"{server}/{endpoint}", timeout=10) as response:
            assert response.status == 200, endpoint
    with urllib.request.urlopen(f"{server}/version", timeout=10) as response:
        assert response.read().decode() == mlflow.__version__


def expected(in_process, images):
    return in_process.predict(images.astype(np.float32))


@pytest.mark.parametrize("count", [1, 5])
@pytest.mark.parametrize("request_format", ["inputs", "instances", "dataframe_split"])
def test_served_predictions_match_the_model(server, store, in_process, count, request_format):
    _uri, images = store
    batch = images[:count]
    if request_format == "dataframe_split":
        # MLflow's tensor-in-DataFrame form: one column, one flattened image per row.
        rows = [[image.reshape(-1).tolist()] for image in batch]
        body = {"dataframe_split": {"columns": ["image"], "data": rows}}
    else:
        body = {request_format: batch.tolist()}
    status, answer = post(server, json.dumps(body))
    assert status == 200, answer
    predictions = answer["predictions"]
    reference = expected(in_process, batch)
    assert [item["digit"] for item in predictions] == [item["digit"] for item in reference]
    for served, local in zip(predictions, reference, strict=True):
        assert len(served["probabilities"]) == 10
        np.testing.assert_allclose(served["probabilities"], local["probabilities"], atol=1e-5)
        assert served["digit"] == int(np.argmax(served["probabilities"]))


def image_body(value=0, shape=(28, 28), count=1) -> str:
    return json.dumps({"inputs": np.full((count, *shape), value).tolist()})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (image_body(shape=(784,)), "does not match expected shape"),
        (image_body(shape=(28, 27)), "does not match expected shape"),
        (json.dumps({"inputs": [[["x"] * 28] * 28]}), ""),
        (image_body(value=256), "pixel values must be raw intensities in 0–255"),
        (image_body(value=-1), "got values in -1–-1"),
        (json.dumps({"inputs": []}), ""),
        ('{"inputs": [[[1, 2', ""),
        ("not json at all", ""),
        (image_body(count=MAX_BATCH + 1), f"a batch of 9 images is over the limit of {MAX_BATCH}"),
        (json.dumps({"wrong_key": [1]}), ""),
    ],
    ids=[
        "flat-784",
        "28x27",
        "non-numeric",
        "above-255",
        "negative",
        "empty-batch",
        "truncated-json",
        "not-json",
        "over-size-limit",
        "unknown-format",
    ],
)
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_survives(
    server, store, body, message
):
    status, answer = post(server, body)
    assert 400 <= status < 500, (status, answer)
    assert answer.get("message"), answer
    assert message in answer["message"]
    _uri, _images = store
    status, answer = post(server, image_body(value=0))
    assert status == 200 and len(answer["predictions"]) == 1


def test_unsupported_content_type_is_refused(server):
    request = urllib.request.Request(
        f"{server}/invocations", data=b"1,2,3", headers={"Content-Type": "text/plain"}
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 415


def draw_digit_one(path, size=(90, 140)):
    """A black '1' on white paper, the way a person would photograph it."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).line([(45, 15), (45, 125)], fill="black", width=12)
    image.save(path)


def test_to_mnist_makes_a_centred_white_digit_on_black(tmp_path):
    draw_digit_one(tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as image:
        digit = to_mnist(image)
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit[0].max() == 0 and digit[:, 0].max() == 0, "background is black"
    assert digit[14, 13:15].min() > 200, "the stroke is white, through the centre"
    rows = np.flatnonzero(digit.max(axis=1) > 50)
    assert 18 <= len(rows) <= 21, "the digit fills a 20-pixel box"


def test_predict_client_prints_a_digit_per_file(server, tmp_path, in_process):
    draw_digit_one(tmp_path / "one.png")
    Image.new("L", (50, 50), "black").save(tmp_path / "blank.jpg")
    result = run(
        [sys.executable, "-m", "mnist_mlops", "predict", "one.png", "blank.jpg", "--url", server],
        tmp_path,
        subprocess_env(),
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    with Image.open(tmp_path / "one.png") as image:
        reference = in_process.predict(to_mnist(image)[None].astype(np.float32))[0]
    assert lines[0].startswith(f"one.png: {reference['digit']} (probability ")
    assert lines[1].startswith("blank.jpg: ")


def test_predict_client_explains_a_connection_error_in_one_line(tmp_path):
    draw_digit_one(tmp_path / "one.png")
    url = f"http://127.0.0.1:{free_port()}"
    result = run(
        [sys.executable, "-m", "mnist_mlops", "predict", "one.png", "--url", url],
        tmp_path,
        subprocess_env(),
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"mnist-mlops predict: cannot reach the model server at {url} "
        "([Errno 111] Connection refused); start it with `make serve`"
    ]


def golden_requests(images: np.ndarray, count: int) -> list[tuple[str, bytes, bool]]:
    """`count` (content type, body, for the hot path) in every accepted format, some bad.

    Every tenth is one the hot path leaves to MLflow's app: bad, or with `params` or `index`.
    """
    rng = np.random.default_rng(7)
    json_types = (
        "application/json",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
    )
    bad = [
        ("application/json", image_body(value=256).encode(), False),
        ("application/json", image_body(shape=(28, 27)).encode(), False),
        ("application/json", image_body(count=MAX_BATCH + 1).encode(), False),
        ("application/json", json.dumps({"inputs": [[["x"] * 28] * 28]}).encode(), False),
        ("application/json", json.dumps({"inputs": []}).encode(), False),
        ("application/json", b'{"inputs": [[[1, 2', False),
        ("application/json", b'{"inputs": [[' + b"[NaN]," * 27 + b"[NaN]]]}", False),
        ("application/json", json.dumps({"wrong_key": [1]}).encode(), False),
        (
            "application/json",
            json.dumps({"inputs": [[[0] * 28] * 28], "params": {}}).encode(),
            False,
        ),
        (
            "application/json",
            json.dumps({"dataframe_split": {"data": [[[0] * 784]], "index": [0]}}).encode(),
            False,
        ),
        (
            "application/json",
            json.dumps({"dataframe_records": [{"a": [0] * 784}, {"b": [0] * 784}]}).encode(),
            False,
        ),
        ("application/json; charset=latin-1", image_body().encode(), False),
        ("text/csv", b"a,b\n1,2\n", False),
    ]
    requests = []
    for number in range(count):
        if number % 10 == 9:
            requests.append(bad[(number // 10) % len(bad)])
            continue
        batch = images[rng.integers(len(images), size=int(rng.integers(1, 5)))]
        pixels = batch.tolist() if number % 3 else (batch * 0.997).round(3).tolist()
        flat = [np.asarray(image).reshape(-1).tolist() for image in pixels]
        kind = number % 5
        if kind in (0, 1):
            body = {("inputs", "instances")[kind]: pixels}
        elif kind == 2:
            body = {"dataframe_split": {"columns": ["image"], "data": [[row] for row in flat]}}
        elif kind == 3:
            body = {"dataframe_split": {"data": [[row] for row in flat]}}
        else:
            body = {"dataframe_records": [{"image": row} for row in flat]}
        requests.append((json_types[number % 3], json.dumps(body).encode(), True))
    return requests


async def asgi_post(app, content_type: str, body: bytes) -> tuple[int, bytes]:
    """POST /invocations to an ASGI app in this process: its status and body."""
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/invocations",
        "raw_path": b"/invocations",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "server": ("127.0.0.1", 5000),
        "client": ("127.0.0.1", 1),
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    answer: dict = {"body": b""}

    async def receive():
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["body"]


def test_the_hot_path_answers_byte_for_byte_as_mlflows_app(store, in_process):
    """1,000 requests in every format, some bad: the same status and body from both paths."""
    import asyncio

    from mnist_mlops.serving.observed import Serving, observe
    from mnist_mlops.serving.server import load_version

    _uri, images = store
    app, model, served = load_version(CHAMPION_URI)
    fast = observe(app, model, served, metrics=False, log_settings=None)
    assert fast.current.hot is not None
    slow = observe(app, model, served, metrics=False, log_settings=None)
    slow.current = Serving(app, served, None)
    requests = golden_requests(images, 1000)

    async def both():
        return [
            (await asgi_post(fast, kind, body), await asgi_post(slow, kind, body))
            for kind, body, _hot in requests
        ]

    answers = asyncio.run(both())
    for (kind, body, hot), (fast_answer, slow_answer) in zip(requests, answers, strict=True):
        assert fast_answer == slow_answer, (kind, body[:200])
        assert (fast.current.hot.answer(kind, body) is not None) == hot, (kind, body[:200])
        if hot:
            assert fast_answer[0] == 200, fast_answer
        elif b'"params"' not in body and b'"index"' not in body:  # MLflow's app takes these
            assert 400 <= fast_answer[0] < 500 and b"stack_trace" not in fast_answer[1], fast_answer
    assert sum(hot for _kind, _body, hot in requests) == 900
