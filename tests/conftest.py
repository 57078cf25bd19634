"""Shared fixtures: tiny MNIST in the real file formats, a composed config, a project copy.

Everything is real: the data files are genuine `.npz` and gzip IDX files, the
config is composed from conf/ by Hydra, the MLflow store is SQLite in tmp_path,
and HTTP goes over 127.0.0.1.
"""

import gzip
import hashlib
import http.server
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mnist_mlops.config import Config, validate
from mnist_mlops.pipeline.fetch import IDX_FILES, NPZ_FILE
from mnist_mlops.processes import collect_less

from .cpu_time import (  # noqa: F401  (hooks: what each test costs in CPU, --cpu-top)
    pytest_addoption,
    pytest_runtest_call,
    pytest_runtest_logreport,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_runtest_teardown,
    pytest_sessionstart,
    pytest_terminal_summary,
)
from .scheduling import pytest_collection_modifyitems  # noqa: F401  (a hook: the longest first)

# The suite runs more workers than the machine has cores (Makefile: TEST_WORKERS):
# every TensorFlow process here, in-process fits and the stages the tests start,
# runs on one thread, so that its thread pools do not spin against the others'.
# Measured on the reference machine: the seed's fit took 27 % less CPU in the same
# time, idle or loaded; the cnn_fast preset's epoch, 16 % less under load.
for _threads in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(_threads, "1")
# Likewise one model-server process for each `mnist-mlops serve` a test starts (a
# worker per core by default, each loading the model: about 4 CPU-seconds more per
# server here). The tests of the workers themselves pass --workers; the tour runs
# the README's `serve` as a user's shell does, a worker per core.
os.environ.setdefault("MNIST_SERVE_WORKERS", "1")
# Spark's JVMs here live for seconds: the master, worker and driver of a test compile
# with the quick JIT alone and collect with the serial collector. Measured on the batch
# tests: the machine's CPU 2.2 minutes instead of 2.6. Spark's own behaviour is unchanged.
for _java in ("SPARK_SUBMIT_OPTS", "SPARK_DAEMON_JAVA_OPTS"):
    os.environ.setdefault(_java, "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
# The suite's own processes collect garbage as the commands do (processes.py): they
# import TensorFlow and MLflow and fit, too.
collect_less()

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist"
PROJECT_FILES = (
    "conf",
    "src",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    "data/feedback/README.md",
    ".gitignore",
    "pyproject.toml",
)
TRAIN_EXAMPLES = 200
TEST_EXAMPLES = 50


def tiny_mnist(train_examples: int = TRAIN_EXAMPLES, test_examples: int = TEST_EXAMPLES, seed=0):
    """Learnable fake digits: each class lights its own band of rows, plus noise."""
    generator = np.random.default_rng(seed)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(count, dtype=np.uint8) % 10
        generator.shuffle(labels)
        images = generator.integers(0, 60, size=(count, 28, 28), dtype=np.uint8)
        for index, label in enumerate(labels):
            images[index, 2 + 2 * label : 5 + 2 * label, 4:24] = 255
        return images, labels

    return split(train_examples), split(test_examples)


def idx_bytes(array: np.ndarray) -> bytes:
    magic = (0x08 << 8) | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mirror(directory: Path, data=None) -> dict[str, str]:
    """Write tiny MNIST as mnist.npz, the four IDX files and SHA256SUMS; return the checksums."""
    (train_images, train_labels), (test_images, test_labels) = data or tiny_mnist()
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(
        directory / NPZ_FILE,
        x_train=train_images,
        y_train=train_labels,
        x_test=test_images,
        y_test=test_labels,
    )
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    for key, name in IDX_FILES.items():
        (directory / name).write_bytes(gzip.compress(idx_bytes(arrays[key]), mtime=0))
    checksums = {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in [NPZ_FILE, *IDX_FILES.values()]
    }
    (directory / "SHA256SUMS").write_text(
        "".join(f"{digest}  {name}\n" for name, digest in checksums.items())
    )
    return checksums


@pytest.fixture
def mirror(tmp_path) -> Path:
    directory = tmp_path / "mirror"
    write_mirror(directory)
    return directory


def compose_config(*overrides: str) -> dict:
    """Compose conf/ exactly as DVC does, with Hydra overrides."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        composed = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(composed, resolve=True)


# Tiny data of the tests' own: any count of images, and not MNIST's pinned content.
# On 50 test images a class or a perturbation moves by whole points between two
# trainings: the gate's robustness rules are off here and tested on their own.
TINY_DATA = (
    "data.train_examples=null",
    "data.test_examples=null",
    "data.content_sha256=null",
    "registry.robustness_tolerance=1",
    "registry.worst_class_floor=0",
)


def tiny_overrides(source: Path | str) -> list[str]:
    return [
        f"data.source={source}",
        "data.sha256sums=SHA256SUMS",
        *TINY_DATA,
        "train.epochs=2",
        "train.batch_size=32",
        "data.retries=1",
        "data.timeout_seconds=2",
    ]


@pytest.fixture
def config(mirror) -> Config:
    return validate(compose_config(*tiny_overrides(mirror)))


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A project folder as the working directory, with its own MLflow store."""
    directory = tmp_path / "project"
    directory.mkdir()
    monkeypatch.chdir(directory)
    for variable in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "MNIST_MIRROR"):
        monkeypatch.delenv(variable, raising=False)
    yield directory
    import mlflow

    if mlflow.active_run():
        mlflow.end_run()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for the project's commands: this venv first, no telemetry."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "DVC_")) and key != "MNIST_MIRROR"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    env.update(extra)
    return env


def run(command: list[str], cwd: Path, env: dict, check: bool = True, timeout: float = 900):
    """Run a command to completion; a command that hangs fails the test after `timeout` seconds."""
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(
            f"{' '.join(command)} did not finish in {timeout:.0f} s\n"
            f"stdout:\n{expired.stdout}\nstderr:\n{expired.stderr}"
        ) from None
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def kill_processes_in(directory: Path) -> list[int]:
    """Kill every process working in `directory` (Linux), such as a queue worker left behind."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = (entry / "cwd").resolve(strict=True)
        except OSError:  # gone already, or not ours to see
            continue
        if cwd == directory.resolve() or directory.resolve() in cwd.parents:
            with suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def parent_of(pid: int) -> int | None:
    """The parent of process `pid` (Linux /proc), None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return None


def descendants(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := parent_of(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def tcp_sockets(pids: set[int], listening: bool = False) -> set[tuple[str, int]]:
    """(local address, port) of the TCP sockets the processes `pids` hold, from /proc.

    IPv4 addresses (and IPv4 mapped into IPv6) as dotted quads; `listening`: LISTEN ones only.
    """
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes or (listening and fields[3] != "0A"):
                continue
            address, port = fields[1].split(":")
            host = address
            if len(address) == 8:
                host = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
            elif address == "0" * 24 + "01000000":
                host = "::1"
            elif address.startswith("0000000000000000FFFF0000"):
                host = ".".join(str(int(address[i : i + 2], 16)) for i in (30, 28, 26, 24))
            found.add((host, int(port, 16)))
    return found


def copy_project(directory: Path) -> Path:
    """Copy this project into `directory`, a fresh git repository, as a user's clone would be."""
    directory.mkdir()
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(
                source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(source, target)
    env = subprocess_env()
    run(["git", "init", "-q", "-b", "main"], directory, env)
    run(["git", "add", "-A"], directory, env)
    run(["git", "commit", "-q", "-m", "clone"], directory, env)
    return directory


@pytest.fixture
def project(tmp_path) -> Path:
    return copy_project(tmp_path / "clone")


def train_champion(directory: Path, *overrides: str) -> tuple[str, np.ndarray]:
    """Make `directory` a project whose store holds a champion trained on tiny data.

    Runs the real stages in-process; returns the store's URI and the test images.
    """
    from mnist_mlops.pipeline.evaluate import evaluate
    from mnist_mlops.pipeline.fetch import fetch
    from mnist_mlops.pipeline.preprocess import load_split, preprocess
    from mnist_mlops.pipeline.train import train

    write_mirror(directory / "mirror")
    config = validate(compose_config(*tiny_overrides(directory / "mirror"), *overrides))
    previous = os.getcwd()
    saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(directory)
    try:
        fetch(config.data)
        preprocess(config)
        train(config)
        evaluate(config)
        images, _labels = load_split("test")
    finally:
        os.chdir(previous)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved_uri:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri
    return f"sqlite:///{directory / 'mlflow.db'}", images


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(
    command: list[str], env: dict, url: str, ready_path: str, cwd=None, log=None, context=None
):
    """Run a server command until `url + ready_path` answers; stop it afterwards.

    Its output goes to a file (`log`, or a temporary one), not a pipe: a pipe
    that nobody reads fills up after 64 KB of access log, and the server then
    blocks on its next write. `context` is the SSL context for an https:// URL.
    """
    with open(log, "w+") if log else tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True
        )
        try:
            _wait_until_ready(process, command, output, f"{url}{ready_path}", context)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_until_ready(process, command: list[str], log, ready_url: str, context=None) -> None:
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"{command[0]} exited:\n{log.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{' '.join(command)} did not answer within 120 s")
        try:
            with urllib.request.urlopen(ready_url, timeout=2, context=context):
                return
        except urllib.error.HTTPError:
            return  # it answers, if only to say that we may not
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)


def without_s3_keys(env: dict) -> dict:
    """A client's environment: no AWS_* settings at all, so it could not reach S3 itself."""
    return {name: value for name, value in env.items() if not name.startswith("AWS_")}


def tracking_server(postgres, database: str, destination: str, port: int, **extra: str):
    """The command, environment and admin password of `mnist-mlops tracking-server`."""
    admin_uri, postgres_port = postgres
    # The same role password for the same database: a moved server reuses its database.
    role_password = f"role-{abs(hash(database)) % 10**12}"
    backend = f"postgresql://{database}:{role_password}@127.0.0.1:{postgres_port}/{database}"
    password = extra.pop("admin_password", f"team-{secrets.token_hex(10)}")
    command = [
        *(sys.executable, "-m", "mnist_mlops", "tracking-server"),
        *("--backend-store-uri", backend, "--admin-uri", admin_uri),
        *("--artifacts-destination", destination, "--port", str(port)),
    ]
    return command, subprocess_env(MLFLOW_TRACKING_ADMIN_PASSWORD=password, **extra), password


def client_env(url: str, password: str, **extra: str) -> dict:
    return without_s3_keys(
        subprocess_env(
            MLFLOW_TRACKING_URI=url,
            MLFLOW_TRACKING_USERNAME="admin",
            MLFLOW_TRACKING_PASSWORD=password,
            **extra,
        )
    )


def unavailable(reason: str):
    """Skip here; in CI, where .ci/run installs what is missing, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> Path:
    """A private CA and a certificate for 127.0.0.1 and localhost, made by `mnist-mlops certs`."""
    from mnist_mlops.serving.proxy import ProxyError, nginx_binary

    try:
        nginx_binary()
    except ProxyError as error:
        unavailable(str(error))
    directory = tmp_path_factory.mktemp("tls") / "certs"
    run(
        [sys.executable, "-m", "mnist_mlops", "certs", "--directory", str(directory)],
        REPO_ROOT,
        subprocess_env(),
    )
    return directory


def tls_context(certificates: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certificates / "ca.crt")


def proxy_command(certificates: Path, *arguments: str) -> list[str]:
    """`mnist-mlops proxy` with the test certificate (`arguments` may override it)."""
    return [
        *(sys.executable, "-m", "mnist_mlops", "proxy"),
        *("--certificate", str(certificates / "server.crt")),
        *("--key", str(certificates / "server.key")),
        *arguments,
    ]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_mirror(mirror):
    """Serve the tiny mirror over HTTP on 127.0.0.1; yields its base URL."""
    handler = lambda *args: _QuietHandler(*args, directory=str(mirror))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def postgres_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout
        candidates.insert(0, Path(bindir.strip()))
    return next((path for path in candidates if (path / "initdb").exists()), None)


class PostgresCluster(tuple):
    """(superuser URI, port), and the cluster's `stop()` and `start()` for outage tests."""

    def __new__(cls, uri: str, port: int, control):
        cluster = super().__new__(cls, (uri, port))
        cluster.control = control
        return cluster

    def stop(self) -> None:
        self.control("-m", "fast", "stop")

    def start(self) -> None:
        self.control("start")


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL cluster on a free port for the session: a PostgresCluster."""
    bindir = postgres_bindir()
    if bindir is None:
        unavailable("PostgreSQL is not installed (apt-get install postgresql)")
    # Not under pytest's tmp_path: its folders are private to root, and the
    # cluster runs as the postgres user.
    base = Path(tempfile.mkdtemp(prefix="mnist-postgres-"))
    as_owner = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(base, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    password = secrets.token_hex(12)
    (base / "password").write_text(password)
    if as_owner:
        shutil.chown(base / "password", "postgres")
    port = free_port()
    data = str(base / "data")
    initdb = [str(bindir / "initdb"), "-D", data, "-U", "postgres", "-A", "scram-sha-256"]
    initdb.append(f"--pwfile={base / 'password'}")
    result = subprocess.run([*as_owner, *initdb], capture_output=True, text=True)
    if result.returncode != 0:
        unavailable(f"PostgreSQL could not be initialised: {result.stderr.strip()[-300:]}")

    def control(*action: str, check: bool = True) -> subprocess.CompletedProcess:
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        command = [str(bindir / "pg_ctl"), "-D", data, "-l", str(base / "log"), "-w"]
        done = subprocess.run(
            [*as_owner, *command, "-o", options, *action], capture_output=True, text=True
        )
        assert not check or done.returncode == 0, done.stderr
        return done

    started = control("start", check=False)
    if started.returncode != 0:
        unavailable(f"PostgreSQL could not be started: {started.stderr.strip()[-300:]}")
    yield PostgresCluster(
        f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres", port, control
    )
    control("-m", "fast", "stop", check=False)
    shutil.rmtree(base, ignore_errors=True)


def command_lines() -> str:
    """The command line of every process on the machine, one a line: what any local user reads."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except (OSError, UnicodeDecodeError):
                continue
    return "\n".join(lines)


def listeners_of(port: int) -> list[int]:
    """The pids of the processes that listen on 127.0.0.1:`port` (a server's workers share it)."""
    pids = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and ("127.0.0.1", port) in tcp_sockets({int(entry.name)}, True)
    ]
    assert pids, f"nothing listens on 127.0.0.1:{port}"
    return pids


def resident_megabytes(pids: list[int]) -> float:
    """What the processes hold in memory now (VmRSS summed), in MiB."""
    total = 0
    for pid in pids:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        total += next(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return total / 1024


# The slow tests' one shared `dvc repro` on the real MNIST (it imports from this module).
from .real_data import copy_of_real_pipeline, real_pipeline  # noqa: E402, F401
