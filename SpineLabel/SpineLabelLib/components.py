"""From the network's tissue map to one connected component per vertebra.

Vertebral bodies are separated by intervertebral discs, so the connected components of the body mask are the
vertebrae. Specks are dropped; a component taller than a vertebral body (bodies bridged by a thin, collapsed or
poorly seen disc) is cut between its high-probability cores, where its body-probability profile dips, or between the
parts that the network's level head gives different levels. Body components off the vertebral column
(posterior-element or pelvis fragments) become posterior elements. Posterior elements are then attached to the body
they are connected to, except those that the level head calls S1 (sacrum): they wait until the sequence model has
named the vertebrae, and then join the one named S1 (``join_sacrum``). Once the chain is known, each vertebra keeps
the posterior elements within its band along the spine (``confine_posterior``), and a posterior-element voxel goes to
the neighbour whose level the level head clearly gives it (``posterior_by_level``). On CT, dense bone (Hounsfield
units of cancellous or cortical bone) that the network gives some vertebra probability joins the posterior elements
first: the thin posterior elements of real CT are often under-called at the network's 2 mm grid, while their bone
density is unmistakable.

All arrays are (z, y, x) on the model grid; ``spacing_mm`` is (z, y, x) voxel size in mm.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from .result import nonzero_box
from .vertebrae import BODY, POSTERIOR, level_index

__all__ = ["DENSE_BONE_HU", "TWENTY_SIX_CONNECTED", "present_ids", "cut_by_field_of_view", "body_components",
           "split_merged", "ball", "dense_bone_as_posterior", "attach_posterior", "sacral_posterior",
           "confine_posterior", "posterior_by_level", "arch_above_view", "atlas_beside_dens", "cut_across",
           "join_sacrum", "vertebra_components"]

log = logging.getLogger(__name__)

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)
TWENTY_SIX_CONNECTED = np.ones((3, 3, 3), dtype=bool)
DENSE_BONE_HU = 200.0  # CT: the density from which a voxel next to the network's vertebrae is taken for bone
S1_LEVEL = level_index("S1")  # channel of the level head


def present_ids(labels: np.ndarray) -> np.ndarray:
    """Sorted ids above 0, int64 (n,), present in a non-negative integer label array of any shape. One pass without a
    copy (``ndimage.find_objects``), where ``np.unique`` sorts every voxel and ``np.bincount`` copies them to int64."""
    return np.array([vid for vid, box in enumerate(ndimage.find_objects(labels), start=1) if box is not None],
                    dtype=np.int64)


def body_components(tissue: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Label connected vertebral-body regions, dropping specks (``drop_small``).

    Args:
        tissue: uint8 (z, y, x) tissue classes.
        spacing_mm: voxel size (z, y, x) in mm.

    Returns:
        int32 (z, y, x), 0 background, 1..n components numbered by decreasing z (cranial first).
    """
    labels, _ = ndimage.label(tissue == BODY, structure=_SIX_CONNECTED)
    return drop_small(labels, spacing_mm)


def drop_small(labels: np.ndarray, spacing_mm: tuple[float, float, float], min_volume_ml: float = 0.25,
               fraction: float = 0.15) -> np.ndarray:
    """Drop components under ``min_volume_ml`` or under ``fraction`` of the median component volume. A component
    that reaches the first or last z slice is a body cut by the field of view, small because of the cut, and only
    has to reach ``min_volume_ml``.

    Args:
        labels: int (z, y, x) components.
        spacing_mm: voxel size (z, y, x) in mm.

    Returns:
        int32 (z, y, x) remaining components, renumbered cranial first.
    """
    sizes = count_ids(labels)[1:] * (float(np.prod(spacing_mm)) / 1000.0)
    keep = sizes >= min_volume_ml
    if keep.any():
        keep &= (sizes >= fraction * float(np.median(sizes[keep]))) | cut_by_field_of_view(labels)[1:sizes.size + 1]
    return _renumber_cranial_first(labels, np.flatnonzero(keep) + 1)


_COUNT_SLAB_VOXELS = 1 << 22  # about 4 million voxels: np.bincount's int64 copy of a slab is 32 MB


def count_ids(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount(labels.ravel(), minlength=minlength)`` (int, any shape, no negative values), counted a slab
    along the first axis at a time: np.bincount casts its input to int64, a copy of 8 bytes per voxel (0.3 GB of an
    int32 model grid of the 1800 mm phantom) where a slab's is 32 MB."""
    step = max(1, _COUNT_SLAB_VOXELS // max(1, int(np.prod(labels.shape[1:]))))
    counts = np.zeros(minlength, dtype=np.intp)
    for z in range(0, labels.shape[0], step):
        part = np.bincount(labels[z : z + step].ravel(), minlength=counts.size)
        if part.size > counts.size:
            counts = np.concatenate([counts, np.zeros(part.size - counts.size, dtype=counts.dtype)])
        counts += part
    return counts


def cut_by_field_of_view(labels: np.ndarray) -> np.ndarray:
    """bool (max id + 1,): which ids of ``labels`` (int, z, y, x) reach its first or last z slice."""
    cut = np.zeros(int(labels.max(initial=0)) + 1, dtype=bool)
    cut[np.unique(labels[[0, -1]])] = True
    cut[0] = False
    return cut


def _centroids_and_sizes(labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel centroid (z, y, x) and voxel count of each id of ``ids`` (int (n,), all present) in ``labels`` (int
    (z, y, x)), computed inside its bounding box (one pass over the volume, not one per component).

    Returns:
        (centroids, sizes): float64 (n, 3) continuous voxel indices (z, y, x), not mm; float64 (n,) voxel counts.
    """
    boxes = ndimage.find_objects(labels)
    centroids = np.zeros((ids.size, 3))
    sizes = np.zeros(ids.size)
    for row, vid in enumerate(ids):
        box = boxes[vid - 1]
        zyx = np.argwhere(labels[box] == vid)
        centroids[row] = zyx.mean(axis=0) + [s.start for s in box]
        sizes[row] = len(zyx)
    return centroids, sizes


def _renumber_cranial_first(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int32 (z, y, x): the components ``ids`` (int (n,)) of ``labels`` (int (z, y, x)) renumbered 1..n by decreasing
    mean z index (cranial first); every other voxel 0."""
    if ids.size == 0:
        return np.zeros(labels.shape, dtype=np.int32)
    z_mean = _centroids_and_sizes(labels, ids)[0][:, 0]
    order = ids[np.argsort(-z_mean)]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1)
    return lut[labels]


def split_merged(
    labels: np.ndarray,
    body_probability: np.ndarray,
    spacing_mm: tuple[float, float, float],
    max_height_mm: float = 40.0,
    ratio: float = 1.7,
    min_piece_mm: float = 10.0,
    depth: float = 0.3,
    core_levels: tuple[float, ...] = (0.9, 0.95, 0.98),
    min_core: float = 0.1,
    level_log_probs: np.ndarray | None = None,
    min_level_probability: float = 0.5,
    min_level_core_ml: float = 0.4,
    min_edge_piece_mm: float = 4.0,
) -> np.ndarray:
    """Cut components that span more than one vertebral body.

    A component is a candidate when it is taller (along z) than ``max_height_mm`` or than ``ratio`` times the
    median height of the components. Two cuts are tried, in this order, and a third on what is still too tall; a
    fourth looks at every component that reaches the edge of the field of view:

    1. Cores: the voxels above a body probability of ``core_levels`` (lowest level first), eroded by one voxel.
       When at least two cores hold ``min_core`` times the median component volume each, the component is split
       between them by a watershed of the body probability, which follows a disc however tilted (L5/S1).
    2. Valleys: the profile of summed body probability per z slice; a valley at least ``depth`` (relative) below
       the highest point within ``min_piece_mm`` on both sides becomes a cut.
    3. Levels (with ``level_log_probs``): a run of bodies whose discs the network does not see at all (the
       thoracic and cervical column of a CT, say) still looks like different levels to the level head. The
       voxels whose most probable level has a probability of at least ``min_level_probability`` form one core per
       level (its largest connected part, eroded by one voxel, of ``min_level_core_ml`` at least: a fixed size,
       since the median component may itself be a merged column); two or more such cores split the piece by
       watershed, as in 1. Pieces that lie side by side rather than one above the other are one body whose level
       the head is unsure of, and are joined again. Which level a piece is, is left to the sequence model: only
       the number of bodies and the cuts between them come from here.

    4. Edges: a component that reaches the first or last z slice, whatever its height, is also cut at a deep
       valley (as in 2) that may lie as close as ``min_edge_piece_mm`` to that slice. Next to the edge of the
       field of view the network often misses a disc, and the few millimetres of the next body still in view join
       a whole body without making it tall enough for the cuts above.

    The sacrum and single tall bodies, with one core, no deep valley and one level, stay whole; a sacrum cut into
    its segments is merged again by the sequence model.

    Args:
        labels: int32 (z, y, x) body components (``body_components``).
        body_probability: float (z, y, x) vertebral-body probability from the network.
        spacing_mm: voxel size (z, y, x) in mm.
        level_log_probs: float16 (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)) level head output at half resolution
            (natural-log probabilities, ``inference.Prediction``), or None to cut by cores and valleys only.

    Returns:
        int32 (z, y, x) components, renumbered cranial first.
    """
    counts = count_ids(labels)
    ids = np.flatnonzero(counts[1:]) + 1
    if ids.size == 0:
        return labels
    boxes = ndimage.find_objects(labels)
    heights = np.array([boxes[i - 1][0].stop - boxes[i - 1][0].start for i in ids], dtype=float) * spacing_mm[0]
    whole = ~cut_by_field_of_view(labels)[ids]  # bodies cut by the field of view do not say how tall bodies are
    limit = min(max_height_mm, ratio * float(np.median(heights[whole]))) if whole.sum() >= 3 else max_height_mm
    voxels = counts[ids]
    core_voxels = max(4.0, min_core * float(np.median(voxels[whole] if whole.any() else voxels)))
    level_core_voxels = min_level_core_ml * 1000.0 / float(np.prod(spacing_mm))
    window = max(1, int(round(min_piece_mm / spacing_mm[0])))
    edge_window = max(1, int(round(min_edge_piece_mm / spacing_mm[0])))
    out = labels.copy()
    next_id = int(ids.max()) + 1
    for vid, height in zip(ids, heights):
        box = boxes[vid - 1]
        cut = (box[0].start == 0, box[0].stop == labels.shape[0])  # (first, last) z slice reached
        if height <= limit and not any(cut):
            continue
        mask = labels[box] == vid
        probability = body_probability[box].astype(np.float32)
        pieces = None
        if height > limit:
            pieces = _split_at_cores(mask, probability, core_levels, core_voxels)
            if pieces is None:
                pieces = _split_at_valleys(mask, probability, window, depth)
        if pieces is None:
            pieces = mask.astype(np.int32)
        if level_log_probs is not None:  # only pieces taller than the limit
            pieces = _split_tall_pieces_at_levels(pieces, probability, level_log_probs, box, limit, spacing_mm[0],
                                                  min_level_probability, level_core_voxels)
        if any(cut):
            pieces = _split_at_edge_valleys(pieces, probability, cut, window, edge_window, depth)
        if pieces.max() < 2:
            continue
        next_id = _new_ids_for_pieces(out[box], pieces, next_id)
        log.info("split a body component %.0f mm tall into %d", height, int(pieces.max()))
    return _renumber_cranial_first(out, present_ids(out))


def _full_resolution(level_log_probs: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The half-resolution level head output under ``box`` (full-resolution slices), repeated to full resolution:
    (n_levels, box z, box y, box x), of the dtype of ``level_log_probs`` (float16 log-probabilities from the network;
    bool from ``sacral_posterior``)."""
    half = level_log_probs[(slice(None),) + tuple(slice(s.start // 2, (s.stop + 1) // 2) for s in box)]
    for axis in (1, 2, 3):
        half = np.repeat(half, 2, axis=axis)
    return half[(slice(None),) + tuple(slice(s.start % 2, s.start % 2 + s.stop - s.start) for s in box)]


def _split_each_piece(pieces: np.ndarray, split) -> np.ndarray:
    """``pieces`` (int (z, y, x) of a component's box, 1..n, 0 outside) with each piece cut by ``split(mask, zs)``:
    the piece's bool (z, y, x) mask and the int (m,) z indices it spans, to int (z, y, x) pieces 1..m (0 outside the
    mask), or None to leave it whole. Returns a new array of the dtype of ``pieces``; new pieces get ids n+1 on."""
    out = pieces.copy()
    next_id = int(pieces.max()) + 1
    for k in range(1, int(pieces.max()) + 1):
        mask = pieces == k
        zs = np.flatnonzero(mask.any(axis=(1, 2)))
        parts = split(mask, zs) if zs.size else None
        if parts is not None:
            next_id = _new_ids_for_pieces(out, parts, next_id)
    return out


def _split_tall_pieces_at_levels(pieces: np.ndarray, probability: np.ndarray, level_log_probs: np.ndarray,
                                 box: tuple[slice, ...], limit_mm: float, spacing_z_mm: float, min_probability: float,
                                 min_voxels: float) -> np.ndarray:
    """``pieces`` (int32, or int64 from ``_split_at_valleys``, (z, y, x) of the ``box`` of the model grid; 1..n, 0
    outside) with each piece taller than ``limit_mm`` split by ``_split_at_levels``; a new array of the dtype of
    ``pieces``. ``probability`` is float32 (z, y, x) body probability (0-1) in the box; ``level_log_probs`` is the
    whole half-resolution level head output (float16 natural-log probabilities), brought to full resolution under
    ``box`` only when a piece needs it."""
    levels_in_box = None

    def split(mask: np.ndarray, zs: np.ndarray) -> np.ndarray | None:
        """``_split_at_levels`` of the piece ``mask`` (bool (z, y, x) of the box) whose z indices in the box are
        ``zs`` (sorted), None when it is no taller than ``limit_mm``."""
        nonlocal levels_in_box
        if (zs[-1] - zs[0] + 1) * spacing_z_mm <= limit_mm:
            return None
        if levels_in_box is None:
            levels_in_box = _full_resolution(level_log_probs, box)
        return _split_at_levels(mask, probability, levels_in_box, min_probability, min_voxels)

    return _split_each_piece(pieces, split)


def _split_at_edge_valleys(pieces: np.ndarray, probability: np.ndarray, cut: tuple[bool, bool], window: int,
                           edge_window: int, depth: float) -> np.ndarray:
    """``pieces`` (int32, or int64 from ``_split_at_valleys``, (z, y, x) of a component's box; 1..n, 0 outside) with
    each piece that reaches a ``cut`` end of the box (first, last z slice) cut by ``_split_at_valleys``, which may
    leave as few as ``edge_window`` slices on that side; a new array of the dtype of ``pieces``. ``probability`` is
    float32 (z, y, x) body probability (0-1) in the box."""
    last = pieces.shape[0] - 1

    def split(mask: np.ndarray, zs: np.ndarray) -> np.ndarray | None:
        """``_split_at_valleys`` of the piece ``mask`` (bool (z, y, x) of the box) whose z indices in the box are
        ``zs`` (sorted), None when it reaches no ``cut`` end."""
        ends = (cut[0] and zs[0] == 0, cut[1] and zs[-1] == last)
        if not any(ends):
            return None
        return _split_at_valleys(mask, probability, window, depth,
                                 tuple(edge_window if end else window for end in ends))

    return _split_each_piece(pieces, split)


def _new_ids_for_pieces(labels: np.ndarray, pieces: np.ndarray, next_id: int) -> int:
    """Give pieces 2..n of ``pieces`` (int, same shape as ``labels``) ids from ``next_id`` on in ``labels``, int32
    (z, y, x) of a component's box (in ``_split_each_piece`` a copy of int32 or int64 pieces), modified in place;
    piece 1 keeps the id it has. Returns the next free id."""
    for k in range(2, int(pieces.max()) + 1):
        labels[pieces == k] = next_id
        next_id += 1
    return next_id


def _split_at_levels(mask: np.ndarray, probability: np.ndarray, level_log_probs: np.ndarray, min_probability: float,
                     min_voxels: float) -> np.ndarray | None:
    """Pieces 1..n (0 outside ``mask``) grown by watershed from cores of different most-probable levels, or None.

    Args:
        mask: bool (z, y, x) the piece, in its component's box.
        probability: float32 (z, y, x) body probability in the same box.
        level_log_probs: float16 (n_levels, z, y, x) level log-probabilities (natural log) at FULL resolution inside
            the same box (``_full_resolution``), not the half-resolution whole-volume array of ``split_merged``.
        min_probability: least probability (0-1) of a voxel's most probable level for it to join a core.
        min_voxels: least core size, in voxels.

    Returns:
        int32 (z, y, x) pieces, after ``_join_side_by_side``; None for fewer than two cores or pieces.
    """
    best = np.argmax(level_log_probs, axis=0)
    sure = mask & (np.max(level_log_probs, axis=0).astype(np.float32) >= np.log(min_probability))
    markers = np.zeros(mask.shape, dtype=np.int32)
    for level in np.unique(best[sure]):
        parts, n = ndimage.label(ndimage.binary_erosion(sure & (best == level)))
        if n == 0:
            continue
        sizes = np.bincount(parts.ravel())[1:]
        if sizes.max() >= min_voxels:
            markers[parts == int(np.argmax(sizes)) + 1] = int(markers.max()) + 1
    if markers.max() < 2:
        return None
    return _join_side_by_side(watershed(-probability, markers, mask=mask))


def _join_side_by_side(pieces: np.ndarray) -> np.ndarray | None:
    """``pieces`` (int32 (z, y, x) of a box, 1..n, 0 outside) as int32, renumbered by median z, with the pieces that
    lie side by side rather than one above the other joined, or None when that leaves one piece. Two pieces lie side
    by side when the z ranges of their middle 80 % of voxels overlap by more than half the shorter range: bodies are
    stacked along z, however tilted, so such pieces are one body that the level head hesitates over (two levels each
    taking a part of it)."""
    n = int(pieces.max())
    z = np.nonzero(pieces)[0]
    ids = pieces[pieces > 0]
    spans = np.array([np.percentile(z[ids == k], (10, 50, 90)) for k in range(1, n + 1)])
    order = np.argsort(spans[:, 1])  # by median z
    low, high = spans[order, 0], spans[order, 2]
    overlap = np.minimum(high[:-1], high[1:]) - np.maximum(low[:-1], low[1:])
    length = high - low
    beside = overlap > 0.5 * np.minimum(length[:-1], length[1:])
    if beside.all():
        return None
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[order + 1] = np.cumsum(np.concatenate([[True], ~beside]))
    return lut[pieces]


def _split_at_cores(mask: np.ndarray, probability: np.ndarray, levels: tuple[float, ...],
                    min_voxels: float) -> np.ndarray | None:
    """Pieces 1..n (0 outside ``mask``) grown by watershed from separate high-probability cores, or None.

    Args:
        mask: bool (z, y, x) the component, in its box.
        probability: float32 (z, y, x) body probability in the same box.
        levels: body-probability thresholds (0-1) to try, lowest first.
        min_voxels: least size of a core, in voxels (after erosion).

    Returns:
        int32 (z, y, x) pieces, or None when no threshold gives two cores of that size.
    """
    for level in levels:
        cores, n = ndimage.label(ndimage.binary_erosion((probability > level) & mask))
        sizes = np.bincount(cores.ravel(), minlength=n + 1)[1:]
        big = np.flatnonzero(sizes >= min_voxels) + 1
        if big.size >= 2:
            marker_of_core = np.zeros(n + 1, dtype=np.int32)
            marker_of_core[big] = np.arange(1, big.size + 1)
            return watershed(-probability, marker_of_core[cores], mask=mask)
    return None


def _split_at_valleys(mask: np.ndarray, probability: np.ndarray, window: int, depth: float,
                      ends: tuple[int, int] | None = None) -> np.ndarray | None:
    """Pieces 1..n (0 outside ``mask``) cut at the deep valleys of the z profile of body probability, or None. A cut
    leaves at least ``window`` slices of ``mask`` below and above it, or ``ends`` (below, above) slices.

    Args:
        mask: bool (z, y, x) the component (or piece), in its component's box.
        probability: float32 (z, y, x) body probability in the same box.
        window, ends: numbers of z slices (voxels, not mm).
        depth: least relative depth (0-1) of a valley below its shoulders.

    Returns:
        int64 (z, y, x) pieces numbered along z (increasing z index), or None when there is no cut.
    """
    profile = ndimage.gaussian_filter1d((probability * mask).sum(axis=(1, 2)).astype(float), 1.0)
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    below, above = ends or (window, window)
    cuts: list[int] = []
    for z in range(max(zs[0] + below, 1), min(zs[-1] + 1 - above, profile.size - 1)):
        if profile[z] > min(profile[z - 1], profile[z + 1]) or (cuts and z - cuts[-1] < window):
            continue
        shoulder = min(profile[max(z - window, 0) : z].max(), profile[z + 1 : z + 1 + window].max())
        if profile[z] < (1.0 - depth) * shoulder:
            cuts.append(z)
    if not cuts:
        return None
    piece = np.searchsorted(np.asarray(cuts), np.arange(profile.size), side="right") + 1
    return np.where(mask, piece[:, None, None], 0)


NEARLY_AS_FAR = 0.9  # ``off_axis_components``: components this share of the furthest one's distance off or more


def off_axis_components(bodies: np.ndarray, spacing_mm: tuple[float, float, float], tolerance_mm: float = 15.0
                        ) -> np.ndarray:
    """Ids of body components that lie off the vertebral column (posterior-element, rib, vessel or pelvis fragments).

    The column is drawn through the larger half of the components (by volume): the vertebral bodies are the large
    ones, so fragments, however many, do not shape it; where fewer than two large ones are left besides the
    component measured (a scan of three or four components), through all the others. A component is measured against
    the column at its own height (``_off_column``: a curve through the column components above and below it, or,
    level with an end of the column, the column going on along that end's slope); components beyond the ends are
    left to the chain (``features.drop_detached_ends``), since where the column goes beyond its last body is not
    known. Two column components that lie further apart across than along z are no stretch of a column (one of them
    is off it, as a bowel loop level with a body is), so nothing is measured between them. While a component lies
    more than ``tolerance_mm`` from the column, the smallest of those beyond it and within ``NEARLY_AS_FAR`` of the
    furthest off is dropped (two components level with each other measure each other off the column alike; the body
    is the larger), then the others are measured again. Antero-posterior offsets count half: the sagittal curve
    bends sharply at the lumbosacral junction, while the column hardly leaves its coronal line, and the fragments it
    must catch lie 35 mm or more behind the bodies (spinous processes) or beside them.

    Args:
        bodies: int32 (z, y, x) body components.
        spacing_mm: voxel size (z, y, x) in mm.

    Returns:
        int (k,) component ids (int64, as ``present_ids`` gives them; empty for fewer than three components).
    """
    ids = present_ids(bodies)
    if ids.size < 3:
        return np.zeros(0, dtype=int)
    centroids, volumes = _centroids_and_sizes(bodies, ids)
    centroids = centroids * np.asarray(spacing_mm)
    large = volumes >= np.median(volumes)
    off = np.zeros(ids.size, dtype=bool)
    while True:
        distance = np.where(off, -1.0, [_off_column(centroids, large, ~off, i) for i in range(ids.size)])
        if distance.max() <= tolerance_mm:
            return ids[off]
        far = np.flatnonzero((distance >= NEARLY_AS_FAR * distance.max()) & (distance > tolerance_mm))
        off[far[np.argmin(volumes[far])]] = True


def _off_column(centroids: np.ndarray, large: np.ndarray, kept: np.ndarray, i: int) -> float:
    """Distance (mm; antero-posterior offsets halved) of centroid ``i`` from the column through the ``large`` and
    ``kept`` centroids (bool), other than itself, or through all the ``kept`` others where fewer than two of them are
    large; 0 when it lies beyond the column's ends, or between two centroids that lean further from each other than
    they rise (no column: one of them is off it). Centroids are float64 (n, 3) z, y, x mm.

    The column is a curve through its centroids (``_column_at``), so that a body on a scoliotic curve between two
    column bodies a few levels apart is not measured off the straight line between them; level with an end of the
    column it goes on along that end's slope."""
    candidates = kept & (np.arange(len(centroids)) != i)
    others = np.flatnonzero(large & candidates)
    if others.size < 2:
        others = np.flatnonzero(candidates)
    if others.size < 2:
        return 0.0
    points = centroids[others[np.argsort(centroids[others, 0])]]
    z = centroids[i, 0]
    k = int(np.searchsorted(points[:, 0], z))
    if 0 < k < len(points):
        lo, hi = points[k - 1], points[k]
        if np.hypot(0.5 * (hi[1] - lo[1]), hi[2] - lo[2]) >= hi[0] - lo[0]:
            return 0.0
    elif abs(z - points[min(k, len(points) - 1), 0]) > 0.5 * float(np.median(np.diff(points[:, 0]))):
        return 0.0  # beyond the column's end
    reference = _column_at(points, z)
    return float(np.hypot(0.5 * (centroids[i, 1] - reference[0]), centroids[i, 2] - reference[1]))


def _column_at(points: np.ndarray, z: float) -> np.ndarray:
    """(y, x) mm of the column through ``points`` (float64 (n, 3) z, y, x mm, n >= 2, z ascending) at height ``z``: a
    cubic Hermite curve whose slope (dy/dz, dx/dz) at each point is that of the line through its neighbours (of the
    line to its one neighbour at the ends), straight beyond the ends. A slope that leans further than it rises (a
    column point off the column, points level with each other) is taken as the straight line between the points."""
    zs, yx = points[:, 0], points[:, 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = np.gradient(yx, zs, axis=0, edge_order=1) if len(points) > 2 else np.repeat(
            (yx[1:] - yx[:1]) / (zs[1] - zs[0]), 2, axis=0)
    k = int(np.clip(np.searchsorted(zs, z), 1, len(points) - 1))
    z0, z1, h = zs[k - 1], zs[k], zs[k] - zs[k - 1]
    m0, m1 = slopes[k - 1], slopes[k]
    steep = not np.isfinite([m0, m1]).all() or max(np.hypot(0.5 * m[0], m[1]) for m in (m0, m1)) >= 1.0
    if h <= 0 or steep:
        chord = (yx[k] - yx[k - 1]) / h if h > 0 else np.zeros(2)
        return yx[k - 1] + (z - z0) * chord
    if z < z0:
        return yx[k - 1] + (z - z0) * m0
    if z > z1:
        return yx[k] + (z - z1) * m1
    t = (z - z0) / h
    return ((2 * t**3 - 3 * t**2 + 1) * yx[k - 1] + (t**3 - 2 * t**2 + t) * h * m0
            + (-2 * t**3 + 3 * t**2) * yx[k] + (t**3 - t**2) * h * m1)


def ball(radius_mm: float, spacing_mm) -> np.ndarray:
    """Boolean structuring element: the voxel offsets within ``radius_mm`` of the centre on a grid of ``spacing_mm``
    (per array axis, mm); odd along every axis, its centre at ``shape // 2``. An offset at the radius but for the
    rounding of a header's spacing (1.0000001 mm) is inside."""
    radius = np.floor(radius_mm / np.asarray(spacing_mm, float) + 1e-5).astype(int)
    offsets = np.mgrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((o * s) ** 2 for o, s in zip(offsets, spacing_mm)) <= radius_mm**2 * (1 + 1e-5)


def dense_bone_as_posterior(tissue: np.ndarray, bone_probability: np.ndarray, hu: np.ndarray,
                            spacing_mm: tuple[float, float, float], min_hu: float = DENSE_BONE_HU,
                            min_probability: float = 0.1, max_distance_mm: float = 4.0
                            ) -> tuple[np.ndarray, np.ndarray]:
    """CT only: background voxels of dense bone close to the network's vertebrae, which the network gives some
    vertebra probability, become posterior elements with a vertebra probability of 1 (so that the final mask keeps
    them).

    Args:
        tissue: uint8 (z, y, x) tissue classes.
        bone_probability: float (z, y, x) vertebra probability (body or posterior elements).
        hu: float (z, y, x) CT intensities in Hounsfield units (values clipped above ``min_hu`` are fine).
        spacing_mm: voxel size (z, y, x) in mm.
        min_hu: lowest density counted as bone.
        min_probability: lowest vertebra probability at which a dense voxel may be vertebra.
        max_distance_mm: how far from the network's own vertebra and disc voxels (not background, or vertebra
            probability at least 0.5) a dense voxel may lie. Ribs and the pelvis touch the vertebrae; this keeps them
            from being flooded along their length.

    Returns:
        (tissue, bone_probability), new arrays of the same dtypes. ``attach_posterior`` later keeps only what is
        connected to a vertebral body.
    """
    spine = (tissue != 0) | (bone_probability >= 0.5)
    dense = ~spine & (hu >= min_hu) & (bone_probability >= min_probability)
    if dense.any():  # grow the spine by a ball of that radius, in the box around the candidates only
        structure = ball(max_distance_mm, spacing_mm)
        radius = np.array(structure.shape) // 2
        box = tuple(slice(max(int(v.min()) - r, 0), int(v.max()) + r + 1) for v, r in zip(np.nonzero(dense), radius))
        dense[box] &= ndimage.binary_dilation(spine[box], structure=structure)
    return (np.where(dense, POSTERIOR, tissue).astype(tissue.dtype),
            np.where(dense, 1, bone_probability).astype(bone_probability.dtype))


def attach_posterior(bodies: np.ndarray, tissue: np.ndarray, held_back: np.ndarray | None = None) -> np.ndarray:
    """Give posterior-element voxels the id of the body they are connected to (geodesic flooding).

    Args:
        bodies: int32 (z, y, x) body components.
        tissue: uint8 (z, y, x) tissue classes.
        held_back: bool (z, y, x) posterior-element voxels to leave out (``sacral_posterior``), or None.

    Returns:
        int32 (z, y, x) whole-vertebra components with the ids of ``bodies``; posterior elements connected to no
        body are left out.
    """
    mask = (bodies > 0) | (tissue == POSTERIOR)
    if held_back is not None:
        mask &= ~held_back
    if not bodies.any():
        return bodies.copy()
    return _flood(bodies, mask)


def _flood(markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """int32 (z, y, x): every voxel of ``mask`` (bool) connected to a component of ``markers`` (int32, 0 none) within
    ``mask`` takes the id of the geodesically closest one, in the box around ``mask``; 0 elsewhere."""
    zs, ys, xs = np.nonzero(mask)
    box = tuple(slice(int(v.min()), int(v.max()) + 1) for v in (zs, ys, xs))
    out = np.zeros_like(markers)
    out[box] = watershed(np.zeros(mask[box].shape, dtype=np.uint8), markers[box], mask=mask[box], connectivity=1)
    return out


def sacral_posterior(bodies: np.ndarray, tissue: np.ndarray, level_log_probs: np.ndarray) -> np.ndarray:
    """Posterior-element voxels whose most probable level is S1: the sacrum, whose alae and mass the network often
    calls posterior elements, and which touches L5 at its facet joints. Flooded with the rest, they make L5 twice its
    size. ``join_sacrum`` gives them to the vertebra that the sequence model names S1, or, when it names none (the
    level head's S1 is then not trusted), to the vertebra they touch.

    Args:
        bodies: int32 (z, y, x) body components.
        tissue: uint8 (z, y, x) tissue classes.
        level_log_probs: float16 (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)) level head output at half resolution
            (natural-log probabilities).

    Returns:
        bool (z, y, x).
    """
    s1 = level_log_probs[S1_LEVEL] >= level_log_probs.max(axis=0)
    everywhere = tuple(slice(0, n) for n in bodies.shape)
    return _full_resolution(s1[None], everywhere)[0] & (tissue == POSTERIOR) & (bodies == 0)


def _chain_posterior(vertebrae: np.ndarray, bodies: np.ndarray, chain: list[int]
                     ) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
    """The posterior-element voxels of the vertebrae of ``chain`` (ids, cranial first): (position, voxels, owner) with
    position int64 (max id + 1,) the chain position of each id (-1 off the chain), voxels the (z, y, x) index arrays
    (int64) of those voxels in ``vertebrae`` and ``bodies`` (int32 (z, y, x), same ids), owner int64 their vertebra's
    chain position."""
    position = np.full(max(int(vertebrae.max()), *chain) + 1, -1)
    position[chain] = np.arange(len(chain))
    voxels = np.nonzero((vertebrae > 0) & (bodies == 0))
    owner = position[vertebrae[voxels]]
    return position, tuple(v[owner >= 0] for v in voxels), owner[owner >= 0]


def _undo_detached_moves(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Undo the moves from ``before`` to ``after`` (int32 (z, y, x) components) that leave a piece apart from its new
    vertebra: each 26-connected group of voxels moved to the same vertebra goes back where it was unless it touches
    (26-neighbours) a voxel that vertebra kept. The steps that move posterior-element voxels one at a time (by band,
    by level) otherwise leave a patch of one vertebra's label on its neighbour's arch, apart from its own vertebra;
    the moves that reach over at the facet joints touch the receiving arch and stay. Voxels moved to none (0) stay
    so. ``after`` may be modified in place; returns it."""
    moved = (after != before) & (after > 0)
    if not moved.any():
        return after
    boxes = ndimage.find_objects(np.where(moved, after, 0))  # around the moved voxels of each vertebra
    undone = 0
    for vid in np.unique(after[moved]):
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[vid - 1])  # with all their neighbours
        mine = after[box] == vid
        went = mine & moved[box]
        groups, _ = ndimage.label(went, structure=TWENTY_SIX_CONNECTED)
        touching = np.unique(groups[ndimage.binary_dilation(mine & ~went, structure=TWENTY_SIX_CONNECTED) & went])
        apart = went & ~np.isin(groups, touching)
        if apart.any():
            after[box][apart] = before[box][apart]
            undone += int(apart.sum())
    if undone:
        log.info("%d moved posterior-element voxels given back: they lay apart from the vertebra they went to", undone)
    return after


CROSSED_SHARE = 0.05  # of a vertebra's posterior voxels, a further gap beyond its band: its flood crossed a level


MAX_ACROSS_MM = 60.0  # ``confine_across``: the widest transverse processes (L3) reach about 45-50 mm from the midline


def confine_across(vertebrae: np.ndarray, bodies: np.ndarray, chain: list[int], spacing_mm: tuple[float, ...],
                   last_is_s1: bool, reach_mm: float = MAX_ACROSS_MM) -> np.ndarray:
    """Leave out the voxels of each vertebra of ``chain`` lying more than ``reach_mm`` left or right (along x, mm) of
    its body centroid: rib pieces joined to it. S1 (``last_is_s1``) keeps its alae. Arguments (int32 (z, y, x) arrays,
    spacing (z, y, x) in mm) and result as :func:`confine_posterior`'s."""
    ids = chain[:-1] if last_is_s1 else chain
    if not ids:
        return vertebrae
    out = vertebrae.copy()
    centres = _centroids_and_sizes(bodies, np.asarray(ids))[0]  # voxel indices (z, y, x)
    boxes = ndimage.find_objects(out)
    for vid, centre in zip(ids, centres):  # every id of the chain has its body, so a box
        box = boxes[vid - 1]
        across = np.abs(np.arange(box[2].start, box[2].stop) - centre[2]) * spacing_mm[2] > reach_mm
        region = out[box]  # a view: writes go to ``out``
        region[(region == vid) & across[None, None, :]] = 0
    return out


def confine_posterior(vertebrae: np.ndarray, bodies: np.ndarray, chain: list[int], spacing_mm: tuple[float, ...],
                      last_is_s1: bool, above: float = 1.0, below: float = 1.5) -> np.ndarray:
    """Keep each vertebra's posterior elements within its band along the spine.

    The flood of ``attach_posterior`` gives a connected posterior-element region to the body it touches first: where
    the posterior elements run as one column along the spine and touch few bodies (MRI with faint pedicles), one
    vertebra takes the whole column. Along the chain's local direction at each vertebra, its band runs from ``above``
    times its gap to the vertebra above, above its body centroid, to ``below`` times its gap to the vertebra below,
    below it (spinous processes slope caudally); S1's band has no lower end. A posterior voxel outside its vertebra's
    band goes to the vertebra of the chain whose band holds it and whose body centroid is nearest, or to none (it is
    left out of the labelling); so do all the posterior voxels of a vertebra with ``CROSSED_SHARE`` of them more than
    a further gap beyond its band (a flood that crossed a whole level; a thin spur does not count). Then a vertebra
    gives up what lies two levels away, or at a neighbour's level where it holds more than the neighbour
    (``_claim_own_level``).

    Args:
        vertebrae: int32 (z, y, x) whole-vertebra components; not modified.
        bodies: int32 (z, y, x) their body components (same ids).
        chain: the ids of the chained vertebrae, cranial first.
        spacing_mm: voxel size (z, y, x) in mm.
        last_is_s1: the last of ``chain`` is named S1.
        above, below: the band's reach, in gaps.

    Returns:
        int32 (z, y, x) components.
    """
    if len(chain) < 2:
        return vertebrae
    spacing = np.asarray(spacing_mm, dtype=float)
    centres = _centroids_and_sizes(bodies, np.asarray(chain))[0] * spacing  # (n, 3) z, y, x mm
    gaps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    up = np.concatenate([[gaps[0]], gaps])  # the gap above each vertebra (the first takes the one below)
    down = np.concatenate([gaps, [np.inf if last_is_s1 else gaps[-1]]])
    direction = np.gradient(centres, axis=0)  # local caudal direction of the chain; the whole chain's where that is 0
    norms = np.linalg.norm(direction, axis=1, keepdims=True)
    direction = (np.where(norms > 0, direction, centres[-1] - centres[0])
                 / np.where(norms > 0, norms, max(gaps.sum(), 1e-6)))
    position, voxels, owner = _chain_posterior(vertebrae, bodies, chain)
    points = np.stack(voxels, axis=1) * spacing

    def beyond(at: np.ndarray, of: np.ndarray) -> np.ndarray:
        """How far (mm, float64) each point lies outside the band of vertebra ``of``; 0 or less inside it."""
        along = np.einsum("...k,...k->...", at - centres[of], direction[of])
        return np.maximum(-above * up[of] - along, along - below * down[of])

    def inside(at: np.ndarray, of: np.ndarray) -> np.ndarray:
        """bool: whether each point ``at`` (float64 (..., 3) z, y, x mm) lies in the band of vertebra ``of``."""
        return beyond(at, of) <= 0

    outside = beyond(points, owner)
    # a vertebra with CROSSED_SHARE of its posterior elements a further gap beyond its band took a column across a
    # level: all of them are shared out, not only those outside its band
    far = np.bincount(owner, weights=outside > np.minimum(up, down)[owner], minlength=len(chain))
    crossed = far > CROSSED_SHARE * np.bincount(owner, minlength=len(chain))
    stray = np.flatnonzero((outside > 0) | crossed[owner])
    if not stray.size:
        return _claim_own_level(vertebrae, voxels, points, owner, chain, centres, last_is_s1)
    new = np.zeros(stray.size, dtype=vertebrae.dtype)
    every = np.arange(len(chain))
    for start in range(0, stray.size, 65536):  # against every vertebra of the chain, a block of voxels at a time
        at = points[stray[start : start + 65536], None, :]
        distance = np.where(inside(at, np.broadcast_to(every, (len(at), len(chain)))),
                            np.linalg.norm(at - centres[None], axis=2), np.inf)
        new[start : start + 65536] = np.where(np.isfinite(distance.min(axis=1)),
                                              np.asarray(chain)[np.argmin(distance, axis=1)], 0)
    out = vertebrae.copy()
    where = tuple(v[stray] for v in voxels)
    out[where] = new
    out = _undo_detached_moves(vertebrae, out)  # a piece moved apart from its new vertebra stays where it was
    new = out[where]
    moved = new != vertebrae[where]
    log.info("%d posterior-element voxels moved to the vertebra whose band along the spine holds them (%d to none)",
             int(moved.sum()), int((moved & (new == 0)).sum()))
    owner = owner.copy()
    owner[stray] = position[new]  # -1: left out
    return _claim_own_level(out, voxels, points, owner, chain, centres, last_is_s1)


def _claim_own_level(vertebrae: np.ndarray, voxels: tuple[np.ndarray, ...], points: np.ndarray, owner: np.ndarray,
                     chain: list[int], centres: np.ndarray, last_is_s1: bool) -> np.ndarray:
    """A vertebra's arch lies at the level of its body. The level of a voxel is the chain vertebra between whose
    half-way planes (to the body centroids above and below) it lies. A vertebra keeps nothing two levels away (its
    band, which must hold sloping spinous processes, can reach past the next level on a curved spine). At a
    neighbour's level it holds only what reaches over (articular processes, the tip of a sloping spinous process),
    few next to the neighbour's own arch: where it holds more there than the neighbour holds at all, its flood took
    the neighbour's arch (on MRI the network often misses a vertebra's pedicles, and its arch then reaches no body but
    through the facet joints of the vertebra above or below), and those voxels go to the neighbour. S1
    (``last_is_s1``) takes none this way (what lies two levels above it goes to L5, and it claims nothing at its own
    level from L5): its posterior elements come from ``join_sacrum``; it keeps those at its own level.

    Args:
        vertebrae: int32 (z, y, x) components; not modified.
        voxels: the (z, y, x) indices, int64 arrays, of the posterior-element voxels of the chain's vertebrae.
        points: float64 (len(voxels[0]), 3) their positions in mm (z, y, x).
        owner: int64 (len(voxels[0]),) the chain position of the vertebra each belongs to in ``vertebrae``, -1 none.
        chain: the ids of the chained vertebrae, cranial first.
        centres: float64 (len(chain), 3) body centroids in mm (z, y, x).
        last_is_s1: the last of ``chain`` is named S1.

    Returns:
        int32 (z, y, x) components.
    """
    kept = owner >= 0
    if not kept.any():
        return vertebrae
    voxels, points, owner = tuple(v[kept] for v in voxels), points[kept], owner[kept]
    # the chain position at whose level each voxel lies: the half-way planes between neighbouring body centroids that
    # it lies beyond, on the caudal side
    level = np.zeros(owner.size, dtype=np.int64)
    for k in range(len(chain) - 1):
        level += (points - (centres[k] + centres[k + 1]) / 2) @ (centres[k + 1] - centres[k]) > 0
    new = owner.copy()
    far = np.abs(level - owner) > 1  # two levels away: never a vertebra's own
    new[far] = (np.minimum(level, len(chain) - 2) if last_is_s1 else level)[far]
    held = np.bincount(new, minlength=len(chain))
    taken = np.bincount(level * len(chain) + new, minlength=len(chain) ** 2).reshape(len(chain), len(chain))
    before = new.copy()
    for k in range(len(chain) - 1 if last_is_s1 else len(chain)):  # taken[k, j]: j's voxels at k's level
        for j in (k - 1, k + 1):
            if 0 <= j < len(chain) and taken[k, j] > held[k]:
                new[(level == k) & (before == j)] = k
    moved = np.count_nonzero(new != owner)
    if not moved:
        return vertebrae
    out = vertebrae.copy()
    out[voxels] = np.asarray(chain)[new]
    log.info("%d posterior-element voxels moved to the vertebra at whose level they lie, which held fewer", moved)
    return out


# In favour of the vertebra a posterior-element voxel already belongs to (natural log): the level head must find the
# voxel's level that much likelier to be a neighbour's than its own for it to move (``posterior_by_level``).
LEVEL_MARGIN = 1.0


def _level_cells(level_log_probs: np.ndarray, zyx: tuple[np.ndarray, ...]) -> np.ndarray:
    """float32 (n_levels, len(zyx[0])) level log-probabilities of the half-resolution cells holding the full-resolution
    voxels ``zyx`` (``np.nonzero`` order, z, y, x); ``level_log_probs`` (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)):
    the level head's output."""
    return level_log_probs[(slice(None), *(v // 2 for v in zyx))].astype(np.float32)


def posterior_by_level(vertebrae: np.ndarray, bodies: np.ndarray, chain: list[int], level_log_probs: np.ndarray,
                       last_is_s1: bool, margin: float = LEVEL_MARGIN) -> np.ndarray:
    """Give each posterior-element voxel to the chain neighbour whose level the level head gives it, where it does so
    clearly. The flood and the bands (``attach_posterior``, ``confine_posterior``) go by distance; but the arch of a
    vertebra reaches down past its disc (inferior articular processes, a sloping spinous process) to the facet joints,
    where, at the network's 2 mm grid, it touches the arch below: on real CT the flood gives a vertebra's lower arch
    to the vertebra below. The level head was trained on whole vertebrae, arches included, and reads those voxels'
    level from what surrounds them. A voxel belongs to chain vertebra i with a likelihood ``p . q_i``: ``p`` the level
    probabilities of its half-resolution cell, ``q_i`` the mean level probabilities over i's body voxels; a voxel
    moves to the vertebra above or below its own when that likelihood's log beats its own vertebra's by ``margin``.
    S1 (``last_is_s1``) neither gains nor loses voxels this way: its posterior elements come from ``join_sacrum``.

    Args:
        vertebrae: int32 (z, y, x) whole-vertebra components; not modified.
        bodies: int32 (z, y, x) their body components (same ids).
        chain: the ids of the chained vertebrae, cranial first.
        level_log_probs: float16 (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)) level head output at half resolution
            (natural-log probabilities).
        last_is_s1: the last of ``chain`` is named S1.
        margin: natural-log likelihood ratio a move needs.

    Returns:
        int32 (z, y, x) components.
    """
    n = len(chain)
    movable = n - 1 if last_is_s1 else n  # chain positions that may give or take voxels
    if movable < 2:
        return vertebrae
    position, voxels, owner = _chain_posterior(vertebrae, bodies, chain[:movable])
    if not owner.size:
        return vertebrae

    def probabilities(zyx: tuple[np.ndarray, ...]) -> np.ndarray:
        """float32 (len(zyx[0]), n_levels) level probabilities of the half-resolution cells of full-resolution
        voxels."""
        log_p = _level_cells(level_log_probs, zyx).T
        p = np.exp(log_p - log_p.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    body_voxels = np.nonzero(bodies)
    body_position = position[bodies[body_voxels]]
    at = body_position >= 0
    p_body = probabilities(tuple(v[at] for v in body_voxels))
    counts = np.bincount(body_position[at], minlength=movable)
    shares = np.stack([np.bincount(body_position[at], weights=column, minlength=movable)
                       for column in p_body.T], axis=1) / np.maximum(counts, 1)[:, None]  # (movable, n_levels)
    with np.errstate(divide="ignore", invalid="ignore"):  # a non-finite level output says nothing: -inf
        score = np.nan_to_num(np.log(probabilities(voxels) @ shares.T), nan=-np.inf)  # (voxels, movable)
    candidates = owner[:, None] + np.array([-1, 0, 1])
    possible = (candidates >= 0) & (candidates < movable) & (counts[np.clip(candidates, 0, movable - 1)] > 0)
    choice = np.where(possible, np.take_along_axis(score, np.clip(candidates, 0, movable - 1), axis=1), -np.inf)
    # the own vertebra's never -inf (level probabilities that underflow): a voxel stays where nothing is likelier
    choice[:, 1] = np.maximum(score[np.arange(owner.size), owner] + margin, np.finfo(score.dtype).min)
    new = np.take_along_axis(candidates, np.argmax(choice, axis=1)[:, None], axis=1)[:, 0]
    moved = new != owner
    if not moved.any():
        return vertebrae
    out = vertebrae.copy()
    out[tuple(v[moved] for v in voxels)] = np.asarray(chain)[new[moved]]
    out = _undo_detached_moves(vertebrae, out)  # a piece moved apart from its new vertebra stays where it was
    log.info("%d posterior-element voxels moved to the neighbouring vertebra whose level the level head gives them",
             int(np.count_nonzero(out != vertebrae)))
    return out


# Least size of the arch piece of a vertebra above the field of view (``arch_above_view``), ml.
ARCH_ABOVE_MIN_ML = 1.0


def arch_above_view(vertebrae: np.ndarray, bodies: np.ndarray, top: int, level_log_probs: np.ndarray, own: int,
                    above: int, spacing_mm: tuple[float, float, float], margin: float = LEVEL_MARGIN
                    ) -> np.ndarray | None:
    """The lower arch of the vertebra above the field of view, among the posterior elements of the topmost vertebra.
    Spinous processes slope down and the inferior articular processes reach below their own body, so the top slices
    of a scan can hold the arch of a vertebra whose body lies above them; the flood gives it to the vertebra below.
    Those of ``top``'s posterior-element voxels whose level the level head finds ``margin`` likelier to be ``above``
    than ``own``, connected (26-neighbourhood) to the top plane of the scan, when they make ``ARCH_ABOVE_MIN_ML`` at
    least; and only where the level head reads ``top``'s body as ``own`` over ``above`` by ``margin`` (mean over its
    voxels): where it reads the body as the level above too, it disagrees with the chain's name for the vertebra (a
    synthetic CT whose top vertebra, named T1, it read as C7 throughout lost T1 to such a piece), not that one lies
    above.

    Args:
        vertebrae: int32 (z, y, x) whole-vertebra components, z growing cranially (the last plane is the top of the
            scan: the model grid's planes beyond it repeat it, ``io.extend_to_grid_ends``); not modified.
        bodies: int32 (z, y, x) their body components (same ids).
        top: the id of the chain's topmost vertebra.
        level_log_probs: float16 (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)) level head output at half resolution
            (natural-log probabilities).
        own, above: indices into ``LEVELS``: the top vertebra's level and the one above it.
        spacing_mm: voxel size (z, y, x) in mm.
        margin: natural-log likelihood ratio the level head must give.

    Returns:
        bool (z, y, x) the piece, or None.
    """
    pair = level_log_probs[[above, own]]
    body = _level_cells(pair, np.nonzero(bodies == top))
    if not np.mean(body[1] - body[0]) >= margin:
        return None
    zyx = np.nonzero((vertebrae == top) & (bodies == 0))
    log_p = _level_cells(pair, zyx)
    theirs = np.zeros(vertebrae.shape, dtype=bool)
    theirs[tuple(v[log_p[0] - log_p[1] >= margin] for v in zyx)] = True
    pieces, _ = ndimage.label(theirs, structure=TWENTY_SIX_CONNECTED)
    at_top = np.unique(pieces[-1])
    piece = np.isin(pieces, at_top[at_top > 0])
    if np.count_nonzero(piece) * float(np.prod(spacing_mm)) / 1000.0 < ARCH_ABOVE_MIN_ML:
        return None
    return piece


# C1 that ``atlas_beside_dens`` parts from C2 is at least this big (a C1 is about 10-20 ml; the network's C1 voxels
# in the C2 of synthetic necks, where it gave C1 no component of its own, made 4-9 ml)
ATLAS_MIN_ML = 2.0


def atlas_beside_dens(vertebrae: np.ndarray, bodies: np.ndarray, top: int, level_log_probs: np.ndarray,
                      spacing_mm: tuple[float, float, float], margin: float = LEVEL_MARGIN) -> np.ndarray | None:
    """C1 (the atlas) inside the topmost vertebra, named C2. C1 has no body: its ring lies around the dens of C2, at the
    dens's height, so the two are not stacked along the spine as other vertebrae are, and where the network's body mask
    joins C1's anterior arch and lateral masses to the dens, no cut across the spine (``split_merged``) can part them.
    Those of ``top``'s voxels, body and posterior elements, whose level the level head finds ``margin`` likelier to be
    C1 than C2: their largest connected piece (26-neighbourhood), when it makes ``ATLAS_MIN_ML`` at least; and only
    where the level head reads the rest of ``top``'s body, the body voxels it does not read so, as C2 over C1 by
    ``margin`` (mean over them).

    Args:
        vertebrae: int32 (z, y, x) whole-vertebra components; not modified.
        bodies: int32 (z, y, x) their body components (same ids).
        top: the id of the chain's topmost vertebra, named C2.
        level_log_probs: float16 (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)) level head output at half resolution
            (natural-log probabilities).
        spacing_mm: voxel size (z, y, x) in mm.
        margin: natural-log likelihood ratio the level head must give.

    Returns:
        bool (z, y, x) the piece, or None.
    """
    zyx = np.nonzero(vertebrae == top)
    if zyx[0].size == 0:
        return None
    log_p = _level_cells(level_log_probs[[level_index("C1"), level_index("C2")]], zyx)
    atlas = log_p[0] - log_p[1] >= margin
    rest = ~atlas & (bodies[zyx] == top)
    if not rest.any() or not np.mean(log_p[1, rest] - log_p[0, rest]) >= margin:
        return None
    box = tuple(slice(int(v.min()), int(v.max()) + 1) for v in zyx)
    inside = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)
    inside[tuple(v[atlas] - s.start for v, s in zip(zyx, box))] = True
    pieces, n = ndimage.label(inside, structure=TWENTY_SIX_CONNECTED)
    if n == 0:
        return None
    sizes = np.bincount(pieces.ravel())[1:]
    if sizes.max() * float(np.prod(spacing_mm)) / 1000.0 < ATLAS_MIN_ML:
        return None
    piece = np.zeros(vertebrae.shape, dtype=bool)
    piece[box] = pieces == int(np.argmax(sizes)) + 1
    return piece


def cut_across(bodies: np.ndarray, vertebrae: np.ndarray, vid: int, new_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut vertebra ``vid`` in two at the head-feet plane through its body centroid: its voxels below the plane, body
    and posterior elements, take ``new_id`` (a vertebra the network did not part from its neighbour). A body that
    lies in one plane is left whole.

    Args:
        bodies: int32 (z, y, x) body components, z growing cranially; not modified.
        vertebrae: int32 (z, y, x) whole-vertebra components, same ids; not modified.
        vid: the component to cut.
        new_id: the id of its caudal part, unused in both arrays.

    Returns:
        (bodies, vertebrae), int32 (z, y, x): copies, or the arrays given where the body lies in one plane.
    """
    z = np.nonzero(bodies == vid)[0]
    if z.min() == z.max():
        return bodies, vertebrae
    below = np.arange(bodies.shape[0])[:, None, None] < z.mean()
    return (np.where((bodies == vid) & below, new_id, bodies).astype(bodies.dtype),
            np.where((vertebrae == vid) & below, new_id, vertebrae).astype(vertebrae.dtype))


def join_sacrum(vertebrae: np.ndarray, sacrum: np.ndarray, ids: list[int] | None = None,
                above: int | None = None) -> np.ndarray:
    """Give the held-back voxels of ``sacrum`` to the vertebrae: with ``ids`` (the vertebra named S1, then the sacral
    pieces below it), those connected to them join the first, and so do those below the centroid of ``above`` (the
    vertebra named just above S1; all of them when there is none), since where the network takes the whole sacrum, S1
    body included, for posterior elements, the S1 body it finds may be a sliver apart from that mass; the rest stay
    out. Without ``ids`` (no vertebra is named S1), each joins the vertebra it is connected to, as if it had never been
    held back.

    Args:
        vertebrae: int32 (z, y, x) whole-vertebra components (z grows cranially); not modified.
        sacrum: bool (z, y, x) voxels held back (``sacral_posterior``).
        ids: component ids, S1's first, or None.
        above: component id of the vertebra above S1, or None.

    Returns:
        int32 (z, y, x) components.

    Only the box around ``sacrum`` and one voxel more is flooded: a vertebra reaches the held-back voxels through the
    voxels of its own that touch them, all inside it (on a CT phantom 1800 mm long the flood over the whole grid had
    been the labelling's peak of memory).
    """
    found = nonzero_box(sacrum)
    if found is None:
        return vertebrae
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(found, sacrum.shape))
    inside, held = vertebrae[box], sacrum[box]
    markers = inside if ids is None else np.where(np.isin(inside, ids), ids[0], 0).astype(inside.dtype)
    if not markers.any() and (ids is None or not np.isin(vertebrae, ids).any()):
        return vertebrae  # no vertebra reaches them (held back beside none), or none is named S1
    grown = _flood(markers, (markers > 0) | held) if markers.any() else np.zeros_like(markers)
    if ids is not None:
        left = held & (grown == 0)
        if above is not None and left.any():
            below = np.arange(box[0].start, box[0].stop) < np.nonzero(vertebrae == above)[0].mean()
            left &= below[:, None, None]
        grown = np.where(left, ids[0], grown)
    out = vertebrae.copy()
    out[box] = np.where(held, grown, inside)
    return out


def vertebra_components(tissue: np.ndarray, body_probability: np.ndarray, spacing_mm: tuple[float, float, float],
                        level_log_probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body components and whole-vertebra components from the network's tissue map and body probability.

    Args:
        tissue: uint8 (z, y, x) tissue classes.
        body_probability: float (z, y, x) vertebral-body probability.
        spacing_mm: voxel size (z, y, x) in mm.
        level_log_probs: float16 (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)) level head output (natural-log
            probabilities), or None (``split_merged``; and no sacrum is held back).

    Returns:
        (bodies, vertebrae, sacrum): bodies and vertebrae int32 (z, y, x) with the same ids, cranial first; sacrum
        bool (z, y, x), the posterior elements held back from the vertebrae for ``join_sacrum``.
    """
    bodies = split_merged(body_components(tissue, spacing_mm), body_probability, spacing_mm,
                          level_log_probs=level_log_probs)
    stray = off_axis_components(bodies, spacing_mm)
    if stray.size:
        log.info("%d body components off the vertebral column treated as posterior elements", stray.size)
        moved = np.isin(bodies, stray)
        bodies = np.where(moved, 0, bodies)
        tissue = np.where(moved, POSTERIOR, tissue).astype(tissue.dtype)
    bodies = drop_small(bodies, spacing_mm)  # slivers left by the splits
    sacrum = (sacral_posterior(bodies, tissue, level_log_probs) if level_log_probs is not None
              else np.zeros(bodies.shape, dtype=bool))
    return bodies, attach_posterior(bodies, tissue, sacrum), sacrum
