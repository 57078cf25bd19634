"""The front door: real nginx (Debian's; .ci/run installs it) with TLS before `mnist-mlops serve`.

Elsewhere, without nginx, these tests skip with the reason; under CI they fail.
The tracking server behind the proxy is tested with the team server, in test_team.py.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from mnist_mlops.processes import cannot_listen
from mnist_mlops.serving.client import ClientError, predict
from mnist_mlops.serving.proxy import (
    ProxyError,
    ProxySettings,
    Upstream,
    fill,
    max_body_bytes,
    render,
)

from ..conftest import (
    REPO_ROOT,
    free_port,
    proxy_command,
    run,
    serving,
    subprocess_env,
    tls_context,
    train_champion,
)

RATE, BURST = 5, 10


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    """`mnist-mlops serve` on a tiny champion; yields its URL, its log and the test images."""
    directory = tmp_path_factory.mktemp("proxied")
    uri, images = train_champion(directory)
    port, log = free_port(), directory / "server.log"
    command = [sys.executable, "-m", "mnist_mlops", "serve", "--port", str(port)]
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping", directory, log) as url:
        yield url, log, images


@pytest.fixture(scope="module")
def proxy(model_server, certificates):
    """The proxy before the model server, with a low rate limit; yields its https:// URL."""
    upstream = model_server[0].removeprefix("http://")
    port = free_port()
    command = proxy_command(
        certificates,
        *("model", "--model-upstream", upstream, "--model-port", str(port)),
        *("--rate", str(RATE), "--burst", str(BURST)),
    )
    url = f"https://127.0.0.1:{port}"
    with serving(
        command, subprocess_env(), url, "/ping", REPO_ROOT, context=tls_context(certificates)
    ):
        yield url


def post(url: str, body: bytes, certificates) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(
            request, timeout=30, context=tls_context(certificates)
        ) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def images_body(images) -> bytes:
    return json.dumps({"inputs": images.tolist()}).encode()


def invocations_logged(log) -> int:
    return log.read_text().count("POST /invocations")


def test_the_champion_answers_through_https(model_server, proxy, certificates):
    _url, _log, images = model_server
    status, answer = post(proxy, images_body(images[:3]), certificates)
    assert status == 200 and len(answer["predictions"]) == 3
    # The project's client, with the CA; without it the certificate is refused.
    assert len(predict(list(images[:2]), proxy, ca=certificates / "ca.crt")) == 2
    with pytest.raises(ClientError, match="CERTIFICATE_VERIFY_FAILED"):
        predict(list(images[:1]), proxy)


def test_plain_http_is_redirected_to_https_and_never_reaches_the_model(model_server, proxy):
    _url, log, _images = model_server
    before = invocations_logged(log)
    host, port = proxy.removeprefix("https://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request(
        "POST", "/invocations", body=b"{}", headers={"Content-Type": "application/json"}
    )
    answer = connection.getresponse()
    assert answer.status == 308
    assert answer.getheader("Location") == f"https://{host}:{port}/invocations"
    answer.read()
    # The redirect goes to the configured name, whatever Host the client claims.
    connection.request("GET", "/", headers={"Host": "evil.example"})
    answer = connection.getresponse()
    assert answer.status == 308
    assert answer.getheader("Location") == f"https://{host}:{port}/"
    connection.close()
    assert invocations_logged(log) == before


def test_a_20_mb_body_gets_a_json_413_before_it_reaches_mlflow(model_server, proxy, certificates):
    _url, log, _images = model_server
    before = invocations_logged(log)
    status, answer = post(proxy, b"[" + b"1, " * (20_000_000 // 3) + b"1]", certificates)
    assert status == 413
    assert "serving.max_batch_size" in answer["message"] and "1024 images" in answer["message"]
    assert invocations_logged(log) == before


def test_the_body_limit_leaves_room_for_a_full_batch_of_float_pixels():
    full_batch = json.dumps({"inputs": [[[254.99999] * 28] * 28] * 1024})
    assert len(full_batch) < max_body_bytes(1024) < 20_000_000


def test_a_burst_over_the_rate_limit_gets_json_429s_and_later_requests_pass(
    model_server, proxy, certificates
):
    body = images_body(model_server[2][:1])
    statuses, messages = [], set()
    for _ in range(3 * BURST):
        status, answer = post(proxy, body, certificates)
        statuses.append(status)
        if status == 429:
            messages.add(answer["message"])
    assert statuses.count(200) >= BURST and statuses.count(429) >= BURST
    assert set(statuses) == {200, 429}
    assert messages == {
        f"more than {RATE} requests per second from this client "
        f"(a burst of {BURST} is allowed): retry later"
    }
    time.sleep(2 / RATE)
    assert post(proxy, body, certificates)[0] == 200


def test_feedback_passes_with_its_own_body_limit(proxy, model_server, certificates):
    _url, _log, images = model_server
    context = tls_context(certificates)

    def send(path: str, body: bytes) -> tuple[int, dict, str]:
        request = urllib.request.Request(
            f"{proxy}{path}", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as answer:
                return answer.status, json.load(answer), answer.headers["X-Request-ID"]
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read()), ""

    time.sleep(2 / RATE)
    status, answer, request_id = send(
        "/invocations", json.dumps({"inputs": images[:1].tolist()}).encode()
    )
    assert status == 200 and request_id
    feedback = json.dumps({"request_id": request_id, "digits": [answer["predictions"][0]["digit"]]})
    deadline = time.monotonic() + 10
    while (
        status := send("/feedback", feedback.encode())[0]
    ) == 404 and time.monotonic() < deadline:
        time.sleep(0.3)  # the log is written once a second
    assert status == 200
    status, answer, _ = send("/feedback", b"{" + b" " * 70_000 + b"}")
    assert status == 413 and answer["message"] == "feedback is limited to 65536 bytes"


def test_only_the_scoring_endpoints_are_exposed(proxy, certificates):
    context = tls_context(certificates)
    for path in ("/ping", "/health", "/version"):
        with urllib.request.urlopen(f"{proxy}{path}", timeout=10, context=context) as answer:
            assert answer.status == 200, path
    for path in ("/", "/metrics", "/invocations/../docs"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{proxy}{path}", timeout=10, context=context)
        assert refused.value.code == 404, path
        assert "only /invocations" in json.loads(refused.value.read())["message"]


def refused(arguments: list[str], certificates) -> str:
    """Run the proxy command, expect exit 1; return its one line of error."""
    result = run(
        proxy_command(certificates, *arguments),
        REPO_ROOT,
        subprocess_env(),
        check=False,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mnist-mlops proxy: ")
    return line


def test_a_missing_or_bad_certificate_or_a_taken_port_fails_with_one_line(certificates, tmp_path):
    port = str(free_port())
    missing = refused(
        ["--model-port", port, "--certificate", str(tmp_path / "none.crt")], certificates
    )
    assert "no TLS certificate at" in missing and "make certs" in missing
    (tmp_path / "bad.crt").write_text("not a certificate\n")
    bad = refused(["--model-port", port, "--certificate", str(tmp_path / "bad.crt")], certificates)
    assert "bad.crt" in bad
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = str(taken.getsockname()[1])
        line = refused(["--model-port", in_use], certificates)
    assert f"cannot listen on 127.0.0.1:{in_use}" in line and "in use" in line


def test_the_configuration_fills_every_placeholder(certificates):
    settings = ProxySettings(
        upstreams=(
            Upstream("model", "model:5000", 8443),
            Upstream("tracking", "mlflow:5001", 8444),
        ),
        certificate=certificates / "server.crt",
        key=certificates / "server.key",
        max_batch_size=8,
    )
    configuration = render(settings)
    assert "{{" not in configuration and "}}" not in configuration
    assert f"client_max_body_size {max_body_bytes(8)};" in configuration
    assert "server model:5000 max_fails=1 fail_timeout=10s;" in configuration
    assert "server mlflow:5001;" in configuration
    with pytest.raises(ProxyError, match="no value for port"):
        fill("listen {{port}};", {})


def test_certs_makes_a_chain_that_verifies_and_keeps_an_existing_set(certificates, tmp_path):
    verified = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(certificates / "ca.crt"),
            str(certificates / "server.crt"),
        ],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr
    assert (certificates / "server.key").stat().st_mode & 0o077 == 0
    before = (certificates / "server.crt").read_bytes()
    command = [sys.executable, "-m", "mnist_mlops", "certs", "--directory", str(certificates)]
    run(command, REPO_ROOT, subprocess_env())
    assert (certificates / "server.crt").read_bytes() == before
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ca.crt").write_text("")
    result = run([*command[:-1], str(tmp_path / "half")], REPO_ROOT, subprocess_env(), check=False)
    assert result.returncode == 1 and "incomplete" in result.stderr


def test_the_compose_file_puts_nginx_before_the_serving_image():
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())
    model, proxy = compose["services"]["model"], compose["services"]["proxy"]
    assert model["build"]["target"] == "serve" and "ports" not in model
    assert model["deploy"]["replicas"] == 2
    assert proxy["ports"] == ["127.0.0.1:8443:8443"]
    assert proxy["depends_on"]["model"]["condition"] == "service_healthy"
    assert "nginx" in proxy["image"]


def test_nginx_stops_when_the_proxy_command_is_killed_outright(certificates):
    """SIGKILL leaves the command no chance to stop nginx; the kernel stops it instead."""
    port = free_port()
    command = proxy_command(certificates, "--model-port", str(port))
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    context = tls_context(certificates)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/ping", timeout=2, context=context)
                break
            except urllib.error.HTTPError:
                break  # nginx answers (the model server behind it is not running)
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.2)
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) != 0:
                    return
            time.sleep(0.2)
        pytest.fail(f"nginx still listens on {port} after its command was killed")
    finally:
        process.kill()


def invocations_answered(url: str) -> int:
    """/invocations answered 200 by one replica, from its own /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = r'mnist_serving_requests_total\{path="/invocations",status="200"\} (\S+)'
    return int(float(re.search(pattern, text).group(1)))


def replica_pid(port: int) -> int:
    """The pid of the `mnist-mlops serve` replica listening on `port`."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in arguments and str(port).encode() in arguments:
                return int(entry.name)
    raise AssertionError(f"no replica on port {port}")


@pytest.mark.heavy
def test_two_replicas_behind_the_proxy_lose_no_request_when_one_is_killed(certificates, tmp_path):
    """`mnist-mlops proxy --replicas 2` (what `make serve REPLICAS=2` runs) under 8 clients."""
    uri, images = train_champion(tmp_path)
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, MNIST_INFERENCE_LOG_DIR=str(tmp_path / "log"))
    first = free_port()
    while cannot_listen("127.0.0.1", first + 1):
        first = free_port()
    urls = [f"http://127.0.0.1:{port}" for port in (first, first + 1)]
    proxy_port = free_port()
    command = proxy_command(
        certificates,
        *("model", "--replicas", "2", "--replica-port", str(first)),
        *("--model-port", str(proxy_port), "--rate", "100000", "--burst", "100000"),
    )
    body = images_body(images[:1])
    answers: list[tuple[int, float]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status, _answer = post(f"https://127.0.0.1:{proxy_port}", body, certificates)
            except OSError:  # no answer at all counts as a failure too
                status = 0
            answers.append((status, time.perf_counter() - started))

    with serving(
        command,
        env,
        f"https://127.0.0.1:{proxy_port}",
        "/ping",
        REPO_ROOT,
        context=tls_context(certificates),
    ) as proxied:
        clients = [threading.Thread(target=client) for _ in range(8)]
        try:
            for thread in clients:
                thread.start()
            time.sleep(5)
            killed_share = invocations_answered(urls[0])
            os.kill(replica_pid(first), signal.SIGKILL)
            killed_at = len(answers)
            time.sleep(15)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=60)
        survivor_share = invocations_answered(urls[1])
        statuses = [status for status, _seconds in answers]
        assert statuses.count(200) == len(statuses) > killed_at > 0, set(statuses)
        # Both replicas answered before the kill; after it the survivor answered the rest.
        assert killed_share > 0 and survivor_share > 0
        assert survivor_share >= len(statuses) - killed_share - 8 * 2
        slowest = max(seconds for _status, seconds in answers[killed_at:])
        print(f"{len(statuses)} requests, none failed; slowest after the kill {slowest:.3f} s")

        # The last replica gone too: a JSON 502, quickly, not a hang.
        os.kill(replica_pid(first + 1), signal.SIGKILL)
        started = time.perf_counter()
        status, answer = post(proxied, body, certificates)
        assert status == 502 and answer["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert time.perf_counter() - started < 5


@pytest.mark.heavy
def test_feedback_sent_the_moment_its_answer_arrives_is_taken_through_two_replicas(
    certificates, tmp_path
):
    """100 answers, each followed at once by its feedback, through the proxy and two replicas.

    The proxy takes the replicas in turn, so feedback often reaches the
    replica that did not answer: it must wait for the other's rows rather
    than refuse them.
    """
    uri, images = train_champion(tmp_path)
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, MNIST_INFERENCE_LOG_DIR=str(tmp_path / "log"))
    first = free_port()
    while cannot_listen("127.0.0.1", first + 1):
        first = free_port()
    proxy_port = free_port()
    command = proxy_command(
        certificates,
        *("model", "--replicas", "2", "--replica-port", str(first)),
        *("--model-port", str(proxy_port), "--rate", "100000", "--burst", "100000"),
        *("--feedback-rate", "100000"),
    )
    url = f"https://127.0.0.1:{proxy_port}"
    context = tls_context(certificates)
    outcomes: list[tuple[int, dict]] = []

    def call(path: str, body: dict) -> tuple[int, dict, dict]:
        request = urllib.request.Request(
            f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60, context=context) as answer:
                return answer.status, json.load(answer), answer.headers
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read()), error.headers

    def client(offset: int) -> None:
        for index in range(offset, 100, 4):
            status, answer, headers = call(
                "/invocations", {"inputs": images[index % 50][None].tolist()}
            )
            assert status == 200, answer
            feedback = {
                "request_id": headers["X-Request-ID"],
                "digits": [answer["predictions"][0]["digit"]],
            }
            outcomes.append(call("/feedback", feedback)[:2])

    with serving(command, env, url, "/ping", REPO_ROOT, context=context):
        clients = [threading.Thread(target=client, args=(offset,)) for offset in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=300)
    assert len(outcomes) == 100
    refused = [outcome for outcome in outcomes if outcome[0] != 200 or outcome[1]["recorded"] != 1]
    assert refused == []
