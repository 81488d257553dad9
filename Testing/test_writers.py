"""Tests of the output writers, each file read back by an independent reader (SimpleITK, slicerio, slicer-core)."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import threading
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import DATA, build_spine
from SpineLabelLib import __version__, io, writers
from SpineLabelLib.result import Geometry, SpineLabeling, Vertebra, nonzero_box
from SpineLabelLib.sequence import confidence_text
from SpineLabelLib.vertebrae import BY_NAME, LEVELS, TERMINOLOGY_CONTEXT


# Column c = LPS direction of voxel axis c.
PERMUTED = np.array([[0, 0, -1], [-1, 0, 0], [0, -1, 0]], dtype=float)  # i -> A, j -> I, k -> R ("AIR")
IDENTITY = np.eye(3)  # i -> L, j -> P, k -> S ("LPS")
_C, _S = np.cos(np.radians(20)), np.sin(np.radians(20))
# 20 degrees about L-R, then 20 degrees about S-I, with j flipped: an oblique, left-handed grid (about "LAS")
OBLIQUE = (np.array([[_C, -_S, 0], [_S, _C, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, _C, -_S], [0, _S, _C]])
           @ np.diag([1, -1, 1]))
NAMES = ("T12", "L1", "L2", "L3")
IDS = (3, 1, 2, 5)  # component ids need not follow chain order


def make_case(direction: np.ndarray, intensity: str = "noise", names=NAMES, ids=IDS) -> tuple[SpineLabeling, sitk.Image]:
    """Box-shaped vertebrae stacked cranio-caudally along the voxel axis closest to S-I.

    Grid (i, j, k) = (40, 60, 40) with the long axis mapped onto S-I; L1 is shifted posteriorly.
    """
    si_axis = int(np.argmax(np.abs(direction[2])))
    sign_s = np.sign(direction[2, si_axis])
    ap_axis = int(np.argmax(np.abs(direction[1])))
    sign_p = np.sign(direction[1, ap_axis])
    size = [40, 40, 40]
    size[si_axis] = 60
    spacing = [1.0, 1.2, 1.1]
    spacing[si_axis] = 1.5
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(direction.ravel().tolist())
    geometry = Geometry.of(image)
    components_ijk = np.zeros(size, dtype=np.int16)
    rng = np.random.default_rng(0)
    values_ijk = rng.normal(0, 50, size) if intensity == "noise" else np.zeros(size)  # bodies are +400
    vertebrae = []
    for n, (vid, name) in enumerate(zip(ids, names)):
        lo = [12, 12, 12]
        hi = [28, 28, 28]
        # n-th from the top: superior first
        top = 5 + n * 13
        lo[si_axis], hi[si_axis] = (top, top + 10) if sign_s < 0 else (60 - top - 10, 60 - top)
        if name == "L1":  # shifted posteriorly by 8 voxels
            shift = 8 if sign_p > 0 else -8
            lo[ap_axis] += shift
            hi[ap_axis] += shift
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        components_ijk[box] = vid
        values_ijk[box] += 400
        centre = (np.array(lo) + np.array(hi) - 1) / 2.0
        vertebrae.append(Vertebra(vid, name, tuple(geometry.index_to_lps(centre)), 1.0 + n,
                                  0.9 - 0.1 * n, np.zeros(len(LEVELS)), fixed=(name == "L1")))
    components = np.ascontiguousarray(components_ijk.transpose(2, 1, 0))
    filled = sitk.GetImageFromArray(np.ascontiguousarray(values_ijk.transpose(2, 1, 0)).astype(np.int16))
    filled.CopyInformation(image)
    result = SpineLabeling(geometry, components, vertebrae, gaps_mm=[19.5] * (len(vertebrae) - 1),
                           warnings=["no sacrum found"], model={"name": "test", "version": "0"},
                           timings_s={"network": 1.5}, source="/data/case.nii.gz", modality="CT",
                           spine_probability=0.9)
    return result, filled


@pytest.fixture(params=["permuted", "identity", "oblique"])
def case(request):
    return make_case({"permuted": PERMUTED, "identity": IDENTITY, "oblique": OBLIQUE}[request.param])


def ijk_to_lps_matrix(geometry: Geometry) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(geometry.direction).reshape(3, 3) * np.asarray(geometry.spacing)
    m[:3, 3] = geometry.origin
    return m


def test_label_map_on_input_grid(case, tmp_path):
    result, image = case
    path = tmp_path / "c_seg.nii.gz"
    writers.write_label_map(result, path)
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    values = sitk.GetArrayFromImage(back)
    np.testing.assert_array_equal(values, result.label_map())
    assert sorted(np.unique(values).tolist()) == [0] + sorted(BY_NAME[n].label for n in NAMES)
    assert [p.name for p in tmp_path.iterdir()] == ["c_seg.nii.gz"]
    header = nibabel.load(path).header  # both forms give the grid, for readers that take only one of them
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)


def test_the_label_map_is_filled_slab_by_slab(monkeypatch):
    """label_map fills its box a few planes at a time (16 MB of labels on a scan); every plane is filled, the last
    one of a box whose planes do not divide into whole slabs too."""
    monkeypatch.setattr("SpineLabelLib.result._ON_DEMAND_BYTES", 8)  # 2 planes of the 2 x 2 box a slab: 3 slabs for 5
    components = np.zeros((7, 4, 4), np.int16)
    components[1:6, 1:3, 1:3] = 1
    components[4:6, 1:3, 1:3] = 2
    geometry = Geometry((4, 4, 7), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    result = SpineLabeling(geometry, components, [Vertebra(1, "L4", (1.5, 1.5, 2.0), 1.0, 1.0, np.zeros(len(LEVELS))),
                                                 Vertebra(2, "L5", (1.5, 1.5, 4.5), 1.0, 1.0, np.zeros(len(LEVELS)))])
    lut = np.array([0, BY_NAME["L4"].label, BY_NAME["L5"].label], np.uint8)
    np.testing.assert_array_equal(result.label_map(), lut[components])


def test_segmentation_read_by_slicerio(case, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    result, _ = case
    path = tmp_path / "c.seg.nrrd"
    writers.write_segmentation(result, path)
    seg = slicerio.read_segmentation(str(path))
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert seg["containedRepresentationNames"] == ["Binary labelmap"]
    assert seg["referenceImageExtentOffset"] == [0, 0, 0]
    np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps_matrix(result.geometry), atol=1e-6)
    np.testing.assert_array_equal(seg["voxels"], result.label_map().transpose(2, 1, 0))  # slicerio: (i, j, k)
    assert [s["id"] for s in seg["segments"]] == list(NAMES)
    for s, v in zip(seg["segments"], result.vertebrae):
        level = BY_NAME[v.name]
        assert s["name"] == v.name and not s["nameAutoGenerated"] and not s["colorAutoGenerated"]
        assert s["labelValue"] == level.label and s["layer"] == 0
        np.testing.assert_allclose(s["color"], level.colour, atol=1e-4)
        assert s["terminology"]["contextName"] == TERMINOLOGY_CONTEXT  # the context the module loads into Slicer
        assert s["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
        assert s["terminology"]["type"] == ["SCT", level.snomed_code, level.snomed_meaning]
        ijk = np.argwhere(seg["voxels"] == level.label)
        assert s["extent"] == [int(x) for pair in zip(ijk.min(0), ijk.max(0)) for x in pair]
    assert seg["segments"][1]["terminology"]["type"] == ["SCT", "66794005", "L1 vertebra"]


# colour vision deficiencies at severity 1 as matrices on linear RGB (Machado, Oliveira and Fernandes 2009)
DEFICIENT_VISION = {
    "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
}


def test_vertebrae_up_to_two_levels_apart_never_look_alike():
    """Two nearby vertebrae in similar colours read as one bone in the segmentation, the snapshot and Slicer's views
    (posterior elements reach the next level): levels up to two apart, with and without the transitional T13 and L6,
    differ by a CIEDE2000 difference of 17 or more (as ``vertebrae.py`` says), by 9.5 or more for a reader without one
    kind of cone (8 % of men lack a red or green one), and by 7 or more as the half-opaque fill over mid grey of a
    slice view, for every one of them; no two regular levels share a colour."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    def seen(colour, vision: str, grey: float | None) -> np.ndarray:
        c = np.asarray(colour, dtype=float)
        if grey is not None:
            c = 0.5 * c + 0.5 * grey
        linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        if vision != "normal":
            linear = np.clip(linear @ np.asarray(DEFICIENT_VISION[vision]).T, 0.0, 1.0)
        return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)

    def difference(a, b, vision: str, grey: float | None = None) -> float:
        return float(deltaE_ciede2000(rgb2lab(seen(a.colour, vision, grey)[None, None]),
                                      rgb2lab(seen(b.colour, vision, grey)[None, None]))[0, 0])

    regular = [level for level in LEVELS if not level.transitional]
    near = {}  # (name, name) -> the two levels
    for chain in (list(LEVELS), regular, [lv for lv in LEVELS if lv.name != "L6"],
                  [lv for lv in LEVELS if lv.name != "T13"]):
        near.update({(a.name, b.name): (a, b) for step in (1, 2) for a, b in zip(chain, chain[step:])})
    for vision, least in (("normal", 17), *((name, 9.5) for name in DEFICIENT_VISION)):
        for names, (a, b) in near.items():
            assert difference(a, b, vision) >= least, (vision, names)
            assert difference(a, b, vision, grey=0.5) >= 7, (vision, "fill", names)
    assert len({level.colour for level in regular}) == len(regular)


def test_segmentation_duplicate_level_is_one_segment(tmp_path, caplog):
    slicerio = pytest.importorskip("slicerio")
    result, _ = make_case(PERMUTED, names=("L1", "L2", "L2", "L3"))
    writers.write_segmentation(result, tmp_path / "d.seg.nrrd")
    seg = slicerio.read_segmentation(str(tmp_path / "d.seg.nrrd"))
    assert [s["id"] for s in seg["segments"]] == ["L1", "L2", "L3"]
    assert "share one segment" in caplog.text


def test_a_labelling_that_files_cannot_hold_is_refused_naming_what(tmp_path):
    """A NaN centroid got JSON's own message, naming neither the vertebra nor the file; float components were
    indexed as ids, and a negative id labelled its voxels from the end of the table (as L5, say)."""
    result, image = make_case(PERMUTED)
    result.vertebrae[1].centroid_lps_mm = (float("nan"), 0.0, 0.0)
    with pytest.raises(ValueError, match=rf"vertebrae \[{IDS[1]}\]: a centroid is three finite numbers"):
        writers.write_all(result, image, tmp_path, "case")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="components: an integer array of vertebra ids, not float32"):
        result.copy(components=result.components.astype(np.float32))
    negative = result.components.astype(np.int16)
    negative[negative == IDS[0]] = -1
    with pytest.raises(ValueError, match="vertebra ids are 0 or more, not -1"):
        result.copy(components=negative).label_map()


def test_grid_mismatch_is_refused(tmp_path):
    result, _ = make_case(PERMUTED)
    result.components = result.components[:-1]
    with pytest.raises(ValueError, match="shape"):
        writers.write_label_map(result, tmp_path / "x_seg.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_an_image_off_the_labellings_grid_or_a_misleading_extension_is_refused(tmp_path):
    """A snapshot of another grid (here the same voxels mirrored) would draw the labels on the wrong anatomy; a
    segmentation named .seg.nii.gz would hold NRRD that no NIfTI reader opens."""
    result, image = make_case(PERMUTED)
    mirrored = sitk.Flip(image, [True, False, False], flipAboutOrigin=False)
    mirrored.CopyInformation(image)
    mirrored.SetDirection((-np.reshape(image.GetDirection(), (3, 3)) @ np.diag([1, -1, -1])).ravel().tolist())
    with pytest.raises(ValueError, match="not on the grid it was labelled on .*: axis directions .* against the "
                                         "labelling's"):
        writers.write_all(result, mirrored, tmp_path, "case")
    with pytest.raises(ValueError, match="seg.nii.gz: a 3D Slicer segmentation is written as .seg.nrrd"):
        writers.write_segmentation(result, tmp_path / "x.seg.nii.gz")
    with pytest.raises(ValueError, match="a NIfTI label map is written as .nii.gz or .nii"):
        writers.write_label_map(result, tmp_path / "x_seg.nrrd")
    for write, path, what in ((writers.write_markups, "x.json", "3D Slicer markups file is written as .mrk.json"),
                              (writers.write_centroids, "x_ctd.nii.gz", "centroid file is written as .json"),
                              (writers.write_report, "x_report.txt", "report is written as .json")):
        with pytest.raises(ValueError, match=f"{path}: a {what}"):
            write(result, tmp_path / path)
    with pytest.raises(ValueError, match="x.jpg: a snapshot is written as .png"):  # it wrote PNG bytes there
        writers.write_snapshot(result, image, tmp_path / "x.jpg")
    assert list(tmp_path.iterdir()) == []
    writers.write_label_map(result, tmp_path / "x_seg.Nii.Gz")  # any case: nibabel once wrote it under another name
    assert [p.name for p in tmp_path.iterdir()] == ["x_seg.Nii.Gz"]
    written = (tmp_path / "x_seg.Nii.Gz").rename(tmp_path / "x_seg.nii.gz")  # for ITK, which reads lower case only
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))), result.label_map())


def test_markups_positions(case, tmp_path):
    result, _ = case
    path = tmp_path / "c.mrk.json"
    writers.write_markups(result, path)
    doc = json.loads(path.read_text())
    assert doc["@schema"].endswith("markups-schema-v1.0.3.json#")
    (markup,) = doc["markups"]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    points = markup["controlPoints"]
    assert [p["label"] for p in points] == list(NAMES)
    assert [p["id"] for p in points] == [str(i) for i in IDS]
    assert [p["locked"] for p in points] == [v.fixed for v in result.vertebrae]
    for p, v in zip(points, result.vertebrae):
        np.testing.assert_allclose(p["position"], v.centroid_lps_mm)
        assert p["description"] == f"confidence {confidence_text(v.confidence)}"
    result.vertebrae[0].confidence = 0.9899  # below the 'uncertain' cut: not shown as 0.99
    writers.write_markups(result, path)
    assert json.loads(path.read_text())["markups"][0]["controlPoints"][0]["description"] == "confidence 0.98"


def test_slicer_core_reads_segmentation_and_markups(mrml, tmp_path):
    scene = mrml.scene
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    result, image = make_case(PERMUTED)
    paths = writers.write_all(result, image, tmp_path, "c")

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(paths[1]))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == list(NAMES)
    label_map = result.label_map()
    ras_from_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    for name in NAMES:
        segment = segmentation.GetSegment(name)
        level = BY_NAME[name]
        assert segment.GetName() == name and segment.GetLabelValue() == level.label
        np.testing.assert_allclose(segment.GetColor(), level.colour, atol=1e-4)
        assert f"SCT^{level.snomed_code}^{level.snomed_meaning}" in segment.GetTerminology()
        labelmap = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(to_world, ras_from_lps @ ijk_to_lps_matrix(result.geometry), atol=1e-5)
        voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars())
        assert (voxels == level.label).sum() == (label_map == level.label).sum()

    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    markups_storage = scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
    markups_storage.SetFileName(str(paths[2]))
    assert markups_storage.ReadData(markups) == 1
    assert markups.GetNumberOfControlPoints() == len(NAMES)
    for i, v in enumerate(result.vertebrae):
        position = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPosition(i, position)
        np.testing.assert_allclose(position, np.array(v.centroid_lps_mm) * [-1, -1, 1], atol=1e-6)  # RAS
        assert markups.GetNthControlPointLabel(i) == v.name
        assert bool(markups.GetNthControlPointLocked(i)) == v.fixed
    added = markups.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), "new")  # Slicer numbers it past the file's last
    assert markups.GetNthControlPointID(added) not in {str(i) for i in IDS}


def test_centroids_round_trip_through_reoriented_image(case, tmp_path):
    result, image = case
    path = tmp_path / "c_ctd.json"
    writers.write_centroids(result, path)
    doc = json.loads(path.read_text())
    assert doc[0] == {"direction": ["P", "I", "R"]}
    pir = sitk.DICOMOrient(image, "PIR")
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(pir.GetDirection()) == "PIR"
    for entry, v in zip(doc[1:], result.vertebrae):
        assert entry["label"] == v.label and entry["name"] == v.name
        lps = pir.TransformContinuousIndexToPhysicalPoint((entry["X"], entry["Y"], entry["Z"]))
        np.testing.assert_allclose(lps, v.centroid_lps_mm, atol=0.02)
        np.testing.assert_allclose(entry["world_lps_mm"], v.centroid_lps_mm, atol=1e-3)
    # superior to inferior: Y (toward I) grows down the chain
    assert [e["Y"] for e in doc[1:]] == sorted(e["Y"] for e in doc[1:])


def test_centroid_convention_matches_verse_file():
    folder = DATA / "ct_verse"
    if not (folder / "sub-verse014_seg-vert_msk.nii.gz").exists():
        pytest.skip(f"real VerSe data not found at {folder}")
    reference = json.loads((folder / "sub-verse014_seg-vb_ctd.json").read_text())
    assert reference[0]["direction"] == list(writers.VERSE_DIRECTION)
    # Move the mask off its PIR grid so the conversion has to permute and flip axes.
    mask = sitk.DICOMOrient(sitk.ReadImage(str(folder / "sub-verse014_seg-vert_msk.nii.gz")), "LAS")
    geometry = Geometry.of(mask)
    values = sitk.GetArrayFromImage(mask)
    for entry in reference[1:]:
        kji = np.argwhere(values == entry["label"]).mean(axis=0)
        lps = geometry.index_to_lps(kji[::-1])
        x, y, z = writers.verse_voxel_coordinates(geometry, lps)
        # whole-vertebra centroid vs body centroid: posterior elements pull X (toward P) by up to ~12 voxels
        assert abs(x - entry["X"]) < 15 and abs(y - entry["Y"]) < 8 and abs(z - entry["Z"]) < 3, (entry, x, y, z)


def test_report(case, tmp_path):
    result, _ = case
    path = tmp_path / "c_report.json"
    writers.write_report(result, path, input_path="/in/c.nii.gz")
    doc = json.loads(path.read_text())
    assert doc["input"] == {"path": "/in/c.nii.gz", **result.geometry.as_dict(), "modality": "CT"}
    assert doc["model"] == {"name": "test", "version": "0"}
    assert doc["spinelabel_version"] == __version__
    assert doc["warnings"] == ["no sacrum found"] and doc["timings_s"] == {"network": 1.5}
    assert doc["spine_probability"] == 0.9 and doc["orientation_margin"] is None
    assert doc["gaps_mm"] == pytest.approx(result.gaps_mm)
    assert [v["name"] for v in doc["vertebrae"]] == list(NAMES)
    first = doc["vertebrae"][0]
    assert set(first) == {"id", "name", "label", "centroid_lps_mm", "volume_ml", "confidence", "fixed"}
    assert first["id"] == IDS[0] and first["label"] == BY_NAME[NAMES[0]].label
    # what the user reads off each vertebra is the labelling's own: how sure the chain is, and whether they locked it
    # (the case's confidences fall from 0.9 down the chain; L1 alone is fixed)
    for entry, v in zip(doc["vertebrae"], result.vertebrae):
        assert entry["confidence"] == pytest.approx(v.confidence) and entry["fixed"] is v.fixed
        assert entry["volume_ml"] == pytest.approx(v.volume_ml)
        np.testing.assert_allclose(entry["centroid_lps_mm"], v.centroid_lps_mm)
    assert [e["fixed"] for e in doc["vertebrae"]] == [False, True, False, False]
    assert len({e["confidence"] for e in doc["vertebrae"]}) == len(NAMES)
    writers.write_report(result, path)
    assert json.loads(path.read_text())["input"]["path"] == "/data/case.nii.gz"
    writers.write_report(result, path, input_path="in/case.nii.gz")  # as typed: found again from any folder
    assert json.loads(path.read_text())["input"]["path"] == str(Path.cwd() / "in" / "case.nii.gz")


def test_snapshot_size(tmp_path):
    result, image = make_case(PERMUTED)
    path = tmp_path / "c_snapshot.png"
    writers.write_snapshot(result, image, path)
    png = Image.open(path)
    png.load()
    # S-I 60 x 1.5 = 90 mm is the longer side -> 256 px; sagittal A-P 40 mm -> 114 px; coronal R-L 44 mm -> 125 px,
    # which a level name written right of a vertebra near its edge widens by a margin of 5 px
    assert png.size == (114 + 4 + 125 + 5, 256)


def _pixels_of(panel: np.ndarray, colour) -> np.ndarray:
    """Pixels showing ``colour`` at alpha 0.4 over bone (window top, white) in an (H, W, 3) uint8 view."""
    overlay = np.round(255 * (0.6 + 0.4 * np.asarray(colour)))
    return np.argwhere(np.abs(panel.astype(float) - overlay).max(axis=2) <= 1)


@pytest.mark.parametrize("direction", [PERMUTED, IDENTITY], ids=["permuted", "identity"])
def test_snapshot_orientation(direction, tmp_path):
    result, image = make_case(direction, intensity="zero")
    path = tmp_path / "c_snapshot.png"
    writers.write_snapshot(result, image, path)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    sagittal = rgb[:, : rgb.shape[1] // 2]
    rows = {name: _pixels_of(sagittal, BY_NAME[name].colour) for name in NAMES}
    assert all(len(r) > 100 for r in rows.values())
    centre_rows = [rows[name][:, 0].mean() for name in NAMES]
    assert centre_rows == sorted(centre_rows)  # superior at the top
    # L1 lies posterior of T12: further right in the sagittal view (anterior on the left)
    assert rows["L1"][:, 1].mean() > rows["T12"][:, 1].mean() + 5


def test_snapshot_without_vertebrae(tmp_path):
    result, image = make_case(PERMUTED, names=(), ids=())
    path = tmp_path / "e_snapshot.png"
    writers.write_snapshot(result, image, path)
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert rgb.shape[:2] == (256, 243)
    yellow = (rgb[:, :, 0] > 200) & (rgb[:, :, 1] > 200) & (rgb[:, :, 2] < 80)
    assert yellow.sum() > 20  # the "no vertebrae found" note


def test_write_all(tmp_path):
    result, image = make_case(PERMUTED)
    outdir = tmp_path / "new" / "out"
    paths = writers.write_all(result, image, outdir, "case", input_path="/in/case.nii.gz")
    assert paths == [outdir / f"case{s}" for s in writers.OUTPUT_SUFFIXES]
    assert sorted(p.name for p in outdir.iterdir()) == sorted(p.name for p in paths)
    assert json.loads(paths[4].read_text())["input"]["path"] == "/in/case.nii.gz"
    assert all(p.stat().st_size > 0 for p in paths)
    assert writers.write_all(result, image, outdir, "case") == paths  # an earlier run's outputs, with its report
    theirs = outdir / "other_seg.nii.gz"  # a reference mask named as an output, beside its scan
    theirs.write_bytes(b"reference")
    with pytest.raises(FileExistsError, match="other_seg.nii.gz would be replaced, and it is no output of an earlier"):
        writers.write_all(result, image, outdir, "other")
    assert theirs.read_bytes() == b"reference" and not (outdir / "other_report.json").exists()


@pytest.mark.parametrize("failing, output", [("_write_label_map_to", 0), ("_centroid_document", 3),
                                             ("_write_snapshot_to", 5)])


def test_write_all_leaves_nothing_on_failure_and_names_the_output(failing, output, tmp_path, monkeypatch):
    result, image = make_case(PERMUTED)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")  # as SimpleITK reports a failed write

    monkeypatch.setattr(writers, failing, broken)
    final = writers.output_paths(tmp_path, "case")[output]
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(final))}: disk on fire"):
        writers.write_all(result, image, tmp_path, "case")
    assert list(tmp_path.iterdir()) == []


def test_write_all_takes_a_4d_image_of_one_time_point_and_refuses_a_name_with_folders(tmp_path, monkeypatch):
    """label_spine reads a 4D image of one time point as its volume, so the writers take it too (they refused its
    grid); an empty name wrote hidden files (.mrk.json), and a failed write left the folder it had made."""
    result, image = make_case(PERMUTED)
    four = sitk.JoinSeries([image])
    assert four.GetDimension() == 4
    assert len(writers.write_all(result, four, tmp_path / "four", "case")) == len(writers.OUTPUT_SUFFIXES)
    for name in ("", ".", "..", "a/b"):
        with pytest.raises(ValueError, match=f"case name {re.escape(repr(name))}: the start of a file name"):
            writers.write_all(result, image, tmp_path / "named", name)
    monkeypatch.setattr(writers, "_write_snapshot_to", lambda *args: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError, match="disk full"):
        writers.write_all(result, image, tmp_path / "new" / "out", "case")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four"]


def test_a_case_name_whose_outputs_fit_the_file_system_is_written(tmp_path):
    """The temporaries' names do not grow with the case name (they were 14 bytes longer than the outputs')."""
    result, image = make_case(PERMUTED)
    name = "c" * (255 - max(len(s) for s in writers.OUTPUT_SUFFIXES))
    paths = writers.write_all(result, image, tmp_path, name)
    assert sorted(tmp_path.iterdir()) == sorted(paths)


def test_write_all_keeps_earlier_outputs_on_failure(tmp_path, monkeypatch):
    result, image = make_case(PERMUTED)
    paths = writers.write_all(result, image, tmp_path, "case")
    before = {p: p.read_bytes() for p in paths}
    monkeypatch.setattr(writers, "_write_snapshot_to", lambda *a: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError, match="full"):
        writers.write_all(result, image, tmp_path, "case")
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_write_all_unwritable_outdir(tmp_path):
    result, image = make_case(PERMUTED)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    outdir = blocker / "sub"
    with pytest.raises(OSError, match=str(outdir)):
        writers.write_all(result, image, outdir, "case")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_single_writer_is_atomic(tmp_path, monkeypatch):
    result, _ = make_case(PERMUTED)
    path = tmp_path / "c_seg.nii.gz"
    writers.write_label_map(result, path)
    before = path.read_bytes()
    monkeypatch.setattr(nibabel, "save", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        writers.write_label_map(result, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c_seg.nii.gz"]


def test_write_all_removes_renamed_outputs_when_a_rename_fails(tmp_path, monkeypatch):
    import os

    result, image = make_case(PERMUTED)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        writers.write_all(result, image, tmp_path, "case")
    assert len(calls) >= 3 and list(tmp_path.iterdir()) == []


def test_write_all_read_only_outdir(tmp_path, monkeypatch):
    """A folder the user may not write to (simulated: the tests run as root, which may write anywhere)."""
    result, image = make_case(PERMUTED)
    exact = tempfile.TemporaryFile

    def denied(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return exact(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    with pytest.raises(PermissionError, match=f"output folder {tmp_path}: Permission denied"):
        writers.write_all(result, image, tmp_path, "case")
    assert list(tmp_path.iterdir()) == []


def test_nonzero_box_is_the_smallest_box_around_every_labelled_voxel():
    labels = np.zeros((20, 30, 40), dtype=np.int16)
    assert nonzero_box(labels) is None
    labels[3, 17, 5] = 2
    labels[11, 4, 39] = 7
    assert nonzero_box(labels) == (slice(3, 12), slice(4, 18), slice(5, 40))


@pytest.mark.parametrize("y", [0.0, 39.0])
def test_a_level_name_at_the_edge_of_a_snapshot_panel_is_drawn_whole(y):
    from PIL import ImageDraw, ImageFont

    def lit(xy):
        panel = Image.new("RGB", (60, 40))
        writers._draw_text(ImageDraw.Draw(panel), xy, "S1", (255, 255, 255), ImageFont.load_default(size=12), (60, 40))
        return int(np.asarray(panel).astype(bool).sum())

    assert lit((5.0, y)) == lit((5.0, 20.0))  # as many pixels as in the middle: nothing cut off


def test_zeros_on_demand_is_zeros(monkeypatch):
    import mmap

    from SpineLabelLib.result import zeros_on_demand

    for shape, dtype in (((3, 4, 5), np.uint8), ((64, 512, 512), np.int16)):  # below and above the 16 MB threshold
        a = zeros_on_demand(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.writeable and not a.any()
        a[1, 2, 3] = 7
        assert int(a.sum()) == 7

    def no_memory(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", no_memory)  # out of memory is a MemoryError, as np.zeros says it
    with pytest.raises(MemoryError, match=r"cannot allocate 0.03 GB for an array of shape \(64, 512, 512\)"):
        zeros_on_demand((64, 512, 512), np.int16)


def test_each_level_carries_its_own_snomed_code():
    """DICOM CID 7603 codes of C1-L5 (a swap of two keeps every other check of the terminology true)."""
    codes = ("14806007 39976000 113205007 5329002 36978003 36054005 87391001 64864005 53733008 1626008 73071006 "
             "56401006 45296009 62487009 11068009 82687006 7610001 12989004 23215003 66794005 14293000 36470004 "
             "11994002 49668003").split()
    regular = [level for level in LEVELS if not level.transitional and level.name != "S1"]
    assert [(level.name, level.snomed_code) for level in regular] == list(zip([level.name for level in regular], codes))
    assert all(level.snomed_meaning == f"{level.name} vertebra" for level in regular)
    # the whole sacrum and the two transitional levels: DICOM master list (CID 4031, 6114) codes, as TotalSegmentator's
    # sacrum, vertebrae_thoracic and vertebrae_lumbar carry them
    assert [(BY_NAME[n].snomed_code, BY_NAME[n].snomed_meaning) for n in ("S1", "T13", "L6")] == [
        ("54735007", "Sacrum"), ("51282000", "Vertebra"), ("51282000", "Vertebra")]


def test_two_runs_writing_one_case_at_once_leave_the_six_of_one_run(tmp_path, monkeypatch):
    """Two ``spinelabel label`` runs into one folder finishing together: each file was complete, but the folder held
    the label maps of one run beside the report and centroids of the other (1 in 10 real races, sub-verse014)."""
    a, b = build_spine(), build_spine(names=("T10", "T11", "T12", "L1", "L2", "L3"))
    replace = os.replace
    renaming = threading.Event()

    def slow_replace(src, dst):  # the first run stops halfway through its renames: the second runs its whole write
        if threading.current_thread() is first and str(dst).endswith("_ctd.json"):
            renaming.set()
            threading.Event().wait(0.3)
        replace(src, dst)

    monkeypatch.setattr(io.os, "replace", slow_replace)
    first = threading.Thread(target=writers.write_all, args=(a.result, a.image, tmp_path, "case"))
    second = threading.Thread(target=writers.write_all, args=(b.result, b.image, tmp_path, "case"))
    first.start()
    assert renaming.wait(10)
    second.start()
    first.join(), second.join()
    report = json.loads((tmp_path / "case_report.json").read_text())
    names = [v["name"] for v in report["vertebrae"]]
    centroids = [c["name"] for c in json.loads((tmp_path / "case_ctd.json").read_text())[1:]]
    labels = sorted(int(v) for v in np.unique(nibabel.load(tmp_path / "case_seg.nii.gz").get_fdata()) if v)
    assert centroids == names
    assert labels == sorted(BY_NAME[n].label for n in names)


def test_a_run_finishing_while_another_renames_is_not_refused(tmp_path, monkeypatch):
    """The second of two runs into one folder, checking while the first had renamed its snapshot but not yet its
    report, was refused: 'case_snapshot.png would be replaced, and it is no output of an earlier run'."""
    a, b = build_spine(), build_spine(names=("T10", "T11", "T12", "L1", "L2", "L3"))
    replace, halfway, errors = os.replace, threading.Event(), []

    def slow_replace(src, dst):
        replace(src, dst)
        if threading.current_thread() is first and str(dst).endswith("_snapshot.png"):
            halfway.set()
            threading.Event().wait(0.3)

    def run(spine):
        try:
            writers.write_all(spine.result, spine.image, tmp_path, "case")
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    monkeypatch.setattr(io.os, "replace", slow_replace)
    first, second = threading.Thread(target=run, args=(a,)), threading.Thread(target=run, args=(b,))
    first.start()
    assert halfway.wait(10)
    second.start()
    first.join(), second.join()
    assert errors == []
    report = json.loads((tmp_path / "case_report.json").read_text())
    assert [v["name"] for v in report["vertebrae"]] == [v.name for v in b.result.vertebrae]  # the later run's


def test_a_run_waiting_while_the_first_fails_in_the_folder_it_made_still_writes(tmp_path, monkeypatch):
    """Two runs into one new folder; the first fails (a full disk) while the second waits for the lock: the first's
    cleanup removed the empty folder after releasing the lock, and the second, locked on the removed folder, failed
    with 'No such file or directory'."""
    a, b = build_spine(), build_spine(names=("T10", "T11", "T12", "L1", "L2", "L3"))
    out, write_label_map, errors = tmp_path / "new", writers._write_label_map_to, {}

    def full_disk_for_the_first(result, tmp, labels):
        if threading.current_thread() is first:
            threading.Event().wait(0.5)  # the second run starts meanwhile and waits for the lock
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_label_map(result, tmp, labels)

    def run(tag, spine):
        try:
            writers.write_all(spine.result, spine.image, out, "case")
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors[tag] = err

    monkeypatch.setattr(writers, "_write_label_map_to", full_disk_for_the_first)
    first, second = threading.Thread(target=run, args=("first", a)), threading.Thread(target=run, args=("second", b))
    first.start()
    threading.Event().wait(0.2)
    second.start()
    first.join(), second.join()
    assert set(errors) == {"first"} and errors["first"].errno == errno.ENOSPC
    report = json.loads((out / "case_report.json").read_text())
    assert [v["name"] for v in report["vertebrae"]] == [v.name for v in b.result.vertebrae]


def test_the_folder_lock_is_no_lock_where_the_file_system_refuses_flock(tmp_path, monkeypatch, caplog):
    """The block runs, with a warning: it was logged at debug only, so two runs into the folder were not kept apart
    without a word."""
    fcntl = pytest.importorskip("fcntl")

    def refused(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refused)
    ran = []
    for _ in range(2):  # said once: a run takes a folder's lock more than once
        with io.folder_lock(tmp_path):
            ran.append(True)
    assert ran == [True, True]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"no lock on {tmp_path} (No locks available): another process writing into it at the same time is not kept "
        "apart"]


def test_a_write_error_without_an_errno_is_named_without_errno_none():
    """PIL's 'encoder error -2' has no errno: it read '[Errno None] cannot write ...'."""
    with pytest.raises(OSError) as raised, io.write_errors_named("/x/case_snapshot.png"):
        raise OSError("encoder error -2")
    assert str(raised.value) == "cannot write /x/case_snapshot.png: encoder error -2"


def test_slicer_shows_every_level_name_of_the_markups_file_in_a_slice_view(mrml, tmp_path):
    """The module turns slice projection on for its points so that every name shows in a slice view (a sagittal view
    showed 2 of the 9 names of a lumbar MRI without it); the CLI's .mrk.json, opened in Slicer, did not."""
    result, image = make_case(PERMUTED)
    path = tmp_path / "c.mrk.json"
    writers.write_markups(result, path)
    # as Slicer opens it (File > Add Data): the Markups logic reads the file's display properties too
    markups = mrml.scene.GetNodeByID(mrml.markups.LoadMarkups(str(path), "c"))
    display = markups.GetDisplayNode()
    assert display.GetSliceProjection() and display.GetSliceProjectionUseFiducialColor()


def test_snapshot_draws_no_level_name_over_another_or_over_the_title(monkeypatch):
    """Names are written at their vertebrae's centroid heights: T11 and T12 of a real abdominal CT (3 mm, 30 slices,
    T11 cut by the top of the view) read "T1T12" in both views, and "coronal" ran over T9 of a lumbar MRI. Two
    centroids at nearly one height (an arch's centroid can lie below the next body's) must keep their names apart."""
    from dataclasses import replace

    from PIL import ImageDraw

    result, image = make_case(np.eye(3))
    first, second = result.vertebrae[0], result.vertebrae[1]
    close = replace(second, centroid_lps_mm=tuple(np.add(first.centroid_lps_mm, (0.0, 0.0, -1.0))))
    result = result.copy(vertebrae=[first, close, *result.vertebrae[2:]])
    drawn = []
    original = ImageDraw.ImageDraw.text

    def recording(self, xy, text, *args, **kwargs):
        drawn.append((id(self.im), text, self.textbbox(xy, text, font=kwargs.get("font"))))
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", recording)
    writers._snapshot(result, image)
    overlapping = [(a[1], b[1]) for n, a in enumerate(drawn) for b in drawn[n + 1:]
                   if a[0] == b[0] and a[2][0] < b[2][2] and b[2][0] < a[2][2] and a[2][1] < b[2][3]
                   and b[2][1] < a[2][3]]
    assert len(drawn) == 2 * (len(result.vertebrae) + 1) and not overlapping
