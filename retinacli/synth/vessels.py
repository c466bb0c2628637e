"""Rasterise the vessel tree onto a separable grid (fundus pixels or OCT A-scan positions)."""

from __future__ import annotations

import numpy as np

from retinacli.synth.anatomy import VesselTree


def rasterize_vessels(tree: VesselTree, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vessel opacity in [0, 1] on the grid (len(ys), len(xs)): (arteries, veins).

    Vessels narrower than a grid cell are blurred to one cell and dimmed in proportion, so thin
    vessels fade out at low resolution instead of aliasing.
    """
    cell = max(abs(xs[1] - xs[0]) if len(xs) > 1 else 0.05, abs(ys[1] - ys[0]) if len(ys) > 1 else 0.05)
    maps = (np.zeros((len(ys), len(xs))), np.zeros((len(ys), len(xs))))
    half = tree.width / 2.0
    sigma = np.sqrt((half / 1.2) ** 2 + (cell / 2.5) ** 2)
    amp = np.minimum(1.0, (half / 1.2) / sigma * 1.15)
    reach = 3.0 * sigma
    x_lo, x_hi = np.minimum(tree.x0, tree.x1) - reach, np.maximum(tree.x0, tree.x1) + reach
    y_lo, y_hi = np.minimum(tree.y0, tree.y1) - reach, np.maximum(tree.y0, tree.y1) + reach
    x_sorted = xs[0] <= xs[-1]
    y_sorted = ys[0] <= ys[-1]
    for i in range(len(tree.x0)):
        c0, c1 = _window(xs, x_lo[i], x_hi[i], x_sorted)
        r0, r1 = _window(ys, y_lo[i], y_hi[i], y_sorted)
        if c0 >= c1 or r0 >= r1:
            continue
        px = xs[c0:c1][None, :]
        py = ys[r0:r1][:, None]
        ax, ay = tree.x0[i], tree.y0[i]
        dx, dy = tree.x1[i] - ax, tree.y1[i] - ay
        seg2 = dx * dx + dy * dy + 1e-12
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / seg2, 0.0, 1.0)
        d2 = (px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2
        v = amp[i] * np.exp(-0.5 * d2 / sigma[i] ** 2)
        target = maps[1 if tree.is_vein[i] else 0][r0:r1, c0:c1]
        np.maximum(target, v, out=target)
    return maps


def _window(coords: np.ndarray, lo: float, hi: float, ascending: bool) -> tuple[int, int]:
    """Index range of ``coords`` (monotonic) inside [lo, hi]."""
    if ascending:
        return int(np.searchsorted(coords, lo)), int(np.searchsorted(coords, hi, side="right"))
    rev = coords[::-1]
    n = len(coords)
    a, b = int(np.searchsorted(rev, lo)), int(np.searchsorted(rev, hi, side="right"))
    return n - b, n - a
