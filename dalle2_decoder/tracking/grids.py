"""Sample grids a person can read: every image upscaled to a visible size, its caption under it.

A 32px demo image is a speck in a PNG viewer and in TensorBoard, and a browser smooths an
upscaled one into a blur; so images are enlarged here by a whole factor with nearest neighbour
(each pixel a square block: what the model drew, nothing invented), to at least
`MIN_CELL_PIXELS` on their short side. Real and generated images come in pairs (the training
loop interleaves them), so with an even number of columns each pair shares a row and each caption
sits under its own image.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

MIN_CELL_PIXELS = 128
"""Images are enlarged (by a whole factor, nearest neighbour) until their short side is at least this."""
CAPTION_LINES = 3
"""At most this many lines of caption under an image (the last one cut with an ellipsis)."""
FONT_SIZE = 12
PADDING = 4


def upscale(image: np.ndarray, min_pixels: int = MIN_CELL_PIXELS) -> np.ndarray:
    """`image` (H, W, C) enlarged by the smallest whole factor that makes its short side at least
    `min_pixels`, each pixel repeated (nearest neighbour); unchanged when it is that large already."""
    factor = max(1, math.ceil(min_pixels / max(1, min(image.shape[0], image.shape[1]))))
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=FONT_SIZE)


def wrap(text: str, width: float, font, max_lines: int = CAPTION_LINES) -> List[str]:
    """`text` broken into lines no wider than `width` pixels in `font`; at most `max_lines` (the last
    one ending in an ellipsis when the text is longer). A word wider than a line is cut."""
    lines: List[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:  # a word longer than the line
            cut = len(current)
            while cut > 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "…"]
    return lines


def captioned_grid(
    images: Sequence[np.ndarray],
    captions: Optional[Sequence[str]] = None,
    *,
    columns: Optional[int] = None,
    min_pixels: int = MIN_CELL_PIXELS,
) -> np.ndarray:
    """One HxWx3 uint8 picture: the images (upscaled, see `upscale`) row by row on white, each with its
    caption (wrapped, up to `CAPTION_LINES` lines) under it. `columns`: default up to 8 (pairs stay on
    one row)."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("no images to put in a grid")
    cells = [upscale(np.asarray(image), min_pixels) for image in images]
    columns = columns or min(len(cells), 8)
    rows = math.ceil(len(cells) / columns)
    cell_w = max(cell.shape[1] for cell in cells)
    cell_h = max(cell.shape[0] for cell in cells)
    font = _font()
    ascent, descent = font.getmetrics()
    line_h = ascent + descent + 1
    texts = [wrap(str(caption), cell_w, font) for caption in captions] if captions else [[] for _ in cells]
    text_h = max(len(lines) for lines in texts) * line_h
    row_h = cell_h + (text_h + PADDING if text_h else 0)
    width = columns * cell_w + (columns + 1) * PADDING
    height = rows * row_h + (rows + 1) * PADDING
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, (cell, lines) in enumerate(zip(cells, texts)):
        row, column = divmod(index, columns)
        left = PADDING + column * (cell_w + PADDING)
        top = PADDING + row * (row_h + PADDING)
        canvas.paste(Image.fromarray(np.ascontiguousarray(cell[:, :, :3])), (left, top))
        for number, line in enumerate(lines):
            draw.text((left, top + cell_h + PADDING + number * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
