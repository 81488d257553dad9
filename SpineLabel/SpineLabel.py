"""SpineLabel: label every vertebra of a CT or MRI spine scan, correct the labels, export them as training data.

Module, parameter node, widget, logic and test in the shape of Slicer's scripted-module template. The widget only
binds ``Resources/UI/SpineLabel.ui`` to the logic; the logic delegates to the Qt-free ``SpineLabelLogic`` package
(MRML nodes, corrections, background process) and to the ``SpineLabelLib`` core.
"""

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Iterator, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Python packages SpineLabelLib needs beyond what Slicer ships (numpy, SimpleITK): import name -> pip requirement,
# with the version floors of pyproject.toml. torch is installed through the PyTorch extension (PyTorchUtils), which
# picks the build for the GPU.
REQUIRED_PACKAGES = {"scipy": "scipy>=1.10", "skimage": "scikit-image>=0.22", "nibabel": "nibabel>=5",
                     "tqdm": "tqdm>=4.60", "PIL": "pillow>=10.1", "torch": "torch>=2.2"}
# the modules SpineLabel imports of packages that load them only when first used (a half-finished install of
# scikit-image imports as a package and fails on its watershed)
USED_MODULES = {"scipy": "scipy.ndimage", "skimage": "skimage.segmentation"}
_POLL_INTERVAL_MS = 200


def _installedRelease(requirement: str) -> str:
    """``requirement`` ("scipy>=1.10") as the release installed ("scipy==1.11.4"); as it is without metadata."""
    import importlib.metadata

    name = requirement.partition(">=")[0]
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return requirement


@contextlib.contextmanager
def errorsShown(message: str) -> Iterator[None]:
    """``slicer.util.tryWithErrorDisplay`` (``message`` and the error in a message box, a wait cursor meanwhile),
    after which the error goes no further: Slicer 5.6 and later raise it again, and out of a button's handler it
    reached the Python console as a traceback. Code after the block runs either way."""
    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            yield
    except Exception:  # shown to the user already
        pass


#
# SpineLabel
#


def toCheck(vertebra) -> bool:
    """Whether a vertebra's name is one to check, highlighted in the table: its confidence below
    ``sequence.UNCERTAIN_BELOW`` and its name neither locked nor given by the user."""
    from SpineLabelLib.sequence import UNCERTAIN_BELOW

    return vertebra.confidence < UNCERTAIN_BELOW and not vertebra.fixed


class SpineLabel(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SpineLabel")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Markups", "Segmentations", "Terminologies"]
        self.parent.contributors = ["SpineLabel contributors"]
        self.parent.helpText = _(
            "Labels every vertebra of a CT or MRI spine scan: one segment and one centroid point per vertebra, "
            "named C1 to S1 with a confidence. Correct a label by editing a point: type a new name, lock it, "
            "drag it onto another vertebra, delete it, or place a new point on a missed vertebra; the other "
            "labels follow. Corrected cases can be exported as an nnU-Net training dataset. "
            "See <a href=\"https://github.com/SpineLabel/SlicerSpineLabel\">the project page</a>."
        )
        self.parent.acknowledgementText = _(
            "Vertebra label values follow the VerSe challenge (Sekuboyina et al., Medical Image Analysis 2021)."
        )
        slicer.app.connect("startupCompleted()", loadTerminologyContext)


@functools.cache  # once per Slicer session, whichever of start-up and the panel's set-up comes first
def loadTerminologyContext() -> None:
    """Load SpineLabel's terminology context, the one the vertebra segments' terminology entries name, into Slicer's
    terminologies logic. It is generated from ``SpineLabelLib.vertebrae`` (no dependency needed) into a temporary
    file, which Slicer reads completely."""
    from SpineLabelLib.vertebrae import terminology_context

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "SpineLabel.term.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(terminology_context(), f)
        if not slicer.modules.terminologies.logic().LoadTerminologyFromFile(path):
            logging.error("SpineLabel: Slicer did not load the vertebra terminology context")


#
# SpineLabelParameterNode
#


@parameterNodeWrapper
class SpineLabelParameterNode:
    """Parameters of the SpineLabel module.

    inputVolume - the CT or MRI volume to label.
    modelPath - model card (.json) to use; empty for the model that ships with SpineLabel.
    device - where the network runs.
    modality - CT or MR; auto detects it from the intensities.
    checkOrientation - also run the network on the volume turned head to feet and warn when it reads better that way.
    skipSpineGate - label the vertebra-like components even where the network does not take the image for a spine.
    datasetDirectory - nnU-Net dataset folder that corrected cases are appended to.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    modality: Annotated[str, Choice(["auto", "ct", "mr"])] = "auto"
    checkOrientation: bool = False
    skipSpineGate: bool = False
    datasetDirectory: Path = Path.home() / "SpineLabelDataset"


#
# SpineLabelWidget
#


class SpineLabelWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui controls to the logic; holds no computation."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._outputDir = None
        self._labelledVolume = None  # the volume the running process labels
        self._labelings = {}  # volume node ID -> the LabelingScene of that volume, each followed until replaced
        self._shownLabeling = None  # the labelling the table and messages show
        # volume node ID -> the ID of the node left of its labelling, no longer followed since the user deleted its
        # segmentation or its points: removed when the volume is labelled again, as a replaced labelling's nodes are
        # (an ID, not the node: a reference would keep a node deleted since, with its voxels, alive)
        self._abandoned = {}
        self._timer = None
        self._dependencyStatus = ""  # the status line's text while packages are missing
        self._reinstalled = set()  # requirements installed again in this session because their import failed

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineLabel.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SpineLabelLogic()
        loadTerminologyContext()  # a module loaded after Slicer's start-up never sees startupCompleted()
        self._timer = qt.QTimer()
        self._timer.setInterval(_POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollProcess)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)
        self.ui.addVertebraButton.connect("clicked(bool)", self.onAddVertebraButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.vertebraTable.connect("cellClicked(int,int)", self.onVertebraClicked)
        # Segment Editor's own "Show 3D" button, beside "Add missed vertebra"; it is enabled while it has a
        # segmentation node, and surfaces are rebuilt after every correction while it is on
        self.show3DButton = slicer.qMRMLSegmentationShow3DButton()
        self.show3DButton.toolTip = _("Show the vertebrae as surfaces in the 3D view (rebuilt after every correction)")
        vertebraeLayout = self.ui.vertebraeCollapsibleButton.layout()
        buttons = qt.QHBoxLayout()
        vertebraeLayout.insertLayout(vertebraeLayout.indexOf(self.ui.addVertebraButton), buttons)
        vertebraeLayout.removeWidget(self.ui.addVertebraButton)
        buttons.addWidget(self.ui.addVertebraButton)
        buttons.addWidget(self.show3DButton)

        self.initializeParameterNode()
        self.updateDependencyStatus()
        self.onSceneEndImport()  # a scene loaded before the panel was first shown

    def cleanup(self) -> None:
        self.removeObservers()
        self.cancelProcess()
        self._forgetLabelings()

    def enter(self) -> None:
        self.initializeParameterNode()  # lists the models again: SpineLabelTraining may have registered some since
        self.updateDependencyStatus()  # the packages may have come another way (the PyTorch module, pip)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelProcess()
        self._forgetLabelings()
        self.setParameterNode(None)
        self._checkCanApply()  # no labelling left: Export, Add and Show 3D off, also while the panel is not shown
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = ""
        self.ui.warningsLabel.text = ""

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        """A removed volume's labelling is no longer followed (its arrays are freed); its running labelling stops.
        So is a labelling whose segmentation or points were removed (in the Data module): its buttons would act on
        a node no longer in the scene."""
        if node is self._labelledVolume:
            self.cancelProcess()
            self.ui.statusLabel.text = _("Labelling stopped: its volume was removed.")
        volumeId = next((key for key, labeling in self._labelings.items()
                         if node in (labeling.segmentationNode, labeling.markupsNode)), node.GetID())
        abandoned = self._abandoned.pop(node.GetID(), None)  # a removed volume is labelled no more
        if abandoned is not None and self.ui.statusLabel.text == self._nodesDeletedText(node):
            # the Data module removes a volume's children first: the message that they were deleted would stay,
            # asking to label a volume that is gone
            self.ui.statusLabel.text = ""
        labeling = self._labelings.pop(volumeId, None)
        if labeling is not None:
            labeling.cleanup()
            if node is not labeling.volumeNode:
                left = labeling.markupsNode if node is labeling.segmentationNode else labeling.segmentationNode
                self._abandoned[volumeId] = left.GetID()
            self._checkCanApply()
            if node is not labeling.volumeNode and labeling.volumeNode is (
                    self._parameterNode.inputVolume if self._parameterNode else None):
                # the table emptied without a word: the user deleted the segmentation or the points (the panel's
                # own replacement of a labelling shows the new one right after)
                self.ui.statusLabel.text = self._nodesDeletedText(labeling.volumeNode)

    @staticmethod
    def _nodesDeletedText(volume) -> str:
        return _("The vertebra segmentation or points of {volume} were deleted: its labels are no longer corrected "
                 "or exported. Label it again.").format(volume=volume.GetName())

    def onSceneEndImport(self, caller=None, event=None) -> None:
        """Follow again the labellings of a loaded scene (.mrb, .mrml) that are not followed yet, one per volume:
        corrections re-solve them, and they can be exported, as before the scene was saved."""
        if self.logic.missingPackages():  # followed once they are installed and a scene is loaded
            return
        followed = [labeling.segmentationNode for labeling in self._labelings.values()]
        with errorsShown(_("Failed to restore the saved vertebra labels.")):
            for labeling in self.logic.savedLabelings(followed):
                self._labelings[labeling.volumeNode.GetID()] = labeling
                labeling.changedCallbacks.append(self.onLabelingChanged)
        self._checkCanApply()

    def _forgetLabelings(self) -> None:
        for labeling in self._labelings.values():
            labeling.cleanup()
        self._labelings.clear()
        self._abandoned.clear()
        self._shownLabeling = None

    @property
    def _labeling(self):
        """The labelling of the selected input volume (None when it has none)."""
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        return self._labelings.get(volume.GetID()) if volume is not None else None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.updateVertebraTable()
        self.updateDependencyStatus()  # its message was cleared with the scene's

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            # the first scan: label maps, vector and diffusion volumes are scalar volumes too, and the input selector
            # lists none of them
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            scans = [node for node in volumes if node.GetClassName() == "vtkMRMLScalarVolumeNode"]
            if scans:
                self._parameterNode.inputVolume = scans[0]

    def setParameterNode(self, inputParameterNode: Optional[SpineLabelParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.updateModelList()  # the combo box is not bound to the parameter node: show its model
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        running = self._process is not None
        self.ui.applyButton.enabled = running or bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.text = _("Cancel") if running else _("Label spine")
        self.ui.applyButton.toolTip = (_("Stop labelling") if running else _("Label every vertebra of the input volume")
                                       if self.ui.applyButton.enabled else _("Select an input volume"))
        self.ui.inputVolumeSelector.enabled = not running  # the result goes to the volume that was labelled
        hasLabels = self._labeling is not None
        self.ui.addVertebraButton.enabled = hasLabels and not running
        self.ui.exportButton.enabled = hasLabels and not running
        # building surfaces would hold up the polling of the running labelling; Slicer 5.6's setLocked does not
        # update the button itself
        self.show3DButton.locked = running
        self.show3DButton.enabled = hasLabels and not running
        if self._labeling is not self._shownLabeling:  # another input volume: show its labelling, if any
            self.onLabelingChanged(self._labeling)

    # -------------------------------------------------------------------------------------------- models

    def updateModelList(self) -> None:
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItem(_("Default model"), "")
        for card in self.logic.availableModels():
            self.ui.modelComboBox.addItem(f"{card['name']} {card['version']}", card["path"])
        current = self.ui.modelComboBox.findData(self._parameterNode.modelPath if self._parameterNode else "")
        self.ui.modelComboBox.setCurrentIndex(max(current, 0))
        self.ui.modelComboBox.blockSignals(False)
        # a model no longer listed (removed, or its card refused) gives way to the default; while the dependencies are
        # missing no model can be listed, and the choice is kept for when they are installed
        if current < 0 and self._parameterNode and not self.logic.missingPackages():
            self._parameterNode.modelPath = ""

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = self.ui.modelComboBox.itemData(index) or ""

    # -------------------------------------------------------------------------------------- dependencies

    @staticmethod
    def _packagesText(missing, broken) -> str:
        """The requirements ``missing``, each that fails to import with its error (``broken``, as
        ``SpineLabelLogic.brokenPackages`` gives them)."""
        return ", ".join(_("{requirement} (installed, but its import fails: {error})").format(
            requirement=requirement, error=broken[requirement]) if requirement in broken else requirement
            for requirement in missing)

    def updateDependencyStatus(self) -> None:
        missing = self.logic.missingPackages()
        self.ui.installButton.visible = bool(missing)
        if missing:
            broken = self.logic.brokenPackages()
            self._dependencyStatus = _("Missing Python packages: {packages}").format(
                packages=self._packagesText(missing, broken))
            again = sorted(self._reinstalled & set(broken))
            if again:  # this Slicer holds the parts of them its first import loaded
                self._dependencyStatus += " " + _("Restart Slicer to load {packages}, installed again.").format(
                    packages=", ".join(again))
            self.ui.statusLabel.text = self._dependencyStatus
        elif self.ui.statusLabel.text == self._dependencyStatus:  # another status stays
            self.ui.statusLabel.text = ""

    def onInstallButton(self) -> None:
        missing = self.logic.missingPackages()
        if not missing:
            self.updateDependencyStatus()
            return
        broken = self.logic.brokenPackages()
        if not slicer.util.confirmOkCancelDisplay(
            _("SpineLabel needs these Python packages: {packages}. Download and install them now? "
              "This can take several minutes.").format(packages=self._packagesText(missing, broken)),
            windowTitle=_("Install dependencies"),
        ):
            return
        self._reinstalled |= set(broken)
        with errorsShown(_("Failed to install dependencies.")):
            self.logic.installDependencies()
        self.updateDependencyStatus()  # what a failed install did install counts too
        self.updateModelList()  # the registered models can be read now

    # ------------------------------------------------------------------------------------------ labelling

    def onApplyButton(self) -> None:
        if self._process is not None:
            self.cancelProcess()
            self.ui.statusLabel.text = _("Cancelled.")
            return
        if self.logic.missingPackages():
            self.onInstallButton()
            if self.logic.missingPackages():
                return
        with errorsShown(_("Failed to start labelling.")):
            self.ui.progressBar.value = 0  # also when the start fails: not the last run's 100
            # the current labelling stays editable until the new one replaces it (Cancel keeps it)
            self._process, self._outputDir = self.logic.startLabelling(
                self._parameterNode.inputVolume, self._parameterNode.modelPath or None, self._parameterNode.device,
                self._parameterNode.checkOrientation, not self._parameterNode.skipSpineGate,
                self._parameterNode.modality)
            self._labelledVolume = self._parameterNode.inputVolume  # once its labelling runs
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()
        self._checkCanApply()

    def onPollProcess(self) -> None:
        if self._process is None:
            self._timer.stop()
            return
        ended = not self._process.running
        if ended:
            self._process.wait()  # its output read to the end: a last "done" or "error" is among the events
        for event in self._process.readEvents():
            if event["event"] == "progress":
                self.ui.progressBar.value = int(100 * event["fraction"])
                self.ui.statusLabel.text = event["message"]
            elif event["event"] == "done":
                self._finishLabelling()
                return
            elif event["event"] == "error":
                # the worker names its input, a temporary copy of the volume
                temporary, name = str(self.logic.inputPath(self._outputDir)), self._labelledVolume.GetName()
                message, tail = (text.replace(temporary, name)
                                 for text in (event["message"], self._process.outputTail()))
                self._endProcess()
                slicer.util.errorDisplay(_("Labelling failed: {message}").format(message=message), detailedText=tail)
                return
        if ended:
            tail, how = self._process.outputTail(), self._process.exitDescription()
            name = self._labelledVolume.GetName()
            self._endProcess()
            slicer.util.errorDisplay(_("The labelling process of {volume} stopped unexpectedly ({how}).").format(
                volume=name, how=how), detailedText=tail)

    def _finishLabelling(self) -> None:
        volume, outputDir = self._labelledVolume, self._outputDir
        self._process.finish()
        self._stopPolling()
        replaced = self._labelings.get(volume.GetID())
        try:
            count = replaced.correctionCount() if replaced is not None else 0
        except Exception:  # Segment Editor work that cannot be read back: ask all the same
            logging.exception("reading back the segmentation of %s", volume.GetName())
            count = max(len(replaced.corrections), 1)
        if count and not slicer.util.confirmYesNoDisplay(  # asked before the wait cursor is on
                (_("Replace the labelling of {volume}, with the correction made to it, by the new one?") if count == 1
                 else _("Replace the labelling of {volume}, with the {count} corrections made to it, by the new "
                        "one?")).format(volume=volume.GetName(), count=count)):
            self.logic.discardLabelling(outputDir)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("New labelling discarded; the corrected one is kept.")
            self._checkCanApply()
            return
        shown, labeling = False, None
        with errorsShown(_("Failed to load the labels.")):
            labeling = self.logic.finishLabelling(volume, outputDir)
            if replaced is not None:
                replaced.removeNodes()  # the new labelling of this volume replaces the old one
            from SpineLabelLogic.scene import removeNodes
            # and what the user left of one whose other node they deleted: it would show beside the new one under
            # the same name, its edits taken in nowhere
            left = volume.GetScene().GetNodeByID(self._abandoned.pop(volume.GetID(), None) or "")
            removeNodes([left] if left is not None else [])
            self._labelings[volume.GetID()] = labeling
            labeling.changedCallbacks.append(self.onLabelingChanged)
            self.ui.progressBar.value = 100
            self.onLabelingChanged(labeling)
            shown = True
        if not shown:  # its result could not be read or shown (finishLabelling removed the run's folder either way)
            if labeling is not None and self._labelings.get(volume.GetID()) is not labeling:
                labeling.removeNodes()  # no nodes that the panel does not follow
            self._showFailure()
        self._checkCanApply()

    def _endProcess(self) -> None:
        """Stop polling a process that ended without a result, and remove its temporary folder."""
        self._process.finish()
        self.logic.discardLabelling(self._outputDir)
        self._stopPolling()
        self._showFailure()

    def _showFailure(self) -> None:
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Labelling failed.")

    def _stopPolling(self) -> None:
        self._timer.stop()
        self._process = self._outputDir = self._labelledVolume = None
        self._checkCanApply()

    def cancelProcess(self) -> None:
        if self._process is not None:
            self._process.cancel()
            self.logic.discardLabelling(self._outputDir)
        if self._timer is not None:
            self._stopPolling()

    # ---------------------------------------------------------------------------------------- corrections

    def onLabelingChanged(self, labeling) -> None:
        """Show ``labeling`` (a correction of it, or a new one) when it is that of the selected input volume."""
        if labeling is not self._labeling:
            return
        self._shownLabeling = labeling
        self.updateVertebraTable()
        self.show3DButton.setSegmentationNode(labeling.segmentationNode if labeling is not None else None)
        if labeling is None:
            self.ui.warningsLabel.text = self.ui.statusLabel.text = ""
            self.ui.progressBar.value = 0
            return
        result = labeling.result
        lines = list(result.warnings)
        if labeling.lastNotice:
            lines.insert(0, labeling.lastNotice)
        if labeling.lastError:
            lines.insert(0, _("Correction not applied: {error}").format(error=labeling.lastError))
        self.ui.warningsLabel.text = "\n".join(lines) if lines else _("No warnings.")
        self.ui.statusLabel.text = _("{count} vertebrae labelled, read as {modality}.").format(
            count=len(result.vertebrae), modality=result.modality)

    def updateVertebraTable(self) -> None:
        """One row per vertebra: name, confidence, fixed. Rows whose name is uncertain (below
        ``sequence.UNCERTAIN_BELOW`` and not fixed by the user, ``toCheck``) are highlighted: those are the names
        to check."""
        from SpineLabelLib.sequence import confidence_text

        table = self.ui.vertebraTable
        vertebrae = self._labeling.result.vertebrae if self._labeling is not None else []
        table.setRowCount(len(vertebrae))
        for row, v in enumerate(vertebrae):
            uncertain = toCheck(v)
            for column, text in enumerate((v.name, confidence_text(v.confidence), _("yes") if v.fixed else "")):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                if uncertain:
                    item.setBackground(qt.QBrush(qt.QColor(255, 214, 153)))
                    item.setToolTip(_("Uncertain name: check it, and fix it by renaming its point"))
                table.setItem(row, column, item)

    def onVertebraClicked(self, row: int, column: int) -> None:
        if self._labeling is None:
            return
        index = self._labeling.pointIndexOf(self._labeling.result.vertebrae[row].id)
        if index >= 0:
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(self._labeling.markupsNode.GetID(), index, True)

    def onAddVertebraButton(self) -> None:
        """Enter place mode on the centroid points: the next click adds a vertebra there."""
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(self._labeling.markupsNode)
        markupsLogic.StartPlaceMode(False)

    def onExportButton(self) -> None:
        labeling = self._labeling
        with errorsShown(_("Failed to export the case.")):
            try:
                path = self.logic.exportCase(labeling, self._parameterNode.datasetDirectory)
            finally:  # export takes in Segment Editor edits, which may re-solve, whether or not it then writes
                self.onLabelingChanged(labeling)
            from SpineLabelLib.export import provenance_of
            # by the export of the same image: said, not silent (a record gone by now, replaced by another session's
            # export of the image, says nothing: this export was made)
            replaced = ", ".join((provenance_of(path) or {}).get("replaces") or [])
            text = (_("Exported {path} in place of {cases}, an earlier export of the same image")
                    if replaced else _("Exported {path}")).format(path=str(path), cases=replaced)
            # training takes every name as true: those still highlighted went in unchecked, unless the user looked
            unchecked = [v.name for v in labeling.result.vertebrae if toCheck(v)]
            if unchecked:
                text += "\n" + _("Exported as named, still uncertain and neither locked nor renamed by you: {names} "
                                 "(training takes them as true).").format(names=", ".join(unchecked))
            self.ui.statusLabel.text = text


#
# SpineLabelLogic
#


class SpineLabelLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, callable without the GUI (batch mode, tests).

    The heavy lifting lives in ``SpineLabelLib`` (labelling, corrections, export) and the Qt-free
    ``SpineLabelLogic`` package (MRML nodes, background process); both are imported only when used, so that
    Slicer starts even before the dependencies are installed.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SpineLabelParameterNode(super().getParameterNode())

    # -------------------------------------------------------------------------------------- dependencies

    @staticmethod
    def brokenPackages() -> dict:
        """pip requirement -> the error its import raises, of the packages SpineLabel needs that are installed (their
        folder is found) but fail to import: a half-finished install, a dependency of theirs missing. Not torch: its
        import takes seconds and memory that Slicer's process does not otherwise spend, and the labelling process
        reports a torch that fails to import."""
        import importlib
        import importlib.util

        broken = {}
        for importName, requirement in REQUIRED_PACKAGES.items():
            if importName == "torch" or importlib.util.find_spec(importName) is None:
                continue
            try:
                importlib.import_module(USED_MODULES.get(importName, importName))
            except Exception as err:
                broken[requirement] = f"{type(err).__name__}: {err}"
        return broken

    @classmethod
    def missingPackages(cls) -> list:
        """pip requirements of the packages SpineLabel needs that are not installed, fail to import
        (``brokenPackages``) or are older than its floor (torch included)."""
        import importlib.metadata
        import importlib.util
        import re

        broken = cls.brokenPackages()

        def release(version: str) -> tuple:  # "2.13.0+cpu" -> (2, 13, 0)
            return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split("."))

        def unmet(importName: str, requirement: str) -> bool:
            if importlib.util.find_spec(importName) is None or requirement in broken:
                return True
            name, _sep, floor = requirement.partition(">=")
            try:
                return release(importlib.metadata.version(name)) < release(floor)
            except importlib.metadata.PackageNotFoundError:  # importable without metadata: take it as it is
                return False

        return [requirement for importName, requirement in REQUIRED_PACKAGES.items() if unmet(importName, requirement)]

    def installDependencies(self) -> None:
        """Install the missing packages. Call only after the user agreed. torch comes from the PyTorch
        extension (it picks the CUDA or CPU build); the others from PyPI, those that fail to import installed again.
        SimpleITK is never touched."""
        missing, broken = self.missingPackages(), self.brokenPackages()
        torch = REQUIRED_PACKAGES["torch"]
        if torch in missing:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("PyTorch is needed: install the 'PyTorch' extension from the Extensions "
                                     "Manager, restart Slicer, and try again.")) from None
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=torch[len("torch"):])
            missing.remove(torch)
        if missing:
            if broken:  # pip takes an installed package as it is: these again, alone (their dependencies, numpy
                # among them, would be reinstalled too) and at the release installed (the newest may need a newer
                # numpy); the install below adds a dependency of theirs that is missing
                slicer.util.pip_install(["--force-reinstall", "--no-deps", *map(_installedRelease, broken)])
            slicer.util.pip_install(missing)  # a list: each requirement one argument of pip, floor included

    # ------------------------------------------------------------------------------------------- models

    @classmethod
    def availableModels(cls) -> list:
        """Cards of the registered fine-tuned models (the default model is listed separately by the widget);
        empty while the dependencies are missing (the model registry needs torch)."""
        if cls.missingPackages():
            return []
        from SpineLabelLib.models import default_model_path, list_models

        default = str(default_model_path())
        return [card for card in list_models() if card["path"] != default]

    # ---------------------------------------------------------------------------------------- labelling

    def startLabelling(self, volumeNode, modelPath=None, device="auto", checkOrientation=False, spineGate=True,
                       modality="auto"):
        """Write the volume to a temporary file and label it in a background process.

        Returns:
            (process, outputDirectory): a started ``SpineLabelLogic.process.BackgroundProcess`` whose events are
            ``{"event": "progress"|"done"|"error", ...}``, and where the worker writes its result.
        """
        import SimpleITK as sitk

        from SpineLabelLogic.process import (BackgroundProcess, labelCommand, moduleRoot, parseWorkerLine,
                                             pythonExecutable, pythonPathEnvironment)
        from SpineLabelLogic.scene import imageFromVolumeNode

        if volumeNode is None:
            raise ValueError(_("Select an input volume."))
        outputDirectory = Path(tempfile.mkdtemp(prefix="SpineLabel-")) / "result"
        inputPath = self.inputPath(outputDirectory)
        try:
            sitk.WriteImage(imageFromVolumeNode(volumeNode), str(inputPath), False)  # temporary: no compression
            process = BackgroundProcess(
                labelCommand(pythonExecutable(), inputPath, outputDirectory, modelPath, device, checkOrientation,
                             spineGate, modality),
                # the run's own folder: "-m" puts the working folder first on the path, where a random.py or a
                # SpineLabelLogic/ of the folder Slicer was started from would shadow the modules
                parseWorkerLine, env=pythonPathEnvironment([moduleRoot()]), cwd=outputDirectory.parent)
            process.start()
        except BaseException:
            self.discardLabelling(outputDirectory)  # the copy of the volume with it
            raise
        return process, outputDirectory

    @staticmethod
    def inputPath(outputDirectory) -> Path:
        """The worker's input: the volume copied into the run's temporary folder."""
        return Path(outputDirectory).parent / "input.nrrd"

    def finishLabelling(self, volumeNode, outputDirectory):
        """Show a finished worker's result: segmentation and centroid points under the volume; the run's temporary
        folder is removed, whether or not its result can be read.

        Returns:
            ``SpineLabelLogic.scene.LabelingScene``.
        """
        from SpineLabelLogic.scene import LabelingScene
        from SpineLabelLogic.worker import loadResult

        try:
            result = loadResult(outputDirectory)
        finally:
            self.discardLabelling(outputDirectory)
        return LabelingScene(volumeNode, result)

    @staticmethod
    def discardLabelling(outputDirectory) -> None:
        """Remove the temporary folder of a labelling run (input copy and worker output)."""
        if outputDirectory:
            shutil.rmtree(Path(outputDirectory).parent, ignore_errors=True)

    def label(self, volumeNode, modelPath=None, device="auto", progress=None, checkOrientation=False,
              spineGate=True, modality="auto", cancel=None):
        """Label a volume in this process (batch mode, tests) and show the result; ``progress`` and ``cancel`` are
        ``label_spine``'s.

        Returns:
            ``SpineLabelLogic.scene.LabelingScene``.

        Raises:
            ValueError: no volume given, as ``startLabelling`` says it.
            SpineLabelLib.pipeline.NoVertebrae: no vertebra was labelled (nothing is added to the scene), as the
                background worker reports it.
        """
        from SpineLabelLib.io import checked_image
        from SpineLabelLib.pipeline import label_spine, require_vertebrae
        from SpineLabelLogic.scene import LabelingScene, imageFromVolumeNode

        if volumeNode is None:
            raise ValueError(_("Select an input volume."))
        image = checked_image(imageFromVolumeNode(volumeNode), volumeNode.GetName())
        result = label_spine(image, model=modelPath, device=device, progress=progress, cancel=cancel,
                             check_orientation=checkOrientation, spine_gate=spineGate, modality=modality)
        return LabelingScene(volumeNode, require_vertebrae(result, volumeNode.GetName()))

    @staticmethod
    def savedLabelings(followed=()):
        """The labellings saved with the scene (``SpineLabelLogic.scene.savedLabelings``) but those whose
        segmentation node is in ``followed``, each followed again."""
        from SpineLabelLogic.scene import savedLabelings

        return savedLabelings(slicer.mrmlScene, followed)

    def exportCase(self, labeling, datasetDirectory, caseId=None):
        """Append the corrected labelling (Segment Editor edits included) to an nnU-Net dataset folder."""
        return labeling.exportCase(datasetDirectory, caseId)


#
# SpineLabelTest
#


class SpineLabelTest(ScriptedLoadableModuleTest):
    """Labels a small CT phantom with the shipped model, corrects it and exports it."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SpineLabel_phantom()

    def test_SpineLabel_phantom(self):
        missing = SpineLabelLogic.missingPackages()
        if missing:  # a Slicer build or test machine without them: Slicer ships neither torch nor nibabel
            self.skipTest(f"Python packages missing: {', '.join(missing)}")
        from SpineLabelLib.phantom import make_phantom
        from SpineLabelLogic.scene import addVolumeNodeFromImage

        self.delayDisplay("Labelling a lumbar CT phantom")
        phantom = make_phantom(modality="ct", fov="lumbar", seed=3)
        volumeNode = addVolumeNodeFromImage(slicer.mrmlScene, phantom.image, "phantom")
        logic = SpineLabelLogic()
        labeling = logic.label(volumeNode, device="cpu")
        vertebrae = labeling.result.vertebrae
        self.assertGreaterEqual(len(vertebrae), 3)
        segmentation = labeling.segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(vertebrae))
        # the lumbar vertebrae are found and named as the phantom's label map names the voxel at each centroid (a
        # count of segments alone passes with every name wrong)
        import numpy as np
        import SimpleITK as sitk

        from SpineLabelLib.vertebrae import BY_LABEL

        truth = sitk.GetArrayViewFromImage(phantom.labels)  # (z, y, x) VerSe labels
        named = {}  # true level at each centroid -> the name given
        for v in vertebrae:
            i, j, k = np.rint(labeling.result.geometry.lps_to_index(np.asarray(v.centroid_lps_mm))).astype(int)
            level = BY_LABEL.get(int(truth[k, j, i]))
            named[level.name if level is not None else "-"] = v.name
        lumbar = ["L1", "L2", "L3", "L4", "L5"]
        self.assertEqual([named.get(name) for name in lumbar], lumbar)

        self.delayDisplay("Renaming the top vertebra through its point")
        top = vertebrae[0]
        labeling.markupsNode.SetNthControlPointLabel(0, "T11" if top.name != "T11" else "T10")
        self.assertEqual(labeling.lastError, "")
        self.assertTrue(labeling.result.vertebrae[0].fixed)
        names = [v.name for v in labeling.result.vertebrae]
        self.assertEqual(names, [segmentation.GetSegment(s).GetName() for s in segmentation.GetSegmentIDs()])

        self.delayDisplay("Exporting")
        with tempfile.TemporaryDirectory() as folder:
            labelPath = logic.exportCase(labeling, folder)
            self.assertTrue(os.path.exists(labelPath))
            caseId = os.path.basename(labelPath)[: -len(".nii.gz")]
            self.assertTrue(os.path.exists(os.path.join(folder, "imagesTr", f"{caseId}_0000.nii.gz")))
            self.assertTrue(os.path.exists(os.path.join(folder, "dataset.json")))
        labeling.cleanup()
        logging.info("SpineLabel test passed")
        self.delayDisplay("Test passed")
