"""`mnist-mlops proxy`: nginx with TLS in front of the model server, the tracking server, or both.

MLflow's servers speak plain HTTP and read any body in full: the team
server's basic-auth passwords would cross the network in clear, and a 20 MB
request reaches the scoring server before the model's image limit refuses
it. The proxy renders deploy/nginx.conf with the project's settings into a
private folder and runs Debian's nginx in the foreground:

- HTTPS only (plain HTTP on the same port is redirected, never passed on);
- model server: only /invocations, /feedback, /ping, /health and /version
  (never /metrics: Prometheus scrapes the server's own port); bodies over
  the room for `serving.max_batch_size` images get a JSON 413 before they
  are read; more than `--rate` requests per second from one client (after a
  burst of `--burst`) get a JSON 429; `/feedback` has its own smaller body
  limit and rate (`--feedback-rate`); keep-alive connections upstream;
- tracking server: everything passes through, streamed, with its own larger
  body limit for artifact uploads.

`mnist-mlops certs` (certs.py) makes a private CA and a certificate for
127.0.0.1 and localhost, for local use and tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.processes import cannot_listen, stop_all, stop_with_parent

DEPLOY_DIR = Path("deploy")
# The model server's own limit for a feedback body (serving/observed.py).
MAX_FEEDBACK_BYTES = 64 * 1024
# How long replicas started by `--replicas` may take to load the champion.
REPLICA_START_SECONDS = 120
PIXELS_PER_IMAGE = 28 * 28
# A pixel value written in JSON as e.g. "254.99998, ": generous for integers
# (at most "255, ") and for floats printed with a few decimals.
BYTES_PER_PIXEL = 12
REQUEST_OVERHEAD_BYTES = 64 * 1024


class ProxyError(Exception):
    """The proxy cannot start as asked (no nginx, a missing certificate, a taken port)."""


@dataclass(frozen=True)
class Upstream:
    name: str  # "model" or "tracking"
    address: str  # host:port behind the proxy; the model may have several, comma-separated
    port: int  # where the proxy listens for it

    @property
    def addresses(self) -> list[str]:
        return [part.strip() for part in self.address.split(",") if part.strip()]


@dataclass(frozen=True)
class ProxySettings:
    upstreams: tuple[Upstream, ...]
    certificate: Path
    key: Path
    host: str = "127.0.0.1"
    # The name clients use, where plain HTTP is redirected: the bind address unless given.
    server_name: str = ""
    max_batch_size: int = 1024
    rate: int = 50
    burst: int = 100
    feedback_rate: int = 10
    tracking_max_body: str = "5g"


def max_body_bytes(max_batch_size: int) -> int:
    """The largest request body the model server is sent: room for `max_batch_size` images."""
    return max_batch_size * PIXELS_PER_IMAGE * BYTES_PER_PIXEL + REQUEST_OVERHEAD_BYTES


def fill(template: str, values: dict[str, object]) -> str:
    """Replace every {{name}}; a name without a value is an error, never left in the output."""
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", template)) - values.keys())
    if missing:
        raise ProxyError(f"no value for {', '.join(missing)} in the nginx template")
    return re.sub(r"\{\{(\w+)\}\}", lambda match: str(values[match.group(1)]), template)


def render(settings: ProxySettings, deploy_dir: Path = DEPLOY_DIR) -> str:
    """The complete nginx configuration for these settings."""
    values: dict[str, object] = {
        "certificate": settings.certificate.resolve(),
        "key": settings.key.resolve(),
        "host": settings.host,
        "server_name": settings.server_name or settings.host,
        "rate": settings.rate,
        "burst": settings.burst,
        "feedback_rate": settings.feedback_rate,
        "feedback_max_body": MAX_FEEDBACK_BYTES,
        "max_batch_size": settings.max_batch_size,
        "max_body_bytes": max_body_bytes(settings.max_batch_size),
        "tracking_max_body": settings.tracking_max_body,
    }
    for upstream in settings.upstreams:
        addresses = upstream.addresses
        values[f"{upstream.name}_upstream"] = addresses[0]
        values[f"{upstream.name}_servers"] = "\n".join(
            f"        server {address} max_fails=1 fail_timeout=10s;" for address in addresses
        )
        values[f"{upstream.name}_tries"] = len(addresses)
        values[f"{upstream.name}_port"] = upstream.port
    servers = [
        fill((deploy_dir / f"{upstream.name}-server.conf").read_text(), values)
        for upstream in settings.upstreams
    ]
    return fill((deploy_dir / "nginx.conf").read_text(), {**values, "servers": "\n".join(servers)})


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ProxyError("nginx is not installed (Debian: apt-get install nginx)")
    return found


def check_inputs(settings: ProxySettings) -> None:
    """One line for what a user gets wrong most: certificate files and ports."""
    for label, path in (("certificate", settings.certificate), ("key", settings.key)):
        if not path.is_file():
            raise ProxyError(f"no TLS {label} at {path}: give --{label}, or run `make certs`")
        if not os.access(path, os.R_OK):
            raise ProxyError(f"the TLS {label} {path} is not readable by this user")
    if settings.server_name and not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", settings.server_name):
        raise ProxyError(
            f"--server-name must be a host name or address, got {settings.server_name!r}"
        )
    for upstream in settings.upstreams:
        wrong = [a for a in upstream.addresses if not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", a)]
        if wrong or not upstream.addresses:
            raise ProxyError(
                f"the {upstream.name} upstream must be HOST:PORT (the model's: several, "
                f"comma-separated), got {upstream.address!r}"
            )
        if problem := cannot_listen(settings.host, upstream.port):
            raise ProxyError(
                f"cannot listen on {settings.host}:{upstream.port} for the {upstream.name} "
                f"server: {problem}"
            )


def nginx_error(output: str) -> str:
    """nginx's first emergency line, without its prefix; or its last line."""
    lines = [line for line in output.splitlines() if line.strip()]
    emergencies = [line for line in lines if "[emerg]" in line]
    line = (emergencies or lines or ["nginx failed without a message"])[0]
    return re.sub(r"^.*?\[emerg\] (\d+#\d+: )?", "", line).strip()


def prepare(settings: ProxySettings, runtime: Path) -> list[str]:
    """Write the configuration into `runtime`, test it with nginx; return the command to run it."""
    check_inputs(settings)
    configuration = runtime / "nginx.conf"
    configuration.write_text(render(settings))
    command = [nginx_binary(), "-p", f"{runtime}/", "-c", str(configuration), "-e", "stderr"]
    tested = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True, timeout=30)
    if tested.returncode != 0:
        raise ProxyError(nginx_error(tested.stderr + tested.stdout))
    return command


def start_replicas(ports: list[int]) -> list[subprocess.Popen]:
    """`mnist-mlops serve` on each port (127.0.0.1), once every one answers /ping.

    They are the proxy's children: they stop with it, killed outright included.
    Each is one process (`--workers 1`): the replicas are the processes.
    """
    replicas = []
    for port in ports:
        if problem := cannot_listen("127.0.0.1", port):
            stop_all(replicas, timeout=10)
            raise ProxyError(f"cannot start a replica on 127.0.0.1:{port}: {problem}")
        command = [sys.executable, "-m", "mnist_mlops", "serve", "--host", "127.0.0.1"]
        command += ["--workers", "1"]
        replicas.append(
            subprocess.Popen([*command, "--port", str(port)], preexec_fn=stop_with_parent)
        )
    deadline = time.monotonic() + REPLICA_START_SECONDS
    waiting = dict(zip(ports, replicas, strict=True))
    while waiting:
        for port, replica in list(waiting.items()):
            if replica.poll() is not None:
                stop_all(replicas, timeout=10)
                raise ProxyError(f"the replica on port {port} exited ({replica.returncode})")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                del waiting[port]
            except OSError:
                pass
        if waiting and time.monotonic() > deadline:
            stop_all(replicas, timeout=10)
            raise ProxyError(
                f"replicas on {sorted(waiting)} did not answer in {REPLICA_START_SECONDS} s"
            )
        time.sleep(0.2)
    return replicas


def run_proxy(settings: ProxySettings, replica_ports: list[int] | None = None) -> int:
    """Run nginx in the foreground until SIGINT or SIGTERM; return its exit status.

    With `replica_ports`, first start a model server on each and stop them afterwards.
    """
    runtime = Path(tempfile.mkdtemp(prefix="mnist-mlops-proxy-"))
    # nginx's workers run as `nobody` when it is started as root, and write
    # temporary files under this folder.
    runtime.chmod(0o711)
    replicas: list[subprocess.Popen] = []
    try:
        command = prepare(settings, runtime)
        replicas = start_replicas(replica_ports or [])
        for upstream in settings.upstreams:
            print(
                f"mnist-mlops proxy: https://{settings.host}:{upstream.port} → "
                f"http://{upstream.address} ({upstream.name} server)",
                flush=True,
            )
        process = subprocess.Popen(command, preexec_fn=stop_with_parent)
        # Ctrl-C or SIGTERM: nginx's graceful stop (SIGQUIT) finishes the
        # requests in flight; a second signal stops it at once.
        stops = iter((signal.SIGQUIT, signal.SIGTERM, signal.SIGTERM))

        def stop(_signum: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(next(stops))

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        return process.wait()
    finally:
        stop_all(replicas, timeout=10)
        shutil.rmtree(runtime, ignore_errors=True)
