"""Long work in a background process: labelling (``python -m SpineLabelLogic.worker``) and fine-tuning
(``python -m SpineLabelLib.cli train``), with progress read from the process's output and a Cancel that ends the
whole process tree.

:class:`BackgroundProcess` starts the command in its own process group (a new session on POSIX), reads stdout and
stderr on two threads into a queue, and turns each line into an event with a parser; the Slicer widget polls
:meth:`BackgroundProcess.readEvents` from a timer, so the user interface never blocks. Nothing here imports
``slicer`` or Qt.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

__all__ = [
    "BackgroundProcess",
    "parseWorkerLine",
    "parseTrainingLine",
    "pythonPathEnvironment",
    "labelCommand",
    "trainCommand",
    "moduleRoot",
    "pythonExecutable",
    "terminalCommand",
]

log = logging.getLogger(__name__)

_TAIL_LINES = 200
_TAIL_LINE_CHARS = 2000
_READ_TIMEOUT_S = 5.0  # for the output readers once the process and its group are gone
_NUMBER = r"[-+]?(?:nan|inf|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_EPOCH_LINE = re.compile(rf"^epoch\s+(\d+)\s*/\s*(\d+)\s+loss\s+({_NUMBER}|n/a)(.*)$")
_METRIC = re.compile(rf"([A-Za-z_][A-Za-z0-9_]*)\s+({_NUMBER})")
_EPOCH_BAR = re.compile(r"^epoch\s+(\d+)\s*/\s*(\d+):\s*(\d+)%")  # a refresh of the progress bar within an epoch


def parseWorkerLine(line: str) -> dict | None:
    """Event of one stdout line of ``SpineLabelLogic.worker`` (a JSON object with an ``"event"`` key), else None.

    The object may follow other text on the line (a library's output without a newline of its own)."""
    start = line.find('{"event"')
    if start < 0:
        return None
    try:
        event = json.loads(line[start:])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def parseTrainingLine(line: str) -> dict | None:
    """Event of one line of ``spinelabel train`` output.

    ``epoch 3/10 loss 0.4120 body_dice 0.812 level_accuracy 0.640`` gives ``{"event": "epoch", "epoch": 3,
    "epochs": 10, "fraction": 0.3, "loss": 0.412, "metrics": {"body_dice": 0.812, "level_accuracy": 0.64}}``; a
    loss or metric written ``n/a`` (no finite value) gives a loss of NaN and no entry in ``metrics``. A refresh of the
    progress bar of an epoch, ``epoch 3/10:  40%|...``, gives ``{"event": "progress", "fraction": 0.24}``. Other
    lines give None.
    """
    bar = _EPOCH_BAR.match(line.strip())
    if bar:
        epoch, epochs, percent = (int(g) for g in bar.groups())
        return {"event": "progress", "fraction": (epoch - 1 + percent / 100) / epochs if epochs else 0.0}
    match = _EPOCH_LINE.match(line.strip())
    if not match:
        return None
    epoch, epochs = int(match.group(1)), int(match.group(2))
    metrics = {name: float(value) for name, value in _METRIC.findall(match.group(4))}
    return {"event": "epoch", "epoch": epoch, "epochs": epochs, "fraction": epoch / epochs if epochs else 0.0,
            "loss": float("nan") if match.group(3) == "n/a" else float(match.group(3)), "metrics": metrics}


def pythonPathEnvironment(paths: Sequence[str | os.PathLike], base: dict | None = None) -> dict:
    """A copy of the environment with ``paths`` put in front of ``PYTHONPATH`` (so the child imports the same
    SpineLabelLib as the caller), unbuffered Python output (so progress arrives as it happens) and UTF-8 output (the
    reader decodes UTF-8; a Windows pipe would otherwise take the code page, and printing a model name it cannot
    encode would fail the run)."""
    env = dict(os.environ if base is None else base)
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    # absolute: the child runs in another folder (its run's own)
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in [*paths, *existing])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _model(path: str | os.PathLike) -> str:
    """A model's card made absolute where it names a file (a model may be named by its name instead)."""
    return os.path.abspath(path) if os.path.exists(path) else str(path)


def labelCommand(python: str, inputPath: str | os.PathLike, outputDir: str | os.PathLike,
                 model: str | os.PathLike | None = None, device: str = "auto",
                 checkOrientation: bool = False, spineGate: bool = True, modality: str = "auto") -> list[str]:
    """Command line of the labelling worker, its paths absolute (it runs in its run's folder)."""
    command = [python, "-m", "SpineLabelLogic.worker", os.path.abspath(inputPath), os.path.abspath(outputDir),
               "--device", device]
    if model:
        command += ["--model", _model(model)]
    if checkOrientation:
        command.append("--check-orientation")
    if not spineGate:
        command.append("--no-spine-gate")
    if modality != "auto":
        command += ["--modality", modality.lower()]
    return command


# The share of the training crops the exported dataset gets in a training started here, and the sources of the rest
# (``spinelabel train --data SOURCE:WEIGHT``): procedural phantoms (CT and MR, every field of view) and images without
# a spine, which need no data beyond SpineLabel, so that the model keeps what it knew of the spines the export does
# not show. Measured in benchmarks/RESULTS.md (fine-tuning): fine-tuned on two exported CT or three exported MRI
# alone, model 1.7.0 lost a third of the vertebrae of ``benchmarks/selection.py`` and up to 8 of 55 held-out MRI
# vertebrae; with this mix about none, at the price of learning corrections more slowly. ``spinelabel train`` names
# this mix when it warns.
EXPORT_SHARE = 0.6
REPLAY = (("phantom", 0.3), ("negative", 0.1))


def trainCommand(python: str, data: str | os.PathLike, outCard: str | os.PathLike,
                 baseModel: str | os.PathLike | None = None, epochs: int = 10, name: str | None = None,
                 device: str = "auto", extra: Sequence[str] = ()) -> list[str]:
    """Command line of ``spinelabel train``: fine-tune ``baseModel`` (or train a new model) on ``data`` (an
    exported dataset folder) mixed with ``REPLAY``, and write the model card ``outCard``; ``extra`` arguments are
    passed on. Its paths are absolute (it runs in its run's folder)."""
    sources = [f"{os.path.abspath(data)}:{EXPORT_SHARE}", *(f"{source}:{weight}" for source, weight in REPLAY)]
    command = [python, "-m", "SpineLabelLib.cli", "train", *(a for s in sources for a in ("--data", s)),
               "--out", os.path.abspath(outCard), "--epochs", str(int(epochs)), "--device", device,
               "--progress-bars"]  # a pipe is no terminal: without it no bar within an epoch would be drawn
    if baseModel:
        command += ["--base-model", _model(baseModel)]
    if name:
        command += ["--name", name]
    return command + [str(a) for a in extra]


class BackgroundProcess:
    """A command running in its own process group, its output turned into events.

    Args:
        command: program and arguments.
        parseLine: turns one output line (stdout or stderr, without the newline) into an event, or None for
            lines that are not events (those are kept in :meth:`outputTail` and logged).
        env: environment of the process (default: this one).
        cwd: working folder.
    """

    def __init__(self, command: Sequence[str], parseLine: Callable[[str], dict | None],
                 env: dict | None = None, cwd: str | os.PathLike | None = None):
        self.command = [str(c) for c in command]
        self.parseLine = parseLine
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.cancelled = False
        self._events: queue.Queue = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._readers: list[threading.Thread] = []

    def start(self) -> None:
        """Start the process and its two reader threads."""
        if self.process is not None:
            raise RuntimeError("process already started")
        options: dict = {}
        if sys.platform == "win32":  # no console window of its own (closing it would end the run)
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True
        log.info("starting: %s", " ".join(self.command))
        # bytes, split by _read (a progress bar ends its refreshes with a carriage return, not a newline)
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                                        cwd=self.cwd, **options)
        for stream in (self.process.stdout, self.process.stderr):
            reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, stream) -> None:
        """Parse each part of the output ended by a newline or a carriage return as it arrives (a progress bar's
        refreshes end with a carriage return); of the parts of a line that are neither events nor blank, only the
        last goes into the tail (of a progress bar's refreshes, its final state)."""
        pending, kept = [], None  # the unfinished part, in pieces: joined once it ends, not at every chunk
        for chunk in iter(lambda: stream.read1(1 << 16), b""):
            *parts, unfinished = re.split(rb"([\r\n])", chunk)  # part, separator, part, ..., unfinished part
            if parts:
                parts[0] = b"".join(pending) + parts[0]
                pending = []
            pending.append(unfinished)
            for part, separator in zip(parts[::2], parts[1::2]):
                kept = self._take(part, kept)
                if separator == b"\n" and kept is not None:
                    self._keep(kept)
                    kept = None
        kept = self._take(b"".join(pending), kept)
        if kept is not None:
            self._keep(kept)
        stream.close()

    def _keep(self, line: str) -> None:
        """A line that is no event: into the tail, and into this process's log (Slicer's, for the module), where a
        run that succeeds leaves what it logged too."""
        self._tail.append(line)
        log.info("process %d: %s", self.process.pid, line)

    def _take(self, part: bytes, kept: str | None) -> str | None:
        """Queue the event of one output part; returns the part to keep for the tail (this one, unless it is an
        event or blank, else ``kept``)."""
        text = part.decode("utf-8", errors="replace")  # whole: the separators are never inside a UTF-8 character
        event = self.parseLine(text)
        if event is not None:
            self._events.put(event)
            return kept
        if len(text) > _TAIL_LINE_CHARS:  # what an error dialog can show
            text = text[:_TAIL_LINE_CHARS] + f"... ({len(text) - _TAIL_LINE_CHARS} more characters)"
        return text if text.strip() else kept

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def readEvents(self) -> list[dict]:
        """Events parsed since the last call, oldest first (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def outputTail(self, lines: int = 20) -> str:
        """The last output lines that were not events (errors, log messages)."""
        return "\n".join(list(self._tail)[-lines:])

    def exitDescription(self) -> str:
        """How the process ended, for a message: ``exit code 1``, ``exit code 143: stopped by SIGTERM`` (how
        ``spinelabel`` says a signal ended it), ``killed by SIGKILL (...)``."""
        code = self.returncode
        if code is None:
            return "still running"
        if code >= 0:
            try:
                return f"exit code {code}: stopped by {signal.Signals(code - 128).name}" if code > 128 else \
                    f"exit code {code}"
            except ValueError:
                return f"exit code {code}"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        oom = " (often the system ending a process that ran out of memory)" if name == "SIGKILL" else ""
        return f"killed by {name}{oom}"

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end and its output to be read; returns its exit code. On POSIX, processes it
        started and left running are ended (they would hold its output open).

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout`` seconds.
        """
        if self.process is None:
            raise RuntimeError("process not started")
        code = self.process.wait(timeout)
        if sys.platform != "win32":
            # at once after the exit: a group that still has members keeps its id, so only they are signalled
            self._signalGroup(signal.SIGKILL)
        for reader in self._readers:
            reader.join(_READ_TIMEOUT_S)
        return code

    def finish(self, timeout: float = 10.0) -> int:
        """Wait for a process that has delivered its result to exit, ending it after ``timeout`` seconds (a hang
        on its way out must not block the caller); returns its exit code."""
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("process %d still running %g s after its result; ending it", self.process.pid, timeout)
            self.cancel()
            return self.wait()

    def cancel(self, timeout: float = 5.0) -> None:
        """End the process and every process it started: terminate, then kill after ``timeout`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return  # an ended process's leftover children are ended by wait()
        self.cancelled = True
        log.info("cancelling process %d and its children", self.process.pid)
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True, check=False,
                           creationflags=subprocess.CREATE_NO_WINDOW)
        else:
            self._signalGroup(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            self._signalGroup(signal.SIGKILL)  # whatever is left of the group, children that ignored SIGTERM too
        self.process.wait()

    def _signalGroup(self, sig: int) -> None:
        """Signal every process of the group (POSIX only; on Windows ``cancel``'s ``taskkill`` ends the tree)."""
        try:
            os.killpg(self.process.pid, sig)  # the group id is the pid: the process leads its own session
        except ProcessLookupError:
            pass
        except PermissionError:  # macOS: a group whose leader has exited, reaped or not, and holds no live process
            if self.process.poll() is None:
                raise


def _windowsArgument(argument: str) -> str:
    """``argument`` quoted for the Command Prompt (cmd.exe) and a program's C runtime: in double quotes when it holds
    a space or a character cmd.exe would read (``&``, ``|``, ``(`` ...), backslashes before a quote or the end
    doubled."""
    if argument and not any(c in argument for c in ' \t"&|<>^(),;=%!'):
        return argument
    quoted = re.sub(r'(\\*)"', r'\1\1\\"', argument)
    return '"' + re.sub(r"(\\+)$", r"\1\1", quoted) + '"'


def terminalCommand(command: Sequence[str], pythonPath: str | None = None, windows: bool | None = None) -> str:
    """``command`` as a line to paste into a terminal, run with ``pythonPath`` as its ``PYTHONPATH`` (SpineLabelLib
    lies in the module's folder, not in site-packages): ``env PYTHONPATH=... program ...`` quoted for a POSIX shell,
    or on Windows (``windows``; default: this machine) ``set "PYTHONPATH=..." && program ...`` quoted for the
    Command Prompt, where neither ``env`` nor a POSIX shell's single quotes work."""
    windows = sys.platform == "win32" if windows is None else windows
    if not windows:
        return shlex.join(["env", f"PYTHONPATH={pythonPath}", *command] if pythonPath else list(command))
    line = " ".join(_windowsArgument(str(a)) for a in command)
    return f'set "PYTHONPATH={pythonPath}" && {line}' if pythonPath else line


def moduleRoot() -> Path:
    """The SpineLabel module folder, which holds SpineLabelLib and SpineLabelLogic (for a child's PYTHONPATH)."""
    return Path(__file__).resolve().parents[1]


def pythonExecutable() -> str:
    """Python that runs the background processes: Slicer's ``PythonSlicer`` when available."""
    return shutil.which("PythonSlicer") or sys.executable
