"""Images that the evaluate stage logs with each run, drawn with Pillow.

Pillow draws them in milliseconds; matplotlib would first take 0.6 s to
import, a fifth of the whole stage.
"""

from __future__ import annotations

import csv
import io

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


MISTAKES = 25
MISTAKE_COLUMNS = 5
DIGIT_SCALE = 3  # 28×28 images drawn at 84×84
CAPTION_HEIGHT = 34


def most_confident_mistakes(
    labels: np.ndarray, probabilities: np.ndarray, count: int = MISTAKES
) -> np.ndarray:
    """Indices of the wrongly predicted images, the most confident first (at most `count`)."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    # A stable sort: equal confidences keep the test set's order.
    return wrong[np.argsort(-confidence, kind="stable")][:count]


def mistakes_image(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray
) -> Image.Image:
    """The test images the model got most confidently wrong, with the true and predicted digits."""
    chosen = most_confident_mistakes(labels, probabilities)
    tile = 28 * DIGIT_SCALE
    cell_width, cell_height = tile + 30, tile + CAPTION_HEIGHT
    rows = max(1, -(-len(chosen) // MISTAKE_COLUMNS))
    width = MISTAKE_COLUMNS * cell_width + 20
    image = Image.new("RGB", (width, TITLE_HEIGHT + rows * cell_height + 10), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    title = f"The {len(chosen)} most confident mistakes (test set)"
    draw.text(
        (width / 2, 14), title if len(chosen) else "No mistakes", fill=INK, font=font, anchor="mt"
    )
    for position, index in enumerate(chosen):
        row, column = divmod(position, MISTAKE_COLUMNS)
        left = 10 + column * cell_width + 15
        upper = TITLE_HEIGHT + row * cell_height
        digit = Image.fromarray(np.asarray(images[index], dtype=np.uint8), mode="L")
        image.paste(digit.resize((tile, tile), Image.Resampling.NEAREST), (left, upper))
        predicted = int(probabilities[index].argmax())
        caption = (
            f"true {int(labels[index])}, said {predicted} ({probabilities[index, predicted]:.2f})"
        )
        draw.text((left + tile / 2, upper + tile + 4), caption, fill=INK, font=small, anchor="mt")
    return image


def predictions_csv(labels: np.ndarray, predicted: np.ndarray) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows(zip(labels.tolist(), predicted.tolist(), strict=True))
    return buffer.getvalue()
