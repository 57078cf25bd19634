"""The scoring protocol's hot path: a well-formed request answered without MLflow's overhead.

For one image, MLflow's scoring app parses the JSON body twice, deep-copies
its nested lists, checks the signature through three `inspect.signature`
calls and hands the work to a thread: about 0.7 ms of a 0.1 ms model. This
path parses the body once (orjson), builds the batch in the signature's
dtype directly, checks its shape against the signature, calls the model's
own `predict` (which checks the pixel range and the batch size) and writes
the answer as MLflow writes it, byte for byte: `{"predictions": [...]}`
through `json.dumps`.

It answers `Content-Type: application/json` (optionally `; charset=utf-8`)
bodies of exactly one key, as MLflow reads them for a model whose signature
is one unnamed tensor of shape (-1, …):

- `{"inputs": [...]}` and `{"instances": [...]}`: nested lists of numbers;
- `{"dataframe_split": {"columns": [NAME], "data": [[flat image], ...]}}`
  (`columns` optional): one column of flattened images;
- `{"dataframe_records": [{NAME: [flat image]}, ...]}`: the same as records.

Everything else goes to MLflow's own app unchanged, so that its answers and
error bodies stay MLflow's: CSV and Parquet bodies, `params`, an `index`,
named inputs, a model of another kind, and every request this path finds
wrong in any way (a bad one costs a second parse; a good one, one).
"""

from __future__ import annotations

import inspect
import json
import math

import numpy as np

# Batches up to this many bytes are scored on the event loop: for them a
# thread hop costs more than the model. Bigger ones go to a thread, as in MLflow.
INLINE_BODY_BYTES = 256 * 1024
JSON = "application/json"


class HotPath:
    """The hot path for one loaded model; `answer` returns the body, or None for MLflow's app."""

    def __init__(self, predict, context, dtype: np.dtype, image_shape: tuple[int, ...]) -> None:
        self.predict, self.context = predict, context
        self.dtype, self.image_shape = dtype, image_shape
        self.pixels = math.prod(image_shape)

    def answer(self, content_type: str, body: bytes) -> bytes | None:
        """The answer's JSON for a request this path takes; None for any other."""
        if not is_plain_json(content_type):
            return None
        images = self.batch(body)
        if images is None:
            return None
        try:
            predictions = self.predict(self.context, images, None)
        except Exception:  # a range or size the model refuses, or worse: MLflow's own answer
            return None
        return json.dumps({"predictions": predictions}).encode()

    def batch(self, body: bytes) -> np.ndarray | None:
        """The request's images in the signature's dtype and shape; None if it is not one."""
        import orjson

        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(request, dict) or len(request) != 1:
            return None
        ((key, value),) = request.items()
        try:
            if key in ("inputs", "instances"):
                return self._tensor(value)
            if key == "dataframe_split":
                return self._split(value)
            if key == "dataframe_records":
                return self._records(value)
        except (ValueError, TypeError, OverflowError):  # not numbers, or ragged
            return None
        return None

    def _tensor(self, value) -> np.ndarray | None:
        if not isinstance(value, list) or not value or isinstance(value[0], dict):
            return None
        images = np.array(value, dtype=self.dtype)
        return images if images.shape[1:] == self.image_shape else None

    def _split(self, value) -> np.ndarray | None:
        if not isinstance(value, dict) or set(value) - {"columns", "data"}:
            return None
        columns, rows = value.get("columns", [None]), value.get("data")
        if not isinstance(columns, list) or len(columns) != 1 or not isinstance(rows, list):
            return None
        if not rows or not all(isinstance(row, list) and len(row) == 1 for row in rows):
            return None
        return self._flat([row[0] for row in rows])

    def _records(self, value) -> np.ndarray | None:
        if not isinstance(value, list) or not value or not isinstance(value[0], dict):
            return None
        if len(value[0]) != 1:
            return None
        (name,) = value[0]
        if not all(isinstance(record, dict) and record.keys() == {name} for record in value):
            return None
        return self._flat([record[name] for record in value])

    def _flat(self, cells: list) -> np.ndarray | None:
        """One flattened image per cell, as MLflow reshapes a column of lists."""
        first = cells[0]
        if not isinstance(first, list) or not first or isinstance(first[0], (list, dict)):
            return None
        images = np.array(cells, dtype=self.dtype)
        if images.ndim != 2 or images.shape[1] != self.pixels:
            return None
        return images.reshape(len(cells), *self.image_shape)


def is_plain_json(content_type: str) -> bool:
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip() != JSON:
        return False
    parameters = parameters.strip()
    return not parameters or parameters.replace(" ", "").lower() == "charset=utf-8"


def hot_path_of(model) -> HotPath | None:
    """The hot path for a loaded pyfunc model; None when its signature or kind does not fit."""
    from mlflow.types import TensorSpec

    implementation = getattr(model, "_model_impl", None)
    python_model = getattr(implementation, "python_model", None)
    schema = model.metadata.get_input_schema()
    if python_model is None or schema is None or schema.has_input_names():
        return None
    if len(schema.inputs) != 1 or not isinstance(schema.inputs[0], TensorSpec):
        return None
    parameters = list(inspect.signature(python_model.predict).parameters)
    if parameters[:3] != ["context", "model_input", "params"]:
        return None
    spec = schema.inputs[0]
    shape = tuple(spec.shape)
    if len(shape) < 2 or shape[0] != -1 or -1 in shape[1:]:
        return None

    def predict(context, images, params):
        # Looked up per call: the server wraps the model's predict after this is made.
        return python_model.predict(context, images, params)

    return HotPath(predict, getattr(implementation, "context", None), spec.type, shape[1:])
