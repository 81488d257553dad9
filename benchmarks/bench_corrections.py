"""Benchmark: the corrections of the Slicer layer (``SpineLabelLogic.scene.LabelingScene``, real MRML classes of
slicer-core, no application) on a large whole-spine phantom.

The phantom (default 512x512x800 at 0.8x0.8x1.0 mm, as bench_label.py) is labelled once; the labelling is shown in a
headless MRML scene and each kind of correction is timed ``--runs`` times (median; rename, lock/unlock and the
move along the spine twice a run, there and back): rename (through the markups node, as the user types),
lock/unlock, a point moved along the spine and one dropped on its neighbour, delete,
a deleted vertebra brought back by a point at its place, voxels erased in the segmentation's layer (as the Segment
Editor's eraser) followed by a rename (which reads them back), and an export to an nnU-Net dataset.

Target on a 2-core CPU machine: every correction in <= ``TARGET_S`` s (the product says "fixes the labels in
seconds"); the export writes two compressed NIfTI files and has no target. The last line says whether the targets
were met; the exit status is 1 when they were not. Needs slicer-core (PyPI).

Usage: python benchmarks/bench_corrections.py [--size X Y Z] [--spacing X Y Z] [--runs N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

# SpineLabelLogic is the Slicer module's package, beside the core and not installed with it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SpineLabel"))

TARGET_S = 3.0
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 800])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be 1 or more")

    import slicer
    from vtk.util import numpy_support

    from SpineLabelLib.phantom import make_phantom
    from SpineLabelLib.pipeline import label_spine
    from SpineLabelLib.vertebrae import LEVELS, level_index
    from SpineLabelLogic.scene import LabelingScene, addVolumeNodeFromImage, headlessScene

    t = time.perf_counter()
    image = make_phantom(modality="ct", fov="whole", size=tuple(args.size), spacing=tuple(args.spacing), seed=1).image
    result = label_spine(image, device="cpu")
    print(f"phantom {args.size} at {args.spacing} mm made and labelled ({len(result.vertebrae)} vertebrae) in "
          f"{time.perf_counter() - t:.1f} s")
    if len(result.vertebrae) < 8:
        raise SystemExit("fewer than 8 vertebrae labelled: no benchmark")

    scene, app_logic, logics = headlessScene()
    slicer.mrmlScene = scene  # as the application exposes them (slicer.util's helpers look there)
    slicer.modules = types.SimpleNamespace(**{name.lower(): types.SimpleNamespace(logic=(lambda lg=lg: lg))
                                              for name, lg in logics.items()})
    t = time.perf_counter()
    labeling = LabelingScene(addVolumeNodeFromImage(scene, image, "phantom"), result)
    print(f"scene built in {time.perf_counter() - t:.2f} s")

    points = labeling.markupsNode
    times: dict[str, list[float]] = {}

    def timed(kind: str, action) -> None:
        start = time.perf_counter()
        action()
        times.setdefault(kind, []).append(time.perf_counter() - start)
        if labeling.lastError:
            raise SystemExit(f"{kind}: {labeling.lastError}")

    def shifted(name: str, by: int) -> str:
        return LEVELS[level_index(name) + by].name

    middle = labeling.result.vertebrae[len(labeling.result.vertebrae) // 2].id
    index = labeling.pointIndexOf
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            name = labeling.result.by_id(middle).name
            timed("rename", lambda: points.SetNthControlPointLabel(index(middle), shifted(name, 1)))
            timed("rename", lambda: points.SetNthControlPointLabel(index(middle), name))
            timed("lock/unlock", lambda: points.SetNthControlPointLocked(index(middle), False))
            timed("lock/unlock", lambda: points.SetNthControlPointLocked(index(middle), True))
            centroid = np.asarray(labeling.result.by_id(middle).centroid_lps_mm)
            timed("move along the spine",
                  lambda: points.SetNthControlPointPosition(index(middle), *(LPS_TO_RAS * (centroid + [0, 0, 2.0]))))
            timed("move along the spine",
                  lambda: points.SetNthControlPointPosition(index(middle), *(LPS_TO_RAS * centroid)))
            chain = [v.id for v in labeling.result.vertebrae]
            below = labeling.result.by_id(chain[chain.index(middle) + 1])
            timed("move onto a neighbour", lambda: points.SetNthControlPointPosition(
                index(middle), *(LPS_TO_RAS * np.asarray(below.centroid_lps_mm))))
            labeling.setLocked(below.id, False)
            victim = labeling.result.by_id(chain[chain.index(middle) - 2])
            timed("delete", lambda: points.RemoveNthControlPoint(index(victim.id)))
            timed("restore a deleted one", lambda: labeling.addVertebra(victim.centroid_lps_mm))
            segmentation = labeling.segmentationNode.GetSegmentation()
            layer = segmentation.GetLayerDataObject(0)
            voxels = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(layer.GetDimensions()[::-1])
            edited = labeling.result.vertebrae[2]
            z, y, x = np.nonzero(voxels == edited.label)
            voxels[z[:200], y[:200], x[:200]] = 0  # the Segment Editor's eraser
            layer.Modified()
            name = labeling.result.by_id(middle).name
            timed("erase + rename (read-back)", lambda: points.SetNthControlPointLabel(index(middle), shifted(name, 1)))
            labeling.rename(middle, name)
            timed("export", lambda: labeling.exportCase(Path(tmp) / f"Dataset{run + 1:03d}_Spine"))
    labeling.cleanup()

    summary = {"size": args.size, "spacing_mm": args.spacing, "runs": args.runs,
               "median_s": {kind: round(float(np.median(t)), 3) for kind, t in times.items()}}
    for kind, seconds in summary["median_s"].items():
        print(f"{kind:28s} {seconds:7.3f} s (median of {len(times[kind])})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    slowest = max((s, k) for k, s in summary["median_s"].items() if k != "export")
    met = slowest[0] <= TARGET_S
    print(f"slowest correction {slowest[1]} {slowest[0]:.2f} s: target ({TARGET_S:g} s per correction) "
          f"{'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
