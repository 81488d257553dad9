"""How the orientation check (``label_spine(check_orientation=True)``) does on real scans with right and wrong headers.

Labels every real image of ``../shared/data`` (the patterns of ``spine_gate.py``, and the PAM50 T2 template) twice
with the check on: as stored, and turned head to feet with the header left unchanged (what a wrong header looks
like). Prints each scan's ``orientation_margin`` both ways and counts the warnings: a warning on a scan as stored is
a false alarm, a warning on a turned copy is a catch.

Usage (from the repository root):
    python benchmarks/orientation_check.py [--model CARD.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spine_gate import DATA, REAL_PATTERNS  # noqa: E402

from SpineLabelLib import pipeline  # noqa: E402

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
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not DATA.is_dir():
        print(f"no data at {DATA}", file=sys.stderr)
        return 1
    paths = sorted({p for pattern in REAL_PATTERNS for p in DATA.rglob(pattern)} | {DATA / TEMPLATE})
    print("| scan | vertebrae | margin as stored | margin turned |")
    print("|---|---|---|---|")
    margins = {"stored": [], "turned": []}
    for path in paths:
        image = sitk.ReadImage(str(path))
        row = []
        for key, version in (("stored", image), ("turned", turned_head_to_feet(image))):
            result = pipeline.label_spine(version, model=args.model, device="cpu", check_orientation=True)
            margins[key].append(result.orientation_margin)
            row.append((len(result.vertebrae), result.orientation_margin))
        shown = ["-" if m is None else f"{m:+.3f}" + (" (warns)" if m > pipeline.ORIENTATION_MARGIN else "")
                 for _, m in row]
        print(f"| {path.relative_to(DATA)} | {row[0][0]} / {row[1][0]} | {shown[0]} | {shown[1]} |", flush=True)
    for key, what in (("stored", "false alarms on the scans as stored"), ("turned", "catches of the turned copies")):
        checked = [m for m in margins[key] if m is not None]  # None: no vertebrae, nothing to check
        warned = sum(m > pipeline.ORIENTATION_MARGIN for m in checked)
        print(f"{what}: {warned} of {len(checked)} with vertebrae (margin {pipeline.ORIENTATION_MARGIN})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
