"""Helpers for the servers the commands run in the foreground (nginx, Prometheus, Alertmanager)."""

import ctypes
import signal
import socket


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
