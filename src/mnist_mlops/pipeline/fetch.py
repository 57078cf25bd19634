"""Stage `fetch`: download MNIST, verify every file by sha256, keep it in data/raw.

The source is a directory URL (http, https, file://) or a local path, taken
from `data.source` or, on machines that use a mirror, the MNIST_MIRROR
environment variable. Files are streamed into a staging folder and checked
before the folder is renamed to data/raw, so a failed or interrupted fetch
never leaves a partial file where the next stage would read it.
"""

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

from tqdm import tqdm

from mnist_mlops.atomic import atomic_directory
from mnist_mlops.config import DataConfig
from mnist_mlops.model.digits import DataError
from mnist_mlops.paths import RAW_DATA_DIR, project_root
from mnist_mlops.pipeline.raw import IDX_FILES, NPZ_FILE, content_digest

MIRROR_ENV = "MNIST_MIRROR"
OFFLINE_HINT = (
    f"point the fetch stage at a copy of MNIST with {MIRROR_ENV}, e.g. "
    f"`{MIRROR_ENV}=/path/to/mnist make repro` (docs/offline.md: Offline, or behind a mirror)"
)
MIRROR_CHECKSUMS = "SHA256SUMS"
_CHUNK_BYTES = 1 << 20
_REMOTE_SCHEMES = ("http", "https", "file")

T = TypeVar("T")


class FetchError(RuntimeError):
    """The data could not be fetched, or did not match its checksum."""


class _RetryableError(Exception):
    """A failure that another attempt may not repeat (network, server, truncation)."""


class _ConnectError(_RetryableError):
    """No connection to the source at all: the machine may be offline."""


def resolve_source(config: DataConfig) -> str:
    """MNIST_MIRROR if set, else `data.source`; a relative local path is anchored to the project."""
    source = os.environ.get(MIRROR_ENV) or config.source
    if urllib.parse.urlsplit(source).scheme in _REMOTE_SCHEMES:
        return source
    return str(project_root() / source)


def locate(source: str, name: str) -> str:
    """The location of file `name` in the source directory `source`."""
    if urllib.parse.urlsplit(name).scheme in _REMOTE_SCHEMES or Path(name).is_absolute():
        return name
    if urllib.parse.urlsplit(source).scheme in _REMOTE_SCHEMES:
        return f"{source.rstrip('/')}/{urllib.parse.quote(name)}"
    return str(Path(source) / name)


def parse_checksums(text: str, origin: str) -> dict[str, str]:
    """Parse `sha256sum` output: one `<hex digest>  <file name>` per line."""
    checksums = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, separator, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if not separator or len(digest) != 64 or not name:
            raise FetchError(f"{origin}:{number}: not a sha256sum line: {line!r}")
        checksums[name] = digest.lower()
    return checksums


def expected_checksums(config: DataConfig, source: str) -> dict[str, str]:
    """`data.sha256`, updated by the checksum list (`data.sha256sums` or the mirror's own).

    A list vouches for the bytes of a mirror's files (a recompressed copy has
    other file hashes); what they hold is checked against the pinned
    `data.content_sha256`, which no list replaces.
    """
    checksums = dict(config.sha256)
    listing = config.sha256sums or (MIRROR_CHECKSUMS if os.environ.get(MIRROR_ENV) else None)
    if listing:
        location = locate(source, listing)
        checksums.update(parse_checksums(_read_small(location, config), location))
    return checksums


def choose_files(data_format: str, checksums: dict[str, str]) -> list[str]:
    """The files to fetch for `data_format`; `auto` prefers the single npz file."""
    if data_format == "npz" or (data_format == "auto" and NPZ_FILE in checksums):
        wanted = [NPZ_FILE]
    else:
        wanted = list(IDX_FILES.values())
    unknown = [name for name in wanted if name not in checksums]
    if unknown:
        raise FetchError(
            f"no sha256 configured for {', '.join(unknown)}: add them to data.sha256 "
            "or point data.sha256sums at a checksum list"
        )
    return wanted


def fetch(config: DataConfig, destination: Path = RAW_DATA_DIR) -> dict[str, str]:
    """Fetch and verify the configured files into `destination`; return their checksums."""
    source = resolve_source(config)
    checksums = expected_checksums(config, source)
    names = choose_files(config.format, checksums)
    with atomic_directory(destination) as staging:
        for name in names:
            location = locate(source, name)
            _fetch_verified(location, staging / name, checksums[name], config)
            print(f"fetched {name} from {location} (sha256 verified)")
        if config.content_sha256:
            check_content(staging, config.content_sha256, source)
    return {name: checksums[name] for name in names}


def check_content(raw_dir: Path, expected: str, source: str) -> None:
    """Raise FetchError unless the decoded images and labels are the pinned ones.

    A checksum list travels with the data it vouches for: whoever could
    change the data could change the list. The content digest is pinned in
    the config and no list replaces it.
    """
    try:
        actual = content_digest(raw_dir)
    except DataError as error:
        raise FetchError(f"{source}: {error}") from None
    if actual != expected:
        raise FetchError(
            f"{source}: the images and labels are not the pinned ones: content sha256 {actual}, "
            f"expected {expected} (data.content_sha256; a mirror's checksum list vouches for "
            "its bytes, never for what they hold)"
        )


def _retrying(location: str, config: DataConfig, attempt_once: Callable[[], T]) -> T:
    """Call `attempt_once` until it succeeds, retrying only what another attempt may fix."""
    attempts = config.retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return attempt_once()
        except _RetryableError as error:
            if attempt == attempts:
                message = f"{location}: {error} (gave up after {attempts} attempts)"
                if isinstance(error, _ConnectError) and not os.environ.get(MIRROR_ENV):
                    message += f"; without internet access, {OFFLINE_HINT}"
                raise FetchError(message) from None
            delay = min(0.5 * 2 ** (attempt - 1), 8.0)
            print(f"{location}: {error}; retrying in {delay:g} s", file=sys.stderr)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fetch_verified(location: str, target: Path, expected: str, config: DataConfig) -> None:
    actual, size = _retrying(
        location, config, lambda: _download(location, target, config.timeout_seconds)
    )
    if actual != expected:
        target.unlink(missing_ok=True)
        raise FetchError(
            f"{location}: sha256 mismatch: expected {expected}, got {actual} "
            f"({size} bytes); the file is corrupt, truncated or not the one configured"
        )


def _read_small(location: str, config: DataConfig) -> str:
    """Read a small text file (a checksum list) from a path or URL."""

    def read_once() -> str:
        with _open(location, config.timeout_seconds) as (stream, _size):
            return stream.read().decode()

    return _retrying(location, config, read_once)


def _download(location: str, target: Path, timeout: float) -> tuple[str, int]:
    """Stream `location` into `target`; return its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with _open(location, timeout) as (stream, expected_size), target.open("wb") as output:
        progress = tqdm(
            total=expected_size,
            unit="B",
            unit_scale=True,
            desc=target.name,
            delay=1.0,
            mininterval=1.0,
            file=sys.stderr,
        )
        with progress:
            while True:
                try:
                    chunk = stream.read(_CHUNK_BYTES)
                except TimeoutError:
                    raise _RetryableError(f"timed out after {timeout:g} s without data") from None
                except (http.client.IncompleteRead, ConnectionError) as error:
                    raise _RetryableError(
                        f"connection lost after {size} bytes ({type(error).__name__})"
                    ) from None
                if not chunk:
                    break
                digest.update(chunk)
                output.write(chunk)
                size += len(chunk)
                progress.update(len(chunk))
    if expected_size is not None and size != expected_size:
        raise _RetryableError(f"truncated: got {size} of {expected_size} bytes")
    return digest.hexdigest(), size


@contextmanager
def _open(location: str, timeout: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Open a local path or URL for reading; yield the stream and its size if known."""
    scheme = urllib.parse.urlsplit(location).scheme
    if scheme not in _REMOTE_SCHEMES:
        try:
            stream = open(location, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise FetchError(f"{location}: no such file") from None
        with stream:
            yield stream, os.fstat(stream.fileno()).st_size
        return
    request = urllib.request.Request(location, headers={"User-Agent": "mnist-mlops"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        message = f"HTTP {error.code} {error.reason}"
        if error.code >= 500 or error.code in (408, 429):
            raise _RetryableError(message) from None
        raise FetchError(f"{location}: {message}") from None
    except urllib.error.URLError as error:
        if scheme == "file":
            raise FetchError(f"{location}: {error.reason}") from None
        raise _ConnectError(f"cannot connect: {error.reason}") from None
    except TimeoutError:
        raise _RetryableError(f"timed out after {timeout:g} s") from None
    length = response.headers.get("Content-Length")
    with response:
        yield response, int(length) if length and length.isdigit() else None
