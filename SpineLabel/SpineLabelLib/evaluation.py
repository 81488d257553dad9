"""Scoring SpineLabel predictions against reference vertebra labels (``spinelabel evaluate``).

Inputs
------
Predictions: for each labelled image NAME, ``NAME_seg.nii.gz`` (VerSe label map on the input grid) and, optionally,
``NAME_ctd.json`` (VerSe centroid json whose entries carry ``"label"`` and ``"world_lps_mm"``) and ``NAME_report.json``
(SpineLabel's report, whose ``"vertebrae"`` carry ``"label"`` and ``"confidence"``).

Ground truth, one of these layouts (searched recursively under the GT folder):

* ``X_vert-verse.nii.gz`` + ``X_ctd.json`` (``world_lps_mm`` per entry), e.g. ``mri_lumbar_bodies``;
* VerSe: ``X_seg-vert_msk.nii.gz`` (any BIDS entities may follow ``seg-vert``, e.g. ``X_seg-vert_label-22_msk``)
  + ``X_seg-vb_ctd.json`` or ``X_seg-subreg_ctd.json`` with voxel coordinates ``X, Y, Z`` along the axes whose
  orientation code is ``"direction"`` (e.g. ``["P", "I", "R"]``: axis 0 runs towards posterior, ...), converted
  to LPS mm with the mask's geometry reoriented to that code;
* nnU-Net: ``labelsTr/X.nii.gz`` + ``centroids/X_ctd.json`` beside ``labelsTr/`` when there (an export writes the
  body centroids of the corrected labelling, points the user moved included). Voxels of nnU-Net's ignore label (named
  ``ignore`` in ``dataset.json``: not annotated) are left out of the prediction.

Masks may be stored in any format of ``io.IMAGE_SUFFIXES`` (``.nrrd``, ``.mha``, ...) instead of ``.nii.gz``.

Centroids come from the centroid files when both the GT case and its prediction have one, and otherwise from both
masks (per-label centre of mass), so that one distance never mixes two definitions (the centroids of VerSe files lie
up to 15.6 mm from the centres of mass of their whole vertebrae); but a bodies-only GT mask without a centroid file
gives vertebral-body centroids, which the prediction's centroid file holds too (SpineLabel's are body centroids),
and is scored against that file (against the whole predicted vertebrae's centres of mass, a lumbar MRI's centroids
were 8.5 mm off, where its reference centroid file gave 1.0 mm). A bodies-only GT whose prediction has no
centroid file is scored against the whole predicted vertebrae's centres of mass, with a warning (the case's
``centroid_source`` says so). A label present in a GT mask but absent from its centroid file gets its mask centroid
(logged). The GT vertebrae of a case are the VerSe labels of its centroids. A prediction's centroid file is scored
as it is, with a warning where it leaves out labels of its label map (counted as not predicted) or names labels the
map has no voxel of. A prediction on another grid than its GT mask is resampled onto the GT's (nearest neighbour),
with a warning; one that leaves nothing of it there (a prediction of another image, or a header turned) is refused,
as is a centroid file whose centroid of a label lies further than ``CENTROID_MASK_MM`` from that label in its own
mask.

Matching: a case's key is the file stem with known suffixes stripped: predictions ``NAME_seg.nii.gz`` -> NAME,
GT masks -> X as above; then ``_img``, ``_ct``, ``_0000``, ``_T1w``, ``_T2w`` (in any case) are removed from the end of
both, repeatedly.
So prediction ``sub-verse014_ct`` matches GT ``sub-verse014_seg-vert_msk``, ``VB1_02_AKa3_img`` matches
``VB1_02_AKa3_vert-verse`` and ``X_0000`` matches ``labelsTr/X``.

Metrics (all distances between centroids in LPS millimetres; labels are VerSe values, levels ordered by
``vertebrae.LEVELS``; labels outside that table are ignored with a warning, but a prediction with values from 29 to
99, another numbering's, is refused)
----------------------------------------------------------------------------------------------------------

* **Identification** (the VerSe identification rate as the VerSe papers state it): a GT vertebra with centroid g and
  label L is *identified* when the predicted centroid closest to g (over all predicted labels) carries label L and
  lies within ``ID_RADIUS_MM`` = 20 mm of g. (The VerSe challenge's scoring code looks from the other side: predicted
  L counts when the GT centroid closest to it, over the labels both sides have, is L's. The two differ only where a
  predicted centroid lies nearer another GT vertebra than its own, or an extra predicted label lies nearest a GT
  vertebra.)
  Case identification rate = identified / number of GT vertebrae; pooled rate = all identified / all GT
  vertebrae (a missing prediction counts all its GT vertebrae as not identified).
* **Localisation error**: for each GT vertebra whose label has a predicted centroid, the distance between the GT
  centroid and the predicted centroid of the same label. Case value = mean over those vertebrae; pooled value =
  mean over all such vertebrae of all cases. GT vertebrae whose label has no predicted centroid are counted
  (``n_not_predicted``) and listed, not given an error.
* **Dice** (whole-vertebra GT only): per GT label L, ``2 |P_L & G_L| / (|P_L| + |G_L|)`` where P_L, G_L are the
  voxels labelled L in prediction and GT (0 when L is absent from the prediction). Case value = mean over GT
  vertebrae; pooled = mean over all GT vertebrae of whole-vertebra cases.
* **Dice, names aside** (whole-vertebra GT only): per GT label L, the Dice of G_L with the predicted label that
  shares most voxels with it, whatever its value (0 when none does; on a tie, the lower value): the segmentation
  apart from the numbering, so that a scan numbered one level off still shows how well its vertebrae were outlined.
  The match is not one to one: a predicted vertebra spanning two GT vertebrae is scored against each. Where Dice has
  no voxels to compare (a GT label with a centroid and no voxels), it takes Dice's value. Averaged like Dice.
* **Body coverage** (bodies-only GT, where Dice would penalise the predicted posterior elements):
  ``|P_L & G_L| / |G_L|``, the fraction of GT body voxels carrying the same label in the prediction. Averaged like
  Dice, over bodies-only cases. A case is bodies-only when the caller says so, otherwise by its layout: every
  ``X_vert-verse`` mask (the layout of ``mri_lumbar_bodies``), no VerSe mask, and an nnU-Net mask when its
  ``dataset.json`` says ``"bodies_only": true`` (SpineLabel's export writes false). Folder names play no part.
* **Level shift / off-by-one scans**: every predicted centroid is paired with its closest GT centroid when that
  lies within 20 mm; the level difference of a pair is the number of levels between them on the ladder of a spine
  without transitional levels, where T13 takes L1's place and L6 takes S1's (``level_step``): T12 -> L1, T12 ->
  T13, L5 -> S1 and L5 -> L6 all count as one level (positive = predicted label too caudal). The case *shift* is the
  median difference over the pairs (None without pairs). A case is *off by one* when strictly more than half of
  its pairs differ by one level the same way (+1, or -1: two swapped names are no shifted scan). ``sacrum_in_gt``
  tells whether S1 (label 26) is in the GT.
* **Confidence** (predictions with ``NAME_report.json``): each GT vertebra takes the confidence of the predicted
  label closest to it when that lies within 20 mm. It is *uncertain* below ``sequence.UNCERTAIN_BELOW``, where
  SpineLabel warns, and *confident* otherwise. The summary counts the uncertain and the confident GT vertebrae and
  how many of each are identified: whether the warnings point at the errors.
* **Summary**: the pooled values above, the number of off-by-one scans and of missing predictions, overall and per
  group: the group the caller gives per case (e.g. ``{"VB1_02_AKa3": "MR"}``), else the modality its SpineLabel
  report says the image was labelled as, so MRI and CT are scored apart; a case without a report (its labelling
  failed or was refused) takes the modality ``inference.modality_of`` reads from its image beside the GT mask, so its
  missed vertebrae count in its group too.
* **By level**: over all cases, per GT level (in ``vertebrae.LEVELS`` order): GT vertebrae, identified, localisation
  error, and what the GT vertebrae not identified were called instead (the label of the closest predicted centroid
  when that lies within 20 mm, else "none"), so that a level the model confuses with a neighbour shows which one.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping

import numpy as np
import SimpleITK as sitk

from .export import dataset_ignore_value, dataset_label_values, read_dataset_json
from .inference import modality_of
from .io import (CASE_SUFFIXES, IMAGE_SUFFIXES, Cancelled, InputError, atomic_paths, axes_text, case_key, case_name,
                 image_stem, make_writable_folder, no_empty_new_folders, read_image, read_label_map, resample_to_grid,
                 write_errors_named)
from .result import Geometry
from .sequence import UNCERTAIN_BELOW
from .vertebrae import BY_LABEL, BY_NAME, level_index
from .writers import output_paths

__all__ = [
    "ID_RADIUS_MM",
    "PredFiles",
    "GtFiles",
    "VertebraResult",
    "CaseResult",
    "GroupSummary",
    "LevelSummary",
    "EvaluationSummary",
    "case_key",
    "match_cases",
    "labelled_cases",
    "reference_labels",
    "read_centroids",
    "read_report",
    "mask_centroids",
    "evaluate_case",
    "evaluate_folders",
    "summary_markdown",
]

log = logging.getLogger(__name__)

ID_RADIUS_MM = 20.0
# A centroid file and its mask disagree (the file belongs to another image, or the mask's header was changed) when a
# label's centroid lies further than this from the centre of mass of that label in the mask: a body centroid lies up
# to 28 mm from its whole vertebra's centre of mass (S1 and the sacrum's; 78 cases of ../shared/data and their
# predictions by model 1.7.0)
CENTROID_MASK_MM = 60.0
# no position in millimetres is this far out: larger ones overflow the distances
_FAR_MM = 1e12


@dataclass(frozen=True)
class PredFiles:
    """One prediction: ``seg`` = ``NAME_seg.nii.gz``; ``ctd`` = ``NAME_ctd.json`` and ``report`` =
    ``NAME_report.json``, or None when absent."""

    name: str
    seg: Path
    ctd: Path | None
    report: Path | None = None


@dataclass(frozen=True)
class GtFiles:
    """One reference case.

    Attributes:
        mask: label map (VerSe values).
        ctd: centroid json, or None (centroids then come from the mask).
        layout: ``"vert-verse"``, ``"verse"`` or ``"nnunet"``.
        bodies_only: True when the mask holds vertebral bodies only (from the layout, see the module docstring).
    """

    mask: Path
    ctd: Path | None
    layout: str
    bodies_only: bool


@dataclass
class VertebraResult:
    """Scores of one GT vertebra (distances in mm; None where not applicable)."""

    label: int
    name: str
    identified: bool
    nearest_pred_label: int | None
    nearest_pred_distance_mm: float | None
    loc_error_mm: float | None
    dice: float | None
    body_coverage: float | None
    gt_volume_ml: float
    nearest_pred_confidence: float | None = None
    dice_names_aside: float | None = None


@dataclass
class CaseResult:
    """Scores of one case; see the module docstring for the definition of each value."""

    name: str
    bodies_only: bool
    vertebrae: list[VertebraResult]
    n_gt: int
    n_identified: int
    id_rate: float | None
    mean_loc_error_mm: float | None
    n_not_predicted: int
    not_predicted: list[str]
    mean_dice: float | None
    mean_dice_names_aside: float | None
    mean_body_coverage: float | None
    extra_predicted: list[str]
    shift: float | None
    n_shift_pairs: int
    off_by_one: bool
    sacrum_in_gt: bool
    prediction_missing: bool = False
    group: str = ""
    gt_mask: str = ""
    pred_seg: str = ""
    centroid_source: str = ""


@dataclass
class GroupSummary:
    """Pooled scores over a set of cases (see the module docstring)."""

    n_cases: int
    n_gt: int
    n_identified: int
    id_rate: float | None
    mean_loc_error_mm: float | None
    n_not_predicted: int
    mean_dice: float | None
    mean_dice_names_aside: float | None
    mean_body_coverage: float | None
    n_off_by_one: int
    off_by_one_cases: list[str]
    n_missing_predictions: int
    missing_predictions: list[str]
    n_uncertain: int
    n_uncertain_identified: int
    n_confident: int
    n_confident_identified: int


@dataclass
class LevelSummary:
    """Pooled scores of the GT vertebrae of one level (see the module docstring)."""

    n_gt: int
    n_identified: int
    mean_loc_error_mm: float | None
    named_instead: dict[str, int]


@dataclass
class EvaluationSummary:
    """Everything ``evaluate_folders`` found: per-case results, pooled scores overall, per group and per GT level
    (level name -> scores, in ``vertebrae.LEVELS`` order)."""

    cases: list[CaseResult]
    overall: GroupSummary
    groups: dict[str, GroupSummary] = field(default_factory=dict)
    levels: dict[str, LevelSummary] = field(default_factory=dict)
    unmatched_predictions: list[str] = field(default_factory=list)
    pred_dir: str = ""
    gt_dir: str = ""

    def to_dict(self) -> dict:
        """Plain dict (``json.dumps``-able; NaN never occurs, missing values are None)."""
        return {
            "pred_dir": self.pred_dir,
            "gt_dir": self.gt_dir,
            "id_radius_mm": ID_RADIUS_MM,
            "overall": asdict(self.overall),
            "groups": {g: asdict(s) for g, s in self.groups.items()},
            "levels": {name: asdict(s) for name, s in self.levels.items()},
            "unmatched_predictions": list(self.unmatched_predictions),
            "cases": [asdict(c) for c in self.cases],
        }


# ----------------------------------------------------------------------------------------------- file matching


# why two files of other names can be of one case, in each refusal of two
_MATCHED_WITHOUT = f"(case names are matched without the endings {', '.join(CASE_SUFFIXES)})"


def _stem_ending(name: str, ending: str) -> str | None:
    """The stem of image file ``name`` (``io.image_stem``) without ``ending``, when it ends so; else None (a 3D Slicer
    save ``X_seg-vert_msk.seg.nrrd`` beside the mask is no second case ``X_msk``)."""
    stem = image_stem(name)
    return stem[: -len(ending)] if stem is not None and stem.endswith(ending) else None


def _beside(path: Path) -> Path | None:
    """``path``, an optional file found beside a mask (a centroid file, a report), when it is one; None when there is
    none.

    Raises:
        InputError: a link to nothing (taken for no file, its case would be scored otherwise than meant).
    """
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path}: a link to a file that does not exist; restore its target or remove the link")
    return path if path.is_file() else None


def _predictions(pred_dir: Path) -> dict[str, PredFiles]:
    found: dict[str, PredFiles] = {}
    for seg in sorted(pred_dir.glob("*_seg.*")):
        name = _stem_ending(seg.name, "_seg")
        if name is None:
            continue
        ctd, report = pred_dir / f"{name}_ctd.json", pred_dir / f"{name}_report.json"
        key = case_key(name)
        if key in found:
            raise InputError(f"{seg}: predictions {found[key].seg.name} and {seg.name} both match case {key} "
                             f"{_MATCHED_WITHOUT}; move one of them out of the folder")
        found[key] = PredFiles(name, seg, _beside(ctd), _beside(report))
    return found


def _visible(paths: Iterable[Path]) -> list[Path]:
    """``paths`` sorted, without hidden files (a name starting with a dot: the ``._X.nii.gz`` that macOS writes beside
    ``X.nii.gz`` on a shared drive is no image)."""
    return sorted(p for p in paths if not p.name.startswith("."))


def _tree(folder: Path) -> list[Path]:
    """Every file and folder under ``folder``, sorted, without hidden names (``_visible``), inside folders that are
    links too (an nnU-Net dataset's ``imagesTr/`` often links to where the images lie), each real folder once."""
    found, seen = [], set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to one folder
            folders.clear()
            continue
        seen.add(real)
        found.extend(Path(root) / name for name in (*folders, *files))
    return _visible(found)


def _ground_truth(gt_dir: Path, tree: list[Path] | None = None) -> dict[str, GtFiles]:
    """The reference cases under ``gt_dir`` by matching key (``tree``: its ``_tree``, where the caller has it)."""
    found: dict[str, GtFiles] = {}
    tree = _tree(gt_dir) if tree is None else tree

    def named(pattern: str) -> list[Path]:
        return [p for p in tree if fnmatch.fnmatch(p.name, pattern)]

    def add(key: str, files: GtFiles) -> None:
        if key in found:
            raise InputError(f"{files.mask}: reference masks {found[key].mask} and {files.mask} both define case "
                             f"{key} {_MATCHED_WITHOUT}; rename or move one of them")
        found[key] = files

    for mask in named("*_vert-verse.*"):
        base = _stem_ending(mask.name, "_vert-verse")
        if base is None:
            continue
        ctd = mask.parent / f"{base}_ctd.json"
        add(case_key(base), GtFiles(mask, _beside(ctd), "vert-verse", True))
    for mask in named("*_seg-vert*_msk.*"):
        stem = _stem_ending(mask.name, "_msk")
        if stem is None or "_seg-vert" not in stem:
            continue
        before, after = stem.split("_seg-vert", 1)
        ctd = next((c for c in (mask.parent / f"{before}_seg-{kind}{after}_ctd.json" for kind in ("vb", "subreg"))
                    if _beside(c)), None)
        add(case_key(before + after), GtFiles(mask, ctd, "verse", False))
    for labels_dir in (p for p in named("labelsTr") if p.is_dir()):
        dataset = read_dataset_json(labels_dir.parent)
        bodies_only = dataset is not None and dataset.get("bodies_only") is True
        for mask in _visible(labels_dir.iterdir()):
            stem = image_stem(mask.name)
            if stem is not None:
                ctd = labels_dir.parent / "centroids" / f"{stem}_ctd.json"  # as an export writes it
                add(case_key(stem), GtFiles(mask, _beside(ctd), "nnunet", bodies_only))
    return found


def _reference_cases(gt_dir: Path, tree: list[Path] | None = None) -> dict[str, GtFiles]:
    """``_ground_truth`` of a folder that must exist and hold at least one case (``InputError`` otherwise)."""
    if not gt_dir.is_dir():
        raise InputError(f"{gt_dir}: " + ("a file, not a folder" if gt_dir.exists() else "folder does not exist"))
    found = _ground_truth(gt_dir, tree)
    if not found:
        raise InputError(f"{gt_dir}: no reference masks (*_vert-verse.nii.gz, *_seg-vert_msk.nii.gz or "
                         "labelsTr/*.nii.gz, or the same in another image format) found; other conventions "
                         "(TotalSegmentator's class ids, disc or spinal-cord labels) are not read: give vertebrae as "
                         "VerSe values, or in labelsTr/ beside a dataset.json naming each value (such as "
                         "TotalSegmentator's vertebrae_L1)")
    return found


def match_cases(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, fresh: Collection[str] | None = None
                ) -> list[tuple[str, PredFiles | None, GtFiles]]:
    """Pair the predictions in ``pred_dir`` with the GT cases in ``gt_dir`` (rules in the module docstring). Given
    ``fresh``, the matching keys of the cases a run has just labelled, only their predictions are taken: the others
    (an earlier run's outputs) count as missing.

    Returns:
        ``(key, prediction or None when missing, GT)`` for every GT case, sorted by key. Predictions without a GT
        case are logged and left out (``evaluate_folders`` lists them).

    Raises:
        InputError: a folder is missing, holds no GT case, or two files map to the same key.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder " + ("is a file" if pred_dir.exists() else "does not exist"))
    gts = _reference_cases(Path(gt_dir))
    preds = {key: pred for key, pred in _predictions(pred_dir).items() if fresh is None or key in fresh}
    for key in sorted(set(preds) - set(gts)):
        log.warning("prediction %s has no reference case in %s", preds[key].seg, gt_dir)
    return [(key, preds.get(key), gts[key]) for key in sorted(gts)]


def _images(tree: list[Path], cases: dict[str, GtFiles]) -> tuple[dict[str, Path], list[Path]]:
    """Matching key -> image of the reference ``cases`` found in ``tree`` (a reference folder's ``_tree``) that have
    one (``labelled_cases``), and the nnU-Net images (``imagesTr/X_0000``, channel 0) of no case in ``cases``: images
    without their label map."""
    masks = {files.mask for files in cases.values()}
    found: dict[str, Path] = {}
    unmatched: list[Path] = []
    for path in tree:
        if not path.name.lower().endswith(IMAGE_SUFFIXES) or path in masks:
            continue
        if not path.is_file():
            if path.is_symlink() and not path.exists() and case_key(case_name(path)) in cases:
                # taken for no image, its case was left out with a warning that it has none
                raise InputError(f"{path}: the image of case {case_key(case_name(path))} is a link to a file that "
                                 "does not exist; restore its target or remove the link")
            continue
        key = case_key(case_name(path))
        if key not in cases:
            if path.parent.name == "imagesTr" and (image_stem(path.name) or "").endswith("_0000"):
                unmatched.append(path)
            continue
        if key in found:
            raise InputError(f"{path}: images {found[key]} and {path} both match case {key} {_MATCHED_WITHOUT}; "
                             "move one of them out of the folder")
        found[key] = path
    return dict(sorted(found.items())), sorted(unmatched)


def labelled_cases(gt_dir: str | os.PathLike) -> list[tuple[Path, GtFiles]]:
    """(image, reference) of every reference case in ``gt_dir`` that has an image, sorted by matching key: for
    labelling before scoring (``spinelabel evaluate --label``) and for training. The image is the file (a suffix of
    ``io.IMAGE_SUFFIXES``) anywhere under ``gt_dir`` whose matching key is the case's, the GT masks themselves aside:
    ``X_ct.nii.gz`` goes with ``X_seg-vert_msk.nii.gz``, ``X_img.nii.gz`` with ``X_vert-verse.nii.gz`` and
    ``imagesTr/X_0000.nii.gz`` with ``labelsTr/X.nii.gz``.

    Raises:
        InputError: the folder is missing or holds no GT case, two images match one case, or a case's image is a link
            to nothing.
    """
    tree = _tree(Path(gt_dir))  # walked once: the masks and the images are both found in it
    cases = _reference_cases(Path(gt_dir), tree)
    images, unlabelled = _images(tree, cases)
    without = sorted(str(cases[key].mask) for key in set(cases) - set(images))
    if without:
        log.warning("%s: %d reference masks have no image beside them, left out: %s", gt_dir, len(without),
                    ", ".join(without))
    if unlabelled:  # an nnU-Net case too, left out as the masks above are
        log.warning("%s: %d images in imagesTr/ have no label map in labelsTr/, left out: %s", gt_dir,
                    len(unlabelled), ", ".join(map(str, unlabelled)))
    return [(image, cases[key]) for key, image in images.items()]


# ------------------------------------------------------------------------------------------------- centroids


def mask_centroids(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Centre of mass of every non-zero label.

    Args:
        labels: integer label map (z, y, x).

    Returns:
        label -> continuous voxel index (i, j, k) = (x, y, z), float64 of shape (3,).
    """
    flat = np.flatnonzero(labels)
    if flat.size == 0:
        return {}
    values = labels.ravel()[flat].astype(np.int64)
    if values.min() < 0:
        raise ValueError("label maps must not hold negative values")
    counts = np.bincount(values)
    present = np.flatnonzero(counts)
    zyx = np.unravel_index(flat, labels.shape)
    sums = np.stack([np.bincount(values, weights=axis, minlength=counts.size) for axis in zyx[::-1]], axis=1)
    return {int(v): sums[v] / counts[v] for v in present}


def _mask_centroids_lps(labels: np.ndarray, geometry: Geometry) -> dict[int, np.ndarray]:
    """``mask_centroids`` of ``labels`` (non-negative integer label map (z, y, x) on ``geometry``'s grid) in world
    coordinates: label -> LPS mm, float64 of shape (3,)."""
    return {v: geometry.index_to_lps(ijk) for v, ijk in mask_centroids(labels).items()}


def _whole_label(label) -> int:
    """A JSON ``label`` as an int.

    Raises:
        ValueError: not a whole number (a string, a bool, 18.7, NaN, an infinity).
    """
    # an int is finite (math.isfinite raises OverflowError on one too large for a float)
    if isinstance(label, bool) or not isinstance(label, (int, float)) or (
            isinstance(label, float) and not math.isfinite(label)) or label != round(label):
        raise ValueError(f"label {label!r} is not a whole number")
    return int(label)


def read_centroids(path: str | os.PathLike, reference: sitk.Image) -> dict[int, np.ndarray]:
    """Centroids of a VerSe centroid json in LPS mm.

    Entries with ``"world_lps_mm"`` are taken as they are; otherwise ``X, Y, Z`` are voxel coordinates of
    ``reference`` reoriented to the file's ``"direction"`` code (a trailing ``?`` on a letter is ignored).

    Args:
        path: the json file.
        reference: the image (mask) the voxel coordinates refer to.

    Returns:
        VerSe label -> LPS position in mm, float64 of shape (3,).

    Raises:
        InputError: unreadable file, an entry without a whole-number label or three coordinates, voxel coordinates
            without a ``direction`` header or with a direction code that is not one, a centroid that is not a
            finite position, a label with two centroids.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable centroid file ({err})") from None
    if not isinstance(entries, list):
        raise InputError(f"{path}: a VerSe centroid file holds a list of entries")
    code = next(("".join(str(a).strip("?")[:1] for a in e["direction"]) for e in entries
                 if isinstance(e, dict) and "direction" in e), None)
    oriented: Geometry | None = None
    out: dict[int, np.ndarray] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "label" not in entry:
            continue
        if "world_lps_mm" not in entry and code is None:
            raise InputError(f"{path}: voxel centroids (X, Y, Z) without a 'direction' entry")
        try:
            label = _whole_label(entry["label"])
            if "world_lps_mm" in entry:
                position = np.asarray(entry["world_lps_mm"], dtype=float).ravel()
                if position.size != 3:
                    raise ValueError("'world_lps_mm' is not three numbers")
            else:
                if oriented is None:
                    oriented = Geometry.of(sitk.DICOMOrient(reference, code))
                position = oriented.index_to_lps(np.array([entry["X"], entry["Y"], entry["Z"]], dtype=float))
        # RuntimeError: ITK on a bad direction code; OverflowError: a whole number too large for a float
        except (KeyError, ValueError, TypeError, OverflowError, RuntimeError) as err:
            detail = (f"no {err.args[0]!r}" if isinstance(err, KeyError) else
                      f"{code!r} is no direction code" if isinstance(err, RuntimeError) else
                      (str(err).strip().splitlines() or ["not numbers"])[0][:120])
            raise InputError(f"{path}: entry {n} is not a centroid: it needs a whole-number 'label' and 'X', 'Y', 'Z' "
                             f"along a valid 'direction' (here {code!r}) or three 'world_lps_mm' ({detail})") from None
        if not (np.abs(position) < _FAR_MM).all():  # NaN and infinities too
            raise InputError(f"{path}: the centroid of label {label} is not a position ({position.tolist()})")
        if label in out:
            raise InputError(f"{path}: label {label} has two centroids")
        out[label] = position
    return out


# ------------------------------------------------------------------------------------------------ one case


def level_step(label: int) -> int:
    """Position of VerSe ``label`` on the ladder C1 ... T12, L1 ... L5, S1 of a spine without transitional levels;
    T13 shares L1's position and L6 shares S1's (each is one step below its neighbour above)."""
    index = level_index(BY_LABEL[label].name)
    return index - (index > level_index("T13")) - (index > level_index("L6"))


def read_report(path: str | os.PathLike) -> tuple[dict[int, float], str]:
    """VerSe label -> confidence of each vertebra of a SpineLabel report (``NAME_report.json``), and the modality the
    image was labelled as ("CT" or "MR"; "" when the report does not say).

    Raises:
        InputError: unreadable file, not a SpineLabel report, a label that is no whole number, or a confidence
            outside 0-1 (NaN too).
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"{path}: unreadable report ({err.strerror or err})") from None
    except ValueError as err:  # not JSON, or not UTF-8
        raise InputError(f"{path}: not a readable SpineLabel report: not JSON text ({err})") from None
    vertebrae = document.get("vertebrae") if isinstance(document, dict) else None
    if not isinstance(vertebrae, list):
        raise InputError(f"{path}: not a readable SpineLabel report: no 'vertebrae' list")
    if not isinstance(document.get("input", {}), dict):
        raise InputError(f"{path}: not a readable SpineLabel report: its 'input' is no JSON object")
    try:
        confidences = {_whole_label(v["label"]): float(v["confidence"]) for v in vertebrae}
    except (ValueError, KeyError, TypeError, OverflowError) as err:  # OverflowError: a number too large for a float
        detail = (f" (no {err.args[0]!r})" if isinstance(err, KeyError) else f" ({err})" if isinstance(
            err, (ValueError, OverflowError)) else "")  # TypeError: an entry that is no JSON object
        raise InputError(f"{path}: not a readable SpineLabel report: each of its 'vertebrae' needs a whole-number "
                         f"'label' and a 'confidence' number{detail}") from None
    modality = str(document.get("input", {}).get("modality") or "")
    wrong = sorted(label for label, p in confidences.items() if not 0.0 <= p <= 1.0)  # NaN included
    if wrong:
        raise InputError(f"{path}: confidences that are no probability (labels {wrong[:5]})")
    return confidences, modality


def _refuse_other_numbering(labels: np.ndarray, path: Path) -> None:
    """Raise ``InputError`` when a prediction's label map (integer array, any shape) holds values from 29 to 99: no
    VerSe vertebra (1-28) nor what SPINEPS writes beside them (discs 100+, endplates 200+, which are left out), but a
    label map of another numbering, such as TotalSegmentator's, whose vertebrae 26-50 and organs below them would be
    scored as VerSe levels."""
    if labels.max(initial=0) < 29:
        return
    values = np.unique(labels)
    foreign = [int(v) for v in values if 29 <= v <= 99]
    if foreign:
        raise InputError(f"{path}: label values {foreign[:8]}{' ...' * (len(foreign) > 8)} are no VerSe values (1-28 "
                         "for the vertebrae): a label map of another numbering, such as TotalSegmentator's (26 S1, 27 "
                         "L5 ... 50 C1, its organs below)? convert it to VerSe values first")


def _known_labels(labels, what: str) -> list[int]:
    unknown = sorted(int(v) for v in labels if int(v) != 0 and int(v) not in BY_LABEL)
    if unknown:
        log.warning("%s: labels %s are not vertebrae in the VerSe table; ignored", what, unknown)
    return sorted(int(v) for v in labels if int(v) in BY_LABEL)


def _overlaps(pred_labels: np.ndarray, gt_labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per label value v, each int64 of length max label + 1, for two non-negative integer label maps of the same
    shape (any dtype, e.g. (z, y, x)): |P_v & G_v|, |P_v|, |G_v|, then the number of voxels GT label v shares with the
    non-zero predicted label that shares most with it (the lower value on a tie), and that label (0 and 0 where none
    does)."""
    fg = (pred_labels != 0) | (gt_labels != 0)
    p = pred_labels[fg].astype(np.int64)
    g = gt_labels[fg].astype(np.int64)
    if (p < 0).any() or (g < 0).any():
        raise ValueError("label maps must not hold negative values")
    n = int(max(p.max(initial=0), g.max(initial=0))) + 1
    inter = np.bincount(g[p == g], minlength=n)
    both = (p != 0) & (g != 0)
    pairs, counts = np.unique(g[both] * n + p[both], return_counts=True)
    shared, best = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for pair, count in zip(pairs.tolist(), counts.tolist()):
        gt, pred = divmod(pair, n)
        if count > shared[gt]:
            shared[gt], best[gt] = count, pred
    return inter, np.bincount(p, minlength=n), np.bincount(g, minlength=n), shared, best


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def evaluate_case(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing_zyx_mm,
    pred_centroids: Mapping[int, np.ndarray] | None,
    gt_centroids: Mapping[int, np.ndarray] | None,
    bodies_only: bool,
    *,
    name: str = "",
    pred_confidences: Mapping[int, float] | None = None,
) -> CaseResult:
    """Score one prediction against its reference (metrics defined in the module docstring).

    Args:
        pred_labels: predicted VerSe label map, integer array (z, y, x).
        gt_labels: reference VerSe label map, integer array (z, y, x), same shape and grid.
        spacing_zyx_mm: voxel size (z, y, x) in mm; gives volumes and, when centroids are None, the frame of the
            mask-derived centroids.
        pred_centroids: predicted label -> centroid, (3,) in LPS mm; None to take them from ``pred_labels``.
        gt_centroids: GT label -> centroid, (3,) in LPS mm; None to take them from ``gt_labels``. Both dicts must use
            the same frame; centroids computed from the masks are in mm along (x, y, z) voxel axes from voxel 0,
            which only compares with centroids computed the same way.
        bodies_only: the GT holds vertebral bodies only: report body coverage instead of Dice.
        name: case name carried into the result.
        pred_confidences: predicted label -> confidence (0-1), or None when unknown.

    Returns:
        The case's scores; the GT vertebrae are the labels of ``gt_centroids`` (VerSe labels only), in anatomical
        order.

    Raises:
        ValueError: the two label maps differ in shape, or only one of the centroid dicts is None.
    """
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground truth shape {gt_labels.shape}")
    spacing_zyx = np.asarray(spacing_zyx_mm, dtype=float)
    spacing_xyz = spacing_zyx[::-1]
    if (pred_centroids is None) != (gt_centroids is None):
        raise ValueError("pred_centroids and gt_centroids are both given (in one frame, such as LPS mm) or both None "
                         "(taken from the masks, in mm from voxel 0): one of each compares two frames")
    if pred_centroids is None:
        pred_centroids = {v: c * spacing_xyz for v, c in mask_centroids(pred_labels).items()}
    if gt_centroids is None:
        gt_centroids = {v: c * spacing_xyz for v, c in mask_centroids(gt_labels).items()}
    inter, pred_count, gt_count, shared, best = _overlaps(pred_labels, gt_labels)

    gt_set = _known_labels(gt_centroids, f"{name or 'case'} reference")
    gt_set.sort(key=level_index)
    pred_set = _known_labels(pred_centroids, f"{name or 'case'} prediction")
    pred_pos = np.array([pred_centroids[v] for v in pred_set], dtype=float).reshape(-1, 3)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0

    vertebrae: list[VertebraResult] = []
    for label in gt_set:
        g = np.asarray(gt_centroids[label], dtype=float)
        nearest_label = nearest_dist = None
        if len(pred_set):
            d = np.linalg.norm(pred_pos - g, axis=1)
            i = int(np.argmin(d))
            nearest_label, nearest_dist = pred_set[i], float(d[i])
        loc = float(np.linalg.norm(np.asarray(pred_centroids[label], dtype=float) - g)) if label in pred_set else None
        g_n, p_n, both = (int(a[label]) if label < a.size else 0 for a in (gt_count, pred_count, inter))
        dice = coverage = aside = None
        if bodies_only:
            coverage = both / g_n if g_n else None
        else:
            dice = 2.0 * both / (g_n + p_n) if g_n + p_n else None
            aside = dice
            if g_n:
                aside = 2.0 * int(shared[label]) / (g_n + int(pred_count[best[label]])) if shared[label] else 0.0
        within = nearest_dist is not None and nearest_dist <= ID_RADIUS_MM
        vertebrae.append(VertebraResult(
            label=label, name=BY_LABEL[label].name, identified=within and nearest_label == label,
            nearest_pred_label=nearest_label, nearest_pred_distance_mm=nearest_dist, loc_error_mm=loc,
            dice=dice, body_coverage=coverage, gt_volume_ml=g_n * voxel_ml,
            nearest_pred_confidence=pred_confidences.get(nearest_label) if within and pred_confidences else None,
            dice_names_aside=aside))

    # Level shift: pair each predicted centroid with its closest GT centroid within the identification radius.
    diffs: list[int] = []
    if gt_set:
        gt_pos = np.array([gt_centroids[v] for v in gt_set], dtype=float)
        for label, p in zip(pred_set, pred_pos):
            d = np.linalg.norm(gt_pos - p, axis=1)
            i = int(np.argmin(d))
            if d[i] <= ID_RADIUS_MM:
                diffs.append(level_step(label) - level_step(gt_set[i]))
    n_one = max(diffs.count(1), diffs.count(-1))
    n_identified = sum(v.identified for v in vertebrae)
    not_predicted = [v.name for v in vertebrae if v.loc_error_mm is None]
    return CaseResult(
        name=name,
        bodies_only=bool(bodies_only),
        vertebrae=vertebrae,
        n_gt=len(vertebrae),
        n_identified=n_identified,
        id_rate=n_identified / len(vertebrae) if vertebrae else None,
        mean_loc_error_mm=_mean(v.loc_error_mm for v in vertebrae),
        n_not_predicted=len(not_predicted),
        not_predicted=not_predicted,
        mean_dice=_mean(v.dice for v in vertebrae),
        mean_dice_names_aside=_mean(v.dice_names_aside for v in vertebrae),
        mean_body_coverage=_mean(v.body_coverage for v in vertebrae),
        extra_predicted=[BY_LABEL[v].name for v in sorted(set(pred_set) - set(gt_set), key=level_index)],
        shift=float(np.median(diffs)) if diffs else None,
        n_shift_pairs=len(diffs),
        off_by_one=bool(diffs) and 2 * n_one > len(diffs),
        sacrum_in_gt=BY_NAME["S1"].label in gt_set,
    )


# ------------------------------------------------------------------------------------------------ folders


_ENDPLATE = 200  # TPTBox masks: 200 + L is an endplate of vertebra L (100 + L the disc below it, not a vertebra)


def reference_labels(labels: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Reference ``labels`` (integers, any shape, e.g. (z, y, x)) of the mask file ``path`` as VerSe values: an
    nnU-Net dataset's by their names in its ``dataset.json`` (``export.dataset_label_values``), TPTBox endplates
    (200 + L) given to their vertebra L; other values as they are. Evaluation and training read masks this way.
    Returns uint8 for an nnU-Net dataset, ``labels`` itself when no value exceeds 200, else the dtype int32 and that
    of ``labels`` promote to (int32 for uint8, int16, uint16 or int32 masks; int64 for uint32 or int64)."""
    lut = dataset_label_values(path, labels)
    if lut is not None:
        return lut[labels]
    if labels.max(initial=0) <= _ENDPLATE:
        return labels
    vertebra = labels.astype(np.int32) - _ENDPLATE
    endplate = np.isin(vertebra, list(BY_LABEL))
    return np.where(endplate, vertebra, labels)


def _pool(cases: list[CaseResult]) -> GroupSummary:
    verts = [v for c in cases for v in c.vertebrae]
    n_gt = len(verts)
    n_id = sum(v.identified for v in verts)
    off = [c.name for c in cases if c.off_by_one]
    missing = [c.name for c in cases if c.prediction_missing]
    rated = [v for v in verts if v.nearest_pred_confidence is not None]
    uncertain = [v for v in rated if v.nearest_pred_confidence < UNCERTAIN_BELOW]
    confident = [v for v in rated if v.nearest_pred_confidence >= UNCERTAIN_BELOW]
    return GroupSummary(
        n_cases=len(cases), n_gt=n_gt, n_identified=n_id, id_rate=n_id / n_gt if n_gt else None,
        mean_loc_error_mm=_mean(v.loc_error_mm for v in verts),
        n_not_predicted=sum(c.n_not_predicted for c in cases),
        mean_dice=_mean(v.dice for v in verts), mean_dice_names_aside=_mean(v.dice_names_aside for v in verts),
        mean_body_coverage=_mean(v.body_coverage for v in verts),
        n_off_by_one=len(off), off_by_one_cases=off, n_missing_predictions=len(missing), missing_predictions=missing,
        n_uncertain=len(uncertain), n_uncertain_identified=sum(v.identified for v in uncertain),
        n_confident=len(confident), n_confident_identified=sum(v.identified for v in confident))


def _called_instead(v: VertebraResult) -> str:
    """Name of the predicted label closest to a GT vertebra when within ``ID_RADIUS_MM``, else "none"."""
    near = v.nearest_pred_distance_mm is not None and v.nearest_pred_distance_mm <= ID_RADIUS_MM
    return BY_LABEL[v.nearest_pred_label].name if near and v.nearest_pred_label in BY_LABEL else "none"


def _by_level(cases: list[CaseResult]) -> dict[str, LevelSummary]:
    by_name: dict[str, list[VertebraResult]] = {}
    for v in sorted((v for c in cases for v in c.vertebrae), key=lambda v: level_index(v.label)):
        by_name.setdefault(v.name, []).append(v)
    return {name: LevelSummary(n_gt=len(verts), n_identified=sum(v.identified for v in verts),
                               mean_loc_error_mm=_mean(v.loc_error_mm for v in verts),
                               named_instead=dict(Counter(_called_instead(v) for v in verts
                                                          if not v.identified).most_common()))
            for name, verts in by_name.items()}


def _lookup(mapping: Mapping, key: str, pred: PredFiles | None, gt: GtFiles):
    for k in (key, pred.name if pred else None, image_stem(gt.mask.name)):
        if k is not None and k in mapping:
            return mapping[k]
    # any other name of the case, such as its image's, which a missing prediction cannot supply
    return next((value for k, value in mapping.items() if case_key(k) == key), None)


def _make_folders(folders: list[Path]) -> None:
    """Create ``folders`` and their missing parents.

    Raises:
        InputError: a folder that cannot be created or written to (the message names it).
    """
    for folder in folders:
        try:
            make_writable_folder(folder)
        except OSError as err:
            raise InputError(f"{folder}: cannot write the report there ({err.strerror or err})") from None


def _centroids_of_mask(ctd: Path, image: sitk.Image, mask: Path, of_mask: dict[int, np.ndarray]
                       ) -> dict[int, np.ndarray]:
    """``read_centroids`` of ``ctd`` (its voxel coordinates on ``image``, read from ``mask``), checked against the
    centres of mass ``of_mask`` (VerSe label -> LPS mm) of the same labels in that mask.

    Raises:
        InputError: as ``read_centroids``, or a centroid further than ``CENTROID_MASK_MM`` from its label's centre of
            mass (the message names both files).
    """
    centroids = read_centroids(ctd, image)
    for label, position in centroids.items():
        distance = float(np.linalg.norm(position - of_mask[label])) if label in of_mask else 0.0
        if distance > CENTROID_MASK_MM:
            raise InputError(f"{ctd}: the centroid of label {label} lies {distance:.0f} mm from that label in {mask}: "
                             "do the two belong to one image?")
    return centroids


def _warn_unlike_map(centroids: Mapping[int, np.ndarray], of_map: Mapping[int, np.ndarray], ctd: Path, seg: Path
                     ) -> None:
    """Warn when a prediction's centroid file ``ctd`` and its label map ``seg`` (their VerSe labels: ``centroids``
    and ``of_map``) do not name the same vertebrae: the centroids are scored as they are, so a label of the map the
    file leaves out counts as not predicted, and a centroid of a label the map has no voxel of can take a
    vertebra's identification (SpineLabel writes the two from one labelling; an edited or mismatched file differs)."""
    unnamed = sorted(v for v in set(of_map) - set(centroids) if v in BY_LABEL)
    empty = sorted(v for v in set(centroids) - set(of_map) if v in BY_LABEL)
    if unnamed or empty:
        log.warning("%s does not name the vertebrae of its label map %s:%s%s; scored as the file says", ctd, seg.name,
                    f" no centroid for labels {unnamed} of the map (counted as not predicted)" if unnamed else "",
                    f"{';' if unnamed else ''} centroids of labels {empty} that the map has no voxel of" if empty
                    else "")


def _score_pair(key: str, pred: PredFiles | None, gt: GtFiles, groups: Mapping[str, str] | None,
                bodies_only: bool | Mapping[str, bool] | None) -> CaseResult:
    """One case of ``evaluate_folders`` (its arguments of the same names)."""
    name = pred.name if pred else key  # as the tables name the case, its warnings too
    gt_image = read_label_map(gt.mask)
    geometry = Geometry.of(gt_image)
    gt_labels = reference_labels(sitk.GetArrayViewFromImage(gt_image), gt.mask)
    if isinstance(bodies_only, Mapping):
        flag = _lookup(bodies_only, key, pred, gt)
        is_bodies = gt.bodies_only if flag is None else bool(flag)
    else:
        is_bodies = gt.bodies_only if bodies_only is None else bool(bodies_only)
    # both sides' centroids from their files, or both from their masks: never two definitions in one distance
    from_files = gt.ctd is not None and (pred is None or pred.ctd is not None)
    bodies_to_file = is_bodies and gt.ctd is None and pred is not None and pred.ctd is not None
    gt_ctd = _mask_centroids_lps(gt_labels, geometry)
    if from_files:
        from_file = _centroids_of_mask(gt.ctd, gt_image, gt.mask, gt_ctd)
        if set(gt_ctd) - set(from_file):
            log.warning("%s: mask labels %s have no centroid in %s; taken from the mask", name,
                        sorted(set(gt_ctd) - set(from_file)), gt.ctd)
        beyond = sorted(v for v in set(from_file) - set(gt_ctd) if v in BY_LABEL)
        if beyond:
            log.warning("%s: %s has centroids of labels %s that %s has no voxel of; they are scored as reference "
                        "vertebrae", name, gt.ctd, beyond, gt.mask)
        gt_ctd.update(from_file)
    if pred is None:
        log.warning("%s: no prediction for reference %s; all its vertebrae count as missed", name, gt.mask)
        pred_labels = np.zeros(gt_labels.shape, dtype=np.uint8)
        pred_ctd: dict[int, np.ndarray] = {}
    else:
        pred_image = read_label_map(pred.seg)
        _refuse_other_numbering(sitk.GetArrayViewFromImage(pred_image), pred.seg)
        if not Geometry.of(pred_image).matches(Geometry.of(gt_image)):
            def grid(image: sitk.Image) -> str:
                return (f"{axes_text(image.GetSize())} voxels of {axes_text(image.GetSpacing(), '.6g')} mm, origin "
                        f"{axes_text(image.GetOrigin(), '.2f')} mm")

            log.warning("%s: prediction grid (%s) differs from reference %s (%s): the prediction is resampled onto it "
                        "(nearest neighbour)", pred.seg, grid(pred_image), gt.mask, grid(gt_image))
            pred_labels = sitk.GetArrayFromImage(resample_to_grid(pred_image, gt_image, label=True))
            if not pred_labels.any() and sitk.GetArrayViewFromImage(pred_image).any():
                raise InputError(f"{pred.seg}: no labelled voxel of this prediction lies inside the grid of its "
                                 f"reference {gt.mask}: is it a prediction of another image, or was a header changed?")
        else:
            pred_labels = sitk.GetArrayViewFromImage(pred_image)
        ignore = dataset_ignore_value(gt.mask)
        if ignore is not None:  # nnU-Net's ignore label: voxels nobody annotated, where no prediction is wrong
            pred_labels = np.where(sitk.GetArrayViewFromImage(gt_image) == ignore, 0, pred_labels)
        if is_bodies and pred.ctd is None:
            log.warning("%s: the reference marks vertebral bodies and the prediction %s has no centroid file: the "
                        "centres of its whole vertebrae are compared with those of the bodies (about 2-15 mm apart); "
                        "a centroid file of body centres beside it (NAME_ctd.json) scores localisation fairly", name,
                        pred.seg)
        if from_files or bodies_to_file:
            own = _mask_centroids_lps(sitk.GetArrayViewFromImage(pred_image), Geometry.of(pred_image))
            pred_ctd = _centroids_of_mask(pred.ctd, pred_image, pred.seg, own)
            _warn_unlike_map(pred_ctd, own, pred.ctd, pred.seg)
        else:
            pred_ctd = _mask_centroids_lps(pred_labels, geometry)
    confidences, modality = read_report(pred.report) if pred and pred.report else (None, "")
    result = evaluate_case(pred_labels, gt_labels, geometry.spacing[::-1], pred_ctd, gt_ctd, is_bodies,
                           name=name, pred_confidences=confidences)
    result.prediction_missing = pred is None
    result.group = (_lookup(groups, key, pred, gt) or "") if groups else modality
    result.gt_mask = str(gt.mask)
    result.pred_seg = str(pred.seg) if pred else ""
    result.centroid_source = ("centroid files" if from_files else "GT body masks, predicted centroid file"
                              if bodies_to_file else "GT body masks, predicted whole-vertebra masks"
                              if is_bodies and pred is not None else "masks")
    if result.n_gt == 0:
        log.warning("%s: reference %s holds no vertebra label; the case has nothing to score", name, gt.mask)
    log.info("%s: %d of %d GT vertebrae identified", result.name, result.n_identified, result.n_gt)
    return result


def _modality_of_image(path: Path) -> str:
    """The modality ``inference.modality_of`` reads from the image at ``path`` ("" with a warning when it cannot be
    read): the group of a case that has no SpineLabel report."""
    try:
        image = read_image(path)
    except InputError as err:
        log.warning("%s; its case is in no group", err)
        return ""
    return modality_of(sitk.GetArrayViewFromImage(image))


def _read_as(out: Path, pred_dir: Path, gt_dir: Path) -> str | None:
    """What a later evaluation of ``pred_dir`` against ``gt_dir`` would read the file ``out`` as, by its name and
    folder (a prediction's ``NAME_seg``, ``NAME_ctd.json`` or ``NAME_report.json``; an image, a centroid file or a
    ``dataset.json`` under the reference folder), or None."""
    name = out.name.lower()
    if out.parent.resolve() == pred_dir.resolve() and (
            _stem_ending(out.name, "_seg") is not None or name.endswith(("_ctd.json", "_report.json"))):
        return f"a prediction's file in {pred_dir}"
    if gt_dir.resolve() in out.resolve().parents and (
            image_stem(out.name) is not None or name.endswith("_ctd.json") or name == "dataset.json"):
        return f"a reference file under {gt_dir}"
    return None


def check_report_paths(outs: list[Path], protected: Iterable[Path | None], pred_dir: str | os.PathLike,
                       gt_dir: str | os.PathLike) -> None:
    """Refuse report paths (``outs``: the JSON and Markdown reports asked for) that would overwrite one of the files
    ``protected`` (those being scored, or labelled and scored; None entries ignored), an image, each other, or a
    folder, or that a later evaluation of ``pred_dir`` against ``gt_dir`` would read as one of its inputs
    (``_read_as``): before any work.

    Raises:
        InputError: one of those.
    """
    kept = {path.resolve(): path for path in protected if path is not None}
    if len(outs) == 2 and outs[0].resolve() == outs[1].resolve():
        raise InputError(f"{outs[0]}: given for both the JSON and the Markdown report; give two paths")
    for out in outs:
        if (scored := kept.get(out.resolve())) is not None:
            raise InputError(f"{out}: is {scored}, a file being scored; write the report elsewhere")
        if out.name.lower().endswith(IMAGE_SUFFIXES) and out.exists():
            raise InputError(f"{out}: is an image; write the report elsewhere")
        if out.exists() and not out.is_file():
            raise InputError(f"{out}: is a folder (or another non-file), not a report file")
        if (what := _read_as(out, Path(pred_dir), Path(gt_dir))) is not None:
            raise InputError(f"{out}: evaluate would read a file of this name as {what}; write the report elsewhere")


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    out_json: str | os.PathLike | None = None,
    out_md: str | os.PathLike | None = None,
    *,
    groups: Mapping[str, str] | None = None,
    bodies_only: bool | Mapping[str, bool] | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    fresh: Collection[str] | None = None,
) -> EvaluationSummary:
    """Evaluate every GT case in ``gt_dir`` against the predictions in ``pred_dir``.

    Args:
        pred_dir: folder of ``NAME_seg.nii.gz`` (+ ``NAME_ctd.json``).
        gt_dir: reference folder in one of the layouts of the module docstring.
        out_json: where to write ``summary.to_dict()`` as JSON (written atomically), or None.
        out_md: where to write ``summary_markdown(summary)``, or None.
        groups: case -> group name (e.g. "MR"/"CT"), keyed by matching key, prediction NAME, GT mask stem or any name
            with the case's matching key (its image's); cases not in it are in no group. None: each case's group is
            the modality of its prediction's ``NAME_report.json``, or without a report the modality read from the
            case's image beside its GT mask (none when it has no readable image).
        bodies_only: True/False for all cases, a per-case mapping (keyed like ``groups``), or None to detect.
        progress: called after each case with (fraction 0-1 of the cases scored, message naming the case).
        cancel: polled before each case; returning True raises ``Cancelled`` (no report written, the report folders
            this call created removed).
        fresh: only the predictions of these cases (matching keys) are scored (``match_cases``); None: all.

    Returns:
        Per-case results and pooled scores.

    Raises:
        InputError: missing folders, no GT case, a prediction none of which lies on its GT mask's grid or a centroid
            file that does not fit its mask (the messages name both files), unreadable files.
        Cancelled: the cancel hook returned True (``io.Cancelled``, the class ``pipeline.label_spine`` raises).
    """
    pairs = match_cases(pred_dir, gt_dir, fresh)
    if all(pred is None for _, pred, _ in pairs):
        raise InputError(f"{pred_dir}: no prediction matches a reference case of {gt_dir} (predictions are "
                         "NAME_seg.nii.gz, NAME as the reference case or its image is named)")
    outs = [Path(out) for out in (out_json, out_md) if out is not None]
    # a case's files (its image aside: an image is never overwritten, check_report_paths) and all a prediction's outputs
    check_report_paths(outs, (path for _, pred, gt in pairs for path in (
        gt.mask, gt.ctd, *(output_paths(pred.seg.parent, pred.name) if pred else ()))), pred_dir, gt_dir)
    report = progress or (lambda fraction, message: None)
    with no_empty_new_folders(*{out.parent for out in outs}):  # a failed or stopped run leaves none it made
        _make_folders([out.parent for out in outs])  # before the scoring, not after it
        unreported = {key: gt for key, pred, gt in pairs if groups is None and (pred is None or pred.report is None)}
        try:
            images = _images(_tree(Path(gt_dir)), unreported)[0] if unreported else {}
        except InputError as err:  # two images match one case
            log.warning("%s: the cases without a SpineLabel report are in no group", err)
            images = {}
        cases: list[CaseResult] = []
        for key, pred, gt in pairs:
            if cancel is not None and cancel():
                raise Cancelled()
            cases.append(_score_pair(key, pred, gt, groups, bodies_only))
            if not cases[-1].group and key in images:
                cases[-1].group = _modality_of_image(images[key])
            report(len(cases) / len(pairs), f"scored {cases[-1].name}")
        if not any(c.n_gt for c in cases):  # every reference empty, or of labels the VerSe table lacks: no score
            raise InputError(f"{gt_dir}: no reference case holds a vertebra label of the VerSe table ("
                             + ", ".join(str(c.gt_mask) for c in cases[:3]) + (", ..." if len(cases) > 3 else "")
                             + "): nothing to score")
        matched = {key for key, _, _ in pairs}
        unmatched = sorted(str(p.seg) for k, p in _predictions(Path(pred_dir)).items() if k not in matched)
        group_names = sorted({c.group for c in cases if c.group})
        summary = EvaluationSummary(
            cases=cases, overall=_pool(cases),
            groups={g: _pool([c for c in cases if c.group == g]) for g in group_names}, levels=_by_level(cases),
            unmatched_predictions=unmatched, pred_dir=str(pred_dir), gt_dir=str(gt_dir))
        documents = ([json.dumps(summary.to_dict(), indent=1, allow_nan=False)] if out_json is not None else []) + (
            [summary_markdown(summary)] if out_md is not None else [])
        with atomic_paths(outs) as temps:
            for text, tmp, final in zip(documents, temps, outs):
                with write_errors_named(final):
                    tmp.write_text(text, encoding="utf-8")
    return summary


# ------------------------------------------------------------------------------------------------ report


def _fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec)


def _of(part: int, whole: int) -> str:
    return f"{part} of {whole}" if whole else "-"


def summary_markdown(summary: EvaluationSummary) -> str:
    """Markdown report: one row per case, then one row per group and the overall row, then one row per reference
    level."""
    lines = [
        f"# SpineLabel evaluation\n\nPredictions: `{summary.pred_dir}`; reference: `{summary.gt_dir}`. "
        f"Identified = closest predicted centroid has the reference label and lies within {ID_RADIUS_MM:g} mm. "
        "Loc. error = distance from each reference centroid to the predicted centroid of its label (VerSe's "
        "localisation distance: a vertebra named one level off counts the distance to the vertebra given its name), "
        "over the reference vertebrae whose label is predicted. "
        "Dice for whole-vertebra references (names aside: against the predicted vertebra overlapping each reference "
        "vertebra most, whatever its label), body coverage for bodies-only references. Shift = median predicted minus "
        "reference level over the predicted centroids paired with the closest reference centroid within "
        f"{ID_RADIUS_MM:g} mm (positive: labels too caudal); off by one = more than half of those pairs one level "
        "apart the same way. Uncertain = the closest predicted label's confidence is below "
        f"{UNCERTAIN_BELOW:g}, where SpineLabel warns (from `NAME_report.json`); confident = at or above it.\n",
        "## Cases\n",
        "| case | group | reference vertebrae | identified | id rate | loc. error (mm) | vertebrae not predicted "
        "| Dice | Dice, names aside | body coverage | shift | off by one | sacrum in reference | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary.cases:
        notes = []
        if c.prediction_missing:
            notes.append("prediction missing")
        if c.not_predicted and not c.prediction_missing:
            notes.append("not predicted: " + ", ".join(c.not_predicted))
        if c.extra_predicted:
            notes.append("extra: " + ", ".join(c.extra_predicted))
        lines.append(
            f"| {c.name} | {c.group or '-'} | {c.n_gt} | {c.n_identified} | {_fmt(c.id_rate)} "
            f"| {_fmt(c.mean_loc_error_mm, '.1f')} | {c.n_not_predicted} | {_fmt(c.mean_dice, '.3f')} "
            f"| {_fmt(c.mean_dice_names_aside, '.3f')} | {_fmt(c.mean_body_coverage, '.3f')} | {_fmt(c.shift, '+.1f')} "
            f"| {_fmt(c.off_by_one)} "
            f"| {_fmt(c.sacrum_in_gt)} | {'; '.join(notes)} |")
    lines += [
        "\n## Summary\n",
        "| group | cases | reference vertebrae | id rate | loc. error (mm) | vertebrae not predicted | Dice "
        "| Dice, names aside | body coverage | off-by-one scans | cases without prediction | identified, uncertain "
        "| identified, confident |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in [*summary.groups.items(), ("all", summary.overall)]:
        lines.append(
            f"| {name} | {s.n_cases} | {s.n_gt} | {_fmt(s.id_rate)} | {_fmt(s.mean_loc_error_mm, '.1f')} "
            f"| {s.n_not_predicted} | {_fmt(s.mean_dice, '.3f')} | {_fmt(s.mean_dice_names_aside, '.3f')} "
            f"| {_fmt(s.mean_body_coverage, '.3f')} | {s.n_off_by_one} "
            f"| {s.n_missing_predictions} | {_of(s.n_uncertain_identified, s.n_uncertain)} "
            f"| {_of(s.n_confident_identified, s.n_confident)} |")
    lines += [
        "\n## By level (all cases)\n",
        "| level | reference vertebrae | identified | loc. error (mm) | not identified: called instead |",
        "|---|---|---|---|---|",
    ]
    for name, level in summary.levels.items():
        instead = ", ".join(f"{label} x{n}" for label, n in level.named_instead.items())
        lines.append(f"| {name} | {level.n_gt} | {level.n_identified} | {_fmt(level.mean_loc_error_mm, '.1f')} "
                     f"| {instead} |")
    if summary.unmatched_predictions:
        lines.append("\nPredictions without reference: "
                     + ", ".join(f"`{p}`" for p in summary.unmatched_predictions))
    return "\n".join(lines) + "\n"
