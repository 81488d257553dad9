"""Where the spine gate (``SpineLabelLib.pipeline.MIN_SPINE_PROBABILITY``) should sit for a model.

Labels images that hold no spine (white, smoothed and uniform noise, random blobs, balls: CT-like and MR-like
intensities) and every real scan in ``../shared/data``, and prints the median vertebral-body probability of each
one's vertebra-like components (``SpineLabeling.spine_probability``). The gate belongs between the highest non-spine
value and the lowest real-scan value.

Usage (from the repository root):
    python benchmarks/spine_gate.py [--model CARD.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from SpineLabelLib.pipeline import MIN_SPINE_PROBABILITY, label_spine

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# real images: every file of these patterns under ../shared/data (label maps and templates excluded by name)
REAL_PATTERNS = ("*_img.nii.gz", "*_ct.nii.gz", "*_T2w.nii.gz", "example_*_sm.nii.gz", "t1w.nii.gz", "t2.nii.gz")


def non_spine_images(seed: int = 0) -> dict[str, sitk.Image]:
    """Images without a spine, float32, 1.5 mm voxels, 120 x 160 x 160 (z, y, x)."""
    rng = np.random.default_rng(seed)
    shape = (120, 160, 160)
    z, y, x = np.indices(shape)
    arrays = {
        "white noise": rng.normal(0, 100, shape),
        "smoothed noise": ndimage.gaussian_filter(rng.normal(0, 100, shape), 3) * 10,
        "uniform noise": rng.uniform(0, 255, shape),
    }
    blobs = ndimage.gaussian_filter(rng.normal(0, 1, shape), 6)
    arrays["blobs (MR)"] = np.where(blobs > 0.02, 400.0, 50.0) + rng.normal(0, 20, shape)
    arrays["blobs (CT)"] = np.where(blobs > 0.02, 300.0, -1000.0) + rng.normal(0, 20, shape)
    balls = np.zeros(shape)
    for _ in range(6):
        c = rng.uniform(20, 100), rng.uniform(30, 130), rng.uniform(30, 130)
        balls[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < rng.uniform(36, 225)] = 1
    arrays["balls (MR)"] = balls * 1000 + rng.normal(0, 10, shape)
    arrays["balls (CT)"] = balls * 1300 - 1000 + rng.normal(0, 10, shape)
    images = {}
    for name, array in arrays.items():
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.SetSpacing((1.5, 1.5, 1.5))
        images[name] = image
    return images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model card; default: the shipped model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows: list[tuple[str, str, float | None]] = []
    for name, image in non_spine_images().items():
        rows.append(("no spine", name, label_spine(image, model=args.model, device="cpu").spine_probability))
    if DATA.is_dir():
        paths = sorted({p for pattern in REAL_PATTERNS for p in DATA.rglob(pattern)})
        for path in paths:
            result = label_spine(path, model=args.model, device="cpu")
            rows.append(("real", str(path.relative_to(DATA)), result.spine_probability))
    else:
        print(f"{DATA} not found: real scans skipped", file=sys.stderr)
    for kind, name, p in rows:
        print(f"{kind:9s} {'-' if p is None else f'{p:.3f}':>6s}  {name}")
    fake = [p for kind, _, p in rows if kind == "no spine" and p is not None]
    real = [p for kind, _, p in rows if kind == "real"]
    print(f"\nhighest without a spine: {max(fake, default=float('nan')):.3f}; lowest real scan: "
          f"{min((p for p in real if p is not None), default=float('nan')):.3f}; "
          f"real scans without any component: {sum(p is None for p in real)}; gate now {MIN_SPINE_PROBABILITY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
