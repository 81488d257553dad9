"""Model files: weights plus a JSON model card, loading with hash verification, and a registry of user models.

A model is two files side by side: ``NAME.pt`` (a torch ``state_dict``) and ``NAME.json``, its card::

    {"name": "spinelabel-default", "version": "1.0.0", "architecture": {"type": "SpineUNet", "channels": [8, 16, 32,
     64, 96]}, "spacing_mm": 2.0, "ct_window_hu": [-1000, 1200], "normalisation": "...", "tissue_classes": [...],
     "level_classes": [...], "training_data": {"sources": [...], ...}, "training": {...}, "weights":
     "spinelabel-default.pt", "sha256": "<hex>"}

``spinelabel train`` writes these; the default model's card adds ``evaluation`` (``benchmarks/real_data.py evaluate
--write-card``), ``selection`` and ``limitations``.

A card's ``"format"`` (``CARD_FORMAT``; a card without one is format 1) goes up when a key changes meaning or a new one
changes how the model is run, so that an older SpineLabel refuses such a card instead of misreading it.

The default model ships inside the package (``weights/``). Fine-tuned models are registered in the user model folder
(``$SPINELABEL_MODELS_DIR``, else ``~/.local/share/spinelabel/models``); registering never replaces a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from .io import atomic_paths, write_errors_named
from .vertebrae import LEVELS, TISSUE_NAMES

if TYPE_CHECKING:  # torch is imported only to load or save weights, so model lists work without it
    import torch

    from .network import SpineUNet

__all__ = [
    "ModelError",
    "LoadedModel",
    "default_model_path",
    "card_file",
    "model_card_path",
    "checkpoint_path",
    "user_models_dir",
    "list_models",
    "load_model",
    "save_model",
    "registration_path",
    "register_model",
    "sha256_of",
]

log = logging.getLogger(__name__)

_LEVEL_NAMES = [level.name for level in LEVELS]
DEFAULT_MODEL_NAME = "spinelabel-default"
CARD_FORMAT = 1  # the newest card format this SpineLabel reads and the one it writes (module docstring)


class ModelError(RuntimeError):
    """A model that cannot be used; the message names the file and the reason."""


@dataclass
class LoadedModel:
    """A network ready for inference, with its card."""

    network: "SpineUNet"
    card: dict
    path: Path

    @property
    def spacing_mm(self) -> float:
        return float(self.card["spacing_mm"])

    @property
    def ct_window_hu(self) -> tuple[float, float] | None:
        """Fixed CT intensity window (HU mapped to 0 and 1) of the model, or None: percentile mapping for CT too."""
        window = self.card.get("ct_window_hu")
        return None if window is None else (float(window[0]), float(window[1]))

    @property
    def info(self) -> dict:
        """What the report and an export's provenance record say of the model: name, version, the sha256 of its
        weights (two models of one name and version told apart), card, and the device it runs on."""
        return {"name": self.card["name"], "version": self.card["version"], "sha256": self.card["sha256"],
                "path": str(self.path), "device": str(next(self.network.parameters()).device)}


def default_model_path() -> Path:
    """Card of the model that ships with SpineLabel."""
    return Path(__file__).resolve().parent / "weights" / f"{DEFAULT_MODEL_NAME}.json"


def user_models_dir() -> Path | None:
    """Folder where fine-tuned models are registered: ``SPINELABEL_MODELS_DIR``, else
    ``~/.local/share/spinelabel/models``; None where the variable is not set and there is no home directory (no HOME,
    and a user id the system does not know, as a container may run under)."""
    env = os.environ.get("SPINELABEL_MODELS_DIR")
    if env:
        return Path(env)
    try:
        return Path.home() / ".local" / "share" / "spinelabel" / "models"
    except RuntimeError:  # "Could not determine home directory."
        return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card_path(out: str | os.PathLike) -> Path:
    """The model card ``spinelabel train --out OUT`` writes: OUT, with ``.json`` added unless it ends so ("model.v2"
    is model.v2.json, not model.json)."""
    out = Path(out)
    return out if out.suffix == ".json" else out.with_name(out.name + ".json")


def checkpoint_path(out: str | os.PathLike) -> Path:
    """The checkpoint of ``spinelabel train --out OUT``: its model card's path with ``.ckpt``."""
    return model_card_path(out).with_suffix(".ckpt")


def _is_file(path: Path) -> bool:
    """``path.is_file()``, with a folder that cannot be searched (``PermissionError``) a ``ModelError`` naming it."""
    try:
        return path.is_file()
    except OSError as err:
        raise ModelError(f"{path}: cannot be read ({err.strerror or err})") from None


def card_file(path: str | os.PathLike) -> Path:
    """The card of a model given by its card (``.json``), its weights (``.pt``), or, where no file of that name
    exists, the name of the shipped model or one it was registered under (``register_model``).

    Raises:
        ModelError: the card's folder, or that of the registered models, cannot be searched.
    """
    p = Path(path)
    if not _is_file(p) and p.name == str(path):
        if p.name == DEFAULT_MODEL_NAME:
            return default_model_path()
        if (registry := user_models_dir()) and _is_file(registered := registry / f"{p.name}.json"):
            return registered
    return p.with_suffix(".json") if p.suffix == ".pt" else p


MODEL_SPACING_MM = (0.25, 10.0)  # the model grid spacings a card may give: finer, a whole spine's grid would not fit


def read_card(path: str | os.PathLike) -> dict:
    """Read a model card (``.json``; a ``.pt`` path means the card beside it)."""
    card_path = card_file(path)
    if not _is_file(card_path):
        if Path(path).name == str(path) and card_path.suffix != ".json":  # a bare name: a model's, mistyped
            raise ModelError(f"{path}: no model card of that name here and no model registered under it "
                             "(spinelabel models lists them)")
        raise ModelError(f"{card_path}: model card not found")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise ModelError(f"{card_path}: unreadable model card ({err})") from None
    if not isinstance(card, dict):
        raise ModelError(f"{card_path}: a model card is a JSON object")
    missing = [k for k in ("name", "version", "spacing_mm", "weights", "sha256", "architecture") if k not in card]
    if missing:
        raise ModelError(f"{card_path}: model card lacks {', '.join(missing)}")
    channels = card["architecture"].get("channels") if isinstance(card["architecture"], dict) else None
    kind = card["architecture"].get("type", "SpineUNet") if isinstance(card["architecture"], dict) else None
    window = card.get("ct_window_hu")
    card_format = card.get("format", 1)
    whole = isinstance(card_format, int) and not isinstance(card_format, bool)
    problems = [
        what for what, bad in (
            (f"format {card_format!r} is not one this SpineLabel reads (1 to {CARD_FORMAT})"
             + (": a newer SpineLabel's card; update SpineLabel" if whole and card_format > CARD_FORMAT else ""),
             not (whole and 1 <= card_format <= CARD_FORMAT)),
            # another network (a later SpineLabel's) would be built as a SpineUNet, and run if its weights fitted
            (f"architecture.type {kind!r} is a network this SpineLabel does not know (it builds SpineUNet)",
             isinstance(card["architecture"], dict) and kind != "SpineUNet"),
            ("architecture.channels must be three or more positive integers",
             not (isinstance(channels, list) and len(channels) >= 3
                  and all(_is_number(c) and isinstance(c, int) and c > 0 for c in channels))),
            (f"spacing_mm must be a number from {MODEL_SPACING_MM[0]} to {MODEL_SPACING_MM[1]} (mm)",
             not (_is_number(card["spacing_mm"]) and MODEL_SPACING_MM[0] <= card["spacing_mm"] <= MODEL_SPACING_MM[1])),
            ("ct_window_hu must be null or two numbers, low then high",
             window is not None and not (isinstance(window, list) and len(window) == 2
                                         and all(map(_is_number, window)) and window[0] < window[1])),
            ("weights must be the name of a file beside the card",
             not (isinstance(card["weights"], str) and card["weights"] not in ("", ".", "..")
                  and Path(card["weights"]).name == card["weights"])),
            ("sha256 must be a string", not isinstance(card["sha256"], str)),
            # the pipeline reads the network's outputs in the order of these tables
            ("level_classes must be the levels of vertebrae.LEVELS, in order",
             card.get("level_classes", _LEVEL_NAMES) != _LEVEL_NAMES),
            ("tissue_classes must be vertebrae.TISSUE_NAMES, in order",
             card.get("tissue_classes", list(TISSUE_NAMES)) != list(TISSUE_NAMES)),
        ) if bad
    ]
    if problems:
        raise ModelError(f"{card_path}: {'; '.join(problems)}")
    return card


def _is_number(value) -> bool:
    """A finite int or float of JSON, not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def list_models() -> list[dict]:
    """Cards of the default model and of every registered model, each with its ``"path"``; a card that cannot be read
    or whose weights file is missing is left out with a warning, and so are all registered models when their folder
    cannot be read (its listing would come back empty without a word)."""
    registry = user_models_dir()
    if registry is None:
        log.warning("skipping the registered models: no home directory to find them in (set SPINELABEL_MODELS_DIR)")
    elif os.path.isdir(registry) and not os.access(registry, os.R_OK | os.X_OK):
        log.warning("skipping the registered models: %s cannot be read", registry)
    cards = []
    for card_path in [default_model_path(), *(sorted(registry.glob("*.json")) if registry else [])]:
        try:
            card = read_card(card_path)
            if not (card_path.parent / card["weights"]).is_file():
                raise ModelError(f"{card_path.parent / card['weights']}: model weights not found (card {card_path})")
            cards.append({**card, "path": str(card_path)})
        except ModelError as err:
            log.warning("skipping model: %s", err)
    return cards


def load_model(path: str | os.PathLike | None = None, device: "str | torch.device" = "cpu") -> LoadedModel:
    """Load a model, verifying its weights against the card's sha256.

    Args:
        path: the card (``.json``) or weights (``.pt``); None for the default model.
        device: torch device for the network (as ``inference.resolve_device`` takes it).

    Raises:
        ModelError: card or weights missing, hash mismatch (corrupt or altered file), weights that do not fit
            the architecture or are not finite.
        ValueError, RuntimeError: a device that is no device name, or a CUDA device there is no GPU for
            (``inference.resolve_device``).
    """
    import torch

    from .inference import resolve_device
    from .network import SpineUNet

    device = resolve_device(device)
    card_path = card_file(path) if path is not None else default_model_path()
    card = read_card(card_path)
    weights = card_path.parent / card["weights"]
    if not weights.is_file():
        raise ModelError(f"{weights}: model weights not found (card {card_path})")
    digest = sha256_of(weights)
    if digest != str(card["sha256"]).lower():
        raise ModelError(f"{weights}: weights are corrupt or altered (sha256 {digest[:12]}... does not match the "
                         "card); copy the weights again with the card written with them")
    try:
        # its random initial weights, replaced by the file's, are drawn without taking numbers from the caller's
        # (global) random generator: a script seeded for its own work drew other numbers after a first labelling
        with torch.random.fork_rng(devices=[]):
            network = SpineUNet(tuple(card["architecture"]["channels"]))
    except (RuntimeError, MemoryError) as err:  # channels too many for memory
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"{card_path}: architecture.channels {card['architecture']['channels']} cannot be built "
                         f"({reason})") from None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except Exception as err:  # torch raises several types for bad files
        # one line: load_state_dict's error has a line per parameter (59 lines, 9 kB, for channels twice the weights')
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        reason, hint = lines[0][:200], ""
        if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
            reason = lines[1].rstrip(".")[:200] + (f"; {len(lines) - 2} more such" if len(lines) > 2 else "")
            hint = ": the card's architecture is not that of the network these weights were saved from"
        raise ModelError(f"{weights}: weights do not load into the model ({reason}){hint}") from None
    if not all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point()):
        raise ModelError(f"{weights}: weights hold values that are not finite numbers (a diverged training run?)")
    network.to(device).eval()
    return LoadedModel(network, card, card_path)


def save_model(network: "SpineUNet", card: dict, card_path: str | os.PathLike) -> Path:
    """Write weights + card (hash filled in), both or neither (``io.atomic_paths``); returns the card path."""
    import torch

    card_path = card_file(card_path)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    weights = card_path.with_suffix(".pt")
    with atomic_paths([weights, card_path]) as (weights_tmp, card_tmp):
        # a full disk is named with the file (torch says only "unexpected pos"); a file, not a path, is saved to:
        # torch would name the archive's records after the random temporary
        with write_errors_named(weights), open(weights_tmp, "wb") as file:
            torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, file)
        full = {
            "tissue_classes": list(TISSUE_NAMES),
            "level_classes": list(_LEVEL_NAMES),
            **card,
            "format": CARD_FORMAT,
            "architecture": {"type": "SpineUNet", "channels": list(network.channels)},
            "weights": weights.name,
            "sha256": sha256_of(weights_tmp),
        }
        with write_errors_named(card_path):
            card_tmp.write_text(json.dumps(full, indent=2, allow_nan=False) + "\n")
    return card_path


# names Windows gives to devices, in any case and with any extension (learn.microsoft.com: Naming Files, Paths, and
# Namespaces; the ports' digits include the superscripts 1 to 3)
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL",
                    *(f"{port}{n}" for port in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3")}


def registration_path(name: str) -> Path:
    """The card path a model registered as ``name`` would take (``register_model``), checked before any training.

    Raises:
        ModelError: ``name`` is not a plain file name, is the shipped model's (which its name always loads), or a
            registered model of that name exists already.
    """
    if (not isinstance(name, str) or not name.strip() or name.startswith(".")
            or any(c in name for c in '<>:"/\\|?*') or name.rstrip(" .") != name):  # / and \: no folder
        raise ModelError(f"{name!r}: a model name is a file name (no folder, not hidden, none of <>:\"/\\|?*, not "
                         "ending in a space or dot, which Windows does not allow)")
    if name.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:  # NUL.json is the device NUL there
        raise ModelError(f"{name!r}: a model name is a file name, and Windows keeps {name.split('.')[0]!r} for a "
                         "device")
    if name.lower() == DEFAULT_MODEL_NAME:  # any case: a file system may not tell the two apart
        raise ModelError(f"{name!r} is the name of the model shipped with SpineLabel")
    if (registry := user_models_dir()) is None:
        raise ModelError("no folder for registered models: there is no home directory; set SPINELABEL_MODELS_DIR")
    target = registry / f"{name}.json"
    if target.exists() or target.with_suffix(".pt").exists():
        raise ModelError(f"{target}: a model named {name!r} is registered already")
    return target


def register_model(card_path: str | os.PathLike, name: str | None = None) -> Path:
    """Copy a model (card + weights) into the user model folder under a new name; returns the new card path.

    Raises:
        ModelError: invalid model, or a registered model of that name exists already.
    """
    loaded = load_model(card_path)  # verifies the files
    name = name or loaded.card["name"]
    target = registration_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    weights = target.with_suffix(".pt")
    card = {**loaded.card, "name": name, "weights": weights.name}
    try:  # the name claimed, not only checked: of two registering it at once both passed the check, and the later
        # rename replaced the model the earlier had registered
        os.close(os.open(weights, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        raise ModelError(f"{weights} exists: a model named {name!r} is registered already, or being registered (a "
                         f"run killed while registering leaves that file without {target.name}: delete it then)"
                         ) from None
    try:
        with atomic_paths([weights, target]) as (weights_tmp, card_tmp):
            with write_errors_named(weights):
                shutil.copyfile(loaded.path.parent / loaded.card["weights"], weights_tmp)
            with write_errors_named(target):
                card_tmp.write_text(json.dumps(card, indent=2) + "\n")
    except BaseException:
        weights.unlink(missing_ok=True)  # the claim (or these weights, without their card)
        raise
    log.info("registered model %s at %s", name, target)
    return target
