"""`mnist-mlops spark-cluster`: a standalone Spark master and worker on 127.0.0.1 (foreground).

For trying the spark engine on a real cluster on one machine (and for the
tests and the benchmark): pyspark ships `bin/spark-class`, not the `sbin/`
scripts, so the master and the worker are started with it, both bound to
127.0.0.1 (`--host`, SPARK_LOCAL_IP), their work and logs in a temporary
folder. It prints the master's URL once a worker has registered, and stops
both on Ctrl-C or SIGTERM.

Nothing on it runs code for someone without the cluster's secret: Spark's
REST submission server (6066 by default, no login) is off, every RPC
connection is authenticated with a shared secret (`spark.authenticate`), and
the web UIs cannot kill applications. The secret comes from a 0600 file
(`spark.secret`, or MNIST_SPARK_SECRET_FILE), made at the first start and
handed to the daemons in their environment, never on a command line; `mnist-mlops
score --engine spark` reads the same file. The ports it opens, all on
127.0.0.1: the master's (7077), its UI (8080), the worker's UI (8081) and
the worker's own RPC port (a free one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.atomic import SecretFileError, read_secret_file
from mnist_mlops.batch.formats import BatchError
from mnist_mlops.processes import cannot_listen, stop_all, stop_with_parent, wait_in_foreground

HOST = "127.0.0.1"
SECRET_FILE_ENV = "MNIST_SPARK_SECRET_FILE"
SECRET_FILE = Path("spark.secret")
# Spark's standalone daemons read their shared secret from this variable.
SECRET_ENV = "_SPARK_AUTH_SECRET"
# What every daemon of the cluster runs with (a properties file, not argv).
PROPERTIES = {
    "spark.master.rest.enabled": "false",
    "spark.authenticate": "true",
    "spark.ui.killEnabled": "false",
}


@dataclass(frozen=True)
class ClusterSettings:
    port: int = 7077
    ui_port: int = 8080
    worker_ui_port: int = 8081
    cores: int = 2
    memory: str = "2g"


def java() -> str:
    home = os.environ.get("JAVA_HOME")
    candidate = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not candidate or not os.access(candidate, os.X_OK):
        raise BatchError(
            "the spark engine needs Java 17 and found none: install it "
            "(Debian: apt install openjdk-17-jre-headless) or set JAVA_HOME"
        )
    return candidate


def secret_file() -> Path:
    return Path(os.environ.get(SECRET_FILE_ENV) or SECRET_FILE)


def read_or_make_secret(path: Path, make: bool) -> str:
    """The cluster's shared secret; made (0600) when `make` and there is none yet."""
    try:
        return read_secret_file(path, make)
    except SecretFileError as error:
        hint = (
            f": the cluster makes it at its first start (mnist-mlops spark-cluster); point "
            f"{SECRET_FILE_ENV} at its file"
            if not path.exists()
            else ""
        )
        raise BatchError(f"the Spark secret: {error}{hint}") from None


def commands(settings: ClusterSettings, properties: Path) -> list[list[str]]:
    try:
        import pyspark
    except ImportError:
        raise BatchError(
            "pyspark is not installed: pip install -r requirements-spark.txt"
        ) from None
    spark_class = str(Path(pyspark.__file__).parent / "bin" / "spark-class")
    return [
        [
            *(spark_class, "org.apache.spark.deploy.master.Master", "--host", HOST),
            *("--port", str(settings.port), "--webui-port", str(settings.ui_port)),
            *("--properties-file", str(properties)),
        ],
        [
            *(spark_class, "org.apache.spark.deploy.worker.Worker", "--host", HOST),
            *("--webui-port", str(settings.worker_ui_port), "--cores", str(settings.cores)),
            *("--memory", settings.memory, "--properties-file", str(properties)),
            f"spark://{HOST}:{settings.port}",
        ],
    ]


def wait_for_worker(settings: ClusterSettings, processes, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            raise BatchError("the Spark master or worker stopped while starting")
        with contextlib.suppress(OSError, ValueError):
            url = f"http://{HOST}:{settings.ui_port}/json"
            with urllib.request.urlopen(url, timeout=2) as answer:
                if json.load(answer).get("aliveworkers", 0) >= 1:
                    return
        time.sleep(0.5)
    raise BatchError(f"no Spark worker registered with the master within {seconds:.0f} s")


def run_cluster(settings: ClusterSettings) -> int:
    """Run the master and a worker until SIGINT or SIGTERM, or until one of them exits."""
    java()
    secret = read_or_make_secret(secret_file(), make=True)
    for port in (settings.port, settings.ui_port, settings.worker_ui_port):
        problem = cannot_listen(HOST, port)
        if problem:
            raise BatchError(f"cannot listen on {HOST}:{port}: {problem}")
    runtime = Path(tempfile.mkdtemp(prefix="mnist-mlops-spark-"))
    properties = runtime / "spark-defaults.conf"
    properties.write_text("".join(f"{key} {value}\n" for key, value in PROPERTIES.items()))
    env = {
        **os.environ,
        SECRET_ENV: secret,
        "SPARK_LOCAL_IP": HOST,
        "SPARK_WORKER_DIR": str(runtime / "work"),
        "SPARK_LOG_DIR": str(runtime / "logs"),
    }
    processes: list[subprocess.Popen] = []
    try:
        for command, name in zip(commands(settings, properties), ("master", "worker"), strict=True):
            with open(runtime / f"{name}.log", "w") as log:
                processes.append(
                    subprocess.Popen(
                        command,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        preexec_fn=stop_with_parent,
                    )
                )
        wait_for_worker(settings, processes)
        print(
            f"mnist-mlops spark-cluster: spark://{HOST}:{settings.port} with one worker "
            f"({settings.cores} cores, {settings.memory}); master UI http://{HOST}:{settings.ui_port}",
            flush=True,
        )
        return wait_in_foreground(processes)
    finally:
        stop_all(processes, timeout=30)
        shutil.rmtree(runtime, ignore_errors=True)
