"""Token grids as pictures: a fixed colour per code and a labelled PNG comparison grid.

Colours follow the code layout so a picture reads at a glance: each group (scene,
object, noise) has its own hue, each palette block its own saturation and
brightness (plain: natural, Van Gogh: vivid, Monet: pastel; a larger world's further
styles also turn the hues), and the codes inside a group differ slightly in brightness.
Codes the renderer never uses are grey. At 8 pixels a cell or more, every cell of an
object's motif carries that object's glyph (a church's cross, a windmill's sails; a
generated world's objects take the glyphs in turn) and its trace cells a dot, so the
object reads as a shape, and ``save_comparison`` can write the classifier's verdict
under each image.
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
_HUE_TURN = 0.37  # each further round of the looks (a world with more than 3 styles) turns the hues by this much

# 5x5 glyphs, one per object: the planted objects by name, the others in turn
_GLYPHS = {
    "cross": ["..#..", "#####", "..#..", "..#..", "..#.."],
    "roof": ["..#..", ".#.#.", "#...#", "#...#", "#####"],
    "tower": [".###.", "..#..", "..#..", ".###.", "#####"],
    "battlements": ["#.#.#", "#####", "#...#", "#.#.#", "#####"],
    "screen": ["#####", "#...#", "#...#", "#####", ".#.#."],
    "mask": [".###.", "#.#.#", "#####", "#...#", ".###."],
    "sails": ["#...#", ".#.#.", "..#..", ".#.#.", "#...#"],
    "diamond": ["..#..", ".#.#.", "#...#", ".#.#.", "..#.."],
    "ring": [".###.", "#...#", "#...#", "#...#", ".###."],
    "bars": ["#.#.#", "#.#.#", "#.#.#", "#.#.#", "#.#.#"],
    "steps": ["#....", "##...", "###..", "####.", "#####"],
    "arrow": ["..#..", ".###.", "#.#.#", "..#..", "..#.."],
}
_OBJECT_GLYPH = {"church": "cross", "barn": "roof", "lighthouse": "tower", "castle": "battlements",
                 "cinema": "screen", "theater": "mask", "windmill": "sails"}
_GLYPH_MIN_CELL = 8  # pixels a cell needs for a glyph to be drawn


def code_palette(layout: CodeLayout) -> np.ndarray:
    """uint8 RGB colour per code, shape [codebook_size, 3]."""
    palette = np.full((layout.codebook_size, 3), 96, dtype=np.uint8)
    n_groups = len(layout.group_names)
    for b in range(len(layout.block_names)):
        sat, val = _BLOCK_LOOK[b % len(_BLOCK_LOOK)]
        turn = (b // len(_BLOCK_LOOK)) * _HUE_TURN
        for g in range(n_groups):
            hue = (g / n_groups + turn) % 1.0
            for k in range(layout.group_size):
                shade = val * (0.75 + 0.25 * k / max(1, layout.group_size - 1))
                r, gr, bl = colorsys.hsv_to_rgb(hue, sat, min(1.0, shade))
                code = b * layout.block_size + g * layout.group_size + k
                palette[code] = (round(r * 255), round(gr * 255), round(bl * 255))
    return palette


def object_glyphs(layout: CodeLayout) -> dict[int, np.ndarray]:
    """Group index -> a bool [5, 5] glyph: each object group its object's glyph, each trace group a dot."""
    from ear_dist.world.render import trace_group

    names = list(layout.group_names)
    objects = [n for n in names if trace_group(n) in names]
    spare = [g for g in _GLYPHS if g not in _OBJECT_GLYPH.values()] + list(_GLYPHS)
    dot = np.zeros((5, 5), dtype=bool)
    dot[2, 2] = True
    out = {}
    for i, name in enumerate(objects):
        glyph = _OBJECT_GLYPH.get(name) or spare[i % len(spare)]
        out[names.index(name)] = np.array([[c == "#" for c in row] for row in _GLYPHS[glyph]])
        out[names.index(trace_group(name))] = dot
    return out


def grid_to_image(tokens, layout: CodeLayout, grid_side: int, cell_px: int = 16) -> Image.Image:
    """One token grid ([side*side] codes) as an RGB image of side*cell_px pixels square; at ``cell_px`` >= 8 the
    object cells carry their glyphs (dark on light colours, light on dark ones)."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(grid_side, grid_side)
    if tokens.min() < 0 or tokens.max() >= layout.codebook_size:
        raise ValueError(f"image tokens: codes must lie in [0, {layout.codebook_size}), "
                         f"got min {int(tokens.min())} max {int(tokens.max())}")
    cells = code_palette(layout)[tokens]
    rgb = cells.repeat(cell_px, axis=0).repeat(cell_px, axis=1)
    if cell_px >= _GLYPH_MIN_CELL:
        glyphs, groups = object_glyphs(layout), layout.group_of_code()[tokens]
        unit = cell_px // 6  # a 5x5 glyph centred in the cell, one unit of margin
        margin = (cell_px - 5 * unit) // 2
        for (r, c), g in np.ndenumerate(groups):
            if int(g) not in glyphs:
                continue
            mark = np.kron(glyphs[int(g)], np.ones((unit, unit), dtype=bool))
            ink = (20, 20, 20) if cells[r, c].astype(int).sum() > 360 else (245, 245, 245)
            top, left = r * cell_px + margin, c * cell_px + margin
            rgb[top:top + mark.shape[0], left:left + mark.shape[1]][mark] = ink
    return Image.fromarray(rgb, mode="RGB")


def verdict(world, tokens) -> list[str]:
    """Per image, what the world's classifier sees in it: its objects and styles (``-``: none), e.g. ``church, monet``."""
    shown = world.classify(np.asarray(tokens).reshape(len(tokens), -1))
    concepts = world.vocab.concepts
    return [", ".join(c for c in concepts if shown[c][i]) or "-" for i in range(len(tokens))]


def save_comparison(
    path,
    rows: Sequence[Sequence[np.ndarray]],
    layout: CodeLayout,
    grid_side: int,
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    cell_px: int = 12,
    pad: int = 6,
    captions: Optional[Sequence[Sequence[str]]] = None,
) -> Path:
    """Write a PNG with one token grid per cell (rows x columns), labelled on the left and top; ``captions``
    (rows x columns of text, e.g. ``verdict(world, row)`` per row) go under each image."""
    if not rows or not rows[0]:
        raise ValueError("save_comparison: no images")
    n_cols = max(len(r) for r in rows)
    font = ImageFont.load_default()
    label_w = 8 + max((int(font.getlength(t)) for t in row_labels or []), default=0)
    label_h = 16 if col_labels else 0
    caption_h = 14 if captions else 0
    tile = grid_side * cell_px
    if captions:  # wide enough for the longest caption
        tile_w = max(tile, 4 + max((int(font.getlength(t)) for row in captions for t in row), default=0))
    else:
        tile_w = tile
    width = label_w + n_cols * (tile_w + pad) + pad
    height = label_h + len(rows) * (tile + caption_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(col_labels or []):
        draw.text((label_w + pad + j * (tile_w + pad), 2), text, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = label_h + pad + i * (tile + caption_h + pad)
        if row_labels:
            draw.text((4, y + tile // 2 - 6), row_labels[i], fill=(0, 0, 0), font=font)
        for j, tokens in enumerate(row):
            x = label_w + pad + j * (tile_w + pad)
            canvas.paste(grid_to_image(tokens, layout, grid_side, cell_px), (x, y))
            if captions and j < len(captions[i]):
                draw.text((x, y + tile + 1), captions[i][j], fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
