"""LitServe serving the same ONNX file: `python litserve_app.py PORT WORKERS BATCH`.

BATCH 1 is no batching; more is LitServe's batching with a 5 ms window.
"""

import sys

import litserve as ls
import numpy as np
from answer import predictions, session


class Digits(ls.LitAPI):
    def setup(self, device):
        self.model = session()

    def decode_request(self, request):
        return np.asarray(request["inputs"], dtype=np.float32)

    def batch(self, inputs):
        return np.concatenate(inputs)

    def predict(self, images):
        return predictions(self.model, images)

    def unbatch(self, output):
        return [[row] for row in output]

    def encode_response(self, output):
        return {"predictions": output}


if __name__ == "__main__":
    port, workers, batch = (int(argument) for argument in sys.argv[1:4])
    api = Digits(
        max_batch_size=batch, batch_timeout=0.005 if batch > 1 else 0.0, api_path="/invocations"
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")
