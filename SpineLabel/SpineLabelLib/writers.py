"""Output files of one labelled image: label map, Slicer segmentation and markups, VerSe centroids, report, snapshot.

For an input ``NAME`` the outputs are ``NAME`` + each of ``OUTPUT_SUFFIXES``:

- ``NAME_seg.nii.gz``: uint8 VerSe label map on the input grid.
- ``NAME.seg.nrrd``: 3D Slicer segmentation (one labelmap layer, VerSe label values, one segment per level with its
  colour and SNOMED CT terminology), on the input grid.
- ``NAME.mrk.json``: Slicer markups fiducial list, one control point per vertebra at its body centroid (the arch's,
  for a vertebra whose body lies above the view; ``result.Vertebra.centroid_lps_mm``), LPS mm.
- ``NAME_ctd.json``: VerSe centroid list. ``X, Y, Z`` are continuous voxel coordinates of the body centroid in the
  image reoriented to the axis codes of ``direction`` (VerSe writes ``["P", "I", "R"]``: the first voxel axis points
  posterior, the second inferior, the third to the right), i.e. the voxel coordinates
  ``sitk.DICOMOrient(image, "PIR")`` would give; no resampling is involved, only an axis permutation and flips.
  Each entry also carries ``name`` and ``world_lps_mm``.
- ``NAME_report.json``: input geometry, model, per-vertebra results, warnings, timings, SpineLabel version.
- ``NAME_snapshot.png``: mid-sagittal and mid-coronal views with the coloured labels and level names.

Every file is written under a temporary name beside its final one and renamed when complete
(:func:`SpineLabelLib.io.atomic_path`); :func:`write_all` renames the six only once all of them are written.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from . import __version__
from .edits import check_image_grid
from .io import (atomic_path, atomic_paths, folder_lock, make_writable_folder, no_empty_new_folders, write_errors_named,
                 write_nifti)
from .result import Geometry, SpineLabeling, nonzero_box
from .sequence import NOTHING_FOUND, confidence_text
from .vertebrae import terminology_entry

__all__ = [
    "OUTPUT_SUFFIXES",
    "VERSE_DIRECTION",
    "output_paths",
    "report_path",
    "check_replaceable",
    "write_label_map",
    "segmentation_header",
    "write_segmentation",
    "write_markups",
    "write_centroids",
    "write_report",
    "write_snapshot",
    "write_all",
    "verse_voxel_coordinates",
]

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = ("_seg.nii.gz", ".seg.nrrd", ".mrk.json", "_ctd.json", "_report.json", "_snapshot.png")
VERSE_DIRECTION = ("P", "I", "R")
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_OPPOSITE = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}
_SNAPSHOT_ALPHA = 0.4
_SNAPSHOT_SIDE_PX = (256, 1024)  # the longer side of a view lies in this range: small images are enlarged


def output_paths(outdir: str | os.PathLike, name: str) -> list[Path]:
    """The six output paths of case ``name`` in ``outdir``, in ``OUTPUT_SUFFIXES`` order."""
    return [Path(outdir) / f"{name}{suffix}" for suffix in OUTPUT_SUFFIXES]


def report_path(outdir: str | os.PathLike, name: str) -> Path:
    """The report of case ``name`` in ``outdir``: an earlier run's outputs come with it (``check_replaceable``)."""
    return output_paths(outdir, name)[OUTPUT_SUFFIXES.index("_report.json")]


def check_replaceable(outdir: str | os.PathLike, name: str) -> None:
    """Raise ``FileExistsError`` when an output of case ``name`` would replace a file in ``outdir`` that is no output
    of an earlier run: an earlier run's outputs come with its report, and a file of an output's name without one is
    someone else's (a reference mask named ``NAME_seg.nii.gz`` beside its scan)."""
    report = report_path(outdir, name)
    # a folder of an output's name (p_report.json/) is no earlier run's report: refused now, not after the labelling
    odd = next((p for p in output_paths(outdir, name) if p.exists() and not p.is_file()), None)
    if odd is not None:
        raise FileExistsError(f"{odd} is a folder (or another non-file) where an output file would go; remove it")
    theirs = [p for p in output_paths(outdir, name) if p.is_file()] if not report.exists() else []
    if theirs:
        raise FileExistsError(f"{theirs[0]} would be replaced, and it is no output of an earlier run (no {report.name} "
                              "beside it)")


def _check_grid(result: SpineLabeling) -> None:
    expected = tuple(reversed(result.geometry.size))
    if tuple(result.components.shape) != expected:
        raise ValueError(
            f"components array has shape {tuple(result.components.shape)} but the input grid of size "
            f"{result.geometry.size} (i, j, k) needs (z, y, x) = {expected}"
        )


def _check_centroids(result: SpineLabeling) -> None:
    """Refuse vertebrae whose centroid is not three finite numbers (LPS mm): JSON has no NaN."""
    bad = [v.id for v in result.vertebrae
           if len(v.centroid_lps_mm) != 3 or not np.all(np.isfinite(v.centroid_lps_mm))]
    if bad:
        raise ValueError(f"vertebrae {bad}: a centroid is three finite numbers (LPS mm)")


def _check_suffix(path: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> None:
    """Refuse a ``path`` that a reader would take for another format than the ``what`` written there."""
    if not str(path).lower().endswith(suffixes):
        raise ValueError(f"{path}: a {what} is written as {' or '.join(suffixes)}")


def _direction_matrix(geometry: Geometry) -> np.ndarray:
    """float64 (3, 3) direction cosines; column c is the LPS direction of voxel axis c."""
    return np.asarray(geometry.direction, dtype=float).reshape(3, 3)


def _axis_codes(geometry: Geometry) -> str:
    """Closest anatomical direction letter of each voxel axis (i, j, k), e.g. ``"LPS"`` (toward L, P, S)."""
    codes = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(x) for x in geometry.direction])
    if len(codes) != 3 or len({_OPPOSITE[c] if c in "RAI" else c for c in codes}) != 3:
        raise ValueError(f"direction {geometry.direction} does not map to three distinct anatomical axes ({codes!r})")
    return codes


# ---------------------------------------------------------------------------------------------------- label map


def _write_label_map_to(result: SpineLabeling, path: Path, labels: np.ndarray) -> None:
    """Write ``labels``, the uint8 (z, y, x) VerSe label map on the input grid, as NIfTI at ``path`` (the input
    grid's voxel-to-RAS mm affine as qform and sform, units mm)."""
    _check_grid(result)
    write_nifti(labels, result.geometry, path)


def write_label_map(result: SpineLabeling, path: str | os.PathLike) -> None:
    """Write the uint8 VerSe label map (``result.label_map()``) on the input grid (``NAME_seg.nii.gz``; NIfTI, so
    ``path`` ends in ``.nii.gz`` or ``.nii``)."""
    _check_suffix(path, (".nii.gz", ".nii"), "NIfTI label map")
    with atomic_path(path) as tmp:
        _write_label_map_to(result, tmp, result.label_map())
    log.info("wrote label map %s", path)


# ------------------------------------------------------------------------------------------- Slicer segmentation


def _segments(result: SpineLabeling) -> list[tuple[str, list[int]]]:
    """Level names in chain order, each with the ids of the components carrying it (normally exactly one)."""
    segments: dict[str, list[int]] = {}
    for v in result.vertebrae:
        segments.setdefault(v.name, []).append(v.id)
    for name, ids in segments.items():
        if len(ids) > 1:
            log.warning("components %s all carry level %s; they share one segment", ids, name)
    return list(segments.items())


def _vector(values) -> str:
    """An NRRD vector, ``(x,y,z)``."""
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def segmentation_header(result: SpineLabeling, labels: np.ndarray) -> list[str]:
    """Header lines of the Slicer segmentation (``.seg.nrrd``) of ``result``, without the blank line ending them.

    One labelmap layer holds every segment: ``labels``, the uint8 VerSe label map ``result.label_map()``, (z, y, x)
    on the input grid, gzip-compressed. Segment N (0-based, chain order) is one vertebral level with ID and name the
    level name (``"L1"``), its VerSe label value, colour and SNOMED CT terminology entry, and its voxel extent
    ``i0 i1 j0 j1 k0 k1`` (``0 -1 0 -1 0 -1`` when it has no voxel). Geometry: ``space`` left-posterior-superior,
    ``space directions`` one vector per voxel axis i, j, k (mm), ``space origin`` (LPS mm).
    """
    _check_grid(result)
    geometry = result.geometry
    labelled = nonzero_box(labels)
    # each label value's box, found in the box of all labels and moved back to the whole grid
    boxes = [] if labelled is None else [
        None if box is None else tuple(slice(s.start + o.start, s.stop + o.start) for s, o in zip(box, labelled))
        for box in ndimage.find_objects(labels[labelled])]
    axes = (_direction_matrix(geometry) * np.asarray(geometry.spacing)).T  # row c: voxel axis c in LPS mm
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "type: uint8",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(n) for n in geometry.size),
        "space directions: " + " ".join(_vector(axis) for axis in axes),
        "kinds: domain domain domain",
        "encoding: gzip",
        "space origin: " + _vector(geometry.origin),
    ]
    for n, (name, ids) in enumerate(_segments(result)):
        level = result.by_id(ids[0]).level
        box = boxes[level.label - 1] if level.label <= len(boxes) else None
        # box slices are along (z, y, x); the extent is along (i, j, k)
        extent = [0, -1, 0, -1, 0, -1] if box is None else [int(x) for s in box[::-1] for x in (s.start, s.stop - 1)]
        lines += [
            f"Segment{n}_ID:={name}",
            f"Segment{n}_Name:={name}",
            f"Segment{n}_NameAutoGenerated:=0",
            f"Segment{n}_Color:=" + " ".join(f"{c:.6g}" for c in level.colour),
            f"Segment{n}_ColorAutoGenerated:=0",
            f"Segment{n}_LabelValue:={level.label}",
            f"Segment{n}_Layer:=0",
            f"Segment{n}_Extent:=" + " ".join(str(x) for x in extent),
            f"Segment{n}_Tags:=TerminologyEntry:{terminology_entry(level)}|",
        ]
    lines += [
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    return lines


def _write_segmentation_to(result: SpineLabeling, path: Path, labels: np.ndarray) -> None:
    """Write ``labels``, the uint8 (z, y, x) VerSe label map on the input grid, as the ``.seg.nrrd`` at ``path``:
    the :func:`segmentation_header` lines, then the voxels gzip-compressed (i fastest)."""
    header = "\n".join(segmentation_header(result, labels)) + "\n\n"
    # the (z, y, x) array's memory is in NRRD's order (i fastest): it is compressed a slab at a time, without a copy
    voxels = np.ascontiguousarray(labels)
    gzip = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS | 16)  # fast level; wbits: gzip framing
    slab = max(1, (1 << 24) // voxels[0].size)  # about 16 MB
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        for z in range(0, voxels.shape[0], slab):
            f.write(gzip.compress(voxels[z : z + slab]))
        f.write(gzip.flush())


def write_segmentation(result: SpineLabeling, path: str | os.PathLike) -> None:
    """Write the 3D Slicer segmentation ``NAME.seg.nrrd`` (see :func:`segmentation_header`)."""
    _check_suffix(path, (".seg.nrrd",), "3D Slicer segmentation")
    with atomic_path(path) as tmp:
        _write_segmentation_to(result, tmp, result.label_map())
    log.info("wrote segmentation %s", path)


# ---------------------------------------------------------------------------------------------------- markups


def _markups_document(result: SpineLabeling) -> dict:
    points = [
        {
            "id": str(v.id),
            "label": v.name,
            "description": f"confidence {confidence_text(v.confidence)}",
            "associatedNodeID": "",
            "position": [float(x) for x in v.centroid_lps_mm],
            "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": bool(v.fixed),
            "visibility": True,
            "positionStatus": "defined",
        }
        for v in result.vertebrae
    ]
    display = {
        "visibility": True,
        "opacity": 1.0,
        "color": [0.4, 1.0, 1.0],
        "selectedColor": [1.0, 0.5, 0.5],
        "activeColor": [0.4, 1.0, 0.0],
        "propertiesLabelVisibility": False,
        "pointLabelsVisibility": True,
        "textScale": 3.0,
        "glyphType": "Sphere3D",
        "glyphScale": 2.0,
        "glyphSize": 5.0,
        "useGlyphScale": True,
        # every level name shows in a slice view, as the module sets its points (not only those within half a slice)
        "sliceProjection": True,
        "sliceProjectionUseFiducialColor": True,
        "handlesInteractive": False,
        "snapMode": "toVisibleSurface",
    }
    markup = {
        "type": "Fiducial",
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        # Slicer numbers a point added later one past this, unchecked: the ids have gaps after a delete
        "lastUsedControlPointNumber": max((v.id for v in result.vertebrae), default=0),
        "controlPoints": points,
        "measurements": [],
        "display": display,
    }
    return {"@schema": MARKUPS_SCHEMA, "markups": [markup]}


def write_json(document, path: Path) -> None:
    """Write ``document`` to ``path`` as indented JSON (non-finite numbers refused); callers make it atomic."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, allow_nan=False)
        f.write("\n")


def write_markups(result: SpineLabeling, path: str | os.PathLike) -> None:
    """Write ``NAME.mrk.json``: a Slicer fiducial list (schema markups-schema-v1.0.3), one control point per
    vertebra in chain order: id = component id, label = level name, position = body centroid (LPS mm), locked
    when the label was fixed by a user, description = the level's confidence."""
    _check_suffix(path, (".mrk.json",), "3D Slicer markups file")
    _check_centroids(result)
    with atomic_path(path) as tmp:
        write_json(_markups_document(result), tmp)
    log.info("wrote markups %s", path)


# ---------------------------------------------------------------------------------------------- VerSe centroids


def verse_voxel_coordinates(geometry: Geometry, lps_mm: np.ndarray,
                            direction: tuple[str, str, str] = VERSE_DIRECTION) -> np.ndarray:
    """Continuous voxel coordinates of LPS points in the image reoriented to ``direction``.

    ``direction`` names where each voxel axis of the reoriented image points (VerSe: ``("P", "I", "R")``). The
    reorientation is the axis permutation and flips ``sitk.DICOMOrient`` applies (an axis pointing the opposite
    way is flipped: index ``n - 1 - i``); oblique images use their closest anatomical axes.

    Args:
        geometry: the image grid.
        lps_mm: points (..., 3) in LPS mm, float.

    Returns:
        float64 array (..., 3): coordinates along the reoriented axes, in ``direction`` order (VerSe X, Y, Z).
    """
    codes = _axis_codes(geometry)
    ijk = geometry.lps_to_index(lps_mm)
    out = np.empty_like(ijk)
    for t, letter in enumerate(direction):
        if letter in codes:
            out[..., t] = ijk[..., codes.index(letter)]
        elif _OPPOSITE[letter] in codes:
            axis = codes.index(_OPPOSITE[letter])
            out[..., t] = geometry.size[axis] - 1 - ijk[..., axis]
        else:
            raise ValueError(f"direction {direction} is not a set of three anatomical axes")
    return out


def _centroid_document(result: SpineLabeling) -> list:
    entries: list = [{"direction": list(VERSE_DIRECTION)}]
    for v in result.vertebrae:
        x, y, z = verse_voxel_coordinates(result.geometry, np.asarray(v.centroid_lps_mm, dtype=float))
        entries.append({
            "label": v.label,
            "X": round(float(x), 2),
            "Y": round(float(y), 2),
            "Z": round(float(z), 2),
            "name": v.name,
            "world_lps_mm": [round(float(c), 3) for c in v.centroid_lps_mm],
        })
    return entries


def write_centroids(result: SpineLabeling, path: str | os.PathLike) -> None:
    """Write ``NAME_ctd.json`` in the VerSe centroid format: ``[{"direction": ["P", "I", "R"]}, {"label": 20,
    "X": .., "Y": .., "Z": .., "name": "L1", "world_lps_mm": [..]}, ...]``; X, Y, Z as in
    :func:`verse_voxel_coordinates` (voxels, 0.01 precision), ``world_lps_mm`` the body centroid in LPS mm."""
    _check_suffix(path, (".json",), "centroid file")
    _check_centroids(result)
    with atomic_path(path) as tmp:
        write_json(_centroid_document(result), tmp)
    log.info("wrote centroids %s", path)


# ------------------------------------------------------------------------------------------------------ report


def _report_document(result: SpineLabeling, input_path: str | os.PathLike | None) -> dict:
    source = input_path if input_path is not None else result.source
    return {
        "input": {"path": os.path.abspath(source) if source else "", **result.geometry.as_dict(),
                  "modality": result.modality},
        "model": dict(result.model),
        "vertebrae": [
            {
                "id": int(v.id),
                "name": v.name,
                "label": v.label,
                "centroid_lps_mm": [float(c) for c in v.centroid_lps_mm],
                "volume_ml": float(v.volume_ml),
                "confidence": float(v.confidence),
                "fixed": bool(v.fixed),
            }
            for v in result.vertebrae
        ],
        "gaps_mm": [float(g) for g in result.gaps_mm],
        "spine_probability": result.spine_probability,
        "orientation_margin": result.orientation_margin,
        "warnings": list(result.warnings),
        "timings_s": {k: float(t) for k, t in result.timings_s.items()},
        "spinelabel_version": __version__,
    }


def write_report(result: SpineLabeling, path: str | os.PathLike, input_path: str | os.PathLike | None = None) -> None:
    """Write ``NAME_report.json``: input (path, size, spacing_mm, origin_lps_mm, direction, modality), model,
    vertebrae (id, name, label, centroid_lps_mm, volume_ml, confidence, fixed), gaps_mm, spine_probability and
    orientation_margin (see ``SpineLabeling``), warnings, timings_s and spinelabel_version. ``input_path`` defaults
    to ``result.source``."""
    _check_suffix(path, (".json",), "report")
    _check_centroids(result)
    with atomic_path(path) as tmp:
        write_json(_report_document(result, input_path), tmp)
    log.info("wrote report %s", path)


# ---------------------------------------------------------------------------------------------------- snapshot


def _view_axes(codes: str, fixed_pair: str, horizontal_pair: str) -> tuple[int, int, int, bool, bool]:
    """Voxel axes (fixed, vertical, horizontal) of a view and whether rows/columns must be flipped so that
    superior is at the top and the horizontal axis runs toward the second letter of ``horizontal_pair``."""

    def axis(pair: str) -> int:
        return next(c for c in range(3) if codes[c] in pair)

    fixed, vertical, horizontal = axis(fixed_pair), axis("SI"), axis(horizontal_pair)
    return fixed, vertical, horizontal, codes[vertical] == "S", codes[horizontal] == horizontal_pair[0]


def _plane(volume: np.ndarray, fixed: int, vertical: int, horizontal: int, index: int, flip_rows: bool,
           flip_cols: bool) -> np.ndarray:
    """2D (rows = vertical voxel axis, columns = horizontal voxel axis) slice of a (z, y, x) volume of any dtype
    (intensities, component ids) at voxel ``index`` along voxel axis ``fixed`` (0 = i/x, 1 = j/y, 2 = k/z), a view
    of the same dtype; only that plane is read."""
    view = np.transpose(volume, (2 - vertical, 2 - horizontal, 2 - fixed))[:, :, index]
    return view[::-1 if flip_rows else 1, ::-1 if flip_cols else 1]


def _resample_indices(n: int, spacing: float, display_spacing: float) -> tuple[int, np.ndarray]:
    """Output length and nearest source index (int64 (length,)) of each output pixel for a 1D axis."""
    out = max(1, int(round(n * spacing / display_spacing)))
    src = np.minimum(((np.arange(out) + 0.5) * display_spacing / spacing).astype(int), n - 1)
    return out, src


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill, font, size: tuple[int, int]
               ) -> None:
    """``text`` centred vertically on ``xy`` (x, y pixels), its left edge at x, moved inside a panel of ``size``
    (width, height pixels) where it would cross an edge."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = min(max(xy[0], 1), size[0] - (right - left) - 1)
    y = min(max(xy[1] - (bottom - top) / 2, 1), size[1] - bottom - 1)
    draw.text((x, y), text, fill=fill, font=font, stroke_width=1, stroke_fill=(0, 0, 0))


def _spread_names(draw: ImageDraw.ImageDraw, names: list, font, size: tuple[int, int], title: tuple[float, float]
                  ) -> list:
    """``names`` ((x, y) pixels, name, colour) with their heights moved apart so that no two names, nor a name and
    the panel's title (its right and bottom edges ``title``), are drawn over one another where the panel's height
    allows: vertebrae whose centroids lie close in the view (one cut by the top of the view) had their names overlap."""
    order = sorted(range(len(names)), key=lambda i: names[i][0][1])
    ys = {i: float(names[i][0][1]) for i in order}
    boxes = {i: draw.textbbox((0, 0), names[i][1], font=font, stroke_width=1) for i in order}
    half = {i: (boxes[i][3] - boxes[i][1]) / 2 + 1 for i in order}  # half a name's height, and a pixel
    previous = None
    for i in order:  # downwards: each name below the title (where they meet) and below the one above it
        low = half[i] + (title[1] if names[i][0][0] < title[0] else 0.0)
        if previous is not None:
            low = max(low, ys[previous] + half[previous] + half[i])
        ys[i], previous = max(ys[i], low), i
    following = None
    for i in reversed(order):  # upwards from the bottom edge, where the names ran off it
        high = size[1] - half[i]
        if following is not None:
            high = min(high, ys[following] - half[following] - half[i])
        ys[i], following = min(ys[i], high), i
    return [((names[i][0][0], ys[i]), names[i][1], names[i][2]) for i in range(len(names))]


def _snapshot_panel(result: SpineLabeling, image_zyx: np.ndarray, axes, index: int, window: tuple[float, float],
                    colours: np.ndarray, title: str) -> Image.Image:
    """One view: the plane at voxel ``index`` along ``axes[0]`` of ``image_zyx`` (the input intensities, any
    numeric dtype, (z, y, x)) and of ``result.components``, windowed to ``window`` (intensity units), resampled to
    isotropic display pixels, with ``colours`` (float32 (max id + 1, 4): RGB 0-1 and 1 where the id is a
    vertebra, indexed by component id) blended in and the level names written beside the vertebrae."""
    fixed, vertical, horizontal, flip_rows, flip_cols = axes
    geometry = result.geometry
    grey = _plane(image_zyx, fixed, vertical, horizontal, index, flip_rows, flip_cols).astype(np.float32)
    ids = _plane(result.components, fixed, vertical, horizontal, index, flip_rows, flip_cols)
    sp_v, sp_h = geometry.spacing[vertical], geometry.spacing[horizontal]
    n_v, n_h = grey.shape
    extent_mm = max(n_v * sp_v, n_h * sp_h)
    display_spacing = min(max(min(sp_v, sp_h), extent_mm / _SNAPSHOT_SIDE_PX[1]), extent_mm / _SNAPSHOT_SIDE_PX[0])
    height, rows = _resample_indices(n_v, sp_v, display_spacing)
    width, cols = _resample_indices(n_h, sp_h, display_spacing)

    lo, hi = window
    scaled = np.clip((grey - lo) / (hi - lo), 0.0, 1.0)
    scaled = np.asarray(Image.fromarray(scaled, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    rgb = np.repeat(scaled[:, :, None], 3, axis=2)
    ids = np.clip(ids[rows][:, cols].astype(np.int64), 0, len(colours) - 1)
    labelled = colours[ids, 3] > 0
    rgb[labelled] = (1 - _SNAPSHOT_ALPHA) * rgb[labelled] + _SNAPSHOT_ALPHA * colours[ids[labelled], :3]
    font = ImageFont.load_default(size=max(10, min(height, width) // 25))
    names = []  # (x, y) pixels, name, colour: each level name right of its vertebra
    for v in result.vertebrae:
        ijk = geometry.lps_to_index(np.asarray(v.centroid_lps_mm, dtype=float))
        r = n_v - 1 - ijk[vertical] if flip_rows else ijk[vertical]
        c = n_h - 1 - ijk[horizontal] if flip_cols else ijk[horizontal]
        y, x = (r + 0.5) * sp_v / display_spacing, (c + 0.5) * sp_h / display_spacing
        in_view = np.nonzero((ids == v.id).any(axis=0))[0]
        x_text = in_view.max() + 4 if in_view.size else x + 10 / display_spacing
        names.append(((x_text, y), v.name, tuple(int(round(255 * ch)) for ch in v.level.colour)))
    # a black margin on the right where names would run off a narrow view (a sagittal stack of a few centimetres)
    right = max((xy[0] + font.getlength(name) + 2 for xy, name, _ in names), default=0.0)
    panel = Image.new("RGB", (max(width, int(np.ceil(right))), height), (0, 0, 0))
    panel.paste(Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(panel)
    draw.text((4, 2), title, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    title_right, title_bottom = draw.textbbox((4, 2), title, font=font, stroke_width=1)[2:]
    for xy, name, colour in _spread_names(draw, names, font, panel.size, (title_right, title_bottom)):
        _draw_text(draw, xy, name, colour, font, panel.size)
    if not result.vertebrae:
        _draw_text(draw, (width / 2 - 60, height / 2), NOTHING_FOUND, (255, 255, 0), font, panel.size)
    return panel


def _snapshot(result: SpineLabeling, image: sitk.Image) -> Image.Image:
    _check_grid(result)
    geometry = result.geometry
    if tuple(image.GetSize()) != geometry.size:
        raise ValueError(f"image size {image.GetSize()} differs from the labelling grid {geometry.size}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("snapshot needs a scalar image")
    image_zyx = sitk.GetArrayViewFromImage(image)
    codes = _axis_codes(geometry)
    sagittal = _view_axes(codes, "LR", "AP")  # anterior left, superior up
    coronal = _view_axes(codes, "AP", "RL")  # patient right on the left (radiological), superior up
    if result.vertebrae:
        centroids = np.array([v.centroid_lps_mm for v in result.vertebrae], dtype=float)
        centre = np.median(geometry.lps_to_index(centroids), axis=0)
    else:
        centre = (np.asarray(geometry.size) - 1) / 2.0
    index = {axis: int(np.clip(round(centre[axis]), 0, geometry.size[axis] - 1)) for axis in range(3)}

    planes = [_plane(image_zyx, *view[:3], index[view[0]], *view[3:]) for view in (sagittal, coronal)]
    sample = np.concatenate([p.ravel()[:: max(1, p.size // 200_000)] for p in planes]).astype(np.float64)
    lo, hi = np.percentile(sample, [1.0, 99.0])
    if hi <= lo:
        hi = lo + 1.0

    max_id = int(result.components.max(initial=0))
    colours = np.zeros((max(max_id, max((v.id for v in result.vertebrae), default=0)) + 1, 4), dtype=np.float32)
    for v in result.vertebrae:
        colours[v.id] = (*v.level.colour, 1.0)

    panels = [
        _snapshot_panel(result, image_zyx, view, index[view[0]], (float(lo), float(hi)), colours, title)
        for view, title in ((sagittal, "sagittal"), (coronal, "coronal"))
    ]
    gap = 4
    canvas = Image.new("RGB", (sum(p.width for p in panels) + gap, max(p.height for p in panels)), (0, 0, 0))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (panels[0].width + gap, 0))
    return canvas


def _write_snapshot_to(result: SpineLabeling, image: sitk.Image, path: Path) -> None:
    _snapshot(result, image).save(path, format="PNG")


def write_snapshot(result: SpineLabeling, image: sitk.Image, path: str | os.PathLike) -> None:
    """Write ``NAME_snapshot.png``: mid-sagittal (anterior left) and mid-coronal (patient right on the left)
    planes through the median vertebra centroid, side by side, superior at the top, at isotropic display spacing
    (the finer in-plane spacing, but the longer side of a view kept within 256-1024 px), windowed to the 1st-99th
    intensity percentile of the two planes, labels overlaid in their level colours (alpha 0.4) with each level's name
    beside it. With no vertebra the planes pass through the image centre and read "no vertebrae found".

    Args:
        result: the labelling; ``result.components`` is (z, y, x) on ``image``'s grid.
        image: the input image (scalar, any pixel type), on the labelling's grid (size, spacing, origin, direction).
        path: the PNG to write.

    Raises:
        TypeError: ``image`` is no ``SimpleITK.Image``.
        ValueError: ``image`` is not on the labelling's grid.
    """
    _check_suffix(path, (".png",), "snapshot")
    image = check_image_grid(result, image)
    with atomic_path(path) as tmp:
        _write_snapshot_to(result, image, tmp)
    log.info("wrote snapshot %s", path)


# ------------------------------------------------------------------------------------------------------ all six


def write_all(result: SpineLabeling, image: sitk.Image, outdir: str | os.PathLike, name: str,
              input_path: str | os.PathLike | None = None) -> list[Path]:
    """Write the six outputs of case ``name`` into ``outdir`` (created if missing), all or nothing.

    Each file is first written under a temporary name; only when all six are complete are they renamed to their
    final names (:func:`SpineLabelLib.io.atomic_paths`, which says what happens on failure).

    Args:
        result: the labelling.
        image: the labelled image, on the labelling's grid (size, spacing, origin, direction): the snapshot draws it.
        outdir: output folder.
        name: case name, the start of each file name.
        input_path: the image's file or folder, recorded in the report (``result.source`` when None).

    Returns:
        The six paths, in ``OUTPUT_SUFFIXES`` order.

    Raises:
        TypeError: ``image`` is no ``SimpleITK.Image`` (a numpy array, a path), or ``name`` is no string.
        ValueError: ``image`` is not on the labelling's grid, or ``name`` is empty, ``.``, ``..`` or holds a folder.
        PermissionError: ``outdir`` is not writable.
        FileExistsError: an output would replace a file that is no output of an earlier run (``check_replaceable``).
        OSError: ``outdir`` cannot be created (for example a path below a regular file) or written to, or a write
            failed.
    """
    image = check_image_grid(result, image)
    _check_centroids(result)  # before the label map is made
    if not isinstance(name, str):
        raise TypeError(f"case name must be a string, not {type(name).__name__}")
    if name in ("", ".", "..") or any(sep in name for sep in ("/", "\\")):
        raise ValueError(f"case name {name!r}: the start of a file name is needed, without folders")
    outdir = Path(outdir)
    with no_empty_new_folders(outdir):  # a failed write leaves no folder it made
        try:
            make_writable_folder(outdir)
        except OSError as err:  # OSError(EACCES, ...) is a PermissionError
            raise OSError(err.errno, f"cannot write to output folder {outdir}: {err.strerror or err}") from err
        paths = output_paths(outdir, name)
        labels = result.label_map()  # 1 byte per input voxel: made once for the two writers that need it
        writers = (
            lambda tmp: _write_label_map_to(result, tmp, labels),
            lambda tmp: _write_segmentation_to(result, tmp, labels),
            lambda tmp: write_json(_markups_document(result), tmp),
            lambda tmp: write_json(_centroid_document(result), tmp),
            lambda tmp: write_json(_report_document(result, input_path), tmp),
            lambda tmp: _write_snapshot_to(result, image, tmp),
        )
        # one run's six at a time: two runs into this folder must not interleave their renames; checked under the
        # lock, as another run's renames, half done, would look like someone else's files
        with folder_lock(outdir):
            check_replaceable(outdir, name)
            with atomic_paths(paths) as temps:
                for write, tmp, final in zip(writers, temps, paths):
                    with write_errors_named(final):
                        write(tmp)
    log.info("wrote %d outputs of %s to %s", len(paths), name, outdir)
    return paths
