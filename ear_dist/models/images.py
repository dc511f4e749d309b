"""Image tokens -> pixels (the model's VQ decoder) -> PNG files and grids."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


@torch.no_grad()
def decode_tokens(model, image_tokens: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Decode [N, T] image tokens with the VQ decoder into uint8 images [N, H, W, 3]."""
    outs = []
    for s in range(0, image_tokens.shape[0], batch_size):
        pix = model.decode_image_tokens(image_tokens[s : s + batch_size].to(model.device))
        pix = ((pix.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        outs.append(pix.cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 1, 1, 3), np.uint8)


def save_pngs(images: np.ndarray, out_dir: Path, names: Sequence[str]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, name in zip(images, names):
        p = out_dir / f"{name}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def make_grid(
    images: Sequence[np.ndarray], cols: Optional[int] = None, cell: int = 128,
    labels: Optional[Sequence[str]] = None, pad: int = 4,
) -> Image.Image:
    """Tile images (nearest-neighbour upscaled to ``cell`` pixels) with optional labels under each."""
    n = len(images)
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    label_h = 14 if labels else 0
    grid = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + pad + label_h) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (cell + pad), pad + r * (cell + pad + label_h)
        grid.paste(Image.fromarray(np.asarray(img)).resize((cell, cell), Image.NEAREST), (x, y))
        if labels:
            draw.text((x, y + cell + 1), str(labels[i])[: cell // 6], fill="black")
    return grid
