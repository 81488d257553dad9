"""A labelling shown in a Slicer scene, kept in step with the user's corrections.

:class:`LabelingScene` owns two nodes placed under the input volume in the subject hierarchy:

* a ``vtkMRMLSegmentationNode`` with one segment per vertebra (segment ID ``vertebra_<id>``, name = level name,
  colour, VerSe label value, SNOMED CT terminology), all in one shared labelmap layer whose voxel values are the
  VerSe label values (what ``.seg.nrrd`` readers such as slicerio see);
* a ``vtkMRMLMarkupsFiducialNode`` with one control point per vertebra at its body centroid: label = level name,
  description = confidence, locked when the name is fixed;

and makes the segmentation export its segments at their VerSe values through the scene's colour table of the levels
(``levelColorTable``).

It observes the markups node and turns each user action into one :mod:`SpineLabelLib.edits` call: typing a new
label renames (and fixes) a vertebra, locking/unlocking a point fixes/releases its name, dragging a point moves
the centroid (or, dropped on another vertebra, hands that vertebra the name), deleting a point deletes the
vertebra, placing a new point adds one (or, where a deleted one had its point, brings that back). After each action both
nodes are rewritten in one batch (``StartModify``/``EndModify``), so a relabel of 25 vertebrae costs one round of
events, not 25. Voxel edits made with the Segment Editor are read back (:meth:`LabelingScene.readBackSegmentation`)
before any correction that changes voxels and before export.

The labelling (all of it but its voxels, which are the segments') and its corrections are kept, as JSON, in the
segmentation node's ``SpineLabel.Labeling`` attribute, and the points are the segmentation node's ``spineLabelPoints``
reference, so that MRML saves them with the scene (.mrml, .mrb); :func:`savedLabelings` follows them again once
such a scene is loaded.

Coordinates: the core works in LPS mm, MRML in RAS mm; the conversion flips the first two axes. Both nodes go under
the volume's parent transform, if it has one, so they hold the volume's own (untransformed) coordinates and are shown
where the volume is.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from slicer.util import NodeModify, VTKObservationMixin
from vtk.util import numpy_support

from SpineLabelLib import edits, export
from SpineLabelLib.components import present_ids
from SpineLabelLib.io import InputError
from SpineLabelLib.result import Geometry, SpineLabeling, nonzero_box, zeros_on_demand
from SpineLabelLib.sequence import confidence_text
from SpineLabelLib.vertebrae import LEVELS, level_index, terminology_entry
from SpineLabelLogic.worker import geometryOfDocument, resultDocument, resultFromDocument

__all__ = [
    "headlessScene",
    "levelColorTable",
    "LabelingScene",
    "savedLabelings",
    "ijkToRasMatrix",
    "imageFromVolumeNode",
    "addVolumeNodeFromImage",
    "removeNodes",
    "segmentIdOf",
    "vertebraIdOf",
]

log = logging.getLogger(__name__)

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
_SEGMENT_PREFIX = "vertebra_"
# the segmentation node's attribute holding the labelling but its voxels, and its corrections (JSON), and its
# reference to the points
STATE_ATTRIBUTE = "SpineLabel.Labeling"
_POINTS_ROLE = "spineLabelPoints"
# the attribute that marks the scene's colour table of the vertebra levels (``levelColorTable``)
_LEVEL_COLORS_ATTRIBUTE = "SpineLabel.LevelColors"
_MOVE_TOLERANCE_MM = 0.01
# a point placed this close (mm) to where a removed vertebra had its point brings that vertebra back
_RESTORE_REACH_MM = 10.0
_MARKUPS_EVENTS = (
    slicer.vtkMRMLMarkupsNode.PointAddedEvent,
    slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
    slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
    slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
)


def headlessScene():
    """An MRML scene with the application logic and the module logics SpineLabelLogic uses, set up as the Slicer
    application sets them up (each logic registered with the application logic under its module name), for use
    outside the application: tests and offscreen rendering.

    Returns:
        (scene, application logic, {module name: logic}); hold on to the logics, the application logic does not.
    """
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    appLogic.SetSliceLogics(vtk.vtkCollection())
    logics = {}
    for name, cls in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Markups", slicer.vtkSlicerMarkupsLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(name, logic)
        logics[name] = logic
    return scene, appLogic, logics


def levelColorTable(scene):
    """The scene's colour table of the vertebra levels at their VerSe label values (the names and colours of
    ``vertebrae.LEVELS``; the other values unnamed), made the first time it is asked for and filled each time (a scene
    saved as .mrml without the table's file brings it back empty). As a segmentation's labelmap conversion colour
    table, which the Segmentations module's export to a labelmap or to files chooses by default, it has each segment
    named after a level exported at that level's VerSe value, not at its place in the list."""
    nodes = (scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
             for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")))
    node = next((node for node in nodes if node.GetAttribute(_LEVEL_COLORS_ATTRIBUTE)), None)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "SpineLabel vertebra levels")
        node.SetAttribute(_LEVEL_COLORS_ATTRIBUTE, "1")
    node.SetTypeToUser()
    node.SetNumberOfColors(max(level.label for level in LEVELS) + 1)
    for value in range(node.GetNumberOfColors()):
        node.SetColor(value, "background" if value == 0 else "", 0.0, 0.0, 0.0, 0.0)
    for level in LEVELS:
        node.SetColor(level.label, level.name, *level.colour, 1.0)
    return node


def segmentIdOf(vertebraId: int) -> str:
    """Segment ID of a vertebra (``vertebra_<id>``)."""
    return f"{_SEGMENT_PREFIX}{int(vertebraId)}"


def vertebraIdOf(segmentId: str) -> int | None:
    """Vertebra id of a segment ID made by :func:`segmentIdOf`; None for any other segment."""
    if segmentId.startswith(_SEGMENT_PREFIX) and segmentId[len(_SEGMENT_PREFIX):].isdigit():
        return int(segmentId[len(_SEGMENT_PREFIX):])
    return None


def ijkToRasMatrix(geometry: Geometry) -> vtk.vtkMatrix4x4:
    """IJK-to-RAS matrix of a grid (ITK/LPS geometry converted to Slicer's RAS)."""
    ijkToRas = geometry.ijk_to_ras()
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(ijkToRas[row, col]))
    return matrix


def _arrayOf(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """float64 (4, 4) of a VTK matrix."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _geometryOfVolume(volumeNode) -> Geometry:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRas = _arrayOf(matrix)
    spacing = np.asarray(volumeNode.GetSpacing(), dtype=float)
    direction = _LPS_TO_RAS[:, None] * ijkToRas[:3, :3] / spacing[None, :]
    return Geometry(tuple(int(d) for d in volumeNode.GetImageData().GetDimensions()), tuple(float(s) for s in spacing),
                    tuple(float(o) for o in _LPS_TO_RAS * ijkToRas[:3, 3]), tuple(float(x) for x in direction.ravel()))


def _reversedAxes(saved: Geometry, current: Geometry) -> tuple[int, ...]:
    """The numpy axes (of a (z, y, x) array) along which ``current`` indexes the voxel centres of ``saved`` the other
    way (a direction column negated, the origin at the far end of that axis); () when the grids match or differ
    otherwise."""
    if {"size", "spacing"} & set(saved.differences(current)):
        return ()
    a, b = (np.asarray(g.direction, dtype=float).reshape(3, 3) for g in (saved, current))
    flipped = np.array([np.allclose(a[:, i], -b[:, i], atol=1e-3) for i in range(3)])
    if not (flipped.any() and np.allclose(np.where(flipped, -b, b), a, atol=1e-3)
            and np.allclose(saved.index_to_lps(np.where(flipped, np.asarray(saved.size) - 1, 0)), current.origin,
                            atol=1e-2)):
        return ()
    return tuple(2 - i for i in np.flatnonzero(flipped))


def imageFromVolumeNode(volumeNode) -> sitk.Image:
    """A scalar volume node as a ``SimpleITK.Image`` with the same voxels (copied) and LPS geometry.

    Raises:
        InputError: a node without voxels, of tensors, or with more than one component per voxel, naming the volume.
    """
    imageData, name = volumeNode.GetImageData(), volumeNode.GetName()
    scalars = imageData.GetPointData().GetScalars() if imageData is not None else None
    if scalars is None and imageData is not None and imageData.GetPointData().GetTensors() is not None:
        raise InputError(f"{name}: a tensor volume (as of diffusion tensors); a scalar CT or MRI volume is needed")
    if scalars is None:  # no image data, or image data without a voxel array (numpy_support failed on None)
        raise InputError(f"{name}: the volume holds no voxels (was its file not found?)")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{name}: a volume of {imageData.GetNumberOfScalarComponents()} components per voxel (RGB "
                         "or vector); a scalar CT or MRI volume is needed")
    dims = imageData.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]).copy()
    image = sitk.GetImageFromArray(voxels)
    geometry = _geometryOfVolume(volumeNode)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def addVolumeNodeFromImage(scene, image: sitk.Image, name: str):
    """Add a ``vtkMRMLScalarVolumeNode`` holding a copy of a ``SimpleITK.Image`` (geometry converted to RAS)."""
    voxels = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))  # (z, y, x)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*image.GetSize())
    imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.ravel(), deep=True))
    volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volumeNode.SetIJKToRASMatrix(ijkToRasMatrix(Geometry.of(image)))
    volumeNode.SetAndObserveImageData(imageData)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def removeNodes(nodes) -> None:
    """Remove ``nodes`` from their scene with their display and storage nodes (MRML leaves the nodes a removed node
    refers to in the scene); a node already out of a scene is skipped."""
    for node in nodes:
        scene = node.GetScene()
        if scene is None:
            continue
        helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        helpers.append(node.GetStorageNode())
        scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and helper.GetScene() is not None:
                scene.RemoveNode(helper)


def _orientedImage(geometry: Geometry, labels: np.ndarray | None) -> "slicer.vtkOrientedImageData":
    """Oriented image on ``geometry``; ``labels`` (integer array (z, y, x)) become its voxels with the same
    type (uint8 for a VerSe label map), None gives an image with geometry only."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, geometry.size[0] - 1, 0, geometry.size[1] - 1, 0, geometry.size[2] - 1)
    image.SetImageToWorldMatrix(ijkToRasMatrix(geometry))
    if labels is not None:
        image.AllocateScalars(numpy_support.get_vtk_array_type(labels.dtype), 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = labels.ravel()
    return image


def _mergedSegments(segmentationNode, segmentIds: list[str], geometry: Geometry) -> np.ndarray:
    """The vertebra segments ``segmentIds`` merged into one map of vertebra ids (the later segment wins where they
    overlap): (z, y, x) on ``geometry``, an integer dtype. Read straight from the layers' voxels
    (:func:`_mergedOnGrid`) when they lie on ``geometry``, else merged by Slicer."""
    merged = _mergedOnGrid(segmentationNode.GetSegmentation(), segmentIds, geometry)
    return merged if merged is not None else _mergedBySlicer(segmentationNode, segmentIds, geometry)


def _mergedBySlicer(segmentationNode, segmentIds: list[str], geometry: Geometry) -> np.ndarray:
    """:func:`_mergedSegments` by ``GenerateMergedLabelmapForAllSegments`` (resampling layers not on ``geometry``),
    in the merged labelmap's integer dtype."""
    ids, labelValues = vtk.vtkStringArray(), vtk.vtkIntArray()
    for segmentId in segmentIds:
        ids.InsertNextValue(segmentId)
        labelValues.InsertNextValue(vertebraIdOf(segmentId))
    merged = slicer.vtkOrientedImageData()
    if not segmentationNode.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, _orientedImage(geometry, None), ids, labelValues):
        raise RuntimeError(f"{segmentationNode.GetName()}: could not merge the segments into a labelmap")
    return _voxelsOf(merged)


def _mergedOnGrid(segmentation, segmentIds: list[str], geometry: Geometry) -> np.ndarray | None:
    """What ``GenerateMergedLabelmapForAllSegments`` gives for the segments ``segmentIds`` (vertebra ids, the later
    segment winning where they overlap), read from each layer's voxels with a table of label values, within the box of
    its non-zero voxels: Slicer's merge goes over the whole volume once per segment (15-20 s for 23 vertebrae of a
    512x512x800 CT, before every correction after a Segment Editor edit, each added vertebra and each export). None
    when a layer is not on ``geometry`` (its image-to-world matrix differs; any extent is taken), holds no integer
    label values or values no table holds (negative, 2^16 or more): Slicer's merge resamples those. None also when the
    segmentation's source representation is not a binary labelmap (closed surfaces, say): its layers then hold no
    voxels, and reading them as empty would delete every vertebra."""
    if not segmentIds or len(segmentIds) > np.iinfo(np.uint16).max:
        return None
    representation = (segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName")
                      else segmentation.GetMasterRepresentationName())  # Slicer before 5.4
    if representation != slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName():
        return None
    layers: dict[int, list[tuple[int, int]]] = {}  # layer -> (label value, 1 + place in segmentIds), in order
    for place, segmentId in enumerate(segmentIds, start=1):
        layer = segmentation.GetLayerIndex(segmentId)
        if layer < 0:
            return None
        layers.setdefault(layer, []).append((segmentation.GetSegment(segmentId).GetLabelValue(), place))
    reference = geometry.ijk_to_ras()
    places = zeros_on_demand(geometry.size[::-1], np.uint8 if len(segmentIds) < 256 else np.uint16)
    for layer, entries in layers.items():
        image = segmentation.GetLayerDataObject(layer)
        if image is None or image.GetPointData().GetScalars() is None:
            continue  # no voxels: none of its segments is in the merge
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        onGrid = np.allclose(_arrayOf(matrix), reference, rtol=0.0, atol=1e-4)
        if image.GetNumberOfScalarComponents() != 1 or not onGrid:
            return None
        voxels = _voxelsOf(image)
        values = [value for value, _ in entries]
        if voxels.dtype.kind not in "ui" or min(values) < 0 or max(values) > np.iinfo(np.uint16).max:
            return None
        extent = image.GetExtent()  # (i0, i1, j0, j1, k0, k1); clipped to the grid (z, y, x)
        lo = [max(extent[2 * a], 0) for a in (2, 1, 0)]
        hi = [min(extent[2 * a + 1] + 1, geometry.size[a]) for a in (2, 1, 0)]
        if any(h <= low for low, h in zip(lo, hi)):
            continue
        start = (extent[4], extent[2], extent[0])
        source = voxels[tuple(slice(low - s0, h - s0) for low, h, s0 in zip(lo, hi, start))]
        box = nonzero_box(source)
        if box is None:
            continue
        source = source[box]
        if voxels.dtype.kind == "i" and source.min() < 0:
            return None
        top = int(source.max())
        if top > np.iinfo(np.uint16).max:
            return None
        table = np.zeros(max(top, *values) + 1, dtype=places.dtype)
        for value, place in entries:  # a later segment of the same value wins, as in Slicer's merge
            table[value] = place
        target = places[tuple(slice(low + b.start, low + b.stop) for low, b in zip(lo, box))]
        np.maximum(target, table[source], out=target)  # the later segment wins across layers
    ids = np.array([0] + [vertebraIdOf(segmentId) or 0 for segmentId in segmentIds], dtype=np.int32)  # by place
    merged = zeros_on_demand(places.shape, ids.dtype)
    box = nonzero_box(places)
    if box is not None:
        merged[box] = ids[places[box]]
    return merged


def _voxelsOf(image) -> np.ndarray:
    """Writable numpy view (z, y, x), i.e. (k, j, i) of the extent, of a single-component ``vtkImageData``'s
    scalars, no copy, in their own dtype (label values here: a segmentation layer or merged labelmap)."""
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


class LabelingScene(VTKObservationMixin):
    """One labelling of one volume in an MRML scene, with its segmentation and markups nodes kept in step.

    Args:
        volumeNode: the scalar volume that was labelled.
        result: its labelling (on the volume's grid).
        name: base name of the nodes (defaults to the volume's name).
        segmentationNode, markupsNode: nodes of this labelling to follow again (a saved scene loaded back), instead of
            new ones; the segments hold its voxels.
        corrections: the corrections it had (``corrections`` of the labelling saved).

    Raises:
        ValueError: the labelling is not on the volume's grid.

    Attributes:
        result: the current labelling; replaced (never modified) by every correction.
        corrections: log of the corrections applied, oldest first (stored in exported provenance).
        lastError: message of the last correction that could not be applied from the markups ("" if none).
        lastNotice: what a rename or an export did beyond what was asked, cleared with ``lastError`` ("" if
            nothing): a name locked on another point moves to the renamed one and unlocks that point; an export
            leaves out segments added in the Segment Editor and writes points that lie off their segments.
        changedCallbacks: functions called with this object after every change made from the markups.
    """

    def __init__(self, volumeNode, result: SpineLabeling, name: str | None = None, segmentationNode=None,
                 markupsNode=None, corrections: list[dict] | None = None):
        VTKObservationMixin.__init__(self)
        edits.check_image_grid(result, _geometryOfVolume(volumeNode))
        self.volumeNode = volumeNode
        self.result = result
        self.corrections: list[dict] = list(corrections or [])
        self.lastError = self.lastNotice = ""
        self.changedCallbacks: list[Callable[["LabelingScene"], None]] = []
        self._pointToVertebra: dict[str, int] = {}
        self._updating = False
        self._interacting = False
        self._voxelStateKnown: tuple = ()
        # id -> record of each vertebra a correction removed (an undo may bring it back); with the vertebrae of
        # ``result``, every vertebra this labelling has had
        self._removed: dict = {}
        # id -> flat indices (int64, into ``result.components``) of the voxels each of them had when removed
        self._removedVoxels: dict[int, np.ndarray] = {}
        scene = volumeNode.GetScene()
        base = name or volumeNode.GetName()
        newSegments = segmentationNode is None
        if newSegments:
            segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{base} vertebrae")
            segmentationNode.CreateDefaultDisplayNodes()
        if markupsNode is None:
            markupsNode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{base} vertebra centroids")
            markupsNode.CreateDefaultDisplayNodes()
        self.segmentationNode, self.markupsNode = segmentationNode, markupsNode
        segmentationNode.SetNodeReferenceID(_POINTS_ROLE, markupsNode.GetID())
        segmentationNode.SetLabelmapConversionColorTableNodeID(levelColorTable(scene).GetID())
        # every name shows in a slice view, not only those of the points within half a slice of it (a sagittal view
        # showed 2 of 9 on a lumbar MRI)
        self.markupsNode.GetDisplayNode().SetSliceProjection(True)
        self.markupsNode.GetDisplayNode().SetSliceProjectionUseFiducialColor(True)
        self._followVolumeTransform()
        self._placeUnderVolume()
        self._writeSegments(voxels=newSegments)
        self._writePoints()
        self._storeState()
        for event in _MARKUPS_EVENTS:
            self.addObserver(self.markupsNode, event, self._onPointsChanged)
        self.addObserver(self.markupsNode, slicer.vtkMRMLMarkupsNode.PointStartInteractionEvent,
                         self._onInteractionStart)
        self.addObserver(self.markupsNode, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._onInteractionEnd)
        self.addObserver(volumeNode, slicer.vtkMRMLTransformableNode.TransformModifiedEvent,
                         self._followVolumeTransform)

    @classmethod
    def fromSavedNodes(cls, segmentationNode) -> "LabelingScene | None":
        """Follow again the labelling of a segmentation node saved with the scene and loaded back, from its
        ``STATE_ATTRIBUTE`` and its segments. A vertebra whose segment was removed or emptied in the Segment Editor
        before the scene was saved is deleted (as a correction would have read it back). None for a segmentation
        node that holds no SpineLabel labelling or whose volume is gone.

        Raises:
            ValueError: the volume is no longer on the labelling's grid.
        """
        text = segmentationNode.GetAttribute(STATE_ATTRIBUTE)
        volumeNode = segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        if not text or volumeNode is None:
            return None
        state = json.loads(text)
        segmentation = segmentationNode.GetSegmentation()
        segmentIds = [segmentIdOf(v["id"]) for v in state["result"]["vertebrae"]
                      if segmentation.GetSegment(segmentIdOf(v["id"])) is not None]
        if state["result"]["vertebrae"] and not segmentIds:
            # no segment at all: its file was not read (moved, unreadable, a download still pending), not emptied in
            # the Segment Editor; deleting every vertebra would overwrite the saved labelling and its points
            log.warning("%s: none of its vertebra segments was loaded; the saved labelling is not followed again",
                        segmentationNode.GetName())
            return None
        geometry = geometryOfDocument(state["result"])
        components = (_mergedSegments(segmentationNode, segmentIds, geometry).astype(np.int16) if segmentIds
                      else np.zeros(geometry.size[::-1], dtype=np.int16))
        result = resultFromDocument(state["result"], components)
        # a volume labelled on a left-handed voxel grid (made in memory) is read back from the scene's file on the
        # same voxel centres indexed the other way along an axis: the labelling is turned with it
        onVolume = _geometryOfVolume(volumeNode)
        reindexed = _reversedAxes(geometry, onVolume)
        if reindexed:
            result = result.copy(geometry=onVolume, components=np.ascontiguousarray(np.flip(components, reindexed)))
        present = set(present_ids(components).tolist())  # no int64 copy of the volume, as np.bincount makes
        emptied = [v.id for v in result.vertebrae if v.id not in present]
        for vertebraId in emptied:
            result = edits.delete(result, vertebraId)
        corrections = state["corrections"] + ([{"action": "segment_edit", "vertebra_ids": emptied}] if emptied else [])
        labeling = cls(volumeNode, result, segmentationNode=segmentationNode,
                       markupsNode=segmentationNode.GetNodeReference(_POINTS_ROLE), corrections=corrections)
        if reindexed:
            labeling._writeSegments(voxels=True)  # the segments too, on the volume's grid as read
        return labeling

    # ------------------------------------------------------------------------------------------------ public

    @property
    def image(self) -> sitk.Image:
        """The labelled volume as a ``SimpleITK.Image``, read from the volume node each time (an added vertebra, an
        export): a copy kept would hold every labelled volume's voxels a second time (0.8 GB for a 512x512x800 CT)
        for as long as its labelling is followed."""
        return imageFromVolumeNode(self.volumeNode)

    def cleanup(self) -> None:
        """Stop observing the markups node (the nodes stay in the scene)."""
        self.removeObservers()

    def removeNodes(self) -> None:
        """Stop observing and remove both nodes from the scene, with their display and storage nodes (a new
        labelling of the same volume replaces this one)."""
        self.cleanup()
        removeNodes((self.segmentationNode, self.markupsNode))

    def _followVolumeTransform(self, caller=None, event=None) -> None:
        """Put the segmentation and the points under the volume's transform, also one set, changed or removed after
        labelling (they stayed where they were: the first point 50 mm from its vertebra). A volume hardened since
        (its grid moved) leaves them under the transform that still puts them on it; a correction then asks for a new
        labelling."""
        volume = self.volumeNode
        if volume.GetImageData() is None or not _geometryOfVolume(volume).matches(self.result.geometry):
            return
        transformId = volume.GetTransformNodeID()
        for node in (self.segmentationNode, self.markupsNode):
            if node.GetScene() is not None and node.GetTransformNodeID() != transformId:
                node.SetAndObserveTransformNodeID(transformId)
        if self.segmentationNode.GetScene() is not None:
            # the grid the segments are saved on, taken across the transforms between the two nodes: set before the
            # segmentation was under the volume's transform, it was the volume's grid turned by that transform, and
            # a scene saved under a rotation came back with 1.8 % of a CT's labelled voxels moved by resampling
            self.segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volume)

    def _requireNodes(self) -> None:
        """Raise when the user has deleted the segmentation or the points: there is nothing left to correct."""
        if self.segmentationNode.GetScene() is None or self.markupsNode.GetScene() is None:
            raise RuntimeError(f"the vertebra segmentation or points of {self.volumeNode.GetName()} were deleted; "
                               "label the volume again")

    def rename(self, vertebraId: int, name: str, lock: bool = True) -> None:
        """Rename a vertebra (see :func:`SpineLabelLib.edits.rename`) and update both nodes."""
        if not self._readBackKeeps(vertebraId):
            return
        old = self.result.by_id(vertebraId).name
        record = {"action": "rename", "vertebra_id": vertebraId, "from": old, "to": name, "locked": lock}
        result = edits.rename(self.result, vertebraId, name, lock)
        # the latest correction takes the name: another point locked to it is unlocked (edits.rename)
        unlocked = [v for v in self.result.vertebrae
                    if v.fixed and v.id != vertebraId and not result.by_id(v.id).fixed]
        if unlocked:
            record["unlocked_vertebra_ids"] = [v.id for v in unlocked]
            self.lastNotice = (f"{unlocked[0].name} was locked on another point, which is unlocked and now named "
                               + ", ".join(result.by_id(v.id).name for v in unlocked))
        self._set(result, record, voxels=False)

    def setLocked(self, vertebraId: int, locked: bool) -> None:
        """Fix or release a vertebra's name and update both nodes."""
        if not self._readBackKeeps(vertebraId):
            return
        name = self.result.by_id(vertebraId).name
        self._set(edits.set_locked(self.result, vertebraId, locked),
                  {"action": "lock" if locked else "unlock", "vertebra_id": vertebraId, "name": name}, voxels=False)

    def movePoint(self, vertebraId: int, lps) -> None:
        """Move a vertebra's centroid to ``lps`` (mm; see :func:`SpineLabelLib.edits.move_point`)."""
        if not self._readBackKeeps(vertebraId):
            return
        under = edits.component_at(self.result, lps)
        self._set(edits.move_point(self.result, vertebraId, lps),
                  {"action": "move", "vertebra_id": vertebraId, "name": self.result.by_id(vertebraId).name,
                   "to_lps_mm": [round(float(c), 3) for c in lps], "onto_vertebra_id": under or None}, voxels=False)

    def delete(self, vertebraId: int) -> None:
        """Delete a vertebra (segment and point) and re-solve."""
        if not self._readBackKeeps(vertebraId):
            return
        name = self.result.by_id(vertebraId).name
        self._set(edits.delete(self.result, vertebraId), {"action": "delete", "vertebra_id": vertebraId, "name": name},
                  voxels=True)

    def addVertebra(self, lps, name: str | None = None) -> int:
        """Add a vertebra at a point on its body (LPS mm), shaped like its nearest neighbour; returns its id. A point
        placed where a vertebra that a correction removed had its point (``_removedAt``) brings that one back instead,
        its free voxels and its level evidence with it, its name not fixed (there is no undo of a deleted point)."""
        self._requireNodes()
        self._readBackIfEdited()
        removedId = self._removedAt(lps)
        if removedId is not None:
            components = self.result.components.copy()
            voxels = components.reshape(-1)  # a view: components is C-contiguous
            back = self._removedVoxels[removedId]
            voxels[back[voxels[back] == 0]] = removedId
            updated = edits.restore(self.result.copy(components=components), [self._removed[removedId]])
            if name is not None:
                updated = edits.rename(updated, removedId, name)
            self._set(updated, {"action": "restore", "vertebra_id": removedId,
                                "at_lps_mm": [round(float(c), 3) for c in lps], "name": name}, voxels=True)
            return removedId
        before = {v.id for v in self.result.vertebrae}
        updated = edits.add_vertebra(self.result, self.image, lps, name)
        newId = next(v.id for v in updated.vertebrae if v.id not in before)
        self._set(updated, {"action": "add", "vertebra_id": newId, "at_lps_mm": [round(float(c), 3) for c in lps],
                            "name": name}, voxels=True)
        return newId

    def _removedAt(self, lps) -> int | None:
        """The id of the vertebra a correction removed whose body centroid lies within ``_RESTORE_REACH_MM`` of the
        point (LPS mm), where no vertebra is now: placed where its point was, it comes back; placed elsewhere on its
        old voxels (a deleted segment that held two vertebrae, say), a new vertebra is added."""
        if edits.component_at(self.result, lps):
            return None
        point = np.asarray(lps, dtype=float)
        distance, vertebraId = min(((float(np.linalg.norm(np.asarray(v.centroid_lps_mm) - point)), i)
                                    for i, v in self._removed.items()), default=(np.inf, None))
        return vertebraId if distance <= _RESTORE_REACH_MM else None

    def pointIndexOf(self, vertebraId: int) -> int:
        """Index of the control point of vertebra ``vertebraId`` in the markups node, -1 without one. The points are
        found by their ids: the Markups module's Move up / Move down reorder them."""
        for pointId, vertebra in self._pointToVertebra.items():
            if vertebra == vertebraId:
                return self.markupsNode.GetNthControlPointIndexByID(pointId)
        return -1

    def correctionCount(self) -> int:
        """How many corrections this labelling holds, voxel edits in the Segment Editor not yet taken in included
        (read back now, as before a correction): what a new labelling of the volume would replace."""
        if self.segmentationNode.GetScene() is not None:
            self._readBackIfEdited()
        return len(self.corrections)

    def _readBackKeeps(self, vertebraId: int) -> bool:
        """Take Segment Editor edits in before a correction is solved (a segment removed there would otherwise come
        back, and the names change at export); False when this vertebra is gone (its segment was deleted or emptied,
        taken in now or by an earlier correction of the same edit), which leaves nothing to correct. Reads back only
        when the segments or their voxels changed since SpineLabel last wrote or read them (a read-back takes seconds
        on a large volume; a rename should not).

        Raises:
            KeyError: an id this labelling never had.
        """
        self._requireNodes()
        if vertebraId not in self._removed and all(v.id != vertebraId for v in self.result.vertebrae):
            raise KeyError(f"no vertebra with id {vertebraId}")
        self._readBackIfEdited()
        return any(v.id == vertebraId for v in self.result.vertebrae)

    def _readBackIfEdited(self) -> None:
        """:meth:`readBackSegmentation` when the segments or their voxels changed since SpineLabel last wrote or read
        them (``_voxelState``); a read-back of unchanged segments finds nothing to take in, and reads the whole volume
        (an export or an added vertebra of a 512x512x800 CT spent 15-20 s on it)."""
        if self._voxelState() != self._voxelStateKnown:
            self.readBackSegmentation()

    def _voxelState(self) -> tuple:
        """What changes when segments are removed or added or their voxels edited: the segment ids and the modified
        time of each layer's voxels."""
        segmentation = self.segmentationNode.GetSegmentation()
        return (tuple(segmentation.GetSegmentIDs()),
                tuple(segmentation.GetLayerDataObject(i).GetMTime() for i in range(segmentation.GetNumberOfLayers())))

    def readBackSegmentation(self) -> bool:
        """Take voxel edits made in the segmentation node (Segment Editor) into ``result``.

        Each ``vertebra_<id>`` segment's voxels become that vertebra's component; where two segments overlap, the
        voxel goes to the one that did not hold it before (the segment the user painted it into; the later segment
        when neither did), and the segments are rewritten so resolved. Vertebrae whose segment was removed or emptied
        are deleted; a vertebra that a correction removed and whose segment is back (the Segment Editor's undo) is
        restored; segments SpineLabel did not make are ignored. Names, colours and values are the labelling's (a
        changed segment name, or one an undo brought back, is not read back: rename with the markups).

        Returns:
            True when the components changed.
        """
        segmentation = self.segmentationNode.GetSegmentation()
        known = {v.id for v in self.result.vertebrae}
        segmentIds, restored = [], []
        for segmentId in segmentation.GetSegmentIDs():
            vertebraId = vertebraIdOf(segmentId)
            if vertebraId in known:
                segmentIds.append(segmentId)
            elif vertebraId in self._removed:  # an undo in the Segment Editor brought back a removed vertebra
                segmentIds.append(segmentId)
                restored.append(vertebraId)
            else:
                log.info("segment %r was not made by SpineLabel; it is not exported", segmentId)
        geometry = self.result.geometry
        if not segmentIds:
            components = np.zeros_like(self.result.components)
        else:
            components = self._merged(segmentIds)  # later segments win where segments overlap
            if segmentation.GetNumberOfLayers() > 1:  # segments of one shared layer cannot overlap
                earlier = self._merged(segmentIds[::-1])
                # where the two merges differ, the segment painted is the one that did not hold the voxel before
                keepEarlier = (components != earlier) & (components == self.result.components)
                components = np.where(keepEarlier, earlier, components)
        if components.shape != self.result.components.shape:
            raise RuntimeError(f"merged labelmap {components.shape} does not match the image grid "
                               f"{self.result.components.shape}")
        if np.array_equal(components, self.result.components):
            self._writeSegments(voxels=False)  # names, colours and values an undo may have brought back
            self._voxelStateKnown = self._voxelState()
            return False
        differs = components != self.result.components
        changed = sorted(({int(i) for i in np.unique(components[differs])}
                          | {int(i) for i in np.unique(self.result.components[differs])}) - {0})
        updated = self.result.copy(components=components)
        # counted within the vertebrae's box: an int64 copy of the whole volume took 1.7 GB and 2-5 s (512x512x800 CT)
        box = nonzero_box(components)
        counts = np.bincount(components[box].ravel() if box is not None else np.zeros(0, np.int64),
                             minlength=max(known | set(restored), default=0) + 1)
        restored = [self._removed[i] for i in restored if counts[i]]
        if restored:
            try:
                updated = edits.restore(updated, restored)
            except ValueError as err:  # its name cannot stand beside names fixed since it was removed
                log.warning("vertebrae %s, brought back by an undo, are not restored (%s); their segments are removed",
                            [v.id for v in restored], err)
                components = np.where(np.isin(components, [v.id for v in restored]), 0, components)
                updated = self.result.copy(components=components.astype(self.result.components.dtype))
        voxelMl = float(np.prod(geometry.spacing)) / 1000.0
        for v in updated.vertebrae:
            v.volume_ml = round(float(counts[v.id]) * voxelMl, 3)
        for vertebraId in sorted(v.id for v in updated.vertebrae if counts[v.id] == 0):
            updated = edits.delete(updated, vertebraId)
        # overlapping segments (the Segment Editor's layers) are rewritten as resolved, so that the next read-back
        # finds no overlap to resolve again
        self._set(updated, {"action": "segment_edit", "vertebra_ids": changed},
                  voxels=segmentation.GetNumberOfLayers() > 1)
        return True

    def _merged(self, segmentIds: list[str]) -> np.ndarray:
        """:func:`_mergedSegments` of this labelling's segmentation, in the dtype of ``result.components``."""
        return _mergedSegments(self.segmentationNode, segmentIds, self.result.geometry).astype(
            self.result.components.dtype)

    def exportCase(self, datasetDir, caseId: str | None = None):
        """Read back Segment Editor edits and append this labelling to an nnU-Net dataset
        (:func:`SpineLabelLib.export.export_case`); returns the label map path. Segments the user added that hold
        voxels are not exported, and points that lie off their own segment after Segment Editor edits of it are
        exported as their vertebra's centroid; ``lastNotice`` names both."""
        self._requireNodes()
        self._readBackIfEdited()
        path = export.export_case(self.result, self.image, datasetDir, caseId, self.corrections, self.result.model)
        notices = []
        left = self._segmentsNotExported()
        if left:
            named = ", ".join(repr(name) for name in left)
            notices.append((f"segment {named}, added in the Segment Editor, is" if len(left) == 1 else
                            f"segments {named}, added in the Segment Editor, are")
                           + " not exported: place a point on a missed vertebra to add it, then refine its segment")
        # a point is its vertebra's exported centroid; only edited vertebrae are named: the point of one the view cuts
        # (the centroid of the part in view) can lie off its segment as labelled, with nothing to correct
        edited = {i for c in self.corrections if c.get("action") == "segment_edit" for i in c.get("vertebra_ids", ())}
        astray = [v.name for v in self.result.vertebrae
                  if v.id in edited and edits.component_at(self.result, v.centroid_lps_mm) != v.id]
        if astray:
            many = len(astray) > 1
            notices.append(f"{'points' if many else 'point'} {', '.join(astray)} {'lie' if many else 'lies'} off "
                           f"{'their segments' if many else 'its segment'} and {'are' if many else 'is'} exported as "
                           f"the centroid: move {'them' if many else 'it'} onto the vertebral body and export again")
        if notices:  # shown in the panel's warnings until the next correction
            self.lastNotice = "; ".join(notices)
            log.warning("%s: %s", path, self.lastNotice)
        return path

    def _segmentsNotExported(self) -> list[str]:
        """Names of the segments that hold voxels but are none of this labelling's vertebrae (segments the user
        added in the Segment Editor): an export leaves them out."""
        segmentation = self.segmentationNode.GetSegmentation()
        vertebrae = {segmentIdOf(v.id) for v in self.result.vertebrae}
        names = []
        for segmentId in segmentation.GetSegmentIDs():
            if segmentId in vertebrae:
                continue
            segment = segmentation.GetSegment(segmentId)
            image = segmentation.GetLayerDataObject(segmentation.GetLayerIndex(segmentId))
            if image is None or image.GetPointData().GetScalars() is None:
                continue
            if np.any(_voxelsOf(image) == segment.GetLabelValue()):
                names.append(segment.GetName())
        return names

    # ------------------------------------------------------------------------------------------- node output

    def _placeUnderVolume(self) -> None:
        """Make both nodes children of the volume's subject hierarchy item (creating items where the
        application has not, as happens without Slicer's Qt subject hierarchy plugins)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.volumeNode.GetScene())
        if shNode is None:
            return
        volumeItem = shNode.GetItemByDataNode(self.volumeNode) or shNode.CreateItem(shNode.GetSceneItemID(),
                                                                                    self.volumeNode)
        for node in (self.segmentationNode, self.markupsNode):
            item = shNode.GetItemByDataNode(node)
            if item:
                shNode.SetItemParent(item, volumeItem)
            else:
                shNode.CreateItem(volumeItem, node)

    def _set(self, result: SpineLabeling, record: dict, voxels: bool) -> None:
        """Adopt a corrected labelling, log the correction and update both nodes."""
        self._requireNodes()
        ids = {v.id for v in result.vertebrae}
        for v in self.result.vertebrae:
            if v.id not in ids:
                self._removed[v.id] = v
                self._removedVoxels[v.id] = np.flatnonzero(self.result.components == v.id)
        for vertebraId in ids:
            self._removed.pop(vertebraId, None)
            self._removedVoxels.pop(vertebraId, None)
        self.result = result
        self.corrections.append(record)
        log.info("correction: %s", record)
        self._writeSegments(voxels=voxels)
        self._writePoints()
        self._storeState()

    def _storeState(self) -> None:
        """Keep the labelling and its corrections in the segmentation node's ``STATE_ATTRIBUTE``, which the scene
        saves."""
        self.segmentationNode.SetAttribute(STATE_ATTRIBUTE, json.dumps(
            {"result": resultDocument(self.result), "corrections": self.corrections}))

    def _writeSegments(self, voxels: bool) -> None:
        """Make the segments match ``result``: one per vertebra, names, colours, terminology, label values.

        Args:
            voxels: rewrite the voxels from ``result.components``; otherwise keep the node's voxels (which may
                hold Segment Editor edits) and only re-map their label values to the new levels.
        """
        segmentation = self.segmentationNode.GetSegmentation()
        wanted = {segmentIdOf(v.id): v for v in self.result.vertebrae}
        with NodeModify(self.segmentationNode):
            for segmentId in list(segmentation.GetSegmentIDs()):
                if vertebraIdOf(segmentId) is not None and segmentId not in wanted:
                    segmentation.RemoveSegment(segmentId)
            if voxels:
                shared = _orientedImage(self.result.geometry, self.result.label_map())
            else:
                self._remapLabelValues(wanted)
            order = [segmentIdOf(v.id) for v in self.result.vertebrae]
            for segmentId in order:
                vertebra = wanted[segmentId]
                segment = segmentation.GetSegment(segmentId)
                isNew = segment is None
                if isNew:
                    segment = slicer.vtkSegment()
                segment.SetName(vertebra.name)
                segment.SetNameAutoGenerated(False)
                segment.SetColor(*vertebra.level.colour)
                segment.SetColorAutoGenerated(False)
                segment.SetLabelValue(vertebra.label)
                segment.SetTag(segment.GetTerminologyEntryTagName(), terminology_entry(vertebra.level))
                if voxels:
                    segment.AddRepresentation(
                        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), shared)
                if isNew:
                    segmentation.AddSegment(segment, segmentId)
            for position, segmentId in enumerate(order):  # segments listed in chain order, cranial first
                if segmentation.GetSegmentIndex(segmentId) != position:
                    segmentation.SetSegmentIndex(segmentId, position)
        self._voxelStateKnown = self._voxelState()

    def _remapLabelValues(self, wanted: dict) -> None:
        """Change the voxel values of each shared layer from the segments' old label values to the new ones. A
        segment SpineLabel did not make that shares such a layer and one of those values (one the user added) is
        first given a layer of its own, so that its voxels are neither renumbered nor merged into a vertebra."""
        segmentation = self.segmentationNode.GetSegmentation()
        for layer in range(segmentation.GetNumberOfLayers()):
            mapping = {}
            for segmentId in segmentation.GetSegmentIDsForLayer(layer):
                if segmentId in wanted:
                    old = segmentation.GetSegment(segmentId).GetLabelValue()
                    if old != wanted[segmentId].label:
                        mapping[old] = wanted[segmentId].label
            if not mapping:
                continue
            for segmentId in segmentation.GetSegmentIDsForLayer(layer):
                if segmentId not in wanted and segmentation.GetSegment(segmentId).GetLabelValue() in {*mapping,
                                                                                                   *mapping.values()}:
                    segmentation.SeparateSegmentLabelmap(segmentId)
            image = segmentation.GetLayerDataObject(layer)
            voxels = _voxelsOf(image)
            box = nonzero_box(voxels)  # the vertebrae fill a few % of a whole-spine CT: 1-1.5 s a rename without
            if box is None:
                continue
            voxels = voxels[box]  # a view
            lut = np.arange(max(int(voxels.max(initial=0)), *mapping.keys(), *mapping.values()) + 1, dtype=voxels.dtype)
            for old, new in mapping.items():
                lut[old] = new
            voxels[...] = lut[voxels]
            image.Modified()

    def _writePoints(self) -> None:
        """Rebuild the control points from ``result`` in chain order, in one batch, without reacting to it."""
        node = self.markupsNode
        self._updating = True
        try:
            with NodeModify(node):
                node.RemoveAllControlPoints()
                self._pointToVertebra = {}
                for v in self.result.vertebrae:
                    ras = _LPS_TO_RAS * np.asarray(v.centroid_lps_mm, dtype=float)
                    index = node.AddControlPoint(vtk.vtkVector3d(*ras), v.name)
                    node.SetNthControlPointDescription(index, f"confidence {confidence_text(v.confidence)}")
                    node.SetNthControlPointLocked(index, v.fixed)
                    self._pointToVertebra[node.GetNthControlPointID(index)] = v.id
        finally:
            self._updating = False

    # ---------------------------------------------------------------------------------------- markups input

    def _onInteractionStart(self, caller, event) -> None:
        self._interacting = True

    def _onInteractionEnd(self, caller, event) -> None:
        self._interacting = False
        self._onPointsChanged(caller, event)

    def _onPointsChanged(self, caller, event) -> None:
        if self._updating or self._interacting:
            return
        actions = self._pendingActions()
        if not actions:
            return
        self.lastError = self.lastNotice = ""
        for action in actions:
            try:
                action()
            except (KeyError, ValueError, RuntimeError) as err:
                self.lastError = str(err).strip("'\"")
                log.warning("correction not applied: %s", self.lastError)
                self._writePoints()  # show the labelling as it is
                break
        for callback in self.changedCallbacks:
            callback(self)

    def _pendingActions(self) -> list[Callable[[], object]]:
        """What the user did to the control points since they were last written, as correction calls."""
        node = self.markupsNode
        actions: list[Callable[[], object]] = []
        present: set[str] = set()
        for index in range(node.GetNumberOfControlPoints()):
            pointId = node.GetNthControlPointID(index)
            present.add(pointId)
            lps = tuple(float(c) for c in _LPS_TO_RAS * np.asarray(node.GetNthControlPointPosition(index)))
            label = node.GetNthControlPointLabel(index).strip()
            vertebraId = self._pointToVertebra.get(pointId)
            if vertebraId is None:
                if node.GetNthControlPointPositionStatus(index) == slicer.vtkMRMLMarkupsNode.PositionDefined:
                    actions.append(lambda lps=lps, name=_levelNameOrNone(label): self.addVertebra(lps, name))
                continue
            vertebra = self.result.by_id(vertebraId)
            locked = bool(node.GetNthControlPointLocked(index))
            if label != vertebra.name:
                actions.append(lambda i=vertebraId, name=label: self.rename(i, name))
            elif locked != vertebra.fixed:
                actions.append(lambda i=vertebraId, locked=locked: self.setLocked(i, locked))
            elif np.linalg.norm(np.subtract(lps, vertebra.centroid_lps_mm)) > _MOVE_TOLERANCE_MM:
                actions.append(lambda i=vertebraId, lps=lps: self.movePoint(i, lps))
        for pointId, vertebraId in self._pointToVertebra.items():
            if pointId not in present:
                actions.append(lambda i=vertebraId: self.delete(i))
        return actions


def savedLabelings(scene, followed=()) -> list[LabelingScene]:
    """The labellings of a loaded scene's segmentation nodes (:meth:`LabelingScene.fromSavedNodes`), each followed
    again, one per volume: not those of a volume whose labelling is followed (its segmentation node in ``followed``)
    or taken already (a copy of a segmentation node would rewrite the same points), nor those no longer on their
    volume's grid. Of the labellings of one volume, one whose points were deleted (in the Data module) comes after
    those that have theirs: the volume was labelled again since, and that labelling, corrections and all, is the one
    followed (the first segmentation node of the scene, the old one, was followed instead, with new points)."""
    volumeRole = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    labelings, volumesTaken = [], {node.GetNodeReferenceID(volumeRole) for node in followed}
    nodes = [scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
             for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    for node in sorted(nodes, key=lambda node: node.GetNodeReference(_POINTS_ROLE) is None):  # stable
        if node.GetNodeReferenceID(volumeRole) in volumesTaken:
            continue
        try:
            labeling = LabelingScene.fromSavedNodes(node)
        except Exception as err:  # its volume resampled since (ValueError), a state another version wrote: the
            # others are still followed; this one is labelled again
            log.warning("%s: the saved labelling is not followed again (%s)", node.GetName(), err)
            continue
        if labeling is not None:
            labelings.append(labeling)
            volumesTaken.add(labeling.volumeNode.GetID())
    return labelings


def _levelNameOrNone(label: str) -> str | None:
    """The label if it names a level (a point the user placed and named), else None (Slicer's ``F-1`` names)."""
    try:
        level_index(label)
    except KeyError:
        return None
    return label
