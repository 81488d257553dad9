"""Labelling worker run by the Slicer module in a separate process::

    python -m SpineLabelLogic.worker INPUT OUTDIR [--model CARD] [--device auto|cpu|cuda] [--check-orientation]
        [--no-spine-gate] [--modality auto|ct|mr]

It labels INPUT with :func:`SpineLabelLib.pipeline.label_spine` and writes the complete labelling (component ids,
per-level scores, fixed flags: everything corrections need, unlike the user-facing outputs) to OUTDIR with
:func:`saveResult`. Its stdout carries one JSON object per line, read by
:func:`SpineLabelLogic.process.parseWorkerLine`::

    {"event": "progress", "fraction": 0.42, "message": "network window 3/8"}
    {"event": "done", "result": "OUTDIR", "vertebrae": 17, "warnings": [...]}
    {"event": "error", "message": "..."}

Log messages go to stderr. Imports neither ``slicer`` nor Qt.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from SpineLabelLib.io import atomic_paths
from SpineLabelLib.result import Geometry, SpineLabeling, Vertebra

__all__ = ["resultDocument", "geometryOfDocument", "resultFromDocument", "saveResult", "loadResult", "main"]

log = logging.getLogger(__name__)

_RESULT_JSON = "result.json"
_COMPONENTS = "components.npy"
# the fields of SpineLabeling that go into result.json as they are (JSON types)
_PLAIN_FIELDS = tuple(f.name for f in fields(SpineLabeling) if f.name not in ("geometry", "components", "vertebrae"))


def resultDocument(result: SpineLabeling) -> dict:
    """A labelling as a JSON-serialisable dict: everything but its components (geometry, vertebrae with their level
    evidence, chain and sacral pieces, provenance), as ``result.json`` holds it."""
    document = {
        "geometry": {"size": list(result.geometry.size), "spacing": list(result.geometry.spacing),
                     "origin": list(result.geometry.origin), "direction": list(result.geometry.direction)},
        "vertebrae": [{"id": v.id, "name": v.name, "centroid_lps_mm": list(v.centroid_lps_mm), "volume_ml": v.volume_ml,
                       "confidence": v.confidence, "level_log_scores": np.asarray(v.level_log_scores, float).tolist(),
                       "confidence_log_scores": None if v.confidence_log_scores is None else
                       np.asarray(v.confidence_log_scores, float).tolist(),
                       "fixed": v.fixed} for v in result.vertebrae],
    }
    document.update((name, getattr(result, name)) for name in _PLAIN_FIELDS)
    return document


def geometryOfDocument(document: dict) -> Geometry:
    """The grid of a labelling written by :func:`resultDocument`."""
    g = document["geometry"]
    return Geometry(tuple(g["size"]), tuple(g["spacing"]), tuple(g["origin"]), tuple(g["direction"]))


def resultFromDocument(document: dict, components: np.ndarray) -> SpineLabeling:
    """The labelling of a :func:`resultDocument` with its components (int16 (z, y, x) on its grid)."""
    vertebrae = [Vertebra(id=v["id"], name=v["name"], centroid_lps_mm=tuple(v["centroid_lps_mm"]),
                          volume_ml=v["volume_ml"], confidence=v["confidence"],
                          level_log_scores=np.asarray(v["level_log_scores"], dtype=float), fixed=v["fixed"],
                          confidence_log_scores=None if v["confidence_log_scores"] is None else
                          np.asarray(v["confidence_log_scores"], dtype=float))
                 for v in document["vertebrae"]]
    return SpineLabeling(geometry=geometryOfDocument(document), components=components, vertebrae=vertebrae,
                         **{name: document[name] for name in _PLAIN_FIELDS})


def saveResult(result: SpineLabeling, folder: str | os.PathLike) -> Path:
    """Write a labelling to ``folder``: ``components.npy`` (int16 (z, y, x)) and ``result.json`` (the rest), both or
    neither (an earlier result there is never left half replaced)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(resultDocument(result))  # before anything is written: what JSON cannot hold fails here
    with atomic_paths([folder / _COMPONENTS, folder / _RESULT_JSON]) as (components, tmp):
        with open(components, "wb") as f:
            np.save(f, np.ascontiguousarray(result.components), allow_pickle=False)
        tmp.write_text(text, encoding="utf-8")
    return folder


def loadResult(folder: str | os.PathLike) -> SpineLabeling:
    """Read a labelling written by :func:`saveResult`."""
    folder = Path(folder)
    document = json.loads((folder / _RESULT_JSON).read_text(encoding="utf-8"))
    return resultFromDocument(document, np.load(folder / _COMPONENTS, allow_pickle=False))


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m SpineLabelLogic.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--check-orientation", action="store_true", help="see spinelabel label --check-orientation")
    parser.add_argument("--no-spine-gate", action="store_true", help="see spinelabel label --no-spine-gate")
    parser.add_argument("--modality", default="auto", choices=["auto", "ct", "mr"],
                        help="see spinelabel label --modality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    try:  # a failing import (a broken torch, memory running out) is reported as any other failure
        from SpineLabelLib.inference import reuse_freed_memory
        from SpineLabelLib.pipeline import label_spine, require_vertebrae

        reuse_freed_memory()
        result = label_spine(args.input, model=args.model, device=args.device,
                             check_orientation=args.check_orientation, spine_gate=not args.no_spine_gate,
                             modality=args.modality,
                             progress=lambda fraction, message: _emit(
                                 {"event": "progress", "fraction": round(float(fraction), 4), "message": message}))
        saveResult(require_vertebrae(result, args.input), args.outdir)
    except Exception as err:  # reported to the Slicer module as one event, traceback in the log
        log.exception("labelling failed")
        _emit({"event": "error", "message": str(err) or type(err).__name__})
        return 1
    _emit({"event": "done", "result": str(args.outdir), "vertebrae": len(result.vertebrae),
           "warnings": result.warnings})
    return 0


if __name__ == "__main__":
    sys.exit(main())
