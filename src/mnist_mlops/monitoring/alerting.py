"""`mnist-mlops monitoring`: Debian's Prometheus and Alertmanager, in the foreground, on 127.0.0.1.

The configurations in deploy/monitoring/ are copied into a private
temporary folder with the command's targets, ports, intervals and webhook
set, checked with promtool and amtool, and run there with private data
folders. Alertmanager's clustering is off (it would listen on every
interface). Ctrl-C or SIGTERM stops both; if the command is killed outright
the kernel stops them (PR_SET_PDEATHSIG), and if either one exits the other
is stopped too.

Both want a login (basic auth, user `monitoring`): their HTTP APIs read
every metric and, on Alertmanager, create silences, which on a shared
machine any local user could otherwise do. The password is in a 0600 file
(`monitoring.password`, or MNIST_MONITORING_PASSWORD_FILE), made at the
first start; the servers get its bcrypt hash in their web configuration,
and Prometheus the file itself for Alertmanager.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from mnist_mlops.atomic import SecretFileError, read_secret_file
from mnist_mlops.paths import MONITORING_CONFIG_DIR
from mnist_mlops.processes import cannot_listen, stop_all, stop_with_parent, wait_in_foreground

HOST = "127.0.0.1"
USERNAME = "monitoring"
PASSWORD_FILE_ENV = "MNIST_MONITORING_PASSWORD_FILE"
PASSWORD_FILE = Path("monitoring.password")
# Debian names Alertmanager's binary prometheus-alertmanager.
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")


class MonitoringError(Exception):
    """Prometheus or Alertmanager cannot be started as asked."""


@dataclass(frozen=True)
class MonitoringSettings:
    targets: tuple[str, ...] = ("127.0.0.1:5000",)
    pushgateway: str = ""
    webhook_url: str = "http://127.0.0.1:9095/alerts"
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    rules: Path = MONITORING_CONFIG_DIR / "rules.yml"
    prometheus_config: Path = MONITORING_CONFIG_DIR / "prometheus.yml"
    alertmanager_config: Path = MONITORING_CONFIG_DIR / "alertmanager.yml"
    password_file: Path = PASSWORD_FILE


def password_file() -> Path:
    return Path(os.environ.get(PASSWORD_FILE_ENV) or PASSWORD_FILE)


def login(path: Path) -> str:
    """The servers' password, from its 0600 file (made at the first start)."""
    try:
        return read_secret_file(path, make=True)
    except SecretFileError as error:
        raise MonitoringError(f"the login: {error}") from None


def web_config(password: str, runtime: Path) -> Path:
    """The web configuration both servers read: one user, the password's bcrypt hash."""
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    path = runtime / "web.yml"
    path.write_text(yaml.safe_dump({"basic_auth_users": {USERNAME: hashed}}))
    return path


def binaries() -> tuple[str, str, str, str]:
    """prometheus, promtool, alertmanager and amtool, or one line saying how to install them."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    alertmanager = next(filter(None, map(shutil.which, ALERTMANAGER_BINARIES)), None)
    amtool = shutil.which("amtool")
    if not (prometheus and promtool):
        raise MonitoringError("Prometheus is not installed (Debian: apt-get install prometheus)")
    if not (alertmanager and amtool):
        raise MonitoringError(
            "Alertmanager is not installed (Debian: apt-get install prometheus-alertmanager)"
        )
    return prometheus, promtool, alertmanager, amtool


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise MonitoringError(f"cannot read {path}: {error}") from None


def render(settings: MonitoringSettings, runtime: Path) -> tuple[Path, Path]:
    """Write the private Prometheus and Alertmanager configurations; return their paths."""
    prometheus = _read_yaml(settings.prometheus_config)
    prometheus["global"] = {
        **prometheus.get("global", {}),
        "scrape_interval": settings.scrape_interval,
        "evaluation_interval": settings.evaluation_interval,
    }
    shutil.copy(settings.rules, runtime / "rules.yml")
    prometheus["rule_files"] = ["rules.yml"]
    prometheus["alerting"] = {
        "alertmanagers": [
            {
                "static_configs": [{"targets": [f"{HOST}:{settings.alertmanager_port}"]}],
                "basic_auth": {
                    "username": USERNAME,
                    "password_file": str(settings.password_file.resolve()),
                },
            }
        ]
    }
    jobs = []
    for job in prometheus.get("scrape_configs", []):
        if job["job_name"] == "model-server":
            job["static_configs"] = [{"targets": list(settings.targets)}]
        elif job["job_name"] == "pushgateway":
            if not settings.pushgateway:
                continue
            job["static_configs"] = [{"targets": [settings.pushgateway]}]
        jobs.append(job)
    prometheus["scrape_configs"] = jobs
    alertmanager = _read_yaml(settings.alertmanager_config)
    for receiver in alertmanager.get("receivers", []):
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = settings.webhook_url
    prometheus_file, alertmanager_file = runtime / "prometheus.yml", runtime / "alertmanager.yml"
    prometheus_file.write_text(yaml.safe_dump(prometheus, sort_keys=False))
    alertmanager_file.write_text(yaml.safe_dump(alertmanager, sort_keys=False))
    return prometheus_file, alertmanager_file


def _check(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines()]
        problems = [line for line in lines if "FAILED" in line or "rror" in line] or lines
        raise MonitoringError(
            f"{what} is not valid: {problems[-1] if problems else 'no reason given'}"
        )


def prepare(settings: MonitoringSettings, runtime: Path) -> list[list[str]]:
    """Check what a user gets wrong most, render and check the configs; return the two commands."""
    prometheus, promtool, alertmanager, amtool = binaries()
    for name, port in (
        ("Prometheus", settings.prometheus_port),
        ("Alertmanager", settings.alertmanager_port),
    ):
        if problem := cannot_listen(HOST, port):
            raise MonitoringError(f"cannot listen on {HOST}:{port} for {name}: {problem}")
    web = web_config(login(settings.password_file), runtime)
    prometheus_file, alertmanager_file = render(settings, runtime)
    _check([promtool, "check", "config", str(prometheus_file)], "the Prometheus configuration")
    _check([amtool, "check-config", str(alertmanager_file)], "the Alertmanager configuration")
    _check([promtool, "check", "web-config", str(web)], "the web configuration")
    return [
        [
            alertmanager,
            f"--config.file={alertmanager_file}",
            f"--web.config.file={web}",
            f"--storage.path={runtime / 'alertmanager-data'}",
            f"--web.listen-address={HOST}:{settings.alertmanager_port}",
            f"--web.external-url=http://{HOST}:{settings.alertmanager_port}/",
            "--cluster.listen-address=",
        ],
        [
            prometheus,
            f"--config.file={prometheus_file}",
            f"--web.config.file={web}",
            f"--storage.tsdb.path={runtime / 'prometheus-data'}",
            f"--web.listen-address={HOST}:{settings.prometheus_port}",
            f"--web.external-url=http://{HOST}:{settings.prometheus_port}/",
        ],
    ]


def run_monitoring(settings: MonitoringSettings) -> int:
    """Run Alertmanager and Prometheus until SIGINT or SIGTERM, or until one of them exits."""
    runtime = Path(tempfile.mkdtemp(prefix="mnist-mlops-monitoring-"))
    processes: list[subprocess.Popen] = []
    try:
        commands = prepare(settings, runtime)
        for command in commands:
            processes.append(subprocess.Popen(command, preexec_fn=stop_with_parent))
        print(
            f"mnist-mlops monitoring: Prometheus on http://{HOST}:{settings.prometheus_port}, "
            f"Alertmanager on http://{HOST}:{settings.alertmanager_port}, scraping "
            f"{', '.join(settings.targets)}; login {USERNAME}, password in "
            f"{settings.password_file}",
            flush=True,
        )
        return wait_in_foreground(processes)
    finally:
        stop_all(processes)
        shutil.rmtree(runtime, ignore_errors=True)
