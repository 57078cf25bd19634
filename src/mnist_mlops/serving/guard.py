"""Limits at the model server's boundary, in the unit that matters: decoded rows and bytes.

MLflow's scoring app reads any body in full, parses it (JSON twice), copies
it into Python lists and a DataFrame, and only then does the model see that
a batch is over `serving.max_batch_size`. A 9.6 MB body of 2.4 million
one-number rows cost 33 s of CPU and 900 MB that way, and a 436 KB Parquet
body that inflates to 800 MB took 1.7 GB. `refusal` looks at the raw body
first and refuses, for almost nothing, what cannot be a batch within the
limit:

- any body over the room for `max_batch_size` images (what the front door
  allows, `proxy.max_body_bytes`), read no further than that;
- JSON with more brackets than twice `max_batch_size` images of 28 rows
  each can have (every row of every accepted JSON format opens one `[` or
  `{`);
- CSV with more lines than twice `max_batch_size` rows and a header;
- Parquet whose footer declares more rows, more values or more decoded
  bytes than `max_batch_size` images of float64 pixels, or any column that
  is not numbers (a string cell can be of any size): refused from the
  metadata, before a page is inflated.

Error answers lose MLflow's `stack_trace` (absolute paths, library
versions): `public_error` keeps the code and the message.
"""

from __future__ import annotations

import io
import json

from mnist_mlops.serving.proxy import PIXELS_PER_IMAGE, max_body_bytes

IMAGE_ROWS = 28
# The raw counts bound the batch from above; twice the limit leaves a batch
# just over it to the model, whose answer names the exact count.
SLACK = 2
# A decoded pixel as a Parquet column can hold it at most (float64), plus room
# for an id column, a dictionary page and the like.
PARQUET_BYTES_PER_PIXEL = 8
PARQUET_OVERHEAD_BYTES = 1024 * 1024
PARQUET_SPARE_VALUES = 1024
NUMERIC_PHYSICAL_TYPES = ("BOOLEAN", "INT32", "INT64", "FLOAT", "DOUBLE")


def body_limit(max_batch_size: int) -> int:
    return max_body_bytes(max_batch_size)


def refusal(content_type: str, body: bytes, max_batch_size: int) -> str | None:
    """Why this /invocations body cannot be a batch within the limit; None when it may be."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    too_many = (
        f"the request holds more than {max_batch_size} images (serving.max_batch_size): "
        "send fewer images per request"
    )
    if media_type == "application/json":
        opened = body.count(b"[") + body.count(b"{")
        if opened > SLACK * max_batch_size * (IMAGE_ROWS + 1) + 64:
            return too_many
    elif media_type == "text/csv":
        if body.count(b"\n") > SLACK * max_batch_size + 1:
            return too_many
    elif media_type == "application/vnd.apache.parquet":
        return _parquet_refusal(body, max_batch_size, too_many)
    return None


def _parquet_refusal(body: bytes, max_batch_size: int, too_many: str) -> str | None:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # MLflow cannot read Parquet here either, and says so
        return None
    try:
        metadata = pq.ParquetFile(io.BytesIO(body)).metadata
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, and more
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the body is not a Parquet file ({first})"
    if metadata.num_rows > max_batch_size:
        return too_many
    # Pixels are numbers: a column of strings or bytes could hold a cell of any size.
    for index in range(metadata.num_columns):
        column = metadata.schema.column(index)
        if column.physical_type not in NUMERIC_PHYSICAL_TYPES:
            return f"the Parquet column {column.path!r} holds {column.physical_type}, not numbers"
    chunks = [
        metadata.row_group(group).column(column)
        for group in range(metadata.num_row_groups)
        for column in range(metadata.num_columns)
    ]
    values = sum(chunk.num_values for chunk in chunks)
    if values > max_batch_size * PIXELS_PER_IMAGE + PARQUET_SPARE_VALUES:
        return too_many
    limit = max_batch_size * PIXELS_PER_IMAGE * PARQUET_BYTES_PER_PIXEL + PARQUET_OVERHEAD_BYTES
    declared = sum(chunk.total_uncompressed_size for chunk in chunks)
    if declared > limit:
        return (
            f"the Parquet body decodes to {declared:,} bytes, over the {limit:,} that "
            f"{max_batch_size} images (serving.max_batch_size) can take"
        )
    return None


def public_error(body: bytes) -> bytes:
    """An error answer's JSON without MLflow's stack trace; other bodies unchanged."""
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return body
    if not isinstance(answer, dict) or "stack_trace" not in answer:
        return body
    answer.pop("stack_trace")
    return json.dumps(answer).encode()
