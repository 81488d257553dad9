"""``label_spine``: the whole SpineLabel pipeline as one call, used by the CLI and the Slicer logic.

read -> model grid (axes along L, P, S, an oblique input keeping its tilt; model spacing) -> normalise -> network ->
body components -> features -> chain -> sequence model -> components back on the input grid.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from . import components as comp
from . import features as feat
from .inference import (LABEL_MAP_VALUES, Cancelled, Prediction, looks_like_label_map, looks_like_offset_ct, normalise,
                        predict, read_modality, release_freed_memory, resolve_device)
from .io import (InputError, axes_text, canonical_grid, checked_image, extend_to_grid_ends, read_image, read_notes,
                 resample_to_grid)
from .models import LoadedModel, card_file, default_model_path, load_model, read_card
from .result import Geometry, SpineLabeling, Vertebra, nonzero_box, zeros_on_demand
from .sequence import NOTHING_FOUND, expected_gaps_mm, skipped_levels, solve, vertebrae_in
from .vertebrae import LEVELS, level_index

__all__ = ["label_spine", "require_vertebrae", "NoVertebrae", "Cancelled", "get_model", "is_spine",
           "regular_column", "MIN_SPINE_PROBABILITY", "ORIENTATION_MARGIN"]

log = logging.getLogger(__name__)

# An image is taken for a spine when at least two vertebra-like components are found and the median body probability of
# those the field of view leaves whole (not touching its top or bottom plane; all of them when every one does:
# ``SpineLabeling.spine_probability``) reaches MIN_SPINE_PROBABILITY, or MIN_SPINE_PROBABILITY_LONG_COLUMN when there
# are LONG_COLUMN components or more (a long column of them is evidence of a spine in itself; a regular column, below,
# asks less again). Placed with the default model 1.7.0 by ``python benchmarks/spine_gate.py --seeds 6``: images without
# a spine reach at most 0.819 with two to four components and 0.774 with five or more, the real scans of ../shared/data
# at least 0.861 (the cervical T1 MRI of cervical_sct, four components) and 0.866 (VB3_49); the thresholds sit in the
# middle of those gaps. VB3_49 is a held-out scan of ``real_data.py evaluate``: without the held-out scans, the lowest
# long column of a real scan is 0.912, and 0.82 still separates, nearer the images without a spine (the side that labels
# a doubtful spine). Then checked on six fresh draws (``--seeds 12``): 1 of the 132 images without a spine gets through
# (a blob image, 0.872, four components), where the median over all components with thresholds 0.82 and 0.78 let 5
# through; no real scan is stopped, and of the 155 real short copies of ``real_data.py evaluate --selection --length-mm
# 70`` 7 were refused (8 before; 5 since the model grid's planes beyond the scan copy its last one). A crop holding a
# single vertebra is not labelled.
MIN_COMPONENTS = 2  # the "at least two" above
MIN_SPINE_PROBABILITY = 0.84
MIN_SPINE_PROBABILITY_LONG_COLUMN = 0.82
LONG_COLUMN = 5
# A regular column is stronger evidence: REGULAR_COLUMN or more chained components each REGULAR_GAP_MM from the next
# (vertebra-like spacing, neck to lumbar spine), each gap within REGULAR_GAP_RATIO of the one before it
# (``regular_column``; on the chain without detached ends, ``features.drop_detached_ends``). Then
# MIN_SPINE_PROBABILITY_REGULAR_COLUMN is enough: synthetic spines of unusual contrast (benchmarks/selection.py) come
# out at 0.78-0.82, while none of the 132 images without a spine of ``benchmarks/spine_gate.py --seeds 12`` holds
# more than 4 components in such a run, nor any of 132 more (seeds 12-23, a throwaway script); the real scans hold 2-12.
REGULAR_COLUMN = 6
REGULAR_GAP_MM = (10.0, 50.0)
REGULAR_GAP_RATIO = 1.5
MIN_SPINE_PROBABILITY_REGULAR_COLUMN = 0.70

# The orientation check (``label_spine(check_orientation=True)``) runs the network a second time, up to its level head
# only, on the volume turned head to feet and warns when the level head names the same vertebrae more decisively that
# way (``features.level_sharpness``) by more than ORIENTATION_MARGIN. The margin was read off 15 real scans and then
# fixed, with the rule for adopting the check, before this measurement: ``python benchmarks/orientation_check.py``
# with the default model 1.6.0 on the 43 real scans of ../shared/data that have vertebrae (those 15 among them), each
# as stored and turned head to feet under its unchanged header, warned on 29 of the 43 turned copies and on 2 of the
# 43 scans as stored. Since ``split_merged`` also cuts at valleys next to the edge of the view, the end pieces it
# cuts off change a few margins: 28 catches and 4 false alarms (benchmarks/orientation_check.py at 1fe7ee5). With short
# scans extended by their mirror image (``with_context``), the two cervical MRI have vertebrae as stored (none turned)
# and the two TPTBox crops are caught: 30 catches of 43, 4 false alarms of 45; 3 since a bowel loop level with a body
# of the TotalSegmentator MR is no longer taken for a vertebra (``components.off_axis_components``). With 1.7.0: 31
# catches of 44 turned copies with vertebrae, 3 false alarms of 45 (the cervical T2 MRI, IVD_25, IVD_46); with narrow
# stacks padded left and right (``LEFT_RIGHT_VOXELS``), 26 catches of 44 and 1 false alarm (the cervical T2 MRI).
ORIENTATION_MARGIN = 0.1

# The coarsest voxel spacing the names were checked on: real scans averaged into 6 mm slices (README, thick slices)
# kept their names but for one vertebra. A reviewer's CT phantom with 8 mm axial slices got 8 of 22 names right at
# confidence 0.998-1.0 (0.8 mm slices: 17 of 17); scans with coarser voxels are labelled with a warning.
CHECKED_SPACING_MM = 6.0
# The narrowest view front to back the names were checked on: 14 real lumbar MRI cut into coronal stacks of 80 mm had no
# name at confidence 0.99 or more wrong; cut to 60 and 40 mm, such names one level off came on 2 and 6 of them
# (benchmarks/RESULTS.md, Rule N). Narrower views are labelled with a warning.
CHECKED_DEPTH_MM = 80.0


def regular_column(gaps_mm: np.ndarray) -> int:
    """The number of components in the longest run of chained neighbours each ``REGULAR_GAP_MM`` apart, each gap
    within ``REGULAR_GAP_RATIO`` of the one before it; 0 where no two neighbours are so spaced. ``gaps_mm``: float
    (n-1,) centroid distances along the chain, mm."""
    longest = run = 0
    previous = None
    for gap in np.asarray(gaps_mm, dtype=float):
        if not REGULAR_GAP_MM[0] <= gap <= REGULAR_GAP_MM[1]:
            run = 0
        elif run and 1 / REGULAR_GAP_RATIO <= gap / previous <= REGULAR_GAP_RATIO:
            run += 1
        else:
            run = 1
        previous = gap
        longest = max(longest, run)
    return longest + 1 if longest else 0


def _beyond_the_end(gaps_mm: list[float]) -> list[str]:
    """The warnings for components left out beyond an end of the chain (``features.drop_detached_ends``), each by
    the gap in mm that cut it off."""
    return [f"ignored a vertebra-like part {gap:.0f} mm beyond the end of the spine" for gap in gaps_mm]


def is_spine(spine_probability: float, n_components: int, column: int = 0) -> bool:
    """The spine gate: whether ``n_components`` vertebra-like components of median vertebral-body probability
    ``spine_probability``, ``column`` of them in a regular column (``regular_column``), make a spine."""
    if n_components < MIN_COMPONENTS:
        return False
    if column >= REGULAR_COLUMN and spine_probability >= MIN_SPINE_PROBABILITY_REGULAR_COLUMN:
        return True
    if n_components >= LONG_COLUMN:
        return spine_probability >= MIN_SPINE_PROBABILITY_LONG_COLUMN
    return spine_probability >= MIN_SPINE_PROBABILITY


_CONSTANT, _NO_SPINE = "image is constant", "no spine recognised"  # what the refusals' warnings begin with
# a field of view whose longest side is shorter (mm) shows no vertebra with the neighbours it is told by: where nothing
# is found in one, its header's spacing is more likely in other units (cm) than the image free of vertebrae
SMALL_VIEW_MM = 50.0


class NoVertebrae(InputError):
    """No vertebra was labelled: the image is constant, holds nothing vertebra-like, or the spine gate refused it."""


def require_vertebrae(result: SpineLabeling, path: str | os.PathLike) -> SpineLabeling:
    """``result`` when it names at least one vertebra; otherwise raises ``NoVertebrae`` naming ``path`` and the
    reasons (``result.warnings``; "no vertebrae found" first, or left out where a refusal says why: the image is
    constant, or no spine was recognised), and the extent of an image not constant but smaller than ``SMALL_VIEW_MM``.
    ``label_spine`` returns such an empty labelling (its spine probability is what the gate judged); the command line
    and the Slicer module refuse it as bad input, with nothing written."""
    if not result.vertebrae:
        others = [w for w in result.warnings if w != NOTHING_FOUND]
        explained = any(w.startswith((_CONSTANT, _NO_SPINE)) for w in others)
        extent = np.asarray(result.geometry.size) * np.asarray(result.geometry.spacing)
        if extent.max() < SMALL_VIEW_MM and not any(w.startswith(_CONSTANT) for w in others):
            others.append(f"the image spans only {axes_text(extent, '.3g')} mm: is the voxel size in "
                          "its header in mm?")
        raise NoVertebrae(f"{path}: {'; '.join(others if explained else [NOTHING_FOUND, *others])}")
    return result


@lru_cache(maxsize=4)
def _cached_model(card: Path, device: str, stamp: tuple) -> LoadedModel:
    """``load_model(card, device)``, cached; ``stamp`` (the files' names, times and sizes, ``get_model``) is not
    read: it is part of the cache key, so that a model written again is loaded again."""
    return load_model(card, device)


def get_model(model: str | os.PathLike | LoadedModel | None = None, device: str = "auto") -> LoadedModel:
    """A loaded model, cached per card file, its version on disk (time and size of the card, of the files beside it
    of the card's name and of the weights it names: a model written again is loaded again) and device; ``None`` is
    the default model. ``device`` is checked for a loaded model too (which stays where it is)."""
    resolved = resolve_device(device)
    if isinstance(model, LoadedModel):
        return model
    if not (model is None or isinstance(model, (str, os.PathLike))):
        raise TypeError(f"model must be a model card's path, a model's name or a LoadedModel, not "
                        f"{type(model).__name__}")
    card = default_model_path() if model is None else card_file(model)
    weights = read_card(card)["weights"]  # read before resolving: a bare name that names no model is said to be one
    card = card.resolve()
    files = set(card.parent.glob(f"{glob.escape(card.stem)}.*")) | {card.parent / weights}
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(files) if f.is_file())
    return _cached_model(card, str(resolved), stamp)


_FOREGROUND = 0.05  # of the normalised range: brighter is the body, darker air or background


def _foreground_box(volume: np.ndarray, margin: int = 6) -> tuple[slice, ...]:
    """Bounding box (z, y, x slices) of the voxels of ``volume`` (float32 (z, y, x), normalised to 0-1) brighter
    than ``_FOREGROUND`` (the body), with a margin of ``margin`` voxels."""
    box = nonzero_box(volume > _FOREGROUND)
    if box is None:
        return tuple(slice(0, s) for s in volume.shape)
    return tuple(slice(max(0, b.start - margin), min(s, b.stop + margin)) for b, s in zip(box, volume.shape))


# The least extent, in voxels of the model grid (z, y, x), that the network is given. Along z and y: the in-plane size
# of its training patch (160 mm at 2 mm). A scan shorter than that and cut through the body there (a short scan) used
# to be filled out with zeros, which the network reads as air around the spine: on 36 synthetic scans 70 mm tall it
# then called about half as many voxels vertebral body as in a taller view of the same region. Where the body ends
# inside the image (air at that side) zeros are what the world looks like, and a mirror would add a second body.
# Along x (left-right) only stacks narrower than 40 mm are extended, to 40 mm: training fills thin sagittal stacks with
# zeros (most of the slabs of synthesis._limit_field_of_view, 48 mm and wider), and mirrored to 160 mm the real
# sagittal lumbar MRI (57-77 mm, 29-39 voxels) lost body coverage; but a clinical stack of 11 slices of 3 mm (33 mm)
# filled with zeros lost half its vertebrae: ``python benchmarks/real_data.py evaluate --selection --slice-mm 3
# --slab-mm 33`` (the 24 training MRI so cut) identifies 64 of 146 with zeros and 141 extended to 40 mm (model
# 1.7.0). Extended to 48 mm or more, the 42 mm cervical T1 MRI of cervical_sct lost its five vertebrae to the spine
# gate.
MIN_CONTEXT_VOXELS = (80, 80, 20)
# A volume narrower than this left to right (x, model-grid voxels) and not extended along z or y is then padded with
# zeros (the normalised minimum) on both sides to this width: training shows a narrow stack so, inside its 80-voxel
# patch filled with zeros, and the network given the stack alone left out the lateral parts of the bodies. Padded, the
# 24 training MRI of ``python benchmarks/real_data.py evaluate --selection`` are covered 0.929 (0.870 before; the
# water-fat MRI 0.91, 0.82 before), the 5 discs MRI of the held-out set are all numbered right (the transitional
# sacrum of IVD_25 was one level off) and the clinical 33 mm stacks keep 146 of 146 (141). A small field of view all
# round (extended along z or y) stays as it was: padded too, the cervical T1 MRI of cervical_sct went from C2-C5 to
# T5-T8 (since the model grid's planes beyond the scan copy its last one, it is read T5-T8 unpadded as well: ``python
# benchmarks/real_data.py cervical``). A view narrow front to back only (a coronal stack) is padded with zeros front
# and back rather than mirrored, and so counts as not extended: it is padded left and right too (since 2e429dd; the
# PAM50 template, 70 mm front to back and left to right, is padded along both).
LEFT_RIGHT_VOXELS = 80
_CUT_FACE = 0.1  # a side is cut through the body when at least this fraction of its face is foreground


def _context_widths(volume: np.ndarray, min_voxels: tuple[int, int, int]) -> list[tuple[int, int]]:
    """(before, after) voxels that ``with_context`` adds along each axis (z, y, x) of ``volume`` before padding left
    and right: along an axis shorter than ``min_voxels``, at the sides where the field of view cuts through the body
    (half each when both are; even numbers before)."""
    widths = []
    for axis, (size, least) in enumerate(zip(volume.shape, min_voxels)):
        total = max(0, least - size)
        if total == 0:
            widths.append((0, 0))
            continue
        cut = [float(np.mean(np.take(volume, end, axis=axis) > _FOREGROUND)) >= _CUT_FACE for end in (0, -1)]
        before = (total // 4 * 2 if cut[1] else total // 2 * 2) if cut[0] else 0
        widths.append((before, total - before if cut[1] else 0))
    return widths


def with_context(volume: np.ndarray, min_voxels: tuple[int, int, int] = MIN_CONTEXT_VOXELS, zero_ends: bool = False
                 ) -> tuple[np.ndarray, tuple[slice, ...]]:
    """``volume`` (float32 (z, y, x), normalised) extended by reflection, along each axis where shorter than
    ``min_voxels`` (z, y, x), at the sides where the field of view cuts through the body (``_context_widths``), with
    zeros (the normalised minimum) instead beyond its head-feet ends where ``zero_ends``, and with zeros instead front
    and back, on both sides, where it is so extended along y but not along z (a coronal stack); then, when it was not
    extended along z or y, padded with zeros left and right to ``LEFT_RIGHT_VOXELS``. Also returns where the volume
    lies inside the result (slices with even starts: the half-resolution level grid stays aligned). Returns ``volume``
    itself when nothing is added."""
    widths = _context_widths(volume, min_voxels)
    # a stack narrow front to back but not short head to feet (a coronal stack): zeros front and back, as a narrow
    # sagittal stack gets left and right; its mirror image put bodies where the canal and the belly are, and the spine
    # gate refused clear spines (coronal 60 mm stacks of real lumbar MRI: 4 of 10)
    front_back = 0
    if not any(widths[0]) and any(widths[1]):
        front_back, widths[1] = min_voxels[1] - volume.shape[1], (0, 0)
    inner = tuple(slice(b, b + size) for (b, _), size in zip(widths, volume.shape))
    extended = [bool(b or a) for b, a in widths]
    if any(extended):
        log.info("short field of view: extended by its mirror image%s to %s voxels (z, y, x) from %s",
                 " (zeros beyond its head-feet ends)" if zero_ends else "",
                 tuple(s + b + a for s, (b, a) in zip(volume.shape, widths)), volume.shape)
        volume = np.pad(volume, widths, mode="reflect")
        if zero_ends:
            volume[: inner[0].start] = 0.0
            volume[inner[0].stop :] = 0.0
    if front_back:
        before = front_back // 4 * 2
        volume = np.pad(volume, ((0, 0), (before, front_back - before), (0, 0)))
        inner = (inner[0], slice(inner[1].start + before, inner[1].stop + before), inner[2])
    total = 0 if extended[0] or extended[1] else max(0, LEFT_RIGHT_VOXELS - volume.shape[2])
    if total:  # a narrow stack, as training shows it: in a patch of zeros
        before = total // 4 * 2
        volume = np.pad(volume, ((0, 0), (0, 0), (before, total - before)))
        inner = (*inner[:2], slice(inner[2].start + before, inner[2].stop + before))
    return volume, inner


def _predict_in_context(loaded: LoadedModel, volume: np.ndarray, device: torch.device, zero_ends: bool = False,
                        **kwargs) -> Prediction:
    """``predict`` on ``volume`` (float32 (z, y, x) on the model grid, normalised to [0, 1]) extended by
    ``with_context`` (with zeros beyond its head-feet ends where ``zero_ends``), cut back to ``volume``: a
    ``Prediction`` of ``volume``'s shape (uint8 tissue, float16 probabilities, None with ``levels_only``; float16 level
    log-probabilities at half resolution, (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)))."""
    extended, inner = with_context(volume, zero_ends=zero_ends)
    return predict(loaded, extended, device, **kwargs).inside(inner)


def _input_warnings(pixels: np.ndarray, spacing_mm: tuple[float, ...], given: str, modality: str) -> list[str]:
    """What the labelling warns of an input's intensities and voxel spacing: a modality given against intensities that
    say the other, a CT whose values are no Hounsfield units, an image that looks like a label map, slices further
    apart than the names were checked on.

    Args:
        pixels: the input's intensities, (z, y, x) as SimpleITK gives them, any real dtype; strided samples of it
            are read, not the whole.
        spacing_mm: its voxel spacing, mm, in any axis order.
        given: the modality asked for, ``"AUTO"``, ``"CT"`` or ``"MR"``.
        modality: the modality it is labelled as, ``"CT"`` or ``"MR"``.
    """
    other = "MR" if modality == "CT" else "CT"
    warnings = []
    offset_ct = ("its intensities look like a CT stored 1024 above Hounsfield units (air near 0, soft tissue near "
                 "1024: a header without its rescale intercept of -1024); if it is CT, subtract 1024 or set the "
                 "intercept, and label it again")
    if given == "CT" and not (pixels[:: max(1, pixels.shape[0] // 64)] < -50).any():
        warnings.append("no intensity below -50 for a CT: are they Hounsfield units? (a CT stored without its rescale "
                        "intercept reads 1024 too high)")
    elif given == "CT" and looks_like_offset_ct(pixels):  # stored signed: its air's noise reaches below -50
        warnings.append(f"labelled as CT as asked, but {offset_ct}")  # not "label it as MR", as read_modality says
    elif given != "AUTO" and read_modality(pixels) == (other, True):
        # a modality given against intensities that say the other clearly: a real CT labelled as MR kept its names
        # but lost Dice (0.82 to 0.75), without a word
        warnings.append(f"labelled as {modality} as asked, but its intensities read clearly as {other} ("
                        + ("air in Hounsfield units" if other == "CT" else "no air, nor fat and bone, in Hounsfield "
                           "units") + f"); if it is {other}, label it as {other} (modality {other.lower()})")
    if given == "AUTO" and modality == "MR" and looks_like_offset_ct(pixels):
        warnings.append(f"read as MR, but {offset_ct}")
    if looks_like_label_map(pixels):
        warnings.append(f"the image holds fewer than {LABEL_MAP_VALUES} distinct whole-number values: is it a label "
                        "map rather than a scan?")
    if max(spacing_mm) > CHECKED_SPACING_MM + 1e-3:  # spacings computed from positions carry rounding
        warnings.append(f"voxels {max(spacing_mm):.3g} mm apart along one axis: the names were checked on "
                        f"slices up to {CHECKED_SPACING_MM:g} mm; check them")
    return warnings


def label_spine(
    image: sitk.Image | str | os.PathLike,
    model: str | os.PathLike | LoadedModel | None = None,
    device: str = "auto",
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    check_orientation: bool = False,
    spine_gate: bool = True,
    modality: str = "auto",
) -> SpineLabeling:
    """Label every vertebra of a CT or MR spine image.

    Args:
        image: a 3D scalar ``SimpleITK.Image`` or a path ``read_image`` accepts; any orientation and spacing.
        model: model card path, a registered model's name (``spinelabel models``), a loaded model (which runs on
            the device it is on), or None for the default model.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``: where a model given by path (or the default) is
            loaded.
        progress: called with (fraction 0-1 of the whole job, message).
        cancel: polled between stages, network windows and the vertebrae brought back to the input grid; returning
            True raises ``Cancelled``.
        check_orientation: also run the network on the volume turned head to feet, and warn when it reads better
            that way (a header that gives superior and inferior the wrong way round); a second network pass, up to
            the level head only (about half the network time again).
        spine_gate: refuse images that the network does not take for a spine (``is_spine``). False labels whatever
            vertebra-like components it finds: for a spine the gate refuses, such as a small or unusual field of view.
        modality: ``"auto"`` detects it (``inference.read_modality``; a warning says how the scan was read when its
            intensities do not say it clearly); ``"ct"`` (intensities in Hounsfield units) or ``"mr"``, any case,
            overrides the detection for a scan it gets wrong.

    Returns:
        The labelling on the input image's grid. An image without vertebrae (empty, constant, not a spine) gives
        zero vertebrae and a warning.

    Raises:
        io.InputError: unreadable or unsupported input.
        TypeError: ``image`` is neither an image nor a path, or ``progress`` or ``cancel`` is not callable.
        ValueError: an unknown ``device`` or ``modality``.
        RuntimeError: ``device`` names a CUDA GPU and there is none.
        models.ModelError: missing or corrupt model.
        Cancelled: the cancel hook returned True.
    """
    timings: dict[str, float] = {}
    report = progress or (lambda fraction, message: None)

    def stage(name: str, start: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - start, 3)
        if cancel is not None and cancel():
            raise Cancelled()
        return now

    for hook, value in (("progress", progress), ("cancel", cancel)):
        if value is not None and not callable(value):
            raise TypeError(f"{hook} must be a callable or None, not {type(value).__name__}")
    given = modality.upper() if isinstance(modality, str) else None
    if given not in ("AUTO", "CT", "MR"):
        raise ValueError(f"modality must be 'auto', 'ct' or 'mr', not {modality!r}")
    t = t0 = time.perf_counter()
    source = ""
    if isinstance(image, sitk.Image):
        image = checked_image(image)
    elif not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"image must be a SimpleITK.Image or a path, not {type(image).__name__}: make an array an "
                        "image with SimpleITK.GetImageFromArray (z, y, x) and set its spacing, origin and direction")
    else:
        source = str(image)
        image = read_image(image)
    report(0.02, "reading")
    loaded = get_model(model, device)
    t = stage("load_model", t)
    geometry = Geometry.of(image)
    # the minimum fills the model grid outside the image; numpy reads the pixel buffer without a copy, in a tenth of
    # the time of SimpleITK's filter
    pixels = sitk.GetArrayViewFromImage(image)
    minimum = float(pixels.min())
    modality, clear = read_modality(pixels) if given == "AUTO" else (given, True)
    # an MR taken for CT, or a CT for MR, finds no spine, or adds fat to the bone: the warnings say how the scan was
    # read when its intensities do not say it clearly, or when no spine was found
    other = "MR" if modality == "CT" else "CT"
    read_as = [f"read as {modality} from its intensities; if it is {other}, label it as {other} (modality "
               f"{other.lower()})"] if given == "AUTO" else []
    grid = canonical_grid(image, loaded.spacing_mm)
    resampled = resample_to_grid(image, grid, default=minimum)
    volume = sitk.GetArrayViewFromImage(resampled)  # float32, read-only, no copy: normalise makes the one copy
    t = stage("resample", t)
    report(0.1, "normalising")
    warnings = read_notes(image)  # how the file was read (a tilted gantry resampled, disagreeing NIfTI forms)
    if not clear:  # said now, not again when no spine is found
        warnings, read_as = warnings + read_as, []
    warnings += _input_warnings(pixels, geometry.spacing, given, modality)
    darkest, brightest = float(volume.min()), float(volume.max())
    if brightest - darkest <= 1e-6 * max(abs(darkest), abs(brightest)):  # constant but for rounding, in any units
        warnings.append(f"{_CONSTANT}: nothing to label")
        report(1.0, NOTHING_FOUND)
        return _empty(geometry, warnings, loaded, timings, source, modality, t0, None)
    # the extent of the image's box along P (its bounding extent where the image is oblique)
    depth_mm = float((np.abs(np.reshape(geometry.direction, (3, 3))) @ np.multiply(geometry.size, geometry.spacing))[1])
    if depth_mm < CHECKED_DEPTH_MM:
        warnings.append(f"the view is {depth_mm:.0f} mm front to back: the names were checked on views of "
                        f"{CHECKED_DEPTH_MM:g} mm or more; check them")
    norm = normalise(volume, loaded.ct_window_hu if modality == "CT" else None)
    extend_to_grid_ends(norm, image, grid)
    del volume, resampled
    box = _foreground_box(norm)
    t = stage("normalise", t)
    device_ = next(loaded.network.parameters()).device
    # the network passes share the progress from 0.1 to 0.89 by their time (a pass up to the level head, of a short
    # view read again or of the orientation check, takes about half of a whole one), less 0.02 for the separation
    # after the first: a second pass without progress of its own held the bar still for a third of a short scan's run
    short_view = any(_context_widths(norm[box], MIN_CONTEXT_VOXELS)[0])  # read again below, when it has vertebrae
    second_passes = int(short_view) + int(check_orientation)
    first_end = 0.1 + 0.7 / (1 + 0.5 * second_passes)
    second_span = (0.87 - first_end) / max(second_passes, 1)
    prediction = _predict_in_context(loaded, norm[box], device_,
                                     progress=lambda f, m: report(0.1 + (first_end - 0.1) * f, m), cancel=cancel)
    t = stage("network", t)
    report(first_end + 0.02, "separating vertebrae")
    second_start = first_end + 0.02
    spacing_zyx = tuple(float(s) for s in grid.GetSpacing()[::-1])
    tissue, bone_probability = prediction.tissue, prediction.bone_probability
    dense_bone = modality == "CT" and loaded.ct_window_hu is not None  # intensities in Hounsfield units
    if dense_bone:
        lo, hi = loaded.ct_window_hu
        tissue, bone_probability = comp.dense_bone_as_posterior(tissue, bone_probability, lo + norm[box] * (hi - lo),
                                                                spacing_zyx)
    bodies_box, whole_box, sacrum_box = comp.vertebra_components(tissue, prediction.body_probability, spacing_zyx,
                                                                 prediction.level_log_probs)
    t = stage("components", t)
    grid_geometry = Geometry.of(grid)
    # the box's arrays go onto the whole model grid one at a time, each freed once copied (the box is often the whole
    # grid, then nothing is copied: on the 1800 mm phantom 0.5 GB were held twice). Of the network's outputs the
    # level head's alone is read from here on. bodies_box becomes a view of bodies, and stays one: a change to either is
    # a change to both
    prediction = replace(prediction, tissue=None, bone_probability=None)
    del tissue
    bodies = _on_model_grid(bodies_box, box, norm.shape, np.int32)
    bodies_box = bodies[box]
    whole = _on_model_grid(whole_box, box, norm.shape, np.int32)
    del whole_box
    body_probability = _on_model_grid(prediction.body_probability, box, norm.shape, np.float16)
    prediction = replace(prediction, body_probability=None)
    measured = feat.measure(bodies, whole, body_probability, grid_geometry)
    # the gate judges the components the field of view leaves whole: a piece cut by the top or bottom of the scan
    # reads as much or as little like a body as the cut leaves of it
    whole_in_view = [f for f in measured if not f.at_view_end] or measured
    median = float(np.median([f.body_probability for f in whole_in_view])) if measured else None
    ordered, gaps = feat.chain_order(measured)
    ordered, gaps, detached = feat.drop_detached_ends(ordered, gaps)
    refused = median is not None and not is_spine(median, len(measured), regular_column(gaps))
    found = f"{len(measured)} vertebra-like part{'s' * (len(measured) != 1)}"
    if spine_gate and refused:
        few = (f" only (a spine is numbered from {MIN_COMPONENTS} or more in view)" if len(measured) < MIN_COMPONENTS
               else "")
        warnings.append(f"{_NO_SPINE}: {found}{few}, with a median probability of {median:.2f} of being a vertebral "
                        "body; if this is a spine, check that its header orients it right (one turned front to back "
                        "can be taken for no spine), or label it even so (--no-spine-gate; in Slicer: 'Label even if "
                        "no spine is recognised')")
        report(1.0, NOTHING_FOUND)
        return _empty(geometry, warnings + read_as, loaded, timings, source, modality, t0, median)
    if refused:  # and the gate off
        warnings.append(f"labelled as asked although no spine is recognised: {found}, with a median probability of "
                        f"{median:.2f} of being a vertebral body")
    warnings += _beyond_the_end(detached)
    most = len(LEVELS) + SACRAL_SEGMENTS_BELOW_S1  # the sacrum's lower segments may come out as bodies of their own
    if len(ordered) > most:
        ordered = sorted(ordered, key=lambda f: -f.volume_ml)[:most]
        ordered, gaps = feat.chain_order(ordered)
        warnings.append(f"more vertebra-like parts than vertebral levels and sacral segments; kept the {most} largest")
    scores = feat.level_scores(bodies_box, prediction.level_log_probs, [f.id for f in ordered])
    t = stage("features", t)
    solution = solve(scores, gaps)
    # a component beside the spine sorted into the chain would take a level from the vertebrae: down to S1 (the
    # sacral pieces below it are no vertebrae), the one off the line of the others is left out, and so on
    while True:
        n_chain, has_s1 = _chain_end(solution)
        astray = feat.off_the_line(ordered[:n_chain], last_fixed=has_s1)
        if astray is None:
            break
        position, off_mm = astray
        warnings.append(f"ignored a vertebra-like part {off_mm:.0f} mm off the line of the spine")
        ordered, gaps = feat.chain_order(ordered[:position] + ordered[position + 1:])
        # the gaps it split may have hidden a stray beyond an end (Rule D, benchmarks/RESULTS.md)
        ordered, gaps, detached = feat.drop_detached_ends(ordered, gaps)
        warnings += _beyond_the_end(detached)
        scores = feat.level_scores(bodies_box, prediction.level_log_probs, [f.id for f in ordered])
        solution = solve(scores, gaps)
    # two neighbours far closer than their levels' spacing, together no bigger than one vertebra: one body split in
    # two; joined, and the chain measured and solved again (once)
    split = _split_in_two(solution.levels[:n_chain], ordered[:n_chain], gaps[: n_chain - 1])
    if split:
        whole_in_box = whole[box]  # a view: changed in place
        by_id = {f.id: f for f in ordered}
        for keep_id, drop_id in split:
            bodies_box[bodies_box == drop_id] = keep_id
            whole_in_box[whole_in_box == drop_id] = keep_id
            log.info("joined component %d into %d: one body split in two", drop_id, keep_id)
            apart = float(np.linalg.norm(by_id[keep_id].body_centroid_lps_mm - by_id[drop_id].body_centroid_lps_mm))
            # the chain is counted with one vertebra fewer: never without a word (two vertebrae of a fused level the
            # network did not outline in full, pieces 20 mm apart, were joined and the sacrum named L5)
            warnings.append(f"joined two vertebra-like parts {apart:.0f} mm apart into one vertebra, as one body "
                            "split in two (or parts of two vertebrae, as at a fused level): check the count")
        kept = {f.id for f in ordered} - {drop_id for _, drop_id in split}
        ordered, gaps = feat.chain_order([f for f in feat.measure(bodies, whole, body_probability, grid_geometry)
                                          if f.id in kept])
        scores = feat.level_scores(bodies_box, prediction.level_log_probs, [f.id for f in ordered])
        solution = solve(scores, gaps)
        n_chain, has_s1 = _chain_end(solution)
    # a regular level the chain skips beside a body tall enough for two: two vertebrae the network did not part; each
    # such body (not one just joined) is cut across at its centroid, and the chain measured and solved again (once)
    joined = {keep_id for keep_id, _ in split}
    merged = [f for f in _merged_beside_skip(solution.levels[:n_chain], ordered[:n_chain]) if f.id not in joined]
    if merged:
        kept = {f.id for f in ordered}
        for f in merged:
            kept.add(_unused_id(bodies_box, whole))
            bodies_box[...], whole[box] = comp.cut_across(bodies_box, whole[box], f.id, max(kept))
            log.info("cut a body %.0f mm tall beside a skipped level in two", f.extent_mm[0])
            warnings.append(f"cut a body {f.extent_mm[0]:.0f} mm tall in two beside a skipped level, as two neighbours "
                            "the network did not part (a fused level or block vertebra looks so too): check the count")
        ordered, gaps = feat.chain_order([f for f in feat.measure(bodies, whole, body_probability, grid_geometry)
                                          if f.id in kept])
        scores = feat.level_scores(bodies_box, prediction.level_log_probs, [f.id for f in ordered])
        solution = solve(scores, gaps)
        n_chain, has_s1 = _chain_end(solution)
    # each vertebra's posterior elements stay within its band along the spine (comp.confine_posterior), and go to the
    # neighbour whose level the level head clearly gives them (comp.posterior_by_level). The pieces the chain puts
    # below S1 are more of the sacrum: their voxels join S1, the S1 body keeps its centroid; so do the posterior
    # elements that the level head calls S1, when the chain has an S1 (comp.join_sacrum)
    sacral_pieces = ordered[n_chain:]
    s1_and_pieces = [f.id for f in ordered[n_chain - 1:]] if has_s1 else None
    above_s1 = ordered[n_chain - 2].id if has_s1 and n_chain > 1 else None
    chain_ids = [f.id for f in ordered[:n_chain]]
    whole[box] = comp.confine_posterior(whole[box], bodies_box, chain_ids, spacing_zyx, last_is_s1=has_s1)
    whole[box] = comp.posterior_by_level(whole[box], bodies_box, chain_ids, prediction.level_log_probs,
                                         last_is_s1=has_s1)
    whole[box] = comp.confine_across(whole[box], bodies_box, chain_ids, spacing_zyx, last_is_s1=has_s1)
    if ordered:
        ordered, scores, gaps, extended = _vertebra_above(bodies, whole, box, body_probability, grid_geometry,
                                                          prediction.level_log_probs, ordered, scores, gaps, solution)
        n_chain += len(extended.levels) - len(solution.levels)
        solution = extended
    whole[box] = comp.join_sacrum(whole[box], sacrum_box, s1_and_pieces, above_s1)
    keep = np.zeros(int(whole.max(initial=0)) + 1, dtype=np.int16)
    for f in ordered[:n_chain]:
        keep[f.id] = f.id
    # only the sacral pieces that continue the sacrum join S1 (``_continuing_sacrum``); the others stay unlabelled
    for f in _continuing_sacrum(whole, ordered[n_chain - 1], sacral_pieces, spacing_zyx) if sacral_pieces else []:
        keep[f.id] = ordered[n_chain - 1].id
    t = stage("sequence", t)
    # a view extended along head-feet (a short scan cut through the body) is numbered by how it is filled out beyond
    # its ends as much as by what it shows: its level head is read again with zeros there instead of the mirror image,
    # the names stay the first reading's, and the confidences are read from the mean of the two
    confidence_scores = None
    if ordered and short_view:
        report(second_start, "short view: reading its levels again with zeros beyond its ends")
        second = _predict_in_context(loaded, norm[box], device_, zero_ends=True, levels_only=True, cancel=cancel,
                                     progress=lambda f, m: report(second_start + second_span * f, f"short view: {m}"))
        second_start += second_span
        other = feat.level_scores(bodies_box, second.level_log_probs, [f.id for f in ordered])
        confidence_scores = (scores + other) / 2
        solution = solve(scores, gaps, confidence_scores=confidence_scores)
        t = stage("short_view_reading", t)
    evidence = [None] * len(ordered) if confidence_scores is None else list(confidence_scores)
    # the sacral pieces' evidence stays with the result: a correction solves the chain with it again
    pieces = [{"centroid_lps_mm": [float(c) for c in f.body_centroid_lps_mm], "level_log_scores": row.tolist(),
               "confidence_log_scores": None if confidence_row is None else confidence_row.tolist()}
              for f, row, confidence_row in zip(sacral_pieces, scores[n_chain:], evidence[n_chain:])]
    ordered, scores, gaps = ordered[:n_chain], scores[:n_chain], gaps[: n_chain - 1]
    orientation_margin = None
    if check_orientation and ordered:
        # reversed views, no copies: predict copies each window it cuts. The level head is all the check reads.
        turned = _predict_in_context(loaded, norm[box][::-1], device_, levels_only=True,
                                     progress=lambda f, m: report(second_start + second_span * f,
                                                                  f"orientation check: {m}"),
                                     cancel=cancel)
        turned_scores = feat.level_scores(bodies_box[::-1], turned.level_log_probs, [f.id for f in ordered])
        orientation_margin = feat.level_sharpness(turned_scores) - feat.level_sharpness(scores)
        if orientation_margin > ORIENTATION_MARGIN:
            warnings.append(f"the vertebrae read more clearly with the image turned head to feet (by "
                            f"{orientation_margin:.2f}): the header may give superior and inferior the wrong way "
                            "round; check the orientation before trusting the names")
        t = stage("orientation_check", t)
    report(0.9, "writing labels on the input grid")
    bone = np.zeros(norm.shape, dtype=np.float16)
    bone[box] = bone_probability
    components = keep[whole]
    # the model-grid arrays no longer needed are freed before the input-grid labels are made (their memory is reused)
    del norm, bodies, whole, body_probability, prediction, bone_probability, bodies_box, sacrum_box
    release_freed_memory()  # their pages too: the input-grid labels take memory of their own (zeros_on_demand)
    on_input, voxels = components_on_input_grid(components, bone, grid, image,
                                                dense_bone_hu=comp.DENSE_BONE_HU if dense_bone else None, cancel=cancel)
    del components, bone
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    vertebrae = [
        Vertebra(
            id=f.id,
            name=LEVELS[k].name,
            centroid_lps_mm=tuple(float(c) for c in f.body_centroid_lps_mm),
            volume_ml=round(voxels.get(f.id, 0) * voxel_ml, 3),  # of the written label map
            confidence=float(p),
            level_log_scores=row,
            confidence_log_scores=confidence_row,
        )
        for f, k, p, row, confidence_row in zip(ordered, solution.levels, solution.confidence, scores, evidence)
    ]
    timings["resample_back"] = round(time.perf_counter() - t, 3)
    timings["total"] = round(time.perf_counter() - t0, 3)
    report(1.0, f"{len(vertebrae)} vertebrae labelled")
    return SpineLabeling(
        geometry=geometry,
        components=on_input,
        vertebrae=vertebrae,
        gaps_mm=[float(g) for g in gaps],
        warnings=warnings + solution.warnings + (read_as if not vertebrae else []),
        sequence_warnings=list(solution.warnings),
        model=loaded.info,
        timings_s=timings,
        source=source,
        modality=modality,
        spine_probability=median,
        orientation_margin=orientation_margin,
        sacral_pieces=pieces,
        sacral_pieces_below=vertebrae[-1].id if pieces else 0,
    )


# A body beside a skipped level that is this many times as tall as the body on the gap's other side (and at least the
# chain's median height) holds two vertebrae (``_merged_beside_skip``)
MERGED_HEIGHT_RATIO = 1.25


def _on_model_grid(part: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...], dtype) -> np.ndarray:
    """``part``, an array of the foreground box ``box`` ((z, y, x) slices), on the whole model grid of ``shape``
    (z, y, x) as ``dtype``, 0 outside the box: ``part`` itself (no copy) when the box is the whole grid and ``part``
    is of ``dtype``."""
    if part.shape == tuple(shape) and part.dtype == np.dtype(dtype):
        return part
    out = np.zeros(shape, dtype=dtype)
    out[box] = part
    return out


def _merged_beside_skip(levels: np.ndarray, chain: list[feat.ComponentFeatures]) -> list[feat.ComponentFeatures]:
    """The components of a solved chain that hold two vertebrae: beside each skip of one regular level, the neighbour
    whose body is ``MERGED_HEIGHT_RATIO`` times as tall (head-feet extent) as the other's and at least the chain's
    median height, unless it is S1 (the sacrum's box is the tallest of a chain, tilted and often with S2 in it).
    ``levels`` int (n,) indices into ``LEVELS`` of ``chain``, in chain order."""
    heights = np.array([f.extent_mm[0] for f in chain])
    out: dict[int, feat.ComponentFeatures] = {}
    for i in np.flatnonzero(skipped_levels(levels) == 1):
        j = i if heights[i] >= heights[i + 1] else i + 1
        if (levels[j] != comp.S1_LEVEL and heights[j] >= MERGED_HEIGHT_RATIO * min(heights[i], heights[i + 1])
                and heights[j] >= np.median(heights)):
            out[chain[j].id] = chain[j]
    return list(out.values())


# Two neighbours closer than SPLIT_GAP_RATIO of their levels' spacing, together at most SPLIT_VOLUME_RATIO of the
# chain's median vertebra, are one body split in two (``_split_in_two``; Rule J2 in benchmarks/RESULTS.md: an L5 of a
# clinical stack of 3 mm slices came out as 20 and 11 ml, 15.8 mm apart where L4-L5 is about 35 mm)
SPLIT_GAP_RATIO = 0.6
SPLIT_VOLUME_RATIO = 1.3


def _split_in_two(levels: np.ndarray, chain: list[feat.ComponentFeatures], gaps: np.ndarray) -> list[tuple[int, int]]:
    """(kept id, joined id) of each pair of neighbours of a solved chain that is one body split in two: above S1,
    neither cut by the view, no level skipped between them, their centroids under SPLIT_GAP_RATIO of the expected gap
    of their levels at the chain's scale apart, and their volumes together at most SPLIT_VOLUME_RATIO times the median
    volume of the chain's other vertebrae not cut by the view. ``levels`` int (n,) indices into ``LEVELS`` of
    ``chain``, in chain order; ``gaps`` float (n-1,) centroid distances in mm."""
    n = len(chain)
    expected = expected_gaps_mm()[levels[:-1], levels[1:]]  # finite for each transition of a solved chain
    ratio = gaps / expected
    volumes = np.array([f.volume_ml for f in chain])
    cut = np.array([f.at_view_end for f in chain])
    skips = skipped_levels(levels)
    candidates = []
    for i in range(n - 1):
        if cut[i] or cut[i + 1] or skips[i] or levels[i + 1] == comp.S1_LEVEL:
            continue
        others = np.delete(ratio, i)
        whole_ones = np.delete(volumes, [i, i + 1])[~np.delete(cut, [i, i + 1])]
        if others.size < 2 or whole_ones.size < 1:
            continue
        union = volumes[i] + volumes[i + 1]
        if ratio[i] < SPLIT_GAP_RATIO * np.median(others) and union <= SPLIT_VOLUME_RATIO * np.median(whole_ones):
            candidates.append((ratio[i] / np.median(others), i))
    out, used = [], set()
    for _, i in sorted(candidates):
        if i in used or i + 1 in used:
            continue
        used |= {i, i + 1}
        big, small = (i, i + 1) if chain[i].volume_ml >= chain[i + 1].volume_ml else (i + 1, i)
        out.append((chain[big].id, chain[small].id))
    return out


def _vertebra_above(bodies: np.ndarray, whole: np.ndarray, box: tuple[slice, ...], body_probability: np.ndarray,
                    grid: Geometry, level_log_probs: np.ndarray, ordered: list[feat.ComponentFeatures],
                    scores: np.ndarray, gaps: np.ndarray, solution):
    """A piece of the chain's top vertebra that the level head reads as the regular level above, made a vertebra of its
    own, named that level, where the chain solved with it keeps every other name: C1 beside the dens of a top vertebra
    named C2 (``comp.atlas_beside_dens``), where it lies above the rest of the vertebra (C1 is never below C2), or else
    the lower arch, in the top planes, of a vertebra whose body lies above the view (``comp.arch_above_view``: it
    reaches the scan's top plane, and its spinous process can reach below the top vertebra's body centroid).

    Args:
        bodies, whole: int32 (z, y, x) body and whole-vertebra components on the model grid, z growing cranially; the
            piece takes a new id in both, in place, when it is kept.
        box: the network's box on the model grid (z, y, x slices).
        body_probability: float16 (z, y, x) on the model grid.
        grid: the model grid's geometry.
        level_log_probs: float16 (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)) level head output over ``box``
            (natural-log probabilities).
        ordered, scores, gaps, solution: the chain, cranial first, at least one vertebra: its components, level scores
            (n, n_levels), gaps in mm (n - 1) and ``sequence.solve`` solution.

    Returns:
        (ordered, scores, gaps, solution), the new vertebra first, or the ones given.
    """
    above = _regular_level_above(int(solution.levels[0]))
    if above is None:
        return ordered, scores, gaps, solution
    top, bodies_box, spacing_zyx = ordered[0].id, bodies[box], tuple(float(s) for s in grid.spacing[::-1])
    if above == level_index("C1"):
        piece = comp.atlas_beside_dens(whole[box], bodies_box, top, level_log_probs, spacing_zyx)
    else:
        piece = comp.arch_above_view(whole[box], bodies_box, top, level_log_probs, int(solution.levels[0]), above,
                                     spacing_zyx)
    if piece is None:
        return ordered, scores, gaps, solution
    new_id = _unused_id(bodies_box, whole)
    was_body = bodies_box[piece] == top
    bodies_box[piece] = new_id  # its level is read from these voxels (the orientation check)
    whole[box][piece] = new_id
    remeasured = {f.id: f for f in feat.measure(bodies, whole, body_probability, grid) if f.id in (new_id, top)}
    new, rest = remeasured[new_id], remeasured[top]  # the top vertebra without the piece
    rows = feat.level_scores(bodies_box, level_log_probs, [new_id, top])
    centroids = [f.body_centroid_lps_mm for f in (new, rest, *ordered[1:2])]
    tried_gaps = np.concatenate([np.linalg.norm(np.diff(centroids, axis=0), axis=1), gaps[1:]])
    tried_scores = np.vstack([rows, scores[1:]])
    extended = solve(tried_scores, tried_gaps)
    up = np.asarray(grid.direction, dtype=float).reshape(3, 3)[:, 2]  # the grid's z axis in LPS: cranial
    cranial = above != level_index("C1") or float(np.dot(new.body_centroid_lps_mm - rest.body_centroid_lps_mm, up)) > 0
    if cranial and int(extended.levels[0]) == above and np.array_equal(extended.levels[1:], solution.levels):
        log.info("a piece of the top vertebra is a vertebra of its own: named %s", LEVELS[above].name)
        return [new, rest, *ordered[1:]], tried_scores, tried_gaps, extended
    bodies_box[piece] = np.where(was_body, top, 0)
    whole[box][piece] = top
    return ordered, scores, gaps, solution


def _unused_id(*components: np.ndarray) -> int:
    """An id that none of the int component arrays given holds (one above their largest)."""
    return max(int(c.max(initial=0)) for c in components) + 1


def _regular_level_above(level: int) -> int | None:
    """The index into ``LEVELS`` of the regular level above ``level`` (T12 above L1, L5 above S1), None above C1."""
    return next((k for k in range(level - 1, -1, -1) if not LEVELS[k].transitional), None)


# A piece the chain puts below S1 is more of the sacrum only where it continues it: at most this far from S1 or from a
# piece already joined (the sacral segments are parted by discs a few mm thin, or not at all) ...
SACRAL_PIECE_REACH_MM = 10.0
# ... and not this far in front of the S1 body's centroid: the sacrum curves backwards from S1. On sagittal lumbar MRI
# (VB1_03, VB1_06, VB1_07, VB1_08 of mri_lumbar_bodies) pieces 55-105 mm below S1, in the pelvis in front of the sacrum
# or in slabs at the bottom of the view, were joined to S1 and made it as large as a pelvis. The pieces kept lay from
# 6 mm in front of the S1 centroid (sub-verse014, CT) to 45 mm behind it.
SACRAL_PIECE_ANTERIOR_MM = 10.0


def _continuing_sacrum(whole: np.ndarray, s1: feat.ComponentFeatures, pieces: list[feat.ComponentFeatures],
                       spacing_zyx: tuple[float, float, float]) -> list[feat.ComponentFeatures]:
    """The sacral pieces (``pieces``, below the vertebra ``s1``) that continue the sacrum: each no more than
    ``SACRAL_PIECE_ANTERIOR_MM`` in front of the S1 body centroid, and within ``SACRAL_PIECE_REACH_MM`` of the voxels
    of S1 (``whole``, int (z, y, x) components on the model grid of ``spacing_zyx`` mm) or of a piece joined before."""
    behind = [f for f in pieces
              if f.body_centroid_lps_mm[1] >= s1.body_centroid_lps_mm[1] - SACRAL_PIECE_ANTERIOR_MM]  # LPS: P is +y
    if not behind:
        return []
    boxes = ndimage.find_objects(whole, max_label=max(f.id for f in behind))
    margin = [int(np.ceil(SACRAL_PIECE_REACH_MM / s)) + 1 for s in spacing_zyx]
    joined = [s1.id]
    found = True
    while found:  # until no piece is within reach: a piece next to one joined later joins too
        found = False
        for f in [f for f in behind if f.id not in joined and boxes[f.id - 1] is not None]:
            box = tuple(slice(max(b.start - m, 0), b.stop + m) for b, m in zip(boxes[f.id - 1], margin))
            near = np.isin(whole[box], joined)
            if not near.any():
                continue
            gap = float(ndimage.distance_transform_edt(~near, sampling=spacing_zyx)[whole[box] == f.id].min())
            if gap <= SACRAL_PIECE_REACH_MM:
                joined.append(f.id)
                found = True
    for f in pieces:
        if f.id not in joined:
            log.info("left out a sacral piece %.0f mm below and %+.0f mm behind the S1 body centroid: not continuing "
                     "the sacrum", s1.body_centroid_lps_mm[2] - f.body_centroid_lps_mm[2],
                     f.body_centroid_lps_mm[1] - s1.body_centroid_lps_mm[1])
    return [f for f in pieces if f.id in joined]


def _chain_end(solution) -> tuple[int, bool]:
    """How many of the solved chain's components are vertebrae (``sequence.vertebrae_in``), and whether the last of
    those is S1."""
    n = vertebrae_in(solution.levels)
    return n, n > 0 and int(solution.levels[n - 1]) == level_index("S1")


# S2-S5: the sacral segments below S1 that may come out of the network as bodies of their own (sacral pieces, which
# the sequence model names S1 and the labelling merges into the sacrum). A whole spine (C2-S1, 24 bodies) with four of
# them has more components than there are levels; kept to the levels' number, it lost its smallest vertebra, C7
SACRAL_SEGMENTS_BELOW_S1 = 4
_PROBABILITY_STEPS = 254  # uint8 steps of the vertebra probability brought to the input grid
_TIE_BREAK = 1e-3  # of a model voxel: how far the components are moved off the input voxels' centres (see below)
# On CT, how far beyond the network's vertebra (brought to the input grid) a voxel of dense bone still belongs to it:
# at 2 mm the model grid leaves out about a voxel of each vertebra's surface. On the training CT sub-verse014 (VerSe,
# 1 x 1 x 2 mm) 70-83 % of each reference vertebra was labelled, and 41-61 % of the rest lay within 1.4 mm of the label.
DENSE_BONE_REACH_MM = 2.0
AIR_HU = -500.0  # CT: below this density (air, the -1024 HU outside a scan's reconstructed field) no voxel is labelled


def components_on_input_grid(components: np.ndarray, bone_probability: np.ndarray, grid: sitk.Image,
                             image: sitk.Image, dense_bone_hu: float | None = None,
                             cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, dict[int, int]]:
    """Bring vertebra components from the model grid onto the input grid with smooth surfaces.

    Nearest-neighbour upsampling alone would give staircase surfaces at the model's 2 mm; instead the vertebra
    probability is interpolated linearly onto the input grid and thresholded at 0.5, and each voxel inside takes the
    id of the nearest model-grid component. The probability travels in uint8 steps of 1/254 (0.5 is step 127): a
    quarter of the memory of float32 on the input grid, and on the 512x512x800 benchmark 836 of 1.9 million labelled
    voxels differ from float32 interpolation. Each component is resampled only in its own box: along the curved
    512x512x800 benchmark spine those boxes hold 0.42 times the voxels of the box around all of them.

    A vertebra in one piece on the model grid stays in one on the input grid: where the interpolation cuts a thin
    bridge, the voxels whose nearest model voxel holds it join again (``_bridges``). On CT (``dense_bone_hu`` given) no
    voxel of air (below ``AIR_HU``) is labelled, and unlabelled voxels at least ``dense_bone_hu`` dense, connected to a
    vertebra within ``DENSE_BONE_REACH_MM`` of it, then join it (``_grow_into_dense_bone``): at the model's 2 mm the
    network leaves out about a voxel of each vertebra's surface, which the input grid resolves. Last, each vertebra
    takes the small cavities it encloses (``_fill_enclosed``).

    Args:
        components: int16 (z, y, x) component ids on the model grid.
        bone_probability: float16 (z, y, x) vertebra probability (0-1) on the model grid.
        grid: the model grid.
        image: the input image (Hounsfield units when ``dense_bone_hu`` is given).
        dense_bone_hu: on CT, the density from which a voxel beside a vertebra is bone; None (MR) grows nothing.
        cancel: polled before each component; returning True raises ``Cancelled``.

    Returns:
        int16 (z, y, x) component ids on the input grid, and the number of input voxels of each id.
    """
    out = zeros_on_demand(image.GetSize()[::-1], np.int16)  # its pages outside the vertebrae take no memory
    voxels: dict[int, int] = {}
    # each component's model-grid box, with a margin of one voxel: every voxel the resampling reads for it
    last = np.array(components.shape) - 1
    boxes = [(vid, np.maximum([s.start - 1 for s in box], 0), np.minimum([s.stop for s in box], last))
             for vid, box in enumerate(ndimage.find_objects(components), start=1) if box is not None]
    if not boxes:
        return out, voxels
    grid_geometry, input_geometry = Geometry.of(grid), Geometry.of(image)
    lo_all = np.min([lo for _, lo, _ in boxes], axis=0)
    crop = tuple(slice(a, b + 1) for a, b in zip(lo_all, np.max([hi for _, _, hi in boxes], axis=0)))
    # placed a hair (``_TIE_BREAK`` of a model voxel) back along each grid axis: input voxels whose centres lie halfway
    # between two model voxels (every other 1 mm or 3 mm voxel: the model grid starts at the input's corner voxel) go
    # to the upper one, as ITK rounds an exact tie, and are no ties, which a rounding of the header's axis directions
    # by 4e-10 decided either way (sub-verse014 so rounded: 5 % of its labelled voxels changed, up to 3 voxels deep
    # with the dense bone grown from them)
    crop_origin = grid_geometry.index_to_lps(lo_all[::-1].astype(float) - _TIE_BREAK)
    comp_image = _placed(sitk.GetImageFromArray(components[crop].astype(np.int16)), grid, crop_origin)
    prob_image = _placed(sitk.GetImageFromArray(np.rint(bone_probability[crop] * _PROBABILITY_STEPS).astype(np.uint8)),
                         grid, crop_origin)
    size = np.array(image.GetSize())
    hu = sitk.GetArrayViewFromImage(image) if dense_bone_hu is not None else None  # no copy
    placed = []
    for vid, lo_zyx, hi_zyx in boxes:
        if cancel is not None and cancel():
            raise Cancelled()
        corners = np.array([[x, y, z] for z in (lo_zyx[0], hi_zyx[0]) for y in (lo_zyx[1], hi_zyx[1])
                            for x in (lo_zyx[2], hi_zyx[2])], float)
        ijk = input_geometry.lps_to_index(grid_geometry.index_to_lps(corners))
        lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, size - 1)
        hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 2, 1, size)
        reference = _placed(sitk.Image([int(v) for v in hi - lo], sitk.sitkUInt8), image,
                            input_geometry.index_to_lps(lo.astype(float)))
        ids_on_input = resample_to_grid(comp_image, reference, label=True)
        prob_on_input = resample_to_grid(prob_image, reference, pixel_type=sitk.sitkUInt8)
        nearest_prob = resample_to_grid(prob_image, reference, label=True)
        ids, prob = sitk.GetArrayViewFromImage(ids_on_input), sitk.GetArrayViewFromImage(prob_on_input)  # no copies
        target = out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
        # boxes overlap: a voxel goes to the first id that takes it, so that every voxel is counted once. On CT a voxel
        # of air is no vertebra's (sub-verse014's S1 took 2.8 ml of the -1024 HU band at the edge of its scan)
        free = target == 0
        if hu is not None:
            free &= hu[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] >= AIR_HU
        half = _PROBABILITY_STEPS // 2
        inside = (ids == vid) & (prob >= half) & free
        # the interpolation drops below 0.5 between the model voxels of a thin bridge (a pedicle one model voxel wide,
        # running diagonally): a vertebra connected on the model grid fell in two on the input grid (on the lumbar MRI
        # IVD_20 of ../shared/data, L3's arch, 19 ml, lay one voxel apart from its body). The voxels whose nearest
        # model voxel is of the component at a probability of 0.5 or more join where they connect its pieces
        inside |= _bridges(inside, (ids == vid) & (sitk.GetArrayViewFromImage(nearest_prob) >= half) & free & ~inside)
        target[inside] = vid
        voxels[vid] = int(np.count_nonzero(inside))
        placed.append((vid, lo[::-1], hi[::-1]))
    reach = np.zeros(3, dtype=int)
    if dense_bone_hu is not None:
        structure = comp.ball(DENSE_BONE_REACH_MM, image.GetSpacing()[::-1])
        reach = np.array(structure.shape) // 2
        for vid, lo_zyx, hi_zyx in placed:
            voxels[vid] += _grow_into_dense_bone(out, vid, lo_zyx, hi_zyx, hu, structure, dense_bone_hu)
    most = max(1, int(ENCLOSED_MAX_ML * 1000.0 / float(np.prod(image.GetSpacing()))))
    for vid, lo_zyx, hi_zyx in placed:
        voxels[vid] += _fill_enclosed(out, vid, lo_zyx - reach, hi_zyx + reach, most)
    return out, voxels


# Unlabelled cavities a vertebra encloses on the input grid up to this size (each) are filled: voxels of vertebra
# probability just under 0.5 inside the bone (on the CT sub-verse014 of ../shared/data 24-96 cavities of 1-10 voxels per
# vertebra, pinholes in Slicer's slice views; its reference masks enclose 0-1). A vertebra encloses no space of its own;
# the limit keeps a canal closed by the field of view or a sacrum's mass (ml) unfilled.
ENCLOSED_MAX_ML = 0.1


def _fill_enclosed(out: np.ndarray, vid: int, lo_zyx: np.ndarray, hi_zyx: np.ndarray, most: int) -> int:
    """Give vertebra ``vid`` the unlabelled voxels it encloses (6-connected cavities, of at most ``most`` voxels
    each) in its box ``lo_zyx``-``hi_zyx`` (input voxel indices, stop exclusive, clipped here); ``out`` (int16
    (z, y, x) vertebra ids on the input grid) is modified in place. Returns the number of voxels added."""
    box = tuple(slice(max(int(a), 0), max(int(b), 0)) for a, b in zip(lo_zyx, hi_zyx))
    region = out[box]  # a view: writes go to ``out``
    own = region == vid
    if not own.any():
        return 0
    # enclosed: the parts (6-neighbourhood) of the rest of the box that reach none of its faces (what
    # ndimage.binary_fill_holes finds, in one labelling where it dilates over and over: a second a scan)
    rest, n_rest = ndimage.label(~own)
    reaches = np.zeros(n_rest + 1, dtype=bool)
    for axis in range(3):
        reaches[np.take(rest, [0, -1], axis=axis)] = True
    pieces, n = ndimage.label(~reaches[rest] & (region == 0))
    if n == 0:
        return 0
    small = np.bincount(pieces.ravel()) <= most
    small[0] = False
    filled = small[pieces]
    region[filled] = vid
    return int(np.count_nonzero(filled))


def _bridges(pieces_mask: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """bool (z, y, x): the connected regions (26-neighbourhood) of ``candidates`` (bool (z, y, x)) that touch two or
    more connected pieces of ``pieces_mask`` (bool, same shape): the voxels that join those pieces again."""
    if not candidates.any():  # checked first: it spares the labelling of the pieces
        return np.zeros(candidates.shape, dtype=bool)
    pieces, n = ndimage.label(pieces_mask, structure=comp.TWENTY_SIX_CONNECTED)
    if n < 2:
        return np.zeros(candidates.shape, dtype=bool)
    regions, m = ndimage.label(candidates, structure=comp.TWENTY_SIX_CONNECTED)
    at = np.nonzero(candidates)
    here = regions[at].astype(np.int64)
    pairs = []
    for step in itertools.product((-1, 0, 1), repeat=3):  # each (region, piece) pair of 26-neighbours
        # a step off the box stays on its face: the voxel reached is still a neighbour, or the candidate itself
        there = pieces[tuple(np.clip(i + k, 0, size - 1) for i, k, size in zip(at, step, pieces.shape))]
        pairs.append(here[there > 0] * (n + 1) + there[there > 0])
    pairs = np.unique(np.concatenate(pairs))
    touched = np.bincount(pairs // (n + 1), minlength=m + 1)  # distinct pieces each region touches
    return (touched >= 2)[regions] & (regions > 0)


def _grow_into_dense_bone(out: np.ndarray, vid: int, lo_zyx: np.ndarray, hi_zyx: np.ndarray, hu: np.ndarray,
                          structure: np.ndarray, min_hu: float) -> int:
    """Give vertebra ``vid`` the unlabelled voxels of at least ``min_hu`` within ``structure`` (``components.ball`` of
    ``DENSE_BONE_REACH_MM`` on the input grid) of it, in its box ``lo_zyx``-``hi_zyx`` (input voxel indices, stop
    exclusive) widened by that reach; ``out`` (int16 (z, y, x) vertebra ids on the input grid) is modified in place,
    ``hu`` (z, y, x, Hounsfield units) is not. A voxel within reach of two vertebrae goes to the one grown first (the
    lower id). Returns the number of voxels added."""
    reach = np.array(structure.shape) // 2
    box = tuple(slice(max(int(a) - r, 0), int(b) + r) for a, b, r in zip(lo_zyx, hi_zyx, reach))
    region = out[box]  # a view: writes go to ``out``
    free = region == 0
    free &= hu[box] >= min_hu
    own = region == vid
    grown = ndimage.binary_dilation(own, structure=structure, mask=free)  # the mask spares most of the work
    grown &= free
    # a dense voxel within reach across a voxel that is not (the ball reaches 2 mm) would be a speck apart from the
    # vertebra: only those connected (26-neighbourhood) to it join. On sub-verse014 the specks made 9-36 pieces of
    # each vertebra
    pieces, _ = ndimage.label(own | grown, structure=comp.TWENTY_SIX_CONNECTED)
    attached = np.zeros(int(pieces.max()) + 1, dtype=bool)
    attached[pieces[own]] = True
    attached[0] = False
    grown &= attached[pieces]
    region[grown] = vid
    return int(np.count_nonzero(grown))


def _placed(image: sitk.Image, like: sitk.Image, origin: np.ndarray) -> sitk.Image:
    """``image`` with the spacing and direction of ``like`` and its first voxel at ``origin`` (x, y, z LPS mm)."""
    image.SetSpacing(like.GetSpacing())
    image.SetDirection(like.GetDirection())
    image.SetOrigin(tuple(float(v) for v in origin))
    return image


def _empty(geometry, warnings, loaded, timings, source, modality, t0, spine_probability) -> SpineLabeling:
    timings["total"] = round(time.perf_counter() - t0, 3)
    return SpineLabeling(
        geometry=geometry,
        components=np.zeros(geometry.size[::-1], dtype=np.int16),
        vertebrae=[],
        warnings=warnings + [NOTHING_FOUND],
        sequence_warnings=[NOTHING_FOUND],
        model=loaded.info,
        timings_s=timings,
        source=source,
        modality=modality,
        spine_probability=spine_probability,
    )
