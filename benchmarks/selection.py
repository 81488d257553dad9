"""Scores for choosing between models without looking at the held-out scans: procedural phantoms and synthetic crops
of seeds that training never draws.

* phantoms: ``make_phantom`` CT and MR, fields of view whole, cervical, thoracic and lumbar, seeds 101-103 (24);
* synthetic crops: ``synthesize_case`` of 160 x 112 x 112 voxels at 2 mm, seeds 900000 + i, 16 each of CT, T2 and
  T1 (48), drawn from the shape library of the training view (``real_data.py``), so no held-out anatomy;
* short scans: 12 each of CT, T2 and T1 (36) cut to 70 mm along the spine and 112 mm across, centred on the
  vertebrae, from crops of seeds 920000 + i, like a targeted scan or the TPTBox crops; only vertebrae with at least
  5 ml in view are scored. They are reported apart from the total of the two sets above, which keeps the
  definition earlier models were chosen on.

Every case is labelled by ``label_spine`` and scored by ``evaluation.evaluate_case`` (VerSe identification: the
closest predicted centroid carries the label and lies within 20 mm; centroids of whole vertebrae on both sides).
The phantoms and synthetic crops also report bone Dice, the mean over cases of the overlap of all labelled
vertebrae with all reference vertebrae whatever their names: the segmentation apart from the numbering; and named
Dice, the mean over cases of ``evaluate_case``'s per-vertebra Dice (each reference vertebra against the voxels
labelled with its name): segmentation and numbering together.
Last come two calibration tables over all these cases. The first takes the reference vertebrae with a predicted label
within 20 mm, by the confidence of the closest one (as ``spinelabel evaluate`` counts them): how many are identified
and how many are not. The second takes the predicted vertebrae with a reference vertebra within 20 mm, by their own
confidence: how many carry the label of the closest one, which is what a confidence promises. A reference vertebra
missed beside a vertebra named right is a miss in the first table and no wrong name in the second.
``sequence.UNCERTAIN_BELOW`` comes from them. Together with
``python benchmarks/real_data.py evaluate --selection`` (the training MRI and CT), this is the set on which the default
model is chosen.

``--seed-offset K`` adds K to every seed above: a second sample, as fresh as the first (training draws its cases from
a random stream, never from these seeds), on which to confirm a change that the first one left undecided. An offset
that would share seeds with the first sample is refused.

Usage (from the repository root):
    python benchmarks/selection.py [--model CARD.json] [--crops 16] [--short 12] [--seed-offset 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SpineLabelLib.evaluation import ID_RADIUS_MM, evaluate_case, mask_centroids
from SpineLabelLib.phantom import make_phantom
from SpineLabelLib.pipeline import get_model, label_spine
from SpineLabelTrainingLib.shapes import build_shape_library
from SpineLabelTrainingLib.synthesis import synthesize_case

from real_data import DATA, _workdir, training_view

PHANTOM_SEEDS = (101, 102, 103)
CROP_SEED = 900_000
CROP_SIZE_ZYX = (160, 112, 112)
CROP_MODALITIES = ("ct", "t2", "t1")
SHORT_SEED = 920_000
SHORT_ZYX = (35, 56, 56)  # 70 x 112 x 112 mm
SHORT_MIN_ML = 5.0


def _score(image: sitk.Image, truth: np.ndarray, model) -> tuple[int, int, tuple[float, float]]:
    """(identified, GT vertebrae, (bone Dice, named Dice)) of one labelled image; ``truth`` is its VerSe label map
    (z, y, x). Also adds to ``CONFIDENCES`` each GT vertebra with a predicted label within 20 mm: the confidence of
    the closest one, and whether the vertebra is identified; and to ``NAMED`` each predicted vertebra with a GT
    vertebra within 20 mm: its confidence, and whether it carries the label of the closest one."""
    result = label_spine(image, model=model, device="cpu")
    predicted = result.label_map()
    confidences = {v.label: v.confidence for v in result.vertebrae}
    # centroids of whole vertebrae on both sides, in mm along the voxel axes, as evaluate_case takes them from masks
    spacing = np.asarray(image.GetSpacing())
    reference = {v: c * spacing for v, c in mask_centroids(truth).items()}
    found = {v: c * spacing for v, c in mask_centroids(predicted).items()}
    scores = evaluate_case(predicted, truth, spacing[::-1], found, reference, False, pred_confidences=confidences)
    CONFIDENCES.extend((v.nearest_pred_confidence, v.identified) for v in scores.vertebrae
                       if v.nearest_pred_confidence is not None)
    if reference:
        labels, centres = np.array(list(reference)), np.array(list(reference.values()))
        for label, mm in found.items():
            distance = np.linalg.norm(centres - mm, axis=1)
            if distance.min() <= ID_RADIUS_MM:
                NAMED.append((confidences[label], bool(labels[distance.argmin()] == label)))
    overlap = np.count_nonzero((predicted > 0) & (truth > 0))
    bone = 2 * overlap / max(np.count_nonzero(predicted) + np.count_nonzero(truth), 1)
    return scores.n_identified, scores.n_gt, (bone, scores.mean_dice)


# (confidence of the closest predicted label, identified) of every GT vertebra with a predicted label within 20 mm
CONFIDENCES: list[tuple[float, bool]] = []
# (confidence, right name) of every predicted vertebra with a GT vertebra within 20 mm, named right when it carries the
# label of the closest one
NAMED: list[tuple[float, bool]] = []
CONFIDENCE_CUTS = (0.5, 0.8, 0.95, 0.99)


def _confidence_table(pairs: list[tuple[float, bool]], counted: str, right_name: str) -> None:
    """Print how many of ``pairs`` (confidence, right) are right, by band of confidence and above each cut."""
    confidence, right = np.array(pairs).T
    edges = (0.0, *CONFIDENCE_CUTS, 1.0 + 1e-9)
    print(f"confidence  {counted:>12s}  {right_name:>10s}  wrong")
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence >= lo) & (confidence < hi)
        share = f"{right[inside].mean():.0%}" if inside.any() else "-"
        wrong = int(inside.sum() - right[inside].sum())
        print(f"{lo:.2f}-{min(hi, 1.0):.2f}  {int(inside.sum()):13d}  {share:>10s}  {wrong:5d}")
    for cut in CONFIDENCE_CUTS:
        above = confidence >= cut
        share_above = f"{right[above].mean():.0%}" if above.any() else "-"
        share_below = f"{right[~above].mean():.0%}" if (~above).any() else "-"
        print(f"at {cut:.2f} or more: {share_above} of {int(above.sum())} {right_name}; "
              f"below: {share_below} of {int((~above).sum())}")


def _report_confidences() -> None:
    """Two calibration tables over all cases above, short scans included: GT vertebrae identified, by the confidence
    of the closest predicted label (a vertebra missed beside a vertebra named right counts as wrong there); and
    predicted vertebrae named right, by their own confidence (what a confidence promises)."""
    if CONFIDENCES:
        _confidence_table(CONFIDENCES, "GT vertebrae", "identified")
    if NAMED:
        _confidence_table(NAMED, "predicted", "named right")


@dataclass
class _Group:
    """Running totals of one group: vertebrae identified, GT vertebrae, (bone Dice, named Dice) of each case that
    reports them."""

    found: int = 0
    n: int = 0
    dice: list[tuple[float, float]] = field(default_factory=list)


def _add(totals: dict[str, _Group], group: str, found: int, n: int, dice: tuple[float, float] | None = None) -> None:
    """Add one case's (identified, GT vertebrae) and (bone Dice, named Dice) to its group's running totals."""
    total = totals.setdefault(group, _Group())
    total.found += found
    total.n += n
    if dice is not None:
        total.dice.append(dice)


def phantoms(model, seed_offset: int) -> dict[str, _Group]:
    totals: dict[str, _Group] = {}
    for modality in ("ct", "mr"):
        for fov in ("whole", "cervical", "thoracic", "lumbar"):
            for seed in (s + seed_offset for s in PHANTOM_SEEDS):
                ph = make_phantom(modality=modality, fov=fov, seed=seed)
                found, n, dice = _score(ph.image, sitk.GetArrayFromImage(ph.labels), model)
                logging.info("phantom %s %s %d: %d of %d, bone and named Dice %.3f %.3f", modality, fov, seed, found,
                             n, *dice)
                _add(totals, f"phantom {modality.upper()}", found, n, dice)
    return totals


def crops(model, n_per_modality: int, library, seed_offset: int) -> dict[str, _Group]:
    totals: dict[str, _Group] = {}
    for m, modality in enumerate(CROP_MODALITIES):
        for i in range(n_per_modality):
            seed = CROP_SEED + seed_offset + m * n_per_modality + i
            case = synthesize_case(np.random.default_rng(seed), library, spacing_mm=2.0, size_zyx=CROP_SIZE_ZYX,
                                   modality=modality)
            image = sitk.GetImageFromArray(case.image)  # LPS-aligned: identity direction
            image.SetSpacing((case.spacing_mm,) * 3)
            found, n, dice = _score(image, case.levels, model)
            logging.info("crop %s %d: %d of %d, bone and named Dice %.3f %.3f", modality, seed, found, n, *dice)
            _add(totals, f"synthetic {modality.upper()}", found, n, dice)
    return totals


def short_scans(model, n_per_modality: int, library, seed_offset: int) -> dict[str, _Group]:
    """Short scans cut from synthetic crops, centred on the vertebrae; vertebrae under ``SHORT_MIN_ML`` in view are
    not scored."""
    totals: dict[str, _Group] = {}
    for m, modality in enumerate(CROP_MODALITIES):
        for i in range(n_per_modality):
            seed = SHORT_SEED + seed_offset + 100 * m + i
            rng = np.random.default_rng(seed)
            case = synthesize_case(rng, library, spacing_mm=2.0, size_zyx=CROP_SIZE_ZYX, modality=modality)
            spine_z = np.flatnonzero(case.levels.any(axis=(1, 2)))
            z0 = int(rng.integers(spine_z[0], max(spine_z[0] + 1, spine_z[-1] - SHORT_ZYX[0])))
            centre = np.argwhere(case.levels[z0 : z0 + SHORT_ZYX[0]] > 0).mean(axis=0)
            y0, x0 = (int(np.clip(round(c - s / 2), 0, n - s)) for c, n, s in
                      zip(centre[1:], CROP_SIZE_ZYX[1:], SHORT_ZYX[1:]))
            box = (slice(z0, z0 + SHORT_ZYX[0]), slice(y0, y0 + SHORT_ZYX[1]), slice(x0, x0 + SHORT_ZYX[2]))
            levels = case.levels[box]
            in_view = np.bincount(levels.ravel()) * case.spacing_mm**3 / 1000.0 >= SHORT_MIN_ML
            in_view[0] = False
            image = sitk.GetImageFromArray(np.ascontiguousarray(case.image[box]))
            image.SetSpacing((case.spacing_mm,) * 3)
            found, n, _ = _score(image, np.where(in_view[levels], levels, 0), model)
            logging.info("short %s %d: %d of %d", modality, seed, found, n)
            _add(totals, f"short {modality.upper()}", found, n)
    return totals


def _report(totals: dict[str, _Group], total_name: str) -> None:
    """Print each group's identified of GT vertebrae and mean bone and named Dice, and their sums as ``total_name``."""
    groups = list(totals.values())
    rows = {**totals, total_name: _Group(sum(g.found for g in groups), sum(g.n for g in groups),
                                         [d for g in groups for d in g.dice])}
    for name, g in rows.items():
        dice = ""
        if g.dice:
            bone, named = np.mean(g.dice, axis=0)
            dice = f", bone Dice {bone:.3f}, named {named:.3f}"
        print(f"{name:14s} {g.found:4d} of {g.n:4d} identified ({g.found / max(g.n, 1):.0%}){dice}")


def _seeds(args: argparse.Namespace, offset: int) -> set[tuple[str, int]]:
    """Every case seed a run with ``offset`` draws: phantoms by ``make_phantom`` seed, crops and short scans by the seed
    of their ``synthesize_case`` draw (one namespace: the same seed is the same synthetic subject)."""
    return ({("phantom", s + offset) for s in PHANTOM_SEEDS}
            | {("synthetic", CROP_SEED + offset + j) for j in range(len(CROP_MODALITIES) * args.crops)}
            | {("synthetic", SHORT_SEED + offset + 100 * m + i) for m in range(len(CROP_MODALITIES))
               for i in range(args.short)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model card; default: the shipped model")
    parser.add_argument("--crops", type=int, default=16, help="synthetic crops per modality")
    parser.add_argument("--short", type=int, default=12, help="short scans per modality")
    parser.add_argument("--seed-offset", type=int, default=0, help="added to every seed: a second, fresh sample")
    parser.add_argument("--workdir", type=Path, help="where the view of the training data is made (new or empty)")
    parser.add_argument("--verbose", action="store_true", help="one line per case")
    args = parser.parse_args()
    first = argparse.Namespace(crops=parser.get_default("crops"), short=parser.get_default("short"))
    if args.seed_offset and _seeds(args, args.seed_offset) & (_seeds(args, 0) | _seeds(first, 0)):
        parser.error(f"--seed-offset {args.seed_offset} would draw some of the cases of --seed-offset 0: use 0 or "
                     "another offset (50000 is the second sample's)")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    for name in ("SpineLabelLib", "SpineLabelTrainingLib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not DATA.is_dir():
        print(f"{DATA}: real data folder not found (the synthetic crops need its shapes)", file=sys.stderr)
        return 2
    model = get_model(args.model, "cpu")
    view = training_view(_workdir(args, "spinelabel-selection-"))
    library = build_shape_library(view)
    totals = {**phantoms(model, args.seed_offset), **crops(model, args.crops, library, args.seed_offset)}
    short = short_scans(model, args.short, library, args.seed_offset)
    print(f"model {model.info['name']} {model.info['version']}")
    _report(totals, "all")
    _report(short, "all short")
    _report_confidences()
    return 0


if __name__ == "__main__":
    sys.exit(main())
