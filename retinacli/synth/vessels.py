"""Rasterise the vessel tree onto a regular grid (fundus pixels or OCT A-scan positions)."""

from __future__ import annotations

import numpy as np

from retinacli.synth.anatomy import VesselTree


def rasterize_vessels(tree: VesselTree, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vessel opacity in [0, 1] on the grid (len(ys), len(xs)): (arteries, veins).

    ``xs`` and ``ys`` are evenly spaced (ascending or descending). Vessels narrower than a grid
    cell are blurred to one cell and dimmed in proportion, so thin vessels fade out at low
    resolution instead of aliasing. All segments are evaluated at once, each in a small window.
    """
    nx, ny = len(xs), len(ys)
    step_x = float(xs[1] - xs[0]) if nx > 1 else 1.0
    step_y = float(ys[1] - ys[0]) if ny > 1 else 1.0
    cell = min(abs(step_x) if nx > 1 else np.inf, abs(step_y) if ny > 1 else np.inf)
    cell = 0.05 if not np.isfinite(cell) else cell
    half = tree.width / 2.0
    sigma = np.sqrt((half / 1.2) ** 2 + (cell / 2.5) ** 2)
    amp = np.minimum(1.0, (half / 1.2) / sigma * 1.15)
    reach = 3.0 * sigma
    cols, col_ok = _windows(np.minimum(tree.x0, tree.x1) - reach, np.maximum(tree.x0, tree.x1) + reach,
                            float(xs[0]), step_x, nx)
    rows, row_ok = _windows(np.minimum(tree.y0, tree.y1) - reach, np.maximum(tree.y0, tree.y1) + reach,
                            float(ys[0]), step_y, ny)
    px = xs[cols][:, None, :]  # (N, 1, wc)
    py = ys[rows][:, :, None]  # (N, wr, 1)
    ax, ay = tree.x0[:, None, None], tree.y0[:, None, None]
    dx, dy = (tree.x1 - tree.x0)[:, None, None], (tree.y1 - tree.y0)[:, None, None]
    seg2 = dx * dx + dy * dy + 1e-12
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / seg2, 0.0, 1.0)
    d2 = (px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2
    value = amp[:, None, None] * np.exp(-0.5 * d2 / sigma[:, None, None] ** 2)
    ok = row_ok[:, :, None] & col_ok[:, None, :]
    flat = rows[:, :, None] * nx + cols[:, None, :]
    maps = []
    for is_vein in (False, True):
        sel = ok & (tree.is_vein == is_vein)[:, None, None]
        out = np.zeros(ny * nx)
        np.maximum.at(out, flat[sel], value[sel])
        maps.append(out.reshape(ny, nx))
    return maps[0], maps[1]


def _windows(lo: np.ndarray, hi: np.ndarray, origin: float, step: float, n: int):
    """Per segment, the grid indices covering [lo, hi] (padded to a common width) and a validity mask."""
    a, b = (lo - origin) / step, (hi - origin) / step
    first = np.clip(np.floor(np.minimum(a, b)), 0, n - 1).astype(np.int64)
    last = np.clip(np.ceil(np.maximum(a, b)), 0, n - 1).astype(np.int64)
    outside = (np.maximum(a, b) < 0) | (np.minimum(a, b) > n - 1)
    width = int((last - first).max()) + 1 if len(first) else 1
    idx = first[:, None] + np.arange(width)[None, :]
    ok = (idx <= last[:, None]) & ~outside[:, None]
    return np.minimum(idx, n - 1), ok
