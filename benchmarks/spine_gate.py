"""Where the spine gate (``SpineLabelLib.pipeline.is_spine``) should sit for a model.

Labels images that hold no spine (white, smoothed and uniform noise, random blobs, balls: the kinds training draws as
negatives; a limb and a head, which it never draws; CT-like and MR-like intensities) and every real scan in
``../shared/data``, and prints the median vertebral-body probability of each one's vertebra-like components that the
field of view leaves whole (``SpineLabeling.spine_probability``, column p), the number of all its components (n) and
of those in its longest regular column (c, ``pipeline.regular_column``), as the gate sees them, then what the gate
does with them. The gate belongs between the highest non-spine value and the lowest real-scan value, for short and
for long columns of components, placed without the scans marked "held out" (the development test set of
``real_data.py evaluate``), whose lowest value is printed apart.

Usage (from the repository root):
    python benchmarks/spine_gate.py [--model CARD.json] [--seeds 3]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SpineLabelLib import pipeline
from SpineLabelTrainingLib.negatives import KINDS, non_spine_image

from real_data import DATA, is_test_image

# real images: every file of these patterns under ../shared/data (label maps and templates excluded by name)
REAL_PATTERNS = ("*_img.nii.gz", "*_ct.nii.gz", "*_T2w.nii.gz", "example_*_sm.nii.gz", "t1w.nii.gz", "t2.nii.gz")


def _limb_and_head(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float) -> dict[str, np.ndarray]:
    """Kinds that training never draws: a limb (a bone tube, cortex and marrow, in muscle and fat, along z) and a head
    (a skull shell around brain), CT-like (HU) and MR-like."""
    z, y, x = np.indices(shape, dtype=np.float32) * spacing
    centre = np.asarray(shape) * spacing / 2 + rng.uniform(-10, 10, 3)
    r = np.hypot(y - centre[1], x - centre[2])
    bone_r = rng.uniform(10, 16)
    limb = {"fat": r < 75, "muscle": r < 65, "cortex": r < bone_r, "marrow": r < bone_r - 4}
    radii = rng.uniform(60, 80, 3)
    e = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip((z, y, x), centre, radii)))
    head = {"fat": e < 1.0, "muscle": e < 0.97, "cortex": e < 0.93, "marrow": e < 0.88}  # scalp, skull, brain
    hu = {"fat": -100.0, "muscle": 40.0, "cortex": 1000.0, "marrow": 30.0}
    mr = {"fat": 900.0, "muscle": 300.0, "cortex": 30.0, "marrow": 500.0}
    out = {}
    for name, parts in (("limb", limb), ("head", head)):
        for modality, values, background in (("CT", hu, -1000.0), ("MR", mr, 0.0)):
            image = np.full(shape, background, dtype=np.float32)
            for part in ("fat", "muscle", "cortex", "marrow"):  # outer to inner
                image[parts[part]] = values[part]
            out[f"{name} ({modality})"] = image + rng.normal(0, 15, shape).astype(np.float32)
    return out


def non_spine_images(seed: int = 0) -> dict[str, sitk.Image]:
    """Images without a spine, float32, 1.5 mm voxels, 120 x 160 x 160 (z, y, x): every kind training draws
    (``negatives.KINDS``, other draws than training's) and two it never draws (limb, head)."""
    rng = np.random.default_rng(seed)
    shape, spacing = (120, 160, 160), 1.5
    arrays = {kind: non_spine_image(rng, kind, shape, spacing) for kind in KINDS}
    arrays.update(_limb_and_head(rng, shape, spacing))
    images = {}
    for name, array in arrays.items():
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((spacing,) * 3)
        images[name] = image
    return images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model card; default: the shipped model")
    parser.add_argument("--seeds", type=int, default=3, help="draws of each kind of image without a spine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    is_spine = pipeline.is_spine
    judged: list[tuple[int, int]] = []

    def open_gate(p: float, n: int, column: int = 0) -> bool:  # every image is measured with the gate open
        judged.append((n, column))
        return True

    pipeline.is_spine = open_gate
    rows: list[tuple[str, str, float | None, int, int]] = []

    def measure(kind: str, name: str, image) -> None:
        judged.clear()
        p = pipeline.label_spine(image, model=args.model, device="cpu").spine_probability
        rows.append((kind, name, p, *(judged[-1] if judged else (0, 0))))

    for seed in range(args.seeds):
        for name, image in non_spine_images(seed).items():
            measure("no spine", f"{name} {seed}", image)
    if DATA.is_dir():
        for path in sorted({p for pattern in REAL_PATTERNS for p in DATA.rglob(pattern)}):
            measure("held out" if is_test_image(path) else "real", str(path.relative_to(DATA)), path)
    else:
        print(f"{DATA} not found: real scans skipped", file=sys.stderr)
    print(f"{'':9s} {'p':>6s} {'n':>3s} {'c':>3s}")
    for kind, name, p, n, column in rows:
        print(f"{kind:9s} {'-' if p is None else f'{p:.3f}':>6s} {n:3d} {column:3d}  {name}")
    print()
    for long_column, what in ((False, f"fewer than {pipeline.LONG_COLUMN}"), (True, f"{pipeline.LONG_COLUMN} or more")):
        values = {kind: [p for k, _, p, n, _ in rows if k == kind and p is not None
                         and (n >= pipeline.LONG_COLUMN) == long_column] for kind in ("no spine", "real", "held out")}
        print(f"{what} components: highest without a spine {max(values['no spine'], default=float('nan')):.3f}; "
              f"lowest real scan {min(values['real'], default=float('nan')):.3f}, held out included "
              f"{min(values['real'] + values['held out'], default=float('nan')):.3f}")
    print(f"longest regular column without a spine: {max((c for k, *_, c in rows if k == 'no spine'), default=0)} "
          f"components (the gate asks {pipeline.MIN_SPINE_PROBABILITY_REGULAR_COLUMN} of {pipeline.REGULAR_COLUMN} or "
          "more)")
    print(f"real scans without any component: {sum(p is None for kind, _, p, *_ in rows if kind != 'no spine')}")
    passed = [name for kind, name, p, n, c in rows if kind == "no spine" and p is not None and is_spine(p, n, c)]
    stopped = [name for kind, name, p, n, c in rows if kind != "no spine" and p is not None and not is_spine(p, n, c)]
    n_fake = sum(kind == "no spine" for kind, *_ in rows)
    print(f"the gate now (pipeline.is_spine) lets {len(passed)} of {n_fake} images without a spine through"
          f"{': ' + ', '.join(passed) if passed else ''}, and stops {len(stopped)} real scan(s)"
          f"{': ' + ', '.join(stopped) if stopped else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
