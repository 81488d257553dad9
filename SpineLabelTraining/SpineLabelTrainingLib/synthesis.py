"""Synthetic whole-spine training cases: real vertebra shapes assembled into a whole spine, images synthesised from
the label map with randomised contrast, resolution, bias, noise and field of view.

Method (after SynthSeg, Billot et al., Medical Image Analysis 2023: a network trained only on images synthesised
from label maps with fully randomised appearance learns shape and context rather than one scanner's contrast):

1. Anatomy. A subject is a level sequence C1..L5 + sacrum with rare numbering variants (13th thoracic T13 ~3%, sixth
   lumbar L6 ~4%, 11 thoracic ~2%, sacralised L5 ~3%). Each level gets a real shape from the
   :class:`~SpineLabelTrainingLib.shapes.ShapeLibrary` (sometimes a neighbouring level's shape, rescaled), a subject
   scale and per-vertebra jitter. Bodies are stacked along the arc of a spine curve with randomised cervical
   lordosis, thoracic kyphosis, lumbar lordosis, sacral slope and scoliosis, separated by discs of level-appropriate
   random height (real disc shapes fitted to the neighbouring endplates, with a nucleus). Ribs hang from T1-T12
   (and T13), a canal holds CSF and cord, and the body around it gets skin, fat, muscle (paraspinal, psoas), lungs
   with a diaphragm dome, heart, liver, kidneys, aorta, bowel blobs with gas, and iliac wings.
2. Field of view. Only a crop of ``size_zyx`` voxels is rasterised, on an LPS-aligned grid (z, y, x) =
   (inferior->superior, anterior->posterior, right->left), placed on a random part of the spine (extra weight on the
   sacrum, C1/C2 and the thoraco-lumbar junction), sometimes partly outside the body; 15 % of crops keep only a
   slab of it (a narrow scan: image at its minimum and targets ``IGNORE`` outside).
3. Appearance. Every tissue class gets a random intensity with a random texture (white plus smoothed noise):
   CT-like (HU, with a bone density from osteoporotic to dense drawn per case), MR-like (T1, T2, STIR, Dixon
   water, Dixon fat) presets with jitter, or fully random (SynthSeg); vertebrae and discs vary one by one (marrow,
   disc degeneration). Then partial-volume blur, thick slices along a random axis (blur, subsample,
   re-interpolate), a smooth multiplicative bias field, correlated Gaussian (CT) or Rician (MR) noise and a random
   gamma (MR).

Everything is drawn from the ``numpy.random.Generator`` given, so a seed gives the same case.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from SpineLabelLib.sequence import PRIORS
from SpineLabelLib.vertebrae import BODY, BY_LABEL, BY_NAME, DISC, LEVELS, POSTERIOR, TISSUE_NAMES, level_index
from SpineLabelTrainingLib.shapes import S1_LABEL, SACRAL_CANAL, SACRAL_DISC, Shape, ShapeLibrary, frame, size_ratio

__all__ = [
    "TISSUE_NAMES",
    "IGNORE",
    "MODALITIES",
    "TrainingCase",
    "synthesize_case",
]

log = logging.getLogger(__name__)

IGNORE = 255  # tissue/level target: unknown, no loss
MODALITIES = ("ct", "t1", "t2", "stir", "water", "fat", "random")
_MODALITY_P = (0.45, 0.12, 0.15, 0.05, 0.04, 0.04, 0.15)


@dataclass
class TrainingCase:
    """One synthetic training crop on an LPS-aligned isotropic grid.

    Attributes:
        image: float32 (z, y, x), raw synthetic intensities (HU-like for CT, arbitrary units for MR).
        tissue: uint8 (z, y, x): 0 background, 1 vertebral body, 2 posterior elements, 3 disc (see TISSUE_NAMES);
            ``IGNORE`` outside the scanned slab of a limited-field-of-view case (15 %).
        levels: uint8 (z, y, x): VerSe label of the vertebra each body/posterior voxel belongs to, 0 elsewhere.
        spacing_mm: isotropic voxel size of the arrays.
        modality: the appearance preset it was drawn with (one of :data:`MODALITIES`).
    """

    image: np.ndarray
    tissue: np.ndarray
    levels: np.ndarray
    spacing_mm: float
    modality: str


# Image classes of the synthetic label map (never returned; they drive the appearance).
(AIR, FAT, MUSCLE, SKIN, LUNG, ORGAN_A, ORGAN_B, ORGAN_C, GAS, VESSEL, CSF, CORD, RIB, MARROW, POST, CORTEX, ANNULUS,
 NUCLEUS, NUCLEUS_DARK, SACRUM, OTHER_BONE, INTERIOR) = range(22)
_N_CLASSES = 22

# (mean, within-class std) per class and preset. CT in Hounsfield units, MR in arbitrary units (0..1000). The
# vertebral marrow (MARROW, POST, SACRUM) and nucleus of T1, STIR and water are set so that the disc-to-body intensity
# ratio of the synthetic images (median of the disc's centre over the median of the two bodies) spreads over the real
# one of the training scans of mri_lumbar_bodies: water-fat 'water' 1.51-3.03 (median 2.0, 14 scans), T1 0.71 (2
# scans), TIRM 1.29 (1 scan). Synthetic 5th-95th percentiles (median) were 0.87-1.62 (1.16) for water, 1.63-7.9
# (2.81) for STIR and 0.27-0.71 (0.52) for T1; they are now 1.40-3.41 (2.03), 1.19-2.75 (1.65) and 0.45-0.87 (0.66).
_PRESETS: dict[str, np.ndarray] = {
    name: np.asarray(rows, np.float32)
    for name, rows in {
        "ct": [(-1000, 10), (-100, 15), (50, 10), (40, 10), (-850, 40), (60, 10), (35, 10), (20, 20), (-950, 30),
               (45, 10), (8, 5), (35, 5), (500, 150), (220, 50), (350, 80), (900, 150), (90, 10), (75, 10), (100, 15),
               (250, 60), (400, 100), (30, 15)],
        "t1": [(0, 5), (850, 60), (300, 30), (400, 40), (20, 10), (400, 40), (350, 40), (250, 60), (10, 5), (100, 50),
               (120, 20), (380, 30), (450, 100), (460, 80), (420, 80), (40, 20), (250, 30), (320, 30), (230, 30),
               (475, 80), (550, 80), (350, 50)],
        "t2": [(0, 5), (700, 60), (180, 25), (300, 40), (15, 10), (250, 40), (450, 50), (500, 100), (10, 5), (60, 40),
               (950, 50), (420, 40), (350, 80), (420, 60), (380, 60), (30, 15), (150, 30), (750, 80), (250, 40),
               (430, 60), (400, 60), (300, 60)],
        "stir": [(0, 5), (60, 20), (200, 25), (250, 30), (15, 10), (300, 40), (500, 60), (450, 100), (10, 5),
                 (80, 40), (900, 60), (450, 40), (120, 40), (190, 40), (170, 40), (20, 10), (200, 30), (500, 80),
                 (250, 40), (180, 40), (130, 40), (300, 60)],
        "water": [(0, 5), (40, 15), (350, 30), (300, 30), (10, 5), (450, 40), (400, 40), (300, 60), (5, 5),
                  (200, 80), (300, 40), (350, 30), (200, 60), (130, 50), (130, 50), (20, 10), (250, 30), (350, 40),
                  (250, 30), (130, 50), (220, 60), (350, 50)],
        "fat": [(0, 5), (900, 50), (60, 20), (200, 40), (5, 5), (80, 20), (50, 20), (100, 40), (5, 5), (20, 10),
                (20, 10), (30, 10), (400, 100), (500, 100), (480, 100), (20, 10), (30, 10), (20, 10), (30, 10),
                (550, 100), (500, 100), (120, 40)],
    }.items()
}

_BONE_CLASSES = (MARROW, POST, SACRUM)

# Sagittal tangent angle of the spine at each level (degrees; positive = leaning posteriorly going up), a typical
# standing adult profile: sacral slope ~40 deg, lumbar lordosis ~50 deg, thoracic kyphosis ~35 deg, cervical
# lordosis ~30 deg. The tables are written by level name and keyed by VerSe label.
_SAGITTAL_DEG = {BY_NAME[name].label: deg for name, deg in {
    "C1": 14, "C2": 10, "C3": 4, "C4": -2, "C5": -8, "C6": -14, "C7": -20, "T1": -20, "T2": -18, "T3": -16, "T4": -12,
    "T5": -8, "T6": -4, "T7": 0, "T8": 5, "T9": 8, "T10": 10, "T11": 13, "T12": 14, "T13": 14, "L1": 12, "L2": 8,
    "L3": 0, "L4": -12, "L5": -25, "L6": -30, "S1": -40}.items()}
# Disc height (mm) below each level (the disc between it and the next caudal vertebra). C2-C7: the mean gap between
# the body masks' endplates (centroid distance less the two half-heights that Shape.z_up/z_low measure) on the two
# whole cervical spines the cervical shapes come from (sub-gl003, sub-gl017: 1.2-3.6 mm), not the 4.5-5.5 mm of
# anatomy: those masks' bodies take up the rest, and anatomical discs on them stretched the synthetic neck (C2-C7
# centroid spacings 2-3 mm longer than on the masks).
_DISC_MM = {BY_NAME[name].label: mm for name, mm in {
    "C2": 2.0, "C3": 1.5, "C4": 2.5, "C5": 2.5, "C6": 3.5, "C7": 3.0, "T1": 4.0, "T2": 4.0, "T3": 4.0, "T4": 4.5,
    "T5": 4.5, "T6": 5.0, "T7": 5.0, "T8": 5.5, "T9": 5.5, "T10": 6.0, "T11": 6.5, "T12": 7.5, "T13": 8.0, "L1": 9.0,
    "L2": 10.0, "L3": 11.0, "L4": 11.5, "L5": 10.5, "L6": 10.5}.items()}
# Thorax half-width (mm) at each rib and the angle (deg) around the thorax where the bony rib ends.
_RIB = {BY_NAME[name].label: rib for name, rib in {
    "T1": (55, 150), "T2": (75, 155), "T3": (90, 160), "T4": (100, 160), "T5": (108, 160), "T6": (115, 160),
    "T7": (120, 155), "T8": (125, 150), "T9": (128, 140), "T10": (130, 130), "T11": (130, 100), "T12": (128, 65),
    "T13": (125, 45)}.items()}
# Body outline along the spine: (level name, half-width, half-depth, distance from body centre to the posterior
# skin), mm.
_OUTLINE = (("C1", 75, 90, 90), ("C3", 60, 62, 80), ("C6", 65, 66, 85), ("T1", 120, 85, 95), ("T3", 150, 100, 90),
            ("T6", 150, 110, 85), ("T11", 145, 112, 95), ("L3", 140, 118, 115), ("S1", 165, 115, 120))


@dataclass
class _Placed:
    """A shape placed in the world: local (z, y, x) mm -> world = centre + rot @ (scale * local).

    ``scale`` (and ``body_scale``): float64 (3,) size factors along local z, y, x; ``centre``: float64 (3,) world
    (z, y, x) mm; ``rot``: float64 (3, 3), columns the local axes in world coordinates (may hold a mirror).
    """

    label: int
    shape: Shape
    scale: np.ndarray
    centre: np.ndarray
    rot: np.ndarray
    s: float = 0.0  # arc position of the centre
    body: Shape | None = None  # a real body from another scan replacing the shape's own body
    body_scale: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------------------------
# Small geometry helpers
# ----------------------------------------------------------------------------------------------------------------


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix, float64 (3, 3) (Rodrigues), about a unit ``axis`` given in (z, y, x) coordinates, ``angle``
    in radians."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


class _Canvas:
    """The crop being drawn: class map, tissue and level targets, and its world geometry (origin = world position
    of voxel 0, (z, y, x) mm)."""

    def __init__(self, shape: tuple[int, int, int], origin: np.ndarray, spacing: float):
        """An empty crop of ``shape`` (z, y, x) voxels, voxel 0 at world ``origin`` (float (3,), (z, y, x) mm),
        isotropic ``spacing`` mm: uint8 (z, y, x) ``cls``, ``tissue`` and ``levels`` of zeros, and ``axes``, the
        world coordinates (mm; float64 for a float64 ``origin``) of the voxel centres along z, y and x."""
        self.shape = shape
        self.origin = origin
        self.spacing = spacing
        self.cls = np.zeros(shape, np.uint8)
        self.tissue = np.zeros(shape, np.uint8)
        self.levels = np.zeros(shape, np.uint8)
        self.axes = [origin[i] + spacing * np.arange(shape[i], dtype=np.float32) for i in range(3)]

    def box(self, lo_w: np.ndarray, hi_w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Voxel index range [lo, hi) covering world box [lo_w, hi_w], clipped; None when outside the crop.
        ``lo_w``, ``hi_w``: float (3,) world (z, y, x) mm; ``lo``, ``hi``: int64 (3,) voxel indices (z, y, x)."""
        lo = np.maximum(np.floor((lo_w - self.origin) / self.spacing).astype(int), 0)
        hi = np.minimum(np.ceil((hi_w - self.origin) / self.spacing).astype(int) + 1, self.shape)
        return None if (hi <= lo).any() else (lo, hi)

    def rasterise(self, mask: np.ndarray, centre_idx: np.ndarray, placed: _Placed, scale: np.ndarray | None = None):
        """Resample a 1 mm canonical mask (uint8 (z, y, x)) into the crop (nearest neighbour).

        ``centre_idx``: float (3,) voxel index (z, y, x) in ``mask`` of the point placed at ``placed.centre``
        (``Shape.centre``); ``scale``: float64 (3,) (z, y, x) size factors, ``placed.scale`` when None.

        Returns ((slices), uint8 sub-array of mask values) or None when the shape misses the crop.
        """
        scale = placed.scale if scale is None else scale
        n = np.asarray(mask.shape, float)
        corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])]) - centre_idx
        world = placed.centre + (corners * scale) @ placed.rot.T
        box = self.box(world.min(axis=0), world.max(axis=0))
        if box is None:
            return None
        lo, hi = box
        # world offset -> local index offset (rot may hold a mirror: still orthogonal)
        inv = placed.rot.T / scale[:, None]
        offset = centre_idx + inv @ (self.origin + lo * self.spacing - placed.centre)
        sub = ndimage.affine_transform(mask, inv * self.spacing, offset, output_shape=tuple(hi - lo), order=0)
        return tuple(slice(a, b) for a, b in zip(lo, hi)), sub

    def ellipsoid(self, value: int, centre: np.ndarray, radii: np.ndarray, inner: float = 0.0,
                  keep=None) -> None:
        """Set class ``value`` inside an axis-aligned ellipsoid, ``centre`` and semi-axes ``radii`` float (3,) world
        (z, y, x) mm, outside ``inner`` (a fraction) of its size; ``keep(zz, yy, xx)`` (float world offsets in mm from
        the centre, shaped (nz, 1, 1), (1, ny, 1), (1, 1, nx)) may restrict it further with a bool mask."""
        box = self.box(centre - radii, centre + radii)
        if box is None:
            return
        lo, hi = box
        zz, yy, xx = (self.axes[i][lo[i] : hi[i]] - centre[i] for i in range(3))
        r2 = ((zz[:, None, None] / radii[0]) ** 2 + (yy[None, :, None] / radii[1]) ** 2
              + (xx[None, None, :] / radii[2]) ** 2)
        m = (r2 <= 1.0) & (r2 >= inner**2)
        if keep is not None:
            m &= keep(zz[:, None, None], yy[None, :, None], xx[None, None, :])
        self.cls[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][m] = value

    def tube(self, value: int, points: np.ndarray, radius_mm: float) -> None:
        """Set class ``value`` within ``radius_mm`` of world points float (N, 3), (z, y, x) mm, sampled densely along
        a curve."""
        r = radius_mm / self.spacing
        idx = (points - self.origin) / self.spacing
        near = ((idx > -r - 1) & (idx < np.asarray(self.shape) + r + 1)).all(axis=1)
        if not near.any():
            return
        idx = np.unique(np.round(idx[near]).astype(np.int32), axis=0)
        k = int(np.ceil(r))
        g = np.arange(-k, k + 1)
        off = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
        off = off[(off**2).sum(axis=1) <= r * r]
        vox = (idx[:, None, :] + off[None, :, :]).reshape(-1, 3)
        vox = vox[((vox >= 0) & (vox < np.asarray(self.shape))).all(axis=1)]
        self.cls[vox[:, 0], vox[:, 1], vox[:, 2]] = value


# ----------------------------------------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------------------------------------


_ELEVEN_THORACIC = 0.02  # share of subjects with 11 thoracic vertebrae
_SACRALISED_L5 = 0.03  # share with L5 fused to the sacrum


def _level_sequence(rng: np.random.Generator) -> tuple[list[int], bool]:
    """VerSe labels from caudal (sacrum) to cranial (C1), with the numbering variants; and whether L5 is
    sacralised. T13 and L6 come at the population rates of the sequence model (``sequence.PRIORS``)."""
    cervical, thoracic, lumbar = ([lv.label for lv in LEVELS if lv.region == region and not lv.transitional]
                                  for region in ("cervical", "thoracic", "lumbar"))  # C1-C7, T1-T12, L1-L5
    variant = rng.random()
    if variant < _ELEVEN_THORACIC:
        thoracic = thoracic[:-1]
    elif variant < _ELEVEN_THORACIC + PRIORS.t13:
        thoracic.append(BY_NAME["T13"].label)
    if rng.random() < PRIORS.l6:
        lumbar.append(BY_NAME["L6"].label)
    cranial_to_caudal = cervical + thoracic + lumbar + [S1_LABEL]
    return cranial_to_caudal[::-1], bool(rng.random() < _SACRALISED_L5)


# the transitional levels take their shapes from the level they stand in for: T13 from T12, L6 from L5
_SHAPE_DONOR = {BY_NAME["T13"].label: BY_NAME["T12"].label, BY_NAME["L6"].label: BY_NAME["L5"].label}
# levels that keep their own shapes, neither borrowing a neighbour's nor lending theirs
_OWN_SHAPE_ONLY = (BY_NAME["C1"].label, BY_NAME["C2"].label, S1_LABEL)


def _pick_shape(rng: np.random.Generator, library: ShapeLibrary, label: int) -> tuple[Shape, np.ndarray]:
    """A library shape for ``label`` and the float64 (3,) (z, y, x) factors that bring it to that level's typical
    size."""
    donor = _SHAPE_DONOR.get(label, label)
    if donor == label and label not in _OWN_SHAPE_ONLY and rng.random() < 0.25:
        region = BY_LABEL[label].region
        i = level_index(label)
        neighbours = [n.label for n in (LEVELS[i - 1], LEVELS[i + 1])  # cranial, caudal
                      if not n.transitional and n.label not in _OWN_SHAPE_ONLY and n.region == region
                      and library.vertebrae.get(n.label)]
        if neighbours:
            donor = neighbours[int(rng.integers(len(neighbours)))]
    shapes = library.shapes_for(donor)
    return shapes[int(rng.integers(len(shapes)))], np.asarray(size_ratio(label, donor))


def _spine_curve(rng: np.random.Generator, s_levels: np.ndarray, labels: list[int], s_grid: np.ndarray):
    """Tangents float64 (N, 3), unit vectors in (z, y, x) = (S, P, L) order, along the arc ``s_grid`` (float (N,)
    mm): randomised sagittal profile through the level positions ``s_levels`` (float (n,) arc mm of ``labels``, same
    order) plus a sinusoidal scoliosis. Also returns the coronal angle float64 (N,) (radians) along the arc."""
    base = np.array([_SAGITTAL_DEG[lv] for lv in labels], float)
    # gain groups: cervical, thoracic, and lumbar with the sacrum
    region = np.array([{"cervical": 0, "thoracic": 1}.get(BY_LABEL[lv].region, 2) for lv in labels])
    gains = rng.uniform([0.3, 0.5, 0.5], [1.6, 1.5, 1.4])
    # Deviations from each region's mean angle are scaled by the region's gain (flatter or deeper curves). Gain and
    # mean change linearly from the middle of one region to the middle of the next: set per region, they bent the
    # spine at the last thoracic level of one spine in four (over 10 degrees between two vertebrae, against 1-2 % at
    # the joints beside it), a numbering cue that real spines do not give.
    order = np.arange(len(labels), dtype=float)
    middles = np.array([order[region == r].mean() for r in range(3)])
    by_place = np.argsort(middles)  # labels run caudal to cranial
    means = np.array([base[region == r].mean() for r in range(3)])
    mean = np.interp(order, middles[by_place], means[by_place])
    sag = mean + np.interp(order, middles[by_place], gains[by_place]) * (base - mean)
    sag += rng.normal(0.0, 2.0, sag.shape) + rng.normal(0.0, 5.0)
    phi = np.deg2rad(np.interp(s_grid, s_levels, sag))
    amplitude = rng.uniform(8.0, 25.0) if rng.random() < 0.15 else abs(rng.normal(0.0, 2.5))
    period = rng.uniform(250.0, 500.0)
    coronal = np.deg2rad(amplitude) * np.sin(2 * np.pi * s_grid / period + rng.uniform(0, 2 * np.pi))
    t = np.stack([np.cos(phi) * np.cos(coronal), np.sin(phi) * np.cos(coronal), np.sin(coronal)], axis=1)
    return t / np.linalg.norm(t, axis=1, keepdims=True), coronal


class _Subject:
    """A whole spine: placed vertebrae, discs (with nuclei) and the curve, in world mm (S at z=0 is S1).

    The curve: ``s_grid`` float64 (N,) arc positions (mm, 1 mm apart); ``points`` float64 (N, 3) world (z, y, x) mm
    and ``tangents`` float64 (N, 3) unit vectors at them; ``posterior`` float64 (N, 3) unit vectors, the world
    posterior direction made orthogonal to the tangent.
    """

    def __init__(self, rng: np.random.Generator, library: ShapeLibrary):
        labels, sacralised = _level_sequence(rng)
        self.labels = labels
        scale = rng.uniform(0.88, 1.12)
        self.scale = scale
        disc_gain = rng.uniform(0.75, 1.25)
        picks = [_pick_shape(rng, library, lv) for lv in labels]
        scales = [f * scale * (1.0 + rng.normal(0.0, 0.04, 3)) for _, f in picks]
        # Compression fractures: lower body height, mostly thoraco-lumbar. The test compares label values, T4 (11) to
        # L6 (25), so T13 (label 28) is never fractured.
        for i, lv in enumerate(labels):
            if BY_NAME["T4"].label <= lv <= BY_NAME["L6"].label and rng.random() < 0.03:
                scales[i][0] *= rng.uniform(0.55, 0.85)
        # Arc positions, caudal to cranial; C1 sits on C2 by a measured offset instead of a disc.
        s_pos = [0.0]
        discs = []  # (label below which the disc lies, height mm, dark nucleus)
        for i in range(1, len(labels)):
            lower, upper = labels[i - 1], labels[i]
            if upper == BY_NAME["C1"].label:
                s_pos.append(s_pos[-1])
                continue
            height = _DISC_MM.get(upper, 5.0) * disc_gain * rng.uniform(0.85, 1.15)
            dark = rng.random() < (0.25 if BY_LABEL[upper].region == "lumbar" else 0.1)
            if dark:
                height *= rng.uniform(0.4, 0.8)
            if sacralised and lower == S1_LABEL:  # below 1 mm: fused to the sacrum, no disc
                height, dark = rng.uniform(0.0, 2.0), True
            else:  # the thin cervical discs (1.5 mm at C3) made thinner still were left out: the bodies touched
                height = max(height, 1.0)
            discs.append((upper, height, dark))
            s_pos.append(s_pos[-1] + picks[i - 1][0].z_up * scales[i - 1][0] + height
                         - picks[i][0].z_low * scales[i][0])
        s_levels = np.asarray(s_pos)
        self.s_grid = np.arange(-170.0, s_levels[-1] + 60.0, 1.0)
        tangents, coronal = _spine_curve(rng, s_levels, labels, self.s_grid)
        points = np.cumsum(tangents, axis=0)
        points -= points[np.searchsorted(self.s_grid, 0.0)]
        # Patient pose: small rotations about the three axes.
        pose = (_rotation([1, 0, 0], rng.normal(0, np.deg2rad(5))) @ _rotation([0, 0, 1], rng.normal(0, np.deg2rad(3)))
                @ _rotation([0, 1, 0], rng.normal(0, np.deg2rad(3))))
        self.points = points @ pose.T
        self.tangents = tangents @ pose.T
        posterior = np.array([0.0, 1.0, 0.0]) @ pose.T
        ey = posterior - (self.tangents @ posterior)[:, None] * self.tangents
        self.posterior = ey / np.linalg.norm(ey, axis=1, keepdims=True)

        def frame_at(s: float, roll: float, tilt: tuple[float, float]) -> np.ndarray:
            """float64 (3, 3) rotation of a vertebra at arc position ``s`` (mm), rolled by ``roll`` and tilted by
            ``tilt`` (radians): its columns the local axes in world coordinates, as ``shapes.frame`` gives them."""
            i = int(np.clip(np.searchsorted(self.s_grid, s), 0, len(self.s_grid) - 1))
            rot = pose @ frame(tangents[i])
            rot = rot @ _rotation([1, 0, 0], roll)  # axial rotation about the local superior axis
            return _rotation(rot[:, 2], tilt[0]) @ _rotation(rot[:, 1], tilt[1]) @ rot

        def point_at(s: float) -> np.ndarray:
            """float64 (3,) point of the curve (world mm, the axes of ``shapes.frame``) at arc position ``s`` (mm),
            interpolated linearly."""
            return np.stack([np.interp(s, self.s_grid, self.points[:, k]) for k in range(3)])

        self.vertebrae: list[_Placed] = []
        by_label: dict[int, _Placed] = {}
        for i, lv in enumerate(labels):
            shape, _ = picks[i]
            ci = int(np.clip(np.searchsorted(self.s_grid, s_pos[i]), 0, len(self.s_grid) - 1))
            roll = 0.5 * coronal[ci] + rng.normal(0, np.deg2rad(2))
            rot = frame_at(s_pos[i], roll, tuple(rng.normal(0, np.deg2rad(2), 2)))
            if rng.random() < 0.5:
                rot = rot @ np.diag([1.0, 1.0, -1.0])  # left-right mirror of the shape
            centre = point_at(s_pos[i])
            if lv == BY_NAME["C1"].label and BY_NAME["C2"].label in by_label:
                c2 = by_label[BY_NAME["C2"].label]
                if len(library.c1_offsets):
                    offset = library.c1_offsets[int(rng.integers(len(library.c1_offsets)))] * scale
                else:
                    offset = np.array([0.8 * c2.shape.z_up * c2.scale[0], 0.0, 0.0])
                centre = c2.centre + c2.rot @ offset
                rot = c2.rot @ _rotation([1, 0, 0], rng.normal(0, np.deg2rad(3)))
            placed = _Placed(lv, shape, scales[i], centre, rot, s_pos[i])
            bodies = library.bodies.get(_SHAPE_DONOR.get(lv, lv), [])
            if bodies and rng.random() < 0.5:
                body = bodies[int(rng.integers(len(bodies)))]
                placed.body = body
                placed.body_scale = scales[i] * np.array([(shape.z_up - shape.z_low) / (body.z_up - body.z_low),
                                                          shape.depth_mm / body.depth_mm,
                                                          shape.width_mm / body.width_mm])
            self.vertebrae.append(placed)
            by_label[lv] = placed
        self.by_label = by_label
        self.lowest_thoracic = min((pl for pl in self.vertebrae if pl.label in _RIB), key=lambda pl: pl.s)
        # Discs: real disc shapes fitted between neighbouring bodies.
        self.discs: list[tuple[_Placed, bool]] = []
        for upper, height, dark in discs:
            if height < 1.0:  # a sacralised L5 fused to the sacrum
                continue
            up = by_label[upper]
            low = self.vertebrae[self.vertebrae.index(up) - 1]
            s_mid = low.s + low.shape.z_up * low.scale[0] + height / 2
            shape = library.discs[int(rng.integers(len(library.discs)))]
            depth = 0.5 * (low.shape.depth_mm * low.scale[1] + up.shape.depth_mm * up.scale[1])
            width = 0.5 * (low.shape.width_mm * low.scale[2] + up.shape.width_mm * up.scale[2])
            disc_scale = np.array([(height + 2.0) / (shape.z_up - shape.z_low), 0.97 * depth / shape.depth_mm,
                                   0.97 * width / shape.width_mm])
            ci = int(np.clip(np.searchsorted(self.s_grid, s_mid), 0, len(self.s_grid) - 1))
            rot = frame_at(s_mid, 0.5 * coronal[ci], (0.0, 0.0))
            self.discs.append((_Placed(0, shape, disc_scale, point_at(s_mid), rot, s_mid), dark))

    def s_at_z(self, z: np.ndarray) -> np.ndarray:
        """Arc position (mm, float64) of the spine point at each world height ``z`` (mm, float (n,))."""
        order = np.argsort(self.points[:, 0])
        return np.interp(z, self.points[order, 0], self.s_grid[order])


def _draw_body(rng: np.random.Generator, canvas: _Canvas, subject: _Subject) -> None:
    """Skin, fat, muscle, organs, lungs, vessels and pelvis around the spine, slice by slice along z."""
    z = canvas.axes[0]
    s = subject.s_at_z(z)
    spine = np.stack([np.interp(s, subject.s_grid, subject.points[:, k]) for k in (1, 2)], axis=1)
    lv_s = {BY_LABEL[pl.label].name: pl.s for pl in subject.vertebrae}  # arc position by level name
    knots = [lv_s.get(name, lv_s["S1"]) for name, *_ in _OUTLINE]
    order = np.argsort(knots)
    knots = np.asarray(knots)[order]
    girth = rng.uniform(0.85, 1.3) * subject.scale
    dims = [np.interp(s, knots, np.asarray([row[k] for row in _OUTLINE], float)[order]) for k in (1, 2, 3)]
    half_w, half_d, post = dims[0] * girth, dims[1] * girth, dims[2] * (0.5 + 0.5 * girth)
    # The head: a skull above the atlas; the outline closes over its vault (8 mm of scalp).
    head = subject.by_label[BY_NAME["C1"].label].centre + np.array([45.0, -15.0, 0.0]) * girth
    head_radii = np.array([75.0, 85.0, 68.0]) * girth
    t = np.clip((z - head[0]) / (head_radii[0] + 8.0), 0.0, 1.0)
    vault = np.sqrt(1.0 - t**2)
    half_w, half_d = half_w * vault, half_d * vault
    fat = rng.uniform(4.0, 30.0) * girth
    yc, xc = spine[:, 0] + post - half_d, spine[:, 1] + rng.normal(0, 5)
    yy = canvas.axes[1][None, :, None] - yc[:, None, None]
    xx = canvas.axes[2][None, None, :] - xc[:, None, None]

    def inside(shrink: float) -> np.ndarray:
        """bool (z, y, x) on the canvas: inside the body outline's ellipse in each z slice (half-width ``half_w``,
        half-depth ``half_d``, float (z,) mm), shrunk by ``shrink`` mm."""
        ww, dd = np.maximum(half_w - shrink, 1e-3)[:, None, None], np.maximum(half_d - shrink, 1e-3)[:, None, None]
        return (yy / dd) ** 2 + (xx / ww) ** 2 <= 1.0

    cls = canvas.cls
    cls[inside(0.0)] = SKIN
    cls[inside(2.5)] = FAT
    cls[inside(fat)] = MUSCLE
    cls[inside(fat + rng.uniform(8.0, 15.0))] = INTERIOR
    sy, sx = spine[:, 0][:, None, None] - yc[:, None, None], spine[:, 1][:, None, None] - xc[:, None, None]
    s_t12 = subject.lowest_thoracic.s
    thoracic = (s >= s_t12 - 15) & (s <= lv_s["T1"] + 25)
    if thoracic.any():
        dome = s_t12 + 15 + 45 * (1 - np.clip(np.abs(xx - sx) / np.maximum(half_w[:, None, None], 1), 0, 1) ** 2)
        lung = inside(fat + 18.0) & (np.abs(xx - sx) > 22) & (s[:, None, None] >= dome) & thoracic[:, None, None]
        lung &= (yy < sy + 30)
        cls[lung] = LUNG
    posterior_gap = np.maximum(post - fat - 22.0, 5.0)[:, None, None]
    para = (((yy - sy - 22 - posterior_gap / 2) / (posterior_gap / 2 + 1)) ** 2
            + ((np.abs(xx - sx) - 0.17 * half_w[:, None, None]) / (0.16 * half_w[:, None, None] + 4)) ** 2) <= 1.0
    cls[para & inside(fat)] = MUSCLE
    lumbar = (s >= lv_s["S1"] - 10) & (s <= lv_s["L1"])
    if lumbar.any():
        t = np.clip((lv_s["L1"] - s) / max(lv_s["L1"] - lv_s["S1"], 1.0), 0, 1)[:, None, None]
        psoas = (((yy - sy + 5) / (6 + 16 * t)) ** 2 + ((np.abs(xx - sx) - 22 - 20 * t) / (6 + 18 * t)) ** 2 <= 1.0)
        cls[psoas & lumbar[:, None, None]] = MUSCLE

    def at(name: str, dy: float, dx: float, dz: float = 0.0) -> np.ndarray:
        """Centre of level ``name`` (else the lowest thoracic) shifted by ``dz``, ``dy``, ``dx``: (z, y, x) world mm,
        float64."""
        pl = subject.by_label.get(BY_NAME[name].label, subject.lowest_thoracic)
        return pl.centre + np.array([dz, dy, dx])

    g = girth
    if rng.random() < 0.9:
        canvas.ellipsoid(ORGAN_B, at("T7", -75 * g, 20 * g), np.array([55, 50, 60]) * g)  # heart
        canvas.ellipsoid(ORGAN_A, at("T12", -55 * g, -65 * g, 10), np.array([75, 65, 75]) * g)  # liver
        for side in (-1, 1):
            canvas.ellipsoid(ORGAN_B, at("L1", 15, side * 55 * g, -15), np.array([55, 28, 30]) * g)  # kidneys
        canvas.ellipsoid(ORGAN_C, at("S1", -80 * g, 0, -40), np.array([40, 40, 50]) * g)  # bladder
    for _ in range(int(rng.integers(3, 10))):  # bowel loops, some with gas
        level = str(rng.choice(["L1", "L2", "L3", "L4", "L5", "S1"]))
        c = at(level, -rng.uniform(50, 120) * g, rng.uniform(-90, 90) * g)
        canvas.ellipsoid(GAS if rng.random() < 0.3 else ORGAN_C, c, rng.uniform(12, 35, 3) * g)
    aorta = (subject.s_grid > lv_s["L4"]) & (subject.s_grid < lv_s["T3"])
    if aorta.any():
        canvas.tube(VESSEL, subject.points[aorta] + np.array([0, -20 * g, 14]), 11 * g)
    # Skull (base and vault) with brain.
    canvas.ellipsoid(ORGAN_A, head, head_radii, keep=lambda zz, yy_, xx_: zz > -35 * g)
    canvas.ellipsoid(OTHER_BONE, head, head_radii, inner=0.88, keep=lambda zz, yy_, xx_: zz > -35 * g)
    foramen = np.array([-45.0 * g, 15.0 * g + 16.0])  # foramen magnum above the canal, relative to the head centre
    canvas.ellipsoid(OTHER_BONE, head, head_radii,
                     keep=lambda zz, yy_, xx_: ((zz > -35 * g) & (zz < -27 * g)
                                                & ((yy_ - foramen[1]) ** 2 + xx_**2 > 256)))
    for side in (-1, 1):  # iliac wings: lateral halves of thick ellipsoidal shells beside the sacrum
        centre = at("S1", -5, side * 70 * g, 15)
        canvas.ellipsoid(OTHER_BONE, centre, np.array([75, 60, 40]) * g, inner=0.85,
                         keep=lambda zz, yy_, xx_, side=side: (xx_ * side > 0) & (zz > -60 * g))


def _draw_ribs(canvas: _Canvas, subject: _Subject, rng: np.random.Generator) -> None:
    """Ribs from each thoracic vertebra around a thorax ellipse, sloping down anteriorly, and a sternum joining the
    anterior ends of the upper ribs."""
    half_crop = canvas.spacing * canvas.shape[0] / 2
    sternum = []
    for pl in subject.vertebrae:
        if pl.label not in _RIB:
            continue
        # the lowest rib is a short floating one, also where T11 is the last thoracic vertebra
        last = pl is subject.lowest_thoracic and pl.label != BY_NAME["T13"].label
        half_w, end_deg = _RIB[BY_NAME["T12"].label if last else pl.label]
        half_w *= subject.scale * rng.uniform(0.85, 1.15)
        end = np.deg2rad(end_deg * rng.uniform(0.85, 1.1))
        depth = 0.68 * half_w
        y_post = pl.shape.depth_mm * pl.scale[1] / 2 + 22.0
        rot = pl.rot.copy()
        if np.linalg.det(rot) < 0:  # undo the shape mirror: ribs follow the true left-right axis
            rot[:, 2] *= -1
        if BY_NAME["T2"].label <= pl.label <= BY_NAME["T8"].label:  # anterior end of a typical rib at this level
            nominal = _RIB[pl.label][0] * subject.scale
            sternum.append(pl.centre + rot @ np.array([2.0 - 0.35 * nominal, y_post - 1.36 * nominal + 8.0, 0.0]))
        if abs(pl.centre[0] - canvas.origin[0] - half_crop) > half_crop + 2.5 * half_w:
            continue
        theta = np.linspace(np.deg2rad(20), end, max(int((end * half_w) / (canvas.spacing / 2)), 8))
        drop = 0.35 * half_w * (theta / end) ** 1.2
        width = pl.shape.width_mm * pl.scale[2] / 2
        for side in (-1.0, 1.0):
            arc = np.stack([2.0 - drop, y_post - depth * (1 - np.cos(theta)), side * half_w * np.sin(theta)], axis=1)
            neck = np.linspace([4.0, 0.3 * pl.shape.depth_mm * pl.scale[1], side * (width + 2.0)], arc[0], 12)
            canvas.tube(RIB, pl.centre + np.concatenate([neck, arc]) @ rot.T, 4.0 * subject.scale)
    if len(sternum) >= 3:  # a smooth bar through those ends (quadratic fit)
        ends = np.asarray(sternum)
        t = np.linspace(0.0, 1.0, len(ends))
        fine = np.linspace(0.0, 1.0, int(np.linalg.norm(ends[-1] - ends[0]) / (canvas.spacing / 2)) + 2)
        points = np.stack([np.polyval(np.polyfit(t, ends[:, k], 2), fine) for k in range(3)], axis=1)
        canvas.tube(RIB, points, 6.0 * subject.scale)


def _draw_spine(canvas: _Canvas, subject: _Subject) -> None:
    """Canal (CSF and cord), discs with nuclei, then vertebrae with their tissue and level targets."""
    lv_s = {BY_LABEL[pl.label].name: pl.s for pl in subject.vertebrae}  # arc position by level name
    s = subject.s_grid
    # the canal's centre behind the body centroid (mm): about the medians of the closed canals of the library's shapes
    # (C2-C7 12.5-14.9, T7-T10 17.1-20.2, L1-L4 19.8-22.4); 26 mm at L3 left 2-4 mm of soft tissue between the lumbar
    # bodies and the CSF
    knots = [lv_s[name] for name in ("S1", "L3", "T9", "C7", "C1")]
    offset = np.interp(s, knots, [20.0, 21.0, 18.5, 14.5, 14.0]) * subject.scale
    canal = subject.points + subject.posterior * offset[:, None]
    csf = (s > lv_s["S1"] - 25) & (s < lv_s["C1"] + 40)
    canvas.tube(CSF, canal[csf], 7.5 * subject.scale)
    cord = s > 0.5 * (lv_s["L1"] + lv_s["L2"])
    canvas.tube(CORD, canal[cord], 4.5 * subject.scale)
    for disc, dark in subject.discs:
        hit = canvas.rasterise(disc.shape.mask, disc.shape.centre, disc)
        if hit is None:
            continue
        sl, sub = hit
        canvas.cls[sl][sub > 0] = ANNULUS
        canvas.tissue[sl][sub > 0] = DISC
        canvas.levels[sl][sub > 0] = 0
        nucleus = canvas.rasterise(disc.shape.mask, disc.shape.centre, disc, disc.scale * np.array([0.6, 0.55, 0.6]))
        if nucleus is not None:
            nsl, nsub = nucleus
            canvas.cls[nsl][nsub > 0] = NUCLEUS_DARK if dark else NUCLEUS
    for pl in subject.vertebrae:
        hit = canvas.rasterise(pl.shape.mask, pl.shape.centre, pl)
        if hit is None:
            continue
        sl, sub = hit
        if pl.body is not None:  # posterior elements from the shape, body from another scan (drawn below)
            sub[sub == BODY] = 0
            before = canvas.cls[sl].copy(), canvas.tissue[sl].copy(), canvas.levels[sl].copy()
        body, post = sub == BODY, sub == POSTERIOR
        sacrum = pl.label == S1_LABEL
        canvas.cls[sl][body] = MARROW
        canvas.cls[sl][post] = SACRUM if sacrum else POST
        canvas.tissue[sl][body] = BODY
        canvas.tissue[sl][post] = POSTERIOR
        canvas.levels[sl][body | post] = pl.label
        if sacrum:  # its rudimentary discs and canal
            canvas.cls[sl][sub == SACRAL_DISC] = ANNULUS
            canvas.tissue[sl][sub == SACRAL_DISC] = DISC
            canvas.cls[sl][sub == SACRAL_CANAL] = FAT
        swap = None if pl.body is None else canvas.rasterise(pl.body.mask, pl.body.centre, pl, pl.body_scale)
        if swap is not None:
            inside = swap[1] > 0
            canvas.cls[swap[0]][inside] = MARROW
            canvas.tissue[swap[0]][inside] = BODY
            canvas.levels[swap[0]][inside] = pl.label
        if pl.body is not None:
            # the rim of the shape's own body that its masks call posterior elements floated in front of the other
            # body as posterior-element specks (in 88 % of such vertebrae, 0.2 ml at the median, 0.8 at most): such
            # pieces go back to what lay there; a whole arch the other body does not touch stays
            pieces, n = ndimage.label(canvas.levels[sl] == pl.label, structure=np.ones((3, 3, 3)))
            if n > 1:
                sizes = np.bincount(pieces.ravel()) * canvas.spacing**3 / 1000.0  # ml
                sizes[[0, np.argmax(sizes[1:]) + 1]] = np.inf  # the background and the vertebra itself
                stray = np.isin(pieces, np.flatnonzero(sizes < _SPECK_ML)) & post
                for array, old in zip((canvas.cls, canvas.tissue, canvas.levels), before):
                    array[sl][stray] = old[stray]


# A piece of posterior elements apart from the rest of its vertebra smaller than this (ml) is a speck of a swapped
# body's rim (above), not an arch.
_SPECK_ML = 1.0


# ----------------------------------------------------------------------------------------------------------------
# Appearance
# ----------------------------------------------------------------------------------------------------------------


def _class_intensities(rng: np.random.Generator, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(means, stds) float32 (n_classes,) for one case: Hounsfield units for ``"ct"``, arbitrary units for the MR
    presets and ``"random"``."""
    if modality == "random":
        return (rng.uniform(0, 1000, _N_CLASSES).astype(np.float32),
                rng.uniform(0, 60, _N_CLASSES).astype(np.float32))
    table = _PRESETS[modality]
    means, stds = table[:, 0].copy(), table[:, 1] * rng.uniform(0.5, 1.5, _N_CLASSES).astype(np.float32)
    if modality == "ct":
        means += rng.normal(0, 1, _N_CLASSES).astype(np.float32) * np.maximum(10.0, 0.12 * np.abs(means))
        means[AIR] = -1000.0
        # Bone density: from osteoporotic (trabecular bone near 60 HU) to young dense bone (near 300 HU); the thin
        # cortical shell, blurred at the model's 2 mm, is 100 to 700 HU brighter than the bone inside it.
        density = rng.uniform(0.2, 1.3)
        bone = [MARROW, POST, SACRUM, RIB, OTHER_BONE]
        means[bone] = 30.0 + (means[bone] - 30.0) * density
        means[CORTEX] = means[MARROW] + rng.uniform(100.0, 700.0)
        if rng.random() < 0.3:  # contrast-enhanced vessels and organs
            means[VESSEL] = rng.uniform(150, 400)
            means[[ORGAN_A, ORGAN_B]] += rng.uniform(30, 120)
    else:
        means *= rng.uniform(0.8, 1.2, _N_CLASSES).astype(np.float32)
        means += rng.normal(0, 15, _N_CLASSES).astype(np.float32)
    return means, stds


def _thick_slices(img: np.ndarray, axis: int, factor: float, phase: float) -> np.ndarray:
    """Simulate slices ``factor`` voxels thick along ``axis`` of a float (z, y, x) volume (float64 from
    ``_appearance``): blur along the axis, keep one sample per slice, interpolate linearly back to the grid. Returns
    the dtype of ``img``."""
    n = img.shape[axis]
    img = ndimage.gaussian_filter1d(img, sigma=factor / 2.355, axis=axis, mode="nearest")
    pos = np.arange(phase * factor, n, factor)
    if pos.size < 2:
        return img
    low = _linear_at(img, pos, axis)  # the slices, centred exactly at pos
    return _linear_at(low, np.clip((np.arange(n) - pos[0]) / factor, 0, pos.size - 1), axis)


def _linear_at(img: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``img`` (float, float64 from ``_thick_slices``) at the continuous indices ``pos``
    (float (m,), within the axis) along ``axis``, constant beyond the ends; the other axes are kept. Returns the
    dtype of ``img``."""
    i0 = np.clip(np.floor(pos).astype(int), 0, img.shape[axis] - 2)
    shape = [1] * img.ndim
    shape[axis] = pos.size
    w = np.clip(pos - i0, 0.0, 1.0).astype(np.float32).reshape(shape)
    return np.take(img, i0, axis=axis) * (1 - w) + np.take(img, i0 + 1, axis=axis) * w


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, knots: int = 4) -> np.ndarray:
    """Smooth random field, float32 of ``shape`` (z, y, x): Gaussian values (std ``sigma``) on a ``knots``^3
    lattice spanning the volume, interpolated linearly along each axis in turn (separable, cheap)."""
    field = rng.normal(0.0, sigma, (knots,) * 3).astype(np.float32)
    for axis, n in enumerate(shape):
        pos = np.linspace(0.0, knots - 1.0, n)
        i0 = np.minimum(np.floor(pos).astype(int), knots - 2)
        w = (pos - i0).astype(np.float32)
        weights = np.zeros((n, knots), np.float32)
        weights[np.arange(n), i0] = 1.0 - w
        weights[np.arange(n), i0 + 1] = w
        field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    return field


def _texture(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance random texture, float64 of ``shape`` (z, y, x) (the float64 mixing weight promotes the float32
    noise): white noise mixed with noise smoothed over one to three voxels (trabecular bone, fat in muscle, organ
    parenchyma are textured, not flat)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), rng.uniform(0.6, 1.5))
    share = rng.uniform(0.0, 0.9)
    return np.sqrt(1.0 - share**2) * white + share / max(float(smooth.std()), 1e-6) * smooth


def _appearance(rng: np.random.Generator, cls: np.ndarray, levels: np.ndarray, modality: str,
                spacing: float) -> np.ndarray:
    """Synthetic image, float32 (z, y, x), Hounsfield units for ``"ct"``, arbitrary units otherwise, from the uint8
    (z, y, x) class map ``cls`` and the uint8 (z, y, x) VerSe level map ``levels`` (per-vertebra marrow)."""
    means, stds = _class_intensities(rng, modality)
    img = means[cls] + stds[cls] * _texture(rng, cls.shape)
    marrow = (cls == MARROW) | (cls == SACRUM)
    spread = float(np.abs(means[MARROW] - means[FAT])) * 0.15 + 10.0
    per_level = rng.normal(0.0, spread, max(BY_LABEL) + 1).astype(np.float32)  # one per label value
    img[marrow] += per_level[levels[marrow]]
    img = ndimage.gaussian_filter(img, sigma=rng.uniform(0.3, 1.0))
    if rng.random() < (0.3 if modality == "ct" else 0.6):
        # Thick slices: sagittal MR stacks are thick left-right (x), axial CT/MR thick along z.
        axis = int(rng.choice([0, 1, 2], p=[0.7, 0.1, 0.2] if modality == "ct" else [0.25, 0.1, 0.65]))
        thickness = rng.uniform(2.5, 6.0)
        if thickness > 1.3 * spacing:
            img = _thick_slices(img, axis, thickness / spacing, rng.uniform())
    if modality != "ct":
        img *= np.exp(_smooth_field(rng, img.shape, rng.uniform(0.05, 0.35)))
        top = float(np.percentile(img[::4, ::4, ::4], 99)) or 1.0
        sigma = rng.uniform(0.005, 0.03) * top
        img = np.sqrt((img + sigma * rng.standard_normal(img.shape, dtype=np.float32)) ** 2
                      + (sigma * rng.standard_normal(img.shape, dtype=np.float32)) ** 2)
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / max(hi - lo, 1e-6)) ** np.exp(rng.normal(0.0, 0.25)) * rng.uniform(200.0, 4000.0)
    else:  # reconstruction noise, correlated over about a voxel
        noise = ndimage.gaussian_filter(rng.standard_normal(img.shape, dtype=np.float32), rng.uniform(0.0, 0.8))
        img += rng.uniform(5.0, 70.0) / max(float(noise.std()), 1e-6) * noise  # low-dose scans are noisy
        img = np.maximum(img, -1024.0)
    return img.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def _limit_field_of_view(rng: np.random.Generator, image: np.ndarray, tissue: np.ndarray, levels: np.ndarray) -> None:
    """Keep only a slab of the crop, as in a scan narrower than the crop (a thin sagittal MR stack, short axial
    coverage); in place. Outside the slab the image takes its minimum (0 after percentile normalisation, like
    padding) and the targets are unknown: tissue ``IGNORE``, levels 0.

    Args:
        image: float32 (z, y, x).
        tissue, levels: uint8 (z, y, x) targets.
    """
    axis = int(rng.choice([2, 0, 1], p=[0.7, 0.2, 0.1]))  # left-right (sagittal stack), z (axial), y
    n = image.shape[axis]
    width = max(int(n * rng.uniform(0.3, 0.7)), 1)
    bone = np.flatnonzero(np.moveaxis(levels, axis, 0).reshape(n, -1).any(axis=1))
    middle = int(np.median(bone)) if bone.size else n // 2
    start = int(np.clip(middle - width // 2 + rng.integers(-width // 4, width // 4 + 1), 0, n - width))
    outside = np.ones(n, bool)
    outside[start : start + width] = False
    index = [slice(None)] * 3
    index[axis] = outside
    index = tuple(index)
    image[index] = image.min()
    tissue[index] = IGNORE
    levels[index] = 0


def _crop_centre(rng: np.random.Generator, subject: _Subject, extent: np.ndarray) -> np.ndarray:
    """World centre, float64 (3,) (z, y, x) mm, of a crop of ``extent`` (float (3,) size (z, y, x) in mm): on a
    random part of the spine, extra weight on the sacrum, C1/C2 and the thoraco-lumbar junction, sometimes shifted
    partly outside the body."""
    u = rng.random()
    if u < 0.15:
        target = subject.by_label[S1_LABEL].centre
    elif u < 0.25:
        target = subject.by_label[BY_NAME["C2"].label].centre
    elif u < 0.4:
        target = subject.lowest_thoracic.centre
    else:
        # the skull is a sketch: head-heavy crops come from C1/C2 above
        s = rng.uniform(-60.0, subject.by_label[BY_NAME["C4"].label].s)
        target = np.stack([np.interp(s, subject.s_grid, subject.points[:, k]) for k in range(3)])
    shift = np.array([rng.uniform(-0.35, 0.35) * extent[0], rng.uniform(-45.0, 10.0), rng.normal(0.0, 10.0)])
    if rng.random() < 0.1:
        shift[1:] += rng.uniform(-0.5, 0.5, 2) * extent[1:]
    return target + shift


def _add_cortex(cls: np.ndarray) -> None:
    """Give the vertebrae's bone in tissue-class map ``cls`` (uint8 (z, y, x)) its cortical shell, in place: its
    surface towards what is not bone. Beyond the crop lies more of the body, so a face the crop cuts gets none."""
    bone = np.isin(cls, _BONE_CLASSES)
    cls[bone & ~ndimage.binary_erosion(bone, border_value=1)] = CORTEX


def synthesize_case(rng: np.random.Generator, library: ShapeLibrary, spacing_mm: float = 2.0,
                    size_zyx: tuple[int, int, int] = (160, 96, 96), modality: str | None = None) -> TrainingCase:
    """One synthetic training crop of a random whole spine.

    Args:
        rng: the only source of randomness (same seed, same case).
        library: real shapes (:func:`~SpineLabelTrainingLib.shapes.build_shape_library`).
        spacing_mm: isotropic voxel size of the crop, mm.
        size_zyx: crop size in voxels, (z, y, x) = (inferior->superior, anterior->posterior, right->left).
        modality: one of :data:`MODALITIES` (``"ct"``, ``"t1"``, ``"t2"``, ``"stir"``, ``"water"``, ``"fat"``,
            ``"random"``); None draws one.

    Returns:
        A :class:`TrainingCase` (image float32, tissue and levels uint8, all ``size_zyx``).

    Raises:
        ValueError: unknown modality, a spacing that is no finite number above 0, or a size that is not three whole
            numbers of 1 or more.
    """
    if not 0 < spacing_mm < math.inf:  # NaN compares false
        raise ValueError(f"spacing {spacing_mm}: a finite number of mm above 0")
    if len(size_zyx) != 3 or not all(isinstance(n, numbers.Integral) and n >= 1 for n in size_zyx):
        raise ValueError(f"size {tuple(size_zyx)}: three whole numbers of voxels (z, y, x), each 1 or more")
    if modality is None:
        modality = str(rng.choice(MODALITIES, p=_MODALITY_P))
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    subject = _Subject(rng, library)
    shape = tuple(int(v) for v in size_zyx)
    extent = np.asarray(shape, float) * spacing_mm
    centre = _crop_centre(rng, subject, extent)
    canvas = _Canvas(shape, centre - (np.asarray(shape) - 1) / 2 * spacing_mm, float(spacing_mm))
    _draw_body(rng, canvas, subject)
    _draw_ribs(canvas, subject, rng)
    _draw_spine(canvas, subject)
    if rng.random() < 0.8:
        _add_cortex(canvas.cls)
    image = _appearance(rng, canvas.cls, canvas.levels, modality, float(spacing_mm))
    if rng.random() < 0.15:
        _limit_field_of_view(rng, image, canvas.tissue, canvas.levels)
    log.debug("synthetic %s crop, levels %s", modality,
              ", ".join(BY_LABEL[int(v)].name for v in np.unique(canvas.levels) if v))
    return TrainingCase(image, canvas.tissue, canvas.levels, float(spacing_mm), modality)
