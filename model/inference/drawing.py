"""Detections drawn on their image: the service's annotated answer and ``model.predict``'s
``--draw`` use this one function.

Line width and label size follow the image's shorter side (a 2 px line and 12 px text on a
300 px photo, 13 px and 80 px on a 4000 px one), so labels stay readable at both ends. Each
class has its own colour; a label sits above its box, or inside it at the image's top edge.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from model.network.detections import Detections

# Ten colours that stay apart on photos (the demo page's).
COLOURS = (
    (230, 25, 75), (60, 180, 75), (67, 99, 216), (245, 130, 49), (145, 30, 180),
    (66, 212, 244), (240, 50, 230), (154, 99, 36), (70, 153, 144), (128, 128, 0),
)  # fmt: skip
# The line is this fraction of the shorter side (at least 2 px), the text six lines high.
LINE_SHARE = 1 / 300
TEXT_LINES = 6


def draw_detections(image: Image.Image, detections: Detections) -> Image.Image:
    """A copy of ``image`` (RGB) with each detection's box and "label score" drawn on it;
    ``detections`` in that image's pixels (as the detector gives them)."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) * LINE_SHARE))
    font = ImageFont.load_default(size=TEXT_LINES * line)
    # Lowest score first, so the best boxes and labels are drawn last, on top.
    for box, score, class_id, label in reversed(detections.rows()):
        colour = COLOURS[class_id % len(COLOURS)]
        x0, y0, x1, y1 = box
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        caption = f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        width, height = right - left + 2 * line, bottom - top + 2 * line
        y = y0 - height if y0 >= height else y0
        draw.rectangle((x0, y, x0 + width, y + height), fill=colour)
        draw.text((x0 + line - left, y + line - top), caption, fill=(255, 255, 255), font=font)
    return canvas
