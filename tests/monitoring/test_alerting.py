"""Prometheus and Alertmanager from Debian (.ci/run installs them), run by `mnist-mlops monitoring`.

Elsewhere, without them, these tests skip with the reason; under CI they fail.
"""

import base64
import http.server
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from mnist_mlops.processes import cannot_listen

from ..conftest import (
    REPO_ROOT,
    command_lines,
    free_port,
    run,
    subprocess_env,
    train_champion,
    unavailable,
)

MONITORING = REPO_ROOT / "deploy" / "monitoring"


@pytest.fixture(autouse=True)
def _debian_packages():
    for binary in ("prometheus", "promtool", "amtool"):
        if not shutil.which(binary):
            unavailable(f"{binary} is not installed (Debian: prometheus, prometheus-alertmanager)")


def test_the_rules_pass_their_unit_tests_and_every_rule_has_one():
    tested = run(["promtool", "test", "rules", str(MONITORING / "rules.test.yml")], REPO_ROOT, {})
    assert "SUCCESS" in tested.stdout
    run(["promtool", "check", "config", str(MONITORING / "prometheus.yml")], REPO_ROOT, {})
    run(["amtool", "check-config", str(MONITORING / "alertmanager.yml")], REPO_ROOT, {})
    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((MONITORING / "rules.test.yml").read_text())["tests"]
    covered = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert alerts == covered
    assert {"ModelServerDown", "ModelServerErrors", "ModelServerSlow"} <= alerts
    assert {"ModelConfidenceFalling", "ModelNoTraffic", "ModelDriftReported"} <= alerts


def monitoring_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "mnist_mlops", "monitoring", *arguments]


def refused(arguments: list[str], env=None, login: Path | None = None) -> str:
    env = env or subprocess_env()
    env["MNIST_MONITORING_PASSWORD_FILE"] = str(login or Path(tempfile.mkdtemp()) / "login")
    result = run(monitoring_command(*arguments), REPO_ROOT, env, check=False)
    assert result.returncode == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mnist-mlops")]
    return line


def test_what_a_user_gets_wrong_gets_one_line(tmp_path):
    broken = tmp_path / "rules.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: up ==\n")
    ports = ("--prometheus-port", str(free_port()), "--alertmanager-port", str(free_port()))
    line = refused(["--rules", str(broken), *ports])
    assert line.startswith("mnist-mlops monitoring: the Prometheus configuration is not valid")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refused(["--prometheus-port", str(port), "--alertmanager-port", str(free_port())])
    assert line == (
        f"mnist-mlops monitoring: cannot listen on 127.0.0.1:{port} for Prometheus: "
        "Address already in use"
    )
    without = subprocess_env(PATH=str(REPO_ROOT / ".venv" / "bin"))
    line = refused(list(ports), env=without)
    assert line == (
        "mnist-mlops monitoring: Prometheus is not installed (Debian: apt-get install prometheus)"
    )


class Receiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver: keeps every alert Alertmanager posts."""

    alerts: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Receiver.alerts.extend(body["alerts"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def authorized(url: str, password: str | None, data: bytes | None = None):
    """A request with the monitoring login (none when `password` is None)."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if password is not None:
        token = base64.b64encode(f"monitoring:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def query(prometheus: str, expression: str, password: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expression)}"
    try:
        with urllib.request.urlopen(authorized(url, password), timeout=5) as answer:
            return json.load(answer)["data"]["result"]
    except OSError:
        return []


def status_without_login(url: str, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(authorized(url, None, data), timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.5)
    pytest.fail(f"{what} within {seconds} s")


def test_prometheus_scrapes_the_server_and_its_death_reaches_the_webhook(tmp_path):
    uri, images = train_champion(tmp_path)
    server_port, prometheus_port, alertmanager_port = free_port(), free_port(), free_port()
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    # The shipped rules and routes with test-sized waits.
    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "ModelServerDown":
                rule["for"] = "2s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    routes = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
    routes["route"].update(group_wait="1s", group_interval="1s")
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(routes))

    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    login = tmp_path / "monitoring.password"
    server = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlops", "serve", "--port", str(server_port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    monitoring = subprocess.Popen(
        monitoring_command(
            *("--targets", f"127.0.0.1:{server_port}"),
            *("--prometheus-port", str(prometheus_port)),
            *("--alertmanager-port", str(alertmanager_port)),
            *("--scrape-interval", "1s", "--evaluation-interval", "1s"),
            *("--rules", str(tmp_path / "rules.yml")),
            *("--alertmanager-config", str(tmp_path / "alertmanager.yml")),
            *("--webhook-url", f"http://127.0.0.1:{receiver.server_address[1]}/"),
        ),
        cwd=REPO_ROOT,
        env=subprocess_env(MNIST_MONITORING_PASSWORD_FILE=str(login)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    prometheus = f"http://127.0.0.1:{prometheus_port}"
    alertmanager = f"http://127.0.0.1:{alertmanager_port}"
    try:
        wait_until(login.exists, 60, "the login was not made")
        password = login.read_text().strip()
        assert login.stat().st_mode & 0o777 == 0o600
        up = 'up{job="model-server"} == 1'
        wait_until(
            lambda: query(prometheus, up, password), 120, "Prometheus did not see the server up"
        )
        # Without the login nothing is read, and no silence is made.
        assert status_without_login(f"{prometheus}/api/v1/query?query=up") == 401
        silence = json.dumps(
            {
                "matchers": [{"name": "alertname", "value": "ModelServerDown", "isRegex": False}],
                "startsAt": "2026-01-01T00:00:00Z",
                "endsAt": "2099-01-01T00:00:00Z",
                "createdBy": "a stranger",
                "comment": "quiet",
            }
        ).encode()
        assert status_without_login(f"{alertmanager}/api/v2/silences", silence) == 401
        assert password not in command_lines()
        for _ in range(3):
            body = json.dumps({"inputs": images[:1].tolist()}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{server_port}/invocations",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            urllib.request.urlopen(request, timeout=30).close()
        moved = 'sum(mnist_serving_requests_total{path="/invocations", status="200"}) >= 3'
        wait_until(
            lambda: query(prometheus, moved, password), 30, "the request counter did not move"
        )

        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        firing = wait_until(
            lambda: [
                alert
                for alert in Receiver.alerts
                if alert["labels"]["alertname"] == "ModelServerDown" and alert["status"] == "firing"
            ],
            90,
            "the ModelServerDown alert did not reach the webhook",
        )
        assert firing[0]["labels"]["instance"] == f"127.0.0.1:{server_port}"
        assert firing[0]["labels"]["severity"] == "page"
        monitoring.send_signal(signal.SIGTERM)
        assert monitoring.wait(timeout=30) == 0
    finally:
        for process in (server, monitoring):
            process.kill()
        receiver.shutdown()
    assert "scraping 127.0.0.1" in monitoring.stdout.read()
    # Both servers are gone: nothing holds their ports any more.
    assert cannot_listen("127.0.0.1", prometheus_port) == ""
    assert cannot_listen("127.0.0.1", alertmanager_port) == ""
