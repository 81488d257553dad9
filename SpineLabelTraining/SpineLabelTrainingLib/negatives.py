"""Images without a spine: noise, smooth random blobs and balls, with CT-like or MR-like intensities.

Training draws them (``spinelabel train --data negative:W``) so that the network learns that bright structures
which are not arranged as vertebrae are background; ``benchmarks/spine_gate.py`` draws them (and kinds that training
never sees) to place the spine gate.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["KINDS", "non_spine_image"]

KINDS = ("white noise", "smoothed noise", "uniform noise", "blobs (MR)", "blobs (CT)", "balls (MR)", "balls (CT)")


def non_spine_image(rng: np.random.Generator, kind: str, shape_zyx: tuple[int, int, int], spacing_mm: float
                    ) -> np.ndarray:
    """One image without a spine.

    Args:
        rng: the random generator (a seed gives the same image).
        kind: one of ``KINDS``. Noise is Gaussian (sd 100), Gaussian smoothed over 4.5 mm, or uniform 0-255;
            blobs are where Gaussian noise smoothed over 9 mm lies one standard deviation above its mean (a sixth
            of the image); balls are six spheres of 9-22 mm radius.
            "(CT)" kinds are in HU (bright parts 300 HU, the rest air), "(MR)" kinds in arbitrary units.
        shape_zyx: image size (z, y, x) in voxels.
        spacing_mm: isotropic voxel size, mm.

    Returns:
        float32 (z, y, x) raw intensities.
    """
    if kind == "white noise":
        out = rng.normal(0, 100, shape_zyx)
    elif kind == "smoothed noise":
        out = ndimage.gaussian_filter(rng.normal(0, 100, shape_zyx), 4.5 / spacing_mm) * 10
    elif kind == "uniform noise":
        out = rng.uniform(0, 255, shape_zyx)
    elif kind.startswith("blobs"):
        field = ndimage.gaussian_filter(rng.normal(0, 1, shape_zyx), 9.0 / spacing_mm)
        bright = field > field.std()  # in units of its spread: a fixed threshold left 1 mm images empty
        high, low = (300.0, -1000.0) if kind.endswith("(CT)") else (400.0, 50.0)
        out = np.where(bright, high, low) + rng.normal(0, 20, shape_zyx)
    elif kind.startswith("balls"):
        grid = np.indices(shape_zyx, dtype=np.float32) * spacing_mm
        extent = np.asarray(shape_zyx) * spacing_mm
        inside = np.zeros(shape_zyx, dtype=bool)
        for _ in range(6):
            centre = rng.uniform(0.15 * extent, 0.85 * extent)
            radius = rng.uniform(9.0, 22.0)
            inside |= sum((g - c) ** 2 for g, c in zip(grid, centre)) < radius**2
        out = (inside * 1300.0 - 1000.0 if kind.endswith("(CT)") else inside * 1000.0) + rng.normal(0, 10, shape_zyx)
    else:
        raise ValueError(f"unknown kind of non-spine image {kind!r}; one of {', '.join(KINDS)}")
    return out.astype(np.float32)
