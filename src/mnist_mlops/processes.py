"""Helpers for the servers the commands run in the foreground (nginx, Prometheus, Alertmanager,
Spark's master and worker, the model server's workers), and for the commands' own processes."""

import contextlib
import ctypes
import gc
import os
import signal
import socket
import subprocess
import time

# The garbage collector's first threshold: Python collects after 700 new container
# objects. A command imports TensorFlow, Keras or MLflow, hundreds of thousands of
# objects that live as long as the process, and the collector went through them
# again and again: 17 % of a tiny training stage's CPU (10.1 CPU-seconds against
# 8.3), 10 % of an evaluation's. At 10,000 it runs a fourteenth as often, and
# every cycle of garbage is still found.
COLLECT_AFTER = 10_000


def collect_less() -> None:
    """At a command's start: the collector's first threshold at COLLECT_AFTER."""
    gc.set_threshold(COLLECT_AFTER, *gc.get_threshold()[1:])


def stop_with_parent() -> None:
    """In a child before it starts: the kernel sends it SIGTERM if the command that runs it dies.

    Killed outright (SIGKILL, the OOM killer), a command could not stop its
    server, which would keep running and hold its ports. Linux's
    PR_SET_PDEATHSIG does it instead.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def cannot_listen(host: str, port: int) -> str:
    """Why nothing could listen on host:port now ("Address already in use", …); "" if it could."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.strerror or str(error)
    return ""


def port_taken(host: str, port: int, choose: str) -> str:
    """A server's one line for a port it cannot have ("" when free), saying how to pick another.

    Checked before a server loads anything or prints a banner, so that a
    second copy never claims to serve before it fails.
    """
    problem = cannot_listen(host, port)
    if not problem:
        return ""
    return (
        f"cannot listen on {host}:{port}: {problem} (another server? choose another port: {choose})"
    )


def wait_in_foreground(processes: list[subprocess.Popen]) -> int:
    """Wait until SIGINT or SIGTERM, or until one of `processes` exits; return the exit status."""
    stopping: list[bool] = []

    def stop(_signum: int, _frame: object) -> None:
        stopping.append(True)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(process.poll() is None for process in processes):
        time.sleep(0.2)
    return next((process.returncode for process in processes if process.returncode), 0)


def stop_all(processes: list[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM every process, then SIGKILL those still running after `timeout` seconds."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()


class Forked:
    """A worker forked from the supervisor, with the part of subprocess.Popen that stop_all uses."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def terminate(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
