"""SpineLabelTraining: fine-tune a SpineLabel model on cases corrected and exported with the SpineLabel module.

Module, parameter node, widget, logic and test in the shape of Slicer's scripted-module template. Training runs
in a background process (``spinelabel train``); the widget shows epoch, loss and metrics as they arrive and can
stop it. A finished model is registered with ``SpineLabelLib.models.register_model`` and appears in SpineLabel's
model list.
"""

import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_POLL_INTERVAL_MS = 500
_CLI_ERROR = "spinelabel: error: "  # how spinelabel begins the line that says why it failed


#
# SpineLabelTraining
#


class SpineLabelTraining(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SpineLabel Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["SpineLabel"]
        self.parent.contributors = ["SpineLabel contributors"]
        self.parent.helpText = _(
            "Fine-tunes a SpineLabel model on a dataset folder of corrected cases (exported from the SpineLabel "
            "module, or an nnU-Net dataset whose dataset.json names its labels after the vertebrae), mixed with "
            "procedural phantoms and images without a spine so that the model keeps what it knew of other spines. "
            "The new model is registered and can be chosen in SpineLabel's model list."
        )
        self.parent.acknowledgementText = _("Part of the SpineLabel extension.")


#
# SpineLabelTrainingParameterNode
#


@parameterNodeWrapper
class SpineLabelTrainingParameterNode:
    """Parameters of the SpineLabelTraining module.

    datasetDirectory - nnU-Net dataset folder of corrected cases.
    baseModelPath - model card to fine-tune; empty for the model that ships with SpineLabel.
    modelName - name the new model is registered under.
    epochs - training epochs.
    validationCases - fixed crops scored after every epoch.
    device - where training runs.
    """

    datasetDirectory: Path = Path.home() / "SpineLabelDataset"
    baseModelPath: str = ""
    modelName: str = "spinelabel-finetuned"
    epochs: Annotated[int, WithinRange(1, 1000)] = 10
    validationCases: Annotated[int, WithinRange(1, 200)] = 4
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"


#
# SpineLabelTrainingWidget
#


class SpineLabelTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui controls to the logic; holds no computation."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._outCard = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineLabelTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SpineLabelTrainingLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(_POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollProcess)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.baseModelComboBox.connect("currentIndexChanged(int)", self.onBaseModelChanged)
        self.ui.datasetDirectoryButton.connect("directoryChanged(QString)", self.updateDatasetSummary)

        self.initializeParameterNode()
        self.updateModelList()
        self.updateDatasetSummary()

    def cleanup(self) -> None:
        self.removeObservers()
        _, outCard = self.stopTraining()
        if outCard is not None:  # a run the module ends as it closes: nobody is left to be told of its checkpoint
            self.logic.discardTraining(outCard)

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateModelList()
        self.updateDatasetSummary()  # cases exported since the panel was last shown

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[SpineLabelTrainingParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._updateButtons()

    def _updateButtons(self) -> None:
        running = self._process is not None
        self.ui.trainButton.text = _("Stop") if running else _("Start training")
        for widget in (self.ui.datasetDirectoryButton, self.ui.baseModelComboBox, self.ui.modelNameLineEdit,
                       self.ui.epochsSpinBox, self.ui.validationCasesSpinBox, self.ui.deviceComboBox):
            widget.enabled = not running

    def updateModelList(self) -> None:
        self.ui.baseModelComboBox.blockSignals(True)
        self.ui.baseModelComboBox.clear()
        for card in self.logic.availableModels():
            self.ui.baseModelComboBox.addItem(f"{card['name']} {card['version']}", card["path"])
        current = self.ui.baseModelComboBox.findData(self._parameterNode.baseModelPath if self._parameterNode else "")
        self.ui.baseModelComboBox.setCurrentIndex(max(current, 0))
        self.ui.baseModelComboBox.blockSignals(False)
        self.onBaseModelChanged(self.ui.baseModelComboBox.currentIndex)

    def onBaseModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.baseModelPath = self.ui.baseModelComboBox.itemData(index) or ""

    def updateDatasetSummary(self, directory=None) -> None:
        folder = directory or (str(self._parameterNode.datasetDirectory) if self._parameterNode else "")
        self.ui.datasetSummaryLabel.text = self.logic.datasetSummary(folder)

    def onTrainButton(self) -> None:
        if self._process is not None:
            if not self._process.running:  # it ended since the timer last looked: its result stands, not a Stop
                self.onPollProcess()
                return
            process, outCard = self.stopTraining()
            kept = self.logic.keptAfterFailure(outCard)  # a long run stopped to free the machine can go on later
            self.ui.statusLabel.text = (_("Stopped; no model was registered. Its checkpoint is kept (see the log).")
                                        if kept else _("Stopped; no model was registered."))
            if kept:
                self.ui.logTextEdit.appendPlainText(self._resumeText(process, kept))
            return
        from SpineLabel import errorsShown

        with errorsShown(_("Failed to start training.")):
            p = self._parameterNode
            # also when the start is refused: nothing of the last run (its result, where Stop left it) stays
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = ""
            self._process, self._outCard = self.logic.startTraining(
                p.datasetDirectory, p.baseModelPath or None, p.modelName, p.epochs, p.device,
                extraArguments=("--validation-cases", p.validationCases))
            self.ui.logTextEdit.clear()
            self.ui.statusLabel.text = _("Training...")
            self._timer.start()
        self._updateButtons()

    def onPollProcess(self) -> None:
        if self._process is None:
            self._timer.stop()
            return
        ended = not self._process.running
        if ended:
            self._process.wait()  # its output read to the end: the last epoch's report is among the events
        for event in self._process.readEvents():
            self.ui.progressBar.value = int(100 * event["fraction"])
            if event["event"] == "progress":  # within an epoch
                continue
            metrics = "  ".join(f"{name} {value:.3f}" for name, value in event["metrics"].items())
            line = _("epoch {epoch}/{epochs}  loss {loss}  {metrics}").format(  # n/a, as spinelabel says, not nan
                epoch=event["epoch"], epochs=event["epochs"], metrics=metrics,
                loss="n/a" if math.isnan(event["loss"]) else f"{event['loss']:.4f}")
            self.ui.logTextEdit.appendPlainText(line)
            self.ui.statusLabel.text = line
        if not ended:
            return
        process, outCard = self._process, self._outCard
        self._timer.stop()
        self._process = self._outCard = None
        self._updateButtons()
        if process.wait() != 0:
            kept = self.logic.keptAfterFailure(outCard)
            self.ui.statusLabel.text = _("Training failed.")
            message = _("Training failed ({how}).").format(how=process.exitDescription())
            reasons = [line for line in process.outputTail().splitlines() if line.startswith(_CLI_ERROR)]
            if reasons:  # what spinelabel said was wrong, rather than only its exit code
                message += "\n" + reasons[-1][len(_CLI_ERROR):]
            if kept and not (reasons and "training diverged" in reasons[-1]):  # a run that failed late need not
                # start again, unless it diverged: resumed, it would end the same way (its reason says what to do)
                message += "\n" + self._resumeText(process, kept)
            slicer.util.errorDisplay(message, detailedText=process.outputTail())
            return
        try:
            registered = self.logic.finishTraining(outCard)
        except Exception as err:  # the trained model stays where it is, and the user is told where
            kept = _("Not registered: the trained model is kept in {folder}").format(folder=str(Path(outCard).parent))
            self.ui.statusLabel.text = kept
            slicer.util.errorDisplay(_("Failed to register the model: {error}").format(error=err) + "\n" + kept)
            return
        self.ui.progressBar.value = 100
        self.ui.statusLabel.text = _("Model registered: {path}").format(path=str(registered))
        self.updateModelList()

    @staticmethod
    def _resumeText(process, checkpoint) -> str:
        """Where the checkpoint of a run that ended early is, and the command that continues it."""
        from SpineLabelLogic.process import terminalCommand

        command = [*process.command, "--resume", "--register"]  # registered as a finished run would be
        terminal = _("a Command Prompt (cmd.exe)") if sys.platform == "win32" else _("a terminal")
        return _("The checkpoint of its last finished epoch is kept: {path}\nThis command, run in {terminal}, "
                 "continues it and registers the model: {command}").format(
            path=str(checkpoint), terminal=terminal,
            command=terminalCommand(command, (process.env or {}).get("PYTHONPATH")))

    def stopTraining(self) -> tuple:
        """End the run still going, if any (Stop, or the module closing); returns its process and model card path,
        or (None, None)."""
        process, outCard = self._process, self._outCard
        if process is not None:
            process.cancel()
            self._process = self._outCard = None
        if self._timer is not None:
            self._timer.stop()
            self._updateButtons()
        return process, outCard


#
# SpineLabelTrainingLogic
#


class SpineLabelTrainingLogic(ScriptedLoadableModuleLogic):
    """Fine-tuning in a background process and model registration; usable without the GUI."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SpineLabelTrainingParameterNode(super().getParameterNode())

    @staticmethod
    def missingPackages() -> list:
        """Python packages SpineLabel still needs (installed from the SpineLabel module)."""
        from SpineLabel import SpineLabelLogic

        return SpineLabelLogic.missingPackages()

    @classmethod
    def availableModels(cls) -> list:
        """Cards of the shipped model (first) and of every registered model; empty while dependencies are missing."""
        if cls.missingPackages():
            return []
        from SpineLabelLib.models import list_models

        return list_models()

    @classmethod
    def datasetSummary(cls, directory) -> str:
        """One line describing the dataset folder (the cases training will use, modality) or what is wrong with it.
        The cases are counted as training finds them (``evaluation.labelled_cases``), not by ``numTraining``, which
        a folder made by hand can get wrong."""
        missing = cls.missingPackages()
        if missing:
            return _("Install the dependencies in the SpineLabel module first ({packages}).").format(
                packages=", ".join(missing))
        from SpineLabelLib.evaluation import labelled_cases
        from SpineLabelLib.export import dataset_channel, read_dataset_json
        from SpineLabelLib.io import InputError

        if not directory or not Path(directory).is_dir():
            return _("Choose a dataset folder exported from SpineLabel.")
        try:
            dataset = read_dataset_json(directory)
        except ValueError as err:
            return _("dataset.json unreadable: {error}").format(error=str(err))
        if dataset is None:
            return _("No dataset.json in this folder.")
        try:
            count = len(labelled_cases(directory))
        except InputError:
            return _("No labelled case in this folder: label maps in labelsTr/, their images in imagesTr/.")
        return (_("{count} case, {modality}") if count == 1 else _("{count} cases, {modality}")).format(
            count=count, modality=dataset_channel(dataset) or "?")

    @staticmethod
    def _modulePaths() -> list:
        """Folders the training process imports from: SpineLabel's (SpineLabelLib) and this module's."""
        from SpineLabelLogic.process import moduleRoot

        return [moduleRoot(), Path(__file__).resolve().parent]

    def startTraining(self, datasetDirectory, baseModelPath=None, modelName="spinelabel-finetuned", epochs=10,
                      device="auto", extraArguments=()):
        """Start ``spinelabel train`` on a dataset folder.

        Returns:
            (process, outCard): a started ``SpineLabelLogic.process.BackgroundProcess`` whose events are epoch
            reports (``parseTrainingLine``), and the model card it will write.

        Raises:
            RuntimeError: Python packages are missing.
            ValueError: no dataset.json in the folder.
            SpineLabelLib.models.ModelError: the name is no plain file name, or a model of that name is registered.
        """
        missing = self.missingPackages()
        if missing:
            raise RuntimeError(_("Install the dependencies in the SpineLabel module first ({packages}).").format(
                packages=", ".join(missing)))
        from SpineLabelLib.export import read_dataset_json
        from SpineLabelLib.models import default_model_path, registration_path
        from SpineLabelLogic.process import (BackgroundProcess, parseTrainingLine, pythonExecutable,
                                             pythonPathEnvironment, trainCommand)

        if not Path(datasetDirectory).is_dir():
            raise ValueError(_("{folder} is no folder: choose a dataset folder exported from SpineLabel.").format(
                folder=str(datasetDirectory)))
        if read_dataset_json(datasetDirectory) is None:
            raise ValueError(_("{folder} holds no dataset.json: export cases with SpineLabel first.").format(
                folder=str(datasetDirectory)))
        registration_path(modelName)  # refused now rather than after the training
        outCard = Path(tempfile.mkdtemp(prefix="SpineLabelTraining-")) / f"{modelName}.json"
        try:
            command = trainCommand(pythonExecutable(), datasetDirectory, outCard,
                                   baseModelPath or default_model_path(), epochs, modelName, device, extraArguments)
            # in the run's own folder: "-m" puts the working folder first on the path, and modules there would
            # shadow SpineLabel's
            process = BackgroundProcess(command, parseTrainingLine, env=pythonPathEnvironment(self._modulePaths()),
                                        cwd=outCard.parent)
            process.start()
        except BaseException:
            self.discardTraining(outCard)
            raise
        return process, outCard

    def finishTraining(self, outCard):
        """Register a finished model under the name it was trained as (``startTraining``) and remove the training
        folder (kept when registering fails, so the model is not lost); returns the registered card path."""
        from SpineLabelLib.models import register_model

        registered = register_model(outCard, Path(outCard).stem)
        self.discardTraining(outCard)
        return registered

    @staticmethod
    def discardTraining(outCard) -> None:
        """Remove the temporary folder of a training run (checkpoint, card and weights)."""
        shutil.rmtree(Path(outCard).parent, ignore_errors=True)

    def keptAfterFailure(self, outCard):
        """After a run that failed or was stopped: its checkpoint, kept with its folder so that the run can be resumed
        (its command with ``--resume``), or None when it wrote none (the folder is then removed)."""
        from SpineLabelLib.models import checkpoint_path

        checkpoint = checkpoint_path(outCard)
        if checkpoint.is_file():
            return checkpoint
        self.discardTraining(outCard)
        return None


#
# SpineLabelTrainingTest
#


class SpineLabelTrainingTest(ScriptedLoadableModuleTest):
    """Exports a labelled phantom, fine-tunes the shipped model on it for one short epoch, registers it."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SpineLabelTraining_fineTune()

    def test_SpineLabelTraining_fineTune(self):
        missing = SpineLabelTrainingLogic.missingPackages()
        if missing:  # a Slicer build or test machine without them: Slicer ships neither torch nor nibabel
            self.skipTest(f"Python packages missing: {', '.join(missing)}")
        previous = os.environ.get("SPINELABEL_MODELS_DIR")
        with tempfile.TemporaryDirectory() as folder:
            os.environ["SPINELABEL_MODELS_DIR"] = os.path.join(folder, "models")  # leave the user's models alone
            try:
                self._fineTune(folder)
            finally:
                if previous is None:
                    del os.environ["SPINELABEL_MODELS_DIR"]
                else:
                    os.environ["SPINELABEL_MODELS_DIR"] = previous
        logging.info("SpineLabelTraining test passed")
        self.delayDisplay("Test passed")

    def _fineTune(self, folder):
        from SpineLabelLib.export import export_case
        from SpineLabelLib.phantom import make_phantom
        from SpineLabelLib.pipeline import label_spine

        phantom = make_phantom(modality="ct", fov="lumbar", seed=5)
        dataset = os.path.join(folder, "data")
        export_case(label_spine(phantom.image, device="cpu"), phantom.image, dataset)
        logic = SpineLabelTrainingLogic()
        self.assertEqual(logic.datasetSummary(dataset), "1 case, CT")
        # channel_names as a list: no modality, no exception; the cases counted as training finds them
        handMade = os.path.join(folder, "handmade")
        shutil.copytree(dataset, handMade)
        with open(os.path.join(handMade, "dataset.json"), "w") as f:
            json.dump({"channel_names": ["CT"], "numTraining": 2}, f)
        self.assertEqual(logic.datasetSummary(handMade), "1 case, ?")
        self.delayDisplay("Fine-tuning for one short epoch")
        process, outCard = logic.startTraining(dataset, None, "selftest", 1, "cpu",
                                               ["--iterations", "2", "--patch", "64", "64", "64"])
        self.assertEqual(process.wait(600), 0, process.outputTail())
        self.assertEqual([e["epoch"] for e in process.readEvents() if e["event"] == "epoch"], [1])
        registered = logic.finishTraining(outCard)
        self.assertTrue(registered.exists())
        self.assertIn(str(registered), [card["path"] for card in logic.availableModels()])
