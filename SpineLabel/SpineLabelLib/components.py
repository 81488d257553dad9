"""From the network's tissue map to one connected component per vertebra.

Vertebral bodies are separated by intervertebral discs, so the connected components of the body mask are the
vertebrae. Specks are dropped; a component far taller than its neighbours (two bodies bridged by a thin or
degenerated disc) is split by eroding it until it falls apart and flooding the pieces back (watershed). Posterior
elements are then attached to the body they are connected to.

All arrays are (z, y, x) on the model grid; ``spacing_mm`` is (z, y, x) voxel size in mm.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from .vertebrae import BODY, POSTERIOR

__all__ = ["body_components", "split_merged", "attach_posterior", "vertebra_components"]

log = logging.getLogger(__name__)

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def body_components(tissue: np.ndarray, spacing_mm: tuple[float, float, float], min_volume_ml: float = 0.25) -> np.ndarray:
    """Label connected vertebral-body regions, dropping specks.

    Args:
        tissue: uint8 (z, y, x) tissue classes.
        spacing_mm: voxel size (z, y, x) in mm.
        min_volume_ml: smaller components are dropped; so are components under 15 % of the median volume.

    Returns:
        int32 (z, y, x), 0 background, 1..n components numbered by decreasing z (cranial first).
    """
    labels, n = ndimage.label(tissue == BODY, structure=_SIX_CONNECTED)
    if n == 0:
        return labels.astype(np.int32)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * voxel_ml
    keep = sizes >= min_volume_ml
    if keep.any():
        keep &= sizes >= 0.15 * float(np.median(sizes[keep]))
    return _renumber_cranial_first(labels, np.flatnonzero(keep) + 1)


def _renumber_cranial_first(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if ids.size == 0:
        return np.zeros(labels.shape, dtype=np.int32)
    z_mean = ndimage.mean(np.indices(labels.shape)[0], labels, ids) if labels.size < 2e7 else _z_means(labels, ids)
    order = ids[np.argsort(-np.asarray(z_mean))]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1)
    return lut[labels]


def _z_means(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    counts = np.zeros(int(labels.max()) + 1)
    sums = np.zeros_like(counts)
    for z in range(labels.shape[0]):
        c = np.bincount(labels[z].ravel(), minlength=counts.size)
        counts += c
        sums += c * z
    return sums[ids] / np.maximum(counts[ids], 1)


def split_merged(labels: np.ndarray, spacing_mm: tuple[float, float, float], ratio: float = 1.7, max_erosions: int = 4) -> np.ndarray:
    """Split components whose cranio-caudal height exceeds ``ratio`` times the median height of all components.

    Args:
        labels: int32 (z, y, x) body components (``body_components``).
        spacing_mm: voxel size (z, y, x) in mm.

    Returns:
        int32 (z, y, x) components, renumbered cranial first.
    """
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if ids.size < 2:
        return labels
    boxes = ndimage.find_objects(labels)
    heights = np.array([(boxes[i - 1][0].stop - boxes[i - 1][0].start) for i in ids], dtype=float) * spacing_mm[0]
    median = float(np.median(heights))
    out = labels.copy()
    next_id = int(ids.max()) + 1
    for vid, height in zip(ids, heights):
        if height <= ratio * median:
            continue
        box = boxes[vid - 1]
        mask = labels[box] == vid
        eroded = mask
        for _ in range(max_erosions):
            eroded = ndimage.binary_erosion(eroded, structure=_SIX_CONNECTED)
            markers, n = ndimage.label(eroded, structure=_SIX_CONNECTED)
            if n >= 2:
                sizes = np.bincount(markers.ravel())[1:]
                big = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
                if big.size >= 2:
                    markers = np.where(np.isin(markers, big), markers, 0)
                    distance = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
                    pieces = watershed(-distance, markers, mask=mask)
                    region = out[box]
                    for piece in np.unique(pieces[pieces > 0])[1:]:
                        region[pieces == piece] = next_id
                        next_id += 1
                    log.info("split a merged body of height %.0f mm into %d", height, big.size)
                    break
            if not eroded.any():
                break
    return _renumber_cranial_first(out, np.unique(out[out > 0]))


def attach_posterior(bodies: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Give posterior-element voxels the id of the body they are connected to (geodesic flooding).

    Args:
        bodies: int32 (z, y, x) body components.
        tissue: uint8 (z, y, x) tissue classes.

    Returns:
        int32 (z, y, x) whole-vertebra components with the ids of ``bodies``; posterior elements connected to no
        body are left out.
    """
    mask = (bodies > 0) | (tissue == POSTERIOR)
    if not bodies.any():
        return bodies
    zs, ys, xs = np.nonzero(mask)
    lo = np.array([zs.min(), ys.min(), xs.min()])
    hi = np.array([zs.max(), ys.max(), xs.max()]) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = np.zeros_like(bodies)
    out[box] = watershed(np.zeros(mask[box].shape, dtype=np.uint8), bodies[box], mask=mask[box], connectivity=1)
    return out


def vertebra_components(tissue: np.ndarray, spacing_mm: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Body components and whole-vertebra components from a tissue map.

    Returns:
        (bodies, vertebrae), both int32 (z, y, x) with the same ids, cranial first.
    """
    bodies = split_merged(body_components(tissue, spacing_mm), spacing_mm)
    return bodies, attach_posterior(bodies, tissue)
