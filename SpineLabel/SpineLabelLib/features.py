"""Per-component measurements and the chain along the spine.

All arrays are (z, y, x) on the model grid; positions are converted to LPS mm through the grid's ``Geometry``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .components import count_ids, cut_by_field_of_view
from .result import Geometry

__all__ = ["ComponentFeatures", "measure", "chain_order", "drop_detached_ends", "off_the_line",
           "level_scores", "level_sharpness"]


@dataclass
class ComponentFeatures:
    """Measurements of one vertebra component.

    Attributes:
        id: component id.
        body_centroid_lps_mm: float64 (3,) centroid of the vertebral body, LPS mm.
        volume_ml: whole vertebra (body + posterior elements), ml.
        extent_mm: float64 (3,) bounding-box size of the body (z, y, x) in mm.
        body_probability: mean network probability of vertebral body inside the body (0-1).
        at_view_end: the body touches the first or last head-feet plane of the model grid: cut by the field of view.
    """

    id: int
    body_centroid_lps_mm: np.ndarray
    volume_ml: float
    extent_mm: np.ndarray
    body_probability: float
    at_view_end: bool


def measure(bodies: np.ndarray, vertebrae: np.ndarray, body_probability: np.ndarray,
            grid: Geometry) -> list[ComponentFeatures]:
    """Measure every component.

    Args:
        bodies: int32 (z, y, x) body components, ids 1..n, on the model grid (``io.canonical_grid``: z runs inferior
            to superior).
        vertebrae: int32 (z, y, x) whole-vertebra components, same ids.
        body_probability: float (z, y, x) the network's vertebral-body probability.
        grid: geometry of the model grid (spacing in mm along x, y, z).
    """
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    spacing_zyx = np.asarray(grid.spacing[::-1])
    out = []
    boxes = ndimage.find_objects(bodies)
    whole_counts = count_ids(vertebrae, minlength=len(boxes) + 1)  # slab by slab: no int64 copy of the grid
    cut = cut_by_field_of_view(bodies)
    for vid, box in enumerate(boxes, start=1):
        if box is None:
            continue
        mask = bodies[box] == vid
        centroid_zyx = (np.argwhere(mask) + np.array([s.start for s in box])).mean(axis=0)
        out.append(
            ComponentFeatures(
                id=vid,
                body_centroid_lps_mm=grid.index_to_lps(centroid_zyx[::-1]),
                volume_ml=float(whole_counts[vid]) * voxel_ml,
                extent_mm=np.array([s.stop - s.start for s in box]) * spacing_zyx,
                body_probability=float(body_probability[box][mask].astype(np.float32).mean()),
                at_view_end=bool(cut[vid]),
            )
        )
    return out


def chain_order(features: list[ComponentFeatures]) -> tuple[list[ComponentFeatures], np.ndarray]:
    """Order components cranial to caudal and measure the gaps between neighbours.

    The chain follows the superior (S) coordinate of the body centroids: the spine runs cranio-caudally in every
    standard scan, whatever its curvature in the sagittal or coronal plane.

    Returns:
        (ordered features, float (n-1,) centroid distances between consecutive vertebrae in mm).
    """
    ordered = sorted(features, key=lambda f: -float(f.body_centroid_lps_mm[2]))
    cents = np.array([f.body_centroid_lps_mm for f in ordered]).reshape(-1, 3)
    gaps = np.linalg.norm(np.diff(cents, axis=0), axis=1)
    return ordered, gaps


def drop_detached_ends(ordered: list[ComponentFeatures], gaps: np.ndarray, max_ratio: float = 3.0
                       ) -> tuple[list[ComponentFeatures], np.ndarray, list[float]]:
    """Drop components cut off from either end of the chain by a gap no missed vertebra explains.

    A vertebra the network misses leaves a gap about twice the spacing, two missed three times; a component further
    than ``max_ratio`` times the median spacing of the rest of the chain beyond its end is not part of that spine
    (an artefact at the edge of the field of view, a bowel loop, the femoral head). Chains of fewer than four
    components are left alone: their spacing is not known well enough.

    Args:
        ordered: the components in chain order (``chain_order``).
        gaps: float (len(ordered) - 1,) centroid distances between consecutive components, mm.
        max_ratio: how many median spacings a gap may span before the end beyond it is dropped.

    Returns:
        (kept features, their gaps in mm, the gaps in mm that cut off each dropped component).
    """
    dropped: list[float] = []
    gaps = np.asarray(gaps, dtype=float)
    while len(ordered) >= 4:
        if gaps[0] >= gaps[-1] and gaps[0] > max_ratio * float(np.median(gaps[1:])):
            ordered, dropped, gaps = ordered[1:], dropped + [float(gaps[0])], gaps[1:]
        elif gaps[-1] > max_ratio * float(np.median(gaps[:-1])):
            ordered, dropped, gaps = ordered[:-1], dropped + [float(gaps[-1])], gaps[:-1]
        else:
            break
    return ordered, gaps, dropped


def _detours(cents: np.ndarray) -> np.ndarray:
    """float (n-2,) detour of each inner point of a chain of ``cents`` (float (n, 3), mm): the way from the point
    before it through it to the point after it, over the straight way between those two."""
    before, here, after = cents[:-2], cents[1:-1], cents[2:]
    straight = np.maximum(np.linalg.norm(after - before, axis=1), 1e-6)
    return (np.linalg.norm(here - before, axis=1) + np.linalg.norm(after - here, axis=1)) / straight


def off_the_line(ordered: list[ComponentFeatures], max_detour: float = 1.3, last_fixed: bool = False
                 ) -> tuple[int, float] | None:
    """A chain member off the line of the others, when one is: where an inner member's detour (the way from the member
    above it through it to the one below, over the straight way between them) exceeds ``max_detour``, the member
    whose removal leaves the straightest chain: the inner member with the largest detour, or, next to an end, that end
    (a component sorted past the last vertebra makes the vertebra look like the detour).

    A vertebra between two others lies on the way from one to the other, whatever the curvature (1.01 on an arc of
    120 mm radius at 30 mm spacing; at most 1.04 on the real training chains above the sacrum); a component beside the
    spine (a bowel loop, a rib head) sorted into the chain is a detour.

    Args:
        ordered: the components in chain order (``chain_order``), body centroids in LPS mm.
        max_detour: the largest detour a vertebra may have.
        last_fixed: the last member stays (S1).

    Returns:
        (position in ``ordered``, its distance in mm from the line through its two nearest members), or None.
    """
    cents = np.array([f.body_centroid_lps_mm for f in ordered], dtype=float).reshape(-1, 3)
    n = len(cents)
    detours = _detours(cents) if n >= 3 else np.zeros(0)
    if detours.size == 0 or detours.max() <= max_detour:
        return None
    worst = int(np.argmax(detours)) + 1
    candidates = [worst] + [end for end, beside in ((0, 1), (n - 1, n - 2))
                            if worst == beside and not (end == n - 1 and last_fixed)]

    def left(position: int) -> float:  # the largest detour without it
        rest = _detours(np.delete(cents, position, axis=0))
        return float(rest.max()) if rest.size else 0.0

    drop = min(candidates, key=left)  # the inner member when removing it does as well
    a, b = (drop - 1, drop + 1) if 0 < drop < n - 1 else (1, 2) if drop == 0 else (n - 2, n - 3)
    direction = (cents[b] - cents[a]) / max(float(np.linalg.norm(cents[b] - cents[a])), 1e-6)
    offset = cents[drop] - cents[a]
    return drop, float(np.linalg.norm(offset - (offset @ direction) * direction))


def level_scores(bodies: np.ndarray, level_log_probs: np.ndarray, ids: list[int]) -> np.ndarray:
    """Mean level log-probability over each component's body voxels at even (z, y, x) indices, one per
    half-resolution cell (over every cell holding a body voxel, for a component with none at even indices).

    Args:
        bodies: int32 (z, y, x) body components on the model grid.
        level_log_probs: float16 (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)) level head output at half resolution
            (natural-log probabilities).
        ids: component ids, in the order of the returned rows.

    Returns:
        float64 (len(ids), n_levels).
    """
    half = bodies[::2, ::2, ::2]
    n_levels = level_log_probs.shape[0]
    out = np.zeros((len(ids), n_levels))
    for row, vid in enumerate(ids):
        mask = half == vid
        if not mask.any():  # a thin component that the half-resolution grid misses
            zyx = np.argwhere(bodies == vid) // 2
            mask = np.zeros(half.shape, dtype=bool)
            mask[tuple(zyx.T)] = True
        out[row] = level_log_probs[:, mask].astype(np.float64).mean(axis=1)
    return out


def level_sharpness(scores: np.ndarray) -> float:
    """How decisively the level head names a chain: the mean, over its vertebrae, of the log share of each
    vertebra's top level (0 when every vertebra has one certain level, more negative the more it hesitates).

    Args:
        scores: float (n_vertebrae, n_levels) mean level log-probabilities (``level_scores``), n_vertebrae >= 1.
    """
    shares = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    return float(shares.max(axis=1).mean())
