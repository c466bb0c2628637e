"""Plain-file output: the fundus as one PNG, the OCT as a folder of B-scan PNGs (bscan_000.png, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_fundus_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image.save(path, format="PNG", compress_level=3)


def write_oct_pngs(folder: Path, volume: np.ndarray) -> None:
    """One 8-bit grayscale PNG per B-scan, frame 0 (the most superior) first."""
    folder.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(len(volume) - 1)))
    for index, bscan in enumerate(volume):
        Image.fromarray(bscan).save(folder / f"bscan_{index:0{digits}d}.png", format="PNG", compress_level=3)
