"""`mnist-mlops batch-input`: the batch format made from an `.npz` or a folder of images.

From an `.npz` (read without unpickling): the uint8 array of shape
(N, 28, 28) named by `array` (`images` for data/processed/*.npz, `x_test` for
Keras's mnist.npz), ids 0 … N−1, and the labels as `label` when a `labels`
(or `y_…`) array of the same length is there. From a folder: every PNG and
JPEG in it, by name, turned into an MNIST digit as `mnist-mlops predict`
does (inverted if dark on light, fitted, centred); the id is the file name.
The file is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_mlops.atomic import atomic_path
from mnist_mlops.batch.formats import ID, IMAGE, IMAGE_SUFFIXES, BatchError
from mnist_mlops.model.architectures import IMAGE_SHAPE
from mnist_mlops.untrusted import UntrustedFileError, declared_arrays, labels_in_range, load_npz


def from_npz(source: Path, array: str) -> dict:
    """The images (and labels) of an `.npz`, their declared sizes checked before loading."""
    try:
        declared = declared_arrays(source)
        if array not in declared:
            raise BatchError(f"{source}: no array {array!r} (it has {', '.join(declared)})")
        dtype, shape = declared[array]
        if dtype != np.uint8 or tuple(shape[1:]) != IMAGE_SHAPE:
            raise BatchError(
                f"{source}: {array} must be uint8 of shape (N, 28, 28), got {dtype} {shape}"
            )
        label_name = "labels" if "labels" in declared else array.replace("x_", "y_", 1)
        arrays = load_npz(source, [array, label_name])
        images, labels = arrays[array], arrays.get(label_name)
        columns = {ID: np.arange(len(images), dtype=np.int64), IMAGE: images}
        if labels is not None and len(labels) == len(images):
            columns["label"] = labels_in_range(labels, f"{source}: {label_name}").astype(np.int8)
    except UntrustedFileError as error:
        raise BatchError(str(error)) from None
    return columns


def from_folder(source: Path) -> dict:
    from mnist_mlops.serving.client import ClientError, load_image

    files = sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BatchError(f"{source}: no PNG or JPEG files")
    try:
        images = np.stack([load_image(path) for path in files])
    except ClientError as error:
        raise BatchError(str(error)) from None
    return {ID: np.array([path.name for path in files]), IMAGE: images}


def write_input(source: Path, target: Path, array: str = "images") -> int:
    """Write the batch format for `source` to `target`; return the number of images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if source.is_dir():
        columns = from_folder(source)
    elif source.exists():
        columns = from_npz(source, array)
    else:
        raise BatchError(f"{source}: no such file or folder")
    images = np.ascontiguousarray(columns[IMAGE])
    flat = images.reshape(len(images), -1)
    table = pa.table(
        {
            ID: pa.array(columns[ID]),
            IMAGE: pa.array([row.tobytes() for row in flat], pa.binary()),
            **({"label": pa.array(columns["label"])} if "label" in columns else {}),
        }
    )
    with atomic_path(target) as temporary:
        # Images are unique: a dictionary would only cost the reader (formats.read_batches).
        pq.write_table(table, temporary, use_dictionary=[ID])
    return len(images)
