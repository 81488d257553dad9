"""How the orientation check (``label_spine(check_orientation=True)``) does on real scans with right and wrong headers.

Labels every real image of ``../shared/data`` (the patterns of ``spine_gate.py``, and the PAM50 T2 template) twice
with the check on: as stored, and turned head to feet with the header left unchanged (what a wrong header looks
like). Prints each scan's ``orientation_margin`` both ways and counts the warnings: a warning on a scan as stored is
a false alarm, a warning on a turned copy is a catch. Scans of the development test set of ``real_data.py evaluate``
are marked "(held out)": a margin placed on these figures should be placed without them. ``--phantoms`` does the same on the procedural phantoms of
``selection.py`` (CT and MR; whole, cervical, thoracic and lumbar; seeds 101-103) instead of the real scans.

Usage (from the repository root):
    python benchmarks/orientation_check.py [--model CARD.json] [--phantoms]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import is_test_image  # noqa: E402
from spine_gate import DATA, REAL_PATTERNS  # noqa: E402

from SpineLabelLib import pipeline  # noqa: E402
from SpineLabelLib.phantom import make_phantom  # noqa: E402

TEMPLATE = "cervical_sct/template/template/PAM50_small_t2.nii.gz"


def turned_head_to_feet(image: sitk.Image) -> sitk.Image:
    """The voxels reversed along the image axis closest to superior-inferior, under the same header."""
    direction = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    turned = sitk.Flip(image, [code in "SI" for code in direction], flipAboutOrigin=False)
    turned.CopyInformation(image)
    return turned


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model card (.json); default: the shipped model")
    parser.add_argument("--phantoms", action="store_true", help="the procedural phantoms instead of the real scans")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.phantoms:
        images = {f"{modality} {fov} {seed}": lambda m=modality, f=fov, s=seed: make_phantom(m, f, seed=s).image
                  for modality in ("ct", "mr") for fov in ("whole", "cervical", "thoracic", "lumbar")
                  for seed in (101, 102, 103)}
    elif DATA.is_dir():
        paths = sorted({p for pattern in REAL_PATTERNS for p in DATA.rglob(pattern)} | {DATA / TEMPLATE})
        images = {str(p.relative_to(DATA)) + (" (held out)" if is_test_image(p) else ""):
                  lambda p=p: sitk.ReadImage(str(p)) for p in paths}
    else:
        print(f"no data at {DATA}", file=sys.stderr)
        return 1
    print("| scan | vertebrae | margin as stored | margin turned |")
    print("|---|---|---|---|")
    margins = {"stored": [], "turned": []}
    for name, read in images.items():
        image = read()
        row = []
        for key, version in (("stored", image), ("turned", turned_head_to_feet(image))):
            result = pipeline.label_spine(version, model=args.model, device="cpu", check_orientation=True)
            margins[key].append(result.orientation_margin)
            row.append((len(result.vertebrae), result.orientation_margin))
        shown = ["-" if m is None else f"{m:+.3f}" + (" (warns)" if m > pipeline.ORIENTATION_MARGIN else "")
                 for _, m in row]
        print(f"| {name} | {row[0][0]} / {row[1][0]} | {shown[0]} | {shown[1]} |", flush=True)
    for key, what in (("stored", "false alarms on the scans as stored"), ("turned", "catches of the turned copies")):
        checked = [m for m in margins[key] if m is not None]  # None: no vertebrae, nothing to check
        warned = sum(m > pipeline.ORIENTATION_MARGIN for m in checked)
        print(f"{what}: {warned} of {len(checked)} with vertebrae (margin {pipeline.ORIENTATION_MARGIN})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
