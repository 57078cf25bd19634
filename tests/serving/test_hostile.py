"""The model server against hostile requests: every refusal cheap, in one line, without a stack.

Each test runs a reproduction from the security review (docs/security.md)
against a real `mnist-mlops serve` and checks the answer, the server's log
and its memory (resident size back within 50 MB after the request).
"""

import io
import json
import threading
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnist_mlops.monitoring.log_files import read_feedback

from ..conftest import (
    free_port,
    listeners_of,
    resident_megabytes,
    serving,
    subprocess_env,
    train_champion,
)
from .test_observed import call, predict, rows_of, serve_command

MEMORY_MARGIN_MB = 50
# The default serving.max_batch_size, as the review found the server.
MAX_BATCH = 1024


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile-store")
    uri, images = train_champion(directory)
    return directory, uri, images


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """A server of the champion with its inference log: its URL, pids, log folder and output."""
    directory, uri, _images = store
    folder = tmp_path_factory.mktemp("hostile")
    port = free_port()
    command = serve_command(port, folder / "log")
    output = folder / "server.out"
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping", directory, log=output) as url:
        yield url, listeners_of(port), folder / "log", output


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def refused_cheaply(server, body: bytes, content_type: str) -> tuple[int, dict]:
    """Send a hostile body; the answer, after checking that memory came back."""
    url, pids, _log, _output = server
    post(url, json.dumps({"inputs": [[[0] * 28] * 28]}).encode(), "application/json")  # warm
    before = resident_megabytes(pids)
    status, answer = post(url, body, content_type)
    assert resident_megabytes(pids) - before < MEMORY_MARGIN_MB
    assert "stack_trace" not in answer
    return status, answer


def test_a_parquet_body_that_inflates_is_refused_from_its_footer(server):
    # The review's body: 10^8 int64 zeros, zstd-compressed, a few hundred KB.
    zeros = pa.table({"pixel": np.zeros(10**8, np.int64)})
    sink = io.BytesIO()
    pq.write_table(zeros, sink, compression="zstd")
    del zeros
    body = sink.getvalue()
    assert len(body) < 1_000_000  # far under the body limit: only what it decodes to is over
    status, answer = refused_cheaply(server, body, "application/vnd.apache.parquet")
    assert status == 400 and f"more than {MAX_BATCH} images" in answer["message"]
    # A column of byte strings could hold a cell of any size: refused by its type.
    strings = io.BytesIO()
    pq.write_table(pa.table({"image": [b"x" * 1000]}), strings)
    status, answer = refused_cheaply(server, strings.getvalue(), "application/vnd.apache.parquet")
    assert status == 400 and "not numbers" in answer["message"]


def test_rows_over_the_limit_are_refused_before_the_body_is_parsed(server):
    url = server[0]
    # The review's body: 9.6 MB, 2.4 million one-number rows, under the body limit.
    rows = b"[" + b",".join([b"[0]"] * 2_400_000) + b"]"
    status, answer = refused_cheaply(server, b'{"inputs":' + rows + b"}", "application/json")
    assert status == 400 and f"more than {MAX_BATCH} images" in answer["message"]
    lines = b"\n".join([b"0"] * (MAX_BATCH * 100))
    status, answer = refused_cheaply(server, b"pixel\n" + lines, "text/csv")
    assert status == 400 and f"more than {MAX_BATCH} images" in answer["message"]
    # Over the body limit: refused from Content-Length, the body never kept.
    status, answer = post(url, b"0" * 12_000_000, "application/json")
    assert status == 413 and "serving.max_batch_size" in answer["message"]
    # What the limit allows still gets the model's own answer.
    status, answer = post(url, b'{"inputs":[[0]]}', "application/json")
    assert status == 400 and "does not match expected shape" in answer["message"]
    over = json.dumps({"inputs": [[[0] * 28] * 28] * (MAX_BATCH + 1)}).encode()
    status, answer = post(url, over, "application/json")
    assert (
        status == 400
        and f"a batch of 1025 images is over the limit of {MAX_BATCH}" in (answer["message"])
    )


def test_bad_bodies_get_json_without_a_stack_and_one_log_line(server):
    url, _pids, _log, output = server
    before = output.read_text()
    status, answer = refused_cheaply(server, b"1,2,3\n4,5,6\n", "text/csv")
    assert status == 400 and answer["error_code"] and answer["message"]
    # The review's body: 10 KB of brackets, deeper than Python's JSON parser goes.
    for nested in (b"[" * 10_000, b'{"inputs":' + b"[" * 5_000 + b"]" * 5_000 + b"}"):
        status, answer = refused_cheaply(server, nested, "application/json")
        assert status == 400 and "nested too deeply" in answer["message"]
    # The connection was not dropped: the server still answers, and its log says
    # one line per bad request and never a traceback.
    assert call(url, "/ping")[0] == 200
    added = output.read_text()[len(before) :]
    assert "Traceback" not in added and "stack_trace" not in added
    assert added.count("RecursionError") == 2


def test_one_clients_request_id_cannot_take_anothers_feedback(server, store):
    url, _pids, log_dir, _output = server
    images = store[2]
    first, _ = predict(url, images[:3], request_id="shared-id")
    second, _ = predict(url, images[3:4], request_id="shared-id")
    assert first != second
    assert call(url, "/feedback", {"request_id": first, "digits": [1, 2, 3]})[0] == 200
    assert call(url, "/feedback", {"request_id": second, "digits": [4]})[0] == 200
    rows = rows_of(log_dir, {first, second}, 4)
    assert sorted(rows["request_id"].tolist()) == sorted([first] * 3 + [second])
    truth = {}
    for _ in range(100):
        truth = read_feedback(log_dir)
        if (second, 0) in truth:
            break
        threading.Event().wait(0.1)
    assert [truth[(first, position)] for position in range(3)] == [1, 2, 3]
    assert truth[(second, 0)] == 4
    # What people sent is theirs: the log is its owner's alone, whatever the umask (022 here).
    assert log_dir.stat().st_mode & 0o777 == 0o700
    assert {path.stat().st_mode & 0o777 for path in log_dir.iterdir()} == {0o600}


def test_feedback_sent_the_moment_its_answer_arrives_is_taken(server, store):
    url = server[0]
    images = store[2]
    refused = []
    for index in range(100):
        request_id, digits = predict(url, images[index % len(images)][None])
        feedback = {"request_id": request_id, "digits": digits}
        status, answer, _headers = call(url, "/feedback", feedback)
        if status != 200 or answer["recorded"] != 1:
            refused.append((status, answer))
    assert refused == []
