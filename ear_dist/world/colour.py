"""Token grids as pictures: a fixed colour per code and a labelled PNG comparison grid.

Colours follow the code layout so a picture reads at a glance: each group (scene,
object, noise) has its own hue, each palette block its own saturation and
brightness (plain: natural, Van Gogh: vivid, Monet: pastel), and the codes inside a
group differ slightly in brightness. Codes the renderer never uses are grey.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ear_dist.world.render import CodeLayout

# (saturation, value) per palette block: plain, then one per style
_BLOCK_LOOK = [(0.55, 0.80), (0.95, 0.95), (0.30, 1.00), (0.75, 0.60)]


def code_palette(layout: CodeLayout) -> np.ndarray:
    """uint8 RGB colour per code, shape [codebook_size, 3]."""
    palette = np.full((layout.codebook_size, 3), 96, dtype=np.uint8)
    n_groups = len(layout.group_names)
    for b in range(len(layout.block_names)):
        sat, val = _BLOCK_LOOK[b % len(_BLOCK_LOOK)]
        for g in range(n_groups):
            hue = g / n_groups
            for k in range(layout.group_size):
                shade = val * (0.75 + 0.25 * k / max(1, layout.group_size - 1))
                r, gr, bl = colorsys.hsv_to_rgb(hue, sat, min(1.0, shade))
                code = b * layout.block_size + g * layout.group_size + k
                palette[code] = (round(r * 255), round(gr * 255), round(bl * 255))
    return palette


def grid_to_image(tokens, layout: CodeLayout, grid_side: int, cell_px: int = 16) -> Image.Image:
    """One token grid ([side*side] codes) as an RGB image of side*cell_px pixels square."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(grid_side, grid_side)
    if tokens.min() < 0 or tokens.max() >= layout.codebook_size:
        raise ValueError(f"image tokens: codes must lie in [0, {layout.codebook_size}), "
                         f"got min {int(tokens.min())} max {int(tokens.max())}")
    rgb = code_palette(layout)[tokens]
    rgb = rgb.repeat(cell_px, axis=0).repeat(cell_px, axis=1)
    return Image.fromarray(rgb, mode="RGB")


def save_comparison(
    path,
    rows: Sequence[Sequence[np.ndarray]],
    layout: CodeLayout,
    grid_side: int,
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    cell_px: int = 12,
    pad: int = 6,
) -> Path:
    """Write a PNG with one token grid per cell (rows x columns), labelled on the left and top."""
    if not rows or not rows[0]:
        raise ValueError("save_comparison: no images")
    n_cols = max(len(r) for r in rows)
    font = ImageFont.load_default()
    label_w = 8 + max((int(font.getlength(t)) for t in row_labels or []), default=0)
    label_h = 16 if col_labels else 0
    tile = grid_side * cell_px
    width = label_w + n_cols * (tile + pad) + pad
    height = label_h + len(rows) * (tile + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(col_labels or []):
        draw.text((label_w + pad + j * (tile + pad), 2), text, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = label_h + pad + i * (tile + pad)
        if row_labels:
            draw.text((4, y + tile // 2 - 6), row_labels[i], fill=(0, 0, 0), font=font)
        for j, tokens in enumerate(row):
            canvas.paste(grid_to_image(tokens, layout, grid_side, cell_px), (label_w + pad + j * (tile + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
