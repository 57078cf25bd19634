"""BentoML serving the same ONNX file: `bentoml serve bentoml_app:Digits --port PORT`.

PEER_WORKERS sets the workers; PEER_BATCH=1 turns on adaptive batching (up to 16, 5 ms).
"""

import os

import bentoml
import numpy as np
from answer import predictions, session

BATCH = os.environ.get("PEER_BATCH") == "1"


@bentoml.service(workers=int(os.environ.get("PEER_WORKERS", "1")))
class Digits:
    def __init__(self) -> None:
        self.model = session()

    if BATCH:  # one row per request in, one answer per request out

        @bentoml.api(batchable=True, max_batch_size=16, max_latency_ms=5000)
        def invocations(self, inputs: np.ndarray) -> list:
            return predictions(self.model, inputs)

    else:

        @bentoml.api
        def invocations(self, inputs: np.ndarray) -> dict:
            return {"predictions": predictions(self.model, inputs)}
