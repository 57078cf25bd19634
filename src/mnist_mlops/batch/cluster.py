"""`mnist-mlops spark-cluster`: a standalone Spark master and worker on 127.0.0.1 (foreground).

For trying the spark engine on a real cluster on one machine (and for the
tests and the benchmark): pyspark ships `bin/spark-class`, not the `sbin/`
scripts, so the master and the worker are started with it, both bound to
127.0.0.1 (`--host`, SPARK_LOCAL_IP), their work and logs in a temporary
folder. It prints the master's URL once a worker has registered, and stops
both on Ctrl-C or SIGTERM.
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

from mnist_mlops.batch.formats import BatchError
from mnist_mlops.processes import cannot_listen, stop_all, stop_with_parent, wait_in_foreground

HOST = "127.0.0.1"


@dataclass(frozen=True)
class ClusterSettings:
    port: int = 7077
    ui_port: int = 8080
    worker_ui_port: int = 8081
    cores: int = 2
    memory: str = "2g"


def commands(settings: ClusterSettings) -> list[list[str]]:
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
        ],
        [
            *(spark_class, "org.apache.spark.deploy.worker.Worker", "--host", HOST),
            *("--webui-port", str(settings.worker_ui_port), "--cores", str(settings.cores)),
            *("--memory", settings.memory, f"spark://{HOST}:{settings.port}"),
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
    from mnist_mlops.batch.spark import java

    java()
    for port in (settings.port, settings.ui_port, settings.worker_ui_port):
        problem = cannot_listen(HOST, port)
        if problem:
            raise BatchError(f"cannot listen on {HOST}:{port}: {problem}")
    runtime = Path(tempfile.mkdtemp(prefix="mnist-mlops-spark-"))
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": HOST,
        "SPARK_WORKER_DIR": str(runtime / "work"),
        "SPARK_LOG_DIR": str(runtime / "logs"),
    }
    processes: list[subprocess.Popen] = []
    try:
        for command, name in zip(commands(settings), ("master", "worker"), strict=True):
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
