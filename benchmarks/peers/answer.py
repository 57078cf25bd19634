"""The answer every server in the peers benchmark gives: the classifier's, the same ONNX file.

Shared by the peer apps, which run outside the project's environment and so
import nothing of it: the same rounding as the project's classifier, so that
every server's answers can be compared number for number.
"""

import os

import numpy as np
import onnxruntime


def session() -> onnxruntime.InferenceSession:
    """The ONNX file named by PEER_ONNX, on one intra-op thread (as the project's server)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(
        os.environ["PEER_ONNX"], options, providers=["CPUExecutionProvider"]
    )


def predictions(model: onnxruntime.InferenceSession, images: np.ndarray) -> list[dict]:
    (name,) = [model_input.name for model_input in model.get_inputs()]
    probabilities = model.run(None, {name: images.astype(np.float32)})[0].astype(np.float64)
    digits = probabilities.argmax(axis=1).tolist()
    rows = probabilities.round(6).tolist()
    return [{"digit": d, "probabilities": p} for d, p in zip(digits, rows, strict=True)]
