"""Benchmark: end-to-end ``spinelabel label`` on a large whole-spine phantom, and ``relabel`` for 26 vertebrae.

Targets on a 2-core CPU machine: labelling a 512x512x800 phantom at 0.8x0.8x1.0 mm in <= 20 s with <= 3 GB peak
memory (stretch: 10 s / 2 GB); one ``relabel`` of 26 vertebrae in < 50 ms.

Usage: python benchmarks/bench_label.py [--size X Y Z] [--spacing X Y Z] [--runs N] [--device cpu|cuda|auto] [--json OUT]

The last line says whether the median run (by wall time; an even number of runs takes the slower of the middle two)
met the targets; the exit status is 1 when it did not, or when a run labelled fewer than ``MIN_VERTEBRAE`` of the
phantom's 25 vertebrae (a labelling that stops early is no benchmark). Memory is in GB of 10^9 bytes, the peak
resident set of the labelling process (``ru_maxrss``: kB of 1024 bytes, on macOS bytes); the script once printed GiB as
GB, figures 6.9 % below GB (benchmarks/RESULTS.md says which those are).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


TARGET_S, TARGET_GB = 20.0, 3.0
STRETCH_S, STRETCH_GB = 10.0, 2.0
MIN_VERTEBRAE = 20


def label_once(image: Path, out: Path, device: str) -> tuple[float, float, dict]:
    """Wall seconds and peak RSS (GB) of one ``spinelabel label`` process, and the stage timings from its report."""
    code = ("import resource, sys; from SpineLabelLib.cli import main; "
            f"rc = main(['label', {str(image)!r}, '-o', {str(out)!r}, '--quiet', '--device', {device!r}]); "
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024); "
            "print('peak_bytes', peak, file=sys.stderr); sys.exit(rc)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"spinelabel label failed (exit status {done.returncode}):\n{done.stderr}")
    peak_bytes = int(done.stderr.split("peak_bytes")[-1].split()[0])
    report = json.loads(next(out.glob("*_report.json")).read_text())
    return wall, peak_bytes / 1e9, report


def relabel_time(runs: int = 200) -> float:
    """Median seconds of one relabel of a 26-vertebra chain with one fixed label."""
    from SpineLabelLib.result import Geometry, SpineLabeling, Vertebra
    from SpineLabelLib.sequence import relabel
    from SpineLabelLib.vertebrae import LEVELS

    rng = np.random.default_rng(0)
    names = [lv.name for lv in LEVELS if lv.name != "L6"]  # 26 vertebrae: C1 to S1 with a T13
    vertebrae = [Vertebra(i + 1, n, (0.0, 0.0, -25.0 * i), 30.0, 0.9, rng.normal(size=len(LEVELS)))
                 for i, n in enumerate(names)]
    result = SpineLabeling(Geometry((2, 2, 2), (1.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                           np.zeros((2, 2, 2), np.int16), vertebrae, gaps_mm=[25.0] * 25)
    times = []
    for i in range(runs):
        start = time.perf_counter()
        relabel(result, {1 + i % 26: names[i % 26]})
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 800])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 1.0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (the targets' machine), cuda or auto; peak memory is "
                        "the process's RSS, not the GPU's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be 1 or more")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "bench.nrrd"
        t = time.perf_counter()
        # made in a child process: a large parent would inflate the children's peak RSS (fork copies its pages)
        make = ("import SimpleITK as sitk; from SpineLabelLib.phantom import make_phantom; "
                f"p = make_phantom(modality='ct', fov='whole', size={tuple(args.size)}, spacing={tuple(args.spacing)}, seed=1); "
                f"sitk.WriteImage(p.image, {str(image)!r}, useCompression=False)")
        subprocess.run([sys.executable, "-c", make], check=True)
        print(f"phantom {args.size} at {args.spacing} mm written in {time.perf_counter() - t:.1f} s")
        results = []
        for run in range(args.runs):
            out = tmp / f"out{run}"
            wall, peak_gb, report = label_once(image, out, args.device)
            results.append({"wall_s": round(wall, 2), "peak_rss_gb": round(peak_gb, 2),
                            "stages_s": report["timings_s"], "vertebrae": len(report["vertebrae"])})
            print(f"run {run + 1}: {wall:.1f} s wall, {peak_gb:.2f} GB peak RSS, {len(report['vertebrae'])} vertebrae, "
                  f"stages {report['timings_s']}")
    relabel_s = relabel_time()
    print(f"relabel, 26 vertebrae: {relabel_s * 1000:.1f} ms (median of 200)")
    summary = {"size": args.size, "spacing_mm": args.spacing, "runs": results, "relabel_26_ms": round(relabel_s * 1000, 2)}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    median = sorted(results, key=lambda r: r["wall_s"])[len(results) // 2]  # one run: its time and its memory
    wall, peak = median["wall_s"], median["peak_rss_gb"]
    fewest = min(r["vertebrae"] for r in results)
    met = wall <= TARGET_S and peak <= TARGET_GB and fewest >= MIN_VERTEBRAE
    print(f"median {wall:.1f} s, {peak:.2f} GB, fewest vertebrae {fewest}: targets ({TARGET_S:g} s, {TARGET_GB:g} GB, "
          f"{MIN_VERTEBRAE} vertebrae) {'met' if met else 'MISSED'}; stretch ({STRETCH_S:g} s, {STRETCH_GB:g} GB) "
          f"{'met' if met and wall <= STRETCH_S and peak <= STRETCH_GB else 'missed'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
