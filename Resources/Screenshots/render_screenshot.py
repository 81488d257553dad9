"""Render the README screenshot ``SpineLabel.png`` with Slicer's own views, offscreen.

A whole-spine CT phantom is labelled by the shipped default model, put into a real MRML scene (slicer-core) through
the extension's Qt-free logic (:class:`SpineLabelLogic.scene.LabelingScene`), and shown the way Slicer shows it:
a sagittal and a coronal slice view (``vtkMRMLSliceLogic`` reslicing the CT, Slicer's segmentation and markups
displayable managers drawing the vertebra segments and the named centroid control points) and a 3D view of the
segments' closed surfaces. Each view renders offscreen (EGL) and the three images are put side by side.

Run from the repository root::

    .venv/bin/python Resources/Screenshots/render_screenshot.py [--output PATH] [--width W] [--height H]

Needs slicer-core (PyPI), an OpenGL driver VTK can open offscreen (EGL: Debian ``libegl1 libegl-mesa0
libgl1-mesa-dri``) and the default model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # before any render window exists

import numpy as np  # noqa: E402
import slicer  # noqa: E402
import vtk  # noqa: E402
from PIL import Image  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "SpineLabel")]

from SpineLabelLib.phantom import make_phantom  # noqa: E402
from SpineLabelLib.pipeline import label_spine  # noqa: E402
from SpineLabelLogic.scene import LabelingScene, addVolumeNodeFromImage, headlessScene  # noqa: E402

log = logging.getLogger("render_screenshot")

CT_WINDOW_LEVEL = (1500.0, 300.0)  # bone window, HU
SLICE_VIEWS = (("Yellow", "Sagittal", (0.93, 0.84, 0.25)), ("Green", "Coronal", (0.43, 0.69, 0.38)))
THREED_LABEL_COLOR = (1.0, 1.0, 1.0)
THREED_ZOOM = 1.8  # the spine is tall and narrow: fill the view's height, not its bounding sphere


def build_scene():
    """``headlessScene()`` as a namespace: ``scene``, ``app`` and ``logics`` (kept alive by the namespace)."""
    scene, app, logics = headlessScene()
    return types.SimpleNamespace(scene=scene, app=app, logics=logics)


def _offscreenWindow(size: tuple[int, int]):
    """Offscreen render window of ``size`` (width, height) pixels with one renderer and an interactor (the
    markups widgets need one)."""
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(*size)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    return window, renderer, interactor


def _viewLabel(renderer, text: str, color) -> vtk.vtkTextActor:
    """Slicer-style view name in the top-left corner, in the view's layout colour."""
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    prop = actor.GetTextProperty()
    prop.SetFontSize(16)
    prop.BoldOn()
    prop.SetColor(*color)
    prop.SetVerticalJustificationToTop()
    actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    actor.SetPosition(0.02, 0.985)
    renderer.AddViewProp(actor)
    return actor


def _initializeManagers(factoryClass, app, renderer, managerNames):
    """Displayable manager group of a view, from Slicer's factory for that kind of view."""
    factory = factoryClass.GetInstance()
    factory.SetMRMLApplicationLogic(app)
    for name in managerNames:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, renderer)
    return group


def sliceView(mrml, layoutName: str, orientation: str, color, volumeNode, offsetRas: float, size: tuple[int, int]):
    """A Slicer slice view showing ``volumeNode`` with the scene's segmentations and markups.

    Args:
        mrml: namespace from :func:`build_scene`.
        layoutName: Slicer's view name ("Yellow", "Green").
        orientation: "Sagittal", "Coronal" or "Axial".
        color: layout colour (r, g, b in 0-1) of the view label.
        volumeNode: background volume.
        offsetRas: slice offset along the view normal, RAS mm.
        size: (width, height) pixels.

    Returns:
        Namespace holding the window and everything it draws (keep it alive until rendered).
    """
    window, renderer, interactor = _offscreenWindow(size)
    renderer.GetActiveCamera().ParallelProjectionOn()
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(mrml.app)
    logic.SetMRMLScene(mrml.scene)
    mrml.app.GetSliceLogics().AddItem(logic)
    node = logic.AddSliceNode(layoutName)
    group = _initializeManagers(slicer.vtkMRMLSliceViewDisplayableManagerFactory, mrml.app, renderer,
                                ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager"))
    group.SetMRMLDisplayableNode(node)
    node.SetOrientation(orientation)
    logic.GetSliceCompositeNode().SetBackgroundVolumeID(volumeNode.GetID())
    logic.ResizeSliceNode(*size)
    logic.FitSliceToBackground()
    logic.SetSliceOffset(offsetRas)
    # The slice logic blends the layers into an RGBA image; Slicer's CTK light-box manager draws it as the
    # background of the view. Here a plain 2D image actor does the same.
    mapper = vtk.vtkImageMapper()
    mapper.SetColorWindow(255.0)
    mapper.SetColorLevel(127.5)
    mapper.SetInputConnection(logic.GetImageDataConnection())
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    actor.GetProperty().SetDisplayLocationToBackground()
    renderer.AddViewProp(actor)
    label = _viewLabel(renderer, f"{layoutName[0]}  {orientation}", color)
    return types.SimpleNamespace(window=window, renderer=renderer, interactor=interactor, logic=logic, node=node,
                                 group=group, actor=actor, label=label)


def threeDView(mrml, labeling: LabelingScene, size: tuple[int, int]):
    """A Slicer 3D view of the segments' closed surfaces and the control points, seen from the patient's right.

    Args:
        mrml: namespace from :func:`build_scene`.
        labeling: the labelling in the scene (its segmentation gets a closed surface representation).
        size: (width, height) pixels.

    Returns:
        Namespace holding the window and everything it draws.
    """
    labeling.segmentationNode.CreateClosedSurfaceRepresentation()
    window, renderer, interactor = _offscreenWindow(size)
    node = mrml.scene.AddNewNodeByClass("vtkMRMLViewNode")
    node.SetLayoutName("1")
    node.SetBoxVisible(False)
    node.SetAxisLabelsVisible(False)
    renderer.SetBackground(*node.GetBackgroundColor())
    renderer.SetBackground2(*node.GetBackgroundColor2())
    renderer.GradientBackgroundOn()
    group = _initializeManagers(slicer.vtkMRMLThreeDViewDisplayableManagerFactory, mrml.app, renderer,
                                ("vtkMRMLSegmentationsDisplayableManager3D", "vtkMRMLMarkupsDisplayableManager"))
    group.SetMRMLDisplayableNode(node)
    rasBounds = [0.0] * 6
    labeling.segmentationNode.GetRASBounds(rasBounds)
    bounds = np.array(rasBounds).reshape(3, 2)
    centre = bounds.mean(axis=1)
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre + np.array([-1.0, 0.7, 0.0]) * 1000.0))  # from the patient's right, a little anterior
    camera.SetViewUp(0.0, 0.0, 1.0)
    renderer.ResetCamera(*bounds.ravel())
    camera.Zoom(THREED_ZOOM)
    renderer.ResetCameraClippingRange()
    label = _viewLabel(renderer, "1  3D", THREED_LABEL_COLOR)
    return types.SimpleNamespace(window=window, renderer=renderer, interactor=interactor, node=node, group=group,
                                 label=label)


def grab(window) -> np.ndarray:
    """Render a window and return its pixels, uint8 (rows top to bottom, columns, RGB)."""
    window.Render()
    capture = vtk.vtkWindowToImageFilter()
    capture.SetInput(window)
    capture.SetInputBufferTypeToRGB()
    capture.ReadFrontBufferOff()
    capture.Update()
    image = capture.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
    return pixels[::-1].copy()


def render(output: Path, width: int = 1000, height: int = 700, seed: int = 1) -> Path:
    """Label a whole-spine CT phantom with the default model and write the three-view screenshot.

    Args:
        output: PNG path to write.
        width: total image width, pixels (split into three views).
        height: image height, pixels.
        seed: phantom seed.

    Returns:
        ``output``.
    """
    phantom = make_phantom(modality="ct", fov="whole", seed=seed)
    result = label_spine(phantom.image, device="cpu")
    log.info("labelled %d vertebrae: %s", len(result.vertebrae), " ".join(v.name for v in result.vertebrae))

    mrml = build_scene()
    volumeNode = addVolumeNodeFromImage(mrml.scene, phantom.image, "CT phantom")
    volumeNode.GetDisplayNode().SetAutoWindowLevel(False)
    volumeNode.GetDisplayNode().SetWindowLevel(*CT_WINDOW_LEVEL)
    labeling = LabelingScene(volumeNode, result)
    # Control points lie on the body centroids, which leave a flat slice where the spine curves: show every point
    # projected onto the slice (Slicer's "Projection" option) so that all level names are visible.
    pointsDisplay = labeling.markupsNode.GetDisplayNode()
    pointsDisplay.SliceProjectionOn()
    pointsDisplay.SliceProjectionUseFiducialColorOn()
    pointsDisplay.SetSliceProjectionOpacity(1.0)
    # In 3D the points sit inside the vertebra surfaces: draw them (and their names) through the surfaces.
    pointsDisplay.OccludedVisibilityOn()
    pointsDisplay.SetOccludedOpacity(1.0)

    centroidsRas = np.array([v.centroid_lps_mm for v in result.vertebrae]) * np.array([-1.0, -1.0, 1.0])
    centreRas = np.median(centroidsRas, axis=0)
    separatorWidth = 2
    viewWidth = (width - 2 * separatorWidth) // 3
    widths = [viewWidth, viewWidth, width - 2 * separatorWidth - 2 * viewWidth]
    views = [sliceView(mrml, layoutName, orientation, color, volumeNode,
                       centreRas[0] if orientation == "Sagittal" else centreRas[1], (viewWidth, height))
             for (layoutName, orientation, color), viewWidth in zip(SLICE_VIEWS, widths)]
    views.append(threeDView(mrml, labeling, (widths[2], height)))
    panels = [grab(view.window) for view in views]
    separator = np.full((height, separatorWidth, 3), 60, dtype=np.uint8)
    picture = np.concatenate([panels[0], separator, panels[1], separator, panels[2]], axis=1)
    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(output, optimize=True)
    log.info("wrote %s (%d x %d)", output, picture.shape[1], picture.shape[0])
    labeling.cleanup()
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().with_name("SpineLabel.png"))
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=700)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    render(args.output, args.width, args.height)


if __name__ == "__main__":
    main()
