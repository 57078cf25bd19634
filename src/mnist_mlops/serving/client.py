"""A client for the served model: images in any size and format → MNIST-like digits → the server.

MNIST digits are white on black, fitted into a 20×20 box and centred by their
centre of mass in a 28×28 field. `to_mnist` does the same to an ordinary
picture of a digit (dark ink on light paper is inverted first), so that the
model sees what it was trained on.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mnist_mlops.untrusted import UntrustedFileError, open_image

MNIST_SIZE = 28
DIGIT_BOX = 20


class ClientError(RuntimeError):
    """The server could not be reached, or refused the request."""


def to_mnist(image: Image.Image) -> np.ndarray:
    """A 28×28 uint8 array: white digit on black, scaled and centred as in MNIST."""
    if image.mode in ("RGBA", "LA", "P"):
        background = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(background, image.convert("RGBA"))
    pixels = np.asarray(ImageOps.grayscale(image), dtype=np.float32)
    if pixels.mean() > 127:
        pixels = 255 - pixels
    ink = pixels > 0.2 * pixels.max() if pixels.max() > 0 else np.zeros_like(pixels, bool)
    if not ink.any():
        return np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.uint8)
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    digit = pixels[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    scale = DIGIT_BOX / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    resized = np.asarray(
        Image.fromarray(digit.astype(np.uint8)).resize(size, Image.Resampling.LANCZOS),
        dtype=np.float32,
    )
    field = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    top, left = (MNIST_SIZE - resized.shape[0]) // 2, (MNIST_SIZE - resized.shape[1]) // 2
    field[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    # Shift so the centre of mass sits at the centre of the field, as MNIST does.
    total = field.sum()
    row_centre = (field.sum(axis=1) * np.arange(MNIST_SIZE)).sum() / total
    column_centre = (field.sum(axis=0) * np.arange(MNIST_SIZE)).sum() / total
    shift_rows = round(MNIST_SIZE / 2 - 0.5 - row_centre)
    shift_columns = round(MNIST_SIZE / 2 - 0.5 - column_centre)
    field = np.roll(field, (shift_rows, shift_columns), axis=(0, 1))
    return np.clip(field, 0, 255).astype(np.uint8)


def load_image(path: Path) -> np.ndarray:
    try:
        with open_image(path) as image:
            return to_mnist(image)
    except UntrustedFileError as error:
        raise ClientError(str(error)) from None
    except (OSError, ValueError) as error:
        raise ClientError(f"{path}: not a readable image ({error})") from None


def predict(
    images: list[np.ndarray], url: str, timeout: float = 30, ca: Path | None = None
) -> list[dict]:
    """Post the images to the server's /invocations; return its prediction per image.

    `ca` is the certificate authority of an https:// server that the system
    does not trust, such as the one `make certs` makes.
    """
    body = json.dumps({"inputs": [image.tolist() for image in images]}).encode()
    endpoint = f"{url.rstrip('/')}/invocations"
    try:
        context = ssl.create_default_context(cafile=ca) if ca else None
    except (OSError, ssl.SSLError) as error:
        raise ClientError(f"cannot use {ca} as the server's CA: {error}") from None
    request = urllib.request.Request(
        endpoint, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.load(response)["predictions"]
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        with contextlib.suppress(json.JSONDecodeError):
            detail = json.loads(detail).get("message", detail)
        raise ClientError(f"{endpoint} refused the request (HTTP {error.code}): {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise ClientError(
            f"cannot reach the model server at {url} ({reason}); start it with `make serve`"
        ) from None
