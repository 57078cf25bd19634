"""Servers told at once: the registry's webhook reaches `mnist-mlops serve` on a real team server.

The tracking server is `mnist-mlops tracking-server` on PostgreSQL (as in
test_team.py); the model is trained by a real `dvc repro` on tiny data
through it, and registered a second time so that the alias has somewhere
to move.
"""

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import mlflow
import pytest
import yaml
from mlflow.webhooks.delivery import _generate_hmac_signature

from mnist_mlops.serving.webhook import HOOK_PATH, refusal, signature

from ..conftest import compose_config, copy_project, free_port, run, serving
from .conftest import TINY, team_env

MODEL = "webhooked"


def test_a_call_signed_as_mlflow_signs_it_passes_and_any_other_is_refused():
    body = json.dumps({"entity": "model_version_alias", "action": "created"})
    delivery, now = str(uuid.uuid4()), time.time()
    stamp = str(int(now))
    signed = _generate_hmac_signature("s3cret", delivery, stamp, body)
    assert signature("s3cret", delivery, stamp, body.encode()) == signed

    def headers(**given):
        names = {"signature": b"x-mlflow-signature", "stamp": b"x-mlflow-timestamp"}
        names["delivery"] = b"x-mlflow-delivery-id"
        return {names[key]: value.encode() for key, value in given.items()}

    good = headers(signature=signed, stamp=stamp, delivery=delivery)
    assert refusal("s3cret", good, body.encode(), now) == ""
    assert refusal("other", good, body.encode(), now) == "bad signature"
    assert refusal("s3cret", good, body.encode() + b" ", now) == "bad signature"
    assert refusal("s3cret", good, body.encode(), now + 3600) == "stale"
    assert refusal("s3cret", headers(stamp=stamp, delivery=delivery), b"{}", now) == "unsigned"


def served_version(url: str, body: bytes) -> str:
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.headers["X-Model-Version"]


def wait_for_version(url: str, body: bytes, wanted: str, seconds: float) -> float:
    """Seconds until 10 answers in a row (both workers) come from `wanted`; fail after `seconds`."""
    started, in_a_row = time.monotonic(), 0
    while in_a_row < 10:
        assert time.monotonic() - started < seconds, f"{wanted} not served within {seconds} s"
        in_a_row = in_a_row + 1 if served_version(url, body) == wanted else 0
        if not in_a_row:
            time.sleep(0.05)
    return time.monotonic() - started


def metric(url: str, name: str, outcome: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf'^{name}_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.heavy
def test_an_alias_moved_on_the_server_reaches_serve_at_once_and_forgeries_are_refused(
    team_server, http_mirror, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    project = copy_project(tmp_path / "clone")
    params = compose_config(*TINY, "train.epochs=1", f"registry.model_name={MODEL}")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = team_env(team_server, MNIST_MIRROR=http_mirror)
    run(["dvc", "repro"], project, env)
    url, password, _artifacts = team_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(url)
    first = client.get_model_version_by_alias(MODEL, "champion")
    # A second version of the same model (mlflow.register_model resolves its models:/ source).
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(url)
    try:
        second = mlflow.register_model(first.source, MODEL, tags={"run_id": first.run_id})
    finally:
        mlflow.set_tracking_uri(previous)
    body = json.dumps({"inputs": [[[0] * 28] * 28]}).encode()

    # Polling every 10 minutes: only the webhook can explain a swap in seconds.
    period = 600
    port = free_port()
    command = [
        *(sys.executable, "-m", "mnist_mlops", "serve", "--port", str(port)),
        *("--model-uri", f"models:/{MODEL}@champion", "--workers", "2", "--no-log"),
        *("--follow-seconds", str(period)),
    ]
    log = tmp_path / "serve.log"
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping", project, log) as served:
        deadline = time.monotonic() + 120
        while "told of alias moves by webhook" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        hooks = [hook for hook in client.list_webhooks() if hook.url.startswith(served)]
        assert len(hooks) == 1 and hooks[0].url == f"{served}{HOOK_PATH}"
        assert served_version(served, body) == f"{MODEL}/{first.version}"
        delays = []
        for version in (second, first, second):
            client.set_registered_model_alias(MODEL, "champion", version.version)
            wanted = f"{MODEL}/{version.version}"
            delays.append(wait_for_version(served, body, wanted, period / 10))
        assert metric(served, "mnist_serving_webhook_calls", "accepted") >= 3
        print(f"webhook swap delays: {[round(delay, 2) for delay in delays]} s")
        print("\n".join(line for line in log.read_text().splitlines() if "serve:" in line))

        # Forged and unsigned calls: refused, counted, and nothing moves.
        refused = metric(served, "mnist_serving_webhook_calls", "refused")
        stamp = str(int(time.time()))
        for extra in ({}, {"X-MLflow-Signature": "v1,Zm9yZ2Vk"}):
            headers = {"X-MLflow-Timestamp": stamp, "X-MLflow-Delivery-Id": "d-1", **extra}
            request = urllib.request.Request(
                f"{served}{HOOK_PATH}", data=b"{}", headers=headers, method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(request, timeout=10)
            assert answer.value.code == 401
        assert metric(served, "mnist_serving_webhook_calls", "refused") == refused + 2
        assert served_version(served, body) == f"{MODEL}/{second.version}"
    # Stopped: its webhook is gone from the server.
    assert not [hook for hook in client.list_webhooks() if hook.url.startswith(served)]

    # A webhook whose target is down: the follower still looks every period.
    period, closed = 3, free_port()
    command[command.index("--follow-seconds") + 1] = str(period)
    command[command.index("--port") + 1] = str(port := free_port())
    command += ["--webhook-url", f"http://127.0.0.1:{closed}{HOOK_PATH}"]
    with serving(command, env, f"http://127.0.0.1:{port}", "/ping", project, log) as served:
        wait_for_version(served, body, f"{MODEL}/{second.version}", 120)
        client.set_registered_model_alias(MODEL, "champion", first.version)
        # A period, a load and a check on each worker, on a busy machine.
        wait_for_version(served, body, f"{MODEL}/{first.version}", 10 * period + 60)


def test_a_user_who_is_not_admin_gets_no_webhook_and_one_line_why(team_server, monkeypatch):
    """MLflow lets only admins register webhooks: `serve` says so in one line, and polls."""
    from mlflow.server.auth.client import AuthServiceClient

    url, password, _artifacts = team_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    user, user_password = f"user-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    AuthServiceClient(url).create_user(user, user_password)
    command = [sys.executable, "-m", "mnist_mlops.serving.webhook", "register", MODEL, "champion"]
    command.append(f"http://127.0.0.1:{free_port()}{HOOK_PATH}")
    env = team_env(
        team_server, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=user_password
    )
    result = subprocess.run(command, input="s3cret", env=env, capture_output=True, text=True)
    assert result.returncode == 1 and not result.stdout, result
    (line,) = result.stderr.strip().splitlines()
    assert "permission" in line.lower() or "admin" in line.lower(), line
