"""Pictures people look at: image grids, reconstruction side-by-sides, loss curves (PNG, no matplotlib).

Sound is drawn as what a person can see of it: a batch of signals (N, 1, L) becomes spectrograms
(`ldm.audio.spectrogram_pictures`) wherever a grid takes images, so every picture-writing call works
for both domains.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.artifacts import write_atomic
from ldm.audio import spectrogram_pictures

ROUND_OFF = (
    1e-3  # how far outside its range an input may stray by float round-off (e.g. a resize, x / 127.5 - 1 in half)
)


def check_range(name: str, values: torch.Tensor, lo: float, hi: float, meaning: str) -> None:
    """Raise ValueError unless every value is finite and in [lo, hi] (give or take ROUND_OFF), naming the range seen."""
    values = values.detach().float()
    if values.numel() == 0:
        return  # an empty batch has no range (aminmax would raise)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"found NaN or infinite values in {name}: pass finite values in [{lo:g}, {hi:g}] ({meaning})")
    low, high = (v.item() for v in torch.aminmax(values))
    if low < lo - ROUND_OFF or high > hi + ROUND_OFF:
        if low >= 0 and high > 1.5:  # 8-bit pixels, the usual slip
            fix = f"they look like 0..255: pass x / {'127.5 - 1' if lo < 0 else '255'}"
        else:
            fix = f"rescale them into [{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}] ({meaning}), got values in [{low:g}, {high:g}]: {fix}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Return (N, H, W, C) uint8 pixels of (N, C, H, W) images in [-1, 1]."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Return one PIL image per (C, H, W) image of a batch in [-1, 1]."""
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in to_uint8(images)]


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """Return one PIL image tiling a batch (N, C, H, W) in [-1, 1], `nrow` per row.

    A batch of signals (N, 1, L) is drawn as their spectrograms.
    """
    if images.ndim == 3:
        images = spectrogram_pictures(images)  # (N, 1, F, frames)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pixels = to_uint8(images)
    canvas = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, np.uint8)
    for i in range(n):  # one copy per image, not per pixel
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        canvas[y : y + h, x : x + w] = pixels[i]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_png(image: Image.Image, path: str | Path, scale: int = 1) -> Path:
    """Write a PIL image as PNG atomically (optionally upscaled with nearest neighbour) and return the path."""
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a grid PNG of a batch in [-1, 1] and return its path."""
    return save_png(make_grid(images, nrow), path, scale)


def caption_font() -> ImageFont.ImageFont:
    """Pillow's bitmap font, 6 px a character and 11 px a line, spaces as wide as letters. (Its FreeType default
    draws a space 2 px wide at this size, which runs the words of a caption together.)"""
    return ImageFont.load_default_imagefont()


def save_captioned_grid(
    images: torch.Tensor, captions: Sequence[str], path: str | Path, ncol: int | None = None, scale: int = 2
) -> Path:
    """Write a grid PNG of images (N, C, H, W) in [-1, 1], each with its caption wrapped beneath it; return its path.

    Image i's caption is captions[i]; repeated captions (several samples of one prompt) are written each time.
    """
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    n, padding = len(images), 4
    tiles = [tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST) for tile in to_pil(images)]
    ncol = ncol or math.ceil(math.sqrt(n))
    width, height = tiles[0].width, tiles[0].height
    font = caption_font()
    chars = max(8, width // 6)  # 6 px per character
    wrapped = [textwrap.wrap(caption, chars) or [""] for caption in captions]
    text_height = 11 * max(len(lines) for lines in wrapped) + padding
    cell_w, cell_h = width + padding, height + text_height + padding
    rows = math.ceil(n / ncol)
    canvas = Image.new("RGB", (ncol * cell_w + padding, rows * cell_h + padding), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        r, c = divmod(i, ncol)
        x, y = padding + c * cell_w, padding + r * cell_h
        canvas.paste(tile.convert("RGB"), (x, y))
        for k, line in enumerate(lines):
            draw.text((x, y + height + 2 + 11 * k), line, fill="black", font=font)
    return save_png(canvas, path)


def save_side_by_side(
    inputs: torch.Tensor, recons: torch.Tensor, path: str | Path, pairs_per_row: int = 8, scale: int = 2
) -> Path:
    """Write a PNG where each input is followed by its reconstruction (input | reconstruction pairs)."""
    n = min(len(inputs), len(recons))
    pairs = torch.stack([inputs[:n].cpu(), recons[:n].cpu()], dim=1).flatten(0, 1)  # (2N, C, H, W) or (2N, 1, L)
    return save_grid(pairs, path, nrow=2 * pairs_per_row, scale=scale)


@dataclass
class CurvePanel:
    """One line plot: named (x, y) series, a title, an x axis label, a log y axis when asked."""

    curves: dict[str, Sequence[tuple[float, float]]]
    title: str = ""
    log_y: bool = False
    x_label: str = ""  # written under the x axis; empty for steps, the usual x


def save_curves(
    curves: dict[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    size: tuple[int, int] = (720, 420),
    log_y: bool = False,
) -> Path:
    """Write a line plot PNG of named (step, value) series and return its path."""
    return save_curve_panels([CurvePanel(curves, title, log_y)], path, size)


def save_curve_panels(panels: Sequence[CurvePanel], path: str | Path, size: tuple[int, int] = (720, 420)) -> Path:
    """Write line plots side by side, each `size` pixels, as one PNG and return its path."""
    width, height = size
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    for i, panel in enumerate(panels):
        _draw_panel(draw, panel, i * width, size)
    return save_png(image, path)


def _tick_label(value: float, span: float) -> str:
    """Whole numbers on a wide axis (steps), three digits on a narrow one (minutes), k/M for large counts."""
    if abs(value) >= 1e5:
        return f"{value / 1e6:.3g}M" if abs(value) >= 1e6 else f"{value / 1e3:.3g}k"
    return f"{value:.0f}" if span >= 10 else f"{value:.3g}"


CURVE_COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)  # ten distinct lines, then the same colours dashed


def _draw_panel(draw: ImageDraw.ImageDraw, panel: CurvePanel, offset: int, size: tuple[int, int]) -> None:
    """Draw one line plot into the `size` box whose left edge is at x = `offset`."""
    width, height = size
    left, right, top, bottom = offset + 70, 20, 30, 40
    log_y = panel.log_y
    points = {k: [(x, y) for x, y in v if math.isfinite(y) and (y > 0 or not log_y)] for k, v in panel.curves.items()}
    points = {k: v for k, v in points.items() if v}
    if panel.title:
        draw.text((left, 8), panel.title, fill="black")
    if not points:
        draw.text((left, top), "no data", fill="black")
        return
    right_edge = offset + width - right
    transform = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    xs = [x for v in points.values() for x, _ in v]
    ys = [transform(y) for v in points.values() for _, y in v]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (right_edge - left)
        py = height - bottom - (transform(y) - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    draw.rectangle([left, top, right_edge, height - bottom], outline="black")
    for i in range(5):  # axis ticks
        fy = y0 + (y1 - y0) * i / 4
        py = height - bottom - (fy - y0) / (y1 - y0) * (height - top - bottom)
        label = f"{10**fy:.3g}" if log_y else f"{fy:.3g}"
        draw.text((offset + 4, py - 6), label, fill="black")
        fx = x0 + (x1 - x0) * i / 4
        px = left + (fx - x0) / (x1 - x0) * (right_edge - left)
        draw.text((px - 10, height - bottom + 6), _tick_label(fx, x1 - x0), fill="black")
    if panel.x_label:
        draw.text((right_edge - 7 * len(panel.x_label), height - 14), panel.x_label, fill="black")
    for i, (name, series) in enumerate(points.items()):
        color = CURVE_COLORS[i % len(CURVE_COLORS)]
        pixels = [to_px(x, y) for x, y in series]
        if i < len(CURVE_COLORS):
            draw.line(pixels, fill=color, width=2)
        else:  # dashed: every other tenth of each segment
            for (ax, ay), (bx, by) in zip(pixels, pixels[1:]):
                for k in range(0, 10, 2):
                    draw.line(
                        [
                            (ax + (bx - ax) * k / 10, ay + (by - ay) * k / 10),
                            (ax + (bx - ax) * (k + 1) / 10, ay + (by - ay) * (k + 1) / 10),
                        ],
                        fill=color,
                        width=2,
                    )
        for px, py in pixels:  # the measured points
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=color)
        draw.text((left + 10, top + 5 + 14 * i), name, fill=color)
