"""Scores for choosing between models without looking at the held-out scans: procedural phantoms and synthetic crops
of seeds that training never draws.

* phantoms: ``make_phantom`` CT and MR, fields of view whole, cervical, thoracic and lumbar, seeds 101-103 (24);
* synthetic crops: ``synthesize_case`` of 160 x 112 x 112 voxels at 2 mm, seeds 900000 + i, 16 each of CT, T2 and
  T1 (48), drawn from the shape library of the training view (``real_data.py``), so no held-out anatomy.

Every case is labelled by ``label_spine`` and scored by ``evaluation.evaluate_case`` (VerSe identification: the
closest predicted centroid carries the label and lies within 20 mm; centroids of whole vertebrae on both sides).
Together with ``python benchmarks/real_data.py evaluate --selection`` (the training MRI and CT), this is the set on
which the default model is chosen.

Usage (from the repository root):
    python benchmarks/selection.py [--model CARD.json] [--crops 16] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SpineLabelLib.evaluation import evaluate_case
from SpineLabelLib.phantom import make_phantom
from SpineLabelLib.pipeline import get_model, label_spine

from real_data import DATA, training_view

PHANTOM_SEEDS = (101, 102, 103)
CROP_SEED = 900_000
CROP_SIZE_ZYX = (160, 112, 112)
CROP_MODALITIES = ("ct", "t2", "t1")


def _score(image: sitk.Image, truth: np.ndarray, model) -> tuple[int, int]:
    """(identified, GT vertebrae) of one labelled image; ``truth`` is its VerSe label map (z, y, x)."""
    result = label_spine(image, model=model, device="cpu")
    scores = evaluate_case(result.label_map(), truth, image.GetSpacing()[::-1], None, None, False)
    return scores.n_identified, scores.n_gt


def _add(totals: dict[str, list[int]], group: str, found: int, n: int) -> None:
    """Add one case's (identified, GT vertebrae) to its group's running totals."""
    total = totals.setdefault(group, [0, 0])
    total[0] += found
    total[1] += n


def phantoms(model) -> dict[str, list[int]]:
    totals: dict[str, list[int]] = {}
    for modality in ("ct", "mr"):
        for fov in ("whole", "cervical", "thoracic", "lumbar"):
            for seed in PHANTOM_SEEDS:
                ph = make_phantom(modality=modality, fov=fov, seed=seed)
                found, n = _score(ph.image, sitk.GetArrayFromImage(ph.labels), model)
                logging.info("phantom %s %s %d: %d of %d", modality, fov, seed, found, n)
                _add(totals, f"phantom {modality.upper()}", found, n)
    return totals


def crops(model, n_per_modality: int, data_dir: Path) -> dict[str, list[int]]:
    from SpineLabelTrainingLib.shapes import build_shape_library
    from SpineLabelTrainingLib.synthesis import synthesize_case

    library = build_shape_library(data_dir)
    totals: dict[str, list[int]] = {}
    for m, modality in enumerate(CROP_MODALITIES):
        for i in range(n_per_modality):
            seed = CROP_SEED + m * n_per_modality + i
            case = synthesize_case(np.random.default_rng(seed), library, spacing_mm=2.0, size_zyx=CROP_SIZE_ZYX,
                                   modality=modality)
            image = sitk.GetImageFromArray(case.image)  # LPS-aligned: identity direction
            image.SetSpacing((case.spacing_mm,) * 3)
            found, n = _score(image, case.levels, model)
            logging.info("crop %s %d: %d of %d", modality, seed, found, n)
            _add(totals, f"synthetic {modality.upper()}", found, n)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model card; default: the shipped model")
    parser.add_argument("--crops", type=int, default=16, help="synthetic crops per modality")
    parser.add_argument("--workdir", type=Path, help="where the view of the training data is made")
    parser.add_argument("--verbose", action="store_true", help="one line per case")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    for name in ("SpineLabelLib", "SpineLabelTrainingLib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not DATA.is_dir():
        print(f"{DATA}: real data folder not found (the synthetic crops need its shapes)", file=sys.stderr)
        return 2
    model = get_model(args.model, "cpu")
    view = training_view(args.workdir or Path(tempfile.mkdtemp(prefix="spinelabel-selection-")))
    totals = {**phantoms(model), **crops(model, args.crops, view)}
    print(f"model {model.info['name']} {model.info['version']}")
    for group, (found, n) in totals.items():
        print(f"{group:14s} {found:4d} of {n:4d} identified ({found / max(n, 1):.0%})")
    found, n = (sum(v[i] for v in totals.values()) for i in range(2))
    print(f"{'all':14s} {found:4d} of {n:4d} identified ({found / max(n, 1):.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
