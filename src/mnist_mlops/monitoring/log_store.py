"""Where the inference log's files live: a local folder, or a prefix on an S3 object store.

Both kinds answer the same five calls (list, read, write, remove, exists),
so every reader (`monitor`, `feedback record`, `feedback snapshot`,
`lineage`, a server's `/feedback`) works the same on either. A write appears
whole under its name or not at all: a rename in a folder, one PUT on S3.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.atomic import atomic_path
from mnist_mlops.monitoring.s3 import S3Client, split_url


@dataclass(frozen=True)
class LogFile:
    """One file of the log: its name, size and time, and the store that holds it."""

    store: FolderStore | S3Store
    name: str
    size: int
    mtime: float

    @property
    def stem(self) -> str:
        return self.name.removesuffix(".npz")

    def read(self) -> bytes:
        return self.store.read(self.name)

    @property
    def path(self) -> Path:
        """Where a folder's file is (a folder's files only)."""
        return self.store.root / self.name


class FolderStore:
    """A local folder: 0600 files in a 0700 folder (raw pixels are what people sent)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def exists(self) -> bool:
        return self.root.is_dir()

    def files(self) -> list[LogFile]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            try:
                status = entry.stat()
            except FileNotFoundError:  # removed by a writer's tidying meanwhile
                continue
            found.append(LogFile(self, entry.name, status.st_size, status.st_mtime))
        return found

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        with atomic_path(self.root / name, private=True) as temporary:
            temporary.write_bytes(data)

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class S3Store:
    """A prefix in a bucket of an S3 object store (`s3://BUCKET/PREFIX`)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        bucket, self.prefix = split_url(url)
        self.client = S3Client(bucket)

    def __str__(self) -> str:
        return self.url

    def exists(self) -> bool:
        """True when the bucket answers; an empty prefix is an empty log, not a missing one."""
        self.client.list(self.prefix + "\x7f")  # an S3Error when the bucket does not answer
        return True

    def files(self) -> list[LogFile]:
        return [
            LogFile(self, item.key[len(self.prefix) :], item.size, item.mtime)
            for item in self.client.list(self.prefix)
            if "/" not in item.key[len(self.prefix) :]
        ]

    def read(self, name: str) -> bytes:
        return self.client.get(self.prefix + name)

    def write(self, name: str, data: bytes) -> None:
        self.client.put(self.prefix + name, data)

    def remove(self, name: str) -> None:
        self.client.delete(self.prefix + name)


def is_remote(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def location(text: str) -> str | Path:
    """What `--log-dir` takes: a folder, or an `s3://BUCKET/PREFIX` URL (checked here)."""
    if is_remote(text):
        try:
            split_url(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    return Path(text)


def store_of(where: str | Path | FolderStore | S3Store) -> FolderStore | S3Store:
    if isinstance(where, FolderStore | S3Store):
        return where
    return S3Store(str(where)) if is_remote(where) else FolderStore(Path(where))


def unreadable(where: str | Path) -> str:
    """Why the log at `where` cannot be read, or "" when it can."""
    try:
        store = store_of(where)
        if store.exists():
            return ""
    except OSError as error:  # S3Error: no keys, an unreachable store or a refusing one
        return str(error)
    return f"no inference log at {where}"
