"""SpineLabelLogic.scene against the real MRML classes of slicer-core: nodes from a labelling, corrections made
through the markups node, Segment Editor edits read back, export."""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import types
import unittest
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
slicerio = pytest.importorskip("slicerio")

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from conftest import build_spine  # noqa: E402
from SpineLabelLib.export import provenance_of  # noqa: E402
from SpineLabelLib.io import InputError  # noqa: E402
from SpineLabelLib.result import Geometry  # noqa: E402
from SpineLabelLib.sequence import confidence_text  # noqa: E402
from SpineLabelLib.vertebrae import (  # noqa: E402
    BY_LABEL,
    BY_NAME,
    LEVELS,
    TERMINOLOGY_CONTEXT,
    terminology_context,
    terminology_entry,
)
from SpineLabelLogic import process  # noqa: E402
from SpineLabelLogic.scene import (  # noqa: E402
    LabelingScene,
    addVolumeNodeFromImage,
    imageFromVolumeNode,
    segmentIdOf,
)
from SpineLabelLogic.worker import loadResult, saveResult  # noqa: E402

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture
def labeled(mrml, spine):
    volume = addVolumeNodeFromImage(mrml.scene, spine.image, "spine")
    labeling = LabelingScene(volume, spine.result)
    yield labeling
    labeling.cleanup()


def layer_voxels(labeling) -> np.ndarray:
    """Voxels (z, y, x) of the segmentation's single shared layer."""
    segmentation = labeling.segmentationNode.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 1
    image = segmentation.GetLayerDataObject(0)
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def point_index(labeling, name: str) -> int:
    node = labeling.markupsNode
    return next(i for i in range(node.GetNumberOfControlPoints()) if node.GetNthControlPointLabel(i) == name)


def assert_nodes_match(labeling) -> None:
    """Segments and control points say exactly what ``labeling.result`` says."""
    result = labeling.result
    segmentation = labeling.segmentationNode.GetSegmentation()
    assert list(segmentation.GetSegmentIDs()) == [segmentIdOf(v.id) for v in result.vertebrae]
    node = labeling.markupsNode
    assert node.GetNumberOfControlPoints() == len(result.vertebrae)
    if not result.vertebrae:
        return
    for index, v in enumerate(result.vertebrae):
        segment = segmentation.GetSegment(segmentIdOf(v.id))
        assert segment.GetName() == v.name and segment.GetLabelValue() == v.label
        np.testing.assert_allclose(segment.GetColor(), v.level.colour, atol=1e-6)
        tag = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag) and str(tag) == terminology_entry(v.level)
        assert node.GetNthControlPointLabel(index) == v.name
        assert bool(node.GetNthControlPointLocked(index)) == v.fixed
        assert node.GetNthControlPointDescription(index) == f"confidence {confidence_text(v.confidence)}"
        np.testing.assert_allclose(node.GetNthControlPointPosition(index), LPS_TO_RAS * v.centroid_lps_mm, atol=1e-6)
    np.testing.assert_array_equal(layer_voxels(labeling), result.label_map())


def test_volume_round_trip_keeps_geometry(mrml):
    image = sitk.GetImageFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    image.SetSpacing((0.5, 0.7, 2.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    volume = addVolumeNodeFromImage(mrml.scene, image, "v")
    back = imageFromVolumeNode(volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)


def test_a_volume_without_voxels_or_of_several_components_is_refused_by_name(mrml):
    """An RGB volume failed to start with numpy's 'cannot reshape array', one without voxels (its file not found) with
    'NoneType has no attribute GetDimensions'."""
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="empty: the volume holds no voxels"):
        imageFromVolumeNode(empty)
    rgb = addVolumeNodeFromImage(mrml.scene, sitk.Image([4, 5, 6], sitk.sitkInt16), "rgb")
    data = vtk.vtkImageData()
    data.SetDimensions(4, 5, 6)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(data)
    with pytest.raises(InputError, match="rgb: a volume of 3 components per voxel"):
        imageFromVolumeNode(rgb)


def test_a_volume_of_image_data_without_a_voxel_array_is_refused_by_name(mrml):
    """Image data without scalars (an empty vtkImageData, a diffusion tensor volume, whose voxels are tensors) failed
    with numpy's "'NoneType' object has no attribute 'GetDataType'", naming neither the volume nor what is wrong."""
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "emptydata")
    empty.SetAndObserveImageData(vtk.vtkImageData())
    with pytest.raises(InputError, match="emptydata: the volume holds no voxels"):
        imageFromVolumeNode(empty)
    unallocated = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "unallocated")
    data = vtk.vtkImageData()
    data.SetDimensions(4, 5, 6)
    unallocated.SetAndObserveImageData(data)
    with pytest.raises(InputError, match="unallocated: the volume holds no voxels"):
        imageFromVolumeNode(unallocated)
    dti = mrml.scene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "dti")
    data = vtk.vtkImageData()
    data.SetDimensions(4, 5, 6)
    tensors = vtk.vtkFloatArray()
    tensors.SetNumberOfComponents(9)
    tensors.SetNumberOfTuples(4 * 5 * 6)
    tensors.Fill(0)
    data.GetPointData().SetTensors(tensors)
    dti.SetAndObserveImageData(data)
    with pytest.raises(InputError, match="dti: a tensor volume"):
        imageFromVolumeNode(dti)


def test_labelling_of_another_grid_is_refused(mrml, spine):
    other = sitk.Image(spine.image)
    other.SetSpacing((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="grid"):
        LabelingScene(addVolumeNodeFromImage(mrml.scene, other, "other"), spine.result)


def test_scene_from_labelling(labeled, mrml, tmp_path):
    assert_nodes_match(labeled)
    assert layer_voxels(labeled).dtype == np.uint8  # one byte per voxel for all vertebrae together
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    volume_item = sh.GetItemByDataNode(labeled.volumeNode)
    for node in (labeled.segmentationNode, labeled.markupsNode):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == volume_item
    display = labeled.markupsNode.GetDisplayNode()  # every name shows in a slice view, in the points' colour
    assert display.GetSliceProjection() and display.GetSliceProjectionUseFiducialColor()

    storage = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    path = tmp_path / "spine.seg.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(labeled.segmentationNode)
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == [v.name for v in labeled.result.vertebrae]
    assert [s["labelValue"] for s in seg["segments"]] == [v.label for v in labeled.result.vertebrae]
    top = labeled.result.vertebrae[0].level
    assert seg["segments"][0]["terminology"]["type"] == ["SCT", top.snomed_code, top.snomed_meaning]
    voxels = seg["voxels"].transpose(2, 1, 0)  # slicerio (i, j, k) -> (z, y, x)
    offset = [int(o) for o in np.rint(np.linalg.solve(seg["ijkToLPS"][:3, :3], -seg["ijkToLPS"][:3, 3]))]
    assert offset == [0, 0, 0]  # origin of the written grid is the image origin
    np.testing.assert_array_equal(voxels, labeled.result.label_map()[: voxels.shape[0], : voxels.shape[1], : voxels.shape[2]])


@pytest.mark.skipif(not hasattr(slicer, "vtkSlicerTerminologiesModuleLogic"),
                    reason="this slicer-core has no terminologies logic")
def test_terminology_entries_resolve_in_spinelabel_context(tmp_path):
    """Loaded as the module loads it at start-up, SpineLabel's context holds every level's type, with the level's
    colour, and Slicer keeps each entry in it even where another loaded context (here one like Slicer's DICOM master
    list: the same codes, no colour) holds the same type."""
    context = terminology_context()
    other = json.loads(json.dumps(context))
    other["SegmentationCategoryTypeContextName"] = "Segmentation category and type - DICOM master list"
    for type_ in other["SegmentationCodes"]["Category"][0]["Type"]:
        del type_["recommendedDisplayRGBValue"]
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for n, document in enumerate((other, context)):
        path = tmp_path / f"{n}.term.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        assert logic.LoadTerminologyFromFile(str(path)) == document["SegmentationCategoryTypeContextName"]

    for level in LEVELS:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(terminology_entry(level), entry)
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [], [])
        assert entry.GetTerminologyContextName() == TERMINOLOGY_CONTEXT, level.name
        found = entry.GetTypeObject()
        assert (found.GetCodeValue(), found.GetCodeMeaning()) == (level.snomed_code, level.snomed_meaning)
        # T13 and L6 share a code, hence a type: the first level with the code (T13) gives its colour
        first = next(x for x in LEVELS if x.snomed_code == level.snomed_code)
        np.testing.assert_allclose(np.array(found.GetRecommendedDisplayRGBValue()) / 255, first.colour,
                                   atol=0.5 / 255, err_msg=level.name)
        region = entry.GetRegionObject()  # which tells T13 and L6 apart
        assert region.GetCodeValue() == {"T13": "122495006", "L6": "122496007"}.get(level.name), level.name
    assert len({terminology_entry(level) for level in LEVELS}) == len(LEVELS)


def test_rename_from_point_label_renumbers_both_nodes(labeled):
    events, segment_events = [], []
    node, segmentation_node = labeled.markupsNode, labeled.segmentationNode
    tag = node.AddObserver(slicer.vtkMRMLMarkupsNode.PointModifiedEvent, lambda caller, event: events.append(event))
    segment_tag = segmentation_node.AddObserver(slicer.vtkSegmentation.SegmentModified,
                                                lambda caller, event: segment_events.append(event))
    node.SetNthControlPointLabel(point_index(labeled, "T11"), "T12")
    node.RemoveObserver(tag)
    segmentation_node.RemoveObserver(segment_tag)
    assert [v.name for v in labeled.result.vertebrae] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert labeled.result.vertebrae[0].fixed and labeled.lastError == ""
    assert labeled.corrections[-1]["action"] == "rename"
    assert_nodes_match(labeled)
    # the user's edit and one batched rewrite of six points and six segments, not one event per point or segment
    assert len(events) <= 2 and len(segment_events) == 1


def test_a_vertebra_s_point_is_found_after_the_points_were_reordered(labeled):
    node = labeled.markupsNode
    first, second = labeled.result.vertebrae[:2]
    assert (labeled.pointIndexOf(first.id), labeled.pointIndexOf(second.id)) == (0, 1)
    node.SwapControlPoints(0, 1)  # the Markups module's Move down
    assert (labeled.pointIndexOf(first.id), labeled.pointIndexOf(second.id)) == (1, 0)
    assert node.GetNthControlPointLabel(labeled.pointIndexOf(first.id)) == first.name
    assert labeled.pointIndexOf(10**6) == -1


def test_lock_from_point_keeps_name(labeled):
    labeled.markupsNode.SetNthControlPointLocked(point_index(labeled, "L4"), True)
    l4 = labeled.result.vertebrae[-1]
    assert l4.fixed and l4.name == "L4"
    labeled.markupsNode.SetNthControlPointLabel(point_index(labeled, "T11"), "T12")
    assert labeled.result.by_id(l4.id).name == "L4"
    assert_nodes_match(labeled)


def test_move_point_onto_other_vertebra_hands_over_name(labeled):
    l2 = next(v for v in labeled.result.vertebrae if v.name == "L2")
    labeled.markupsNode.SetNthControlPointPosition(point_index(labeled, "L1"), *(LPS_TO_RAS * l2.centroid_lps_mm))
    assert labeled.result.by_id(l2.id).name == "L1" and labeled.result.by_id(l2.id).fixed
    assert labeled.corrections[-1]["onto_vertebra_id"] == l2.id
    assert_nodes_match(labeled)


def test_drag_is_applied_once_at_the_end(labeled):
    node = labeled.markupsNode
    v = labeled.result.vertebrae[1]
    shift = np.array([0.0, 6.0, 3.0])  # towards the back of its own vertebra
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent)
    for step in np.linspace(0.0, 1.0, 5)[1:]:
        node.SetNthControlPointPosition(1, *(LPS_TO_RAS * (np.asarray(v.centroid_lps_mm) + step * shift)))
    assert labeled.corrections == []
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert [c["action"] for c in labeled.corrections] == ["move"]
    np.testing.assert_allclose(labeled.result.vertebrae[1].centroid_lps_mm, np.asarray(v.centroid_lps_mm) + shift)
    assert_nodes_match(labeled)


def test_drop_past_a_neighbour_puts_the_point_back(labeled):
    node = labeled.markupsNode
    before = labeled.result
    top, v = (np.asarray(u.centroid_lps_mm) for u in before.vertebrae[:2])
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent)
    node.SetNthControlPointPosition(1, *(LPS_TO_RAS * (top + 0.6 * (top - v))))  # above the top vertebra
    node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert labeled.result is before and labeled.corrections == [] and "past a neighbour" in labeled.lastError
    assert_nodes_match(labeled)


def test_delete_point_deletes_vertebra(labeled):
    victim = next(v for v in labeled.result.vertebrae if v.name == "L2")
    labeled.markupsNode.RemoveNthControlPoint(point_index(labeled, "L2"))
    assert victim.id not in {v.id for v in labeled.result.vertebrae}
    assert labeled.segmentationNode.GetSegmentation().GetSegment(segmentIdOf(victim.id)) is None
    assert not np.any(labeled.result.components == victim.id)
    assert_nodes_match(labeled)


def test_a_point_placed_where_a_deleted_vertebra_was_brings_it_back(labeled):
    """There is no undo of a deleted point; placed again, it made a copy of a neighbour's shape (Dice 0.77 against
    the vertebra deleted on a real MRI). Now the vertebra comes back as it was: voxels, id, name."""
    victim = next(v for v in labeled.result.vertebrae if v.name == "L2")
    voxels = labeled.result.components == victim.id
    position = labeled.markupsNode.GetNthControlPointPosition(point_index(labeled, "L2"))
    labeled.markupsNode.RemoveNthControlPoint(point_index(labeled, "L2"))
    assert not np.any(labeled.result.components == victim.id)
    labeled.markupsNode.AddControlPoint(vtk.vtkVector3d(*position), "F-1")
    assert labeled.lastError == ""
    assert labeled.corrections[-1]["action"] == "restore" and labeled.corrections[-1]["vertebra_id"] == victim.id
    np.testing.assert_array_equal(labeled.result.components == victim.id, voxels)
    assert labeled.result.by_id(victim.id).name == "L2"
    assert_nodes_match(labeled)
    # placed elsewhere on its old voxels (a segment that held two bodies, deleted to be replaced), a new one is added
    labeled.markupsNode.RemoveNthControlPoint(point_index(labeled, "L2"))
    on_body = labeled.result.geometry.index_to_lps(np.argwhere(voxels)[:, ::-1].astype(float))  # LPS mm
    far = on_body[np.linalg.norm(on_body - victim.centroid_lps_mm, axis=1) > 11.0]
    labeled.markupsNode.AddControlPoint(vtk.vtkVector3d(*(LPS_TO_RAS * far[len(far) // 2])), "F-1")
    assert labeled.lastError == "" and labeled.corrections[-1]["action"] == "add"
    assert_nodes_match(labeled)


def test_placed_point_adds_vertebra(mrml):
    case = build_spine(missing=("L2",))
    labeled = LabelingScene(addVolumeNodeFromImage(mrml.scene, case.image, "spine"), case.result)
    body = case.bodies["L2"]
    centre_lps = np.argwhere(body).mean(axis=0)[::-1] * 1.5
    labeled.markupsNode.AddControlPoint(*(LPS_TO_RAS * centre_lps), "F-1")
    assert [v.name for v in labeled.result.vertebrae] == ["T11", "T12", "L1", "L2", "L3", "L4"]
    new = labeled.result.vertebrae[3]
    assert labeled.corrections[-1] == {"action": "add", "vertebra_id": new.id,
                                       "at_lps_mm": [round(float(c), 3) for c in centre_lps], "name": None}
    grown = labeled.result.components == new.id
    assert 2 * np.sum(grown & body) / (grown.sum() + body.sum()) > 0.9
    assert_nodes_match(labeled)
    labeled.cleanup()


def test_invalid_label_is_refused_and_restored(labeled):
    before = [v.name for v in labeled.result.vertebrae]
    labeled.markupsNode.SetNthControlPointLabel(0, "X9")
    assert "X9" in labeled.lastError
    assert [v.name for v in labeled.result.vertebrae] == before
    assert_nodes_match(labeled)


def test_segment_editor_edits_are_read_back_and_exported(labeled, tmp_path):
    voxels = layer_voxels(labeled)
    l1 = next(v for v in labeled.result.vertebrae if v.name == "L1")
    l3 = next(v for v in labeled.result.vertebrae if v.name == "L3")
    erased = (voxels == l1.label) & (np.arange(voxels.shape[2])[None, None, :] < voxels.shape[2] // 2)
    voxels[erased] = 0  # what the Segment Editor's eraser does to the shared layer
    labeled.segmentationNode.GetSegmentation().GetLayerDataObject(0).Modified()
    labeled.segmentationNode.GetSegmentation().RemoveSegment(segmentIdOf(l3.id))

    path = labeled.exportCase(tmp_path / "Dataset001_Spine")
    assert labeled.corrections[-1] == {"action": "segment_edit", "vertebra_ids": sorted([l1.id, l3.id])}
    assert l3.id not in {v.id for v in labeled.result.vertebrae}
    assert labeled.result.by_id(l1.id).volume_ml < l1.volume_ml
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(exported, labeled.result.label_map())
    assert not np.any(exported[erased])
    assert_nodes_match(labeled)
    provenance = json.loads((tmp_path / "Dataset001_Spine" / "provenance" / "spine_ct_0001.json").read_text())
    assert provenance["corrections"] == labeled.corrections
    dataset = json.loads((tmp_path / "Dataset001_Spine" / "dataset.json").read_text())
    assert dataset["numTraining"] == 1


def test_segment_editor_work_counts_as_a_correction_before_a_new_labelling_replaces_it(labeled):
    """The module asks before a new labelling of the volume replaces one with corrections; voxels erased in the
    Segment Editor and not yet taken in were not counted, and were lost without a question."""
    assert labeled.correctionCount() == 0
    voxels = layer_voxels(labeled)
    l2 = next(v for v in labeled.result.vertebrae if v.name == "L2")
    voxels[(voxels == l2.label) & (np.arange(voxels.shape[2])[None, None, :] < voxels.shape[2] // 2)] = 0
    labeled.segmentationNode.GetSegmentation().GetLayerDataObject(0).Modified()
    assert labeled.correctionCount() == 1 and labeled.corrections[0]["action"] == "segment_edit"


def test_a_segment_removed_in_the_editor_is_taken_in_before_a_correction(labeled, tmp_path):
    """It came back (empty, renamed) on the next rename, and the names changed at export."""
    segmentation = labeled.segmentationNode.GetSegmentation()
    l1 = next(v for v in labeled.result.vertebrae if v.name == "L1")
    segmentation.RemoveSegment(segmentIdOf(l1.id))
    labeled.markupsNode.SetNthControlPointLabel(point_index(labeled, "L4"), "L5")
    assert labeled.lastError == ""
    assert l1.id not in {v.id for v in labeled.result.vertebrae} and segmentation.GetSegment(segmentIdOf(l1.id)) is None
    assert [c["action"] for c in labeled.corrections] == ["segment_edit", "rename"]
    assert_nodes_match(labeled)
    shown = [v.name for v in labeled.result.vertebrae]
    labeled.exportCase(tmp_path / "Dataset001_Spine")
    assert [v.name for v in labeled.result.vertebrae] == shown


def test_a_segment_erased_in_the_editor_is_taken_in_before_a_correction(labeled):
    l2 = next(v for v in labeled.result.vertebrae if v.name == "L2")
    voxels = layer_voxels(labeled)
    voxels[voxels == l2.label] = 0  # the Segment Editor's eraser over the whole segment
    labeled.segmentationNode.GetSegmentation().GetLayerDataObject(0).Modified()
    labeled.markupsNode.SetNthControlPointLocked(point_index(labeled, "T11"), True)
    assert l2.id not in {v.id for v in labeled.result.vertebrae}
    assert [c["action"] for c in labeled.corrections] == ["segment_edit", "lock"]
    assert_nodes_match(labeled)


def test_deleting_the_points_of_a_removed_segment_and_its_neighbour_is_no_error(labeled):
    """Both points go in one edit: the first deletion takes in the removed segment (and its vertebra), the second
    finds its vertebra gone already; it said 'no vertebra with id N'."""
    l1, l2 = (next(v for v in labeled.result.vertebrae if v.name == name) for name in ("L1", "L2"))
    labeled.segmentationNode.GetSegmentation().RemoveSegment(segmentIdOf(l2.id))
    node = labeled.markupsNode
    with slicer.util.NodeModify(node):
        node.RemoveNthControlPoint(point_index(labeled, "L2"))
        node.RemoveNthControlPoint(point_index(labeled, "L1"))
    assert labeled.lastError == ""
    assert not {l1.id, l2.id} & {v.id for v in labeled.result.vertebrae}
    assert_nodes_match(labeled)
    with pytest.raises(KeyError, match="no vertebra with id 999"):
        labeled.rename(999, "L1")


# ------------------------------------------------------------------------------------- background process


def test_training_and_worker_lines_are_parsed():
    event = process.parseTrainingLine("epoch 3/10 loss 0.4120 body_dice 0.812 level_accuracy 0.640")
    assert event == {"event": "epoch", "epoch": 3, "epochs": 10, "fraction": 0.3, "loss": 0.412,
                     "metrics": {"body_dice": 0.812, "level_accuracy": 0.64}}
    event = process.parseTrainingLine("epoch 4/10 loss n/a body_dice n/a level_accuracy 0.500")  # no finite loss
    assert event["epoch"] == 4 and np.isnan(event["loss"]) and event["metrics"] == {"level_accuracy": 0.5}
    assert process.parseTrainingLine("INFO training: loading data") is None
    assert process.parseTrainingLine("epoch 3/10:  40%|####      | 40/100 [00:10<00:15]") == {
        "event": "progress", "fraction": 0.24}
    assert process.parseWorkerLine('{"event": "progress", "fraction": 0.5, "message": "m"}')["fraction"] == 0.5
    assert process.parseWorkerLine("{not json") is None and process.parseWorkerLine('{"x": 1}') is None
    # after a library's output that lacked its own newline
    assert process.parseWorkerLine('[lib] note {x}{"event": "done", "result": "r"}') == {"event": "done", "result": "r"}


def test_background_process_reports_events_and_output(caplog):
    """Its events are read; a line that is none goes into the tail for a failure's dialog and into the log (a run
    that succeeded left nothing of its log lines in Slicer's)."""
    script = textwrap.dedent("""
        import json, sys
        for i in range(3):
            print(json.dumps({"event": "progress", "fraction": i / 2, "message": f"step {i}"}), flush=True)
        print("a log line", file=sys.stderr)
        sys.exit(3)
    """)
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseWorkerLine)
    with caplog.at_level(logging.INFO, logger=process.__name__):
        runner.start()
        assert runner.wait(30) == 3
    assert [e["fraction"] for e in runner.readEvents()] == [0.0, 0.5, 1.0]
    assert runner.readEvents() == [] and "a log line" in runner.outputTail()
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("process ")] == [
        f"process {runner.process.pid}: a log line"]


def test_a_line_of_many_megabytes_is_cut_in_the_tail():
    """Each chunk of 64 KiB split the whole unfinished line again (20 MB took 9 s), and the dialog got all of it."""
    script = "import sys; sys.stderr.write('x' * 20_000_000 + '\\n'); print('{\"event\": \"done\"}')"
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseWorkerLine)
    runner.start()
    assert runner.wait(60) == 0
    assert [e["event"] for e in runner.readEvents()] == ["done"]
    assert runner.outputTail() == "x" * 2000 + "... (19998000 more characters)"


def test_progress_bars_leave_their_last_state_and_text_is_utf8():
    script = textwrap.dedent("""
        import json, sys
        sys.stderr.write("\\r 10%|#  \\r 50%|##### \\r100%|##########\\n")
        sys.stdout.write("\\r 20%" + json.dumps({"event": "progress", "fraction": 0.2, "message": "m"}) + "\\n")
        print("model spine-\u03b2 written")
    """)
    # a pipe in a Windows code page could not take the model name, and the run would fail at its end
    env = process.pythonPathEnvironment([], base={**os.environ, "PYTHONIOENCODING": "cp1252"})
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseWorkerLine, env=env)
    runner.start()
    assert runner.wait(30) == 0, runner.outputTail()
    assert [e["fraction"] for e in runner.readEvents()] == [0.2]
    tail = runner.outputTail().splitlines()
    assert sorted(tail) == ["100%|##########", "model spine-\u03b2 written"], tail


def _first_events(runner, seconds: float = 30) -> list:
    """The first events a started ``BackgroundProcess`` reports, waited for up to ``seconds``; [] if none came."""
    deadline, events = time.monotonic() + seconds, []
    while not events and time.monotonic() < deadline:
        events = runner.readEvents()
        time.sleep(0.05)
    return events


def test_a_progress_bar_refresh_arrives_while_the_process_runs():
    script = textwrap.dedent("""
        import sys, time
        sys.stderr.write("epoch 1/2:  50%|#####     | 5/10\\r")  # a bar's refresh: no newline
        sys.stderr.flush()
        time.sleep(60)
    """)
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseTrainingLine)
    runner.start()
    events = _first_events(runner)
    assert runner.running and events == [{"event": "progress", "fraction": 0.25}]
    runner.cancel(timeout=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks the process tree through /proc")
def test_how_a_process_ended_and_what_it_left_running_end_with_it():
    script = textwrap.dedent("""
        import json, os, signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # holds the output open
        print(json.dumps({"event": "child", "pid": child.pid}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseWorkerLine)
    runner.start()
    start = time.monotonic()
    assert runner.wait(30) == -9 and time.monotonic() - start < 10  # the readers did not wait for the child
    assert runner.exitDescription().startswith("killed by SIGKILL")
    child = runner.readEvents()[0]["pid"]
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    # a process that hangs after its result is ended by finish()
    script = 'import json, time; print(json.dumps({"event": "done"}), flush=True); time.sleep(120)'
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseWorkerLine)
    runner.start()
    start = time.monotonic()
    runner.finish(timeout=1)
    assert not runner.running and time.monotonic() - start < 10
    assert runner.readEvents() == [{"event": "done"}] and runner.exitDescription() == "killed by SIGTERM"
    # spinelabel ends with 128 + the signal's number when one stops it, as a shell does
    for code, said in ((143, "exit code 143: stopped by SIGTERM"), (2, "exit code 2"), (200, "exit code 200")):
        runner = process.BackgroundProcess([sys.executable, "-c", f"raise SystemExit({code})"], process.parseWorkerLine)
        runner.start()
        assert runner.wait(30) == code and runner.exitDescription() == said


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_a_group_macos_will_not_signal_once_its_leader_has_ended_is_no_error(monkeypatch):
    """macOS's killpg answers EPERM, not ESRCH, for a group whose leader has ended and that holds no live process
    (XNU skips zombies; asv, cylc-flow and others met it): wait() raised PermissionError there, and so did cancel()
    for a process that ended as Stop was pressed (a Windows and macOS audit). A refusal while it runs is raised."""
    real_killpg = os.killpg

    def refused(pid, sig):  # as macOS answers once the leader has ended
        runner.process.wait()
        raise PermissionError(errno.EPERM, "Operation not permitted")

    runner = process.BackgroundProcess([sys.executable, "-c", "pass"], process.parseWorkerLine)
    runner.start()
    monkeypatch.setattr(process.os, "killpg", refused)
    assert runner.wait(30) == 0
    runner = process.BackgroundProcess([sys.executable, "-c", "import time; time.sleep(0.3)"], process.parseWorkerLine)
    runner.start()
    runner.cancel(timeout=2)  # ends as it is signalled
    assert not runner.running and runner.cancelled

    def denied(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    runner = process.BackgroundProcess([sys.executable, "-c", "import time; time.sleep(60)"], process.parseWorkerLine)
    runner.start()
    monkeypatch.setattr(process.os, "killpg", denied)
    try:
        with pytest.raises(PermissionError):
            runner.cancel(timeout=2)
    finally:
        real_killpg(runner.process.pid, 9)
        runner.process.wait()


def test_the_command_that_resumes_a_training_runs_in_a_terminal_of_the_system():
    """On Windows the command shown after a failed training was quoted for a POSIX shell (shlex put the path of
    PythonSlicer.exe, which holds the space of "Slicer 5.8.1", in single quotes: neither cmd.exe nor PowerShell runs
    that) and lacked the PYTHONPATH that finds SpineLabelLib (``env`` is POSIX only), so it could not start (a
    Windows and macOS audit)."""
    python = "C:\\Users\\Ana L\u00eda\\AppData\\Local\\slicer.org\\Slicer 5.8.1\\bin\\PythonSlicer.exe"
    command = [python, "-m", "SpineLabelLib.cli", "train", "--data", "C:\\Users\\ana\\R&D\\dataset:0.6", "--data",
               "phantom:0.3", "--out", "C:\\Temp\\run 1\\", "--name", "m", "--resume"]
    line = process.terminalCommand(command, "C:\\Slicer 5.8.1\\modules;C:\\x", windows=True)
    assert line == ('set "PYTHONPATH=C:\\Slicer 5.8.1\\modules;C:\\x" && '
                    '"C:\\Users\\Ana L\u00eda\\AppData\\Local\\slicer.org\\Slicer 5.8.1\\bin\\PythonSlicer.exe" -m '
                    'SpineLabelLib.cli train --data "C:\\Users\\ana\\R&D\\dataset:0.6" --data phantom:0.3 --out '
                    '"C:\\Temp\\run 1\\\\" --name m --resume')  # a backslash before the closing quote doubled
    assert process.terminalCommand(["a b", "c"], windows=True) == '"a b" c'
    # on POSIX: env and shell quoting, which a shell reads back as the command and its PYTHONPATH
    script = "import os, sys; print(os.environ['PYTHONPATH']); print(sys.argv[1:])"
    line = process.terminalCommand([sys.executable, "-c", script, "it's", "a b"], "/opt/Slicer 5.8/x:/y", windows=False)
    shown = subprocess.run(line, shell=True, capture_output=True, text=True, check=True).stdout.splitlines()
    assert shown == ["/opt/Slicer 5.8/x:/y", "[\"it's\", 'a b']"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks the process tree through /proc")
def test_cancel_ends_the_whole_process_tree():
    script = textwrap.dedent("""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(json.dumps({"event": "child", "pid": child.pid}), flush=True)
        time.sleep(120)
    """)
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseWorkerLine)
    runner.start()
    deadline = time.monotonic() + 30
    events = []
    while not events and time.monotonic() < deadline:
        events = runner.readEvents()
        time.sleep(0.05)
    child = events[0]["pid"]
    assert _alive(child) and runner.running
    started = time.monotonic()
    runner.cancel(timeout=2)
    assert not runner.running and runner.cancelled
    assert time.monotonic() - started < 30  # not the two minutes the process would have run
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_result_round_trip_through_files(tmp_path, spine):
    piece = {"centroid_lps_mm": [0.0, 1.0, -250.0], "level_log_scores": [-float("inf")] + [-1.0] * 26,
             "confidence_log_scores": None}
    result = spine.result.copy(orientation_margin=-0.25, sacral_pieces=[piece], sacral_pieces_below=7)
    result.vertebrae[0].fixed = True
    result.vertebrae[1].confidence_log_scores = result.vertebrae[1].level_log_scores - 1.0
    back = loadResult(saveResult(result, tmp_path / "out"))
    assert back.geometry == result.geometry and back.components.dtype == result.components.dtype
    np.testing.assert_array_equal(back.components, result.components)
    for a, b in zip(back.vertebrae, result.vertebrae):
        assert (a.id, a.name, a.fixed, a.centroid_lps_mm) == (b.id, b.name, b.fixed, b.centroid_lps_mm)
        np.testing.assert_array_equal(a.level_log_scores, b.level_log_scores)
        assert (a.confidence_log_scores is None) == (b.confidence_log_scores is None)
        if a.confidence_log_scores is not None:
            np.testing.assert_array_equal(a.confidence_log_scores, b.confidence_log_scores)
    for name in ("gaps_mm", "warnings", "sequence_warnings", "model", "timings_s", "source", "modality",
                 "spine_probability", "orientation_margin", "sacral_pieces", "sacral_pieces_below"):
        assert getattr(back, name) == getattr(result, name), name
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(TypeError, match="not JSON serializable"):  # the second file failed after the first was in place
        saveResult(result.copy(source=np.float32(1.0), components=result.components * 0), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_training_process_reports_epochs_and_registers_model(tmp_path, monkeypatch, spine):
    """What SpineLabelTraining does, without Qt: ``spinelabel train`` on an exported dataset in the background,
    epochs parsed from its output, the model registered at the end."""
    from SpineLabelLib.export import export_case
    from SpineLabelLib.models import list_models, register_model

    root = Path(__file__).resolve().parents[1]
    dataset = tmp_path / "Dataset001_Spine"
    export_case(spine.result, spine.image, dataset)
    card = tmp_path / "tiny.json"
    command = process.trainCommand(sys.executable, dataset, card, None, epochs=1, name="tiny", device="cpu",
                                   extra=["--iterations", "1", "--batch", "1", "--patch", "32", "32", "32"])
    runner = process.BackgroundProcess(
        command, process.parseTrainingLine,
        env=process.pythonPathEnvironment([root / "SpineLabel", root / "SpineLabelTraining"]))
    runner.start()
    assert runner.wait(300) == 0, runner.outputTail()
    read = runner.readEvents()
    events = [e for e in read if e["event"] == "epoch"]
    assert [(e["epoch"], e["epochs"], e["fraction"]) for e in events] == [(1, 1, 1.0)]
    # and progress within it, though the process writes into a pipe, where tqdm draws no bar of its own accord
    assert any(e["event"] == "progress" for e in read), runner.outputTail()
    assert np.isfinite(events[0]["loss"]) and "level_accuracy" in events[0]["metrics"]
    # the export is mixed with data that keeps what the base model knew of other spines
    sources = json.loads(card.read_text())["training_data"]["sources"]
    assert [(s["source"], s["weight"]) for s in sources] == [(dataset.name, 0.6), ("phantom", 0.3), ("negative", 0.1)]
    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path / "models"))
    registered = register_model(card, "tiny-registered")
    assert str(registered) in [c["path"] for c in list_models()]


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A model with random weights on a coarse grid: exercises the plumbing quickly."""
    import torch

    from SpineLabelLib.models import save_model
    from SpineLabelLib.network import SpineUNet

    torch.manual_seed(0)
    return save_model(SpineUNet(), {"name": "random", "version": "0", "spacing_mm": 4.0},
                      tmp_path_factory.mktemp("model") / "random.json")


def _worker(image_path, out, model, check_orientation=False, spine_gate=True, modality="auto"):
    root = Path(__file__).resolve().parents[1]
    runner = process.BackgroundProcess(process.labelCommand(sys.executable, image_path, out, model, "cpu",
                                                            check_orientation, spine_gate, modality),
                                       process.parseWorkerLine,
                                       env=process.pythonPathEnvironment([root / "SpineLabel"]))
    runner.start()
    return runner


@pytest.mark.parametrize("asked", [False, True])
def test_phantom_labelled_in_background_into_the_scene(mrml, tmp_path, asked):
    """The shipped model, with the module's settings as they start, or as a user can change them: the gate skipped
    and the CT phantom taken for MR, as the module's Modality box can. (A model of random weights, used for the
    second before, found no vertebra with some seeds, and what it finds changes with the CPU's vector instructions.)"""
    from SpineLabelLib.models import default_model_path
    from SpineLabelLib.phantom import make_phantom

    model = default_model_path()
    phantom = make_phantom(modality="ct", fov="lumbar", spacing=(2.0, 2.0, 2.5), seed=4)
    volume = addVolumeNodeFromImage(mrml.scene, phantom.image, "phantom")
    image_path = tmp_path / "input.nrrd"
    sitk.WriteImage(imageFromVolumeNode(volume), str(image_path))  # what SpineLabelLogic.startLabelling does
    runner = _worker(image_path, tmp_path / "result", model, check_orientation=not asked, spine_gate=not asked,
                     modality="mr" if asked else "auto")
    assert runner.wait(300) == 0, runner.outputTail()
    events = runner.readEvents()
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert events[-1]["event"] == "done"

    labeling = LabelingScene(volume, loadResult(events[-1]["result"]))
    assert labeling.result.model["name"] == json.loads(Path(model).read_text())["name"]
    assert labeling.result.modality == ("MR" if asked else "CT")
    assert len(labeling.result.vertebrae) == events[-1]["vertebrae"] > 0
    assert_nodes_match(labeling)
    if not asked:  # the shipped model finds and names the lumbar vertebrae of a lumbar phantom
        truth = sitk.GetArrayFromImage(phantom.labels)  # (z, y, x) VerSe labels
        under = {}  # true label at each found centroid -> label given
        for v in labeling.result.vertebrae:
            i, j, k = np.rint(labeling.result.geometry.lps_to_index(np.asarray(v.centroid_lps_mm))).astype(int)
            under[int(truth[k, j, i])] = v.label
        lumbar = [BY_NAME[name].label for name in ("L1", "L2", "L3", "L4", "L5")]
        assert [under.get(label) for label in lumbar] == lumbar
        # the orientation check ran in the worker and found the phantom the right way up
        assert "orientation_check" in labeling.result.timings_s
        assert not any("head to feet" in w for w in labeling.result.warnings)
    labeling.cleanup()


def test_background_labelling_can_be_cancelled(tmp_path):
    """A labelling that would succeed (the shipped model on a phantom), cancelled at its first progress event."""
    from SpineLabelLib.models import default_model_path
    from SpineLabelLib.phantom import make_phantom

    image_path = tmp_path / "input.nii.gz"
    sitk.WriteImage(make_phantom(modality="mr", fov="lumbar", spacing=(2.0, 2.0, 2.5), seed=1).image, str(image_path))
    runner = _worker(image_path, tmp_path / "result", default_model_path())
    deadline = time.monotonic() + 120
    while runner.running and time.monotonic() < deadline and not runner.readEvents():
        time.sleep(0.05)
    assert runner.running, runner.outputTail()
    runner.cancel(timeout=2)
    assert runner.cancelled and not runner.running and runner.returncode != 0
    assert not (tmp_path / "result" / "result.json").exists()


def test_worker_reports_an_image_without_vertebrae_as_an_error(tmp_path, random_model):
    image_path = tmp_path / "input.nrrd"
    sitk.WriteImage(sitk.Image([24, 24, 24], sitk.sitkInt16), str(image_path))
    runner = _worker(image_path, tmp_path / "result", random_model)
    assert runner.wait(120) == 1, runner.outputTail()
    event = runner.readEvents()[-1]
    assert event["event"] == "error"
    assert event["message"] == f"{image_path}: image is constant: nothing to label"
    assert not (tmp_path / "result" / "result.json").exists()


def test_a_run_in_its_own_folder_takes_the_paths_given_relative_to_the_callers(tmp_path, random_model, monkeypatch):
    """As the module starts it: in the run's own folder, away from the modules of Slicer's working folder (a
    random.py there failed every run), with the input, the model and PYTHONPATH given relative to the caller's."""
    (tmp_path / "random.py").write_text("raise SystemExit('the random.py of the working folder was imported')")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path)
    sitk.WriteImage(sitk.Image([24, 24, 24], sitk.sitkInt16), "input.nrrd")
    spinelabel = os.path.relpath(Path(__file__).resolve().parents[1] / "SpineLabel")
    model = os.path.relpath(random_model)
    runner = process.BackgroundProcess(process.labelCommand(sys.executable, "input.nrrd", "run/result", model, "cpu"),
                                       process.parseWorkerLine, env=process.pythonPathEnvironment([spinelabel]),
                                       cwd=tmp_path / "run")
    runner.start()
    assert runner.wait(120) == 1, runner.outputTail()
    assert runner.readEvents()[-1] == {"event": "error",
                                       "message": f"{tmp_path / 'input.nrrd'}: image is constant: nothing to label"}


def test_worker_reports_a_failed_import_as_an_error(tmp_path, random_model):
    """A broken torch (or memory running out while importing) ended the worker with a traceback before it could say
    why: the module showed "the labelling process stopped unexpectedly"."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('this torch is broken')")
    root = Path(__file__).resolve().parents[1]
    runner = process.BackgroundProcess(process.labelCommand(sys.executable, tmp_path / "in.nrrd", tmp_path / "result",
                                                            random_model, "cpu"),
                                       process.parseWorkerLine,
                                       env=process.pythonPathEnvironment([tmp_path, root / "SpineLabel"]))
    runner.start()
    assert runner.wait(120) == 1, runner.outputTail()
    assert runner.readEvents()[-1] == {"event": "error", "message": "this torch is broken"}


def test_the_slicer_module_asks_for_the_package_versions_pyproject_asks_for():
    """SpineLabel.py installs into Slicer's Python what pyproject.toml requires (Slicer cannot read pyproject.toml);
    the two lists are written apart, so a raised floor in one must be raised in the other."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11 and later")
    root = Path(__file__).resolve().parents[1]
    required = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])
    module = ast.parse((root / "SpineLabel" / "SpineLabel.py").read_text())
    (assigned,) = [node.value for node in module.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "REQUIRED_PACKAGES" for t in node.targets)]
    assert set(ast.literal_eval(assigned).values()) <= required


def test_a_rename_to_a_name_locked_elsewhere_says_that_point_is_unlocked(labeled):
    node = labeled.markupsNode
    l2 = labeled.result.vertebrae[point_index(labeled, "L2")]
    node.SetNthControlPointLocked(point_index(labeled, "L2"), True)
    assert labeled.result.by_id(l2.id).fixed and labeled.lastNotice == ""
    node.SetNthControlPointLabel(point_index(labeled, "L1"), "L2")
    assert not labeled.result.by_id(l2.id).fixed and labeled.result.by_id(l2.id).name == "L3"
    assert labeled.corrections[-1]["unlocked_vertebra_ids"] == [l2.id]
    assert labeled.lastNotice == "L2 was locked on another point, which is unlocked and now named L3"
    assert_nodes_match(labeled)
    node.SetNthControlPointLabel(point_index(labeled, "T12"), "T11")  # nothing locked on T11: no notice
    assert labeled.lastNotice == "" and "unlocked_vertebra_ids" not in labeled.corrections[-1]


def test_a_rename_leaves_a_segment_the_user_added_alone(labeled):
    segmentation = labeled.segmentationNode.GetSegmentation()
    tumour = segmentation.AddEmptySegment("tumour", "tumour")  # in the shared layer, as the Segment Editor adds it
    value = segmentation.GetSegment(tumour).GetLabelValue()
    voxels = layer_voxels(labeled)
    painted = np.zeros(voxels.shape, bool)
    painted[:2, :2, :2] = True
    assert not voxels[painted].any()
    voxels[painted] = value
    segmentation.GetLayerDataObject(0).Modified()
    components = labeled.result.components.copy()
    labeled.markupsNode.SetNthControlPointLabel(0, BY_LABEL[value].name)  # the top vertebra takes the tumour's value
    assert labeled.result.vertebrae[0].label == value
    labeled.readBackSegmentation()
    assert [c["action"] for c in labeled.corrections] == ["rename"]  # no voxel of a vertebra changed
    np.testing.assert_array_equal(labeled.result.components, components)
    layer = segmentation.GetLayerDataObject(segmentation.GetLayerIndex(tumour))
    own = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars())
    assert int((own == segmentation.GetSegment(tumour).GetLabelValue()).sum()) == painted.sum()


def test_an_export_says_which_segments_added_in_the_editor_it_leaves_out(labeled, tmp_path):
    """A segment added by hand in the Segment Editor (a missed vertebra painted as 'T10') was left out of the export
    with nothing but an info line in the log, and the panel said 'Exported ...'."""
    segmentation = labeled.segmentationNode.GetSegmentation()
    added = segmentation.AddEmptySegment("T10", "T10")  # in the shared layer, as the Segment Editor adds it
    segmentation.AddEmptySegment("note", "note")  # left empty: nothing of it is lost
    voxels = layer_voxels(labeled)
    painted = np.zeros(voxels.shape, bool)
    painted[:2, :2, :2] = True
    assert not voxels[painted].any()
    voxels[painted] = segmentation.GetSegment(added).GetLabelValue()
    segmentation.GetLayerDataObject(0).Modified()
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(labeled.exportCase(tmp_path / "Dataset001_Spine"))))
    assert not exported[painted].any()  # a segment SpineLabel did not make is not exported
    assert "'T10'" in labeled.lastNotice and "note" not in labeled.lastNotice
    labeled.markupsNode.SetNthControlPointLocked(0, True)  # the next correction clears it
    assert labeled.lastNotice == ""


def test_an_export_names_a_point_the_segment_editor_left_off_its_segment(labeled, tmp_path):
    """A point is exported as its vertebra's centroid: when the Segment Editor moved the voxels under L3's point to
    L2, the export wrote a centroid 'L3' inside L2 without a word."""
    voxels = layer_voxels(labeled)
    l2, l3 = (next(v for v in labeled.result.vertebrae if v.name == name) for name in ("L2", "L3"))
    centre = np.rint(labeled.result.geometry.lps_to_index(np.asarray(l3.centroid_lps_mm))).astype(int)[::-1]
    around = tuple(slice(c - 3, c + 4) for c in centre)
    voxels[around][voxels[around] == l3.label] = l2.label  # painted into L2 with the Segment Editor
    labeled.segmentationNode.GetSegmentation().GetLayerDataObject(0).Modified()
    labeled.exportCase(tmp_path / "Dataset001_Spine")
    assert "L3" in labeled.lastNotice and "L2" not in labeled.lastNotice
    still = np.argwhere(layer_voxels(labeled) == l3.label)[0][::-1]  # (i, j, k) of a voxel L3 kept
    labeled.markupsNode.SetNthControlPointPosition(
        point_index(labeled, "L3"), *(LPS_TO_RAS * labeled.result.geometry.index_to_lps(still.astype(float))))
    assert labeled.corrections[-1]["action"] == "move" and labeled.lastNotice == ""
    labeled.exportCase(tmp_path / "Dataset001_Spine")
    assert labeled.lastNotice == ""


def test_an_export_names_no_point_that_no_edit_left_off_its_segment(mrml, spine, tmp_path):
    """The point of a vertebra that the view cuts is the centroid of the part in view, which can lie off its segment
    as labelled (some crops of a lumbar CT phantom, 1-18 mm off): no edit left it there, the notice names none."""
    result = spine.result.copy()
    top = result.vertebrae[0]
    zyx = np.argwhere(result.components == top.id)
    outside = zyx[np.argmin(zyx[:, 1])] - [0, 2, 0]  # two voxels beyond its voxels
    assert result.components[tuple(outside)] == 0
    top.centroid_lps_mm = tuple(float(c) for c in result.geometry.index_to_lps(outside[::-1].astype(float)))
    labeling = LabelingScene(addVolumeNodeFromImage(mrml.scene, spine.image, "spine"), result)
    try:
        labeling.exportCase(tmp_path / "Dataset001_Spine")
        assert labeling.lastNotice == ""
    finally:
        labeling.cleanup()


def test_nodes_follow_the_volume_s_parent_transform(mrml, spine):
    volume = addVolumeNodeFromImage(mrml.scene, spine.image, "spine")
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    labeling = LabelingScene(volume, spine.result)
    nodes = (labeling.segmentationNode, labeling.markupsNode)
    assert [node.GetTransformNodeID() for node in nodes] == [transform.GetID()] * 2
    assert_nodes_match(labeling)  # the points hold the volume's own coordinates
    # a transform set, changed or removed after labelling is followed (the nodes stayed where they were)
    other = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    for set_to in (other.GetID(), None, transform.GetID()):
        volume.SetAndObserveTransformNodeID(set_to)
        assert [node.GetTransformNodeID() for node in nodes] == [set_to] * 2
    # hardened, the volume's grid moves: the nodes keep the transform that still puts them on it
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 50.0)
    transform.SetMatrixTransformToParent(matrix)
    slicer.vtkSlicerTransformLogic.hardenTransform(volume)
    assert volume.GetTransformNodeID() is None
    assert [node.GetTransformNodeID() for node in nodes] == [transform.GetID()] * 2
    labeling.cleanup()


def test_corrections_after_the_nodes_were_deleted_are_refused(labeled, tmp_path):
    scene = labeled.volumeNode.GetScene()
    scene.RemoveNode(labeled.segmentationNode)
    before = [v.name for v in labeled.result.vertebrae]
    with pytest.raises(RuntimeError, match="were deleted; label the volume again"):
        labeled.rename(labeled.result.vertebrae[0].id, "T12")
    assert [v.name for v in labeled.result.vertebrae] == before
    with pytest.raises(RuntimeError, match="were deleted"):
        labeled.exportCase(tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()


def test_a_new_labelling_of_the_volume_can_replace_the_old_nodes(labeled):
    """Their display nodes go too (one of each was left behind per new labelling)."""
    scene = labeled.volumeNode.GetScene()
    classes = ("vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode", "vtkMRMLMarkupsFiducialNode",
               "vtkMRMLMarkupsFiducialDisplayNode")
    counts = [scene.GetNumberOfNodesByClass(c) for c in classes]
    labeled.removeNodes()
    assert [scene.GetNumberOfNodesByClass(c) for c in classes] == [n - 1 for n in counts]
    assert labeled.markupsNode.GetScene() is None


def test_voxels_painted_into_a_segment_over_its_neighbour_go_to_that_segment(labeled, tmp_path):
    """The Segment Editor puts a segment painted over its neighbour in a layer of its own; the export gives the
    overlap to the segment painted (it went to the later segment, whichever was edited)."""
    from slicer.util import arrayFromSegmentBinaryLabelmap, updateSegmentBinaryLabelmapFromArray

    node, volume = labeled.segmentationNode, labeled.volumeNode
    l2, l3 = (next(v for v in labeled.result.vertebrae if v.name == name) for name in ("L2", "L3"))
    a2 = arrayFromSegmentBinaryLabelmap(node, segmentIdOf(l2.id), volume).astype(bool)
    a3 = arrayFromSegmentBinaryLabelmap(node, segmentIdOf(l3.id), volume).astype(bool)
    top = np.flatnonzero(a3.any(axis=(1, 2)))[-4:]  # the upper 4 slices of L3 (z = superior)
    painted = a3 & np.isin(np.arange(a3.shape[0]), top)[:, None, None]
    updateSegmentBinaryLabelmapFromArray((a2 | painted).astype(np.uint8), node, segmentIdOf(l2.id), volume)
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(labeled.exportCase(tmp_path / "Dataset001_Spine"))))
    assert painted.any() and np.all(exported[painted] == BY_NAME["L2"].label)
    # resolved once: the scene shows it so, and a second read-back (another export) gives the voxels back to nobody
    assert_nodes_match(labeled)
    again = sitk.GetArrayFromImage(sitk.ReadImage(str(labeled.exportCase(tmp_path / "Dataset002_Spine"))))
    assert np.all(again[painted] == BY_NAME["L2"].label) and len(labeled.corrections) == 1


def test_the_segment_editor_s_undo_is_brought_in_line_with_the_points(labeled, tmp_path):
    segmentation = labeled.segmentationNode.GetSegmentation()
    history = slicer.vtkSegmentationHistory()  # what the Segment Editor's Undo restores
    history.SetSegmentation(segmentation)
    history.SaveState()
    segmentation.AddEmptySegment("note", "note")  # the editor's Add saves the state first
    labeled.markupsNode.SetNthControlPointLabel(point_index(labeled, "T11"), "T12")
    assert history.RestorePreviousState()  # brings back the segments' old names and label values
    labeled.exportCase(tmp_path / "Dataset001_Spine")
    assert [v.name for v in labeled.result.vertebrae] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert_nodes_match(labeled)

    l2 = next(v for v in labeled.result.vertebrae if v.name == "L2")
    history.SaveState()
    layer_voxels(labeled)[layer_voxels(labeled) == l2.label] = 0  # erased in the editor
    segmentation.GetLayerDataObject(0).Modified()
    labeled.markupsNode.SetNthControlPointLocked(point_index(labeled, "L4"), True)  # a correction takes it in
    assert l2.id not in {v.id for v in labeled.result.vertebrae}
    assert history.RestorePreviousState()  # the erase undone: the vertebra comes back, with its point
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(labeled.exportCase(tmp_path / "Dataset001_Spine"))))
    assert l2.id in {v.id for v in labeled.result.vertebrae} and BY_NAME["L2"].label in exported
    assert_nodes_match(labeled)


def test_an_undone_erase_whose_name_can_no_longer_stand_is_not_restored(labeled, tmp_path):
    segmentation = labeled.segmentationNode.GetSegmentation()
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentation)
    l2 = next(v for v in labeled.result.vertebrae if v.name == "L2")
    history.SaveState()
    layer_voxels(labeled)[layer_voxels(labeled) == l2.label] = 0  # erased in the editor
    segmentation.GetLayerDataObject(0).Modified()
    labeled.markupsNode.SetNthControlPointLocked(point_index(labeled, "L1"), True)  # takes the erase in
    labeled.markupsNode.SetNthControlPointLabel(point_index(labeled, "L3"), "L2")  # the vertebra below L1 is L2 now
    assert history.RestorePreviousState()  # the erased vertebra's segment is back, between L1 and L2
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(labeled.exportCase(tmp_path / "Dataset001_Spine"))))
    assert l2.id not in {v.id for v in labeled.result.vertebrae} and not exported[layer_voxels(labeled) == 0].any()
    assert_nodes_match(labeled)
    labeled.markupsNode.SetNthControlPointLocked(point_index(labeled, "L1"), False)  # corrections still work
    assert labeled.lastError == "" and not labeled.result.by_id(3).fixed


def save_and_load(mrml, labeling, folder: Path, bundle: bool, lost: str = "") -> list:
    """Save the scene as Slicer saves it (each node's file through its storage node, then the .mrml; or one .mrb),
    close it and load it back, without its files ending in ``lost`` if given (a scene folder); returns the
    labellings ``savedLabelings`` followed again when the scene's import ended, as the module does."""
    from SpineLabelLogic.scene import savedLabelings

    scene = mrml.scene
    folder.mkdir()
    if bundle:
        assert mrml.app_logic.SaveSceneToSlicerDataBundleDirectory(str(folder), None)
        assert mrml.app_logic.Zip(str(folder.with_suffix(".mrb")), str(folder))
    else:
        for node in (labeling.volumeNode, labeling.segmentationNode, labeling.markupsNode):
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
            storage.SetFileName(str(folder / f"{node.GetName()}.{storage.GetDefaultWriteFileExtension()}"))
            assert storage.WriteData(node)
        scene.SetURL(str(folder / "scene.mrml"))
        assert scene.Commit()
    labeling.cleanup()
    scene.Clear(0)
    for path in folder.glob(f"*{lost}") if lost else ():
        path.unlink()
    loaded = []
    tag = scene.AddObserver(scene.EndImportEvent, lambda caller, event: loaded.extend(savedLabelings(scene)))
    if bundle:
        (folder.parent / "unpacked").mkdir()
        assert mrml.app_logic.OpenSlicerDataBundle(str(folder.with_suffix(".mrb")), str(folder.parent / "unpacked"))
    else:
        scene.SetURL(str(folder / "scene.mrml"))
        assert scene.Import() or lost  # a file it could not read fails the import, which loads the rest
    scene.RemoveObserver(tag)
    return loaded


@pytest.mark.parametrize("bundle", [False, True], ids=["mrml", "mrb"])
def test_a_labelling_saved_with_the_scene_is_corrected_again_once_loaded(labeled, mrml, tmp_path, bundle):
    """Loaded back, the segmentation and points showed the labelling, but a renamed point no longer renamed its
    neighbours (nothing followed the nodes) and the case could no longer be exported."""
    from SpineLabelLogic.scene import savedLabelings

    labeled.markupsNode.SetNthControlPointLabel(point_index(labeled, "L1"), "L2")
    saved = labeled.result
    assert [v.name for v in saved.vertebrae] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    (loaded,) = save_and_load(mrml, labeled, tmp_path / "scene", bundle)
    try:
        assert loaded.volumeNode.GetImageData() is not None and loaded.markupsNode.GetScene() is mrml.scene
        assert [(v.id, v.name, v.fixed) for v in loaded.result.vertebrae] == [(v.id, v.name, v.fixed)
                                                                              for v in saved.vertebrae]
        np.testing.assert_array_equal(loaded.result.components, saved.components)
        for a, b in zip(loaded.result.vertebrae, saved.vertebrae):
            np.testing.assert_array_equal(a.level_log_scores, b.level_log_scores)
        assert loaded.corrections == labeled.corrections
        assert_nodes_match(loaded)
        assert savedLabelings(mrml.scene, [loaded.segmentationNode]) == []  # one labelling is followed once

        loaded.markupsNode.SetNthControlPointLocked(point_index(loaded, "L2"), False)  # its neighbours follow it back
        assert [v.name for v in loaded.result.vertebrae] == ["T11", "T12", "L1", "L2", "L3", "L4"]
        assert_nodes_match(loaded)
        loaded.markupsNode.RemoveNthControlPoint(0)
        assert [v.name for v in loaded.result.vertebrae] == ["T12", "L1", "L2", "L3", "L4"]
        assert_nodes_match(loaded)
        assert [c["action"] for c in provenance_of(loaded.exportCase(tmp_path / "dataset"))["corrections"]] == [
            "rename", "unlock", "delete"]
    finally:
        loaded.cleanup()


def exported_values(mrml, segmentationNode) -> list[int]:
    """The voxel values of all segments exported to a labelmap as the Segmentations module exports them, with the
    segmentation's labelmap conversion colour table (the module's default choice)."""
    labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    for segmentId in segmentationNode.GetSegmentation().GetSegmentIDs():
        ids.InsertNextValue(segmentId)
    assert mrml.segmentations.ExportSegmentsToLabelmapNode(
        segmentationNode, ids, labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
        segmentationNode.GetLabelmapConversionColorTableNode())
    return np.unique(numpy_support.vtk_to_numpy(labelmap.GetImageData().GetPointData().GetScalars())).tolist()


@pytest.mark.parametrize("bundle", [False, True], ids=["mrml", "mrb"])
def test_slicer_s_export_to_a_labelmap_keeps_the_verse_values(labeled, mrml, tmp_path, bundle):
    """Without a colour table, Slicer's export numbered the segments 1, 2, ... in their order (T12-L5 as 1-6); the
    scene's one table of the levels, shared by its labellings, gives each its VerSe value, after a rename and once the
    scene is saved and loaded back."""
    labeled.markupsNode.SetNthControlPointLabel(point_index(labeled, "L1"), "L2")
    wanted = [0] + [v.label for v in labeled.result.vertebrae]
    assert exported_values(mrml, labeled.segmentationNode) == wanted
    other = LabelingScene(addVolumeNodeFromImage(mrml.scene, labeled.image, "other"), labeled.result.copy())
    assert other.segmentationNode.GetLabelmapConversionColorTableNodeID() == (
        labeled.segmentationNode.GetLabelmapConversionColorTableNodeID())
    other.removeNodes()
    (loaded,) = save_and_load(mrml, labeled, tmp_path / "scene", bundle)
    try:
        assert exported_values(mrml, loaded.segmentationNode) == wanted
    finally:
        loaded.cleanup()


def test_a_volume_labelled_again_after_its_points_were_deleted_is_followed_with_the_new_labelling(labeled, mrml,
                                                                                                    tmp_path):
    """The points deleted in the Data module leave the segmentation, labelling state and all; the volume labelled
    again and corrected, the scene saved and opened again: the old segmentation node, first in the scene, was followed
    (with new points, none of the corrections) and the corrected labelling was left as dead nodes."""
    mrml.scene.RemoveNode(labeled.markupsNode)
    labeled.cleanup()
    again = LabelingScene(labeled.volumeNode, labeled.result.copy())
    again.markupsNode.SetNthControlPointLabel(point_index(again, "L1"), "L2")
    renamed = [(v.id, v.name, v.fixed) for v in again.result.vertebrae]
    (loaded,) = save_and_load(mrml, again, tmp_path / "scene", bundle=True)
    try:
        assert [(v.id, v.name, v.fixed) for v in loaded.result.vertebrae] == renamed
        assert [c["action"] for c in loaded.corrections] == ["rename"]
        assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 1  # no new points made
        assert_nodes_match(loaded)
    finally:
        loaded.cleanup()


def test_a_segment_removed_before_the_scene_was_saved_is_taken_in_once_loaded(labeled, mrml, tmp_path):
    removed = labeled.result.vertebrae[-1].id
    labeled.segmentationNode.GetSegmentation().RemoveSegment(segmentIdOf(removed))
    (loaded,) = save_and_load(mrml, labeled, tmp_path / "scene", bundle=False)
    assert [v.name for v in loaded.result.vertebrae] == ["T11", "T12", "L1", "L2", "L3"]
    assert loaded.corrections == [{"action": "segment_edit", "vertebra_ids": [removed]}]
    assert_nodes_match(loaded)
    loaded.cleanup()


def test_a_labelling_of_a_left_handed_grid_is_followed_again_once_loaded(mrml, spine, tmp_path):
    """A volume made in memory on a left-handed voxel grid (its k axis running head to feet, as in a real MRI's
    header) is read back from the scene's file on the same voxel centres indexed the other way, and the labelling was
    refused as off its grid: not followed again, its points and segments no longer correctable."""
    g = spine.result.geometry
    far = (g.size[2] - 1) * g.spacing[2]
    flipped = Geometry(g.size, g.spacing, (0.0, 0.0, far), (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.flip(sitk.GetArrayFromImage(spine.image), 0)))
    image.SetSpacing(g.spacing)
    image.SetOrigin(flipped.origin)
    image.SetDirection(flipped.direction)
    result = spine.result.copy(geometry=flipped, components=np.ascontiguousarray(np.flip(spine.result.components, 0)))
    labeling = LabelingScene(addVolumeNodeFromImage(mrml.scene, image, "spine"), result)
    (loaded,) = save_and_load(mrml, labeling, tmp_path / "scene", bundle=False)
    assert loaded.result.geometry.matches(g)  # as read back: the grid the spine was built on
    np.testing.assert_array_equal(loaded.result.components, spine.result.components)
    assert [v.name for v in loaded.result.vertebrae] == [v.name for v in spine.result.vertebrae]
    assert_nodes_match(loaded)
    loaded.markupsNode.SetNthControlPointLabel(point_index(loaded, "L1"), "L2")
    assert [v.name for v in loaded.result.vertebrae] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    np.testing.assert_array_equal(layer_voxels(loaded) > 0, spine.result.components > 0)
    loaded.cleanup()


def test_a_labelling_under_a_rotation_comes_back_with_its_voxels_once_loaded(mrml, spine, tmp_path):
    """The segments' grid for saving was taken before the segmentation went under the volume's transform: the volume's
    grid turned by it, onto which the segments were resampled when saved (a real CT under a rotation of 12.5 degrees
    came back with 1.8 % of its labelled voxels moved)."""
    volume = addVolumeNodeFromImage(mrml.scene, spine.image, "spine")
    turn = vtk.vtkTransform()
    turn.RotateWXYZ(12.5, 0.3, 0.9, 0.3)
    turn.Translate(10.0, -20.0, 5.0)
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "turn")
    transform.SetMatrixTransformToParent(turn.GetMatrix())
    volume.SetAndObserveTransformNodeID(transform.GetID())
    labeling = LabelingScene(volume, spine.result)
    (loaded,) = save_and_load(mrml, labeling, tmp_path / "scene", bundle=False)
    np.testing.assert_array_equal(loaded.result.components, spine.result.components)
    np.testing.assert_array_equal(layer_voxels(loaded) > 0, spine.result.components > 0)
    assert loaded.corrections == []
    assert loaded.segmentationNode.GetTransformNodeID() == loaded.volumeNode.GetTransformNodeID()
    loaded.cleanup()


def test_a_saved_labelling_whose_segments_were_not_read_is_left_as_saved(labeled, mrml, tmp_path):
    """The segmentation's file moved away: the scene loads without a segment, and following the labelling again
    would delete every vertebra and its point, and save that over the labelling with the scene."""
    from SpineLabelLogic.scene import STATE_ATTRIBUTE

    saved = labeled.segmentationNode.GetAttribute(STATE_ATTRIBUTE)
    points = labeled.markupsNode.GetNumberOfControlPoints()
    assert save_and_load(mrml, labeled, tmp_path / "scene", bundle=False, lost=".seg.nrrd") == []
    assert mrml.scene.GetFirstNodeByClass("vtkMRMLSegmentationNode").GetAttribute(STATE_ATTRIBUTE) == saved
    assert mrml.scene.GetFirstNodeByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfControlPoints() == points


# ------------------------------------------------------------------------------------- the panels, Qt faked


class _Anything:
    """What qt gives beyond what a test reads (a table item, a brush, a flag): it takes any call."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __or__(self, other):
        return self


class _Widget(types.SimpleNamespace):
    """A widget of the panel's .ui file: the properties the panel sets and a test reads; its methods do nothing."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class _Ui:
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        widget = _Widget(value=0, text="", enabled=True, visible=True)
        setattr(self, name, widget)
        return widget


@pytest.fixture
def modules(mrml, monkeypatch):
    """SpineLabel.py and SpineLabelTraining.py loaded outside Slicer, over slicer-core: qt, the scripted-module base
    classes, i18n and the parameter node wrapper stubbed; ``errors`` collects the messages the panels show."""
    import importlib.util

    import slicer.util

    qt = types.ModuleType("qt")
    qt.__getattr__ = _Anything().__getattr__  # a module's __file__ and the like stay absent (torch reads them)
    monkeypatch.setitem(sys.modules, "qt", qt)
    base = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget"):
        setattr(base, name, type(name, (), {"__init__": lambda self, *args, **kwargs: None}))
    # as Slicer's: a unittest.TestCase that shows its steps (here: shows nothing)
    base.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (unittest.TestCase,), {
        "delayDisplay": lambda self, message, *args, **kwargs: None})
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr, i18n.translate = (lambda text: text), (lambda context, text: text)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper, wrapper.Choice, wrapper.WithinRange = (lambda cls: cls), _Anything, _Anything
    for name, stub in (("ScriptedLoadableModule", base), ("i18n", i18n), ("parameterNodeWrapper", wrapper)):
        monkeypatch.setitem(sys.modules, f"slicer.{name}", stub)
        monkeypatch.setattr(slicer, name, stub, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
        setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None, testingEnabled=lambda: False),
        raising=False)
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: errors.append(text))
    root = Path(__file__).resolve().parents[1]
    loaded = {}
    for name in ("SpineLabel", "SpineLabelTraining"):  # SpineLabelTraining imports from SpineLabel
        spec = importlib.util.spec_from_file_location(name, root / name / f"{name}.py")
        loaded[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, loaded[name])
        spec.loader.exec_module(loaded[name])
    return types.SimpleNamespace(label=loaded["SpineLabel"], train=loaded["SpineLabelTraining"], errors=errors)


def labelling_panel(modules, volume):
    widget = modules.label.SpineLabelWidget()
    widget.ui, widget.logic = _Ui(), modules.label.SpineLabelLogic()
    widget.show3DButton, widget._timer = _Widget(), _Widget()
    widget._parameterNode = types.SimpleNamespace(inputVolume=volume, modelPath="", device="cpu",
                                                  checkOrientation=False, skipSpineGate=False, modality="auto")
    return widget


def test_a_required_package_that_fails_to_import_is_missing_and_installed_again(modules, tmp_path, monkeypatch):
    """Its folder there, the module SpineLabel uses of it failing to import (a half-finished install, a dependency of
    its own missing): it counted as installed, the panel then failed on the ImportError, and pip, asked for it, would
    have left it as it was."""
    (tmp_path / "spinelabel_broken").mkdir()
    (tmp_path / "spinelabel_broken" / "__init__.py").write_text("")  # loads its modules when first used
    (tmp_path / "spinelabel_broken" / "used.py").write_text("import spinelabel_absent_dependency\n")
    (tmp_path / "spinelabel_broken-1.2.dist-info").mkdir()
    (tmp_path / "spinelabel_broken-1.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: spinelabel-broken\nVersion: 1.2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(modules.label.REQUIRED_PACKAGES, "spinelabel_broken", "spinelabel-broken>=1")
    monkeypatch.setitem(modules.label.USED_MODULES, "spinelabel_broken", "spinelabel_broken.used")
    logic = modules.label.SpineLabelLogic
    assert logic.missingPackages() == ["spinelabel-broken>=1"]
    assert logic.availableModels() == []  # rather than the ImportError
    panel = labelling_panel(modules, None)
    panel.updateDependencyStatus()
    assert panel.ui.installButton.visible and "spinelabel_absent_dependency" in panel.ui.statusLabel.text  # why
    calls = []
    monkeypatch.setattr(slicer.util, "pip_install", calls.append)
    logic().installDependencies()
    # that package installed again, alone (with its dependencies pip would reinstall numpy and the rest) and at the
    # release installed (the newest may need a newer numpy), then installed as any other, which brings a dependency
    # of its that is missing
    assert calls == [["--force-reinstall", "--no-deps", "spinelabel-broken==1.2"], ["spinelabel-broken>=1"]]


def test_a_package_that_still_fails_to_import_after_its_reinstall_asks_for_a_restart(modules, tmp_path, monkeypatch):
    """Reinstalled, a package whose failed import left parts of it loaded in Slicer's process can only be loaded in a
    new one: the status line said only that it was missing, and the install button offered the same again."""
    (tmp_path / "spinelabel_unloadable.py").write_text("import spinelabel_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(modules.label.REQUIRED_PACKAGES, "spinelabel_unloadable", "spinelabel-unloadable>=1")
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: None)  # the import fails as before
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: True, raising=False)
    panel = labelling_panel(modules, None)
    panel.updateModelList = lambda: None  # the models are listed once the packages import
    panel.updateDependencyStatus()
    assert "restart" not in panel.ui.statusLabel.text.lower()  # not installed again yet
    panel.onInstallButton()
    assert "Restart Slicer to load spinelabel-unloadable>=1" in panel.ui.statusLabel.text


def test_the_labelling_panel_s_progress_bar_is_emptied_for_an_unlabelled_volume(modules, labeled, mrml, spine):
    panel = labelling_panel(modules, labeled.volumeNode)
    panel._labelings[labeled.volumeNode.GetID()] = labeled
    panel.ui.progressBar.value = 100  # as a finished labelling leaves it
    panel._checkCanApply()
    panel._parameterNode.inputVolume = addVolumeNodeFromImage(mrml.scene, spine.image, "unlabelled")
    panel._checkCanApply()  # as the parameter node's change calls it
    assert panel.ui.progressBar.value == 0


def test_the_labelling_panel_s_progress_bar_is_emptied_by_a_failed_start(modules, labeled, monkeypatch):
    panel = labelling_panel(modules, labeled.volumeNode)
    panel._labelings[labeled.volumeNode.GetID()] = labeled
    panel._checkCanApply()
    panel.ui.progressBar.value = 100  # as a finished labelling leaves it

    def full(*args, **kwargs):  # the volume is copied to a temporary file first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(panel.logic, "startLabelling", full)
    panel.onApplyButton()
    assert panel._process is None and modules.errors  # not started, and the user is told
    assert panel.ui.progressBar.value == 0


def test_a_refused_training_start_leaves_nothing_of_the_last_run(modules, tmp_path):
    panel = modules.train.SpineLabelTrainingWidget()
    panel.ui, panel.logic, panel._timer = _Ui(), modules.train.SpineLabelTrainingLogic(), _Widget()
    panel._parameterNode = types.SimpleNamespace(datasetDirectory=tmp_path / "no dataset", baseModelPath="",
                                                 modelName="m", epochs=1, device="cpu", validationCases=1)
    for status, progress in (("Stopped; no model was registered.", 40), ("Model registered: m.json", 100)):
        panel.ui.statusLabel.text, panel.ui.progressBar.value = status, progress  # as Stop, or a finished run, left
        panel.onTrainButton()
        assert panel._process is None and modules.errors  # refused, and the user is told
        assert panel.ui.statusLabel.text != status and panel.ui.progressBar.value == 0


def test_a_diverged_training_run_is_not_offered_a_resume_and_a_loss_of_n_a_is_shown_so(modules, tmp_path,
                                                                                     monkeypatch):
    """The panel showed Python's 'nan' for a loss spinelabel wrote 'n/a', and after a diverged run offered a command
    that resumes it, which ends the same way (a helper's audit of the messages); one that failed otherwise is."""
    panel = modules.train.SpineLabelTrainingWidget()
    panel.ui, panel.logic, panel._timer = _Ui(), modules.train.SpineLabelTrainingLogic(), _Widget()
    monkeypatch.setattr(panel.logic, "keptAfterFailure", lambda card: tmp_path / "m.ckpt")
    shown = []
    panel.ui.logTextEdit = types.SimpleNamespace(appendPlainText=shown.append)
    for reason, resume in (("training diverged: every step of the last epoch had a non-finite gradient (learning "
                            "rate 0.01); no model written: train again from the start with a lower --lr", False),
                           ("out of memory", True)):
        modules.errors.clear()
        panel._outCard = tmp_path / "m.json"
        panel._process = types.SimpleNamespace(
            running=False, wait=lambda *args: 1, exitDescription=lambda: "exit status 1", env=None,
            command=["spinelabel", "train"], outputTail=lambda: f"spinelabel: error: {reason}",
            readEvents=lambda: [{"event": "epoch", "epoch": 1, "epochs": 2, "fraction": 0.5, "loss": float("nan"),
                                 "metrics": {}}])
        panel.onPollProcess()
        assert shown.pop().startswith("epoch 1/2  loss n/a")
        assert len(modules.errors) == 1 and reason in modules.errors[0]
        assert ("--resume" in modules.errors[0]) == resume


def test_a_failed_training_run_on_windows_is_offered_a_command_prompt_command(modules, tmp_path, monkeypatch):
    """The command shown on Windows had no PYTHONPATH, without which PythonSlicer cannot import SpineLabelLib."""
    panel = modules.train.SpineLabelTrainingWidget()
    panel.ui, panel.logic, panel._timer = _Ui(), modules.train.SpineLabelTrainingLogic(), _Widget()
    monkeypatch.setattr(panel.logic, "keptAfterFailure", lambda card: tmp_path / "m.ckpt")
    panel.ui.logTextEdit = types.SimpleNamespace(appendPlainText=lambda line: None)
    panel._outCard = tmp_path / "m.json"
    panel._process = types.SimpleNamespace(
        running=False, wait=lambda *args: 1, exitDescription=lambda: "exit code 1", outputTail=lambda: "",
        env={"PYTHONPATH": "C:\\Slicer 5.8.1\\modules"}, readEvents=lambda: [],
        command=["C:\\Slicer 5.8.1\\bin\\PythonSlicer.exe", "-m", "SpineLabelLib.cli", "train"])
    with monkeypatch.context() as windows:
        windows.setattr(sys, "platform", "win32")
        panel.onPollProcess()
    assert len(modules.errors) == 1
    assert ('run in a Command Prompt (cmd.exe), continues it and registers the model: set "PYTHONPATH=C:\\Slicer '
            '5.8.1\\modules" && "C:\\Slicer 5.8.1\\bin\\PythonSlicer.exe" -m SpineLabelLib.cli train --resume '
            '--register') in modules.errors[0]


def test_segments_are_merged_from_their_layers_as_slicer_merges_them(labeled, mrml):
    """The read-back merges the segments from the layers' voxels (Slicer's merge took 15-20 s on a 512x512x800 CT);
    the map is the one GenerateMergedLabelmapForAllSegments gives: a segment painted over its neighbour in a layer of
    its own, a segment the user added, a layer cropped to its voxels (and past the grid), either order."""
    from SpineLabelLogic import scene as scene_module

    node, volume = labeled.segmentationNode, labeled.volumeNode
    segmentation, geometry = node.GetSegmentation(), labeled.result.geometry

    def assert_same_merge():
        ids = [i for i in segmentation.GetSegmentIDs() if scene_module.vertebraIdOf(i) is not None]
        for order in (ids, ids[::-1], ids[1::2]):
            fast = scene_module._mergedOnGrid(segmentation, order, geometry)
            assert fast is not None
            np.testing.assert_array_equal(fast, scene_module._mergedBySlicer(node, order, geometry))

    assert_same_merge()
    from slicer.util import arrayFromSegmentBinaryLabelmap
    l2, l3, l4 = (next(v for v in labeled.result.vertebrae if v.name == name) for name in ("L2", "L3", "L4"))
    a2 = arrayFromSegmentBinaryLabelmap(node, segmentIdOf(l2.id), volume).astype(bool)
    a3 = arrayFromSegmentBinaryLabelmap(node, segmentIdOf(l3.id), volume).astype(bool)
    painted = a3 & np.isin(np.arange(a3.shape[0]), np.flatnonzero(a3.any(axis=(1, 2)))[-3:])[:, None, None]
    segmentation.SeparateSegmentLabelmap(segmentIdOf(l2.id))
    layer = segmentation.GetLayerDataObject(segmentation.GetLayerIndex(segmentIdOf(l2.id)))
    voxels = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(layer.GetDimensions()[::-1])
    voxels[(a2 | painted)[tuple(slice(e0, e1 + 1) for e0, e1 in
                                zip(layer.GetExtent()[4::-2], layer.GetExtent()[5::-2]))]] = \
        segmentation.GetSegment(segmentIdOf(l2.id)).GetLabelValue()
    layer.Modified()
    assert segmentation.GetNumberOfLayers() == 2 and painted.any()
    assert_same_merge()
    segmentation.AddEmptySegment("note", "note")
    assert_same_merge()
    segmentation.SeparateSegmentLabelmap(segmentIdOf(l4.id))
    layer = segmentation.GetLayerDataObject(segmentation.GetLayerIndex(segmentIdOf(l4.id)))
    box = scene_module.nonzero_box(scene_module._voxelsOf(layer))
    pad = vtk.vtkImageConstantPad()  # the layer cropped to its voxels, one voxel past the grid's first corner
    pad.SetInputData(layer)
    pad.SetOutputWholeExtent(box[2].start - 1, box[2].stop, box[1].start - 1, box[1].stop,
                             box[0].start - 1, box[0].stop)
    pad.Update()
    matrix = vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(matrix)
    cropped = slicer.vtkOrientedImageData()
    cropped.ShallowCopy(pad.GetOutput())
    cropped.SetImageToWorldMatrix(matrix)
    layer.DeepCopy(cropped)
    layer.Modified()
    cropped_layer = segmentation.GetLayerDataObject(segmentation.GetLayerIndex(segmentIdOf(l4.id)))
    assert cropped_layer.GetExtent()[0] == box[2].start - 1
    assert_same_merge()
    labeled.markupsNode.SetNthControlPointLocked(point_index(labeled, "L1"), True)  # read back: L3's top is L2's
    assert labeled.lastError == "" and np.all(labeled.result.components[painted] == l2.id)


def test_a_layer_off_the_grid_is_merged_by_slicer(labeled):
    from SpineLabelLogic import scene as scene_module

    segmentation, geometry = labeled.segmentationNode.GetSegmentation(), labeled.result.geometry
    ids = list(segmentation.GetSegmentIDs())
    layer = segmentation.GetLayerDataObject(0)
    matrix = vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(matrix)
    matrix.SetElement(0, 3, matrix.GetElement(0, 3) + 0.5)  # half a voxel or so aside
    layer.SetImageToWorldMatrix(matrix)
    assert scene_module._mergedOnGrid(segmentation, ids, geometry) is None


def test_unedited_segments_are_not_read_back_for_an_export_or_an_added_vertebra(labeled, tmp_path, monkeypatch):
    """A read-back goes over the whole volume; before an export or an added vertebra it was made with nothing
    edited (15-20 s of a 20 s added vertebra on a 512x512x800 CT). Edits are still taken in."""
    from SpineLabelLogic import scene as scene_module

    merges = []
    merge = scene_module._mergedSegments
    monkeypatch.setattr(scene_module, "_mergedSegments", lambda *args: merges.append(1) or merge(*args))
    l2 = next(v for v in labeled.result.vertebrae if v.name == "L2")
    labeled.delete(l2.id)
    labeled.addVertebra(l2.centroid_lps_mm)  # brings it back
    labeled.exportCase(tmp_path / "Dataset001_Spine")
    assert merges == [] and [c["action"] for c in labeled.corrections] == ["delete", "restore"]
    voxels = layer_voxels(labeled)
    erased = voxels == BY_NAME["L3"].label
    voxels[erased] = 0  # erased in the Segment Editor
    labeled.segmentationNode.GetSegmentation().GetLayerDataObject(0).Modified()
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(labeled.exportCase(tmp_path / "Dataset002_Spine"))))
    assert merges and labeled.corrections[-1]["action"] == "segment_edit"
    assert erased.any() and not exported[erased].any()
    assert_nodes_match(labeled)


def test_a_segmentation_made_of_closed_surfaces_is_not_read_as_empty(labeled):
    """A segmentation whose source representation was made closed surface (Segmentations module) has layers of
    surfaces, no voxels: read from them, every vertebra was deleted at the next correction. Slicer's merge reads the
    labelmaps converted from the surfaces, as before c14c911."""
    from SpineLabelLogic import scene as scene_module

    node = labeled.segmentationNode
    segmentation = node.GetSegmentation()
    names = [v.name for v in labeled.result.vertebrae]
    assert node.CreateClosedSurfaceRepresentation()
    segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    assert node.CreateBinaryLabelmapRepresentation()
    ids = list(segmentation.GetSegmentIDs())
    assert scene_module._mergedOnGrid(segmentation, ids, labeled.result.geometry) is None
    labeled.markupsNode.SetNthControlPointLocked(point_index(labeled, "L1"), True)
    assert [v.name for v in labeled.result.vertebrae] == names and labeled.lastError == ""


@pytest.mark.parametrize("deleted", ["segmentationNode", "markupsNode"])
def test_labelling_again_after_one_of_its_nodes_was_deleted_leaves_no_node_of_the_old_one(modules, labeled, mrml,
                                                                                            spine, deleted):
    """The user deleted the segmentation (or the points) of a labelling in the Data module: the panel stopped
    following it and asked for a new labelling, which was made beside the node left of the old one, under the same
    name and shown over it; a point of the old one renamed or moved, or its segments edited, were taken in nowhere."""
    volume = labeled.volumeNode
    panel = labelling_panel(modules, volume)
    panel._labelings[volume.GetID()] = labeled
    left = labeled.markupsNode if deleted == "segmentationNode" else labeled.segmentationNode
    node = getattr(labeled, deleted)
    mrml.scene.RemoveNode(node)
    panel.onNodeRemoved(mrml.scene, mrml.scene.NodeRemovedEvent, node)
    assert volume.GetID() not in panel._labelings and "Label it again" in panel.ui.statusLabel.text
    panel.logic.finishLabelling = lambda volume, outputDir: LabelingScene(volume, spine.result.copy())
    panel._process, panel._outputDir, panel._labelledVolume = types.SimpleNamespace(finish=lambda: 0), None, volume
    panel._finishLabelling()
    new = panel._labelings[volume.GetID()]
    try:
        assert left.GetScene() is None
        assert mrml.scene.GetNumberOfNodesByClass(left.GetClassName()) == 1
        assert_nodes_match(new)
    finally:
        new.cleanup()


def test_the_panel_keeps_no_node_the_user_deleted(modules, labeled, mrml):
    """The panel kept the nodes of a labelling whose segmentation the user deleted until the volume was labelled
    again: the deleted segmentation node, out of the scene, stayed alive with its segments' voxels."""
    volume, segmentation = labeled.volumeNode, labeled.segmentationNode
    panel = labelling_panel(modules, volume)
    panel._labelings[volume.GetID()] = labeled
    deleted = vtk.vtkWeakReference()
    deleted.Set(segmentation)
    mrml.scene.RemoveNode(segmentation)
    panel.onNodeRemoved(mrml.scene, mrml.scene.NodeRemovedEvent, segmentation)
    del segmentation
    labeled.segmentationNode = None  # the test's own labelling, which the panel no longer follows, lets go of it
    assert deleted.Get() is None


def test_the_panel_says_which_earlier_case_an_export_replaces(modules, labeled, tmp_path):
    """Two labellings of one image (a volume and its clone) exported to one dataset: the second export removed the
    case of the first, as an export of the same image does, and the panel said only 'Exported ...'."""
    panel = labelling_panel(modules, labeled.volumeNode)
    panel._labelings[labeled.volumeNode.GetID()] = labeled
    panel._parameterNode.datasetDirectory = str(tmp_path / "Dataset001_Spine")
    panel.onExportButton()
    assert panel.ui.statusLabel.text.splitlines()[0].endswith("spine_ct_0001.nii.gz")
    panel.onExportButton()
    assert panel.ui.statusLabel.text.splitlines()[0].endswith("spine_ct_0002.nii.gz in place of spine_ct_0001, an "
                                                              "earlier export of the same image")


def test_the_panel_names_the_uncertain_names_an_export_takes_unchecked(modules, labeled, tmp_path):
    """A labelling exported with names still highlighted as uncertain (not locked nor renamed) said only 'Exported
    ...': training takes every exported name as true."""
    from SpineLabelLib.sequence import UNCERTAIN_BELOW
    panel = labelling_panel(modules, labeled.volumeNode)
    panel._labelings[labeled.volumeNode.GetID()] = labeled
    panel._parameterNode.datasetDirectory = str(tmp_path / "Dataset001_Spine")
    uncertain = [v for v in labeled.result.vertebrae if v.confidence < UNCERTAIN_BELOW]
    assert uncertain  # the test spine's own
    panel.onExportButton()
    assert panel.ui.statusLabel.text.splitlines()[1] == (
        f"Exported as named, still uncertain and neither locked nor renamed by you: "
        f"{', '.join(v.name for v in uncertain)} (training takes them as true).")
    for v in uncertain:
        labeled.setLocked(v.id, True)
    panel.onExportButton()
    assert len(panel.ui.statusLabel.text.splitlines()) == 1


def test_an_export_whose_record_is_gone_before_it_is_named_is_not_a_failure(modules, labeled, tmp_path,
                                                                             monkeypatch):
    """The panel reads back the provenance record to name the case an export replaced: one gone by then (another
    session's export of the same image replaced the case in between) showed 'Failed to export the case.' with
    "'NoneType' object is not subscriptable" for an export that was made."""
    panel = labelling_panel(modules, labeled.volumeNode)
    panel._labelings[labeled.volumeNode.GetID()] = labeled
    panel._parameterNode.datasetDirectory = str(tmp_path / "Dataset001_Spine")
    export = panel.logic.exportCase

    def exportedThenReplaced(labeling, folder, caseId=None):
        path = export(labeling, folder, caseId)
        (Path(folder) / "provenance" / Path(path).name.replace(".nii.gz", ".json")).unlink()
        return path

    monkeypatch.setattr(panel.logic, "exportCase", exportedThenReplaced)
    modules.errors.clear()
    panel.onExportButton()
    assert not modules.errors and panel.ui.statusLabel.text.splitlines()[0].endswith("spine_ct_0001.nii.gz")


def test_deleting_a_labelled_volume_with_its_children_asks_for_no_new_labelling(modules, labeled, mrml):
    """The Data module deletes a volume's branch children first: the panel took the removal of the segmentation for
    the user deleting it alone, said 'The vertebra segmentation or points of spine were deleted ... Label it again.',
    and the message stayed once the volume itself was gone (a helper's probe of a long session of labellings)."""
    volume = labeled.volumeNode
    panel = labelling_panel(modules, volume)
    panel._labelings[volume.GetID()] = labeled
    panel.addObserver(mrml.scene, mrml.scene.NodeRemovedEvent, panel.onNodeRemoved)  # as setup() does
    try:
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
        sh.RemoveItem(sh.GetItemByDataNode(volume), True, True)
        assert volume.GetScene() is None and not panel._labelings and not panel._abandoned
        assert "Label it again" not in panel.ui.statusLabel.text
    finally:
        panel.removeObservers()


def test_a_followed_labelling_keeps_no_copy_of_its_volume(labeled, tmp_path):
    """After an export (or an added vertebra) the labelling kept the volume's voxels it had read, a second copy of
    every labelled volume (0.8 GB for a 512x512x800 CT) for as long as it was followed (a helper's probe of a long
    session of labellings)."""
    labeled.exportCase(tmp_path / "Dataset001_Spine")
    assert not [name for name, value in vars(labeled).items() if isinstance(value, sitk.Image)]


def test_the_module_self_test_passes_and_checks_the_names(modules, monkeypatch):
    """SpineLabelTest, which Slicer's CTest runs, as it runs it: it passed with every vertebra named four levels too
    high (it counted segments and files; a helper's probe of the in-process labelling), and no test here ran it."""
    from SpineLabelLib import pipeline

    def run() -> unittest.TestResult:
        result = unittest.TestResult()
        modules.label.SpineLabelTest("test_SpineLabel_phantom").run(result)
        assert not result.skipped and not result.errors
        return result

    assert run().wasSuccessful()
    label_spine, regular = pipeline.label_spine, [level.name for level in LEVELS if not level.transitional]

    def shifted(*args, **kwargs):  # every name four levels too high, segments and points as named
        result = label_spine(*args, **kwargs)
        for v in result.vertebrae:
            v.name = regular[regular.index(v.name) - 4]
        return result

    monkeypatch.setattr(pipeline, "label_spine", shifted)
    assert len(run().failures) == 1


def test_labelling_no_volume_in_the_process_is_refused_as_in_the_background(modules):
    """logic.label(None) failed with "'NoneType' object has no attribute 'GetImageData'" where startLabelling says
    to select a volume (a helper's probe of the in-process labelling)."""
    logic = modules.label.SpineLabelLogic()
    for start in (logic.label, logic.startLabelling):
        with pytest.raises(ValueError, match="Select an input volume"):
            start(None)


# ------------------------------------------------------------------------------------------ the panels' own behaviour


class _Timer:
    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class _FakeProcess:
    """A background process as the panels poll it: ``events`` read at once, ``late`` only once its output was read to
    the end (``wait``), as the last lines of a process that has just ended are."""

    def __init__(self, events=(), running=True, code=0, late=(), tail=""):
        self.events, self.late, self.running, self.code, self.tail = list(events), list(late), running, code, tail
        self.calls, self.env, self.command = [], None, ["spinelabel", "train"]

    def readEvents(self):
        events, self.events = self.events, []
        return events

    def wait(self, *args):
        self.calls.append("wait")
        self.events += self.late
        self.late = []
        return self.code

    def finish(self, *args):
        self.calls.append("finish")
        return self.code

    def cancel(self, *args):
        self.calls.append("cancel")
        self.running = False

    def outputTail(self):
        return self.tail

    def exitDescription(self):
        return f"exit status {self.code}"


def _runFolder(tmp_path) -> Path:
    outputDir = tmp_path / "SpineLabel-run" / "result"
    outputDir.mkdir(parents=True)
    return outputDir


def test_the_labelling_panel_passes_its_settings_shows_progress_and_cancels(modules, labeled, monkeypatch, tmp_path):
    """What a user sees from Label spine to Cancel: the settings given to the process, buttons that cannot act on a
    labelling while one runs, progress in percent with the worker's message, and Cancel ending it all."""
    volume = labeled.volumeNode
    panel = labelling_panel(modules, volume)
    panel._labelings[volume.GetID()] = labeled
    panel._timer = _Timer()
    panel._parameterNode.device, panel._parameterNode.modality, panel._parameterNode.skipSpineGate = "cuda", "mr", True
    panel._checkCanApply()
    assert panel.ui.applyButton.text == "Label spine"
    assert panel.ui.exportButton.enabled and panel.ui.addVertebraButton.enabled and panel.show3DButton.enabled
    outputDir, started = _runFolder(tmp_path), []
    fake = _FakeProcess([{"event": "progress", "fraction": 0.25, "message": "Finding the spine"}])
    monkeypatch.setattr(panel.logic, "startLabelling", lambda *args: started.append(args) or (fake, outputDir))
    panel.onApplyButton()
    assert started == [(volume, None, "cuda", False, False, "mr")]  # the gate skipped: spineGate False
    assert panel._timer.active and panel.ui.statusLabel.text == "Starting..." and panel._labelledVolume is volume
    assert panel.ui.applyButton.text == "Cancel" and panel.ui.applyButton.enabled
    assert not (panel.ui.inputVolumeSelector.enabled or panel.ui.exportButton.enabled
                or panel.ui.addVertebraButton.enabled or panel.show3DButton.enabled)
    assert panel.show3DButton.locked
    panel.onPollProcess()
    assert panel.ui.progressBar.value == 25 and panel.ui.statusLabel.text == "Finding the spine"
    panel.onApplyButton()  # Cancel
    assert fake.calls == ["cancel"] and not outputDir.parent.exists() and panel._process is None
    assert panel.ui.statusLabel.text == "Cancelled." and not panel._timer.active
    assert panel.ui.applyButton.text == "Label spine" and panel.ui.inputVolumeSelector.enabled
    assert panel.ui.exportButton.enabled and not panel.show3DButton.locked


def test_a_new_labelling_replaces_a_corrected_one_only_when_the_user_says_so(modules, labeled, spine, monkeypatch,
                                                                              tmp_path):
    volume = labeled.volumeNode
    panel = labelling_panel(modules, volume)
    panel._labelings[volume.GetID()] = labeled
    panel._timer = _Timer()
    labeled.markupsNode.SetNthControlPointLocked(0, True)  # one correction
    asked, answers, new = [], [], []
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kwargs: asked.append(text) or answers.pop(0),
                        raising=False)
    monkeypatch.setattr(panel.logic, "finishLabelling",
                        lambda v, o: new.append(LabelingScene(v, spine.result.copy())) or new[-1])

    def finished(answer):
        answers.append(answer)
        outputDir = _runFolder(tmp_path)
        panel._process, panel._outputDir, panel._labelledVolume = _FakeProcess([{"event": "done"}]), outputDir, volume
        panel.onPollProcess()
        return outputDir

    def unreadable():
        raise RuntimeError("the Segment Editor's edits cannot be read back")

    with monkeypatch.context() as m:  # edits that cannot be read back: asked all the same
        m.setattr(labeled, "correctionCount", unreadable)
        outputDir = finished(False)
    assert asked == ["Replace the labelling of spine, with the correction made to it, by the new one?"]
    assert not new and not outputDir.parent.exists() and panel._labelings[volume.GetID()] is labeled
    assert panel.ui.statusLabel.text == "New labelling discarded; the corrected one is kept."
    assert panel.ui.progressBar.value == 0
    labeled.markupsNode.SetNthControlPointLocked(1, True)
    finished(True)
    try:
        assert asked[-1] == "Replace the labelling of spine, with the 2 corrections made to it, by the new one?"
        assert panel._labelings[volume.GetID()] is new[0] and labeled.segmentationNode.GetScene() is None
        assert labeled.markupsNode.GetScene() is None
        assert panel.ui.progressBar.value == 100
        assert panel.ui.statusLabel.text == f"{len(spine.result.vertebrae)} vertebrae labelled, read as CT."
        panel.ui.statusLabel.text = ""
        new[0].markupsNode.SetNthControlPointLocked(0, True)  # a correction of the new labelling reaches the panel
        assert panel.ui.statusLabel.text.endswith("vertebrae labelled, read as CT.")
    finally:
        new[0].cleanup()


def test_a_failed_or_crashed_labelling_is_reported_under_the_volume_s_name(modules, labeled, tmp_path):
    volume = labeled.volumeNode
    panel = labelling_panel(modules, volume)
    panel._timer = _Timer()
    outputDir = _runFolder(tmp_path)
    temporary = str(panel.logic.inputPath(outputDir))
    fake = _FakeProcess([{"event": "error", "message": f"{temporary}: no vertebra found"}])
    panel._process, panel._outputDir, panel._labelledVolume = fake, outputDir, volume
    panel._timer.start()
    panel.ui.progressBar.value = 60
    panel.onPollProcess()
    assert modules.errors == ["Labelling failed: spine: no vertebra found"]
    assert "finish" in fake.calls and not outputDir.parent.exists() and panel._process is None
    assert not panel._timer.active and panel.ui.statusLabel.text == "Labelling failed."
    assert panel.ui.progressBar.value == 0 and panel.ui.applyButton.text == "Label spine"
    # its last line read only once its output is read to the end
    outputDir = _runFolder(tmp_path)
    fake = _FakeProcess(running=False, code=1, late=[{"event": "error", "message": "out of memory"}])
    panel._process, panel._outputDir, panel._labelledVolume = fake, outputDir, volume
    panel.onPollProcess()
    assert modules.errors[-1] == "Labelling failed: out of memory"
    # ended without a word (killed)
    outputDir = _runFolder(tmp_path)
    fake = _FakeProcess(running=False, code=-9)
    panel._process, panel._outputDir, panel._labelledVolume = fake, outputDir, volume
    panel.onPollProcess()
    assert modules.errors[-1] == "The labelling process of spine stopped unexpectedly (exit status -9)."
    assert not outputDir.parent.exists() and panel.ui.statusLabel.text == "Labelling failed."


def test_the_vertebra_table_shows_names_confidences_locks_and_what_to_check(modules, labeled, monkeypatch):
    from SpineLabelLib.sequence import UNCERTAIN_BELOW

    class Item:
        def __init__(self, text):
            self.text, self.background = text, None

        def setBackground(self, brush):
            self.background = brush

        def __getattr__(self, name):
            return lambda *args: None

    monkeypatch.setattr(modules.label.qt, "QTableWidgetItem", Item, raising=False)
    rows, cells = [], {}
    panel = labelling_panel(modules, labeled.volumeNode)
    panel.ui.vertebraTable = types.SimpleNamespace(setRowCount=rows.append,
                                                   setItem=lambda r, c, item: cells.__setitem__((r, c), item))
    panel._labelings[labeled.volumeNode.GetID()] = labeled
    labeled.changedCallbacks.append(panel.onLabelingChanged)

    def table():
        assert rows[-1] == len(labeled.result.vertebrae)
        return [tuple(cells[r, c].text for c in range(3)) + (cells[r, 0].background is not None,)
                for r in range(rows[-1])]

    panel._checkCanApply()  # shows the selected volume's labelling
    vertebrae = labeled.result.vertebrae
    assert table() == [(v.name, confidence_text(v.confidence), "", v.confidence < UNCERTAIN_BELOW) for v in vertebrae]
    uncertain = next(i for i, v in enumerate(vertebrae) if v.confidence < UNCERTAIN_BELOW)
    labeled.markupsNode.SetNthControlPointLocked(labeled.pointIndexOf(vertebrae[uncertain].id), True)
    assert table()[uncertain][2:] == ("yes", False)  # locked: checked, no longer highlighted
    check = modules.label.toCheck
    assert not check(types.SimpleNamespace(confidence=UNCERTAIN_BELOW, fixed=False))  # below, not at
    assert check(types.SimpleNamespace(confidence=UNCERTAIN_BELOW - 0.01, fixed=False))
    assert not check(types.SimpleNamespace(confidence=0.0, fixed=True))


def test_a_click_on_a_row_jumps_to_its_point_and_add_places_one_point(modules, labeled, monkeypatch):
    calls = []
    markups = types.SimpleNamespace(
        JumpSlicesToNthPointInMarkup=lambda nodeId, index, centred: calls.append(("jump", nodeId, index)),
        SetActiveList=lambda node: calls.append(("active", node.GetID())),
        StartPlaceMode=lambda persistent: calls.append(("place", persistent)))
    monkeypatch.setattr(slicer.modules, "markups", types.SimpleNamespace(logic=lambda: markups), raising=False)
    panel = labelling_panel(modules, labeled.volumeNode)
    panel._labelings[labeled.volumeNode.GetID()] = labeled
    node = labeled.markupsNode
    node.SwapControlPoints(0, 1)  # the Markups module's Move down
    panel.onVertebraClicked(0, 0)
    panel.onVertebraClicked(1, 0)
    panel.onAddVertebraButton()
    assert calls == [("jump", node.GetID(), 1), ("jump", node.GetID(), 0), ("active", node.GetID()),
                     ("place", False)]  # one point, not a place mode that stays on


def test_the_panel_shows_a_labelling_s_errors_notices_warnings_and_modality(modules, labeled, mrml):
    panel = labelling_panel(modules, labeled.volumeNode)
    panel._labelings[labeled.volumeNode.GetID()] = labeled
    panel._checkCanApply()
    count = len(labeled.result.vertebrae)
    assert panel.ui.statusLabel.text == f"{count} vertebrae labelled, read as CT."
    assert panel.ui.warningsLabel.text == ("\n".join(labeled.result.warnings) or "No warnings.")
    labeled.lastError, labeled.lastNotice = "L9 is no vertebra", "L1 was locked on another point"
    panel.onLabelingChanged(labeled)
    assert panel.ui.warningsLabel.text.splitlines()[:2] == ["Correction not applied: L9 is no vertebra",
                                                           "L1 was locked on another point"]
    other = build_spine(names=("L1", "L2", "L3"))  # another volume's labelling changed: this panel shows its own
    otherLabeling = LabelingScene(addVolumeNodeFromImage(mrml.scene, other.image, "other"), other.result)
    try:
        panel.onLabelingChanged(otherLabeling)
        assert panel.ui.statusLabel.text == f"{count} vertebrae labelled, read as CT."
        assert panel._shownLabeling is labeled
    finally:
        otherLabeling.cleanup()
    labeled.lastError = labeled.lastNotice = ""
    labeled.result.warnings.clear()
    panel.onLabelingChanged(labeled)
    assert panel.ui.warningsLabel.text == "No warnings."


def test_removing_the_volume_being_labelled_or_closing_the_scene_ends_it_all(modules, labeled, mrml, tmp_path):
    volume = labeled.volumeNode
    panel = labelling_panel(modules, volume)
    panel._timer = _Timer()
    outputDir, fake = _runFolder(tmp_path), _FakeProcess()
    panel._process, panel._outputDir, panel._labelledVolume = fake, outputDir, volume
    panel.onNodeRemoved(mrml.scene, mrml.scene.NodeRemovedEvent, volume)
    assert fake.calls == ["cancel"] and not outputDir.parent.exists() and panel._process is None
    assert panel.ui.statusLabel.text == "Labelling stopped: its volume was removed."
    # closing the scene: nothing followed any longer, the panel's lines emptied, no button acts on a labelling
    panel._labelings[volume.GetID()] = labeled
    panel._abandoned["vtkMRMLScalarVolumeNode9"] = "vtkMRMLMarkupsFiducialNode9"
    panel._parameterNode.disconnectGui = lambda tag: None
    panel.removeObserver = lambda *args: None  # the parameter node's observer: a stub here
    panel.ui.statusLabel.text = panel.ui.warningsLabel.text = "6 vertebrae labelled"
    names = [v.name for v in labeled.result.vertebrae]
    panel.onSceneStartClose(mrml.scene, mrml.scene.StartCloseEvent)
    assert not panel._labelings and not panel._abandoned and panel._parameterNode is None
    assert panel.ui.statusLabel.text == panel.ui.warningsLabel.text == ""
    assert not (panel.ui.exportButton.enabled or panel.ui.addVertebraButton.enabled)
    labeled.markupsNode.SetNthControlPointLabel(0, "C3")  # no longer observed
    assert [v.name for v in labeled.result.vertebrae] == names


def test_the_dependency_line_and_install_button(modules, monkeypatch):
    panel = labelling_panel(modules, None)
    missing = ["torch>=2.2"]
    monkeypatch.setattr(panel.logic, "missingPackages", lambda: list(missing))
    monkeypatch.setattr(panel.logic, "brokenPackages", lambda: {})
    asked, installs, listed = [], [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: asked.append(text) or False,
                        raising=False)
    monkeypatch.setattr(panel.logic, "installDependencies", lambda: installs.append(1) or missing.clear())
    panel.updateModelList = lambda: listed.append(1)
    panel.updateDependencyStatus()
    assert panel.ui.installButton.visible and panel.ui.statusLabel.text == "Missing Python packages: torch>=2.2"
    panel.onInstallButton()
    assert len(asked) == 1 and not installs  # not installed without the user's yes
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kwargs: True, raising=False)
    panel.onInstallButton()
    assert installs and listed  # the models can be listed now
    assert not panel.ui.installButton.visible and panel.ui.statusLabel.text == ""
    panel.ui.statusLabel.text = "Exported case"  # another status stays
    panel.updateDependencyStatus()
    assert panel.ui.statusLabel.text == "Exported case"


class _Combo:
    """A model list as the panels fill it (a QComboBox's items, each text with its data, and the current index)."""

    def __init__(self):
        self.items, self.currentIndex = [], -1

    def clear(self):
        self.items, self.currentIndex = [], -1

    def addItem(self, text, data):
        self.items.append((text, data))

    def findData(self, data):
        return next((i for i, item in enumerate(self.items) if item[1] == data), -1)

    def setCurrentIndex(self, index):
        self.currentIndex = index

    def itemData(self, index):
        return self.items[index][1]

    def blockSignals(self, block):
        pass


def test_the_model_list_offers_the_default_and_drops_a_vanished_choice(modules, monkeypatch):
    panel = labelling_panel(modules, None)
    panel.ui.modelComboBox = combo = _Combo()
    card = {"name": "tuned", "version": "2", "path": "/models/tuned.json"}
    monkeypatch.setattr(panel.logic, "availableModels", lambda: [card])
    monkeypatch.setattr(panel.logic, "missingPackages", lambda: [])
    panel._parameterNode.modelPath = "/models/gone.json"
    panel.updateModelList()
    assert combo.items == [("Default model", ""), ("tuned 2", "/models/tuned.json")]
    assert combo.currentIndex == 0 and panel._parameterNode.modelPath == ""
    panel._parameterNode.modelPath = "/models/tuned.json"
    panel.updateModelList()
    assert combo.currentIndex == 1
    panel.onModelChanged(0)
    assert panel._parameterNode.modelPath == ""
    panel.onModelChanged(1)
    assert panel._parameterNode.modelPath == "/models/tuned.json"
    monkeypatch.setattr(panel.logic, "availableModels", lambda: [])  # the dependencies missing: the choice is kept
    monkeypatch.setattr(panel.logic, "missingPackages", lambda: ["torch>=2.2"])
    panel.updateModelList()
    assert combo.currentIndex == 0 and panel._parameterNode.modelPath == "/models/tuned.json"


def training_panel(modules, tmp_path):
    panel = modules.train.SpineLabelTrainingWidget()
    panel.ui, panel.logic, panel._timer = _Ui(), modules.train.SpineLabelTrainingLogic(), _Timer()
    panel._parameterNode = types.SimpleNamespace(datasetDirectory=tmp_path, baseModelPath="", modelName="m",
                                                 epochs=3, device="cpu", validationCases=2)
    return panel


_TRAINING_SETTINGS = ("datasetDirectoryButton", "baseModelComboBox", "modelNameLineEdit", "epochsSpinBox",
                      "validationCasesSpinBox", "deviceComboBox")


def test_the_training_panel_runs_reports_epochs_and_registers(modules, tmp_path, monkeypatch):
    panel = training_panel(modules, tmp_path)
    log = ["the last run's line"]
    panel.ui.logTextEdit = types.SimpleNamespace(appendPlainText=log.append, clear=log.clear)
    fake, outCard, started, listed = _FakeProcess(), tmp_path / "run" / "m.json", [], []
    monkeypatch.setattr(panel.logic, "startTraining", lambda *args, **kwargs: started.append((args, kwargs)) or (
        fake, outCard))
    monkeypatch.setattr(panel.logic, "finishTraining", lambda card: tmp_path / "models" / Path(card).name)
    panel.updateModelList = lambda: listed.append(1)
    panel.onTrainButton()
    assert started == [((tmp_path, None, "m", 3, "cpu"), {"extraArguments": ("--validation-cases", 2)})]
    assert panel.ui.trainButton.text == "Stop" and panel._timer.active and log == []
    assert panel.ui.statusLabel.text == "Training..."
    assert not any(getattr(panel.ui, name).enabled for name in _TRAINING_SETTINGS)
    fake.events = [{"event": "progress", "fraction": 0.1}]
    panel.onPollProcess()
    assert panel.ui.progressBar.value == 10 and log == []
    fake.events = [{"event": "epoch", "epoch": 1, "epochs": 3, "fraction": 1 / 3, "loss": 0.5,
                    "metrics": {"dice": 0.75}}]
    panel.onPollProcess()
    assert log == ["epoch 1/3  loss 0.5000  dice 0.750"] and panel.ui.progressBar.value == 33
    fake.running, fake.late = False, [{"event": "epoch", "epoch": 3, "epochs": 3, "fraction": 1.0, "loss": 0.25,
                                       "metrics": {"dice": 0.8}}]
    panel.onPollProcess()
    assert log[-1] == "epoch 3/3  loss 0.2500  dice 0.800"  # read after the process ended
    assert panel.ui.statusLabel.text == f"Model registered: {tmp_path / 'models' / 'm.json'}" and listed
    assert panel.ui.progressBar.value == 100 and panel.ui.trainButton.text == "Start training"
    assert all(getattr(panel.ui, name).enabled for name in _TRAINING_SETTINGS) and not panel._timer.active


def test_stop_ends_a_training_run_but_keeps_one_that_has_just_finished(modules, tmp_path, monkeypatch):
    panel = training_panel(modules, tmp_path)
    outCard = tmp_path / "run" / "m.json"
    outCard.parent.mkdir()
    fake = _FakeProcess()
    panel._process, panel._outCard = fake, outCard
    panel._timer.start()
    panel.onTrainButton()  # Stop
    assert fake.calls == ["cancel"] and not outCard.parent.exists() and panel._process is None
    assert panel.ui.statusLabel.text == "Stopped; no model was registered." and not panel._timer.active
    assert panel.ui.trainButton.text == "Start training"
    # stopped after an epoch: its checkpoint kept, with the command that continues it (a fine-tune takes hours)
    from SpineLabelLib.models import checkpoint_path

    log = []
    panel.ui.logTextEdit = types.SimpleNamespace(appendPlainText=log.append)
    outCard.parent.mkdir()
    checkpoint_path(outCard).write_bytes(b"")
    panel._process, panel._outCard = _FakeProcess(), outCard
    panel.onTrainButton()  # Stop
    assert checkpoint_path(outCard).is_file() and panel._process is None
    assert panel.ui.statusLabel.text == "Stopped; no model was registered. Its checkpoint is kept (see the log)."
    assert len(log) == 1 and str(checkpoint_path(outCard)) in log[0]
    assert "spinelabel train --resume --register" in log[0]
    registered = []
    monkeypatch.setattr(panel.logic, "finishTraining", lambda card: registered.append(card) or card)
    panel.updateModelList = lambda: None
    fake = _FakeProcess(running=False)
    panel._process, panel._outCard = fake, outCard
    panel.onTrainButton()  # Stop, pressed once it had ended
    assert registered == [outCard] and "cancel" not in fake.calls


def test_closing_the_training_panel_ends_its_run_and_removes_its_folder(modules, tmp_path):
    """Unlike Stop, nobody is left to be told of the checkpoint: the run's folder goes with it."""
    from SpineLabelLib.models import checkpoint_path

    panel = training_panel(modules, tmp_path)
    panel.removeObservers = lambda: None
    outCard = tmp_path / "run" / "m.json"
    outCard.parent.mkdir()
    checkpoint_path(outCard).write_bytes(b"")
    fake = _FakeProcess()
    panel._process, panel._outCard = fake, outCard
    panel._timer.start()
    panel.cleanup()
    assert fake.calls == ["cancel"] and not outCard.parent.exists() and panel._process is None
    assert not panel._timer.active


def test_a_training_run_killed_by_a_signal_is_a_failure(modules, tmp_path, monkeypatch):
    panel = training_panel(modules, tmp_path)
    panel.ui.logTextEdit = types.SimpleNamespace(appendPlainText=lambda line: None)
    monkeypatch.setattr(panel.logic, "finishTraining", lambda card: pytest.fail("a killed run was registered"))
    panel._process, panel._outCard = _FakeProcess(running=False, code=-9), tmp_path / "run" / "m.json"
    panel.onPollProcess()
    assert modules.errors == ["Training failed (exit status -9)."] and panel.ui.statusLabel.text == "Training failed."


def test_a_failed_training_run_keeps_its_folder_only_with_a_checkpoint(modules, tmp_path):
    from SpineLabelLib.models import checkpoint_path

    logic = modules.train.SpineLabelTrainingLogic()
    outCard = tmp_path / "run" / "m.json"
    outCard.parent.mkdir()
    assert logic.keptAfterFailure(outCard) is None and not outCard.parent.exists()
    outCard.parent.mkdir()
    checkpoint_path(outCard).write_bytes(b"")
    assert logic.keptAfterFailure(outCard) == checkpoint_path(outCard) and outCard.parent.exists()


def test_the_dataset_summary_says_what_is_wrong_with_a_folder(modules, tmp_path):
    summary = modules.train.SpineLabelTrainingLogic.datasetSummary
    assert summary("") == summary(str(tmp_path / "absent")) == "Choose a dataset folder exported from SpineLabel."
    assert summary(str(tmp_path)) == "No dataset.json in this folder."
    (tmp_path / "dataset.json").write_text("{")
    assert summary(str(tmp_path)).startswith("dataset.json unreadable: ")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "numTraining": 1}))
    assert summary(str(tmp_path)).startswith("No labelled case in this folder")
    # the cases training finds, not numTraining (a hand-made folder's can be wrong): a label map and its image each
    for name in ("imagesTr", "labelsTr"):
        (tmp_path / name).mkdir()
    for count, channels, text in ((1, {"0": "CT"}, "1 case, CT"), (2, {"0": "MR"}, "2 cases, MR"),
                                  (3, ["CT"], "3 cases, ?")):
        (tmp_path / "imagesTr" / f"c{count}_0000.nii.gz").touch()
        (tmp_path / "labelsTr" / f"c{count}.nii.gz").touch()
        (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": channels, "numTraining": 4 - count}))
        assert summary(str(tmp_path)) == text
    (tmp_path / "imagesTr" / "c4_0000.nii.gz").touch()  # an image without its label map is no case
    assert summary(str(tmp_path)) == "3 cases, ?"


def test_a_training_start_is_refused_before_anything_runs(modules, tmp_path, monkeypatch):
    """Refused at the start, not after the training: no folder, no dataset.json, missing packages, a name that
    cannot be registered; a start that fails leaves no folder behind; an accepted one trains the shipped model
    when none is chosen, in a process that imports this module's folder."""
    from SpineLabelLib.models import ModelError, default_model_path
    import tempfile

    from SpineLabelLogic import process as process_module

    started = []

    class Process:
        def __init__(self, command, parse, env=None, cwd=None):
            self.command, self.env = command, env

        def start(self):
            started.append(self)
            if self.fail:
                raise OSError("no such executable")

    Process.fail = False
    monkeypatch.setattr(process_module, "BackgroundProcess", Process)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("PYTHONPATH", "")  # this module's folder comes from startTraining, not from the caller's path
    logic = modules.train.SpineLabelTrainingLogic()
    with pytest.raises(ValueError, match="is no folder"):
        logic.startTraining(tmp_path / "absent")
    dataset = tmp_path / "data"
    dataset.mkdir()
    with pytest.raises(ValueError, match="holds no dataset.json"):
        logic.startTraining(dataset)
    (dataset / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "numTraining": 1}))
    with pytest.raises(ModelError):
        logic.startTraining(dataset, modelName="../m")
    with monkeypatch.context() as m:
        m.setattr(logic, "missingPackages", lambda: ["torch>=2.2"])
        with pytest.raises(RuntimeError, match="torch>=2.2"):
            logic.startTraining(dataset)
    assert not started
    Process.fail = True
    with pytest.raises(OSError):
        logic.startTraining(dataset)
    assert not list((tmp_path / "tmp").iterdir())
    Process.fail = False
    process, outCard = logic.startTraining(dataset, None, "m", 1, "cpu")
    assert str(default_model_path()) in map(str, process.command)
    assert str(Path(modules.train.__file__).resolve().parent) in process.env["PYTHONPATH"].split(os.pathsep)
    logic.discardTraining(outCard)


def test_closing_the_panel_stops_its_labelling(modules, labeled, tmp_path):
    panel = labelling_panel(modules, labeled.volumeNode)
    panel._timer = _Timer()
    outputDir, fake = _runFolder(tmp_path), _FakeProcess()
    panel._process, panel._outputDir, panel._labelledVolume = fake, outputDir, labeled.volumeNode
    panel.cleanup()
    assert fake.calls == ["cancel"] and not outputDir.parent.exists()


def test_a_package_at_its_floor_or_without_metadata_is_not_missing(modules, tmp_path, monkeypatch):
    (tmp_path / "spinelabel_floor").mkdir()
    (tmp_path / "spinelabel_floor" / "__init__.py").write_text("")
    (tmp_path / "spinelabel_floor-1.2.dist-info").mkdir()
    (tmp_path / "spinelabel_floor-1.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: spinelabel-floor\nVersion: 1.2\n")
    (tmp_path / "spinelabel_bare.py").write_text("")  # importable, no metadata (a copy of the folder): as it is
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(modules.label.REQUIRED_PACKAGES, "spinelabel_floor", "spinelabel-floor>=1.2")
    monkeypatch.setitem(modules.label.REQUIRED_PACKAGES, "spinelabel_bare", "spinelabel-bare>=1")
    assert modules.label.SpineLabelLogic.missingPackages() == []
    monkeypatch.setitem(modules.label.REQUIRED_PACKAGES, "spinelabel_floor", "spinelabel-floor>=1.3")
    assert modules.label.SpineLabelLogic.missingPackages() == ["spinelabel-floor>=1.3"]


def test_torch_comes_from_the_pytorch_extension_and_the_rest_from_pip(modules, monkeypatch):
    logic = modules.label.SpineLabelLogic()
    torch, scipy = modules.label.REQUIRED_PACKAGES["torch"], modules.label.REQUIRED_PACKAGES["scipy"]
    monkeypatch.setattr(logic, "missingPackages", lambda: [torch, scipy])
    monkeypatch.setattr(logic, "brokenPackages", lambda: {})
    installs = []
    pytorch = types.SimpleNamespace(installTorch=lambda **kwargs: installs.append(
        ("PyTorch", kwargs["torchVersionRequirement"])))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: pytorch))
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: installs.append(("pip", args)))
    logic.installDependencies()
    assert installs == [("PyTorch", ">=2.2"), ("pip", [scipy])]


def test_the_model_lists_hold_the_shipped_model_once(modules, monkeypatch, tmp_path):
    from SpineLabelLib.models import default_model_path

    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path / "models"))
    default = str(default_model_path())
    assert default not in [card["path"] for card in modules.label.SpineLabelLogic.availableModels()]  # its own entry
    assert [card["path"] for card in modules.train.SpineLabelTrainingLogic.availableModels()] == [default]
    monkeypatch.setattr(modules.label.SpineLabelLogic, "missingPackages", staticmethod(lambda: ["torch>=2.2"]))
    assert modules.train.SpineLabelTrainingLogic.availableModels() == []


def test_a_labelling_run_that_fails_leaves_no_temporary_folder(modules, labeled, monkeypatch, tmp_path):
    import tempfile

    from SpineLabelLogic import process as process_module

    class Unstartable:
        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            raise OSError("no such executable")

    monkeypatch.setattr(process_module, "BackgroundProcess", Unstartable)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    logic = modules.label.SpineLabelLogic()
    with pytest.raises(OSError):
        logic.startLabelling(labeled.volumeNode)
    assert not list((tmp_path / "tmp").iterdir())
    outputDir = _runFolder(tmp_path)  # a worker that wrote nothing readable
    with pytest.raises(Exception):
        logic.finishLabelling(labeled.volumeNode, outputDir)
    assert not outputDir.parent.exists()


def test_labelling_in_the_process_passes_its_settings_and_refuses_no_vertebrae(modules, labeled, spine, monkeypatch):
    from SpineLabelLib import pipeline

    calls = []
    found = [spine.result.copy(), spine.result.copy(vertebrae=[])]
    monkeypatch.setattr(pipeline, "label_spine", lambda image, **kwargs: calls.append(kwargs) or found.pop(0))
    logic = modules.label.SpineLabelLogic()
    labeling = logic.label(labeled.volumeNode, device="cpu", checkOrientation=True, spineGate=False, modality="mr")
    labeling.cleanup()
    assert {k: calls[0][k] for k in ("device", "check_orientation", "spine_gate", "modality")} == {
        "device": "cpu", "check_orientation": True, "spine_gate": False, "modality": "mr"}
    with pytest.raises(pipeline.NoVertebrae):
        logic.label(labeled.volumeNode)


def test_the_training_panel_summarises_the_folder_just_chosen(modules, tmp_path):
    panel = training_panel(modules, tmp_path / "elsewhere")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "numTraining": 1}))
    for name in ("imagesTr/a_0000.nii.gz", "labelsTr/a.nii.gz"):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).touch()
    panel.updateDatasetSummary(str(tmp_path))  # the directory button's signal, before the parameter node follows
    assert panel.ui.datasetSummaryLabel.text == "1 case, CT"


def test_the_panel_picks_the_first_scan_and_says_what_apply_needs(modules, mrml, spine):
    labelmap = mrml.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")  # a scalar volume too
    first = addVolumeNodeFromImage(mrml.scene, spine.image, "first")
    second = addVolumeNodeFromImage(mrml.scene, spine.image, "second")
    assert labelmap.GetID() and second.GetID()
    panel = labelling_panel(modules, None)
    panel.addObserver = panel.removeObserver = lambda *args: None  # the parameter node's observer: a stub here
    panel.updateModelList = lambda: None
    node = types.SimpleNamespace(inputVolume=None, connectGui=lambda ui: "tag", disconnectGui=lambda tag: None)
    panel._parameterNode = None
    panel.logic.getParameterNode = lambda: node
    panel.ui.applyButton.enabled = True
    panel.initializeParameterNode()
    assert node.inputVolume is first  # the first scan: not the label map, not the last volume
    node.inputVolume = None
    panel.setParameterNode(node)
    assert not panel.ui.applyButton.enabled and panel.ui.applyButton.toolTip == "Select an input volume"


def test_a_deleted_segmentation_ends_the_panel_s_hold_on_its_points(modules, labeled, mrml):
    """After the segmentation was deleted the panel no longer acts on its labelling: Export and Add are off, the
    message names the volume, and the points left are the user's to rename (no correction reverts them)."""
    volume = labeled.volumeNode
    panel = labelling_panel(modules, volume)
    panel._labelings[volume.GetID()] = labeled
    panel._checkCanApply()
    assert panel.ui.exportButton.enabled
    segmentation = labeled.segmentationNode
    mrml.scene.RemoveNode(segmentation)
    panel.onNodeRemoved(mrml.scene, mrml.scene.NodeRemovedEvent, segmentation)
    assert not (panel.ui.exportButton.enabled or panel.ui.addVertebraButton.enabled)
    assert panel.ui.statusLabel.text == ("The vertebra segmentation or points of spine were deleted: its labels are no "
                                         "longer corrected or exported. Label it again.")
    labeled.markupsNode.SetNthControlPointLabel(0, "mine")
    assert labeled.markupsNode.GetNthControlPointLabel(0) == "mine" and labeled.lastError == ""


def test_a_loaded_scene_s_labellings_are_followed_once(modules, labeled, mrml):
    other = build_spine(names=("L1", "L2", "L3"))
    loaded = LabelingScene(addVolumeNodeFromImage(mrml.scene, other.image, "other"), other.result)
    try:
        panel = labelling_panel(modules, labeled.volumeNode)
        panel._labelings[labeled.volumeNode.GetID()] = labeled
        asked = []
        panel.logic.savedLabelings = lambda followed: asked.append(list(followed)) or [loaded]
        panel.onSceneEndImport()
        assert asked == [[labeled.segmentationNode]]  # those followed already are not followed again
        assert panel._labelings[loaded.volumeNode.GetID()] is loaded
        assert panel.onLabelingChanged in loaded.changedCallbacks  # its corrections reach the panel
    finally:
        loaded.cleanup()


def test_the_logic_exports_a_case_under_the_id_given(modules, labeled, tmp_path):
    path = modules.label.SpineLabelLogic().exportCase(labeled, tmp_path / "Dataset001_Spine", "patient_0042")
    assert Path(path).name == "patient_0042.nii.gz"


def test_the_training_panel_lists_the_base_models_and_takes_the_first(modules, tmp_path, monkeypatch):
    panel = training_panel(modules, tmp_path)
    panel.ui.baseModelComboBox = combo = _Combo()
    cards = [{"name": "spinelabel", "version": "1", "path": "/shipped.json"},
             {"name": "tuned", "version": "2", "path": "/models/tuned.json"}]
    monkeypatch.setattr(panel.logic, "availableModels", lambda: cards)
    panel.updateModelList()
    assert combo.items == [("spinelabel 1", "/shipped.json"), ("tuned 2", "/models/tuned.json")]
    assert combo.currentIndex == 0 and panel._parameterNode.baseModelPath == "/shipped.json"
    panel._parameterNode.baseModelPath = "/models/gone.json"
    panel.updateModelList()
    assert combo.currentIndex == 0 and panel._parameterNode.baseModelPath == "/shipped.json"


def test_a_trained_model_is_registered_under_its_name_and_kept_when_that_fails(modules, tmp_path, monkeypatch):
    from SpineLabelLib import models

    def register(card, name):
        assert Path(card).is_file()  # registered from the training folder, before that is removed
        if name == "refused":
            raise models.ModelError("a model named refused is registered already")
        return tmp_path / "models" / f"{name}.json"

    monkeypatch.setattr(models, "register_model", register)
    logic = modules.train.SpineLabelTrainingLogic()
    for name in ("tuned", "refused"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.json").write_text("{}")
    assert logic.finishTraining(tmp_path / "tuned" / "tuned.json") == tmp_path / "models" / "tuned.json"
    assert not (tmp_path / "tuned").exists()
    panel = training_panel(modules, tmp_path)
    panel._process, panel._outCard = _FakeProcess(running=False), tmp_path / "refused" / "refused.json"
    panel.onPollProcess()
    kept = f"Not registered: the trained model is kept in {tmp_path / 'refused'}"
    assert panel.ui.statusLabel.text == kept and modules.errors[-1].endswith("\n" + kept)
    assert (tmp_path / "refused" / "refused.json").is_file()


def test_a_failed_training_run_says_the_last_reason_spinelabel_gave(modules, tmp_path, monkeypatch):
    panel = training_panel(modules, tmp_path)
    monkeypatch.setattr(panel.logic, "keptAfterFailure", lambda card: None)
    panel._process, panel._outCard = _FakeProcess(running=False, code=2, tail=(
        "spinelabel: error: first attempt failed\nretrying\nspinelabel: error: no case left to train on")), \
        tmp_path / "m.json"
    panel.onPollProcess()
    assert modules.errors == ["Training failed (exit status 2).\nno case left to train on"]


def test_the_panel_shows_what_an_export_left_out_among_its_warnings(modules, labeled, tmp_path):
    """The export reads the Segment Editor's edits back, which may re-solve, and says what it left out: the panel
    shows that labelling after the export, not the one before."""
    panel = labelling_panel(modules, labeled.volumeNode)
    panel._labelings[labeled.volumeNode.GetID()] = labeled
    panel._parameterNode.datasetDirectory = str(tmp_path / "Dataset001_Spine")
    panel._checkCanApply()
    segmentation = labeled.segmentationNode.GetSegmentation()
    added = segmentation.AddEmptySegment("T10", "T10")  # painted by hand in the Segment Editor
    voxels = layer_voxels(labeled)
    voxels[:2, :2, :2] = segmentation.GetSegment(added).GetLabelValue()
    segmentation.GetLayerDataObject(0).Modified()
    panel.onExportButton()
    assert "'T10'" in panel.ui.warningsLabel.text.splitlines()[0]


def test_a_new_labelling_that_cannot_be_shown_leaves_no_node_behind(modules, labeled, spine, monkeypatch):
    volume = labeled.volumeNode
    panel = labelling_panel(modules, volume)
    panel._labelings[volume.GetID()] = labeled  # no correction: replaced without a question
    panel._timer = _Timer()
    new = []
    monkeypatch.setattr(panel.logic, "finishLabelling",
                        lambda v, o: new.append(LabelingScene(v, spine.result.copy())) or new[-1])

    def unremovable():
        raise RuntimeError("the old nodes could not be removed")

    monkeypatch.setattr(labeled, "removeNodes", unremovable)
    panel._process, panel._outputDir, panel._labelledVolume = _FakeProcess([{"event": "done"}]), None, volume
    panel.onPollProcess()
    assert modules.errors and panel.ui.statusLabel.text == "Labelling failed."
    assert new and new[0].segmentationNode.GetScene() is None and new[0].markupsNode.GetScene() is None
    assert panel._labelings[volume.GetID()] is labeled


# ------------------------------------------------------------------ pinned by mutation testing of SpineLabelLogic
# (each test below failed with a hand-made mutant of scene.py, process.py or worker.py that every test above let pass)

def test_a_point_moved_by_a_millimetre_moves_its_centroid(labeled):
    v = labeled.result.vertebrae[2]
    moved = np.asarray(v.centroid_lps_mm) + [0.0, 1.0, 0.5]  # within its own body
    labeled.markupsNode.SetNthControlPointPosition(point_index(labeled, v.name), *(LPS_TO_RAS * moved))
    assert [c["action"] for c in labeled.corrections] == ["move"] and labeled.lastError == ""
    np.testing.assert_allclose(labeled.result.by_id(v.id).centroid_lps_mm, moved)
    assert_nodes_match(labeled)


def test_a_segment_id_that_only_starts_like_a_vertebra_s_is_no_vertebra():
    from SpineLabelLogic.scene import vertebraIdOf

    assert vertebraIdOf("vertebra_12") == 12 and segmentIdOf(12) == "vertebra_12"
    for other in ("vertebra_", "vertebra_x", "vertebra_1a", "Segment_1", "tumour"):
        assert vertebraIdOf(other) is None


def test_segment_names_and_colours_are_not_left_for_slicer_to_generate(labeled):
    """Slicer renames and recolours a segment whose name or colour is marked generated (from its terminology)."""
    segmentation = labeled.segmentationNode.GetSegmentation()
    for v in labeled.result.vertebrae:
        segment = segmentation.GetSegment(segmentIdOf(v.id))
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()


def test_a_refused_correction_stops_the_rest_of_its_batch_and_shows_the_labelling_as_it_is(labeled):
    node = labeled.markupsNode
    before = labeled.result
    with slicer.util.NodeModify(node):
        node.SetNthControlPointLabel(0, "X9")
        node.SetNthControlPointLocked(point_index(labeled, "L3"), True)
    assert "X9" in labeled.lastError
    assert labeled.result is before and labeled.corrections == []
    assert_nodes_match(labeled)


def test_a_point_edited_after_the_segmentation_was_deleted_says_so_and_is_put_back(labeled):
    """An edit of a point then raised out of the observer: no message in the panel, the point stayed renamed."""
    labeled.volumeNode.GetScene().RemoveNode(labeled.segmentationNode)
    node = labeled.markupsNode
    node.SetNthControlPointLabel(0, "T12")
    assert "were deleted; label the volume again" in labeled.lastError
    assert node.GetNthControlPointLabel(0) == "T11" and labeled.corrections == []


def test_a_refused_name_is_said_without_the_quotes_of_a_key_error(labeled):
    labeled.markupsNode.SetNthControlPointLabel(0, "X9")
    assert labeled.lastError.startswith("unknown vertebra name 'X9'") and labeled.lastError.endswith("S1")


def test_a_label_typed_with_spaces_around_it_renames_and_the_rename_is_recorded(labeled):
    top = labeled.result.vertebrae[0]
    labeled.markupsNode.SetNthControlPointLabel(point_index(labeled, "T11"), " T12 ")
    assert labeled.lastError == "" and labeled.corrections == [
        {"action": "rename", "vertebra_id": top.id, "from": "T11", "to": "T12", "locked": True}]
    assert [v.name for v in labeled.result.vertebrae] == ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert_nodes_match(labeled)


def test_a_point_still_being_placed_adds_no_vertebra(labeled):
    """While a point is placed its position is a preview (it follows the mouse); only once it is dropped is it one."""
    node = labeled.markupsNode
    before = labeled.result
    with slicer.util.NodeModify(node):
        index = node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), "F-1")
        node.UnsetNthControlPointPosition(index)  # no position yet
    assert node.GetNthControlPointPositionStatus(index) != slicer.vtkMRMLMarkupsNode.PositionDefined
    assert labeled.result is before and labeled.corrections == [] and labeled.lastError == ""


def test_a_locked_vertebra_renamed_without_a_lock_is_not_said_to_be_another_point_unlocked(labeled):
    l3 = next(v for v in labeled.result.vertebrae if v.name == "L3")
    labeled.setLocked(l3.id, True)
    labeled.rename(l3.id, "L2", lock=False)
    assert not labeled.result.by_id(l3.id).fixed and labeled.result.by_id(l3.id).name == "L2"
    assert labeled.lastNotice == "" and "unlocked_vertebra_ids" not in labeled.corrections[-1]


def test_a_point_moved_off_every_body_is_recorded_onto_no_vertebra(labeled):
    v = labeled.result.vertebrae[2]
    zyx = np.argwhere(labeled.result.components == v.id)
    outside = zyx[np.argmin(zyx[:, 1])] - [0, 2, 0]  # two voxels in front of its body
    assert labeled.result.components[tuple(outside)] == 0
    lps = labeled.result.geometry.index_to_lps(outside[::-1].astype(float))
    labeled.markupsNode.SetNthControlPointPosition(point_index(labeled, v.name), *(LPS_TO_RAS * lps))
    assert labeled.lastError == "" and labeled.corrections[-1]["action"] == "move"
    assert labeled.corrections[-1]["onto_vertebra_id"] is None


def _l2_deleted(labeled):
    """Delete L2's point: L2 as it was, its voxels then (bool (z, y, x)), where its point was, and L1."""
    victim = next(v for v in labeled.result.vertebrae if v.name == "L2")
    old = labeled.result.components == victim.id
    position = labeled.markupsNode.GetNthControlPointPosition(point_index(labeled, "L2"))
    labeled.markupsNode.RemoveNthControlPoint(point_index(labeled, "L2"))
    return victim, old, position, next(v for v in labeled.result.vertebrae if v.name == "L1")


def _paint_removed_into(labeled, removed_voxels, into) -> np.ndarray:
    """Paint the cranial half of a removed vertebra's old voxels into vertebra ``into`` (Segment Editor)."""
    voxels = layer_voxels(labeled)
    lower = np.arange(voxels.shape[0])[:, None, None] > np.argwhere(removed_voxels)[:, 0].mean() + 3
    painted = removed_voxels & lower
    voxels[painted] = into.label
    labeled.segmentationNode.GetSegmentation().GetLayerDataObject(0).Modified()
    return painted


def test_a_deleted_vertebra_brought_back_leaves_the_voxels_painted_since_into_another(labeled):
    victim, old, position, l1 = _l2_deleted(labeled)
    painted = _paint_removed_into(labeled, old, l1)
    assert 0 < painted.sum() < old.sum() and not painted[tuple(np.rint(
        labeled.result.geometry.lps_to_index(np.asarray(victim.centroid_lps_mm))).astype(int)[::-1])]
    labeled.markupsNode.AddControlPoint(vtk.vtkVector3d(*position), "F-1")
    assert labeled.lastError == "" and labeled.corrections[-1]["action"] == "restore"
    assert np.all(labeled.result.components[painted] == l1.id)
    np.testing.assert_array_equal(labeled.result.components == victim.id, old & ~painted)
    assert_nodes_match(labeled)


def test_a_point_placed_where_a_deleted_vertebra_was_but_on_another_s_voxels_brings_nothing_back(labeled):
    victim, old, position, l1 = _l2_deleted(labeled)
    voxels = layer_voxels(labeled)
    voxels[old] = l1.label  # the whole of it painted into L1
    labeled.segmentationNode.GetSegmentation().GetLayerDataObject(0).Modified()
    labeled.markupsNode.AddControlPoint(vtk.vtkVector3d(*position), "F-1")
    assert "lies inside" in labeled.lastError
    assert victim.id not in {v.id for v in labeled.result.vertebrae}
    assert np.all(labeled.result.components[old] == l1.id)
    assert_nodes_match(labeled)


def test_a_deleted_vertebra_brought_back_by_a_named_point_takes_that_name(labeled):
    victim = next(v for v in labeled.result.vertebrae if v.name == "L2")
    position = labeled.markupsNode.GetNthControlPointPosition(point_index(labeled, "L2"))
    labeled.markupsNode.RemoveNthControlPoint(point_index(labeled, "L2"))
    labeled.markupsNode.AddControlPoint(vtk.vtkVector3d(*position), "L3")
    assert labeled.lastError == "" and labeled.corrections[-1]["action"] == "restore"
    assert labeled.corrections[-1]["name"] == "L3"
    back = labeled.result.by_id(victim.id)
    assert back.name == "L3" and back.fixed
    assert_nodes_match(labeled)


def test_an_export_names_every_segment_it_leaves_out_in_the_plural_and_logs_it(labeled, tmp_path, caplog):
    segmentation = labeled.segmentationNode.GetSegmentation()
    voxels = layer_voxels(labeled)
    for corner, name in ((0, "T10"), (-1, "S1")):
        added = segmentation.AddEmptySegment(name, name)
        painted = np.zeros(voxels.shape, bool)
        painted[corner, :2, :2] = True
        assert not voxels[painted].any()
        voxels[painted] = segmentation.GetSegment(added).GetLabelValue()
    segmentation.GetLayerDataObject(0).Modified()
    with caplog.at_level(logging.WARNING, logger="SpineLabelLogic.scene"):
        path = labeled.exportCase(tmp_path / "Dataset001_Spine")
    assert labeled.lastNotice == ("segments 'T10', 'S1', added in the Segment Editor, are not exported: place a point "
                                  "on a missed vertebra to add it, then refine its segment")
    assert [r.getMessage() for r in caplog.records] == [f"{path}: {labeled.lastNotice}"]


def test_corrections_after_the_points_were_deleted_are_refused(labeled, tmp_path):
    labeled.volumeNode.GetScene().RemoveNode(labeled.markupsNode)
    before = labeled.result
    with pytest.raises(RuntimeError, match="were deleted; label the volume again"):
        labeled.setLocked(labeled.result.vertebrae[0].id, True)
    with pytest.raises(RuntimeError, match="were deleted"):
        labeled.exportCase(tmp_path / "dataset")
    assert labeled.result is before and labeled.corrections == [] and not (tmp_path / "dataset").exists()


def test_nodes_that_have_subject_hierarchy_items_already_are_moved_under_the_volume(mrml, spine):
    """In the application every node gets an item as it is added; a saved scene's nodes come back with theirs."""
    volume = addVolumeNodeFromImage(mrml.scene, spine.image, "spine")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    segmentation.CreateDefaultDisplayNodes()
    points = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "p")
    points.CreateDefaultDisplayNodes()
    for node in (volume, segmentation, points):
        if not sh.GetItemByDataNode(node):
            sh.CreateItem(sh.GetSceneItemID(), node)
    labeling = LabelingScene(volume, spine.result, segmentationNode=segmentation, markupsNode=points)
    try:
        volumeItem = sh.GetItemByDataNode(volume)
        assert [sh.GetItemParent(sh.GetItemByDataNode(n)) for n in (segmentation, points)] == [volumeItem] * 2
    finally:
        labeling.cleanup()


def test_a_saved_state_another_version_wrote_leaves_the_other_labellings_followed(labeled, mrml, spine):
    from SpineLabelLogic.scene import STATE_ATTRIBUTE, savedLabelings

    other = addVolumeNodeFromImage(mrml.scene, spine.image, "other")
    foreign = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other vertebrae")
    foreign.SetReferenceImageGeometryParameterFromVolumeNode(other)
    foreign.SetAttribute(STATE_ATTRIBUTE, json.dumps({"labelling": {}}))  # no "result": another version's state
    labeled.cleanup()
    found = savedLabelings(mrml.scene)
    try:
        assert [f.segmentationNode for f in found] == [labeled.segmentationNode]
    finally:
        for f in found:
            f.cleanup()


def test_a_rename_tells_the_views_that_the_layer_s_voxels_changed(labeled):
    """The label values are rewritten in place; without a Modified() of the layer the slice views kept drawing the
    old values (each segment's voxels are found by its value)."""
    image = labeled.segmentationNode.GetSegmentation().GetLayerDataObject(0)
    before = image.GetMTime()
    labeled.markupsNode.SetNthControlPointLabel(point_index(labeled, "T11"), "T12")
    assert image.GetMTime() > before
    np.testing.assert_array_equal(layer_voxels(labeled), labeled.result.label_map())


def test_replaced_nodes_take_their_storage_nodes_with_them(labeled):
    """A scene saved or loaded gives the nodes storage nodes; those were left behind, one per new labelling."""
    scene = labeled.volumeNode.GetScene()
    for node in (labeled.segmentationNode, labeled.markupsNode):
        node.AddDefaultStorageNode()
    storage = [labeled.segmentationNode.GetStorageNode(), labeled.markupsNode.GetStorageNode()]
    assert all(s is not None and s.GetScene() is scene for s in storage)
    labeled.removeNodes()
    assert all(s.GetScene() is None for s in storage)


def test_replaced_nodes_leave_no_observer_on_the_volume(labeled):
    """An observer left on the volume kept the replaced labelling (and its labelling's arrays) alive with it."""
    volume = labeled.volumeNode
    labeled.removeNodes()
    assert not labeled.hasObserver(volume, slicer.vtkMRMLTransformableNode.TransformModifiedEvent,
                                   labeled._followVolumeTransform)


def test_a_training_line_of_no_epochs_is_no_division_by_zero():
    """Raised in a reader thread, it would end the reading of the run's output."""
    assert process.parseTrainingLine("epoch 0/0 loss 0.5000")["fraction"] == 0.0
    assert process.parseTrainingLine("epoch 0/0:  50%|#####")["fraction"] == 0.0


def test_the_child_s_environment_puts_the_module_first_absolute_and_unbuffered(tmp_path, monkeypatch):
    """An older SpineLabelLib on the user's PYTHONPATH must not shadow the module's; a relative path would be read
    from the run's folder; buffered output would bring the progress at the end."""
    monkeypatch.chdir(tmp_path)
    env = process.pythonPathEnvironment(["mod"], base={"PYTHONPATH": os.pathsep.join(["/old", ""]), "X": "1"})
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path / "mod"), os.path.abspath("/old")])
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONIOENCODING"] == "utf-8" and env["X"] == "1"


def test_the_labelling_command_passes_every_setting_and_only_those_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "card.json").write_text("{}")
    (tmp_path / "in.nrrd").write_text("")
    # paths are made absolute (the worker runs in its run's folder), a model's card where it names a file
    assert process.labelCommand("py", "in.nrrd", "run/out", "card.json", "cpu", checkOrientation=True, spineGate=False,
                                modality="MR") == [
        "py", "-m", "SpineLabelLogic.worker", str(tmp_path / "in.nrrd"), str(tmp_path / "run" / "out"), "--device",
        "cpu", "--model", str(tmp_path / "card.json"), "--check-orientation", "--no-spine-gate", "--modality", "mr"]
    # a model named rather than a file is passed as named; the defaults add no option
    assert process.labelCommand("py", "in.nrrd", "out", "spine-ct")[5:] == ["--device", "auto", "--model", "spine-ct"]
    assert process.labelCommand("py", "in.nrrd", "out") == [
        "py", "-m", "SpineLabelLogic.worker", str(tmp_path / "in.nrrd"), str(tmp_path / "out"), "--device", "auto"]


def test_the_training_command_passes_every_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "base.json").write_text("{}")
    command = process.trainCommand("py", "data", tmp_path / "out" / "m.json", "base.json", epochs=3.0, name="mine",
                                   device="cuda", extra=["--batch", 2])
    assert command == ["py", "-m", "SpineLabelLib.cli", "train", "--data", f"{tmp_path / 'data'}:0.6", "--data",
                       "phantom:0.3", "--data", "negative:0.1", "--out", str(tmp_path / "out" / "m.json"), "--epochs",
                       "3", "--device", "cuda", "--progress-bars", "--base-model", str(tmp_path / "base.json"),
                       "--name", "mine", "--batch", "2"]


def test_output_that_ends_without_a_newline_is_read_and_a_process_starts_once():
    script = ("import sys; sys.stderr.write('last words'); sys.stderr.flush(); "
              "sys.stdout.write('{\"event\": \"done\"}')")
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseWorkerLine)
    runner.start()
    with pytest.raises(RuntimeError, match="already started"):
        runner.start()
    assert runner.wait(30) == 0
    assert runner.readEvents() == [{"event": "done"}] and runner.outputTail() == "last words"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks the process tree through /proc")
def test_cancel_kills_a_child_that_ignores_sigterm_and_leaves_an_ended_run_uncancelled():
    script = textwrap.dedent("""
        import json, subprocess, sys, time
        ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
        child = subprocess.Popen([sys.executable, "-c", ignore])
        print(json.dumps({"event": "child", "pid": child.pid}), flush=True)
        time.sleep(120)
    """)
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseWorkerLine)
    runner.start()
    events = _first_events(runner)
    child = events[0]["pid"]
    try:
        time.sleep(0.3)  # the child has set its handler
        runner.cancel(timeout=1)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, 9)
    ended = process.BackgroundProcess([sys.executable, "-c", "pass"], process.parseWorkerLine)
    ended.start()
    assert ended.wait(30) == 0
    ended.cancel()  # Stop pressed as it ended: it finished, it was not cancelled
    assert not ended.cancelled and ended.exitDescription() == "exit code 0"


def test_a_command_prompt_line_keeps_quotes_backslashes_and_empty_arguments():
    # a C runtime reads 2n+1 backslashes before a quote as n backslashes and a literal quote
    line = process.terminalCommand(["prog", 'say \\"hi\\"', "", "plain"], windows=True)
    assert line == 'prog "say \\\\\\"hi\\\\\\"" "" plain'


def test_the_tail_is_the_last_lines_and_a_run_hanging_after_its_result_is_logged_as_ended(caplog):
    script = ("import json, sys, time\nfor i in range(30): print(f'line {i}', file=sys.stderr)\n"
              "sys.stderr.flush(); print(json.dumps({'event': 'done'}), flush=True); time.sleep(120)")
    runner = process.BackgroundProcess([sys.executable, "-c", script], process.parseWorkerLine)
    with caplog.at_level(logging.WARNING, logger=process.__name__):
        runner.start()
        deadline = time.monotonic() + 30
        while len(runner.outputTail(40).splitlines()) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.exitDescription() == "still running"
        runner.finish(timeout=1)
    assert runner.outputTail(3) == "line 27\nline 28\nline 29"
    assert [r.getMessage() for r in caplog.records] == [
        f"process {runner.process.pid} still running 1 s after its result; ending it"]


def test_the_module_root_holds_the_packages_a_child_imports():
    assert (process.moduleRoot() / "SpineLabelLib").is_dir() and (process.moduleRoot() / "SpineLabelLogic").is_dir()


def test_a_process_killed_by_sigkill_is_said_to_have_perhaps_run_out_of_memory():
    runner = process.BackgroundProcess([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"],
                                       process.parseWorkerLine)
    runner.start()
    assert runner.wait(30) == -9
    assert runner.exitDescription() == "killed by SIGKILL (often the system ending a process that ran out of memory)"


def test_background_processes_run_in_pythonslicer_where_there_is_one(monkeypatch):
    """Inside Slicer, sys.executable is the application: ``Slicer -m ...`` would open another Slicer."""
    monkeypatch.setattr(process.shutil, "which", lambda name: f"/opt/Slicer/bin/{name}")
    assert process.pythonExecutable() == "/opt/Slicer/bin/PythonSlicer"
    monkeypatch.setattr(process.shutil, "which", lambda name: None)
    assert process.pythonExecutable() == sys.executable


def test_a_result_write_that_fails_midway_leaves_the_earlier_result_whole(tmp_path, spine, monkeypatch):
    from SpineLabelLogic import worker

    saveResult(spine.result, tmp_path)
    other = spine.result.copy(model={"name": "other", "version": "9"},
                              components=np.zeros_like(spine.result.components))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(worker.np, "save", full_disk)
    with pytest.raises(OSError):
        saveResult(other, tmp_path)
    monkeypatch.undo()
    back = loadResult(tmp_path)
    assert back.model == spine.result.model
    np.testing.assert_array_equal(back.components, spine.result.components)


def test_the_worker_passes_its_options_on_and_reports_what_it_did(monkeypatch, capsys, tmp_path, spine, caplog):
    import SpineLabelLib.inference as inference
    import SpineLabelLib.pipeline as pipeline
    from SpineLabelLogic import worker

    seen = []
    labelled = spine.result.copy(warnings=["a warning"])

    def label_spine(path, **options):
        seen.append(options)
        options["progress"](0.5, "half way")
        if len(seen) == 1:
            raise MemoryError()  # no text of its own
        return labelled

    monkeypatch.setattr(pipeline, "label_spine", label_spine)
    monkeypatch.setattr(inference, "reuse_freed_memory", lambda: None)
    args = [str(tmp_path / "in.nrrd"), str(tmp_path / "out"), "--device", "cpu", "--check-orientation",
            "--no-spine-gate", "--modality", "mr", "--model", "m.json"]
    with caplog.at_level(logging.ERROR, logger=worker.__name__):
        assert worker.main(args) == 1
    assert [{k: v for k, v in s.items() if k != "progress"} for s in seen] == [
        {"model": Path("m.json"), "device": "cpu", "check_orientation": True, "spine_gate": False, "modality": "mr"}]
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events == [{"event": "progress", "fraction": 0.5, "message": "half way"},
                      {"event": "error", "message": "MemoryError"}]
    assert [r.getMessage() for r in caplog.records] == ["labelling failed"] and caplog.records[0].exc_info
    assert worker.main(args[:2]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "event": "done", "result": str(tmp_path / "out"), "vertebrae": len(labelled.vertebrae),
        "warnings": ["a warning"]}
    assert [v.name for v in loadResult(tmp_path / "out").vertebrae] == [v.name for v in labelled.vertebrae]
