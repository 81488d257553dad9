"""Training and fine-tuning SpineLabel networks: data sources, partial-label losses, the loop, checkpoints.

Data sources (mixed by weight):

* ``synthetic``: whole-spine images synthesised from real anatomy (``synthesis``), full tissue labels;
* ``phantom``: the procedural phantom (``SpineLabelLib.phantom``);
* ``negative``: images without a spine (``negatives``), every voxel background;
* a folder of real labelled scans, found at any depth as ``spinelabel evaluate --label`` finds them (``find_cases``):
  nnU-Net (``imagesTr/X_0000.nii.gz`` + ``labelsTr/X.nii.gz``, as the Slicer export writes; label values read by
  their names in ``dataset.json``), VerSe (``X_ct.nii.gz`` + ``X_seg-vert_msk.nii.gz``, TPTBox endplates counted to
  their vertebra), or bodies-only MRI (``X_img.nii.gz`` + ``X_vert-verse.nii.gz``).

Real label maps say which vertebra a voxel belongs to, not always whether it is body or posterior element. The tissue
loss therefore takes *sets* of allowed classes: a whole-vertebra voxel may be body or posterior (``VERTEBRA``), an
unlabelled voxel background or disc (``NOT_VERTEBRA``), and in bodies-only data every voxel that is not body may be
background, posterior element or disc (``NOT_BODY``). The loss is -log of the summed probability of the allowed
classes, so a dataset never teaches what it does not know. A case that SpineLabel exported (``export.export_case``)
is complete in its names, not in its voxels: the unlabelled voxels near a vertebra whose voxels the user left as the
network made them are unknown too (``unknown_near``).

Arrays are (z, y, x) on the LPS-aligned model grid (``SpineLabelLib.io.canonical_grid``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from SpineLabelLib.evaluation import labelled_cases, reference_labels
from SpineLabelLib.export import dataset_ignore_value, provenance_of, read_dataset_json, recorded_modality
from SpineLabelLib.inference import CT_WINDOW_HU, Cancelled, autocast, modality_of, normalise, resolve_device
from SpineLabelLib.io import (IMAGE_SUFFIXES, InputError, atomic_path, axes_text, canonical_grid, grid_difference,
                              image_stem, make_writable_folder, no_empty_new_folders, read_image, read_label_map,
                              read_notes, resample_to_grid, write_errors_named)
from SpineLabelLib.models import (MODEL_SPACING_MM, ModelError, checkpoint_path, default_model_path, load_model,
                                  model_card_path, read_card, save_model, sha256_of, user_models_dir)
from SpineLabelLib.network import SpineUNet
from SpineLabelLib.pipeline import MIN_CONTEXT_VOXELS, with_context
from SpineLabelLib.result import Geometry
from SpineLabelLib.vertebrae import BODY, BY_LABEL, COCCYX_LABEL, DISC, LEVELS, POSTERIOR, TISSUE_NAMES, level_index

from .synthesis import IGNORE

__all__ = [
    "NOT_VERTEBRA",
    "VERTEBRA",
    "NOT_BODY",
    "IGNORE",
    "Case",
    "find_cases",
    "load_case",
    "unknown_beyond_labelled_ends",
    "unknown_near",
    "UNSURE_MM",
    "TrainConfig",
    "train",
]

log = logging.getLogger(__name__)

NOT_VERTEBRA, VERTEBRA, NOT_BODY = 252, 253, 254  # partial labels; IGNORE (255) comes from synthesis
# within this distance of an exported vertebra whose voxels the user did not edit, an unlabelled voxel is unknown: on
# the real CT sub-verse014 the shipped model's vertebrae missed 21 % of the reference vertebra voxels, 93 % of them
# within 6 mm of a vertebra it labelled (86 % within 4 mm)
UNSURE_MM = 6.0
# default peak learning rates: a fine-tune at the new-model rate forgets what its base knew (two exported phantoms,
# 50 steps at 2e-3: 15 of 28 held-out real MRI vertebrae identified, 28 before; the shipped model was tuned at 3e-4)
NEW_MODEL_LR, FINE_TUNE_LR = 2e-3, 3e-4
NEW_MODEL_SPACING_MM = 2.0  # a new model's grid spacing
# less than this between the lowest and highest value of an image its dataset.json records as CT, and its values are no
# Hounsfield units (a CT with a vertebra holds bone hundreds of HU above soft tissue): a CT rescaled to [0, 1] or
# z-scored by another tool went through the CT window into 0.45-0.46, a nearly blank image, and was trained on
MIN_CT_SPREAD_HU = 100.0
_ALLOWED = np.zeros((256, len(TISSUE_NAMES)), dtype=bool)
for _c in range(len(TISSUE_NAMES)):
    _ALLOWED[_c, _c] = True
_ALLOWED[NOT_VERTEBRA, [0, DISC]] = True
_ALLOWED[VERTEBRA, [BODY, POSTERIOR]] = True
_ALLOWED[NOT_BODY, [0, POSTERIOR, DISC]] = True
_ALLOWED[IGNORE, :] = True
# VerSe label value -> level index + 1 (0 = no level)
_LEVEL_OF_LABEL = np.zeros(256, dtype=np.int64)
for _level in LEVELS:
    _LEVEL_OF_LABEL[_level.label] = level_index(_level.name) + 1
# label values of real masks that are no vertebra SpineLabel labels, taught as not vertebra: VerSe's coccyx and the
# TPTBox discs (100 + the label of the vertebra above); any other value is refused, not taught as background
_NOT_A_LEVEL = {COCCYX_LABEL} | {100 + label for label in BY_LABEL}
# the --data sources SpineLabel makes itself; any other is a folder of labelled scans
_GENERATED = ("synthetic", "phantom", "negative")


def _level_target(levels: torch.Tensor) -> torch.Tensor:
    """The level head's target: int64 (..., Z/2, Y/2, X/2) level index, -1 where no vertebra, from integer
    (..., Z, Y, X) VerSe labels taken at every second voxel (the head's half-resolution grid)."""
    return torch.from_numpy(_LEVEL_OF_LABEL).to(levels.device)[levels[..., ::2, ::2, ::2].long()] - 1


@dataclass
class Case:
    """One training case on the model grid.

    Attributes:
        image: float32 (z, y, x), normalised to [0, 1] (``inference.normalise``, CT with ``CT_WINDOW_HU``); about
            [0, 1] after ``_augment``, whose noise leaves that range.
        tissue: uint8 (z, y, x) tissue target: a class of ``TISSUE_NAMES`` or one of the partial-label codes.
        levels: uint8 (z, y, x) VerSe label of the vertebra each voxel belongs to, 0 elsewhere.
        name: case name, for logs.
    """

    image: np.ndarray
    tissue: np.ndarray
    levels: np.ndarray
    name: str = ""


def find_cases(folder: str | Path) -> list[tuple[Path, Path, bool]]:
    """(image, label map, bodies_only) for every labelled case under ``folder``, found as ``spinelabel evaluate
    --label`` finds reference cases and their images (``evaluation.labelled_cases``: nnU-Net, VerSe and
    ``*_img``/``*_vert-verse`` layouts, at any depth). Bodies-only as evaluation reads it (``GtFiles.bodies_only``):
    ``*_vert-verse`` masks (the layout of ``mri_lumbar_bodies``) and nnU-Net datasets whose ``dataset.json`` says
    ``"bodies_only": true``.

    Raises:
        FileNotFoundError: no labelled case with its image in ``folder``.
    """
    try:
        cases = labelled_cases(folder)
    except InputError as err:
        raise FileNotFoundError(str(err)) from None
    if not cases:
        raise FileNotFoundError(f"{folder}: no labelled case has its image beside it")
    return [(image, gt.mask, gt.bodies_only) for image, gt in cases]


def load_case(image_path: Path, label_path: Path, bodies_only: bool, spacing_mm: float) -> Case:
    """Resample a real labelled scan onto the model grid (``spacing_mm`` voxels) and build its (partial) targets.

    The image is normalised for the modality its nnU-Net dataset records (``export.recorded_modality``: what the
    export's labelling took it for), else for the one ``inference.modality_of`` detects. In a case
    with an export's provenance record (``export.provenance_of``), the unlabelled voxels near its vertebrae whose
    voxels the user did not edit are unknown (``unknown_near``); so are the voxels of nnU-Net's ignore label
    (``export.dataset_ignore_value``). A case of an nnU-Net dataset of more than one channel is refused
    (``_one_channel``).
    """
    if label_path.parent.name == "labelsTr":
        _one_channel(image_path, label_path)
    image = read_image(image_path)
    for note in read_notes(image):  # a labelling lists them among its warnings; training has no such list
        log.warning("%s: %s", image_path, note)
    pixels = sitk.GetArrayViewFromImage(image)
    if pixels.min() == pixels.max():
        raise InputError(f"{image_path}: image is constant: training on it would teach its labels in a blank image")
    labels = read_label_map(label_path)
    if not Geometry.of(labels).matches(Geometry.of(image)):
        difference = grid_difference(Geometry.of(labels), Geometry.of(image), "the image's")
        raise InputError(f"{label_path}: label map grid differs from its image {image_path}: {difference}")
    if label_path.parent.name == "labelsTr" and read_dataset_json(label_path.parent.parent) is None:
        raise InputError(f"{label_path.parent}: an nnU-Net labelsTr folder without its dataset.json, so what its label "
                         "values mean is unknown: restore the dataset.json whose 'labels' name the levels")
    values = reference_labels(sitk.GetArrayViewFromImage(labels), label_path)
    top = int(values.max())
    # a value beyond the table is refused before a count of that many values is made
    present = [top] if top >= _LEVEL_OF_LABEL.size else np.flatnonzero(np.bincount(values.ravel()))
    unknown = [int(v) for v in present
               if v and (v >= _LEVEL_OF_LABEL.size or not _LEVEL_OF_LABEL[v]) and v not in _NOT_A_LEVEL]
    if unknown:
        raise InputError(f"{label_path}: label values {unknown[:5]} are no VerSe vertebra value (1-26, 28; 27 the "
                         "coccyx): training would teach that bone as background")
    value = np.arange(top + 1)
    verse = np.where(_LEVEL_OF_LABEL[value] > 0, value, 0).astype(np.uint8)[values]  # the rest: no level
    if not verse.any():
        raise InputError(f"{label_path}: holds no vertebra label SpineLabel knows (VerSe values, or the names of its "
                         "dataset.json): training on it would teach its spine as background")
    ignore = dataset_ignore_value(label_path)
    if ignore is not None:  # resampled with the levels, as a value no level has
        verse[sitk.GetArrayViewFromImage(labels) == ignore] = IGNORE
    as_verse = sitk.GetImageFromArray(verse)
    as_verse.CopyInformation(labels)
    modality = recorded_modality(label_path)
    low, high = float(pixels.min()), float(pixels.max())
    if modality == "CT" and high - low < MIN_CT_SPREAD_HU:
        raise InputError(f"{image_path}: its dataset.json records CT, but its values span only {low:.4g} to "
                         f"{high:.4g}, no Hounsfield units (rescaled or normalised by another tool?): the CT window of "
                         f"{CT_WINDOW_HU[0]:g} to {CT_WINDOW_HU[1]:g} HU would read it as a nearly blank "
                         "image; give the image in Hounsfield units")
    grid = canonical_grid(image, spacing_mm)
    volume = _model_input(image, grid, modality)
    if volume.min() == volume.max():  # constant but for a few voxels, or two-valued (a mask given as the image)
        raise InputError(f"{image_path}: image is blank as the network reads it (every voxel the same once "
                         "normalised): training on it would teach its labels in a blank image")
    verse = sitk.GetArrayFromImage(resample_to_grid(as_verse, grid, label=True))
    unannotated = verse == IGNORE
    verse[unannotated] = 0
    if not verse.any():
        raise InputError(f"{label_path}: its vertebra labels vanish on the model's {spacing_mm:g} mm grid (too small "
                         "or too thin): training on it would teach its spine as background")
    if bodies_only:
        tissue = np.where(verse > 0, BODY, NOT_BODY).astype(np.uint8)
    else:
        tissue = np.where(verse > 0, VERTEBRA, NOT_VERTEBRA).astype(np.uint8)
    record = provenance_of(label_path)
    if record is not None:
        try:
            unedited = _unedited_labels(record)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            missing = f"a vertebra without {err.args[0]!r}: " if isinstance(err, KeyError) else ""
            raise InputError(f"{label_path}: the provenance record of this exported case is malformed ({missing}its "
                             "'vertebrae' must each have an 'id' and a whole-number 'label', and its 'corrections' "
                             "be JSON objects)") from None
        tissue = unknown_near(tissue, verse, unedited, spacing_mm)
    tissue = unknown_beyond_labelled_ends(tissue, verse)
    tissue[unannotated] = IGNORE
    return Case(volume, tissue, verse, image_path.name)


def _one_channel(image_path: Path, label_path: Path) -> None:
    """Refuse a case of an nnU-Net dataset of more than one channel (``imagesTr/X_0000``, ``X_0001``, ...): the network
    reads one image, and channel 0 alone would be trained on, whichever contrast it holds (the fat image of a water-fat
    MRI), while the others were left unread.

    Raises:
        InputError: the dataset.json names more than one channel (``channel_names``, or nnU-Net v1's ``modality``), or
            a second channel's file lies beside the image.
    """
    one_image = ("SpineLabel trains on one image per case and would read channel 0 alone: make a dataset of the one "
                 "channel to train on")
    dataset = read_dataset_json(label_path.parent.parent) or {}
    for key in ("channel_names", "modality"):
        channels = dataset.get(key)
        if isinstance(channels, dict) and len(channels) > 1:
            names = ", ".join(f"{k}: {v}" for k, v in channels.items())
            raise InputError(f"{label_path.parent.parent / 'dataset.json'}: names {len(channels)} channels ({names}); "
                             f"{one_image}")
    stem = image_stem(image_path.name)
    if stem is not None and stem.endswith("_0000"):
        second = [image_path.parent / f"{stem[:-5]}_0001{suffix}" for suffix in IMAGE_SUFFIXES]
        found = next((p for p in second if p.exists()), None)
        if found is not None:
            raise InputError(f"{found}: a second channel of the case of {image_path.name}; {one_image}")


def cases_sha256(folder: str | Path) -> str:
    """sha256 of the contents of the labelled cases of ``folder`` (``find_cases``: each image's and label map's
    bytes, in their order): a label map corrected in place keeps its name, not this."""
    digest = hashlib.sha256()
    for image, labels, _ in find_cases(folder):
        digest.update(f"{sha256_of(image)} {sha256_of(labels)}\n".encode())
    return digest.hexdigest()


def cases_metadata_sha256(folder: str | Path) -> str:
    """sha256 of what gives the labelled cases of ``folder`` (``find_cases``) their meaning beside their files' bytes
    (``cases_sha256``): what training reads of each case's nnU-Net ``dataset.json`` (its ``labels``: the levels its
    label values name and the ignore label; ``bodies_only``; ``channel_names``: the modality) and its export's
    provenance record (the vertebrae whose voxels were edited). A ``dataset.json`` corrected in place changes the
    targets of every case, not their files; its description does not."""
    digest = hashlib.sha256()
    for _, labels, _ in find_cases(folder):
        dataset = read_dataset_json(labels.parent.parent) if labels.parent.name == "labelsTr" else None
        meaning = {key: dataset.get(key) for key in ("labels", "bodies_only", "channel_names")} if dataset else None
        digest.update(json.dumps([meaning, provenance_of(labels)], sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def _written_by_training(card: Path) -> bool:
    """Whether ``card`` is a model card (``models.read_card``) naming the weights beside it (``card`` with ``.pt``),
    as ``models.save_model`` writes it at that path."""
    try:
        return read_card(card)["weights"] == card.with_suffix(".pt").name
    except ModelError:  # missing, unreadable, not a model card
        return False


def _unedited_labels(record: dict) -> list[int]:
    """VerSe labels of the vertebrae of an export's provenance record whose voxels the user did not edit: no
    ``segment_edit`` correction (Segment Editor edits taken in by the Slicer module) names them."""
    edited = {i for c in record.get("corrections", []) if c.get("action") == "segment_edit"
              for i in c.get("vertebra_ids", [])}
    return [int(v["label"]) for v in record.get("vertebrae", []) if v["id"] not in edited]


def unknown_near(tissue: np.ndarray, verse: np.ndarray, labels: list[int], spacing_mm: float) -> np.ndarray:
    """Mark the unlabelled voxels within ``UNSURE_MM`` of the vertebrae ``labels`` as ``IGNORE``.

    The network's vertebrae miss some of each vertebra's voxels (thin processes, the edges); exported unedited, those
    voxels would be taught as background or disc, and fine-tuning would teach the network its own misses.

    Args:
        tissue: uint8 (z, y, x) tissue targets (classes or partial-label codes); not modified.
        verse: uint8 (z, y, x) VerSe labels on the same isotropic grid.
        labels: VerSe labels of the vertebrae whose voxels are not known to be complete.
        spacing_mm: voxel size of that grid, mm.

    Returns:
        uint8 (z, y, x) tissue targets.
    """
    unsure = np.isin(verse, labels)
    if not unsure.any():
        return tissue
    reach = int(math.ceil(UNSURE_MM / spacing_mm))  # voxels; the distances are computed in the box they can reach
    box = tuple(slice(max(s.start - reach, 0), s.stop + reach)
                for s in ndimage.find_objects(unsure.astype(np.uint8))[0])
    out = tissue.copy()
    near = ndimage.distance_transform_edt(~unsure[box], sampling=spacing_mm) <= UNSURE_MM
    out[box][near & (verse[box] == 0)] = IGNORE
    return out


def _normalised(volume: np.ndarray, modality: str) -> np.ndarray:
    """``inference.normalise`` as the pipeline applies it to a model trained here (modality ``"CT"`` or ``"MR"``):
    ``volume`` (z, y, x), any real dtype, Hounsfield units for CT -> float32 (z, y, x) in [0, 1]."""
    return normalise(volume, CT_WINDOW_HU if modality == "CT" else None)


def _model_input(image: sitk.Image, grid: sitk.Image, modality: str | None = None) -> np.ndarray:
    """A real image as the pipeline gives it to the network: on ``grid`` (filled with the image minimum outside it),
    normalised for ``modality`` (``"CT"``, ``"MR"``, or None for the one ``inference.modality_of`` detects, as the
    pipeline's ``modality="auto"``). float32 (z, y, x)."""
    pixels = sitk.GetArrayViewFromImage(image)
    minimum = float(pixels.min())
    return _normalised(sitk.GetArrayFromImage(resample_to_grid(image, grid, default=minimum)),
                       modality or modality_of(pixels))


def unknown_beyond_labelled_ends(tissue: np.ndarray, verse: np.ndarray) -> np.ndarray:
    """Mark the unlabelled voxels beyond the first and last labelled vertebra, along the spine, as ``IGNORE``.

    Real label maps often stop short of what the image shows (lumbar MRI labelled L1-L5 shows T12 and the sacrum).
    Those visible but unlabelled vertebrae must not be taught as background: beyond the centroid of each end
    vertebra, in the direction away from its labelled neighbour, nothing unlabelled is known. A map with one
    labelled vertebra has no neighbour: every direction leads beyond it, so all its unlabelled voxels are unknown.

    Args:
        tissue: uint8 (z, y, x) tissue targets (classes or partial-label codes); not modified.
        verse: uint8 (z, y, x) VerSe labels on the same isotropic grid.

    Returns:
        uint8 (z, y, x) tissue targets.
    """
    present = [int(v) for v in np.unique(verse) if _LEVEL_OF_LABEL[v] > 0]
    if len(present) < 2:
        return np.where(verse == 0, IGNORE, tissue).astype(np.uint8) if present else tissue
    present.sort(key=lambda v: _LEVEL_OF_LABEL[v])
    centroids = {v: np.array(ndimage.center_of_mass(verse == v)) for v in (*present[:2], *present[-2:])}
    coords = np.indices(verse.shape, dtype=np.float32)
    out = tissue.copy()
    for end, neighbour in ((present[0], present[1]), (present[-1], present[-2])):
        direction = centroids[end] - centroids[neighbour]
        direction /= max(float(np.linalg.norm(direction)), 1e-6)
        along = np.tensordot(direction.astype(np.float32), coords, axes=1) - float(direction @ centroids[end])
        out[(along > 0) & (verse == 0)] = IGNORE
    return out


def _crop(case: Case, size: tuple[int, int, int], rng: np.random.Generator) -> Case:
    """Random crop (zero/ignore padded), centred on a vertebra voxel two times out of three."""
    shape = np.array(case.image.shape)
    size_a = np.array(size)
    if rng.random() < 0.67 and case.levels.any():
        zyx = np.argwhere(case.levels[::4, ::4, ::4]) * 4
        if not len(zyx):  # labels too small to meet every fourth voxel
            zyx = np.argwhere(case.levels)
        centre = zyx[rng.integers(len(zyx))]
    else:
        centre = rng.integers(0, np.maximum(shape, 1))
    start = centre - size_a // 2 + rng.integers(-size_a // 4, size_a // 4 + 1)
    src = [slice(max(0, s), min(n, s + w)) for s, w, n in zip(start, size_a, shape)]
    dst = [slice(a.start - s, a.stop - s) for a, s in zip(src, start)]
    out = Case(
        np.zeros(size, np.float32),
        np.full(size, IGNORE, np.uint8),
        np.zeros(size, np.uint8),
        case.name,
    )
    for name in ("image", "tissue", "levels"):
        getattr(out, name)[tuple(dst)] = getattr(case, name)[tuple(src)]
    return out


# The head-feet extent (mm) of the short windows of ``TrainConfig.short_window``: targeted scans and small crops, the
# TPTBox crops of ../shared/data among them (70 mm).
SHORT_WINDOW_MM = (30.0, 110.0)


def _short_window(case: Case, rng: np.random.Generator, spacing_mm: float) -> Case:
    """The crop cut to a short head-feet window (``SHORT_WINDOW_MM``) through one of its vertebrae, extended by its
    mirror image as labelling extends a scan that short (``pipeline.with_context``), in the middle of a crop of zeros
    of the same size; targets unknown (``IGNORE``, level 0) outside the window. The crop as it is when it holds no
    vertebra or is too short for the extension."""
    vertebra_z = np.flatnonzero(case.levels.any(axis=(1, 2)))
    if not vertebra_z.size:
        return case
    n = case.image.shape[0]
    width = min(n, max(1, round(rng.uniform(*SHORT_WINDOW_MM) / spacing_mm)))
    start = int(np.clip(rng.choice(vertebra_z) - width // 2 + rng.integers(-(width // 4), width // 4 + 1), 0,
                        n - width))
    extended, inner = with_context(case.image[start : start + width])
    if extended.shape[0] > n or extended.shape[1:] != case.image.shape[1:]:
        return case
    top = (n - extended.shape[0]) // 4 * 2  # even: the level head's half-resolution grid stays as in labelling
    window = slice(top + inner[0].start, top + inner[0].stop)
    out = Case(np.zeros_like(case.image), np.full_like(case.tissue, IGNORE), np.zeros_like(case.levels), case.name)
    out.image[top : top + extended.shape[0]] = extended
    out.tissue[window] = case.tissue[start : start + width]
    out.levels[window] = case.levels[start : start + width]
    return out


def _augment(case: Case, rng: np.random.Generator, tilt_deg: float = 0.0) -> Case:
    """Intensity gamma, contrast inversion now and then, noise, left-right flip (anatomy is nearly symmetric); with
    ``tilt_deg`` > 0, half the crops are also turned (``_tilted``)."""
    if tilt_deg > 0 and rng.random() < 0.5:
        case = _tilted(case, rng.uniform(-tilt_deg, tilt_deg), rng.uniform(-tilt_deg / 2, tilt_deg / 2))
    img = np.clip(case.image, 0, 1) ** math.exp(rng.normal(0, 0.3))
    if rng.random() < 0.15:
        img = 1.0 - img
    img = img + rng.normal(0, rng.uniform(0, 0.05), img.shape).astype(np.float32)
    tissue, levels = case.tissue, case.levels
    if rng.random() < 0.5:
        img, tissue, levels = img[..., ::-1], tissue[..., ::-1], levels[..., ::-1]
    return Case(np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(tissue),
                np.ascontiguousarray(levels), case.name)


def _tilted(case: Case, sagittal_deg: float, coronal_deg: float) -> Case:
    """``case`` turned about its centre by ``sagittal_deg`` about the left-right axis (in the z-y plane) and
    ``coronal_deg`` about the front-back axis (z-x), as a spine leans against the slices of a scan not planned along
    it; same shape, the corners filled by reflection (as ``pipeline.with_context`` extends a short scan), the image
    interpolated linearly, the tissue and level labels by nearest neighbour."""
    arrays = {"image": case.image, "tissue": case.tissue, "levels": case.levels}
    for angle, axes in ((sagittal_deg, (0, 1)), (coronal_deg, (0, 2))):
        arrays = {name: ndimage.rotate(a, angle, axes=axes, reshape=False, order=1 if name == "image" else 0,
                                       mode="reflect") for name, a in arrays.items()}
    return Case(arrays["image"], arrays["tissue"], arrays["levels"], case.name)


def _synthetic_source(spacing_mm: float, size: tuple[int, int, int], data_dir: Path, progress_bars: bool | None,
                      cancel: Callable[[], bool] | None) -> Callable[[np.random.Generator], Case]:
    from . import synthesis
    from .shapes import build_shape_library

    library = build_shape_library(data_dir, cancel=cancel, bar_disable=_bars_off(progress_bars))

    def draw(rng: np.random.Generator) -> Case:
        c = synthesis.synthesize_case(rng, library, spacing_mm=spacing_mm, size_zyx=size)
        return Case(_normalised(c.image, "CT" if c.modality == "ct" else "MR"), c.tissue, c.levels,
                    f"synthetic-{c.modality}")

    return draw


def _phantom_source(spacing_mm: float, size: tuple[int, int, int]) -> Callable[[np.random.Generator], Case]:
    from SpineLabelLib.phantom import make_phantom

    def draw(rng: np.random.Generator) -> Case:
        fov = str(rng.choice(["whole", "cervical", "thoracic", "lumbar"]))
        ph = make_phantom(modality=str(rng.choice(["ct", "mr"])), fov=fov, spacing=(spacing_mm,) * 3,
                          seed=int(rng.integers(1 << 31)))
        grid = canonical_grid(ph.image, spacing_mm)
        tissue = sitk.GetArrayFromImage(resample_to_grid(ph.tissue, grid, label=True))
        levels = sitk.GetArrayFromImage(resample_to_grid(ph.labels, grid, label=True))
        return _crop(Case(_model_input(ph.image, grid), tissue, levels, f"phantom-{fov}"), size, rng)

    return draw


def _negative_source(spacing_mm: float, size: tuple[int, int, int]) -> Callable[[np.random.Generator], Case]:
    from .negatives import KINDS, non_spine_image

    def draw(rng: np.random.Generator) -> Case:
        kind = str(rng.choice(KINDS))
        raw = non_spine_image(rng, kind, size, spacing_mm)
        background = np.zeros(size, np.uint8)
        return Case(_normalised(raw, modality_of(raw)), background, background.copy(), f"negative-{kind}")

    return draw


def _bars_off(progress_bars: bool | None) -> bool | None:
    """tqdm's ``disable`` for ``TrainConfig.progress_bars`` (None: tqdm draws where stderr is a terminal)."""
    return None if progress_bars is None else not progress_bars


def _folder_source(folder: Path, spacing_mm: float, size: tuple[int, int, int], progress_bars: bool | None,
                   cancel: Callable[[], bool] | None = None) -> tuple[Callable[[np.random.Generator], Case], list[str]]:
    found = find_cases(folder)
    cases = []
    for image, labels, bodies_only in tqdm(found, desc=f"loading {folder.name}", leave=False,
                                           disable=_bars_off(progress_bars)):
        if cancel is not None and cancel():  # a case takes about a second to load
            raise Cancelled()
        cases.append(load_case(image, labels, bodies_only, spacing_mm))

    def draw(rng: np.random.Generator) -> Case:
        return _crop(cases[int(rng.integers(len(cases)))], size, rng)

    return draw, [image.relative_to(folder).as_posix() for image, _, _ in found]


def make_source(spec: str, spacing_mm: float, size: tuple[int, int, int], data_dir: Path | None,
                progress_bars: bool | None = False, cancel: Callable[[], bool] | None = None
                ) -> tuple[Callable[[np.random.Generator], Case], list[str] | None]:
    """A sampler for one ``--data`` spec: ``synthetic``, ``phantom``, ``negative`` or a folder path; and, for a
    folder, its cases (image paths relative to it), else None. ``cancel`` is polled before each case of a folder is
    loaded, and before each file of a shape library built for ``synthetic``. Each draw is a :class:`Case` of ``size``
    (z, y, x) voxels of ``spacing_mm`` mm.

    Raises:
        ValueError: ``synthetic`` without ``data_dir``, the real labelled vertebrae its shapes come from.
        FileNotFoundError: a spec that is neither a keyword nor an existing path, or a folder without cases.
        Cancelled: ``cancel`` returned True.
    """
    if spec == "synthetic":
        if data_dir is None:
            raise ValueError("data 'synthetic' needs --data-dir: a folder of real labelled vertebrae for its shapes")
        return _synthetic_source(spacing_mm, size, data_dir, progress_bars, cancel), None
    if spec == "phantom":
        return _phantom_source(spacing_mm, size), None
    if spec == "negative":
        return _negative_source(spacing_mm, size), None
    if not Path(spec).exists():  # a keyword mistyped reads as a folder not found: say what else it could be
        raise FileNotFoundError(f"{spec}: no such folder, nor one of the generated sources {', '.join(_GENERATED)}")
    return _folder_source(Path(spec), spacing_mm, size, progress_bars, cancel)


def tissue_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Partial-label cross-entropy plus soft Dice of the body class.

    Args:
        logits: float (B, 4, Z, Y, X).
        target: uint8/long (B, Z, Y, X) tissue codes (classes or partial-label codes).
    """
    allowed = torch.from_numpy(_ALLOWED).to(logits.device)[target.long()].permute(0, 4, 1, 2, 3)
    log_p = F.log_softmax(logits, dim=1)
    known = target != IGNORE
    nll = -torch.logsumexp(log_p.masked_fill(~allowed, -1e4), dim=1)
    ce = (nll * known).sum() / known.sum().clamp(min=1)
    body_p = log_p[:, BODY].exp()
    body_t = (target == BODY).float()
    sure = _body_known(target)
    inter = (body_p * body_t * sure).sum()
    dice = 1 - (2 * inter + 1) / ((body_p * sure).sum() + body_t.sum() + 1)
    return ce + dice


def _body_known(tissue):
    """Where a tissue target (numpy array or tensor of codes) says whether the voxel is vertebral body: a tissue
    class, or a partial label that rules body out (``VERTEBRA`` leaves it open). bool, same shape and kind as
    ``tissue``."""
    return (tissue <= DISC) | (tissue == NOT_BODY) | (tissue == NOT_VERTEBRA)


def level_loss(logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the level head on vertebra voxels.

    Args:
        logits: float (B, n_levels, Z/2, Y/2, X/2).
        levels: integer (B, Z, Y, X) VerSe labels (uint8 from ``_batches``); subsampled by 2 to the head's grid.
    """
    target = _level_target(levels)[:, : logits.shape[2], : logits.shape[3], : logits.shape[4]]
    if not (target >= 0).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=-1)


@dataclass
class TrainConfig:
    """Settings of one training run (see ``spinelabel train --help``)."""

    data: list[tuple[str, float]]  # (source, weight): "synthetic", "phantom", "negative" or a folder of cases
    out: Path  # the model card to write (.json), its weights beside it
    base_model: Path | None = None
    name: str = "spinelabel-finetuned"
    version: str = "0.1.0"
    epochs: int = 10
    iterations: int = 100  # per epoch
    batch: int = 2  # crops per iteration
    patch: tuple[int, int, int] = (128, 80, 80)  # crop size in model voxels, (z, y, x), each a multiple of 16
    lr: float | None = None  # peak learning rate; None: NEW_MODEL_LR, or FINE_TUNE_LR with a base model
    spacing_mm: float | None = None  # a new model's isotropic grid spacing, mm; None: NEW_MODEL_SPACING_MM (a fine-tune
    # keeps its base model's and refuses another)
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    validation_cases: int = 4
    data_dir: Path | None = None  # real labelled vertebrae: the shapes of ``synthetic``
    # tqdm bars on stderr: None where it is a terminal (the CLI's), True always (for a program that reads them, as the
    # SpineLabelTraining module does), False never (a library logs, it does not draw)
    progress_bars: bool | None = False
    training_data_note: str = ""
    average_last: int = 0
    tilt_deg: float = 0.0  # half the crops turned about left-right by up to this (degrees), front-back by half
    short_window: float = 0.0  # share of crops cut to a short head-feet window and extended as labelling extends it


# settings added to the checkpoint after the first checkpoints were written, with the value those runs had
_ADDED_SETTINGS = {"tilt_deg": 0.0, "short_window": 0.0}
# how a refused resume names the checkpoint's settings that differ: the spinelabel train option that sets each (the
# others are "--" + the name, dashed), or words for what no option sets
_SETTING_WORDS = {"spacing_mm": "--spacing", "cases": "the cases of its --data folders",
                  "cases_sha256": "the contents of those cases", "cases_metadata_sha256": "the contents of those cases",
                  "base_sha256": "the --base-model's weights"}


def _batches(sources, weights, cfg: TrainConfig, spacing_mm: float, rng: np.random.Generator
             ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless CPU batches of ``cfg.batch`` augmented cases, each drawn from a source chosen by ``weights`` (float
    (n_sources,) probabilities): (image float32 (B, 1, Z, Y, X), normalised, about [0, 1] after the augmentation's
    noise; tissue uint8 (B, Z, Y, X) tissue codes; levels uint8 (B, Z, Y, X) VerSe labels), (Z, Y, X) = ``cfg.patch``
    voxels of ``spacing_mm``."""
    def drawn() -> Case:
        case = sources[rng.choice(len(sources), p=weights)](rng)
        if cfg.short_window and rng.random() < cfg.short_window:
            case = _short_window(case, rng, spacing_mm)
        return _augment(case, rng, cfg.tilt_deg)

    while True:
        cases = [drawn() for _ in range(cfg.batch)]
        yield (
            torch.from_numpy(np.stack([c.image for c in cases]))[:, None],
            torch.from_numpy(np.stack([c.tissue for c in cases])),
            torch.from_numpy(np.stack([c.levels for c in cases])),
        )


def _training_autocast(device: torch.device):
    """bfloat16 autocast for the training steps on a CUDA GPU (``inference.autocast``); float32 on a CPU. On a CPU that
    runs bfloat16 natively, oneDNN's bfloat16 weight gradients of a convolution over a grid two voxels deep (the
    network's deepest level under a patch 32 voxels deep) came out with garbage now and then, the forward pass the same
    every time (PyTorch 2.13, AVX-512 BF16: 1e32 in one step of three, so a run of one step failed as diverged, and
    smaller garbage that passes for a gradient), where float32 costs about a tenth more time a step. Validation and
    labelling, forward passes only, keep bfloat16."""
    return autocast(device) if device.type == "cuda" else contextlib.nullcontext()


def _validate(net: SpineUNet, val: list[Case], device: torch.device) -> dict:
    """Body Dice (where body is known; None when no crop has a body target, as whole-vertebra labels have not) and
    level accuracy on vertebra voxels (None without any) of fixed validation crops.

    The crops are drawn from the training sources, one from each in turn: fresh cases of the generated sources, but
    crops of its own training scans for a folder, where the figures measure fit, not generalisation. The card names
    the crops (``training.validation_crops``)."""
    net.eval()
    inter = predicted = target_body = correct = counted = 0.0
    with torch.inference_mode():
        for c in val:
            with autocast(device):
                t_logits, l_logits = net(torch.from_numpy(c.image)[None, None].to(device))
            pred = t_logits.argmax(1)[0].cpu().numpy()
            sure = _body_known(c.tissue)
            inter += float(((pred == BODY) & (c.tissue == BODY) & sure).sum())
            predicted += float(((pred == BODY) & sure).sum())
            target_body += float((c.tissue == BODY).sum())
            target = _level_target(torch.from_numpy(c.levels)).numpy()
            lv = l_logits.argmax(1)[0].cpu().numpy()
            mask = target >= 0
            correct += float((lv[mask] == target[mask]).sum())
            counted += float(mask.sum())
    net.train()
    return {"body_dice": inter * 2 / (predicted + target_body) if target_body else None,
            "level_accuracy": correct / counted if counted else None}


def _finite_mean(values: list[float]) -> float | None:
    """Mean of the finite ``values``; None when there is none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def epoch_text(metrics: dict) -> str:
    """``epoch 3/10 loss 0.4120 body_dice 0.812 level_accuracy 0.640`` of one epoch's metrics; ``n/a`` for a loss
    that no step had finite, or where the validation crops had nothing to score (no known body, as in
    whole-vertebra labels)."""
    def number(name: str, spec: str) -> str:
        return "n/a" if metrics[name] is None else format(metrics[name], spec)

    return (f"epoch {metrics['epoch']}/{metrics['epochs']} loss {number('loss', '.4f')} "
            f"body_dice {number('body_dice', '.3f')} level_accuracy {number('level_accuracy', '.3f')}")


def train(cfg: TrainConfig, progress: Callable[[dict], None] | None = None,
          cancel: Callable[[], bool] | None = None) -> Path:
    """Train (or fine-tune from ``cfg.base_model``) and write the model card + weights to ``cfg.out``.

    A checkpoint (``<out>.ckpt``) is written after every epoch; ``cfg.resume`` continues from it.
    ``progress`` receives ``{"epoch", "epochs", "loss", "body_dice", "level_accuracy"}`` after each epoch.
    A step whose gradient is not finite is skipped, so that one overflow cannot wipe out the weights (the bfloat16
    backward kernels of the CPU occasionally give one on tiny patches, though the same step in float32 does not);
    each epoch's entry of the card's training history counts them (``skipped_steps``), and its loss is the mean
    loss of its batches whose loss was finite (None when none was).
    With ``cfg.average_last`` = N > 0 the model written is the mean of the weights at the end of the last N epochs
    (stochastic weight averaging, Izmailov et al. 2018: a flatter, steadier optimum than any single epoch's), scored
    once more on the validation crops.
    A run that fails before writing anything leaves no folder it made for ``cfg.out``.
    ``cancel`` is polled before each training step, each validation crop, each case of a folder and each file of a
    shape library being built; when it returns True the run raises ``Cancelled``, leaving the checkpoint of the last
    whole epoch (``cfg.resume`` continues it).
    Returns the card path.
    """
    # the seed (``_train``) and the draws of the run leave the caller's random generators as they were
    with no_empty_new_folders(Path(cfg.out).parent), torch.random.fork_rng(devices=[]):
        return _train(cfg, progress, cancel)


def _checked(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its sources of weight 0 left out and the defaults of its spacing and learning rate filled in.

    Raises:
        ValueError: a setting out of its range, named by its ``spinelabel train`` option.
    """
    weights = np.array([w for _, w in cfg.data], dtype=float)
    if not cfg.data or (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        given = ", ".join(f"{float(w):g}" for _, w in cfg.data) or "none"
        raise ValueError(f"--data weights {given}: each must be 0 or more, and one more than 0")
    left_out = [spec for spec, w in cfg.data if w == 0]
    if left_out:  # not read either: a source that is not trained on cannot stop the run
        log.info("left out, weight 0: %s", ", ".join(left_out))
        cfg = replace(cfg, data=[(spec, w) for spec, w in cfg.data if w > 0])
    for name, value, least in (("--epochs", cfg.epochs, 1), ("--iterations", cfg.iterations, 1),
                               ("--batch", cfg.batch, 1), ("--validation-cases", cfg.validation_cases, 0),
                               ("--average-last", cfg.average_last, 0), ("--tilt-deg", cfg.tilt_deg, 0),
                               ("--short-window", cfg.short_window, 0)):
        if not value >= least or not math.isfinite(value):  # NaN compares false
            raise ValueError(f"{name} {value}: must be a finite number, {least} or more")
    if cfg.short_window > 1:
        raise ValueError(f"--short-window {cfg.short_window}: a share of the crops, from 0 to 1")
    if cfg.short_window and (cfg.patch[0] < MIN_CONTEXT_VOXELS[0] or cfg.patch[1] < MIN_CONTEXT_VOXELS[1]):
        raise ValueError(f"--short-window with --patch {axes_text(cfg.patch)}: labelling extends a short "
                         f"scan to {MIN_CONTEXT_VOXELS[0]} voxels along z and y, which the patch must hold")
    if min(cfg.patch) < 1:
        raise ValueError(f"--patch {axes_text(cfg.patch)}: each size must be 1 or more")
    if cfg.base_model is not None and cfg.spacing_mm is not None:
        raise ValueError(f"--spacing {cfg.spacing_mm}: a fine-tune keeps the grid spacing of its base model "
                         f"{cfg.base_model}; a spacing is given to a new model only")
    if cfg.spacing_mm is None and cfg.base_model is None:
        cfg = replace(cfg, spacing_mm=NEW_MODEL_SPACING_MM)
    if cfg.base_model is None and not MODEL_SPACING_MM[0] <= cfg.spacing_mm <= MODEL_SPACING_MM[1]:  # NaN too
        raise ValueError(f"--spacing {cfg.spacing_mm}: a model grid spacing is from {MODEL_SPACING_MM[0]} to "
                         f"{MODEL_SPACING_MM[1]} mm")
    if cfg.lr is None:
        cfg = replace(cfg, lr=NEW_MODEL_LR if cfg.base_model is None else FINE_TUNE_LR)
    if not 0 < cfg.lr < math.inf:  # NaN compares false
        raise ValueError(f"--lr {cfg.lr}: the learning rate must be a finite number above 0")
    return cfg


def _train(cfg: TrainConfig, progress: Callable[[dict], None] | None, cancel: Callable[[], bool] | None) -> Path:
    """``train``'s work."""
    cfg = _checked(cfg)
    weights = np.array([w for _, w in cfg.data], dtype=float)
    # the CPU's generator only: the initial weights are drawn on the CPU, and nothing of a run draws on a GPU (whose
    # generators torch.manual_seed would seed for the whole process, past the fork of ``train``)
    torch.random.default_generator.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    out = model_card_path(cfg.out)
    ckpt = checkpoint_path(out)
    for path in (Path(cfg.out), out, ckpt, out.with_suffix(".pt")):  # found now, not after the epochs
        if path.is_dir():
            raise ValueError(f"{path}: is a folder; give a model card path (.json)")
    for spec, _ in cfg.data:  # a folder of real cases: the model's files could replace its dataset.json or an image
        if spec not in _GENERATED and Path(spec).is_dir() and Path(spec).resolve() in out.resolve().parents:
            raise ValueError(f"{out}: lies inside the training data {spec}; write the model elsewhere")
    default = default_model_path()  # its weights are named as save_model names them
    owner = {path.resolve(): "the model shipped with SpineLabel" for path in (default, default.with_suffix(".pt"))}
    if cfg.base_model is not None:
        base = load_model(cfg.base_model)
        net, spacing = base.network, base.spacing_mm
        base_card, base_path = base.card, str(base.path.resolve())
        if base.ct_window_hu is None or tuple(base.ct_window_hu) != CT_WINDOW_HU:
            reads = "by its percentiles" if base.ct_window_hu is None else f"through {tuple(base.ct_window_hu)} HU"
            raise ValueError(f"{base.path}: reads CT {reads}, and this version trains CT through {CT_WINDOW_HU} HU: a "
                             "fine-tune would read CT otherwise than its base")
        owner.update({path.resolve(): f"the model it starts from ({base.path})"
                      for path in (base.path, base.path.parent / base.card["weights"])})
        # the mix is SpineLabelLogic.process's EXPORT_SHARE and REPLAY, which this package cannot import
        if not any(spec in ("synthetic", "phantom") for spec, _ in cfg.data):
            log.warning("fine-tuning without phantoms or synthetic spines can forget what the base model knew of other "
                        "spines; mix as SpineLabelTraining does: --data FOLDER:0.6 --data phantom:0.3 --data "
                        "negative:0.1 (see README)")
    else:
        net, spacing, base_card, base_path = SpineUNet(), cfg.spacing_mm, None, None
    registry = user_models_dir()
    if registry is not None and registry.resolve() in out.resolve().parents:
        raise ValueError(f"{out}: lies in the folder of registered models ({registry}), where it could replace one "
                         "(and that folder lists it under another name): give --out another path, and --register "
                         "to register it")
    for path in (Path(cfg.out), out, out.with_suffix(".pt")):  # as given too: NAME.pt means those weights
        if path.resolve() in owner:
            raise ValueError(f"{path}: is a file of {owner[path.resolve()]}; training never replaces it: give --out "
                             "another path")
    # a file at the model's names that no training wrote (notes named m.json, other weights named m.pt) is someone
    # else's: refused now, as labelling refuses one, not replaced after the epochs; an earlier run's model is replaced
    clash = next((path for path in (out, out.with_suffix(".pt")) if path.exists()), None)
    if clash is not None and not _written_by_training(out):
        raise ValueError(f"{clash}: exists and is no model card that training wrote there (with its weights "
                         f"{out.with_suffix('.pt').name}); training never replaces it: give --out another path")
    if any(size % net.divisor for size in cfg.patch):
        raise ValueError(f"--patch {axes_text(cfg.patch)}: each size must be a multiple of {net.divisor} "
                         "(the network's downsampling)")
    try:  # found now, not when the first checkpoint is written
        make_writable_folder(out.parent)
    except OSError as err:
        raise ValueError(f"{out.parent}: cannot write the model and its checkpoint there "
                         f"({err.strerror or err})") from None
    net.to(device).train()
    specs = [s for s, _ in cfg.data]
    weights /= weights.sum()
    # the folders first: a broken case is named in seconds, not after a shape library's build (a minute uncached)
    made = {i: make_source(specs[i], spacing, cfg.patch, cfg.data_dir, cfg.progress_bars, cancel)
            for i in sorted(range(len(specs)), key=lambda i: specs[i] == "synthetic")}
    sources, cases = zip(*(made[i] for i in range(len(specs))))
    # a case found twice (one folder given twice, one inside another, a link to another case's image) is drawn as
    # two: more often than its folder's weight says
    seen: dict[Path, str] = {}
    twice = []
    for spec, listed in zip(specs, cases):
        for case in listed or ():
            image = (Path(spec) / case).resolve()
            if image in seen:
                twice.append((image, seen[image], spec))
            else:
                seen[image] = spec
    if twice:
        log.warning("%d case%s found twice in the --data folders (%s, in %s and in %s): drawn as two cases, more "
                    "often than the weights say", len(twice), "" if len(twice) == 1 else "s", *twice[0])
    val_rng = np.random.default_rng(10_000 + cfg.seed)
    val = []
    for i in range(cfg.validation_cases):  # a synthetic crop takes seconds to make
        if cancel is not None and cancel():
            raise Cancelled()
        val.append(sources[i % len(sources)](val_rng))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    total_steps = cfg.epochs * cfg.iterations
    # 5 % warm-up; at least 1.5 steps of it in a short run (torch divides by the warm-up's length in steps, less 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                pct_start=min(max(0.05, 1.5 / total_steps), 0.75))
    start_epoch, history = 0, []
    averaged: dict[str, torch.Tensor] = {}
    # what a resumed run must share with the run that wrote the checkpoint; paths resolved (./ds and ds are one)
    named = [spec if listed is None else str(Path(spec).resolve()) for spec, listed in zip(specs, cases)]
    contents = [None if listed is None else cases_sha256(spec) for spec, listed in zip(specs, cases)]
    metadata = [None if listed is None else cases_metadata_sha256(spec) for spec, listed in zip(specs, cases)]
    settings = {"data": [[name, float(w)] for name, (_, w) in zip(named, cfg.data)], "cases": list(cases),
                "cases_sha256": contents, "cases_metadata_sha256": metadata,
                "base_model": base_path, "base_sha256": None if base_card is None else base_card.get("sha256"),
                "epochs": cfg.epochs, "iterations": cfg.iterations, "batch": cfg.batch, "patch": list(cfg.patch),
                "lr": cfg.lr, "spacing_mm": spacing, "seed": cfg.seed, "average_last": cfg.average_last,
                "tilt_deg": cfg.tilt_deg, "short_window": cfg.short_window,
                "validation_cases": cfg.validation_cases,
                "data_dir": str(Path(cfg.data_dir).resolve()) if "synthetic" in specs else None}
    if cfg.resume and not ckpt.exists():
        log.warning("no checkpoint at %s to resume from: training from the start", ckpt)
    if not cfg.resume and ckpt.exists():
        log.warning("training from the start: the checkpoint of an earlier run at %s will be replaced (--resume would "
                    "continue it)", ckpt)
    if cfg.resume and ckpt.exists():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            # a setting the checkpoint lacks was added to this list after it was written, and had its default then
            changed = sorted(k for k in settings
                             if state["settings"].get(k, _ADDED_SETTINGS.get(k, settings[k])) != settings[k])
        except Exception as err:  # torch.load raises many types on a file that is not its own
            why = (err.strerror or str(err) if isinstance(err, OSError) else
                   "it holds no training settings" if isinstance(err, (KeyError, TypeError, AttributeError)) else
                   "torch cannot read it")
            raise ValueError(f"{ckpt}: not a SpineLabel training checkpoint ({why}); remove it to train from the "
                             "start") from None
        if "cases" in changed:  # other cases have other contents: named once
            changed = [k for k in changed if k not in ("cases_sha256", "cases_metadata_sha256")]
        if changed and set(changed) <= {"cases_sha256", "cases_metadata_sha256"}:  # the same cases, by name
            raise ValueError(f"{ckpt}: checkpoint of a run on other contents of its cases (an image or label map of "
                             "its --data folders, or the dataset.json or provenance record that says what its labels "
                             "mean, changed since); train from the start without --resume")
        if changed:
            named = dict.fromkeys(_SETTING_WORDS.get(k, "--" + k.replace("_", "-")) for k in changed)
            raise ValueError(f"{ckpt}: checkpoint of a run with other settings ({', '.join(named)}); resume it with "
                             "the same options")
        net.load_state_dict(state["network"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history, averaged = state["epoch"], state["history"], state["averaged"]
        rng.bit_generator.state = state["rng"]  # the batches continue as they would have without the stop
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at epoch %d", ckpt, start_epoch)
    batches = _batches(sources, weights, cfg, spacing, rng)
    first_averaged = max(0, cfg.epochs - cfg.average_last) if cfg.average_last else cfg.epochs
    t0 = time.time() - (history[-1]["elapsed_s"] if history else 0.0)  # elapsed_s counts the epochs before a stop
    for epoch in range(start_epoch, cfg.epochs):
        losses, skipped = [], 0
        bar = tqdm(range(cfg.iterations), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=_bars_off(cfg.progress_bars))
        for _ in bar:
            if cancel is not None and cancel():
                raise Cancelled()
            image, tissue, levels = (t.to(device) for t in next(batches))
            with _training_autocast(device):
                t_logits, l_logits = net(image)
            loss = tissue_loss(t_logits.float(), tissue) + 0.5 * level_loss(l_logits.float(), levels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)):
                opt.step()
                sched.step()
            else:  # an overflowing gradient would wipe out the weights: the step is skipped, as a gradient scaler does
                skipped += 1
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if skipped:
            log.warning("epoch %d: %d of %d steps skipped for a non-finite gradient", epoch + 1, skipped,
                        cfg.iterations)
        metrics = {"epoch": epoch + 1, "epochs": cfg.epochs, "loss": _finite_mean(losses), "skipped_steps": skipped,
                   **_validate(net, val, device), "elapsed_s": round(time.time() - t0, 1)}
        history.append(metrics)
        if epoch >= first_averaged:
            n = epoch + 1 - first_averaged  # epochs averaged so far, this one included
            for name, value in net.state_dict().items():
                previous = averaged.get(name, torch.zeros(value.shape))
                averaged[name] = previous + (value.detach().float().cpu() - previous) / n
        log.info("%s", epoch_text(metrics))
        # a stop while saving must not leave half a checkpoint; a full disk is named (torch: "unexpected pos")
        with atomic_path(ckpt) as tmp, write_errors_named(ckpt):
            torch.save({"network": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "epoch": epoch + 1, "history": history, "settings": settings, "averaged": averaged,
                        "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, tmp)
        if progress is not None:
            progress(metrics)
    if history[-1]["skipped_steps"] == cfg.iterations:
        raise ValueError(f"training diverged: every step of the last epoch had a non-finite gradient (learning rate "
                         f"{cfg.lr:g}); no model written: train again from the start with a lower --lr (the checkpoint "
                         f"{ckpt} is kept, but --resume would end the same way)")
    training = {"epochs": cfg.epochs, "iterations_per_epoch": cfg.iterations, "batch": cfg.batch,
                "patch_zyx": list(cfg.patch), "lr": cfg.lr, "seed": cfg.seed, "device": str(device),
                "validation_crops": [c.name for c in val], "history": history}
    if cfg.tilt_deg:
        training["tilt_deg"] = cfg.tilt_deg
    if cfg.short_window:
        training["short_window"] = cfg.short_window
    if averaged:
        net.load_state_dict({name: value.to(net.state_dict()[name].dtype) for name, value in averaged.items()})
        training["averaged_last_epochs"] = {"epochs": cfg.epochs - first_averaged, **_validate(net, val, device)}
    card = {
        "name": cfg.name,
        "version": cfg.version,
        "spacing_mm": spacing,
        "normalisation": f"CT: {CT_WINDOW_HU[0]:g} to {CT_WINDOW_HU[1]:g} HU mapped to 0/1; MR: percentiles 0.5/99.5 "
                         "of the volume mapped to 0/1; clipped",
        "ct_window_hu": list(CT_WINDOW_HU),
        # a folder by its name, not its path: the card is shared with the model, and a path names the user's folders
        # (the Slicer module's dataset is ~/SpineLabelDataset) and often a patient; its cases and hashes say the rest
        "training_data": {"sources": [{"source": s if c is None else Path(s).name, "weight": round(float(w), 3),
                                       **({"cases": c, "cases_sha256": d, "cases_metadata_sha256": m} if c else {})}
                                      for s, w, c, d, m in zip(named, weights, cases, contents, metadata)],
                          **({"shape_library": Path(cfg.data_dir).resolve().name} if "synthetic" in specs else {}),
                          "note": cfg.training_data_note},
        "training": training,
        "base_model": None if base_card is None else {key: base_card.get(key) for key in ("name", "version",
                                                                                          "sha256")},
    }
    net.cpu()
    return save_model(net, card, out)

