"""Procedural spine phantoms: CT- or MR-like images with exact vertebra labels, for tests and smoke training.

Coordinate conventions:
    * Physical coordinates are LPS millimetres: x runs right->left, y anterior->posterior, z inferior->superior.
    * The grid is axis-aligned (direction identity), so an array from ``sitk.GetArrayFromImage`` is indexed
      (z, y, x) = (inferior->superior, anterior->posterior, right->left): the head is at high z, the back at
      high y, the patient's left at high x.
    * The anatomy lives in a body frame in which z = 0 is the top of the first level (C1) and x = 0 the
      midline; the image origin is the LPS position of voxel (0, 0, 0) in that frame. The same seed gives the
      same anatomy on every grid.
    * The spine is a curve parametrised by arc length s (mm, 0 at the top of the first level, growing
      caudally). Every vertebra is modelled in its own local frame (u, v, w) = (towards the left, towards the
      back, cranially along the curve), centred on its body (C1: on the curve at the middle of its ring), and
      rasterised only inside its bounding box.
    * By default the field of view spans the bodies of its levels plus 4 mm in z; the one or two levels beyond
      each end may show in part (a spinous process, an endplate) and are labelled where visible.

Labels follow ``vertebrae.py`` (VerSe values). Ribs and the iliac wings are bone in the image but background in
``labels`` and ``tissue``.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .io import IMAGE_SUFFIXES, atomic_paths, axes_text, case_name, header_tags, no_empty_new_folders, write_image
from .vertebrae import BODY, BY_NAME, DISC, LEVELS, POSTERIOR, level_index

__all__ = ["FOVS", "Phantom", "make_phantom"]

log = logging.getLogger(__name__)

FOVS = ("whole", "cervical", "thoracic", "lumbar")
# one-file formats: a header with a detached data file (.nhdr, .mhd) cannot be written under a temporary name
_SAVE_SUFFIXES = tuple(suffix for suffix in IMAGE_SUFFIXES if suffix not in (".nhdr", ".mhd"))
# What the header of a file ``Phantom.save`` writes says: such a file may be replaced by another phantom, no other
_NOTES_KEY = "ITK_FileNotes"
_PHANTOM_NOTE = "SpineLabel phantom"

# Materials: what a voxel is made of; a modality maps each to an intensity.
(_AIR, _SKIN, _FAT, _MUSCLE, _ORGAN, _LUNG, _CSF, _CORD, _ANNULUS, _NUCLEUS, _CANCELLOUS, _CORTICAL) = range(12)
_CT_HU = np.array([-1000, 30, -100, 50, 40, -850, 8, 35, 100, 75, 230, 950], dtype=np.float32)
_MR_T2 = np.array([0, 350, 800, 200, 350, 30, 1000, 450, 250, 850, 380, 40], dtype=np.float32)

# Default in-plane size (voxels) and spacing (x, y, z mm) per field of view; the z size follows the anatomy.
_FOV_GRID = {
    "whole": ((160, 160), (1.5, 1.5, 2.0)),
    "cervical": ((128, 128), (1.25, 1.25, 1.5)),
    "thoracic": ((160, 160), (1.5, 1.5, 2.0)),
    "lumbar": ((160, 160), (1.5, 1.5, 1.5)),
}
_STANDARD = tuple(level.name for level in LEVELS if not level.transitional)  # C1..L5, S1

# Vertebra proportions (mm) at anchor profile positions (index in _STANDARD: 1 = C2, 6 = C7, 7 = T1, 12 = T6,
# 18 = T12, 19 = L1, 21 = L3, 23 = L5); other levels are interpolated. Half-widths for the canal.
_VERT_POS = (1, 2, 6, 7, 12, 18, 19, 21, 23)
_VERT_TABLE = {
    "width": (15, 15, 19, 22, 28, 38, 42, 46, 50),
    "depth": (14, 14, 16, 17, 25, 30, 31, 33, 34),
    "height": (14, 12, 13, 15, 19, 23, 25, 27, 27),
    "disc": (4.0, 4.0, 4.5, 4.0, 5.0, 7.0, 8.5, 10.0, 10.0),  # height of the disc below the level
    "canal_w": (12, 12.5, 12.5, 9, 8, 9, 10.5, 11.5, 12),
    "canal_d": (8, 7.5, 7, 7.5, 8, 8.5, 8.5, 8.5, 8.5),
    "pedicle": (4.5, 4, 4.5, 5, 5, 7, 8, 9, 10),
    "lamina": (4, 3.5, 4, 5, 5, 6, 6.5, 7, 7),
    "spinous_length": (26, 18, 28, 30, 36, 28, 28, 28, 22),
    "spinous_height": (10, 7, 9, 9, 10, 18, 20, 20, 18),
    "spinous_slope": (0.2, 0.3, 0.4, 0.5, 0.75, 0.3, 0.15, 0.1, 0.1),
    "transverse": (28, 26, 32, 42, 37, 28, 35, 43, 40),  # reach of the transverse process tip from the midline
    "transverse_tilt": (-0.2, -0.25, 0.0, 0.2, 0.5, 0.3, 0.0, 0.0, 0.0),  # posterior shift per mm laterally
}
# Sacral segments S1..S5 (fused, labelled as the sacrum): height, body width, body depth, ala reach, canal w, d.
_SACRAL = (
    (30, 48, 34, 52, 12, 6),
    (24, 40, 27, 46, 10, 5),
    (20, 32, 21, 36, 8, 4),
    (16, 24, 15, 0, 6, 3),
    (12, 16, 11, 0, 4, 2.5),
)
# Body outline (mm) at profile positions (-2 = head, 1 = C2, 7 = T1, 18 = T12, 24 = S1, 28 = below the sacrum).
_TORSO_POS = (-2, 1, 5, 7, 9, 13, 18, 21, 24, 26, 28)
_TORSO_TABLE = {
    "ax": (75, 55, 60, 165, 150, 150, 150, 150, 165, 175, 175),  # lateral semi-axis
    "ay": (90, 55, 58, 95, 105, 115, 112, 110, 110, 110, 110),  # antero-posterior semi-axis
    "back": (70, 75, 80, 90, 95, 95, 100, 110, 100, 90, 90),  # vertebral body centre to the skin of the back
    "fat": (0.6, 0.5, 0.5, 0.7, 0.8, 0.9, 1.1, 1.3, 1.3, 1.2, 1.2),  # factor on the subcutaneous fat thickness
    "wall": (8, 200, 200, 20, 16, 15, 15, 15, 18, 20, 20),  # muscle wall thickness (the neck is all muscle)
    "paraspinal_x": (1, 25, 30, 35, 35, 35, 40, 50, 45, 40, 40),
    "paraspinal_y": (1, 20, 22, 25, 25, 25, 30, 35, 30, 25, 25),
}
_CURVE_STEP = 0.5  # mm between samples of the spine curve


@dataclass
class Phantom:
    """A synthetic spine image with its ground truth, all three on the same grid.

    Attributes:
        image: float32 (MR-like, arbitrary units 0..~1700 with the bias field) or int16 (CT-like, Hounsfield units)
            image.
        labels: uint8 VerSe label map of whole vertebrae (body and posterior elements), 0 elsewhere.
        tissue: uint8 tissue classes, values index ``vertebrae.TISSUE_NAMES``; C1 and the whole sacrum are class 1.
    """

    image: sitk.Image
    labels: sitk.Image
    tissue: sitk.Image

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write the image to ``path`` and the labels to ``<stem>_seg-vert_msk.nii.gz`` beside it (the VerSe layout
        ``spinelabel evaluate`` and ``train`` read), both or neither.

        Returns:
            The two paths written, image first.

        Raises:
            FileExistsError: a file of either name that is no earlier phantom (its header says whether it is).
        """
        image_path = Path(path)
        if not image_path.name.lower().endswith(_SAVE_SUFFIXES):
            raise ValueError(f"{image_path}: unsupported file type; expected one of {', '.join(_SAVE_SUFFIXES)}")
        if not case_name(image_path):
            raise ValueError(f"{image_path}: the file name has nothing before its extension to name the label map by")
        label_path = image_path.with_name(f"{case_name(image_path)}_seg-vert_msk.nii.gz")
        with no_empty_new_folders(image_path.parent):  # a failed write leaves no folder it made
            try:
                image_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # say which folder could not be made, and the file in its way
                blocker = next((p for p in (image_path.parent, *image_path.parent.parents) if p.is_file()), None)
                raise OSError(f"{image_path.parent}: cannot make this folder"
                              + (f": {blocker} is a file" if blocker else f" ({err.strerror or err})")) from None
            for existing in (image_path, label_path):
                if existing.exists() and header_tags(existing)(_NOTES_KEY) != _PHANTOM_NOTE:
                    raise FileExistsError(f"{existing} would be replaced, and it is no phantom SpineLabel wrote; "
                                          "remove it or choose another name")
            with atomic_paths([image_path, label_path]) as temps:
                for image, tmp, final in zip((self.image, self.labels), temps, (image_path, label_path)):
                    image = sitk.Image(image)  # a copy: the note is the file's (NRRD and MetaImage take it from here)
                    image.SetMetaData(_NOTES_KEY, _PHANTOM_NOTE)
                    write_image(image, tmp, final, notes=_PHANTOM_NOTE)
        return [image_path, label_path]


@dataclass
class _Element:
    """One rigid piece of the spine: a vertebra, C1 or one sacral segment.

    ``dims`` are mm; ``centre`` is float64 (3,) LPS mm in the body frame; ``frame`` is float64 (3, 3), its columns
    the local u, v, w axes.
    """

    name: str
    label: int
    kind: str  # "atlas", "vertebra" or "sacral"
    region: str
    pos: float  # profile position (index in _STANDARD, fractional for T13 and L6, S1 + k/2 for sacral k)
    s: float  # arc length of the centre
    half_height: float
    dims: dict[str, float]
    centre: np.ndarray = field(default=None)  # type: ignore[assignment]
    frame: np.ndarray = field(default=None)  # type: ignore[assignment]


@dataclass
class _Curve:
    """Spine centre line sampled every ``_CURVE_STEP`` mm of arc length: ``s`` and the body-frame LPS ``x``, ``y``,
    ``z`` float64 (n,) mm, ``tangent`` float64 (n, 3)."""

    s: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    tangent: np.ndarray  # unit vectors pointing cranially

    def point(self, s: float | np.ndarray) -> np.ndarray:
        """LPS point(s) float64 (..., 3) mm at arc length(s) ``s`` (mm)."""
        return np.stack([np.interp(s, self.s, c) for c in (self.x, self.y, self.z)], axis=-1)

    def frame(self, s: float, roll: float = 0.0) -> np.ndarray:
        """float64 (3, 3) whose columns are the local (u, v, w) axes at ``s``, rotated by ``roll`` rad about w."""
        t = np.array([np.interp(s, self.s, self.tangent[:, a]) for a in range(3)])
        t /= np.linalg.norm(t)
        u = np.array([1.0, 0.0, 0.0]) - t[0] * t
        u /= np.linalg.norm(u)
        v = np.cross(t, u)
        c, sn = math.cos(roll), math.sin(roll)
        return np.stack([c * u + sn * v, -sn * u + c * v, t], axis=1)

    def s_at_z(self, z: np.ndarray) -> np.ndarray:
        """Arc length (mm, float64) where the curve reaches height(s) ``z`` (mm); z falls monotonically along s."""
        return np.interp(z, self.z[::-1], self.s[::-1])


@dataclass
class _Anatomy:
    """Everything about one phantom body that does not depend on the voxel grid."""

    elements: list[_Element]
    discs: list[tuple[_Element, _Element, float]]  # upper, lower, arc length of the disc middle
    curve: _Curve
    torso_scale: float
    fat_mm: float
    cord_end_s: float  # conus medullaris
    dura_end_s: float


def _interp_table(pos: float | np.ndarray, anchors, table: dict) -> dict:
    """Every column of ``table`` linearly interpolated at profile position(s) ``pos`` (clamped at the ends).
    ``pos``: a float or float (n,) array of positions along the standard column (``_profile_position``, no unit);
    ``anchors``: the ascending positions of the columns' values. Returns column name -> float64, a scalar or (n,)
    like ``pos``, in the column's units."""
    return {key: np.interp(pos, anchors, values) for key, values in table.items()}


def _profile_position(name: str) -> float:
    """Position along the standard column C1..S1 (T13 and L6 fall half-way to the next level)."""
    if name in _STANDARD:
        return float(_STANDARD.index(name))
    previous = LEVELS[level_index(name) - 1].name
    return _STANDARD.index(previous) + 0.5


def _check_levels(levels) -> tuple[str, ...]:
    """Canonical level names from ``levels`` (default C1..L5 + S1); KeyError if unknown, ValueError if unordered."""
    if levels is None:
        return _STANDARD
    names = tuple(LEVELS[level_index(n)].name for n in levels)
    order = [level_index(n) for n in names]
    if not names or any(b <= a for a, b in zip(order, order[1:])):
        raise ValueError(f"levels must be distinct vertebra names in cranio-caudal order, got {list(levels)}")
    return names


def _fov_levels(fov: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The levels a field of view is centred on: its region plus neighbours (lumbar = two above L1 to sacrum)."""
    if fov == "whole":
        return names
    regions = [BY_NAME[n].region for n in names]
    wanted = {"cervical": ("cervical",), "thoracic": ("thoracic",), "lumbar": ("lumbar", "sacral")}[fov]
    inside = [i for i, r in enumerate(regions) if r in wanted]
    if not inside:
        raise ValueError(f"fov {fov!r} needs {wanted[0]} levels, but levels are {list(names)}")
    before, after = {"cervical": (0, 2), "thoracic": (1, 1), "lumbar": (2, 0)}[fov]
    return names[max(inside[0] - before, 0) : inside[-1] + after + 1]


def _build_anatomy(names: tuple[str, ...], rng: np.random.Generator) -> _Anatomy:
    """Sizes, stacking and curvature of the spine for ``names`` (cranio-caudal), randomised by ``rng``."""
    scale = rng.uniform(0.93, 1.07)
    amplitude = {"cervical": -12 * rng.uniform(0.5, 1.5), "thoracic": 30 * rng.uniform(0.6, 1.4),
                 "lumbar": -24 * rng.uniform(0.6, 1.4)}
    sacral_tip_slope = rng.uniform(0.45, 0.75)
    lateral = (rng.uniform(0, 5), rng.uniform(250, 500), rng.uniform(0, 2 * math.pi))
    torso_scale = rng.uniform(0.92, 1.08)
    fat_mm = rng.uniform(6, 22)
    size_jitter = rng.uniform(0.96, 1.04, len(LEVELS))
    disc_jitter = rng.uniform(0.85, 1.15, len(LEVELS))
    roll = rng.normal(0.0, 0.03, len(LEVELS) + len(_SACRAL))

    elements: list[_Element] = []
    discs_below: list[float] = []
    cursor = 0.0  # arc length of the top of the next body
    for name in names:
        level = BY_NAME[name]
        idx = level_index(name)
        pos = _profile_position(name)
        k = scale * size_jitter[idx]
        if name == "C1":
            dims = {key: k * val for key, val in _interp_table(1.0, _VERT_POS, _VERT_TABLE).items()}
            centre = cursor + 5 * k
            elements.append(_Element(name, level.label, "atlas", level.region, pos, centre, 5 * k, dims))
            cursor = centre + 9 * k  # the C2 body top sits 9 mm below the middle of the atlas ring
            discs_below.append(0.0)
        elif name == "S1":
            for piece, (h, wd, dp, ala, cw, cd) in enumerate(_SACRAL):
                dims = {"height": k * h, "width": k * wd, "depth": k * dp, "ala": k * ala, "canal_w": k * cw,
                        "canal_d": k * cd, "first": float(piece == 0)}
                elements.append(_Element(name, level.label, "sacral", level.region, pos + piece / 2,
                                         cursor + k * h / 2, k * h / 2, dims))
                cursor += k * h
                discs_below.append(0.0)
        else:
            dims = {key: k * val for key, val in _interp_table(pos, _VERT_POS, _VERT_TABLE).items()}
            dims["disc"] *= disc_jitter[idx]
            dims["axis"] = float(name == "C2")
            half = dims["height"] / 2
            elements.append(_Element(name, level.label, "vertebra", level.region, pos, cursor + half, half, dims))
            cursor += 2 * half + dims["disc"]
            discs_below.append(dims["disc"])

    discs = []
    for (upper, lower) in zip(elements, elements[1:]):
        if upper.kind == "vertebra" and lower.kind != "atlas":
            top_of_lower = lower.s - lower.half_height
            discs.append((upper, lower, (upper.s + upper.half_height + top_of_lower) / 2))

    spans: dict[str, list[float]] = {}
    for el, disc in zip(elements, discs_below):
        span = spans.setdefault(el.region, [el.s - el.half_height, el.s + el.half_height + disc])
        span[1] = el.s + el.half_height + disc
    s_end = elements[-1].s + elements[-1].half_height
    curve = _build_curve(spans, amplitude, sacral_tip_slope, lateral, s_end)
    for i, el in enumerate(elements):
        el.frame = curve.frame(el.s, roll[i])
        el.centre = curve.point(el.s)

    # The cord ends at the L1/L2 disc; above the first element caudal of L1 when L1 is missing.
    caudal = [el for el in elements if level_index(el.name) >= level_index("L1")]
    if caudal:
        cord_end = caudal[0].s + (caudal[0].half_height if caudal[0].name == "L1" else -caudal[0].half_height)
    else:
        cord_end = s_end
    sacral = [el for el in elements if el.kind == "sacral"]
    dura_end = sacral[1].s if len(sacral) > 1 else s_end
    return _Anatomy(elements, discs, curve, torso_scale, fat_mm, cord_end, dura_end)


def _build_curve(spans, amplitude, sacral_tip_slope, lateral, s_end) -> _Curve:
    """Centre line: sine bumps per region (lordosis anterior, kyphosis posterior), a sacral bend, mild scoliosis.

    Args:
        spans: region -> [first arc length, last arc length] (mm).
        amplitude: region -> sagittal deviation (mm, + posterior) at the middle of the region.
        sacral_tip_slope: posterior slope dy/ds added at the sacral tip.
        lateral: (amplitude mm, wavelength mm, phase rad) of the lateral (x) deviation.
        s_end: arc length of the caudal end of the column (mm).
    """
    s = np.arange(-80.0, s_end + 80.0, _CURVE_STEP)
    y = np.zeros_like(s)
    for region, amp in amplitude.items():
        if region in spans:
            a, b = spans[region]
            inside = (s >= a) & (s <= b)
            y[inside] += amp * np.sin(np.pi * (s[inside] - a) / (b - a))
    if "sacral" in spans:
        a, b = spans["sacral"]
        c = sacral_tip_slope / (2 * (b - a))
        y += np.where(s > a, c * (np.minimum(s, b) - a) ** 2 + 2 * c * (b - a) * np.maximum(s - b, 0), 0.0)
    sigma = 12.0 / _CURVE_STEP
    kernel = np.exp(-0.5 * (np.arange(-3 * sigma, 3 * sigma + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    pad = len(kernel) // 2
    y = np.convolve(np.pad(y, pad, mode="edge"), kernel, mode="valid")
    amp_x, wavelength, phase = lateral
    x = amp_x * np.sin(2 * np.pi * s / wavelength + phase)
    dx, dy = np.gradient(x, _CURVE_STEP), np.gradient(y, _CURVE_STEP)
    dz = np.sqrt(np.clip(1.0 - dx**2 - dy**2, 0.1, 1.0))
    z = -np.concatenate([[0.0], np.cumsum((dz[1:] + dz[:-1]) / 2 * _CURVE_STEP)])
    z -= np.interp(0.0, s, z)
    tangent = np.stack([-dx, -dy, dz], axis=1)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    return _Curve(s, x, y, z, tangent)


# ---------------------------------------------------------------------------------------------------------------
# Shape primitives. All take float32 coordinate arrays (any broadcastable shape, mm) and return an approximate
# depth in mm: positive inside, growing towards the middle, negative outside. A union is np.maximum, an
# intersection np.minimum. The depth is float64 wherever a size is a float64 scalar, as the dims are (every bone
# shape); ``_ellipse_depth`` stays float32 with float32 sizes (soft tissue, canal).


def _ellipse_depth(a, b, ra, rb):
    """Depth inside the axis-aligned ellipse with semi-axes ``ra``, ``rb`` (mm) centred at a = b = 0.

    Measured along the ray from the centre, which is exact on circles and close on mild ellipses. float64 when any
    input is float64 (a NumPy float64 scalar included), float32 for float32 arrays and Python floats.
    """
    r = np.sqrt((a / ra) ** 2 + (b / rb) ** 2)
    boundary = np.hypot(a, b) / np.maximum(r, 1e-6)  # distance from the centre to the outline along the ray
    boundary = np.where(r > 1e-6, boundary, np.minimum(ra, rb))
    return boundary * (1.0 - r)


def _box_depth(coords, centre, half):
    """Depth inside the axis-aligned box ``centre`` +- ``half`` (three coordinate arrays, mm); float64 with the
    float64 dims used here."""
    depth = None
    for c, m, h in zip(coords, centre, half):
        d = h - np.abs(c - m)
        depth = d if depth is None else np.minimum(depth, d)
    return depth


def _vertebra_depths(u, v, w, d):
    """Depths (mm) of the body and of the posterior elements of a C2..L5-type vertebra in its local frame.

    Args:
        u, v, w: float32 local coordinates (mm), broadcastable arrays in the box's (z, y, x) layout.
        d: the vertebra's dims (mm).

    Returns:
        (body depth, posterior-elements depth), float64 arrays.
    """
    w2, d2, h2 = d["width"] / 2, d["depth"] / 2, d["height"] / 2
    cw, cd, pw, lt = d["canal_w"], d["canal_d"], d["pedicle"], d["lamina"]
    waist = 1.0 - 0.07 * (1.0 - np.minimum((w / h2) ** 2, 1.0))
    body = np.minimum(_ellipse_depth(u, v, w2 * waist, d2 * waist), h2 - np.abs(w))
    if d["axis"]:  # the dens of C2
        dens = np.minimum(4.8 * d["width"] / 15 - np.hypot(u, v + d2 - 6.0), np.minimum(w - (h2 - 2), h2 + 15 - w))
        body = np.maximum(body, dens)
    au = np.abs(u)
    vc = d2 + cd  # canal centre
    pedicle = _box_depth((au, v, w), (cw + pw / 2, (d2 + vc - 3) / 2, 0.15 * h2 * 2),
                         (pw / 2, (vc - d2 + 5) / 2, 0.27 * h2 * 2))
    ring = np.minimum(_ellipse_depth(u, v - vc, cw + lt, cd + lt), -_ellipse_depth(u, v - vc, cw, cd))
    lamina = np.minimum(np.minimum(ring, v - vc + 1), 0.84 * h2 - np.abs(w + 0.16 * h2 + 0.3 * (v - vc)))
    v0 = vc + cd + lt / 2
    spinous_w = -0.2 * h2 - d["spinous_slope"] * (v - v0)
    spinous = np.minimum(np.minimum(d["spinous_height"] / 2 - np.abs(w - spinous_w), lt / 2 + 0.5 - au),
                         np.minimum(v - v0 + lt, v0 + d["spinous_length"] - v))
    v_tp = vc - 1 + d["transverse_tilt"] * (au - cw)
    tp_half_h = 0.22 * h2 * 2
    transverse = np.minimum(np.minimum(3.5 - np.abs(v - v_tp), tp_half_h - np.abs(w - 0.2 * h2)),
                            np.minimum(au - cw, d["transverse"] - au))
    superior_facet = _box_depth((au, v, w), (cw + pw + 1.5, vc + 0.5, h2 + 3), (2.5, 2.5, 5))
    inferior_facet = _box_depth((au, v, w), (cw + pw - 3.75, vc + 5.75, -h2 - 3), (2.25, 2.25, 5))
    posterior = np.maximum(np.maximum(np.maximum(pedicle, lamina), np.maximum(spinous, transverse)),
                           np.maximum(superior_facet, inferior_facet))
    return body, posterior


def _vertebra_box(d) -> tuple[np.ndarray, np.ndarray]:
    """Local (u, v, w) bounding box (lo, hi), float64 (3,) mm each, of ``_vertebra_depths``."""
    w2, d2, h2 = d["width"] / 2, d["depth"] / 2, d["height"] / 2
    vc = d2 + d["canal_d"]
    v0 = vc + d["canal_d"] + d["lamina"] / 2
    u_max = max(w2, d["transverse"], d["canal_w"] + d["pedicle"] + 4) + 1
    v_max = max(v0 + d["spinous_length"], vc + d["canal_d"] + d["lamina"], vc + 8) + 1
    w_low = min(-h2 - 8.5, -0.2 * h2 - d["spinous_slope"] * d["spinous_length"] - d["spinous_height"] / 2,
                -h2 - 0.3 * (d["canal_d"] + d["lamina"])) - 1
    w_high = h2 + (16 if d["axis"] else 8.5)
    return np.array([-u_max, -d2 - 1, w_low]), np.array([u_max, v_max, w_high])


def _atlas_depth(u, v, w, d):
    """Depth (mm, float64) of C1: a ring in front of the dens and behind the canal, lateral masses, transverse
    processes.

    ``d`` are the dims of a C2 at the same scale (the ring is fitted around the dens and canal of C2).
    """
    k = d["width"] / 15
    d2, cw, cd = d["depth"] / 2, d["canal_w"], d["canal_d"]
    front_in, back_in = -d2 + 6 - 4.8 * k - 1.5, d2 + 2 * cd + 1
    front_out, back_out = front_in - 5 * k, back_in + 6 * k
    inner = _ellipse_depth(u, v - (front_in + back_in) / 2, cw + 2 * k, (back_in - front_in) / 2)
    outer = _ellipse_depth(u, v - (front_out + back_out) / 2, cw + 8 * k, (back_out - front_out) / 2)
    ring = np.minimum(np.minimum(outer, -inner), 5 * k - np.abs(w))
    au = np.abs(u)
    lateral_mass = _ellipse_depth(np.hypot(au - cw - 3 * k, (w / 0.8)), v - 3 * k, 6.5 * k, 9 * k)
    transverse = _box_depth((au, v, w), (cw + 16 * k, 3 * k, 0), (14 * k, 4 * k, 3.5 * k))
    return np.maximum(np.maximum(ring, lateral_mass), transverse)


def _atlas_box(d) -> tuple[np.ndarray, np.ndarray]:
    """Local (u, v, w) bounding box (lo, hi), float64 (3,) mm each, of ``_atlas_depth``."""
    k = d["width"] / 15
    return (np.array([-d["canal_w"] - 31 * k, -d["depth"] / 2 - 6 * k, -8 * k]),
            np.array([d["canal_w"] + 31 * k, d["depth"] / 2 + 2 * d["canal_d"] + 8 * k, 8 * k]))


def _sacral_depth(u, v, w, d):
    """Depth (mm, float64) of one fused sacral segment: body, alae, posterior wall around the sacral canal, median
    crest, and on S1 the superior articular processes. Coordinates as for ``_vertebra_depths``.
    """
    w2, d2, h2 = d["width"] / 2, d["depth"] / 2, d["height"] / 2 + 0.6  # overlap fuses the segments
    cw, cd = d["canal_w"], d["canal_d"]
    au = np.abs(u)
    depth = np.minimum(_ellipse_depth(u, v, w2, d2), h2 - np.abs(w))
    if d["ala"] > 0:
        ala = _box_depth((au, v, w), (d["ala"] / 2, 0.2 * d2, 0), (d["ala"] / 2, 0.6 * d2 + 2, h2))
        depth = np.maximum(depth, ala)
    vc = d2 + cd
    wall = np.minimum(_ellipse_depth(u, v - vc, cw + 7, cd + 6), -_ellipse_depth(u, v - vc, cw, cd))
    wall = np.minimum(np.minimum(wall, v - d2 + 1), h2 - np.abs(w))
    crest = _box_depth((au, v, w), (0, vc + cd + 9, 0), (3, 3.5, 0.8 * h2))
    depth = np.maximum(depth, np.maximum(wall, crest))
    if d["first"]:
        depth = np.maximum(depth, _box_depth((au, v, w), (cw + 4, vc, h2 + 4), (3, 3.5, 5)))
    return depth


def _sacral_box(d) -> tuple[np.ndarray, np.ndarray]:
    """Local (u, v, w) bounding box (lo, hi), float64 (3,) mm each, of ``_sacral_depth``."""
    d2, h2 = d["depth"] / 2, d["height"] / 2 + 0.6
    u_max = max(d["ala"], d["width"] / 2, d["canal_w"] + 7) + 1
    return (np.array([-u_max, -d2 - 1, -h2 - 1]),
            np.array([u_max, d2 + 2 * d["canal_d"] + 14, h2 + (10 if d["first"] else 1)]))


def _element_box(el: _Element) -> tuple[np.ndarray, np.ndarray]:
    """Local (u, v, w) bounding box (lo, hi), float64 (3,) mm each, of a spine element."""
    box = {"atlas": _atlas_box, "sacral": _sacral_box, "vertebra": _vertebra_box}[el.kind]
    return box(el.dims)


def _box_corners(centre: np.ndarray, frame: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """LPS positions float64 (8, 3) in mm of the corners of the local box [lo, hi] of a frame (columns u, v, w)."""
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T
    return centre + corners @ frame.T


def _ilium_depth(u, v, w, k, top, bottom):
    """Depth (mm, float64) of both iliac wings, in the frame of S1: arcs of a cylinder from the sacroiliac joint
    round the pelvis, flaring outwards cranially and thickening caudally towards the acetabulum.
    """
    centre_u = k * 78 + 0.15 * w
    du, dv = np.abs(u) - centre_u, v + k * 15
    radius = 40 * k
    half = 3.5 + 0.1 * np.maximum(0.0, bottom + 40 - w)
    depth = np.minimum(half - np.abs(np.hypot(du, dv) - radius), np.minimum(top - w, w - bottom))
    angle = np.arctan2(du, dv)  # 0 posterior, +pi/2 lateral
    return np.where((angle > -0.9) & (angle < 2.0), depth, -1.0)


# ---------------------------------------------------------------------------------------------------------------
# Rasterisation.


@dataclass
class _Grid:
    """Axis-aligned voxel grid: size (nx, ny, nz), spacing and origin float64 (3,) in LPS mm (x, y, z)."""

    size: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray

    def axis(self, a: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """LPS coordinates (mm, float32) of voxel centres along axis ``a`` (0 = x, 1 = y, 2 = z)."""
        stop = self.size[a] if stop is None else stop
        return (self.origin[a] + self.spacing[a] * np.arange(start, stop)).astype(np.float32)


class _Volumes:
    """The three uint8 (z, y, x) volumes painted together: material, VerSe label, tissue class."""

    def __init__(self, grid: _Grid):
        shape = grid.size[::-1]
        self.grid = grid
        self.material = np.zeros(shape, np.uint8)
        self.label = np.zeros(shape, np.uint8)
        self.tissue = np.zeros(shape, np.uint8)
        self.cortex_mm = max(1.2, 0.5 * float(grid.spacing.max()))

    def local_box(self, centre, frame, lo, hi):
        """Voxels of the grid inside the local box [lo, hi] of a frame, and their local coordinates.

        Args:
            centre: LPS mm (3,) origin of the local frame.
            frame: 3x3, columns are the local axes in LPS.
            lo, hi: local box corners (mm, (3,) in (u, v, w)).

        Returns:
            None when the box misses the grid, else (slices in (z, y, x) order, [u, v, w]) with u, v, w float32
            arrays of the box's (z, y, x) shape.
        """
        world = _box_corners(centre, frame, lo, hi)
        g = self.grid
        i0 = np.maximum(np.ceil((world.min(0) - g.origin) / g.spacing), 0).astype(int)
        i1 = np.minimum(np.floor((world.max(0) - g.origin) / g.spacing), np.array(g.size) - 1).astype(int)
        if np.any(i1 < i0):
            return None
        x = (g.axis(0, i0[0], i1[0] + 1) - np.float32(centre[0]))[None, None, :]
        y = (g.axis(1, i0[1], i1[1] + 1) - np.float32(centre[1]))[None, :, None]
        z = (g.axis(2, i0[2], i1[2] + 1) - np.float32(centre[2]))[:, None, None]
        local = [np.float32(frame[0, c]) * x + np.float32(frame[1, c]) * y + np.float32(frame[2, c]) * z
                 for c in range(3)]
        return (slice(i0[2], i1[2] + 1), slice(i0[1], i1[1] + 1), slice(i0[0], i1[0] + 1)), local

    def paint_bone(self, slices, depth, label: int = 0, tissue=0):
        """Bone where ``depth`` > 0 and no vertebra is yet: cortex within ``cortex_mm`` of the surface.

        ``depth`` is float (z, y, x) mm over the box ``slices`` (float64 from the shape primitives). ``tissue`` is a
        class or a (z, y, x) array of classes for the box; ``label`` 0 paints unlabelled bone.
        """
        labels = self.label[slices]
        mask = (depth > 0) & (labels == 0)
        self.material[slices][mask] = np.where(depth[mask] < self.cortex_mm, _CORTICAL, _CANCELLOUS)
        labels[mask] = label
        self.tissue[slices][mask] = tissue[mask] if isinstance(tissue, np.ndarray) else tissue


def _torso_profile(anat: _Anatomy, z: np.ndarray) -> dict[str, np.ndarray]:
    """Per-height body outline (mm) and spine position for heights ``z`` (mm, float (n,)): float64 arrays (n,), in mm
    except ``pos`` (profile position, as ``_Element.pos``) and ``tilt_cos`` (z component of the tangent, no unit)."""
    els = anat.elements
    ez = np.array([el.centre[2] for el in els])[::-1]
    epos = np.array([el.pos for el in els])[::-1]
    top, bottom = els[0].centre[2], els[-1].centre[2]
    pos = np.interp(z, np.concatenate([[bottom - 60], ez, [top + 40]]),
                    np.concatenate([[epos[0] + 2], epos, [epos[-1] - 2]]))
    prof = _interp_table(pos, _TORSO_POS, _TORSO_TABLE)
    for key in ("ax", "ay", "back", "paraspinal_x", "paraspinal_y"):
        prof[key] = prof[key] * anat.torso_scale
    prof["fat"] = prof["fat"] * anat.fat_mm
    s = anat.curve.s_at_z(z)
    point = anat.curve.point(s)
    prof["pos"], prof["s"] = pos, s
    prof["spine_x"], prof["spine_y"] = point[:, 0], point[:, 1]
    es = np.array([el.s for el in els])
    for key in ("depth", "width", "canal_w", "canal_d"):
        prof[key] = np.interp(s, es, [el.dims[key] for el in els])
    prof["tilt_cos"] = np.interp(s, anat.curve.s, anat.curve.tangent[:, 2])
    prof["centre_y"] = prof["spine_y"] + prof["back"] - prof["ay"]
    return prof


def _paint_soft_tissue(vol: _Volumes, anat: _Anatomy, chunk_voxels: int = 1 << 23) -> None:
    """Air, skin, fat, muscle, organs, lungs, trachea and paraspinal muscles, slab by slab along z."""
    g = vol.grid
    nx, ny, nz = g.size
    x = g.axis(0)[None, None, :]
    y = g.axis(1)[None, :, None]
    step = max(1, chunk_voxels // (nx * ny))
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        p = {key: val.astype(np.float32)[:, None, None] for key, val in _torso_profile(anat, g.axis(2, k0, k1)).items()}
        dx = x - p["spine_x"]
        dy = y - p["centre_y"]
        depth = _ellipse_depth(dx, dy, p["ax"], p["ay"])
        m = np.full(depth.shape, _AIR, np.uint8)
        m[depth >= 0] = _SKIN
        m[depth >= 2] = _FAT
        muscle = depth >= 2 + p["fat"]
        m[muscle] = _MUSCLE
        core = depth >= 2 + p["fat"] + p["wall"]
        m[core] = _ORGAN
        lung_f = np.interp(p["pos"], (7, 8.5, 11, 16, 17.5), (0, 0.6, 1, 1, 0)).astype(np.float32)
        if lung_f.max() > 0:
            inner_x = p["ax"] - 2 - p["fat"] - p["wall"]
            front = p["centre_y"] - p["ay"] + 2 + p["fat"] + p["wall"] + 10
            back = p["spine_y"] + 12
            ly = np.maximum((back - front) / 2 * lung_f, 1e-3)
            lx = np.maximum(0.34 * inner_x * lung_f, 1e-3)
            r2 = ((np.abs(dx) - 0.48 * inner_x) / lx) ** 2 + ((y - (back + front) / 2) / ly) ** 2
            m[(r2 < 1) & core] = _LUNG
        trachea_on = (p["pos"] > 4) & (p["pos"] < 10)
        if trachea_on.any():
            ty = p["spine_y"] - p["depth"] / 2 - 22
            m[(np.hypot(dx, y - ty) < 8) & trachea_on & muscle] = _AIR
        py = p["spine_y"] + p["depth"] / 2 + 2 * p["canal_d"] + 12
        m[((dx / p["paraspinal_x"]) ** 2 + ((y - py) / p["paraspinal_y"]) ** 2 < 1) & muscle] = _MUSCLE
        vol.material[k0:k1] = m


def _paint_canal(vol: _Volumes, anat: _Anatomy) -> None:
    """Spinal canal along the curve: epidural fat, dural sac (CSF) and the cord down to the conus."""
    g = vol.grid
    z = g.axis(2)
    p = _torso_profile(anat, z)
    s = p["s"]
    s_top, s_bottom = -15.0, anat.elements[-1].s
    on = (s >= s_top) & (s <= s_bottom)
    if not on.any():
        return
    # Canal centre: behind the body along the local v axis (approximately +y), AP radius stretched by the tilt.
    cy = p["spine_y"] + (p["depth"] / 2 + p["canal_d"]) * np.maximum(p["tilt_cos"], 0.3)
    cx = p["spine_x"]
    rx, ry = p["canal_w"], p["canal_d"] / np.maximum(p["tilt_cos"], 0.3)
    ks = np.flatnonzero(on)
    reach_x, reach_y = float(rx[ks].max()) + 2, float(ry[ks].max()) + 2
    i0 = max(0, int(np.floor((cx[ks].min() - reach_x - g.origin[0]) / g.spacing[0])))
    i1 = min(g.size[0], int(np.ceil((cx[ks].max() + reach_x - g.origin[0]) / g.spacing[0])) + 1)
    j0 = max(0, int(np.floor((cy[ks].min() - reach_y - g.origin[1]) / g.spacing[1])))
    j1 = min(g.size[1], int(np.ceil((cy[ks].max() + reach_y - g.origin[1]) / g.spacing[1])) + 1)
    k0, k1 = ks[0], ks[-1] + 1
    if i1 <= i0 or j1 <= j0:
        return
    def col(a: np.ndarray) -> np.ndarray:
        """Per-slice values (nz,) of the canal's slab as a float32 (z, 1, 1) column."""
        return a[k0:k1, None, None].astype(np.float32)

    dx = g.axis(0, i0, i1)[None, None, :] - col(cx)
    dy = g.axis(1, j0, j1)[None, :, None] - col(cy)
    canal = _ellipse_depth(dx, dy, col(rx), col(ry))
    region = vol.material[k0:k1, j0:j1, i0:i1]
    region[canal > 0] = _FAT
    dura = (canal > 1.5) & (col(s) <= anat.dura_end_s)
    region[dura] = _CSF
    cord_scale = np.clip((anat.cord_end_s - s) / 30.0, 0.0, 1.0)  # tapers over the last 3 cm (conus)
    cord_x = col(np.where(p["pos"] < 7, 6.5, 4.5) * cord_scale)
    cord_y = col(np.where(p["pos"] < 7, 4.5, 4.0) * cord_scale / np.maximum(p["tilt_cos"], 0.3))
    region[((dx / np.maximum(cord_x, 1e-3)) ** 2 + (dy / np.maximum(cord_y, 1e-3)) ** 2 < 1) & dura] = _CORD


def _paint_discs(vol: _Volumes, anat: _Anatomy) -> None:
    """Intervertebral discs: between the endplates of their neighbours, nucleus inside the annulus."""
    for upper, lower, s_mid in anat.discs:
        frame = anat.curve.frame(s_mid)
        centre = anat.curve.point(s_mid)
        a = min(upper.dims["width"], lower.dims["width"]) / 2  # within both endplates: no loose rim voxels
        b = min(upper.dims["depth"], lower.dims["depth"]) / 2
        gap = (lower.s - lower.half_height) - (upper.s + upper.half_height)
        box = vol.local_box(centre, frame, np.array([-a - 1, -b - 1, -gap / 2 - 6]),
                            np.array([a + 1, b + 1, gap / 2 + 6]))
        if box is None:
            continue
        slices, (u, v, w) = box
        offset = centre - upper.centre
        w_up = w * np.float32(frame[:, 2] @ upper.frame[:, 2]) + _project(u, v, frame, upper.frame[:, 2], offset)
        offset = centre - lower.centre
        w_lo = w * np.float32(frame[:, 2] @ lower.frame[:, 2]) + _project(u, v, frame, lower.frame[:, 2], offset)
        inside = (_ellipse_depth(u, v, a, b) > 0) & (w_up <= -upper.half_height) & (w_lo >= lower.half_height)
        free = inside & (vol.label[slices] == 0)
        nucleus = _ellipse_depth(u, v - 0.1 * b, 0.55 * a, 0.5 * b) > 0
        vol.material[slices][free] = np.where(nucleus[free], _NUCLEUS, _ANNULUS)
        vol.tissue[slices][free] = DISC


def _project(u, v, frame, axis, offset):
    """Component along ``axis`` of (offset + u * frame_u + v * frame_v), float32 (u, v: float32 arrays, mm).

    ``frame``: float64 (3, 3), columns the local u, v, w axes in LPS; ``axis``: float64 (3,) LPS unit vector;
    ``offset``: float64 (3,) LPS mm, the frame's origin minus the point measured from (an element's centre).
    """
    return (np.float32(frame[:, 0] @ axis) * u + np.float32(frame[:, 1] @ axis) * v
            + np.float32(offset @ axis))


def _paint_vertebrae(vol: _Volumes, anat: _Anatomy) -> None:
    """Every vertebra, C1 and sacral segment in its bounding box, then the iliac wings (unlabelled)."""
    for el in anat.elements:
        box = vol.local_box(el.centre, el.frame, *_element_box(el))
        if box is not None:
            slices, (u, v, w) = box
            if el.kind == "atlas":
                vol.paint_bone(slices, _atlas_depth(u, v, w, el.dims), el.label, BODY)
            elif el.kind == "sacral":
                vol.paint_bone(slices, _sacral_depth(u, v, w, el.dims), el.label, BODY)
            else:
                body, posterior = _vertebra_depths(u, v, w, el.dims)
                tissue = np.where(body >= posterior, BODY, POSTERIOR).astype(np.uint8)
                vol.paint_bone(slices, np.maximum(body, posterior), el.label, tissue)
        if el.kind == "sacral" and el.dims["first"]:
            k = el.dims["width"] / 48
            top, bottom = el.half_height + 45 * k, -el.half_height - 65 * k
            box = vol.local_box(el.centre, el.frame, np.array([-135 * k, -60 * k, bottom]),
                                np.array([135 * k, 30 * k, top]))
            if box is not None:
                slices, (u, v, w) = box
                vol.paint_bone(slices, _ilium_depth(u, v, w, k, top, bottom))


def _paint_ribs(vol: _Volumes, anat: _Anatomy) -> None:
    """A pair of ribs on every thoracic level (T13 included), as curved bars in the thoracic wall.

    Each rib leaves the tip of its transverse process, follows an ellipse inside the chest wall round to the front
    and drops caudally as it goes; it is drawn column by column (2.5D) inside its (y, x) bounding window.
    """
    thoracic = [el for el in anat.elements if el.region == "thoracic"]
    for number, el in enumerate(thoracic):
        d = el.dims
        rib = min(number, 11) + (0.5 if el.name == "T13" else 0.0)
        length = np.interp(rib, (0, 1, 2, 3, 4, 9, 10, 11, 12), (0.55, 0.72, 0.85, 0.93, 1, 1, 0.95, 0.85, 0.7))
        anterior = np.interp(rib, (0, 7, 9, 10, 11, 12), (0.55, 0.75, 0.7, 0.5, 0.0, -0.4))
        h2 = d["height"] / 2
        for side in (-1.0, 1.0):
            v_tp = d["depth"] / 2 + d["canal_d"] - 1 + d["transverse_tilt"] * (d["transverse"] - d["canal_w"])
            tip = el.centre + el.frame @ np.array([side * d["transverse"], v_tp, 0.2 * h2])
            p = _torso_profile(anat, np.array([tip[2]]))
            p = {key: float(val[0]) for key, val in p.items()}
            xc = p["spine_x"]
            reach = abs(tip[0] - xc)
            rx = max(length * (p["ax"] - 2 - p["fat"] - 0.5 * p["wall"]), reach + 10)
            front = p["centre_y"] - p["ay"] + 2 + p["fat"] + 0.5 * p["wall"]
            root = math.sqrt(max(1 - (reach / rx) ** 2, 0.05))
            ry = max((tip[1] - front) / (1 + root), 10.0)
            yc = tip[1] - ry * root
            _paint_rib(vol, side, xc, yc, rx, ry, reach, anterior, tip[2], 3.0, 5.5)


def _paint_rib(vol, side, xc, yc, rx, ry, reach, anterior, z0, half_t, half_h, drop=40.0):
    """One rib (see ``_paint_ribs``); lengths in mm, ``side`` +1 for the left, -1 for the right."""
    g = vol.grid
    x_lo, x_hi = (xc + reach - 3, xc + rx + half_t + 1) if side > 0 else (xc - rx - half_t - 1, xc - reach + 3)
    y_lo, y_hi = yc - ry * max(anterior, 0.0) - half_t - 1, yc + ry + half_t + 1
    z_lo = z0 - drop - half_h
    i0 = max(0, int(np.ceil((x_lo - g.origin[0]) / g.spacing[0])))
    i1 = min(g.size[0] - 1, int(np.floor((x_hi - g.origin[0]) / g.spacing[0])))
    j0 = max(0, int(np.ceil((y_lo - g.origin[1]) / g.spacing[1])))
    j1 = min(g.size[1] - 1, int(np.floor((y_hi - g.origin[1]) / g.spacing[1])))
    top_k = (z0 + half_h - g.origin[2]) / g.spacing[2]
    bottom_k = (z_lo - g.origin[2]) / g.spacing[2]
    if i1 < i0 or j1 < j0 or top_k < 0 or bottom_k > g.size[2] - 1:
        return
    dx = np.abs(g.axis(0, i0, i1 + 1)[None, :] - np.float32(xc))
    dy = g.axis(1, j0, j1 + 1)[:, None] - np.float32(yc)
    r = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    radial = np.hypot(dx, dy) * np.abs(1 - r) / np.maximum(r, 1e-6)
    on = (radial < half_t) & (dy >= -ry * anterior) & ~((dx < reach) & (dy > 0))
    jj, ii = np.nonzero(on)
    if jj.size == 0:
        return
    cos_phi = np.clip(dy[jj, 0] / (r[jj, ii] * ry), -1, 1)
    phi0 = math.acos(math.sqrt(max(1 - (reach / rx) ** 2, 0.0)))
    zc = z0 - drop * np.clip((np.arccos(cos_phi) - phi0) / (math.pi - phi0), 0, 1)
    k_lo = np.maximum(np.ceil((zc - half_h - g.origin[2]) / g.spacing[2]), 0).astype(int)
    k_hi = np.minimum(np.floor((zc + half_h - g.origin[2]) / g.spacing[2]), g.size[2] - 1).astype(int)
    n = int(max((k_hi - k_lo).max() + 1, 0))
    if n == 0:
        return
    kk = k_lo[:, None] + np.arange(n)[None, :]
    valid = kk <= k_hi[:, None]
    kk, which = kk[valid], np.nonzero(valid)[0]
    z = g.origin[2] + g.spacing[2] * kk
    depth = np.minimum(half_t - radial[jj, ii][which], half_h - np.abs(z - zc[which]))
    target = (kk, jj[which] + j0, ii[which] + i0)
    free = vol.label[target] == 0
    target = tuple(t[free] for t in target)
    vol.material[target] = np.where(depth[free] < vol.cortex_mm, _CORTICAL, _CANCELLOUS)
    vol.tissue[target] = 0


def _intensities(material: np.ndarray, modality: str, grid: _Grid, rng: np.random.Generator) -> sitk.Image:
    """Image from the (z, y, x) uint8 material volume: lookup, MR bias field, noise, partial-volume blur.

    CT: Hounsfield units, Gaussian noise, int16. MR: T2-like arbitrary units, smooth multiplicative bias field
    (brighter at the back, like a posterior spine coil), Rician noise, float32.
    """
    nz = material.shape[0]
    if modality == "ct":
        image = _CT_HU[material]
    else:
        image = _MR_T2[material]
        for a, strength in ((0, 0.15), (1, 0.35), (2, 0.25)):
            coord = np.linspace(-1.0, 1.0, grid.size[a], dtype=np.float32)
            if a == 1:
                bias = np.exp(strength * rng.uniform(0.6, 1.4) * coord)
            else:
                bias = np.exp(strength * rng.uniform(0.3, 1.0) * np.sin(np.pi * coord + rng.uniform(0, np.pi)))
            shape = [1, 1, 1]
            shape[2 - a] = -1
            image *= bias.astype(np.float32).reshape(shape)
    sigma = 40.0  # before the blur, which lowers it to about 12
    step = max(1, (1 << 23) // (material.shape[1] * material.shape[2]))
    for k0 in range(0, nz, step):
        slab = image[k0 : k0 + step]
        noise = rng.standard_normal(slab.shape, dtype=np.float32)
        noise *= sigma
        slab += noise
        if modality == "mr":
            noise = rng.standard_normal(slab.shape, dtype=np.float32)
            noise *= sigma
            np.hypot(slab, noise, out=slab)
    out = sitk.GetImageFromArray(image)
    del image
    out.SetSpacing([float(s) for s in grid.spacing])
    out.SetOrigin([float(o) for o in grid.origin])
    out = sitk.DiscreteGaussian(out, [float((0.5 * s) ** 2) for s in grid.spacing], 8, 0.05, True)
    if modality == "ct":
        out = sitk.Cast(sitk.Clamp(out, sitk.sitkFloat32, -1024.0, 3071.0), sitk.sitkInt16)
    return out


def _default_grid(fov: str, anat: _Anatomy, names: tuple[str, ...], size, spacing) -> _Grid:
    """Grid centred on the field of view's levels, the skin of the back just inside the posterior edge.

    By default the z extent covers the bodies of the field's levels (whole C1 and sacrum) plus 4 mm.
    """
    (nx_default, ny_default), spacing_default = _FOV_GRID[fov]
    spacing = np.asarray(spacing_default if spacing is None else spacing, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing must be three positive numbers (x, y, z mm), got "
                         f"{axes_text(spacing.ravel(), 'g') or 'none'}")
    wanted = set(_fov_levels(fov, names))
    z_lo, z_hi = np.inf, -np.inf
    for el in anat.elements:
        if el.name not in wanted:
            continue
        if el.kind == "vertebra":  # its body (and dens): the end levels' posterior elements may be cut
            d = el.dims
            lo = np.array([-d["width"] / 2, -d["depth"] / 2, -el.half_height])
            hi = np.array([d["width"] / 2, d["depth"] / 2, el.half_height + (15 if d["axis"] else 0)])
        else:
            lo, hi = _element_box(el)
        z = _box_corners(el.centre, el.frame, lo, hi)[:, 2]
        z_lo, z_hi = min(z_lo, z.min()), max(z_hi, z.max())
    z_lo, z_hi = z_lo - 4, z_hi + 4
    given = size is not None
    if not given:
        fov_mm = np.array([nx_default * spacing_default[0], ny_default * spacing_default[1]])
        nx, ny = (int(round(fov_mm[a] / spacing[a])) for a in range(2))
        size = (nx, ny, int(math.ceil((z_hi - z_lo) / spacing[2])) + 1)
    size = tuple(int(n) for n in size)
    if len(size) != 3 or min(size) < 2:
        raise ValueError(f"size must be three voxel counts >= 2 (x, y, z), got {axes_text(size)}" if given
                         else f"spacing {axes_text(spacing, 'g')} mm leaves fewer than 2 voxels along an "
                         f"axis of the {fov} field of view (size {axes_text(size)}); give a finer spacing")
    extent = (np.array(size) - 1) * spacing
    z0 = (z_lo + z_hi) / 2 - extent[2] / 2
    centres = np.array([el.centre for el in anat.elements if el.name in wanted])
    prof = _torso_profile(anat, np.linspace(max(z0, z_lo), min(z0 + extent[2], z_hi), 64))
    x0 = float(centres[:, 0].mean()) - extent[0] / 2
    # Vertebral bodies at 55 % of the way from front to back, or further forward (not beyond the middle) to
    # keep the skin of the back inside the field.
    spine_y = float(centres[:, 1].mean())
    back = float(np.max(prof["spine_y"] + prof["back"]))
    y0 = max(spine_y - 0.55 * extent[1], min(back + 0.04 * extent[1] - extent[1], spine_y - 0.5 * extent[1]))
    return _Grid(size, spacing, np.array([x0, y0, z0]))


def make_phantom(modality: str = "ct", fov: str = "whole", size=None, spacing=None, seed: int = 0,
                 levels=None) -> Phantom:
    """Generate a synthetic spine image with its vertebra labels and tissue classes.

    Args:
        modality: ``"ct"`` (int16 Hounsfield units) or ``"mr"`` (float32 T2-like).
        fov: ``"whole"`` (C1..sacrum), ``"cervical"`` (C1..T2), ``"thoracic"`` (C7..L1) or ``"lumbar"``
            (T11..sacrum): the levels the image is centred on (with ``levels``, the same rule on that list).
        size: (x, y, z) voxel counts; default from ``fov`` (z covers its levels).
        spacing: (x, y, z) voxel size in mm; default from ``fov``.
        seed: the anatomy (curvature, sizes, fat) and the noise are deterministic per seed.
        levels: level names (or VerSe label values), cranio-caudal, replacing C1..L5 + S1 (e.g. with ``"T13"``
            or ``"L6"``, or without T12 for an 11-thoracic spine); ``"S1"`` stands for the whole sacrum. The
            levels are stacked as given.

    Returns:
        A ``Phantom`` whose three images share one axis-aligned LPS grid (see the module docstring).

    Raises:
        ValueError: unknown modality or fov, a seed below 0, bad size or spacing (or a grid that holds no
            vertebra), levels out of order or unknown, or a fov whose region is missing from ``levels``.
    """
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a whole number, 0 or more, got {seed!r}")
    if fov not in FOVS:
        raise ValueError(f"fov must be one of {', '.join(FOVS)}, got {fov!r}")
    try:
        names = _check_levels(levels)
    except KeyError as err:
        raise ValueError(str(err.args[0])) from None
    anatomy_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)
    anat = _build_anatomy(names, np.random.default_rng(anatomy_seed))
    grid = _default_grid(fov, anat, names, size, spacing)
    log.debug("phantom %s %s: size %s spacing %s", modality, fov, grid.size, grid.spacing.tolist())
    vol = _Volumes(grid)
    _paint_soft_tissue(vol, anat)
    _paint_canal(vol, anat)
    _paint_discs(vol, anat)
    _paint_vertebrae(vol, anat)
    _paint_ribs(vol, anat)
    if not vol.label.any():
        raise ValueError(f"a grid of {axes_text(grid.size)} voxels of "
                         f"{axes_text(grid.spacing, 'g')} mm holds no vertebra of the {fov} field of "
                         "view; give another size or spacing")
    image = _intensities(vol.material, modality, grid, np.random.default_rng(noise_seed))
    del vol.material
    out = []
    for array in (vol.label, vol.tissue):
        img = sitk.GetImageFromArray(array)
        img.CopyInformation(image)
        out.append(img)
    return Phantom(image, out[0], out[1])
