"""Corrected labellings as training data: an nnU-Net v2 raw dataset, one case appended per export.

Layout of ``dataset_dir`` (nnU-Net v2 "raw" format, directly usable by ``nnUNetv2_plan_and_preprocess`` and by
``spinelabel train``)::

    dataset.json                      channel_names, labels, numTraining, file_ending, bodies_only (rewritten on
                                      each append)
    imagesTr/{CASE}_0000.nii.gz       the image, untouched (its own grid and pixel type)
    labelsTr/{CASE}.nii.gz            uint8 VerSe label map on the image grid
    centroids/{CASE}_ctd.json         VerSe centroid list (see :func:`SpineLabelLib.writers.write_centroids`)
    provenance/{CASE}.json            model (name, version, weights' sha256, device), corrections, fixed levels,
                                      image hash, timestamp, SpineLabel version

The dataset is meant to be shared: nothing in it names the patient, the user or the machine. The image is written
without its file's metadata (DICOM tags, a NIfTI description, NRRD fields); the provenance record names neither the
image's file nor the model card's path (they hold the user's folders, often the patient's name) and knows the image by
its ``image_sha256``.

``bodies_only`` (false: the label maps hold whole vertebrae) tells readers that the labels are not vertebral bodies
only, whatever the folder is called (``evaluation``, ``spinelabel train``); another nnU-Net dataset of bodies only
says ``"bodies_only": true``.

Label values are the VerSe values of :mod:`SpineLabelLib.vertebrae`. nnU-Net v2 requires the label values in
``dataset.json`` to be consecutive; VerSe reserves 27 for the coccyx, which SpineLabel never labels, so
``dataset.json`` lists it too (no voxel ever carries it).

A case is never overwritten: an existing ``case_id`` raises, and automatic ids continue the numbering. Exporting an
image the dataset holds already (the same voxels on the same grid, by the ``image_sha256`` of its provenance record)
replaces that case: the new case is written in full under its new id first, then the earlier one is removed, so a
scan corrected and exported twice trains once, with its latest labels.
Every file is written under a temporary name; a case's four files are renamed together once all are complete
(:func:`SpineLabelLib.io.atomic_paths`), ``dataset.json`` is written after them, and an earlier case of the same image
is removed only after that. An export that fails removes the files of its case it had put in place, so only a process
killed between those renames can leave some files of a case (never an image without its label map: the image is
renamed last; ``numTraining`` counts the cases with both, as nnU-Net does), or a case that ``dataset.json`` does not
count, or the earlier case of a replaced image.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__, writers
from .edits import check_image_grid
from .io import (CASE_SUFFIXES, InputError, atomic_path, atomic_paths, case_key, folder_lock, make_writable_folder,
                 no_empty_new_folders, write_errors_named, write_image)
from .result import Geometry, SpineLabeling
from .vertebrae import COCCYX_LABEL, LEVELS, Level, level_index

__all__ = ["CASE_PREFIX", "MIN_VERTEBRAE", "dataset_labels", "dataset_ignore_value", "dataset_label_values",
           "dataset_channel", "recorded_modality", "provenance_of", "next_case_id", "export_case", "read_dataset_json"]

log = logging.getLogger(__name__)

CASE_PREFIX = "spine"
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_FILE_ENDING = ".nii.gz"
_IMAGE_ENDING = "_0000" + _FILE_ENDING  # channel 0 of a case
# fewer, and training would take the rest of the spine for background (training.unknown_beyond_labelled_ends)
MIN_VERTEBRAE = 2


def dataset_labels() -> dict[str, int]:
    """``dataset.json`` labels: background 0, every level of ``LEVELS`` with its VerSe value, and the unused
    VerSe coccyx value so that the values are consecutive; ordered by value."""
    labels = {"background": 0, "coccyx": COCCYX_LABEL}
    labels.update({level.name: level.label for level in LEVELS})
    return dict(sorted(labels.items(), key=lambda item: item[1]))


def _paths(dataset_dir: Path, case_id: str) -> dict[str, Path]:
    return {
        "image": dataset_dir / "imagesTr" / f"{case_id}{_IMAGE_ENDING}",
        "label": dataset_dir / "labelsTr" / f"{case_id}{_FILE_ENDING}",
        "centroids": dataset_dir / "centroids" / f"{case_id}_ctd.json",
        "provenance": dataset_dir / "provenance" / f"{case_id}.json",
    }


def _files(folder: Path, pattern: str) -> list[Path]:
    """The files of ``folder`` matching ``pattern``, without hidden ones (the temporaries of an interrupted write,
    which readers of the dataset skip too)."""
    return [p for p in folder.glob(pattern) if not p.name.startswith(".")]


def _cases_in(folder: Path, ending: str) -> set[str]:
    """The case ids of the files of ``folder`` (``_files``) named ``{case_id}{ending}``."""
    return {p.name[: -len(ending)] for p in _files(folder, f"*{ending}")}


def _existing_cases(dataset_dir: Path) -> set[str]:
    return (_cases_in(dataset_dir / "labelsTr", _FILE_ENDING) | _cases_in(dataset_dir / "imagesTr", _IMAGE_ENDING)
            | _cases_in(dataset_dir / "provenance", ".json"))


def _complete_cases(dataset_dir: Path) -> set[str]:
    """Ids of the cases with both a label map and an image: the cases nnU-Net finds (it lists ``imagesTr/`` and
    asserts that ``numTraining`` counts them) and can train on. A process killed between the renames of ``_write_case``
    (the image's comes last) leaves a label map without its image, which nnU-Net does not count."""
    return _cases_in(dataset_dir / "labelsTr", _FILE_ENDING) & _cases_in(dataset_dir / "imagesTr", _IMAGE_ENDING)


def next_case_id(dataset_dir: str | os.PathLike, prefix: str = CASE_PREFIX) -> str:
    """First free ``{prefix}_{NNNN}`` id after the highest one the dataset holds or held (a case replaced by a later
    export of its image keeps its number: model cards name the cases they were trained on; ``spine_0001`` first)."""
    dataset_dir = Path(dataset_dir)
    replaced = {old for _, record in _provenance_records(dataset_dir) if isinstance(record.get("replaces"), list)
                for old in record["replaces"] if isinstance(old, str)}  # a hand-edited record may hold anything
    numbers = [int(m.group(1)) for c in _existing_cases(dataset_dir) | replaced
               if (m := re.fullmatch(rf"{re.escape(prefix)}_(\d+)", c))]
    return f"{prefix}_{max(numbers, default=0) + 1:04d}"


def _read_object(path: Path, what: str) -> dict | None:
    """The JSON object in file ``path`` (a ``what``), or None when there is no such file.

    Raises:
        InputError: a file that is not a readable JSON object.
    """
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable {what} ({err})") from None
    if not isinstance(document, dict):
        raise InputError(f"{path}: {what} holds no JSON object")
    return document


def read_dataset_json(dataset_dir: str | os.PathLike) -> dict | None:
    """The dataset's ``dataset.json`` as a dict, or None when there is none yet.

    Raises:
        InputError: a ``dataset.json`` that is not a readable JSON object, or whose ``bodies_only`` is not true or
            false (a string "yes" was read as false, and the bodies scored as whole vertebrae).
    """
    path = Path(dataset_dir) / "dataset.json"
    document = _read_object(path, "dataset.json")
    if document is not None and not isinstance(document.get("bodies_only", False), bool):
        raise InputError(f"{path}: bodies_only must be true or false, not {document['bodies_only']!r}")
    return document


def _dataset_of(label_path: str | os.PathLike) -> dict | None:
    """The ``dataset.json`` (``read_dataset_json``) of the nnU-Net dataset whose ``labelsTr/`` holds the label map
    ``label_path``; None for any other label map, or a dataset without one."""
    label_path = Path(label_path)
    return read_dataset_json(label_path.parent.parent) if label_path.parent.name == "labelsTr" else None


def dataset_channel(document: dict) -> str | None:
    """What a ``dataset.json`` calls its images: channel ``"0"`` of its ``channel_names`` (``"CT"`` or ``"MR"`` as
    ``export_case`` writes it, or any other name of nnU-Net's), None when it names no channel 0."""
    channels = document.get("channel_names")
    return channels.get("0") if isinstance(channels, dict) else None


def _channel_modality(channel) -> str | None:
    """``"CT"`` or ``"MR"`` for a channel name that says it in any case (nnU-Net reads channel names case-insensitively:
    ``ct`` is its CT normalisation as ``CT`` is), else None."""
    name = channel.upper() if isinstance(channel, str) else None
    return name if name in ("CT", "MR") else None


def recorded_modality(label_path: str | os.PathLike) -> str | None:
    """``"CT"`` or ``"MR"``: the modality that the nnU-Net dataset of label map ``label_path`` records for its images
    (``export_case`` records the one the labelling took the image for, which may be the user's choice, not what
    ``inference.modality_of`` detects; ``ct`` or ``mr`` in another case count too); None when its ``dataset.json``
    records neither, or for another label map.

    Raises:
        InputError: an unreadable ``dataset.json``.
    """
    document = _dataset_of(label_path)
    return _channel_modality(dataset_channel(document)) if document is not None else None


def provenance_of(label_path: str | os.PathLike) -> dict | None:
    """The provenance record ``export_case`` wrote for the case of label map ``labelsTr/{CASE}.nii.gz``; None for a
    label map without one (a case SpineLabel did not export, or any other label map).

    Raises:
        InputError: a record that is not a readable JSON object.
    """
    label_path = Path(label_path)
    if label_path.parent.name != "labelsTr" or not label_path.name.endswith(_FILE_ENDING):
        return None
    case_id = label_path.name[: -len(_FILE_ENDING)]
    return _read_object(_paths(label_path.parent.parent, case_id)["provenance"], "provenance record")


def dataset_ignore_value(label_path: str | os.PathLike) -> int | None:
    """The value of nnU-Net's ignore label (named ``ignore`` in ``dataset.json``'s ``labels``: voxels nobody
    annotated) in the dataset whose ``labelsTr/`` holds the label map ``label_path``; None when there is none."""
    document = _dataset_of(label_path)
    names = document.get("labels") if document is not None else None
    value = names.get("ignore") if isinstance(names, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def dataset_label_values(label_path: str | os.PathLike, labels: np.ndarray) -> np.ndarray | None:
    """For a label map of an nnU-Net dataset (in ``labelsTr/`` beside ``dataset.json``): the lookup table, uint8
    indexed by the map's values, to VerSe labels, by the names in ``dataset.json``'s ``labels`` (``_level_named``:
    ``C1`` ... ``S1`` in any case, ``sacrum``, TotalSegmentator's ``vertebrae_L5``; other names map to 0, with a
    logged warning for those in the map that hold a level, such as ``vertebra_L5``). None for any other label map: its
    values are VerSe labels.

    Args:
        label_path: the label map's file.
        labels: its voxels, integers of 0 or more, any shape.

    Raises:
        ValueError: a ``dataset.json`` that names no level, gives a level a value that is no whole number of 0 or
            more, gives one value to names of different levels (or of a level and of something else), or a value it
            does not name.
    """
    document = _dataset_of(label_path)
    if document is None:
        return None
    dataset = Path(label_path).parent.parent / "dataset.json"
    values = np.asarray(labels).ravel()
    names = document.get("labels", {})
    if not isinstance(names, dict):
        raise ValueError(f"{dataset}: 'labels' must map each name to its label value")
    # a negative value would index the lookup table from its end: another value's voxels read as this level
    whole = {name: isinstance(value, int) and not isinstance(value, bool) and value >= 0
             for name, value in names.items()}
    unread = [f"{name!r}: {names[name]!r}" for name, ok in whole.items() if not ok and _level_named(name)]
    if unread:  # "20" rather than 20, -1, or an nnU-Net region's list of values
        raise ValueError(f"{dataset}: label values must be whole numbers, 0 or more, not {', '.join(unread)}")
    meanings: dict[int, set] = {}  # value -> the levels (None: no level) its names stand for
    for name, value in names.items():
        if whole[name]:
            meanings.setdefault(value, set()).add(_level_named(name))
    twice = sorted(value for value, levels in meanings.items() if len(levels) > 1)
    if twice:  # one value, two meanings: which one its voxels are would be the last name written
        raise ValueError(f"{dataset}: label values {twice[:5]} are given to names of different levels")
    value_names = {value: name for name, value in names.items() if whole[name]}
    named = {value: _level_named(name) for value, name in value_names.items()}
    if not any(named.values()):
        raise ValueError(f"{dataset}: no label is named after a vertebral level ({LEVELS[0].name} ... "
                         f"{LEVELS[-1].name})")
    top = int(values.max()) if values.size else 0
    if top > max(named):  # found before counting the values up to it
        raise ValueError(f"{label_path}: label values [{top}] are not in {dataset}")
    present = np.flatnonzero(np.bincount(values))
    unnamed = [int(v) for v in present if int(v) not in named]
    if unnamed:
        raise ValueError(f"{label_path}: label values {unnamed[:5]} are not in {dataset}")
    unread = sorted(value_names[int(v)] for v in present
                    if named[int(v)] is None and _LEVEL_TOKEN.search(value_names[int(v)]))
    if unread:
        log.warning("%s: label names %s look like vertebral levels but name none SpineLabel reads (such as L5, "
                    "vertebrae_L5 or sacrum): the voxels of %s are taken as background", dataset, unread[:5],
                    label_path)
    lut = np.zeros(int(present[-1]) + 1, dtype=np.uint8)
    for value, level in named.items():
        if level is not None and value < lut.size:
            lut[value] = level.label
    return lut


# a level written inside a longer label name ("vertebra_L5", "L5 body"), which ``_level_named`` does not read
_LEVEL_TOKEN = re.compile(r"(?<![a-z0-9])(%s|sacrum)(?![a-z0-9])" % "|".join(level.name for level in LEVELS),
                          re.IGNORECASE)


def _level_named(name: str) -> Level | None:
    """The level a ``dataset.json`` label name stands for (``vertebrae.level_index``: any case, ``sacrum`` for S1;
    TotalSegmentator's prefix ``vertebrae_`` dropped), or None."""
    text = name.strip()
    if text.lower().startswith("vertebrae_"):
        text = text[len("vertebrae_"):]
    try:
        return LEVELS[level_index(text)]
    except KeyError:
        return None


def _modality(result: SpineLabeling) -> str:
    modality = result.modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality {result.modality!r}: expected CT or MR (set SpineLabeling.modality)")
    return modality


def _image_digest(image: sitk.Image) -> str:
    """sha256 of an image's grid (size, spacing, origin, direction), pixel type and voxels: the same scan."""
    digest = hashlib.sha256(repr((image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                                  image.GetPixelIDTypeAsString())).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).data)
    return digest.hexdigest()


def _provenance_records(dataset_dir: Path) -> list[tuple[str, dict]]:
    """(case id, record) of every readable provenance record of the dataset, by case id."""
    records = []
    for path in sorted(_files(dataset_dir / "provenance", "*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict):
            records.append((path.stem, record))
        else:
            log.warning("%s: unreadable provenance record; not checked for the same image or replaced cases", path)
    return records


def _cases_of_image(dataset_dir: Path, digest: str) -> list[str]:
    """Ids of the cases whose provenance records the image ``digest``."""
    return [case for case, record in _provenance_records(dataset_dir) if record.get("image_sha256") == digest]


def _write_case(result: SpineLabeling, image: sitk.Image, paths: dict[str, Path], case_id: str, modality: str,
                corrections: list[dict] | None, model: dict | None, digest: str, replaces: list[str]) -> None:
    """The four files of one exported case (``_paths``): image, label map, centroids, provenance, all or nothing
    (``atomic_paths``, which renames them in reverse order: a process killed while writing them leaves none in the
    dataset's folders, and one killed between the renames no image without its label map, which nnU-Net would count
    as a case). The label map and the centroids take the image's grid exactly (the labelling's may differ within
    ``check_image_grid``'s tolerance)."""
    result = result.copy(geometry=Geometry.of(image))
    with atomic_paths([paths[k] for k in ("image", "label", "centroids", "provenance")]) as tmps:
        image_tmp, label_tmp, centroids_tmp, provenance_tmp = tmps
        write_image(image, image_tmp, paths["image"])
        with write_errors_named(paths["label"]):
            writers.write_label_map(result, label_tmp)
        with write_errors_named(paths["centroids"]):
            writers.write_centroids(result, centroids_tmp)
        with write_errors_named(paths["provenance"]):
            writers.write_json({
                "case_id": case_id,
                "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "spinelabel_version": __version__,
                # no paths (the model card's, the image's file): they name the user's folders and often the patient
                "model": {k: v for k, v in (model if model is not None else result.model).items() if k != "path"},
                "image_sha256": digest,
                "replaces": replaces,
                "modality": modality,
                "vertebrae": [{"id": v.id, "name": v.name, "label": v.label, "fixed": v.fixed,
                               "confidence": round(float(v.confidence), 4)} for v in result.vertebrae],
                "corrected": sorted(v.name for v in result.vertebrae if v.fixed),
                "corrections": list(corrections or []),
                "warnings": list(result.warnings),
            }, provenance_tmp)


def export_case(
    result: SpineLabeling,
    image: sitk.Image,
    dataset_dir: str | os.PathLike,
    case_id: str | None = None,
    corrections: list[dict] | None = None,
    model: dict | None = None,
) -> Path:
    """Append one labelled image to an nnU-Net v2 raw dataset (created when missing).

    Args:
        result: the (corrected) labelling, on the grid of ``image``.
        image: the image it labels; written as it is.
        dataset_dir: the dataset folder (``.../nnUNet_raw/Dataset123_Spine``).
        case_id: case identifier (letters, digits, ``_``, ``-``); None for the next ``spine_ct_NNNN`` or
            ``spine_mr_NNNN``: the modality in the name keeps the cases of a CT and an MR dataset apart when one
            ``spinelabel train --data`` or ``evaluate --label`` reads both from their parent folder.
        corrections: what the user changed, in order, e.g. ``[{"action": "rename", "vertebra_id": 3,
            "from": "L1", "to": "L2"}]``; stored in the provenance record.
        model: ``{"name", "version", ...}`` of the model that made the labelling; defaults to ``result.model``.

    Returns:
        Path of the written label map ``labelsTr/{CASE}.nii.gz``. A case of the same image exported before is
        removed once this one is complete (its id is in the provenance record's ``replaces``).

    Raises:
        FileExistsError: ``case_id`` is already in the dataset.
        TypeError: ``image`` is no ``SimpleITK.Image``.
        ValueError: invalid ``case_id``, image not on the labelling's grid, fewer than ``MIN_VERTEBRAE``
            vertebrae, a modality other than the dataset's, or a ``dataset.json`` an export would change the
            meaning of or that nnU-Net reads its cases from (a ``dataset`` list of files).
        OSError: the dataset folder cannot be made or written to (the message names it), or a write failed.
    """
    dataset_dir = Path(dataset_dir)
    with no_empty_new_folders(dataset_dir):  # a refused or failed export leaves no folder it made
        try:
            make_writable_folder(dataset_dir)
        except OSError as err:
            raise OSError(err.errno, f"cannot write to dataset folder {dataset_dir}: {err.strerror or err}") from err
        # two exports at once (two Slicer sessions, a script) take turns: the second sees the first's case, takes
        # the next id or replaces it, instead of both writing the same id and one case silently lost or mixed
        with folder_lock(dataset_dir):
            return _export_case(result, image, dataset_dir, case_id, corrections, model)


def _export_case(result: SpineLabeling, image: sitk.Image, dataset_dir: Path, case_id: str | None,
                 corrections: list[dict] | None, model: dict | None) -> Path:
    """``export_case`` once the dataset folder exists and is locked."""
    image = check_image_grid(result, image)
    if len(result.vertebrae) < MIN_VERTEBRAE:
        raise ValueError(f"{dataset_dir}: a case for training needs at least {MIN_VERTEBRAE} labelled vertebrae (what "
                         f"lies beyond the end vertebrae is left unknown in training); this one has "
                         f"{len(result.vertebrae)}")
    modality = _modality(result)
    dataset = read_dataset_json(dataset_dir)
    existing = _existing_cases(dataset_dir)
    if dataset is None and existing:
        raise ValueError(f"{dataset_dir}: holds cases ({', '.join(sorted(existing)[:3])}) but no dataset.json, so the "
                         "modality of its images and what its label values mean are unknown: restore its dataset.json "
                         "or export into another dataset")
    if dataset is not None:
        held = dataset_channel(dataset)
        if not isinstance(held, str) or not held:  # nnU-Net reads a channel name as a string (0, a list: no name)
            raise ValueError(f"{dataset_dir}: its dataset.json names no channel '0' under 'channel_names' (nnU-Net v2)"
                             + (f": it holds {held!r}" if held is not None else "")
                             + ", so the modality of its images is unknown")
        if _channel_modality(held) != modality:  # "ct" is CT: nnU-Net reads channel names in any case
            raise ValueError(f"{dataset_dir}: dataset holds {held} images, this one is {modality}; export it into "
                             f"a dataset of {modality} images")
        channels = dataset.get("channel_names")
        if len(channels) > 1:  # an export writes one image per case: the dataset would lose its other channels
            named = ", ".join(f"{k}: {v}" for k, v in channels.items())
            raise ValueError(f"{dataset_dir}: its dataset.json names {len(channels)} channels ({named}); an export "
                             "writes one: export into another dataset")
        if dataset.get("bodies_only") is True:
            raise ValueError(f"{dataset_dir}: its dataset.json says its labels are vertebral bodies only; an export "
                             "labels whole vertebrae: export into another dataset")
        if dataset.get("file_ending", _FILE_ENDING) != _FILE_ENDING:
            raise ValueError(f"{dataset_dir}: its dataset.json gives its files the ending "
                             f"{dataset['file_ending']!r}; an export writes {_FILE_ENDING}: export into another "
                             "dataset")
        if "dataset" in dataset:  # nnU-Net v2 then trains on the files listed there, not on imagesTr/ and labelsTr/
            raise ValueError(f"{dataset_dir}: its dataset.json lists its cases under 'dataset', which nnU-Net reads "
                             "instead of imagesTr/ and labelsTr/: an exported case would not be listed there (nor "
                             "would nnU-Net accept numTraining): export into another dataset")
        labels, ours = dataset.get("labels", {}), dataset_labels()
        other = sorted(name for name, value in (labels.items() if isinstance(labels, dict) else [])
                       if value != (level.label if (level := _level_named(name)) is not None else ours.get(name)))
        if not isinstance(labels, dict) or other:
            raise ValueError(f"{dataset_dir}: its dataset.json numbers the vertebrae otherwise than SpineLabel (VerSe "
                             f"values; {', '.join(other[:3]) or 'labels'}): an export would change what its cases "
                             "mean; export into another dataset")
    if case_id is None:
        case_id = next_case_id(dataset_dir, f"{CASE_PREFIX}_{modality.lower()}")
    elif not _CASE_ID.match(case_id):
        raise ValueError(f"case id {case_id!r}: use letters, digits, '_' and '-' only")
    else:
        key = case_key(case_id)
        same = sorted(c for c in existing if c != case_id and case_key(c) == key)
        if key != case_id or same:  # evaluate and train match cases by that key
            raise ValueError(f"case id {case_id!r}: readers of the dataset take it for case {key!r}"
                             + (f", as they take {', '.join(same)}" if same else
                                f" (they strip {', '.join(CASE_SUFFIXES)} from the end)") + "; choose another")
    paths = _paths(dataset_dir, case_id)
    if case_id in existing or any(p.exists() for p in paths.values()):
        raise FileExistsError(f"{dataset_dir}: case {case_id!r} already exists; export never overwrites: give "
                              "another case id")
    digest = _image_digest(image)
    replaces = _cases_of_image(dataset_dir, digest)
    # the dataset's earlier cases are counted as they are, less the earlier cases of this image, which go once
    # dataset.json counts the new case in their place
    complete = _complete_cases(dataset_dir)
    num_training = len(complete) + 1 - len(complete.intersection(replaces))
    document = dict(dataset or {})
    document.update({
        "name": document.get("name", dataset_dir.name),
        "description": document.get("description", "Vertebrae labelled with SpineLabel and corrected by hand"),
        "channel_names": {"0": dataset_channel(dataset) if dataset is not None else modality},  # its own spelling
        "bodies_only": False,
        "labels": dataset_labels(),
        "numTraining": num_training,
        "file_ending": _FILE_ENDING,
    })
    folders = {path.parent for path in paths.values()}
    with no_empty_new_folders(*folders):  # a failed export leaves no folder it made
        try:
            for folder in folders:
                folder.mkdir(exist_ok=True)
        except OSError as err:  # named as the folder given, not as the first of its subfolders that failed
            raise OSError(err.errno, f"cannot write to dataset folder {dataset_dir}: {err.strerror or err}") from err
        try:
            _write_case(result, image, paths, case_id, modality, corrections, model, digest, replaces)
            with atomic_path(dataset_dir / "dataset.json") as tmp, write_errors_named(dataset_dir / "dataset.json"):
                writers.write_json(document, tmp)
        except BaseException:  # no half case: the dataset stays as it was
            for path in paths.values():
                path.unlink(missing_ok=True)
            raise
    for old in replaces:  # the same scan exported before: the new case, now counted, takes its place
        for path in _paths(dataset_dir, old).values():
            path.unlink(missing_ok=True)
        log.info("case %s replaces case %s of the same image", case_id, old)
    log.info("exported case %s to %s (%d cases)", case_id, dataset_dir, num_training)
    return paths["label"]
