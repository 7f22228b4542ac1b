"""Draw sampled sequences as a PNG grid: one row per sequence, each item's
image with its label beneath, the query framed in red.

Pixels are materialised here the way the model would see them (augmentation
variant, pixel noise, randomly generated rare images), in NumPy, so the
picture shows what training feeds the model rather than the raw drawings;
only preproc.invert is left out, so ink stays dark and the grid stays readable.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .config import Config
from .data.augment import apply_variant
from .data.sequences import Batch
from .errors import EiclError
from .files import atomic_write_bytes

MIN_CELL = 84  # pixels: small (downsampled) images are enlarged to at least this
CAPTION = 16
PAD = 6
QUERY_RGB = (220, 30, 30)


def materialise(batch: Batch, dataset: Any, cfg: Config, seed: int = 0) -> np.ndarray:
    """(B, L, H, W) float32 pixels in [0, 1] (1 = white) as the model receives them."""
    images = np.asarray(dataset.images)
    if images.ndim != 3:
        raise EiclError(f"data.dataset = {dataset.kind!r} has no images to draw; "
                        "--png needs omniglot or synthetic data")
    px = images[batch.image_index].astype(np.float32)  # (B, L, H, W)
    for v in np.unique(batch.variant):
        if v:
            sel = batch.variant == v
            px[sel] = np.stack([apply_variant(im, int(v)) for im in px[sel]])
    rng = np.random.default_rng([seed, 7])
    if cfg.sequences.randomly_generate_rare and (batch.rare_slot >= 0).any():
        # One random binary image per (sequence, rare class), shared by its occurrences.
        fresh = rng.integers(0, 2, px.shape).astype(np.float32)
        b, p = np.nonzero(batch.rare_slot >= 0)
        px[b, p] = fresh[b, batch.rare_slot[b, p]]
    if cfg.sequences.noise_scale:
        px += rng.normal(0.0, cfg.sequences.noise_scale, px.shape).astype(np.float32)
    return np.clip(px, 0.0, 1.0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def render(batch: Batch, dataset: Any, cfg: Config, seed: int = 0) -> Image.Image:
    """The grid as an RGB image; symbolic examples are drawn as their integer."""
    n, length = batch.label.shape
    symbolic = np.asarray(dataset.images).ndim == 1
    if symbolic:
        cell = MIN_CELL
        px = None
    else:
        px = materialise(batch, dataset, cfg, seed)
        h = px.shape[-1]
        scale = max(1, -(-MIN_CELL // h))
        cell = h * scale
    font = _font(12)
    width = PAD + length * (cell + PAD)
    height = PAD + n * (cell + CAPTION + PAD)
    canvas = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        y = PAD + i * (cell + CAPTION + PAD)
        for j in range(length):
            x = PAD + j * (cell + PAD)
            if symbolic:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(255, 255, 255))
                token = str(int(np.asarray(dataset.images)[batch.image_index[i, j]]))
                draw.text((x + cell // 2, y + cell // 2), token, fill=(0, 0, 0), font=font,
                          anchor="mm")
            else:
                gray = (px[i, j] * 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
                canvas.paste(Image.fromarray(gray, "L").convert("RGB"), (x, y))
            query = j == length - 1
            if query:
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=QUERY_RGB, width=2)
            text = f"{'q:' if query else ''}{int(batch.label[i, j])}{'*' if batch.is_rare[i, j] else ''}"
            draw.text((x + cell // 2, y + cell + 2), text, fill=QUERY_RGB if query else (0, 0, 0),
                      font=font, anchor="mt")
    return canvas


def write_png(path: Path, batch: Batch, dataset: Any, cfg: Config, seed: int = 0) -> None:
    """Render and write atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if not path.parent.exists():
        raise EiclError(f"--png {path}: folder {path.parent} does not exist")
    buf = io.BytesIO()
    render(batch, dataset, cfg, seed).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
