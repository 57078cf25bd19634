"""Atomic writes: a result appears complete under its final name, or not at all.

And the files nobody else may read: private results (0600 in a 0700 folder)
and secret files, made 0600 from their first byte.
"""

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def private_folder(folder: Path) -> Path:
    """`folder`, made if missing, open to its owner alone (0700) whatever the umask."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if folder.stat().st_mode & 0o077 and folder.stat().st_uid == os.getuid():
        folder.chmod(0o700)
    return folder


@contextmanager
def atomic_path(target: Path, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it to `target` on success.

    The temporary name keeps `target`'s suffix, because some writers (Keras's
    `model.save`) choose the format by it. On error the temporary file is
    removed and `target` is left as it was. A `private` file (personal data,
    keys) is 0600 in a 0700 folder whatever the umask; others get the umask's.
    """
    target = Path(target)
    if private:
        private_folder(target.parent)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.stem}.", suffix=f".partial{target.suffix}"
    )
    os.close(handle)
    temporary = Path(name)
    # mkstemp creates the file private (0600); results get the usual permissions.
    if not private:
        os.chmod(temporary, 0o666 & ~_umask())
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; swap it in on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    os.chmod(temporary, 0o777 & ~_umask())
    try:
        yield temporary
        if target.exists():
            retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, retired / target.name)
            os.replace(temporary, target)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


class SecretFileError(ValueError):
    """A secret file that is missing, too short or readable by others; the text says which."""


def read_secret_file(path: Path, make: bool, minimum: int = 32) -> str:
    """The secret in `path` (0600, at least `minimum` characters); made first when `make`.

    Created with O_EXCL and mode 0600 in one call: it is never readable by
    others, not even for a moment, whatever the umask.
    """
    path = Path(path)
    if make and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(secrets.token_urlsafe(32) + "\n")
    try:
        mode = path.stat().st_mode
        secret = path.read_text().strip()
    except FileNotFoundError:
        raise SecretFileError(f"no secret at {path}") from None
    if mode & 0o077:
        raise SecretFileError(f"{path} is readable by others: chmod 600 {path}")
    if len(secret) < minimum:
        raise SecretFileError(f"the secret in {path} must be at least {minimum} characters")
    return secret


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text)


def write_json(target: Path, value: object) -> None:
    write_text(target, json.dumps(value, indent=2, sort_keys=True) + "\n")
