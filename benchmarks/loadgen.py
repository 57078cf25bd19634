"""A load generator light enough not to be what is measured: asyncio on uvloop, raw HTTP/1.1.

    python -m benchmarks.loadgen PORT PATH BODY_FILE CLIENTS REQUESTS [SECONDS]

CLIENTS keep-alive connections send REQUESTS in all (or as many as they can
in SECONDS, if given, with REQUESTS the most), each the same POST, and it
prints one JSON line: p50 and p99 in ms, requests per second, the requests
answered, the failures, and the first answer's body. A Python client on threads spends
more CPU per request than the servers it measures; this one about 30 µs.
"""

import asyncio
import json
import math
import sys
import time

import numpy as np


async def connection(
    port: int, request: bytes, count: int, deadline: float, latencies: list, answers: list
):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            begun = time.perf_counter()
            if begun >= deadline:
                break
            writer.write(request)
            status, body = await response(reader)
            latencies.append(time.perf_counter() - begun)
            answers.append((status, body) if not answers else (status, b""))
    finally:
        writer.close()


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):  # chunked
        body += await reader.readexactly(size + 2)
    await reader.readuntil(b"\r\n")
    return status, body.replace(b"\r\n", b"")


async def main(
    port: int, path: str, body: bytes, clients: int, requests: int, seconds: float = math.inf
) -> dict:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    answers: list[tuple[int, bytes]] = []
    share = requests // clients
    begun = time.perf_counter()
    deadline = begun + seconds
    await asyncio.gather(
        *(connection(port, request, share, deadline, latencies, answers) for _ in range(clients))
    )
    elapsed = time.perf_counter() - begun
    seconds = np.asarray(latencies)
    return {
        "p50_ms": float(np.percentile(seconds, 50) * 1000),
        "p99_ms": float(np.percentile(seconds, 99) * 1000),
        "rps": len(latencies) / elapsed,
        "requests": len(latencies),
        "failed": sum(status != 200 for status, _body in answers),
        "answer": answers[0][1].decode(),
    }


if __name__ == "__main__":
    import uvloop

    port, path, body_file, clients, requests = sys.argv[1:6]
    seconds = float(sys.argv[6]) if len(sys.argv) > 6 else math.inf
    with open(body_file, "rb") as stream:
        body = stream.read()
    result = uvloop.run(main(int(port), path, body, int(clients), int(requests), seconds))
    print(json.dumps(result))
