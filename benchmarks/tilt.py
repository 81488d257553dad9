"""How far a spine may lean against the axes of its scan.

The network runs on a grid that keeps an oblique scan's tilt (``io.canonical_grid``), which is right for slices
planned along the spine; a spine that leans against the slices leans on the network's grid too. This resamples the
training lumbar MRI of ``real_data.py`` (the held-out ones stay untouched), unchanged in the world, onto slices
turned by each angle about the left-right axis, labels every copy and scores it against its body mask resampled the
same way (``evaluation.evaluate_case``: the closest predicted centroid carries the label and lies within 20 mm).
Prints, per angle, the vertebrae identified, the copies refused by the spine gate and the copies numbered off by one.

Usage (from the repository root):
    python benchmarks/tilt.py [--angles=-25,-20,-15,0,15,20,25] [--model CARD.json] [--cases N]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import SimpleITK as sitk

from SpineLabelLib.evaluation import evaluate_case, mask_centroids
from SpineLabelLib.pipeline import get_model, label_spine
from SpineLabelLib.vertebrae import BY_NAME

from real_data import DATA, HOLDOUT_MRI


def tilted(image: sitk.Image, degrees: float, label: bool) -> sitk.Image:
    """``image`` resampled, unchanged in the world, onto a grid of its spacing whose axes are its own turned by
    ``degrees`` about the LPS left-right axis, covering all of it (linear, or nearest neighbour for a label map)."""
    a = np.deg2rad(degrees)
    turn = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    new_direction = turn @ direction
    size, spacing = np.asarray(image.GetSize()), np.asarray(image.GetSpacing())
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (size - 1)
    local = (np.asarray(image.GetOrigin()) + (corners * spacing) @ direction.T) @ new_direction
    grid = sitk.Image([int(n) for n in np.ceil((local.max(0) - local.min(0)) / spacing) + 1], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(new_direction.ravel().tolist())
    grid.SetOrigin((new_direction @ local.min(0)).tolist())
    if label:
        return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear,
                         float(sitk.GetArrayViewFromImage(image).min()), sitk.sitkFloat32)


def score(image: sitk.Image, truth: sitk.Image, model) -> tuple[int, int, bool, bool]:
    """(identified, reference vertebrae, refused by the spine gate, numbered off by one) of one copy: the body
    centroids SpineLabel reports against those of the body mask, as ``real_data.py evaluate`` scores these scans."""
    result = label_spine(image, model=model, device="cpu")
    spacing = np.asarray(image.GetSpacing())
    reference = sitk.GetArrayFromImage(truth)
    predicted = {BY_NAME[v.name].label: np.asarray(image.TransformPhysicalPointToContinuousIndex(v.centroid_lps_mm))
                 * spacing for v in result.vertebrae}
    case = evaluate_case(result.label_map(), reference, spacing[::-1], predicted,
                         {v: c * spacing for v, c in mask_centroids(reference).items()}, True)
    refused = any(w.startswith("no spine recognised") for w in result.warnings)
    return case.n_identified, case.n_gt, refused, case.off_by_one


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--angles", default="-25,-20,-15,0,15,20,25",
                   help="comma-separated degrees about left-right (default: %(default)s)")
    p.add_argument("--model", help="model card (default: the default model)")
    p.add_argument("--cases", type=int, help="only the first N training MRI (by name)")
    args = p.parse_args()
    angles = [float(a) for a in args.angles.split(",")]
    folder = DATA / "mri_lumbar_bodies"
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not found; this benchmark needs ../shared/data")
    images = sorted(path for path in folder.glob("*_img.nii.gz") if path.name[: -len(".nii.gz")] not in HOLDOUT_MRI)
    images = images[: args.cases]
    model = get_model(args.model, "cpu")
    totals = {angle: [0, 0, 0, 0] for angle in angles}
    for path in images:
        image = sitk.ReadImage(str(path))
        truth = sitk.ReadImage(str(path).replace("_img.nii.gz", "_vert-verse.nii.gz"))
        row = []
        for angle in angles:
            found, n, refused, shifted = score(tilted(image, angle, False), tilted(truth, angle, True), model)
            for k, value in enumerate((found, n, refused, shifted)):
                totals[angle][k] += int(value)
            row.append(f"{angle:+g}: {found}/{n}{' refused' if refused else ''}{' off by one' if shifted else ''}")
        print(f"{path.name[: -len('_img.nii.gz')]:14s} " + ", ".join(row), flush=True)
    print(f"{len(images)} training MRI, resampled onto slices turned about left-right")
    print("degrees  identified  refused  off by one")
    for angle, (found, n, refused, shifted) in totals.items():
        print(f"{angle:+7g}  {found:4d} of {n:4d}  {refused:7d}  {shifted:10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
