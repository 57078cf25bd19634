"""The raw MNIST files as fetch stores them: their names, how they are read, their content digest.

`mnist.npz` (Keras's layout) or the four original gzip-compressed IDX files,
read without unpickling anything and with the sizes their headers declare
checked before anything is allocated (untrusted.py). `content_digest` is
the sha256 of the decoded arrays: the same for the npz and the IDX files,
and for any mirror that recompressed them, so it can be pinned
(`data.content_sha256`) where file hashes cannot.
"""

import gzip
import hashlib
from pathlib import Path

import numpy as np

from mnist_mlops.model.digits import DataError
from mnist_mlops.untrusted import MAX_NPZ_BYTES, UntrustedFileError, declared_arrays, load_npz

NPZ_FILE = "mnist.npz"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
Split = tuple[np.ndarray, np.ndarray]


IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one gzip-compressed IDX file of unsigned bytes (images or labels)."""
    try:
        with gzip.open(path, "rb") as stream:
            # The header first: what it declares bounds what is inflated.
            content = stream.read(4)
            magic = int.from_bytes(content, "big")
            if len(content) == 4 and magic == expected_magic:
                content += stream.read(4 * (magic & 0xFF))
                shape = tuple(
                    int.from_bytes(content[4 + 4 * index : 8 + 4 * index], "big")
                    for index in range(magic & 0xFF)
                )
                declared = int(np.prod(shape, dtype=object))
                if declared > MAX_NPZ_BYTES:
                    raise DataError(
                        f"{path}: the header declares {declared:,} bytes, over the limit of "
                        f"{MAX_NPZ_BYTES:,}"
                    )
                content += stream.read(declared + 1)
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None
    if len(content) >= 4 and magic != expected_magic:
        raise DataError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
    if len(content) < 8:
        raise DataError(f"{path}: too short for an IDX header ({len(content)} bytes)")
    header_size = 4 + 4 * (magic & 0xFF)
    expected_size = header_size + int(np.prod(shape))
    if len(content) != expected_size:
        raise DataError(
            f"{path}: header promises shape {shape} ({expected_size} bytes), "
            f"file has {len(content)} bytes"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape)


def read_npz(path: Path) -> tuple[Split, Split]:
    """Read the Keras-layout `mnist.npz` without unpickling anything."""
    names = ["x_train", "y_train", "x_test", "y_test"]
    try:
        missing = set(names) - set(declared_arrays(path))
        if missing:
            raise DataError(f"{path}: missing arrays {', '.join(sorted(missing))}")
        arrays = load_npz(path, names)
    except UntrustedFileError as error:
        raise DataError(str(error)) from None
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def read_raw(raw_dir: Path) -> tuple[Split, Split]:
    """The (train, test) images and labels from whichever format fetch stored."""
    if (raw_dir / NPZ_FILE).exists():
        return read_npz(raw_dir / NPZ_FILE)
    missing = [name for name in IDX_FILES.values() if not (raw_dir / name).exists()]
    if missing:
        raise DataError(f"{raw_dir}: neither {NPZ_FILE} nor the IDX files ({', '.join(missing)})")

    def idx(key: str, magic: int) -> np.ndarray:
        return read_idx(raw_dir / IDX_FILES[key], magic)

    return (
        (idx("train_images", IDX_IMAGES_MAGIC), idx("train_labels", IDX_LABELS_MAGIC)),
        (idx("test_images", IDX_IMAGES_MAGIC), idx("test_labels", IDX_LABELS_MAGIC)),
    )


def content_digest(raw_dir: Path) -> str:
    """sha256 of the decoded train and test images and labels (as uint8), whatever the format."""
    (train_images, train_labels), (test_images, test_labels) = read_raw(raw_dir)
    hasher = hashlib.sha256()
    for name, array in (
        ("train_images", train_images),
        ("train_labels", train_labels),
        ("test_images", test_images),
        ("test_labels", test_labels),
    ):
        if array.dtype != np.uint8:
            raise DataError(f"{raw_dir}: {name} are {array.dtype}, not uint8")
        array = np.ascontiguousarray(array)
        hasher.update(f"{name}:{array.shape};".encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()
