"""Shared fixtures: a synthetic labelled spine (no network needed), a slicer-core MRML scene with its logics, and
the process's locale put back after each test."""

from __future__ import annotations

import locale
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SpineLabelLib.result import Geometry, SpineLabeling, Vertebra
from SpineLabelLib.sequence import relabel
from SpineLabelLib.vertebrae import LEVELS, level_index

# the real scans (read-only), beside the repository; tests that need them skip when it is absent
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPACING_MM = 1.5
PITCH_MM = 30.0  # centroid distance between consecutive vertebrae
BODY_MM = (40.0, 30.0, 24.0)  # body extent along L, P, S
BONE = 400.0


@dataclass
class SyntheticSpine:
    """A straight spine of box-shaped vertebral bodies.

    Attributes:
        result: the labelling (names solved from peaked level scores); vertebrae listed in ``missing`` have
            bodies in the image but no component or record.
        image: float32 image, identity direction (voxel axes along L, P, S), ``SPACING_MM`` voxels.
        bodies: level name -> bool (z, y, x) mask of that body in the image.
    """

    result: SpineLabeling
    image: sitk.Image
    bodies: dict[str, np.ndarray]


def _level_scores(name: str) -> np.ndarray:
    """Log-scores (len(LEVELS),) peaked at ``name``, -0.5 at its regular neighbours, -4 elsewhere."""
    regular = [i for i, level in enumerate(LEVELS) if not level.transitional]
    rank = regular.index(level_index(name))
    scores = np.full(len(LEVELS), -4.0)
    for r in (rank - 1, rank + 1):
        if 0 <= r < len(regular):
            scores[regular[r]] = -0.5
    scores[regular[rank]] = 0.0
    return scores


def build_spine(names=("T11", "T12", "L1", "L2", "L3", "L4"), missing=(), seed: int = 0) -> SyntheticSpine:
    """Image and labelling of ``names`` (cranial first), without components for ``missing``."""
    n = len(names)
    size = (40, 40, int(round((n * PITCH_MM + 20.0) / SPACING_MM)))  # (x, y, z)
    image_zyx = np.random.default_rng(seed).normal(0.0, 10.0, size[::-1]).astype(np.float32)
    components = np.zeros(size[::-1], dtype=np.int16)
    geometry = Geometry(size, (SPACING_MM,) * 3, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    zz, yy, xx = np.indices(size[::-1], dtype=float) * SPACING_MM
    vertebrae, bodies = [], {}
    for k, name in enumerate(names):
        centre = np.array([size[0] * SPACING_MM / 2, size[1] * SPACING_MM / 2, 10.0 + (n - 1 - k + 0.5) * PITCH_MM])
        body = ((np.abs(xx - centre[0]) <= BODY_MM[0] / 2) & (np.abs(yy - centre[1]) <= BODY_MM[1] / 2)
                & (np.abs(zz - centre[2]) <= BODY_MM[2] / 2))
        image_zyx[body] += BONE
        bodies[name] = body
        if name in missing:
            continue
        vid = k + 1
        components[body] = vid
        vertebrae.append(Vertebra(vid, name, tuple(float(c) for c in centre),
                                  float(body.sum() * SPACING_MM**3 / 1000.0), 0.0, _level_scores(name)))
    image = sitk.GetImageFromArray(image_zyx)
    image.SetSpacing(geometry.spacing)
    centroids = np.array([v.centroid_lps_mm for v in vertebrae])
    gaps = np.linalg.norm(np.diff(centroids, axis=0), axis=1).tolist()
    result = SpineLabeling(geometry, components, vertebrae, gaps_mm=gaps, model={"name": "synthetic", "version": "0"},
                           source="synthetic", modality="CT")
    return SyntheticSpine(relabel(result, {}), image, bodies)


@pytest.fixture(autouse=True)
def _locale_put_back():
    """Writing a DICOM file with SimpleITK (ITK's GDCM image IO) sets the whole process to the C locale, and Python's
    default text encoding (that of ``subprocess.run(..., text=True)``) follows it: under a UTF-8 locale (not Python's
    UTF-8 mode), a later test that read a child's output naming a non-ASCII path failed ('ascii' codec can't decode)."""
    before = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, before)


@pytest.fixture
def spine() -> SyntheticSpine:
    """T11-L4, all found."""
    return build_spine()


@pytest.fixture
def mrml(monkeypatch):
    """A fresh MRML scene with the application logic and the module logics SpineLabelLogic uses, exposed as
    ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` the way the Slicer application exposes them."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
    from SpineLabelLogic.scene import headlessScene

    scene, app_logic, by_module = headlessScene()
    logics = {name.lower(): logic for name, logic in by_module.items()}
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        **{key: types.SimpleNamespace(logic=(lambda lg=lg: lg)) for key, lg in logics.items()}), raising=False)
    yield types.SimpleNamespace(scene=scene, app_logic=app_logic, **logics)
    scene.Clear(True)
