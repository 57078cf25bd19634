"""Reading files that someone else made: sizes checked before anything is allocated.

An `.npz` is a zip of `.npy` members, each with a header that declares its
dtype and shape; numpy allocates what the header declares and inflates into
it. A 1.5 MB archive can declare 10^9 images. `load_npz` reads every
member's header first, refuses object arrays and anything whose declared
size (all members together) is over the caller's limit, and only then loads.
Images get the same treatment: `open_image` checks the pixel count Pillow
reads from the header before it decodes a single row.

Every refusal is an `UntrustedFileError` whose text is one line for the user.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

# 2 GiB: about 2.7 million MNIST images in one file.
MAX_NPZ_BYTES = 2 << 30
# 40 Mpx: a phone photo of a digit, with room to spare.
MAX_IMAGE_PIXELS = 40_000_000


class UntrustedFileError(ValueError):
    """A file that cannot be read safely; the text says why in one line."""


def declared_arrays(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The dtype and shape each member of the `.npz` at `path` declares, nothing decoded."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if not member.filename.endswith(".npy"):
                    continue
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version == (1, 0):
                        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(stream)
                    else:
                        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(stream)
                arrays[member.filename.removesuffix(".npy")] = (dtype, shape)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UntrustedFileError(
            f"{path}: not a readable npz archive ({_first_line(error)})"
        ) from None
    return arrays


def load_npz(
    path: Path, names: list[str] | None = None, max_bytes: int = MAX_NPZ_BYTES
) -> dict[str, np.ndarray]:
    """The arrays `names` (default: all) of an `.npz`, never unpickled, `max_bytes` at most."""
    declared = declared_arrays(path)
    wanted = list(declared) if names is None else [name for name in names if name in declared]
    total = 0
    for name in wanted:
        dtype, shape = declared[name]
        if dtype.hasobject:
            raise UntrustedFileError(f"{path}: array {name!r} holds Python objects; refused")
        total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    if total > max_bytes:
        raise UntrustedFileError(
            f"{path}: its arrays declare {total:,} bytes, over the limit of {max_bytes:,}: "
            "split the data into smaller files"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in wanted}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UntrustedFileError(
            f"{path}: not a readable npz archive ({_first_line(error)})"
        ) from None


def open_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS):
    """A Pillow image, its pixels not yet decoded, refused when it declares over `max_pixels`."""
    from PIL import Image

    try:
        image = Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UntrustedFileError(f"{path}: not a readable image ({_first_line(error)})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise UntrustedFileError(
            f"{path}: {width}×{height} pixels, over the limit of {max_pixels:,}: "
            "send a smaller picture of the digit"
        )
    return image


def labels_in_range(values: np.ndarray, where: str, classes: int = 10) -> np.ndarray:
    """`values` as int64 when every one is a whole number in 0 … classes−1; else one line why."""
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise UntrustedFileError(f"{where}: labels must be integers, got {array.dtype}")
    bad = (array < 0) | (array >= classes)
    if bad.any():
        first = int(np.flatnonzero(bad.ravel())[0])
        raise UntrustedFileError(
            f"{where}: labels must be in 0–{classes - 1}; label {array.ravel()[first]} "
            f"at index {first} (and {int(bad.sum()) - 1} more) is not"
        )
    return array.astype(np.int64)


def _unreadable(path: Path, error: Exception) -> UntrustedFileError:
    return UntrustedFileError(f"{path}: not a readable npz archive ({_first_line(error)})")


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
