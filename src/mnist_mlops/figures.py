"""Images that the evaluate stage logs with each run, drawn with Pillow.

Pillow draws a 10×10 confusion matrix in milliseconds; matplotlib would
first take 0.6 s to import, a fifth of the whole stage.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 44
MARGIN = 70
TITLE_HEIGHT = 40
TOP = TITLE_HEIGHT + 44  # the first row of cells
INK = (20, 20, 20)


def _blue(fraction: float) -> tuple[int, int, int]:
    """White for 0 through to a dark blue for 1, like matplotlib's `Blues`."""
    light, dark = np.array([247, 251, 255]), np.array([8, 48, 107])
    return tuple(int(value) for value in np.rint(light + (dark - light) * fraction))


def confusion_image(matrix: np.ndarray) -> Image.Image:
    """The confusion matrix as an image: true digits down, predicted digits across, with counts."""
    classes = len(matrix)
    side = MARGIN + classes * CELL + 20
    top = TOP
    image = Image.new("RGB", (side, top + classes * CELL + 20), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    draw.text((side / 2, 14), "Confusion matrix (test set)", fill=INK, font=font, anchor="mt")
    largest = max(int(matrix.max()), 1)
    for actual in range(classes):
        for predicted in range(classes):
            count = int(matrix[actual, predicted])
            shade = count / largest
            left, upper = MARGIN + predicted * CELL, top + actual * CELL
            draw.rectangle(
                (left, upper, left + CELL, upper + CELL), fill=_blue(shade), outline=(220, 220, 220)
            )
            centre = (left + CELL / 2, upper + CELL / 2)
            color = "white" if shade > 0.5 else INK
            draw.text(centre, str(count), fill=color, font=small, anchor="mm")
    for digit in range(classes):
        across = MARGIN + digit * CELL + CELL / 2
        draw.text((across, top - 6), str(digit), fill=INK, font=font, anchor="mb")
        down = top + digit * CELL + CELL / 2
        draw.text((MARGIN - 8, down), str(digit), fill=INK, font=font, anchor="rm")
    draw.text(
        (MARGIN + classes * CELL / 2, TITLE_HEIGHT + 4),
        "predicted digit",
        fill=INK,
        font=small,
        anchor="mt",
    )
    label = Image.new("RGB", (classes * CELL, 18), "white")
    ImageDraw.Draw(label).text(
        (classes * CELL / 2, 9), "true digit", fill=INK, font=small, anchor="mm"
    )
    image.paste(label.rotate(90, expand=True), (8, top))
    return image
