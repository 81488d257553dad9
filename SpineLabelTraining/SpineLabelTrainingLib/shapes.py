"""Library of real vertebra, sacrum and disc shapes for synthetic whole-spine training data.

Method. Every whole-vertebra mask found in the development data (``masks_verse``, ``ct_verse``, ``crops_tptbox``)
is resampled, one vertebra at a time, into a canonical frame at 1 mm: axes (z, y, x) = (superior, posterior, left)
of that vertebra, the z axis along the local spine tangent (estimated from the neighbouring vertebrae of the same
scan), origin at the centroid of its body. The vertebral body is separated from the posterior elements by a
morphological opening with a ball sized to the level (the body is the only part thick enough to survive it), keeping
the largest piece; the split can be checked against the TPTBox subregion labels (body = 49/50) with
:func:`body_split_dice`. Sacra are made of a real S1 body (``mri_lumbar_bodies``) plus a parametric sacral mass (alae,
a tapering, posteriorly curved body of four more segments with rudimentary discs, the sacral canal and its dorsal
wall); only the S1 body is body tissue. Discs come from the real disc masks of ``discs_mri``, aligned on their thin
axis. Vertebrae cut by the field of view, collapsed, or much shorter than the rest of their spine are left
out (:func:`_plausible`). Levels missing then (T6-T10 there) are filled with the nearest levels' shapes rescaled by
the ratio of typical adult body sizes (:data:`TYPICAL_BODY_MM`).

The library feeds :mod:`synthesis`, which follows SynthSeg (Billot et al., Medical Image Analysis 2023: train only
on images synthesised from label maps with randomised contrast and resolution). It is built once from
``../shared/data`` and cached as an ``.npz`` outside the repository (default ``~/.cache/spinelabel``).

Arrays are (z, y, x) throughout, as SimpleITK gives them; world vectors are written in that same order,
(S, P, L) millimetres.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from SpineLabelLib import io
from SpineLabelLib.inference import Cancelled
from SpineLabelLib.vertebrae import BODY, BY_LABEL, BY_NAME, DISC, LEVELS, POSTERIOR, level_index

__all__ = [
    "TYPICAL_BODY_MM",
    "S1_LABEL",
    "SACRAL_DISC",
    "SACRAL_CANAL",
    "Shape",
    "ShapeLibrary",
    "frame",
    "size_ratio",
    "build_shape_library",
    "canonical_vertebrae",
    "split_body",
    "body_split_dice",
]

log = logging.getLogger(__name__)

SPACING_MM = 1.0  # voxel size of every stored shape
_CACHE_VERSION = 12
_MASK_BITS = 3  # mask values go up to SACRAL_CANAL (4)
S1_LABEL = BY_NAME["S1"].label
_MAIN_LABELS = tuple(level.label for level in LEVELS if not level.transitional)  # C1..L5, S1

# Typical adult vertebral body size per level: (central height, antero-posterior depth, left-right width), mm.
# Rounded from published morphometry tables (e.g. Panjabi et al., Spine 1991/1992); used only for ratios between
# levels (filling levels missing in the data, borrowing a neighbour's shape) and for synthetic test masks. Written by
# level name, keyed by VerSe label value.
TYPICAL_BODY_MM: dict[int, tuple[float, float, float]] = {BY_NAME[name].label: size for name, size in {
    "C1": (10.0, 10.0, 45.0), "C2": (20.0, 15.0, 18.0), "C3": (13.0, 15.0, 20.0), "C4": (13.0, 15.0, 21.0),
    "C5": (13.0, 16.0, 22.0), "C6": (13.0, 16.0, 24.0), "C7": (14.0, 16.0, 26.0),
    "T1": (15.0, 17.0, 28.0), "T2": (16.0, 18.0, 28.0), "T3": (17.0, 20.0, 28.0), "T4": (17.5, 22.0, 29.0),
    "T5": (18.0, 24.0, 30.0), "T6": (18.5, 25.0, 31.0), "T7": (19.0, 26.0, 32.0), "T8": (20.0, 27.0, 33.0),
    "T9": (21.0, 28.0, 35.0), "T10": (22.0, 29.0, 38.0), "T11": (23.0, 30.0, 40.0), "T12": (24.0, 31.0, 42.0),
    "T13": (24.5, 32.0, 43.0), "L1": (25.0, 32.0, 44.0), "L2": (26.0, 33.0, 46.0), "L3": (27.0, 34.0, 48.0),
    "L4": (27.0, 34.0, 50.0), "L5": (26.0, 34.0, 51.0), "L6": (26.0, 34.0, 51.0), "S1": (28.0, 34.0, 50.0),
}.items()}


@dataclass
class Shape:
    """One vertebra (or sacrum, or disc) in its canonical frame.

    Attributes:
        label: VerSe label value (0 for a disc).
        mask: uint8 (z, y, x) at 1 mm, axes (superior, posterior, left): 0 outside, ``BODY`` (1) body,
            ``POSTERIOR`` (2) posterior elements; a sacrum also ``SACRAL_DISC`` and ``SACRAL_CANAL``; a disc uses 1
            for its voxels.
        centre: (3,) float, index (z, y, x) of the body centroid (disc centroid for a disc).
        z_low, z_up: signed distance (mm) from the centre to the lower and upper endplate along the body's central
            column (z_low < 0 < z_up).
        depth_mm, width_mm: antero-posterior and left-right extent of the body (disc) in mm.
        source: file the shape came from (for the log), plus how it was derived.
    """

    label: int
    mask: np.ndarray
    centre: np.ndarray
    z_low: float
    z_up: float
    depth_mm: float
    width_mm: float
    source: str = ""


@dataclass
class ShapeLibrary:
    """Real shapes by level, ready for whole-spine assembly.

    Attributes:
        vertebrae: VerSe label -> shapes; holds every level C1..L5 and S1 (the sacrum, label 26).
        discs: intervertebral disc shapes (label 0).
        bodies: VerSe label -> real vertebral bodies without posterior elements (all ``BODY``), from the bodies-only
            MRI masks; the synthesis swaps them into whole vertebrae for more body shapes (wedges, fractures).
        c1_offsets: (n, 3) float, C1 body centroid minus C2 body centroid in the C2 frame (mm, z y x), measured on
            scans that hold both; used to seat the atlas on the axis.
        spacing_mm: voxel size of every stored mask (1 mm).
    """

    vertebrae: dict[int, list[Shape]] = field(default_factory=dict)
    discs: list[Shape] = field(default_factory=list)
    bodies: dict[int, list[Shape]] = field(default_factory=dict)
    c1_offsets: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    spacing_mm: float = SPACING_MM

    def shapes_for(self, label: int) -> list[Shape]:
        """Shapes of a level; raises KeyError when the library holds none."""
        shapes = self.vertebrae.get(int(label), [])
        if not shapes:
            raise KeyError(f"shape library holds no {BY_LABEL[int(label)].name} shape")
        return shapes

    def save(self, path: Path) -> None:
        """Write the library as one compressed ``.npz`` (masks bit-packed, one array per bit of the mask values)."""
        arrays: dict[str, np.ndarray] = {"c1_offsets": np.asarray(self.c1_offsets, float)}
        meta = []
        entries = ([(s, 0) for lst in self.vertebrae.values() for s in lst] + [(s, 1) for s in self.discs]
                   + [(s, 2) for lst in self.bodies.values() for s in lst])
        for i, (shape, kind) in enumerate(entries):
            for bit in range(_MASK_BITS):
                arrays[f"b{bit}_{i}"] = np.packbits((shape.mask.ravel() >> bit) & 1)
            meta.append([shape.label, *shape.mask.shape, *shape.centre, shape.z_low, shape.z_up, shape.depth_mm,
                         shape.width_mm, kind])
            arrays[f"s{i}"] = np.array(shape.source)
        arrays["meta"] = np.asarray(meta, float).reshape(-1, 12)
        path.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(path) as tmp:  # keeps the .npz suffix, so numpy adds none
            np.savez_compressed(tmp, **arrays)

    @classmethod
    def load(cls, path: Path) -> "ShapeLibrary":
        """Read a library written by :meth:`save`."""
        library = cls()
        with np.load(path) as data:
            library.c1_offsets = data["c1_offsets"]
            for i, row in enumerate(data["meta"]):
                dims = tuple(int(v) for v in row[1:4])
                n = int(np.prod(dims))
                mask = sum(np.unpackbits(data[f"b{bit}_{i}"])[:n] << bit for bit in range(_MASK_BITS)).reshape(dims)
                shape = Shape(int(row[0]), mask.astype(np.uint8), row[4:7].copy(), float(row[7]), float(row[8]),
                              float(row[9]), float(row[10]), str(data[f"s{i}"]))
                if row[11] == 1:
                    library.discs.append(shape)
                elif row[11] == 2:
                    library.bodies.setdefault(shape.label, []).append(shape)
                else:
                    library.vertebrae.setdefault(shape.label, []).append(shape)
        return library

    def summary(self) -> str:
        """One line: how many shapes per level and discs."""
        parts = [f"{BY_LABEL[k].name}:{len(v)}" for k, v in sorted(self.vertebrae.items(),
                                                                    key=lambda kv: level_index(kv[0]))]
        return " ".join(parts) + f" discs:{len(self.discs)} bodies:{sum(len(v) for v in self.bodies.values())}"


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------------


def _index_to_world(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, b), float64 (3, 3) and (3,), with world (S, P, L mm) = A @ index(z, y, x) + b for a SimpleITK image."""
    d = np.asarray(image.GetDirection(), float).reshape(3, 3) * np.asarray(image.GetSpacing(), float)[None, :]
    return d[::-1, ::-1].copy(), np.asarray(image.GetOrigin(), float)[::-1].copy()


def frame(tangent: np.ndarray) -> np.ndarray:
    """Rotation, float64 (3, 3), whose columns are the local (superior, posterior, left) axes in world (S, P, L)
    coordinates, the first along ``tangent``, the second the world posterior direction made orthogonal to it."""
    ez = tangent / np.linalg.norm(tangent)
    ey = np.array([0.0, 1.0, 0.0]) - ez[1] * ez
    if np.linalg.norm(ey) < 1e-3:
        ey = np.array([0.0, 0.0, 1.0]) - ez[2] * ez
    ey /= np.linalg.norm(ey)
    return np.stack([ez, ey, np.cross(ez, ey)], axis=1)


def _ball_opening(mask: np.ndarray, radius_vox: float) -> np.ndarray:
    """Opening of a boolean (z, y, x) mask by a ball of ``radius_vox`` voxels (Euclidean distance maps); bool."""
    eroded = ndimage.distance_transform_edt(np.pad(mask, 1)) > radius_vox
    opened = ndimage.distance_transform_edt(~eroded) <= radius_vox
    return opened[1:-1, 1:-1, 1:-1] & mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 6-connected piece of a bool (z, y, x) mask (the mask itself when it has at most one piece)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (1 + int(np.argmax(sizes)))


def _opening_radius_mm(label: int) -> float:
    """Radius (mm) of the ball whose opening keeps only the vertebral body of a level."""
    region = BY_LABEL[label].region
    if label in (BY_NAME["C1"].label, BY_NAME["C2"].label):
        return 3.0
    return {"cervical": 3.5, "thoracic": 5.0, "lumbar": 6.0}.get(region, 6.0)


def split_body(mask: np.ndarray, label: int, spacing_mm: float = SPACING_MM) -> np.ndarray:
    """Split a whole-vertebra mask into body and posterior elements.

    The body is the part of the vertebra in front of the spinal canal (the hole the arch encloses, found slice by
    slice along z), opened by a 2 mm ball to cut thin bridges, largest piece. The transverse processes of C2-C7 and
    of L5 leave the body in front of the canal, so there the ball is sized to the level, as it is when no closed
    canal is found (only the body is that thick); with 2 mm they stayed in the body, which was then 38-66 mm wide at
    C3-C7 and 64-77 mm at L5 (VerSe masks; 26-41 and 52-58 mm now). That ball also rounds off the endplate rims
    and corners of the body (5-25 % of its volume at C3-C7, 8-20 % at L5, taught as posterior elements), so the body
    is then grown back by the ball's radius within the vertebra in front of the canal, no wider than the opened body
    (0.1-7.7 % left). For C1, which has no body, the anterior arch and lateral masses in front of the canal centre
    stand in. On the TPTBox subregion labels this gives a body Dice of 0.98-0.99 at L3 and L4 and 0.99 at the crop
    labelled C6 and C7 (0.97 before the regrowth; :func:`body_split_dice`).

    Args:
        mask: bool (z, y, x) whole vertebra, axes (superior, posterior, left), isotropic ``spacing_mm`` voxels.
        label: VerSe label value of the vertebra (sets the ball radius: thicker bodies lower down).
        spacing_mm: voxel size in mm.

    Returns:
        uint8 (z, y, x): 0 outside, ``BODY`` for the body, ``POSTERIOR`` for the rest of the vertebra.
    """
    canal = np.zeros_like(mask)
    for z in range(mask.shape[0]):
        if mask[z].any():
            canal[z] = ndimage.binary_fill_holes(mask[z]) & ~mask[z]
    canal = _largest_component(canal)
    if canal.sum() >= 20:
        canal_y = np.argwhere(canal)[:, 1]
        limit = np.mean(canal_y) if label == BY_NAME["C1"].label else np.percentile(canal_y, 5) + 1.0 / spacing_mm
        front = mask & (np.arange(mask.shape[1]) < limit)[None, :, None]
        thin_processes = BY_NAME["C2"].label <= label <= BY_NAME["C7"].label or label == BY_NAME["L5"].label
        radius = (_opening_radius_mm(label) if thin_processes else 2.0) / spacing_mm
        body = _largest_component(_ball_opening(front, radius))
        if thin_processes and body.any():
            # the large ball also rounds off the body's endplate rims and corners: grow the body back into the
            # vertebra in front of the canal by the ball's radius, but not sideways past the opened body, where
            # the transverse processes leave it
            columns = np.flatnonzero(body.any(axis=(0, 1)))
            beside = np.zeros(mask.shape[2], bool)
            beside[columns[0] : columns[-1] + 1] = True
            body = ndimage.binary_dilation(body, iterations=max(int(round(radius)), 1),
                                           mask=front & beside[None, None, :])
    else:
        body = _largest_component(_ball_opening(mask, _opening_radius_mm(label) / spacing_mm))
    out = np.zeros(mask.shape, np.uint8)
    out[mask] = POSTERIOR
    out[body] = BODY
    return out


def _body_measures(mask: np.ndarray) -> tuple[np.ndarray, float, float, float, float]:
    """Centroid index (float64 (3,), (z, y, x) voxels) and (z_low, z_up, depth, width) in mm of the BODY part of
    ``mask``, a 1 mm canonical uint8 (z, y, x) mask (``Shape.mask``)."""
    body = mask == BODY
    idx = np.argwhere(body)
    centre = idx.mean(axis=0)
    cy, cx = int(round(centre[1])), int(round(centre[2]))
    column = body[:, max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3].any(axis=(1, 2))
    zs = np.flatnonzero(column)
    if zs.size == 0:
        zs = idx[:, 0]
    z_low, z_up = zs.min() - 0.5 - centre[0], zs.max() + 0.5 - centre[0]
    mid = body[max(int(round(centre[0])) - 2, 0) : int(round(centre[0])) + 3]
    proj_y, proj_x = np.flatnonzero(mid.any(axis=(0, 2))), np.flatnonzero(mid.any(axis=(0, 1)))
    depth = float(proj_y.max() - proj_y.min() + 1) if proj_y.size else float(np.ptp(idx[:, 1]) + 1)
    width = float(proj_x.max() - proj_x.min() + 1) if proj_x.size else float(np.ptp(idx[:, 2]) + 1)
    return centre, float(z_low), float(z_up), depth, width


def _resample_canonical(volume: np.ndarray, a: np.ndarray, b: np.ndarray, centre_w: np.ndarray, rot: np.ndarray,
                        margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Resample a float (z, y, x) volume into a 1 mm grid along the columns of ``rot`` around a world point.

    Args:
        volume: float32 (z, y, x); index -> world (S, P, L mm) is ``a @ index + b``.
        centre_w: (3,) world point that becomes local coordinate 0.
        rot: rotation whose columns are the local axes in world coordinates.
        margin: empty voxels kept around the nonzero part.

    Returns:
        (resampled float32 (z, y, x) just big enough for the nonzero voxels, linear interpolation;
        local coordinate in mm of its voxel 0).
    """
    nz = np.argwhere(volume > 0)
    lo, hi = nz.min(axis=0) - 1.0, nz.max(axis=0) + 1.0
    corners = np.array([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]]
                        for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    local = (corners @ a.T + b - centre_w) @ rot  # rows: local coordinates (rot is orthonormal)
    qmin, qmax = np.floor(local.min(axis=0)) - margin, np.ceil(local.max(axis=0)) + margin
    shape = tuple(int(v) for v in qmax - qmin + 1)
    a_inv = np.linalg.inv(a)
    out = ndimage.affine_transform(volume, a_inv @ rot, a_inv @ (centre_w + rot @ qmin - b), output_shape=shape,
                                   order=1, mode="constant", cval=0.0)
    return out, qmin


def _crop_to_nonzero(mask: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) array of any dtype (uint8 or bool here) cut to the bounding box of its nonzero voxels plus
    ``margin`` (a view of the same dtype), and the box's start index, int64 (3,) (z, y, x)."""
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(axis=0) - margin, 0)
    hi = np.minimum(nz.max(axis=0) + margin + 1, mask.shape)
    return mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], lo


# ----------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------


def canonical_vertebrae(image: sitk.Image, source: str = ""
                        ) -> tuple[list[Shape], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Every complete vertebra of a whole-vertebra label map, in its canonical frame.

    Args:
        image: label map with VerSe values (1..28 kept, anything else ignored), any geometry.
        source: name for the log.

    Returns:
        (shapes, frames): shapes with body/posterior split; frames maps label -> (float64 (3,) body centroid in
        world S, P, L mm, float64 (3, 3) rotation whose columns are the vertebra's local axes). A vertebra with more
        than 0.1 % of its voxels on the edge of the image, or whose body touches it, is cut off and skipped: the
        transverse processes of sub-verse014's L2-L5 (``ct_verse``, a field 80 mm wide left-right) were cut flat, 79-80
        mm across against 84-101 mm in the other scans (its L1, with 1 voxel on the edge, is kept).
    """
    labels = sitk.GetArrayFromImage(image)
    a, b = _index_to_world(image)
    a_inv = np.linalg.inv(a)
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False) * (labels <= max(BY_LABEL)))
    present = sorted((v for v in BY_LABEL if v <= len(boxes) and boxes[v - 1] is not None), key=level_index)
    centroids, cut = {}, set()
    for value in present:
        box = boxes[value - 1]
        idx = np.argwhere(labels[box] == value) + [sl.start for sl in box]
        centroids[value] = idx.mean(axis=0) @ a.T + b
        if ((idx == 0) | (idx == np.asarray(labels.shape) - 1)).any(axis=1).mean() > 0.001:
            cut.add(value)
    shapes: list[Shape] = []
    frames: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, value in enumerate(present):
        if value in cut:
            log.info("%s: %s touches the image edge (cut off by the field of view); skipped", source,
                     BY_LABEL[value].name)
            continue
        up = centroids[present[i - 1]] if i > 0 else centroids[value]
        down = centroids[present[i + 1]] if i + 1 < len(present) else centroids[value]
        tangent = up - down
        if np.linalg.norm(tangent) < 1e-6 or tangent[0] <= 0:  # single vertebra or odd layout: scanner axis
            tangent = np.array([1.0, 0.0, 0.0])
        rot = frame(tangent)
        box = tuple(slice(max(sl.start - 2, 0), sl.stop + 2) for sl in boxes[value - 1])
        lo = np.array([sl.start for sl in box])
        sub = labels[box] == value
        canon, qmin = _resample_canonical(sub.astype(np.float32), a, b + a @ lo, centroids[value], rot)
        canon = canon > 0.5
        if canon.sum() < 200:
            continue
        split = split_body(canon, value)
        body_idx = np.argwhere(split == BODY)
        if body_idx.size == 0:
            continue
        body_src = (centroids[value] + (qmin + body_idx) @ rot.T - b) @ a_inv.T
        if (body_src.min(axis=0) < 0.5).any() or (body_src.max(axis=0) > np.asarray(labels.shape) - 1.5).any():
            log.info("%s: %s body touches the image edge; skipped", source, BY_LABEL[value].name)
            continue
        if BY_LABEL[value].region != "cervical" and body_idx.shape[0] < 0.2 * np.count_nonzero(split):
            log.info("%s: %s body split failed (body %d of %d voxels); skipped", source, BY_LABEL[value].name,
                     body_idx.shape[0], np.count_nonzero(split))
            continue
        split, _ = _crop_to_nonzero(split, margin=1)
        centre, z_low, z_up, depth, width = _body_measures(split)
        shapes.append(Shape(value, split, centre, z_low, z_up, depth, width, f"{source}:{BY_LABEL[value].name}"))
        frames[value] = (centroids[value] + rot @ (qmin + body_idx.mean(axis=0)), rot)
    return shapes, frames


def body_split_dice(vertebrae: sitk.Image, subregions: sitk.Image) -> dict[int, float]:
    """Check :func:`split_body` against expert subregion labels (TPTBox/VerSe: 49 and 50 = vertebral body).

    Both maps are first resampled (nearest neighbour) onto the LPS-aligned grid of ``io.canonical_grid`` so that
    the arrays are (superior, posterior, left) as :func:`split_body` expects.

    Args:
        vertebrae: whole-vertebra label map (VerSe values) on an isotropic grid.
        subregions: subregion label map on the same grid (41-48 posterior parts, 49/50 body).

    Returns:
        VerSe label -> Dice of the predicted body against the expert body, for every vertebra with an expert body.
    """
    spacing = float(np.mean(vertebrae.GetSpacing()))
    grid = io.canonical_grid(vertebrae, spacing)
    labels = sitk.GetArrayFromImage(io.resample_to_grid(vertebrae, grid, label=True))
    expert = np.isin(sitk.GetArrayFromImage(io.resample_to_grid(subregions, grid, label=True)), (49, 50))
    scores = {}
    for value in (int(v) for v in np.unique(labels) if int(v) in BY_LABEL):
        mask = labels == value
        truth = expert & mask
        if truth.sum() == 0:
            continue
        predicted = split_body(mask, value, spacing) == BODY
        scores[value] = float(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
    return scores


def _aligned_parts(image: sitk.Image, values: list[int], source: str, upward: dict[int, np.ndarray] | None = None,
                   labelled: bool = False, max_tilt_deg: float = 90.0) -> list[Shape]:
    """Bodies-only or disc label parts, each resampled into its own frame: z along its thinnest principal axis
    (pointing to world superior, or towards ``upward[value]`` when given), origin at its centroid. All voxels are
    stored as ``BODY``, with label ``value`` when ``labelled`` (else 0). Parts touching the image edge, and parts
    whose thin axis is more than ``max_tilt_deg`` away from the direction to ``upward[value]``, are skipped.
    ``upward``: label value -> a point cranial of that part, float64 (3,) world (S, P, L) mm (``_index_to_world``'s
    frame, as the parts' centroids)."""
    labels = sitk.GetArrayFromImage(image)
    a, b = _index_to_world(image)
    shapes = []
    for value in values:
        region = labels == value
        if region.sum() < 200:
            continue
        idx = np.argwhere(region)
        on_edge = ((idx == 0) | (idx == np.asarray(labels.shape) - 1)).any(axis=1).mean()
        if on_edge > 0.02:  # a few voxels on the edge are tolerated (a body just grazing a thin slab)
            log.info("%s: part %d touches the image edge; skipped", source, value)
            continue
        world = idx @ a.T + b
        centre_w = world.mean(axis=0)
        _, vecs = np.linalg.eigh(np.cov((world - centre_w).T))
        axis = vecs[:, 0]
        reference = upward[value] - centre_w if upward and value in upward else np.array([1.0, 0.0, 0.0])
        if axis @ reference < 0:
            axis = -axis
        cosine = axis @ reference / max(np.linalg.norm(reference), 1e-9)
        if np.degrees(np.arccos(np.clip(cosine, -1, 1))) > max_tilt_deg:
            log.info("%s: part %d thin axis does not follow the spine; skipped", source, value)
            continue
        rot = frame(axis)
        sub, lo = _crop_to_nonzero(region, margin=2)
        canon, _ = _resample_canonical(sub.astype(np.float32), a, b + a @ lo, centre_w, rot)
        mask, _ = _crop_to_nonzero(canon > 0.5, margin=1)
        mask = _largest_component(mask).astype(np.uint8) * BODY
        centre, z_low, z_up, depth, width = _body_measures(mask)
        shapes.append(Shape(value if labelled else 0, mask, centre, z_low, z_up, depth, width, f"{source}:{value}"))
    return shapes


# Mask values of a sacrum beyond BODY (the S1 body) and POSTERIOR (the rest of the bone): its rudimentary discs and
# its canal.
SACRAL_DISC = DISC
SACRAL_CANAL = 4
# Arc positions of the rudimentary discs S2/S3, S3/S4 and S4/S5 as fractions of the sacral length below S1 (segment
# heights of about 22, 18, 15 and 12 mm in an adult sacrum).
_SACRAL_DISC_AT = (0.3, 0.52, 0.7)


def _with_sacral_mass(s1: Shape, rng: np.random.Generator) -> Shape:
    """A whole sacrum: the S1 body ``s1`` (``BODY``) plus a parametric sacral mass (``POSTERIOR``) below it, label 26.

    The mass is a body tapering and curving posteriorly over four more segments, with rudimentary discs between the
    segments (``SACRAL_DISC``; each visible or fused at random, S1/S2 most often visible), a sacral canal behind it
    (``SACRAL_CANAL``) closed by a dorsal wall, and the alae either side of S1 and S2 reaching the sacro-iliac
    joints. Only the S1 body is body tissue, as in the bodies-only MRI labels, so the S1 centroid stays on its body.
    """
    h = s1.z_up - s1.z_low
    d, w = s1.depth_mm, s1.width_mm
    length = rng.uniform(80.0, 105.0) * w / 50.0
    bend = np.deg2rad(rng.uniform(50.0, 85.0))
    ala = rng.uniform(35.0, 48.0) * w / 50.0
    canal = rng.uniform(4.0, 7.0)  # canal radius at S1, mm
    # Grid just big enough: below S1 by the sacral length, behind it by the bend and the canal, beside it by the alae.
    before = np.ceil(np.array([length + 5.0, 5.0, ala + 5.0]))
    after = np.ceil(np.array([5.0, length * np.sin(bend) + 4 * canal + 12.0, ala + 5.0]))
    grid_shape = (np.asarray(s1.mask.shape) + before + after).astype(int)
    origin = s1.centre + before  # index of the body centroid in the grid
    out = np.zeros(tuple(int(v) for v in grid_shape), np.uint8)
    zz, yy, xx = np.meshgrid(*(np.arange(n) - o for n, o in zip(grid_shape, origin)), indexing="ij", sparse=True)
    alae = (((zz - (s1.z_low - 8.0)) / (0.55 * h + 14.0)) ** 2 + ((yy - 0.3 * d) / (0.42 * d)) ** 2
            + (xx / (w / 2 + ala)) ** 2) <= 1.0
    out[alae & (zz <= s1.z_up - 4.0)] = POSTERIOR
    # Cross-sections perpendicular to a curve that starts under S1 and bends posteriorly: the sacral body (ellipse),
    # the canal behind it and the dorsal wall behind the canal.
    ts = np.arange(0.0, length, 1.0)
    t = ts / length
    angle = bend * t**1.3
    direction = np.stack([-np.cos(angle), np.sin(angle), np.zeros_like(angle)], axis=1)
    normal = np.stack([np.sin(angle), np.cos(angle), np.zeros_like(angle)], axis=1)  # in the sagittal plane
    path = np.array([s1.z_low + 2.0, 0.1 * d, 0.0]) + np.cumsum(direction, axis=0)
    u, v = np.meshgrid(np.arange(-1.0, 1.0, 0.02), np.arange(-1.0, 1.0, 0.02), indexing="ij")
    disk = (u**2 + v**2) <= 1.0
    u, v = u[disk], v[disk]
    disk, inner = np.ones(u.shape, bool), (u**2 + v**2) <= 0.8
    visible = [rng.random() < 0.8] + [rng.random() < 0.5 for _ in _SACRAL_DISC_AT]
    disc_at = np.array([1.0 / length, *_SACRAL_DISC_AT])  # S1/S2 right under the S1 body
    half_disc = rng.uniform(0.8, 1.6) / length
    for tk, p, n in zip(t, path, normal):
        half_w, half_t = (w / 2) * (1.0 - 0.75 * tk), (0.55 * d) * (1.0 - 0.6 * tk)
        rc = canal * (1.0 - 0.6 * tk)
        parts = [(POSTERIOR, disk, half_w, half_t, 0.0)]
        if np.any(visible & (np.abs(disc_at - tk) <= half_disc)):
            parts.append((SACRAL_DISC, inner, half_w, half_t, 0.0))
        if tk < 0.8:
            parts += [(SACRAL_CANAL, disk, 1.3 * rc, rc, half_t + rc + 1.0),
                      (POSTERIOR, disk, 0.25 * w * (1.0 - 0.5 * tk), 2.5, half_t + 2 * rc + 3.5)]
        for value, sel, a, b, offset in parts:
            pts = p + np.outer(v[sel] * b + offset, n) + np.outer(u[sel] * a, [0.0, 0.0, 1.0])
            index = np.round(pts + origin).astype(int)
            index = index[((index >= 0) & (index < grid_shape)).all(axis=1)]
            out[tuple(index.T)] = value
    closed = ndimage.binary_closing(out > 0, iterations=1)
    out[closed & (out == 0)] = POSTERIOR
    zo, yo, xo = (int(v) for v in np.floor(origin - s1.centre))
    window = out[zo : zo + s1.mask.shape[0], yo : yo + s1.mask.shape[1], xo : xo + s1.mask.shape[2]]
    window[s1.mask > 0] = BODY
    cropped, lo = _crop_to_nonzero(out, margin=1)
    centre = origin - lo
    return Shape(S1_LABEL, cropped, centre, s1.z_low, s1.z_up, d, w, s1.source + "+sacral mass")


def _rescaled(shape: Shape, factors: tuple[float, float, float], label: int, note: str) -> Shape:
    """``shape`` scaled by (z, y, x) ``factors`` about its centre (nearest neighbour), relabelled."""
    f = np.asarray(factors, float)
    out_shape = tuple(int(np.ceil(n * k)) + 1 for n, k in zip(shape.mask.shape, f))
    # the scales as a matrix: SciPy before 1.17 warns of a vector (same voxels: 200 random masks, SciPy 1.15 and 1.17)
    mask = ndimage.affine_transform(shape.mask, np.diag(1.0 / f), 0.0, output_shape=out_shape, order=0)
    return Shape(label, mask, shape.centre * f, shape.z_low * f[0], shape.z_up * f[0], shape.depth_mm * f[1],
                 shape.width_mm * f[2], f"{shape.source}>{note}")


def size_ratio(target: int, donor: int) -> tuple[float, float, float]:
    """(z, y, x) factors that take a typical ``donor`` body to a typical ``target`` body (VerSe labels)."""
    t, d = TYPICAL_BODY_MM[target], TYPICAL_BODY_MM[donor]
    return (t[0] / d[0], t[1] / d[1], t[2] / d[2])


def _fill_missing(library: ShapeLibrary) -> None:
    """Give every level C1..L5 shapes: the nearest available levels' shapes, rescaled to the missing level."""
    order = [lv for lv in _MAIN_LABELS if lv != S1_LABEL]
    have = [lv for lv in order if library.vertebrae.get(lv)]
    if not have:
        raise ValueError("no whole vertebra found: cannot build a shape library")
    for target in order:
        if library.vertebrae.get(target):
            continue
        dist = {lv: abs(level_index(lv) - level_index(target)) for lv in have}
        nearest = [lv for lv in have if dist[lv] == min(dist.values())]
        library.vertebrae[target] = [
            _rescaled(s, size_ratio(target, lv), target, f"{BY_LABEL[target].name}") for lv in nearest
            for s in library.vertebrae[lv]
        ]
        log.info("shape library: %s filled from %s", BY_LABEL[target].name,
                 ", ".join(BY_LABEL[lv].name for lv in nearest))


def _default_disc() -> Shape:
    """A lens-shaped disc sized like an L4 body, for libraries built without disc masks."""
    l4 = TYPICAL_BODY_MM[BY_NAME["L4"].label]
    h, d, w = 10.0, l4[1], l4[2]
    zz, yy, xx = np.meshgrid(*(np.arange(int(n) + 3) - (n + 2) / 2 for n in (h, d, w)), indexing="ij", sparse=True)
    r2 = (yy / (d / 2)) ** 2 + (xx / (w / 2)) ** 2
    mask = ((r2 <= 1.0) & (np.abs(zz) <= (h / 2) * (1.0 - 0.4 * r2))).astype(np.uint8)
    centre, z_low, z_up, depth, width = _body_measures(mask)
    return Shape(0, mask, centre, z_low, z_up, depth, width, "parametric disc")


def _height_ratio(shape: Shape) -> float:
    """Central body height of a vertebra over its level's typical height (:data:`TYPICAL_BODY_MM`)."""
    return (shape.z_up - shape.z_low) / TYPICAL_BODY_MM[shape.label][0]


def _spine_height_ratio(shapes: list[Shape]) -> float | None:
    """Median :func:`_height_ratio` of the thoracic and lumbar vertebrae of one scan (None for fewer than three):
    how tall this spine's bodies are against the typical table. Cervical ones are left out: the masks' C3-C7 bodies
    measure up to 1.54 times the table, more than their thoracic ones, and made a normal T4 look short (sub-gl017's
    T4 was 0.87 of its median over C3-T4)."""
    ratios = [_height_ratio(s) for s in shapes if BY_LABEL[s.label].region in ("thoracic", "lumbar")]
    return float(np.median(ratios)) if len(ratios) >= 3 else None


def _plausible(shape: Shape, spine_ratio: float | None = None) -> bool:
    """Whether a vertebra's body can stand for its level: not collapsed and not of another region's size.

    Collapsed: height below 0.6 of the level's typical body (:data:`TYPICAL_BODY_MM`), or, given ``spine_ratio``
    (:func:`_spine_height_ratio` of its scan), below 0.88 of the height the rest of its own spine gives it: a body
    that much shorter than its neighbours is wedged or compressed (a Genant grade 1 fracture is 20-25 % short), and
    synthesis draws fractures at their own rate. Another region's size: an extent beyond 1.9 times typical. C1 (no
    body) and C2 (the dens) are not measured. On ``../shared/data`` the first rule turns down the fractured L1 of
    sub-verse004 (10 mm tall, 0.40; it was 1 of the 3 L1 shapes) and the TPTBox MRI crop's 'C6', lumbar-sized
    (1.92-2.25 times a C6). The second turns down sub-verse004's T9 and T10 (0.81 and 0.86 of its spine, which is
    1.00 typical: 17 and 19 mm against 23-24 mm at T11-T12), which were the only T8-T10 shapes and left those levels'
    synthetic bodies 16-19 mm tall against 22-24 mm at T6-T7 and T11-T12, and sub-verse010's L1 (18 mm, 0.71 of its
    spine); every other vertebra lies within 0.89-1.09 of its spine."""
    if shape.label in (BY_NAME["C1"].label, BY_NAME["C2"].label):
        return True
    typical = TYPICAL_BODY_MM[shape.label]
    ratios = np.array([shape.z_up - shape.z_low, shape.depth_mm, shape.width_mm]) / np.array(typical)
    if ratios[0] >= 0.6 and ratios.max() <= 1.9 and (spine_ratio is None or ratios[0] >= 0.88 * spine_ratio):
        return True
    log.info("%s: body %.0f x %.0f x %.0f mm is no typical %s; not a shape", shape.source, shape.z_up - shape.z_low,
             shape.depth_mm, shape.width_mm, BY_LABEL[shape.label].name)
    return False


def _source_files(data_dir: Path) -> dict[str, list[Path]]:
    return {
        "whole": sorted(data_dir.glob("masks_verse/*_seg-vert_msk.nii.gz"))
        + sorted(data_dir.glob("ct_verse/*_seg-vert_msk.nii.gz"))
        + sorted(data_dir.glob("crops_tptbox/*_seg-vert_*msk.nii.gz")),
        "bodies": sorted(data_dir.glob("mri_lumbar_bodies/*_vert-verse.nii.gz")),
        "discs": sorted(data_dir.glob("discs_mri/*_instance.nii.gz")),
    }


def _build(files: dict[str, list[Path]], cancel: Callable[[], bool] | None, bar: tqdm) -> ShapeLibrary:
    """The library of ``files`` (``_source_files``); ``cancel`` is polled and ``bar`` advanced before each file."""

    def each(paths: list[Path]):
        for path in paths:
            if cancel is not None and cancel():
                raise Cancelled()
            bar.update()
            yield path

    library = ShapeLibrary()
    c1_offsets = []
    c1_label, c2_label = BY_NAME["C1"].label, BY_NAME["C2"].label
    for path in each(files["whole"]):
        shapes, frames = canonical_vertebrae(sitk.ReadImage(str(path)), path.name)
        spine_ratio = _spine_height_ratio(shapes)
        for shape in shapes:
            if _plausible(shape, spine_ratio):
                library.vertebrae.setdefault(shape.label, []).append(shape)
        if c1_label in frames and c2_label in frames:
            (c1, _), (c2, rot2) = frames[c1_label], frames[c2_label]
            c1_offsets.append(rot2.T @ (c1 - c2))
        log.info("%s: %d vertebrae", path.name, len(shapes))
    library.c1_offsets = np.asarray(c1_offsets, float).reshape(-1, 3)
    _fill_missing(library)
    rng = np.random.default_rng(26)
    for path in each(files["bodies"]):
        image = sitk.ReadImage(str(path))
        labels = sitk.GetArrayFromImage(image)
        a, b = _index_to_world(image)
        present = sorted((int(v) for v in np.unique(labels) if int(v) in BY_LABEL), key=level_index)
        centroids = {v: np.argwhere(labels == v).mean(axis=0) @ a.T + b for v in present}
        upward = {}  # a point cranial of each body: the next body up, or mirrored from the next body down
        for i, v in enumerate(present):
            if i > 0:
                upward[v] = centroids[present[i - 1]]
            elif len(present) > 1:
                upward[v] = 2 * centroids[v] - centroids[present[1]]
        lumbar = [v for v in present if v != S1_LABEL]
        for part in _aligned_parts(image, lumbar, path.name, upward=upward, labelled=True, max_tilt_deg=35.0):
            library.bodies.setdefault(part.label, []).append(part)
        if S1_LABEL in present:  # S1 sits at the lumbo-sacral angle: its thin axis may lean far from L5
            for part in _aligned_parts(image, [S1_LABEL], path.name, upward=upward, labelled=True):
                library.vertebrae.setdefault(S1_LABEL, []).append(_with_sacral_mass(part, rng))
    if not library.vertebrae.get(S1_LABEL):
        l5_label = BY_NAME["L5"].label
        body = _rescaled(library.vertebrae[l5_label][0], size_ratio(S1_LABEL, l5_label), S1_LABEL, "S1 body")
        body.mask = (body.mask == BODY).astype(np.uint8) * BODY
        library.vertebrae[S1_LABEL] = [_with_sacral_mass(body, rng)]
        log.info("shape library: no S1 body masks; sacrum built on a rescaled L5 body")
    for path in each(files["discs"]):
        image = sitk.ReadImage(str(path))
        values = [int(v) for v in np.unique(sitk.GetArrayFromImage(image)) if v > 0]
        library.discs.extend(_aligned_parts(image, values, path.name))
    if not library.discs:
        library.discs.append(_default_disc())
    return library


def build_shape_library(data_dir: Path, cache_dir: Path | None = None, cancel: Callable[[], bool] | None = None,
                        bar_disable: bool | None = True) -> ShapeLibrary:
    """Build (or load from cache) the shape library from the development data: about a minute on two CPU cores for
    ``../shared/data``, then a second from the cache.

    Args:
        data_dir: the ``../shared/data`` folder (or any folder laid out like it: ``masks_verse/*_seg-vert_msk``,
            ``ct_verse/*_seg-vert_msk``, ``crops_tptbox/*_seg-vert_*msk``, ``mri_lumbar_bodies/*_vert-verse``,
            ``discs_mri/*_instance`` NIfTI files; only whole-vertebra masks are required).
        cache_dir: where the ``.npz`` cache goes; default ``$SPINELABEL_CACHE`` or ``~/.cache/spinelabel``. The
            cache key covers the file names, sizes and modification times and the library version.
        cancel: polled before each file of a build; True raises ``Cancelled``.
        bar_disable: tqdm's ``disable`` for a progress bar of the build (None: drawn where stderr is a terminal).

    Returns:
        A library holding every level C1..L5 and S1 (sacrum) and at least one disc.

    Raises:
        ValueError: ``data_dir`` is no folder or holds no whole-vertebra mask.
        Cancelled: ``cancel`` returned True.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir}: no such folder of labelled vertebrae")
    files = _source_files(data_dir)
    if not files["whole"]:
        raise ValueError(f"{data_dir}: no whole-vertebra masks in its subfolders masks_verse/, ct_verse/ or "
                         "crops_tptbox/ (give the folder that holds them, such as ../shared/data)")
    digest = hashlib.sha1(str(_CACHE_VERSION).encode())
    for group in files.values():
        for path in group:
            stat = path.stat()
            digest.update(f"{path.relative_to(data_dir)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    if cache_dir is None:
        cache_dir = Path(os.environ.get("SPINELABEL_CACHE", Path.home() / ".cache" / "spinelabel"))
    cache = Path(cache_dir) / f"shape_library_{digest.hexdigest()[:16]}.npz"
    if cache.exists():
        try:
            library = ShapeLibrary.load(cache)
            log.info("shape library loaded from %s: %s", cache, library.summary())
            return library
        except (OSError, ValueError, KeyError) as err:
            log.warning("shape library cache %s unreadable (%s); rebuilding", cache, err)
    with tqdm(total=sum(map(len, files.values())), desc="building the shape library", leave=False,
              disable=bar_disable) as bar:
        library = _build(files, cancel, bar)
    library.save(cache)
    log.info("shape library built from %s, cached at %s: %s", data_dir, cache, library.summary())
    return library
