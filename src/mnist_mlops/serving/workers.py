"""`mnist-mlops serve --workers N`: N server processes on one port, so that every core answers.

One process answers on one core: the event loop and the model share one
GIL. This process (the supervisor) holds the port and forks the workers at
once, one per core; only the first loads the model, the others import what
serving needs and wait for its first answer. So the first answer comes as
soon as with one process, a model that cannot be loaded is reported once,
and the others listen a model load later (a second or two), not a whole
start later: keep-alive connections a client opens just after the first
answer do not all land on the first worker. Workers beyond the cores start
after the first answer. The supervisor has imported no more than the
command line and holds no thread. Each worker listens on the port with a
socket of its own (SO_REUSEPORT): the kernel spreads the connections over
them. Each is a whole server (server.py): its
own model and ONNX session, the hot path, its own part of the inference log
(as replicas write theirs), and a follower of the alias. Besides:

- metrics in prometheus_client's multiprocess mode, in a private folder of
  the supervisor's, so that `/metrics` from any worker reads as one server
  (the counters of a worker that died stay counted);
- a swap announced to the others through a file in that folder: a worker
  that sees a version announced looks at the alias at once, so all of them
  serve the new version within one load of the first (follow.HINT_SECONDS
  plus a load, 1–3 s here), not one follow interval apart;
- a worker that dies is replaced (no more than once per RESTART_SECONDS);
- SIGINT or SIGTERM goes to every worker, each finishes its requests in
  flight, and the folder is removed;
- a registry webhook (webhook.py), registered by the supervisor once the
  workers start and deleted at the stop; the workers share its secret in memory.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from mnist_mlops.processes import Forked, port_taken, stop_all, stop_with_parent
from mnist_mlops.serving import webhook

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker that exits with this status before it answered could not load the model.
STARTUP_FAILED = 1
RESTART_SECONDS = 1.0
STOP_SECONDS = 30.0
FOLDER_PREFIX = "mnist-serve-"


def remove_abandoned_folders() -> None:
    """Remove this user's worker folders whose supervisor no longer runs (killed with SIGKILL)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).split("-", 1)[0]
        try:
            mine = folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def supervise(model_uri, host, port, observation, follow_seconds, workers, hook_url="") -> int:
    """Serve with `workers` processes until SIGINT or SIGTERM; return the exit status."""
    if taken := port_taken(host, port, "make serve PORT=…, or --port"):
        print(f"mnist-mlops serve: {taken}", file=sys.stderr)
        return 1
    # Held, never listening: another server's check of the port finds it taken.
    try:
        reservation = port_socket(host, port)
    except OSError as error:
        print(
            f"mnist-mlops serve: cannot listen on {host}:{port}: {error.strerror}", file=sys.stderr
        )
        return 1
    # Private to this user; gone with the supervisor (or, if it was killed
    # outright, with the next server's start).
    remove_abandoned_folders()
    folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
    (folder / "metrics").mkdir()
    # Before prometheus_client is imported anywhere: it picks its multiprocess
    # values at import, and forked workers inherit what the supervisor imported.
    os.environ[MULTIPROCESS_ENV] = str(folder / "metrics")
    told = hook_url and webhook.wanted(model_uri, follow_seconds)
    spec = {
        "model_uri": model_uri,
        "metrics": observation.metrics,
        "access_log": observation.access_log,
        "log": None if observation.log is None else asdict(observation.log),
        "follow_seconds": follow_seconds,
        "folder": str(folder),
        "host": host,
        "port": port,
        "hook_secret": webhook.new_secret() if told else "",
    }
    pool = Pool(spec, workers, reservation)
    stopping: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    hook_id = ""
    try:
        if not pool.start_first(stopping):
            return STARTUP_FAILED if not stopping else 0
        print(
            f"mnist-mlops serve: {model_uri} on http://{host}:{port}, {workers} worker processes",
            flush=True,
        )
        pool.start_rest()
        if spec["hook_secret"]:
            hook_id = webhook.told_from_elsewhere(model_uri, hook_url, spec["hook_secret"])
        while not stopping:
            pool.replace_dead()
            time.sleep(0.2)
    finally:
        reservation.close()
        pool.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if hook_id:
            webhook.unregister_elsewhere(hook_id)
    signal.signal(stopping[0], signal.SIG_DFL)
    os.kill(os.getpid(), stopping[0])  # ends by the signal, as uvicorn does with one process
    return 0


class Pool:
    """The worker processes, by slot."""

    def __init__(self, spec: dict, size: int, reservation: socket.socket) -> None:
        self.spec, self.size, self.reservation = spec, size, reservation
        self.processes: dict[int, Forked] = {}
        self.started: dict[int, float] = {}
        self.waiting: dict[int, int] = {}  # slot: the pipe that tells it to go on

    def start(self, slot: int, ready: int | None = None, go: int | None = None) -> Forked:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            status = STARTUP_FAILED
            try:
                # A process group of its own: a terminal's Ctrl-C reaches the supervisor
                # alone, which stops each worker once; a supervisor killed outright
                # takes them along.
                os.setpgid(0, 0)
                stop_with_parent()
                for signum in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_DFL)
                self.reservation.close()
                for other in self.waiting.values():
                    os.close(other)
                status = run_worker({**self.spec, "slot": slot, "ready": ready, "go": go})
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        process = Forked(pid)
        self.processes[slot], self.started[slot] = process, time.monotonic()
        return process

    def start_first(self, stopping: list) -> bool:
        """Start worker 0 and wait until it answers; False if it could not start."""
        read, write = os.pipe()
        process = self.start(0, write)
        os.close(write)
        for slot in range(1, min(self.size, len(os.sched_getaffinity(0)))):
            go, self.waiting[slot] = os.pipe()
            self.start(slot, go=go)
            os.close(go)
        try:
            while not stopping:
                readable, _, _ = select.select([read], [], [], 0.2)
                if readable:
                    return os.read(read, 1) == b"r"
                if process.poll() is not None:
                    return False
            return False
        finally:
            os.close(read)

    def start_rest(self) -> None:
        """Let the waiting workers load the model, and start the ones beyond the cores."""
        for slot, go in list(self.waiting.items()):
            with contextlib.suppress(OSError):  # it died meanwhile: replace_dead starts another
                os.write(go, b"g")
            os.close(go)
            del self.waiting[slot]
        for slot in range(1, self.size):
            if slot not in self.processes:
                self.start(slot)

    def replace_dead(self) -> None:
        for slot, process in list(self.processes.items()):
            status = process.poll()
            if status is None or time.monotonic() - self.started[slot] < RESTART_SECONDS:
                continue
            self._forget(process)
            how = f"signal {-status}" if status < 0 else f"status {status}"
            line = f"worker {slot} (pid {process.pid}) ended ({how}); starting another"
            print(f"mnist-mlops serve: {line}", file=sys.stderr, flush=True)
            self.start(slot)

    def stop(self) -> None:
        for go in self.waiting.values():  # never told to go on: they end without a word
            os.close(go)
        self.waiting.clear()
        stop_all(list(self.processes.values()), STOP_SECONDS)
        for process in self.processes.values():
            self._forget(process)

    def _forget(self, process: Forked) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(process.pid, str(Path(self.spec["folder"]) / "metrics"))


def run_worker(spec: dict) -> int:
    """One worker: load the model, then answer on its own socket until a signal."""
    import uvicorn

    from mnist_mlops.monitoring.inference_log import LogSettings
    from mnist_mlops.serving.server import Observation, ServeError, load_app

    class ReadyServer(uvicorn.Server):
        """uvicorn's server, writing one byte to the supervisor's pipe once it answers."""

        def __init__(self, config, ready: int | None) -> None:
            super().__init__(config)
            self.ready = ready

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.ready is not None and self.started:
                os.write(self.ready, b"r")
                os.close(self.ready)
                self.ready = None

    if spec["go"] is not None:
        from mnist_mlops.serving.server import import_server_modules

        import_server_modules()
        told = os.read(spec["go"], 1)
        os.close(spec["go"])
        if told != b"g":  # the first worker could not start, or the server is stopping
            return 0
    log = spec["log"] and LogSettings(**spec["log"])
    observation = Observation(metrics=spec["metrics"], log=log, access_log=spec["access_log"])
    try:
        following = (spec["follow_seconds"], spec["folder"], spec["hook_secret"])
        app = load_app(spec["model_uri"], observation, *following)
    except ServeError as error:
        print(f"mnist-mlops serve: {error}", file=sys.stderr)
        return STARTUP_FAILED
    try:
        listener = port_socket(spec["host"], spec["port"])
    except OSError as error:
        print(f"mnist-mlops serve: cannot listen on port {spec['port']}: {error}", file=sys.stderr)
        return STARTUP_FAILED
    config = uvicorn.Config(app, log_level="info", access_log=observation.access_log)
    ReadyServer(config, spec["ready"]).run(sockets=[listener])
    app.close()
    return 0


def port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port beside the other workers' (SO_REUSEPORT), not yet listening.

    One listening socket per worker, not one shared: the kernel spreads new
    connections evenly over them. On a shared socket, the first worker awake
    took every connection a client opened at once, and kept them (keep-alive).
    Only processes of the same user can join the port this way.
    """
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    return listener
