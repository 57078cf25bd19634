"""The floor: a bare ASGI app (uvicorn on uvloop and httptools, orjson, the same ONNX session).

No framework, no checks beyond what the model needs: what answering this
model over HTTP costs at least. `python floor.py PORT WORKERS`, PEER_ONNX set.
"""

import sys

import numpy as np
import orjson
from answer import predictions, session

MODEL = None


async def app(scope, receive, send):
    global MODEL
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            MODEL = MODEL or session()
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    images = np.asarray(orjson.loads(body)["inputs"], dtype=np.float32)
    answer = orjson.dumps({"predictions": predictions(MODEL, images)})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(answer)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


if __name__ == "__main__":
    import uvicorn

    port, workers = int(sys.argv[1]), int(sys.argv[2])
    uvicorn.run(
        "floor:app",
        host="127.0.0.1",
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
