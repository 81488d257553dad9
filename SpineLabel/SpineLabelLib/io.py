"""Reading spine images, checking them, moving them onto the model's grid and back, and writing atomically.

Conventions: a ``SimpleITK.Image`` keeps its own geometry (LPS mm). ``sitk.GetArrayFromImage`` gives arrays in
(z, y, x) = (k, j, i) order; every numpy array in SpineLabel is in that order unless its docstring says otherwise.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import gzip
import itertools
import logging
import math
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import nibabel
import numpy as np
import SimpleITK as sitk

from .result import Geometry

__all__ = [
    "InputError",
    "Cancelled",
    "IMAGE_SUFFIXES",
    "case_name",
    "CASE_SUFFIXES",
    "case_key",
    "make_writable_folder",
    "no_empty_new_folders",
    "read_image",
    "image_stem",
    "itk_warnings",
    "as_3d",
    "read_notes",
    "header_tags",
    "checked_image",
    "read_label_map",
    "canonical_grid",
    "extend_to_grid_ends",
    "resample_to_grid",
    "atomic_path",
    "atomic_paths",
    "folder_lock",
    "write_errors_named",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# 2D picture files (screenshots, JPEG exports of a series), which a user may take for a scan
_PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif")
# bounds of the longest side of an image's field of view: outside them the header's spacing is in the wrong units
# (micrometres, metres), whatever the image shows; and of its second longest, a body's cross-section or length (a CT
# bore is about 800 mm wide): a 186 x 186 voxel CT given 10 mm voxels spans 1860 mm both ways, and was labelled for
# 108 s with 8.9 GB of memory before the spine gate refused it
MIN_EXTENT_MM, MAX_EXTENT_MM, MAX_SECOND_EXTENT_MM = 5.0, 3000.0, 1000.0
# how far from perpendicular (in the dot products of the direction cosines) a grid's axes may be: cosines written with
# three decimals are off by up to about 0.002 and are taken as they are (ITK resamples through the matrix's inverse);
# a tilted gantry's shear (5 degrees: 0.087) is refused
SHEAR_TOLERANCE = 0.01
# the metadata key under which read_image keeps its notes with the image (read_notes)
_READ_NOTES_KEY = "SpineLabel_read_notes"


class InputError(ValueError):
    """An input SpineLabel cannot label; the message names the file and the reason."""


class Cancelled(Exception):
    """Raised when the caller's cancel hook asked to stop. Defined here, without torch, for the modules that do not
    need it (``evaluation``); ``inference`` and ``pipeline`` export the same class."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


def case_name(path: str | os.PathLike) -> str:
    """NAME used for output files: the file name without its image extension (the folder name for DICOM)."""
    p = Path(path)
    if p.is_dir():  # named as given (a link's own name), "." and ".." resolved
        return Path(os.path.abspath(p)).name
    stem = image_stem(p.name)
    return p.stem if stem is None else stem


def image_stem(name: str) -> str | None:
    """File name ``name`` without its image suffix (one of ``IMAGE_SUFFIXES``, any case); None when it has none."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


# what a case's files add to its name (VerSe, bodies and nnU-Net layouts): a case is matched by its name without them
CASE_SUFFIXES = ("_img", "_ct", "_0000", "_T1w", "_T2w")


def case_key(name: str) -> str:
    """Matching key of a case name: ``CASE_SUFFIXES`` stripped from the end (in any case), repeatedly."""
    key = name
    stripped = True
    while stripped:
        stripped = False
        for suffix in CASE_SUFFIXES:
            if key.lower().endswith(suffix.lower()) and len(key) > len(suffix):
                key = key[: -len(suffix)]
                stripped = True
    return key


# the blocks of ``itk_warnings`` open now in any thread, in the order they were opened, each with its setting (the
# latest one's holds), and the setting before the first of them
_itk_warning_blocks: dict[object, bool] = {}
_itk_warnings_before = [True]
_itk_warnings_lock = threading.Lock()


@contextlib.contextmanager
def itk_warnings(show: bool) -> Iterator[None]:
    """Whether ITK prints its warnings (process-wide) within the block; the setting before it is restored after the
    last block open in any thread ends. (Each block saving and restoring the setting for itself, two threads reading
    images left ITK's warnings off for good: one saved the other's "off" and restored it last.)"""
    token = object()
    with _itk_warnings_lock:
        if not _itk_warning_blocks:
            _itk_warnings_before[0] = sitk.ProcessObject.GetGlobalWarningDisplay()
        _itk_warning_blocks[token] = bool(show)
        sitk.ProcessObject.SetGlobalWarningDisplay(bool(show))
    try:
        yield
    finally:
        with _itk_warnings_lock:
            del _itk_warning_blocks[token]
            latest = next(reversed(_itk_warning_blocks.values()), _itk_warnings_before[0])
            sitk.ProcessObject.SetGlobalWarningDisplay(latest)


def _read_dicom_folder(folder: Path, notes: list[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    with itk_warnings(False):  # a folder without a series: said below, not printed by ITK
        series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        below = next((Path(d) for d, _, names in sorted(os.walk(folder))[1:] if names), None)
        names = sorted(p.name for p in folder.iterdir())
        images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        pictures = [n for n in names if n.lower().endswith(_PICTURE_SUFFIXES)]
        unread = _unparsed_dicom_files(folder, set())
        raise InputError(f"{folder}: folder holds no DICOM series" + (
            f"; {_unparsed_text(unread, no_series=True)}" if unread else "") + (
            f"; it holds {len(pictures)} picture file{'s' * (len(pictures) > 1)} (as {pictures[0]}): pictures have "
            "no voxel size or position; export the series as DICOM or as one NIfTI/NRRD volume"
            if pictures and not images else "") + (
            f"; its subfolders hold files (as {below.relative_to(folder)}): give the folder of one series"
            if below else "") + (f"; it holds {len(images)} image files (as {images[0]}): give the files themselves"
                                 if images else ""))
    files_of = {uid: reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    volumes = [uid for uid in series if len(files_of[uid]) > 1 or _frames(files_of[uid][0]) > 1]
    if len(series) > 1 and len(volumes) == 1:  # a scout or a screen capture exported beside its volume
        others = "; ".join(_series_description(files_of[uid]) for uid in series if uid != volumes[0])
        notes.append(f"the folder's series of one image were left out ({others})")
    elif len(series) > 1:
        described = "; ".join(_series_description(files_of[uid]) for uid in series)
        raise InputError(f"{folder}: folder holds {len(series)} DICOM series ({described}); give a folder with "
                         "exactly one")
    files = files_of[volumes[0] if volumes else series[0]]
    headers = [dict(zip(_SLICE_TAGS, map(header_tags(name), _SLICE_TAGS))) for name in files]
    unread = _unparsed_dicom_files(folder, {Path(name).name for names in files_of.values() for name in names},
                                   headers[0]["0008|0016"], min(os.path.getsize(name) for name in files))
    localisers = _localisers(headers)
    if localisers and len(localisers) < len(files):  # ITK would stack them with the slices
        notes.append(f"the series' localiser image{'s' * (len(localisers) > 1)} "
                     f"{', '.join(Path(files[i]).name for i in localisers)} left out")
        files = tuple(name for i, name in enumerate(files) if i not in localisers)
        headers = [tags for i, tags in enumerate(headers) if i not in localisers]
    reader.SetFileNames(files)
    if _mixed_value_storage(headers):  # ITK gives the whole series the pixel type of its first file's values
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        with itk_warnings(False):  # uneven slices: said below, not printed by ITK
            image = reader.Execute()
    except RuntimeError as err:
        if _out_of_memory(err):  # as for a file (``_read_file``): the series may be fine, the memory is missing
            raise InputError(f"{folder}: not enough memory to read this DICOM series"
                             f"{_voxels_needed(Path(files[0]), False, slices=len(files))}") from None
        detail = next((line for line in reversed(str(err).strip().splitlines()) if line.strip()), "")
        raise InputError(f"{folder}: unreadable DICOM series ({detail.strip()[:200]})") from None
    # ITK stacks the slices it could read and spaces them evenly, so a missing or unreadable slice would distort the
    # grid. It sets this key for any deviation, rounding errors of the slice positions included: measure it.
    if image.HasMetaDataKey("ITK_non_uniform_sampling_deviation") and (problem := _uneven_slices(files, headers)):
        raise InputError(f"{folder}: DICOM slices are not evenly spaced: {problem}" + (
            f"; {_unparsed_text(unread)}" if unread else ""))
    if unread:  # at an end of the stack: the series is read without it
        notes.append(f"{_unparsed_text(unread)} and {'were' if len(unread) > 1 else 'was'} left out: the series may "
                     "lack a slice at one end")
    # a file per slice: a multi-frame file keeps its orientation in its frames' groups, which GDCM reads and these
    # header tags do not hold
    if len(files) > 1 and (note := _unoriented_dicom_note(headers[0]["0020|0037"])):
        notes.append(note)
    return _unsheared(image, files, headers, notes)


def _unparsed_dicom_files(folder: Path, listed: set[str], kind: str = "", least: int = 0) -> list[str]:
    """The names of the files in ``folder`` that are none of the ``listed`` names of its series' files and that look
    like slices GDCM could not parse (cut short or damaged), which it leaves out without a word: a DICOM file (its
    preamble's "DICM") of the storage class ``kind`` of the series' slices, or of a class that cannot be read (any
    class where ``kind`` is "": a dose report beside CT slices is no slice of theirs), and a file of half ``least``
    bytes or more that begins with 132 zero bytes, as a slice overwritten with zeros does (none where ``least`` is 0;
    half: slices differ in size by their headers, UIDs and positions of other lengths). A DICOMDIR is not looked at."""
    names = []
    for path in sorted(folder.iterdir()):
        if path.name in listed or path.name.upper() == "DICOMDIR" or not path.is_file():  # a pipe would block
            continue
        with contextlib.suppress(OSError), open(path, "rb") as f:
            start = f.read(1024)
            if start[128:132] == b"DICM" and (not kind or _storage_class(start) in ("", kind)):
                names.append(path.name)
            elif least and start[:132] == bytes(132) and path.stat().st_size >= least / 2:
                names.append(path.name)
    return names


def _storage_class(start: bytes) -> str:
    """The storage class (Media Storage SOP Class UID, in the file meta information) of a DICOM file whose first bytes
    are ``start``; "" where it is not found."""
    meta = start[132:]  # after the preamble (128 bytes of any content) and "DICM"
    found = re.search(rb"\x02\x00\x02\x00UI(..)", meta, re.DOTALL)
    if found is None:
        return ""
    return meta[found.end() : found.end() + int.from_bytes(found[1], "little")].rstrip(b"\0 ").decode("latin-1")


def _unparsed_text(names: list[str], no_series: bool = False) -> str:
    """``names`` (``_unparsed_dicom_files``) for a message. With ``no_series`` (no series whose storage class tells
    slices from other files), a file of them may be a valid DICOM file that holds no image (a report)."""
    what, why = (("could not be read as images", "cut short or damaged, or holding no image, as a report does")
                 if no_series else ("could not be read", "cut short or damaged"))
    return (f"{len(names)} DICOM file{'s' * (len(names) > 1)} of the folder {what} ({why}: "
            f"{', '.join(names[:3])}{' ...' * (len(names) > 3)})")


# the tags of each slice of a DICOM series that the reader's checks read, each file's header read once: ImageType,
# ImageOrientationPatient, RescaleSlope, RescaleIntercept, PixelRepresentation, BitsStored, ImagePositionPatient,
# SOPClassUID
_SLICE_TAGS = ("0008|0008", "0020|0037", "0028|1053", "0028|1052", "0028|0103", "0028|0101", "0020|0032",
               "0008|0016")


def _localisers(headers: list[dict[str, str]]) -> list[int]:
    """Indices of the localiser (scout) images among the files of one series (``headers``: their ``_SLICE_TAGS``):
    those whose ImageType says LOCALIZER, or whose ImageOrientationPatient differs from the median one by more than
    0.5 (a plane turned 30 degrees or more), as a localiser's plane across the slices does. Slices turned less, such as
    slabs angled to each disc in one series, are left to the reader (their spacing is found uneven)."""
    orientations = {}
    for i, tags in enumerate(headers):
        values = _dicom_numbers(tags["0020|0037"])  # absent or not numbers: left to the reader
        if values is not None and values.size == 6:
            orientations[i] = values
    common = np.median(list(orientations.values()), axis=0) if len(orientations) > 2 else None
    return [i for i, tags in enumerate(headers) if "LOCALIZER" in tags["0008|0008"].upper().split("\\") or (
        common is not None and i in orientations and np.abs(np.subtract(orientations[i], common)).max() > 0.5)]


def _mixed_value_storage(headers: list[dict[str, str]]) -> bool:
    """Whether the slices of one series (``headers``: their ``_SLICE_TAGS``) store or scale their values differently
    (RescaleSlope, RescaleIntercept, PixelRepresentation, BitsStored differ among them, as per-slice slopes of some MR
    and PET series do). ITK reads such a series in the pixel type that fits the first file's values and casts every
    other slice to it: a slice of negative values after an unsigned first one wrapped to 65535, fractional values were
    cut to integers. Values are compared as numbers ("1" and "1.0" are one slope)."""
    def value(text: str) -> float | str:
        try:
            return float(text)
        except ValueError:  # absent ("") or not a number
            return text

    storage = ("0028|1053", "0028|1052", "0028|0103", "0028|0101")
    return len({tuple(value(tags[key]) for key in storage) for tags in headers}) > 1


def header_tags(name: str | os.PathLike) -> Callable[[str], str]:
    """The header tags of image file ``name`` (DICOM's, or any other format's metadata): a function of a tag's key
    (``"0020|0011"``, ``"ITK_FileNotes"``) that gives its value, stripped, or "" when the file lacks it or its header
    cannot be read."""
    header = sitk.ImageFileReader()
    header.SetFileName(str(name))
    try:
        header.ReadImageInformation()
    except RuntimeError:
        return lambda key: ""
    return lambda key: _text(header.GetMetaData(key)).strip() if header.HasMetaDataKey(key) else ""


def _text(value: str) -> str:
    """A header's text as written: ITK hands over bytes that are not UTF-8 (a DICOM text in ISO 8859-1, the most used
    of its other character sets, such as "R\\xfccken") as lone surrogates, which no message can print; they are read
    as ISO 8859-1."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode(errors="surrogateescape").decode("latin-1")
    return value


def _frames(name: str) -> int:
    """How many images a DICOM file holds: its NumberOfFrames (a multi-frame file can hold a whole volume), else 1."""
    frames = header_tags(name)("0028|0008")
    return int(frames) if frames.isdigit() else 1


def _series_description(files: tuple[str, ...]) -> str:
    """``number 3 "T2 sag" MR, 15 files``: what a user knows a series by, from the first of its ``files``."""
    count = f"{len(files)} file{'' if len(files) == 1 else 's'}"
    tag = header_tags(files[0])
    number, text, modality = tag("0020|0011"), tag("0008|103e"), tag("0008|0060")
    named = " ".join(part for part in (f"number {number}" if number else "", f'"{text}"' if text else "", modality)
                     if part)
    return f"{named}, {count}" if named else count


def _dicom_numbers(text: str) -> np.ndarray | None:
    """float64 array of the numbers of a DICOM header value of several (``1\\0\\0``); None where it is absent ("") or
    holds something else."""
    try:
        return np.array([float(v) for v in text.split("\\")])
    except ValueError:
        return None


def _slice_geometry(tags: dict[str, str]) -> tuple[np.ndarray, np.ndarray] | None:
    """ImagePositionPatient (3,) and ImageOrientationPatient (6,), LPS mm, of a DICOM slice (``tags``: its
    ``_SLICE_TAGS``); None if absent."""
    position, orientation = (_dicom_numbers(tags[key]) for key in ("0020|0032", "0020|0037"))
    return None if position is None or orientation is None else (position, orientation)


def _unsheared(image: sitk.Image, files: tuple[str, ...], headers: list[dict[str, str]], notes: list[str]
               ) -> sitk.Image:
    """``image`` as ITK stacked the slices of ``files`` (``headers``: their ``_SLICE_TAGS``): along their normal, each
    at its in-plane position. A tilted gantry moves the slices along the table instead, so ITK's grid puts the last
    slice of a 19 degree tilt 66 mm from where its file says it is. When the slices drift sideways by more than a pixel
    over the stack, the image is resampled (linearly) onto a grid with perpendicular axes that puts every voxel where
    its file says: slices along the table at their true distance, columns perpendicular to the table and the rows, rows
    perpendicular to both (as read where the table is perpendicular to them: a tilt about the rows, as a gantry's), the
    in-plane spacing as read, widened to hold the drift; ``notes`` gets a line saying so."""
    first, last = _slice_geometry(headers[0]), _slice_geometry(headers[-1])
    if len(files) < 2 or first is None or last is None:
        return image
    axes = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: row, column, slice normal (LPS)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    step = (last[0] - first[0]) / (len(files) - 1)  # LPS mm from one slice to the next, as the files say
    along = float(step @ axes[:, 2])
    drift = step - along * axes[:, 2]  # sideways, per slice
    if along == 0 or np.linalg.norm(drift) * (len(files) - 1) <= spacing[:2].min():
        return image
    # a point p of the true grid lies in ITK's image at p - k * (step - spacing_z * normal), k = its slice
    shift = (step - spacing[2] * axes[:, 2]) / along
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((np.eye(3) - np.outer(shift, axes[:, 2])).ravel().tolist())
    transform.SetTranslation((shift * float(axes[:, 2] @ np.asarray(image.GetOrigin()))).tolist())
    size = np.asarray(image.GetSize())
    corners = np.array([np.asarray(image.GetOrigin()) + axes[:, :2] @ (c[:2] * (size[:2] - 1) * spacing[:2])
                        + c[2] * (size[2] - 1) * step for c in itertools.product((0, 1), repeat=3)])
    # the patient's axes, not the gantry's: on a grid along the slice normal the spine stood turned by the tilt, and
    # a real CT given a 15 degree tilt lost T12 and had three vertebrae 6-9 mm off those of its axial copy
    table = step / np.linalg.norm(step) * np.sign(along)
    column = np.cross(table, axes[:, 0])
    column *= np.sign(column @ axes[:, 1]) / np.linalg.norm(column)
    axes_out = np.stack([np.cross(column, table), column, table], axis=1)
    spacing_out = np.array([spacing[0], spacing[1], float(np.linalg.norm(step))])
    low, high = (corners @ axes_out).min(axis=0), (corners @ axes_out).max(axis=0)
    grid = sitk.Image([int(n) for n in np.round((high - low) / spacing_out) + 1], image.GetPixelID())
    grid.SetSpacing(spacing_out.tolist())
    grid.SetDirection(axes_out.ravel().tolist())
    grid.SetOrigin((axes_out @ low).tolist())
    minimum = float(sitk.GetArrayViewFromImage(image).min())
    angle = np.degrees(np.arctan2(np.linalg.norm(drift), abs(along)))
    notes.append(f"the slices stand {angle:.1f} degrees off their normal (a tilted gantry): the image was resampled "
                 "onto a grid with perpendicular axes, slices along the table, on which the outputs lie")
    return sitk.Resample(image, grid, transform, sitk.sitkLinear, minimum, image.GetPixelID())


def _uneven_slices(files: tuple[str, ...], headers: list[dict[str, str]], tolerance: float = 0.1) -> str | None:
    """What keeps the slices of ``files`` (one series, in any order; ``headers``: their ``_SLICE_TAGS``) from being
    evenly spaced along their normal (by their ImagePositionPatient and ImageOrientationPatient), or None where every
    step is within ``tolerance`` of the median step."""
    positions = []
    for name, tags in zip(files, headers):
        geometry = _slice_geometry(tags)
        if geometry is None:
            return f"{Path(name).name} gives no slice position"
        position, orientation = geometry
        positions.append(np.dot(position, np.cross(orientation[:3], orientation[3:])))
    # in position order: GDCM leaves files in name order when two share a position, so that a slice given twice
    # read as a large step before the last file ("a slice missing")
    order = np.argsort(positions, kind="stable")
    files = [files[i] for i in order]
    steps = np.abs(np.diff(np.asarray(positions)[order]))  # mm
    same = np.flatnonzero(steps < 1e-3)
    if same.size:
        first, second = (Path(files[i]).name for i in (same[0], same[0] + 1))
        return (f"{first} and {second} lie at one position (a slice given twice, or several echoes or time points in "
                "one series)")
    median = float(np.median(steps)) if steps.size else 0.0
    off = np.flatnonzero(np.abs(steps - median) > tolerance * median)
    if not off.size:
        return None
    return (f"steps of {steps.min():.3g} to {steps.max():.3g} mm where most are {median:.3g} mm, the first off "
            f"before {Path(files[off[0] + 1]).name} (a slice missing or unreadable?)")


def _all_finite(values: np.ndarray) -> bool:
    """Whether a float array of any shape holds no NaN or infinite value: its minimum and maximum, which NaN and
    infinities reach, are finite (two passes without the bool array of ``np.isfinite``, 20 times faster)."""
    return values.size == 0 or bool(np.isfinite(values.min()) and np.isfinite(values.max()))


_PIECE = 1 << 24  # bytes of a file read, or of a stream inflated, at a time: whole voxels of 8 bytes or fewer
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64 voxels
# every NIfTI datatype code: ITK's NIfTI library prints "bad datatype" for another and ITK says the file is not NIfTI
_NIFTI_DATATYPES = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304}


class _NiftiLayout(NamedTuple):
    """What SpineLabel reads of a NIfTI header (``_nifti_layout``)."""

    endian: str  # "<" or ">"
    datatype: int  # NIfTI datatype code
    offset: int  # bytes before the voxels
    voxel_bytes: int
    spacing_known: bool
    version: int  # 1 or 2
    negative_spacing: bool  # a spatial pixdim below 0
    sizes: tuple[int, ...]  # voxels along each of its dimensions, x first
    scaling: tuple[float, float]  # scl_slope, scl_inter as stored
    magic: bytes  # NIfTI-1: b"n+1\0" (one file), b"ni1\0" (a header of its own); NIfTI-2: its first 4 bytes
    stored_offset: float  # vox_offset as stored

    @property
    def float64_3d_nifti1(self) -> bool:
        """Read a slab at a time into float32 (``_read_float64_nifti1``), not by ITK."""
        return self.version == 1 and self.datatype == 64 and len(self.sizes) == 3


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """The layout of a NIfTI header; None when it is not NIfTI. The voxel size is known from pixdim when its spatial
    entries are finite and not 0 (ITK takes 1 mm for a 0, even beside an sform that gives the size), or for NIfTI-2,
    which nibabel reads, from an sform.

    Raises:
        ValueError: a voxel offset that is not a finite number, a qform or sform in use (code above 0) with NaN or
            infinite entries, or a header too short for NIfTI's."""
    if len(header) < 348:  # the shorter NIfTI-1 header; checked here so that unpacking cannot fail obscurely
        raise ValueError(f"{len(header)} bytes: too short for a NIfTI header (348)")
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348:
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            dims = struct.unpack(endian + "8h", header[40:56])
            pixdim = struct.unpack(endian + "8f", header[76:108])
            offset = struct.unpack(endian + "f", header[108:112])[0]
            if not math.isfinite(offset):
                raise ValueError("corrupt NIfTI header: its voxel offset (vox_offset) is not a number")
            scaling = struct.unpack(endian + "2f", header[112:120])
            qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
            qform, sform = struct.unpack(endian + "6f", header[256:280]), struct.unpack(endian + "12f", header[280:328])
            break
        if size == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            scaling = struct.unpack(endian + "2d", header[176:192])
            qform_code, sform_code = struct.unpack(endian + "2i", header[344:352])
            qform, sform = struct.unpack(endian + "6d", header[352:400]), struct.unpack(endian + "12d", header[400:496])
            break
    else:
        return None
    for name, code, values in (("qform", qform_code, qform), ("sform", sform_code, sform)):
        if code > 0 and not np.all(np.isfinite(values)):  # ITK reads such an entry as 0: the scan placed elsewhere
            raise ValueError(f"its header's {name} holds NaN or infinite values")
    n_dims = max(0, min(int(dims[0]), 7))
    sizes = tuple(max(int(d), 1) for d in dims[1 : 1 + n_dims])
    spatial = np.asarray(pixdim[1 : 1 + min(n_dims, 3)], dtype=float)
    spacing_known = bool(np.all(np.isfinite(spatial) & (spatial != 0))) or (size == 540 and sform_code > 0)
    return _NiftiLayout(endian, datatype, max(int(offset), 352), math.prod(sizes) * bitpix // 8, spacing_known,
                        1 if size == 348 else 2, bool(np.any(spatial < 0)), sizes, scaling,
                        header[344:348] if size == 348 else header[4:8], offset)


def _check_nifti(path: Path, what: str) -> tuple[_NiftiLayout, bool]:
    """ITK reads a truncated NIfTI without complaint (the missing voxels come back as 0), turns NaN and infinite voxels
    into 0, and takes 1 mm for a voxel size of 0: check the header and the size of an uncompressed file, and stream its
    float voxels through a finiteness test (a gzip stream is checked so as it is inflated beside the reader:
    ``_inflated_size``; a 3D float64 NIfTI-1 is read as float32 and checked so: ``_read_float64_nifti1``); it reads a
    header of the wrong size, or with NaN in its qform or sform, as well, and turns round the axes of a NIfTI-1 header's
    negative voxel size: such a header is refused. ``what`` names the file in the messages ("image", "label map").
    Returns the header's layout and whether the file is gzip-compressed."""
    try:  # compressed or not by its first bytes: ITK reads a plain NIfTI named .nii.gz as well
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
    except OSError as err:
        raise InputError(f"{path}: unreadable {what} ({err.strerror or err})") from None
    if gz and not path.name.lower().endswith(".gz"):
        raise InputError(f"{path}: a gzip-compressed file named without .gz, which the image reader does not open: "
                         "name it .nii.gz")
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            layout = _nifti_layout(f.read(540))
    except (OSError, EOFError, struct.error, zlib.error, ValueError) as err:
        raise InputError(f"{path}: unreadable {what} ({err})") from None
    if layout is None:  # ITK reads such a file all the same, unchecked
        raise InputError(f"{path}: corrupt NIfTI header: its first 4 bytes give a header size of neither 348 (NIfTI-1) "
                         "nor 540 (NIfTI-2)")
    datatype, offset, voxel_bytes, spacing_known = layout[1:5]
    # ITK reads a NIfTI-1 header without NIfTI's mark as Analyze 7.5: without its qform and sform, at the origin along
    # the voxel array's axes (one byte of the mark damaged, or bytes inserted before it, and the spine was turned)
    if layout.version == 1 and layout.magic not in (b"n+1\0", b"ni1\0"):
        raise InputError(f"{path}: corrupt NIfTI header: it lacks NIfTI's mark ('n+1' at byte 344, found "
                         f"{layout.magic!r}), and read as the Analyze 7.5 header it then is, it would lose its "
                         "orientation")
    if datatype not in _NIFTI_DATATYPES:
        raise InputError(f"{path}: corrupt NIfTI header: datatype {datatype} is none of NIfTI's")
    if layout.version == 1 and layout.magic == b"n+1\0" and layout.stored_offset < 352:
        raise InputError(f"{path}: corrupt NIfTI header: its voxel offset (vox_offset {layout.stored_offset:g}) lies "
                         "within the header, which ends at byte 352")
    if datatype == 1:  # ITK's NIfTI library prints "bad datatype" and ITK says the file is not NIfTI
        raise InputError(f"{path}: {what} of 1-bit voxels (NIfTI datatype DT_BINARY), which the image reader does not "
                         "read; save it with 8-bit voxels (uint8)")
    if not spacing_known:
        raise InputError(f"{path}: the header gives no voxel size (pixdim 0)")
    if layout.version == 1 and layout.negative_spacing:  # ITK turns such an axis round, against either form
        raise InputError(f"{path}: the header gives a negative voxel size (pixdim), which image readers take "
                         "differently (ITK turns those axes round, nibabel and the NIfTI library read the size as "
                         "positive), so which way the spine points is not settled; write the header with positive "
                         "voxel sizes (the qform's handedness goes in pixdim[0], the sform holds its own)")
    expected = offset + voxel_bytes
    if not gz and path.stat().st_size < expected:  # a gzip stream is inflated in full beside the reader
        raise InputError(f"{path}: truncated file ({path.stat().st_size} of {expected} bytes)")
    dtype = _float_voxels(layout)
    if dtype is None or gz:
        return layout, gz
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            # a multiple of 8 bytes (whole float voxels) at a time, up to the end of the voxels: bytes after them
            # (an extension some writers append) are not voxels
            while chunk := f.read(min(_PIECE, expected - f.tell())):
                if not _all_finite(np.frombuffer(chunk, dtype, count=len(chunk) // dtype.itemsize)):
                    raise InputError(f"{path}: {what} holds NaN or infinite values")
    except OSError as err:
        raise InputError(f"{path}: unreadable {what} ({err.strerror or err})") from None
    return layout, gz


def _float_voxels(layout: _NiftiLayout) -> np.dtype | None:
    """The type of a NIfTI's float voxels, whose NaN and infinities ITK reads as 0, to be checked in the file; None for
    other voxels, and for a 3D float64 NIfTI-1, read a slab at a time into float32 (``_read_float64_nifti1``), whose
    NaN and infinities (float64 values beyond float32 among them) the readers' check of float32 voxels finds."""
    float_type = _NIFTI_FLOAT_TYPES.get(layout.datatype)
    return None if float_type is None or layout.float64_3d_nifti1 else np.dtype(layout.endian + float_type)


def _load_nifti(path: Path) -> nibabel.Nifti1Image | nibabel.Nifti2Image:
    """``nibabel.load``, whose complaints about a header go to the log only: nibabel's own handler prints them as
    well (its ``LoggingOutputSuppressor`` would remove that handler for good)."""
    logger = nibabel.imageglobals.logger
    handlers = list(logger.handlers)
    for handler in handlers:
        logger.removeHandler(handler)
    try:
        return nibabel.load(str(path))
    finally:
        for handler in handlers:
            logger.addHandler(handler)


def _read_nifti2(path: Path, what: str) -> sitk.Image:
    """A NIfTI-2 file (which ITK does not read) read with nibabel: voxels as stored (scaled when the header gives a
    slope), geometry from nibabel's affine (the sform, else the qform; RAS mm) turned into LPS, or, with neither, as
    ITK reads such a NIfTI-1 file: pixdim spacing, origin 0, identity direction. Trailing axes of length 1 are
    dropped; other 2D to 5D scalar shapes come back as they are for ``checked_image`` to turn down."""
    try:
        nii = _load_nifti(path)
        voxels = np.asanyarray(nii.dataobj)
    except Exception as err:  # nibabel raises many types on a corrupt file
        raise InputError(f"{path}: unreadable {what} ({str(err).strip()[:200]})") from None
    while voxels.ndim > 3 and voxels.shape[-1] == 1:
        voxels = voxels[..., 0]
    if not 2 <= voxels.ndim <= 5 or voxels.dtype.kind not in "buif":
        raise InputError(f"{path}: not a 3D scalar {what} ({voxels.ndim}D, {voxels.dtype} voxels)")
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.T), isVector=False)  # nibabel's (i, j, k) -> (k, j, i)
    header = nii.header
    if voxels.ndim == 3 and int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        image.SetSpacing([abs(float(v)) for v in header["pixdim"][1:4]])
    elif voxels.ndim == 3:
        lps = np.diag([-1.0, -1.0, 1.0]) @ nii.affine[:3]
        spacing = np.linalg.norm(lps[:, :3], axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps[:, :3] / spacing).ravel().tolist())
        image.SetOrigin(lps[:, 3].tolist())
    return image


# A qform and an sform whose voxel axes lie within this angle of each other agree (degrees): rounding and small
# shears between the two forms are not a header turned the wrong way.
_FORMS_AGREE_DEG = 30.0


# what a file whose header gives no orientation was read as, and what to do
_READ_UNORIENTED = ("so it was read with the axes of its voxel array: if the vertebrae come out in the wrong order, "
                    "or none, correct the header")


def _unoriented_note(header: tuple[dict[str, str], int] | None, metaimage: bool) -> str | None:
    """A line for the notes when a NRRD or MetaImage ``header`` (``_header_fields``) gives no orientation (no space
    directions; no TransformMatrix or its other names), which ITK reads as the axes of the voxel array, as
    ``_forms_note`` says of a NIfTI's; None otherwise."""
    if header is None:
        return None
    fields = header[0]
    if metaimage and not {"transformmatrix", "rotation", "orientation"} & fields.keys():
        return f"its header gives no orientation (no TransformMatrix), {_READ_UNORIENTED}"
    if not metaimage and "spacedirections" not in fields:
        return f"its header gives no orientation (no space directions), {_READ_UNORIENTED}"
    return None


def _unoriented_dicom_note(orientation: str) -> str | None:
    """A line for the notes when a DICOM slice's ImageOrientationPatient (``orientation``, its text) gives no
    orientation GDCM accepts: absent, fewer than six numbers (GDCM reads the first six), or two directions not
    perpendicular once each is made unit length (within GDCM's 1e-3 of their dot product). GDCM then reads the series
    with the axes of its voxel array, as ITK reads a NIfTI without orientation; None otherwise."""
    values = _dicom_numbers(orientation)
    if values is not None and values.size >= 6 and np.isfinite(values[:6]).all():
        row, column = values[:3], values[3:6]
        lengths = np.linalg.norm(row) * np.linalg.norm(column)
        if lengths > 0 and abs(row @ column) / lengths < 1e-3:
            return None
    given = f"'{orientation}'" if orientation else "absent"
    return f"its slices give no orientation (ImageOrientationPatient {given}), {_READ_UNORIENTED}"


def _forms_note(path: Path, image: sitk.Image) -> str | None:
    """A line for the user when NIfTI file ``path``'s header does not settle which way its axes point (a header
    turned the wrong way numbers a spine from the wrong end, at full confidence): when it gives neither a qform nor an
    sform (read with the axes of the voxel array, as ITK does), or when both hold and point its axes different ways,
    naming the one ``image`` was read by (ITK takes the sform unless it is not orthonormal; nibabel, for NIfTI-2, the
    sform); and when ITK read a NIfTI-1 file otherwise than its sform, which it could not follow: by the qform, or with
    no qform along the sform's axes at pixdim's size (``_unfollowed_sform_note``)."""
    try:
        header = _load_nifti(path).header
        forms = {"qform": header.get_qform(coded=True), "sform": header.get_sform(coded=True)}
    except Exception:  # a header nibabel cannot read has no forms to compare: the reader judges the file
        return None
    if all(code == 0 for _, code in forms.values()):
        return f"its header gives no orientation (neither a qform nor an sform), {_READ_UNORIENTED}"
    units = {}  # each form's voxel axes as unit vectors (RAS), columns
    for name, (affine, code) in forms.items():
        if code > 0:
            axes = np.asarray(affine, dtype=float)[:3, :3]
            norms = np.linalg.norm(axes, axis=0)
            # a degenerate form points nowhere: axes of no length, or one along another (a damaged srow)
            if np.isfinite(axes).all() and (norms > 0).all() and abs(np.linalg.det(axes / norms)) > 1e-3:
                units[name] = axes / norms
    if len(units) < 2:  # an sform alone whose axes are not the voxel size: ITK takes its axes at pixdim's size
        return _unfollowed_sform_note(forms["sform"][0], image, "along its axes at the voxel size of pixdim") if (
            "sform" in units) else None
    agree = np.cos(np.radians(_FORMS_AGREE_DEG))

    def alike(a: np.ndarray, b: np.ndarray) -> bool:  # no voxel axis turned more than _FORMS_AGREE_DEG
        return bool(np.all(np.sum(a * b, axis=0) >= agree))

    if alike(units["qform"], units["sform"]):  # their nearest anatomical axes alone may differ: a tie at 45 degrees
        return _unfollowed_sform_note(forms["sform"][0], image, "by its qform")
    read = np.asarray(Geometry.of(image).ijk_to_ras(), dtype=float)[:3, :3]
    read = read / np.linalg.norm(read, axis=0)
    used = next((f"the {name}" for name, axes in units.items() if alike(axes, read)), "neither of them")
    codes = {name: "".join(nibabel.aff2axcodes(forms[name][0])) for name in units}
    towards = (f"axes toward {codes['qform']} and {codes['sform']}" if codes["qform"] != codes["sform"] else
               f"axes more than {_FORMS_AGREE_DEG:g} degrees apart")
    return (f"its qform and sform disagree ({towards}), and it was read by {used}: if the vertebrae come out in "
            "the wrong order, correct the header")


def _perpendicular(axes: np.ndarray) -> bool:
    """Whether the columns of ``axes`` (float (3, 3), any lengths) are perpendicular within ``SHEAR_TOLERANCE``."""
    lengths = np.linalg.norm(axes, axis=0)
    if not (lengths > 0).all():
        return False
    units = axes / lengths
    return bool(np.allclose(units.T @ units, np.eye(3), atol=SHEAR_TOLERANCE))


def _unfollowed_sform_note(sform: np.ndarray, image: sitk.Image, read_by: str) -> str | None:
    """A line for the user when ITK read a NIfTI-1 file as ``read_by`` says (by its qform; with no qform, along the
    sform's axes at pixdim's size) because it could not follow its ``sform`` (axes not perpendicular, as a tilted
    gantry's written by a converter that does not resample it, or lengths other than the voxel size), and the two put
    some voxel more than 1 mm apart: the labels then lie that far from where a viewer that follows the sform shows the
    image (a 15 degree tilt: 24 mm on a real CT, 42 mm on a real MRI). None otherwise."""
    sform = np.asarray(sform, dtype=float)
    corners = np.c_[_CORNERS * (np.asarray(image.GetSize(), dtype=float) - 1), np.ones(8)]  # voxel indices
    read = np.asarray(Geometry.of(image).ijk_to_ras(), dtype=float)
    apart = float(np.linalg.norm(corners @ (sform - read).T[:, :3], axis=1).max())
    if apart <= 1.0:
        return None
    why, remedy = (("its axes are not perpendicular, as from a tilted gantry", "resample the image onto a grid with "
                    "perpendicular axes first") if not _perpendicular(sform[:3, :3]) else
                   ("its axes are not as long as the voxel size (pixdim)", "correct the voxel size in the header"))
    return (f"its sform could not be followed ({why}), so it was read {read_by}, which puts voxels up to "
            f"{apart:.0f} mm from where the sform does: the outputs lie where this reading puts the scan; if the "
            f"sform is the right one, {remedy}")


def as_3d(image: sitk.Image) -> sitk.Image:
    """A 4D image of one time point (as NRRD and MetaImage can store a volume) as the 3D volume it is; any other
    image as it is."""
    return image[:, :, :, 0] if image.GetDimension() == 4 and image.GetSize()[3] == 1 else image


def _read_file(path: Path, what: str, notes: list[str] | None = None) -> sitk.Image:
    """One image file: its header checked first (``_check_nifti``, ``_check_data_file``), then read (``_read_voxels``)
    while the compressed stream of its voxels, if it has one, is inflated in full beside the reader
    (``_inflated_size``), every error an ``InputError`` naming ``path`` and the reason; a 4D file of one time point
    comes back as the 3D volume it holds (``as_3d``). ``what`` names the file in the messages ("image", "label map");
    ``notes``, when given, gets a line when a 3D file's header gives no orientation (``_unoriented_note``), or a
    NIfTI's qform and sform disagree or ITK could not follow its sform (``_forms_note``), or a NRRD or MetaImage file
    holds a slice or more beyond its voxels (``_check_data_file``)."""
    with contextlib.suppress(OSError):  # the readers below say why a file cannot be opened
        if path.stat().st_size == 0:  # MetaIO prints lines of its own; ITK says it finds no reader for an empty NRRD
            raise InputError(f"{path}: empty file (0 bytes)")
    nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    layout, gz = _check_nifti(path, what) if nifti else (None, False)
    # ITK reads the voxels of a gzip or zlib stream that is damaged (a byte flipped: half the voxels other values) or
    # of another size than its header gives without a word: the stream is inflated beside the reader, its checksums
    # checked, on another core (for 157 MB of voxels about 0.3 s more on two cores, 0.9 s one after the other)
    metaimage = path.suffix.lower() in (".mha", ".mhd")
    header = None if nifti else _header_fields(path, metaimage)
    if nifti:
        stream = _Stream(path, 0, 0, layout.offset + layout.voxel_bytes, False, layout.offset,
                         _float_voxels(layout)) if gz else None
    else:
        stream = _check_data_file(path, metaimage, header, notes)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        inflating = pool.submit(_inflated_size, stream) if stream else None
        try:
            image, failed = _read_voxels(path, what, layout, gz, metaimage), None
        except InputError as err:
            image, failed = None, err
    # a stream's fault is the truer reason of a failed read too (ITK: "unreadable image", or memory for a wrong size)
    if stream and (fault := _inflated_size_fault(path, what, stream, *inflating.result())):
        raise InputError(fault) from None
    if failed:
        raise failed
    image = as_3d(image)  # a volume stored as the one time point of a 4D file has the same header to note
    if notes is not None and image.GetDimension() == 3 and (
            note := _forms_note(path, image) if nifti else _unoriented_note(header, metaimage)):
        notes.append(note)
    return image


def _read_voxels(path: Path, what: str, layout: _NiftiLayout | None, gz: bool, metaimage: bool) -> sitk.Image:
    """``_read_file``'s reading: a NIfTI (``layout`` given; ``gz`` compressed) by nibabel when it is NIfTI-2, a slab at
    a time when it is a 3D float64 NIfTI-1; another file by ``sitk.ReadImage`` (MetaImage's reader where
    ``metaimage``)."""
    if layout is not None and layout.version == 2:
        return _read_nifti2(path, what)
    if layout is not None and layout.float64_3d_nifti1:
        return _read_float64_nifti1(path, layout, gz)
    try:
        with itk_warnings(False):  # "unexpected scales in sform": said by the note or the error
            # ITK picks its reader by the suffix as written, and knows MetaImage's in lower case only
            return sitk.ReadImage(str(path), imageIO="MetaImageIO" if metaimage else "")
    except RuntimeError as err:
        if _out_of_memory(err):  # the file may be fine: the memory for its voxels is missing
            raise InputError(f"{path}: not enough memory to read this {what}"
                             f"{_voxels_needed(path, metaimage, file_holds=True)}") from None
        if layout is not None and (reason := _unreadable_nifti1_form(path)):
            raise InputError(f"{path}: {reason}") from None
        raise InputError(f"{path}: unreadable {what} ({_itk_reason(err)})") from None


def _unreadable_nifti1_form(path: Path) -> str | None:
    """Why ITK could not read NIfTI-1 file ``path``, when its header's forms are the reason: its only form is an sform
    whose axes are not perpendicular (a tilted gantry's, converted without resampling), which ITK refuses with "ITK only
    supports orthonormal direction cosines" (with a qform beside it, ITK reads the qform: ``_unfollowed_sform_note``).
    None otherwise."""
    try:
        header = _load_nifti(path).header
        sform, sform_code = header.get_sform(coded=True)
        qform_code = int(header["qform_code"])
    except Exception:  # a header nibabel cannot read: ITK's own reason stands
        return None
    if qform_code > 0 or not sform_code or _perpendicular(np.asarray(sform, dtype=float)[:3, :3]):
        return None
    return ("its axes are not perpendicular (a sheared grid, as from a tilted gantry: its sform is sheared and it has "
            "no qform); resample it onto a grid with perpendicular axes first")


def _read_float64_nifti1(path: Path, layout: _NiftiLayout, gz: bool) -> sitk.Image:
    """A 3D NIfTI-1 file of float64 voxels (as nibabel writes them by default) read as float32 a slab at a time, scaled
    by its slope and intercept, on the grid ITK reads from its header. ITK held two float64 copies of the voxels (3.5
    GB for 512 x 512 x 800) before the float32 copy labelling makes; this holds a float32 array and its copy in the
    image (1.7 GB). ``path`` has passed ``_check_nifti``, which gives its ``layout`` and whether it is ``gz``
    compressed; NaN and infinities (float64 values beyond float32 among them) are left for the readers' check of
    float32 voxels.
    """
    endian = layout.endian
    slope, intercept = layout.scaling
    if not np.isfinite(slope) or slope == 0:  # NIfTI: no scaling
        slope, intercept = 1.0, 0.0
    try:  # a gzip stream cut short or damaged (its size is no longer checked before: ``_inflated_size``)
        with (gzip.open if gz else open)(path, "rb") as f:
            f.read(layout.offset)
            voxels = np.empty(math.prod(layout.sizes), dtype=np.float32)  # x fastest: (z, y, x) in C order
            step = 1 << 21  # voxels (16 MB of float64) at a time
            with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, which the reader's check refuses
                for start in range(0, voxels.size, step):
                    count = min(step, voxels.size - start)
                    chunk = np.frombuffer(f.read(8 * count), dtype=endian + "f8")
                    voxels[start : start + count] = chunk * slope + intercept
    except (OSError, EOFError, zlib.error, ValueError):  # ValueError: fewer bytes than voxels
        raise InputError(f"{path}: truncated or corrupt compressed file" if gz else f"{path}: truncated file") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with itk_warnings(False):
        reader.ReadImageInformation()
    image = sitk.GetImageFromArray(voxels.reshape(layout.sizes[::-1]))
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    return image


class _DataFile(NamedTuple):
    """Where a NRRD or MetaImage header keeps its voxels, as the header gives it."""

    path: Path  # the header's own file (attached voxels) or the file it names
    offset: int  # bytes before the voxels in ``path``
    encoding: str  # "raw", "gzip" (NRRD), "compressed" (MetaImage) or another NRRD encoding
    compressed_size: int  # MetaImage's CompressedDataSize; 0 when not given


def _header_fields(path: Path, metaimage: bool) -> tuple[dict[str, str], int] | None:
    """The fields of a NRRD or MetaImage header (MetaImage: "Key = value" lines up to ElementDataFile, the last; NRRD:
    "key: value" lines up to an empty line), their keys in lower case without spaces, and the header's bytes; None for
    another file or one that cannot be read."""
    if path.suffix.lower() not in (".mha", ".mhd", ".nrrd", ".nhdr"):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None  # the reader says why
    # a detached MetaImage header read whole may end without a newline after ElementDataFile
    end = re.search(rb"^ElementDataFile *=[^\n]*(?:\n|\Z)" if metaimage and len(head) < 65536 else
                    rb"^ElementDataFile *=[^\n]*\n" if metaimage else rb"\r?\n\r?\n", head, re.MULTILINE)
    if end is None and (metaimage or len(head) == 65536):
        return None
    end = end.end() if end else len(head)  # a detached NRRD header may end without an empty line
    fields = {}
    for line in head[:end].decode("latin-1").splitlines():
        name, sep, value = line.partition("=" if metaimage else ":")
        if sep and not value.startswith("="):  # NRRD's "key:=value" pairs are no fields
            fields[name.strip().lower().replace(" ", "")] = value.strip()
    return fields, end


def _data_file(path: Path, metaimage: bool, header: tuple[dict[str, str], int]) -> _DataFile | None:
    """The voxels' file of NRRD or MetaImage file ``path``, by its ``header`` (``_header_fields``); None for a list or
    a numbered series of data files, or a header that skips bytes or lines or gives a header size: not followed here.

    Raises:
        InputError: a MetaImage data file name with a "%" that is no pattern of numbered files (which MetaIO crashes
            on), or a pattern whose first file is missing."""
    fields, end = header
    named = fields.get("elementdatafile" if metaimage else "datafile", "LOCAL")
    # MetaIO takes a name with a "%" for the printf pattern of numbered files, followed by the first, last and step
    # numbers, each optional (the first 1, the last the first plus the slices): given another (a byte of LOCAL damaged
    # into "%s", a file named "scan%20s.raw"), it crashed the process
    numbered = re.fullmatch(r"([^%]*%0?\d{0,3}[di][^%\s]*)((?: +-?\d+){0,3})", named) if metaimage else None
    if metaimage and "%" in named and not numbered:
        raise InputError(f"{path}: its ElementDataFile {named[:80]!r} holds a '%', which MetaImage takes for the "
                         "pattern of numbered voxel files (as 'slice%03d.raw 1 40 1'), and it is none: the header is "
                         "damaged, or its voxels file needs a name without '%'")
    # os.path.exists: a name too long for the file system is no OSError here
    if numbered and not os.path.exists(first := path.parent / (numbered[1] % int((numbered[2].split() or ["1"])[0]))):
        raise InputError(f"{path}: its voxels are in numbered files ({named[:80]!r}), the first of which, {first}, is "
                         "missing")
    # "LIST", and NRRD's "LIST 2" and MetaImage's "LIST 2D" (the dimension of each file of the list)
    if re.fullmatch(r"LIST( +\w+)?", named, re.IGNORECASE) or "%" in named or {
            "headersize", "byteskip", "lineskip"} & fields.keys():
        return None
    if metaimage:
        encoding = "compressed" if fields.get("compresseddata", "").lower() == "true" else "raw"
    else:
        encoding = {"gz": "gzip"}.get(fields.get("encoding", "").lower(), fields.get("encoding", "").lower())
    size = fields.get("compresseddatasize", "")
    attached = named.upper() == "LOCAL" or not named
    return _DataFile(path if attached else path.parent / named,  # a name with spaces is one file
                     end if attached else 0, encoding, int(size) if size.isdigit() else 0)


# the MetaImage fields of its grid: name, and the power of NDims that is their count of numbers. MetaIO reads a field
# garbled or a number short as zeros (an Offset "z-30 20 -100" put the scan at the origin without a word), or ITK
# refuses it with a bare number ("unreadable image (0 0 0)")
_METAIMAGE_GRID = {"dimsize": ("DimSize", 1), "offset": ("Offset", 1), "position": ("Position", 1),
                   "origin": ("Origin", 1), "elementspacing": ("ElementSpacing", 1), "elementsize": ("ElementSize", 1),
                   "transformmatrix": ("TransformMatrix", 2), "rotation": ("Rotation", 2),
                   "orientation": ("Orientation", 2)}


def _numbers(text: str, count: int, finite: bool = True) -> bool:
    """Whether ``text`` holds ``count`` numbers (finite ones unless not ``finite``), apart by white space."""
    values = text.split()
    try:
        return len(values) == count and all(math.isfinite(float(v)) or not finite for v in values)
    except ValueError:
        return False


def _metaimage_grid_fault(fields: dict[str, str]) -> str | None:
    """What is wrong with the grid fields of a MetaImage header's ``fields`` (``_header_fields``,
    ``_METAIMAGE_GRID``); None where nothing is."""
    ndims = fields.get("ndims", "")
    if not ndims.isdigit() or "dimsize" not in fields:
        return f"its NDims {ndims[:40]!r} is no whole number" if "dimsize" in fields else "it gives no DimSize"
    for key, (name, power) in _METAIMAGE_GRID.items():
        if key in fields and not _numbers(fields[key], int(ndims) ** power):
            return f"its {name} {fields[key][:60]!r} is not {int(ndims) ** power} numbers (NDims {ndims})"
    return None


def _nrrd_grid_fault(fields: dict[str, str]) -> str | None:
    """What is wrong with the grid fields of a NRRD header's ``fields`` (``_header_fields``): its dimension, sizes,
    spacings, space directions and space origin; None where nothing is. NRRD's reader takes a number by its first
    characters ("2y0" as 2, "3e" as 3: a scan put 18 mm off without a word) and passes over what follows."""
    dimension = fields.get("dimension", "")
    if not dimension.isdigit():
        return f"its dimension {dimension[:40]!r} is no whole number"
    count = int(dimension)
    sizes = fields.get("sizes", "").split()
    if len(sizes) != count or not all(size.isdigit() for size in sizes):
        return f"its sizes {fields.get('sizes', '')[:60]!r} are not {count} whole numbers (dimension {count})"
    if "spacings" in fields and not _numbers(fields["spacings"], count, finite=False):  # "nan": an axis of no space
        return f"its spacings {fields['spacings'][:60]!r} are not {count} numbers (dimension {count})"
    axes = re.findall(r"\([^()]*\)|\S+", fields.get("spacedirections", ""))  # "(1,0,0)" or "none" each
    vectors = [axis[1:-1].replace(",", " ") for axis in axes if axis.startswith("(")]
    length = len(vectors[0].split()) if vectors else None  # the space's dimension
    if "spacedirections" in fields and (len(axes) != count or len(vectors) + axes.count("none") != count
                                        or not all(_numbers(vector, length) for vector in vectors)):
        return f"its space directions {fields['spacedirections'][:80]!r} are not {count} vectors of numbers or none"
    origin = fields.get("spaceorigin", "")
    if origin and not (origin[:1] + origin[-1:] == "()" and _numbers(origin[1:-1].replace(",", " "),
                                                                     length or origin.count(",") + 1)):
        return f"its space origin {origin[:60]!r} is not a vector of numbers" + (
            f" as long as its space directions' ({length})" if length else "")
    return None


class _Stream(NamedTuple):
    """A compressed stream of voxels, to be inflated in full (``_inflated_size``)."""

    path: Path
    offset: int  # bytes before it in ``path``
    length: int  # its bytes (MetaImage's CompressedDataSize); 0: to the end of ``path``
    needed: int  # the bytes it must inflate to, by its header
    voxels_alone: bool  # it holds the voxels alone: it must inflate to ``needed`` exactly (a NIfTI holds its header,
    # and may hold bytes after its voxels)
    voxels_at: int = 0  # the inflated bytes before its voxels (a NIfTI's header)
    floats: np.dtype | None = None  # the type of its voxels where they are floats to be checked for NaN and infinities


def _check_data_file(path: Path, metaimage: bool, header: tuple[dict[str, str], int] | None,
                     notes: list[str] | None) -> _Stream | None:
    """NRRD and MetaImage: where the file that holds the voxels (the header's own, or the one it names, as ``.mhd``
    and ``.nhdr`` headers do) is missing or cut short, ITK says only that the file cannot be read, and MetaIO prints
    lines of its own first. Checked here from its ``header`` (``_header_fields``; None: not parsed here, the reader
    says why): a MetaImage's grid fields (``_metaimage_grid_fault``); a data file (``_data_file``) that is missing, or
    holds fewer bytes than its voxels take uncompressed (MetaImage compressed: than the compressed size its header
    gives). ``notes``, when given, gets a line when it holds a slice or more beyond its voxels uncompressed.

    Returns:
        The compressed stream of its voxels (a gzip NRRD's, a compressed MetaImage's), to be inflated beside the
        reader; None for none, or one not followed here.

    Raises:
        InputError: naming ``path`` and what is wrong.
    """
    if header is None:
        return None
    if fault := (_metaimage_grid_fault if metaimage else _nrrd_grid_fault)(header[0]):
        raise InputError(f"{path}: corrupt {'MetaImage' if metaimage else 'NRRD'} header: {fault}")
    data = _data_file(path, metaimage, header)
    if data is None:
        return None
    if not os.path.exists(data.path):
        raise InputError(f"{path}: its voxels are in {data.path}, which is missing")
    # MetaIO inflates the voxels of a compressed .mha whose header gives no CompressedDataSize into memory it has not
    # filled: it prints "Uncompress failed" and ITK hands back other voxels, without an error
    if data.encoding == "compressed" and not data.compressed_size and data.path == path:
        raise InputError(f"{path}: compressed MetaImage whose header gives no CompressedDataSize, which ITK's "
                         "MetaImage reader cannot inflate (it reads other voxels); add 'CompressedDataSize = "
                         f"{path.stat().st_size - data.offset}' (the bytes after the header) above ElementDataFile, or "
                         "save it again (SimpleITK writes it)")
    voxels = _header_voxels(path, metaimage)
    needed = {"compressed": data.compressed_size, "raw": voxels[2] if voxels else 0}.get(data.encoding, 0)
    held = data.path.stat().st_size - data.offset
    if needed and held < needed:
        what = "truncated file" if data.path == path else f"its voxels file {data.path} is truncated"
        raise InputError(f"{path}: {what} ({held + data.offset} of {needed + data.offset} bytes)")
    # ITK reads the voxels the header gives and leaves the rest: a slice or more left over is a slice count or a voxel
    # type the header gives wrong more often than something appended (a slice short, or int16 voxels as uint8)
    slice_bytes = needed // voxels[0][2] if voxels and len(voxels[0]) > 2 else needed
    if notes is not None and data.encoding == "raw" and needed and held - needed >= slice_bytes:
        holds = "the file holds" if data.path == path else f"its voxels file {data.path} holds"
        notes.append(f"{holds} {held - needed} bytes beyond the {needed} of the voxels its header gives (a slice or "
                     "more, left unread): if the header's size or voxel type is wrong, the image was read wrong")
    if data.encoding not in ("gzip", "compressed") or voxels is None:
        return None
    return _Stream(data.path, data.offset, data.compressed_size, voxels[2], True)


def _inflated_size(stream: _Stream) -> tuple[int | None, bool]:
    """The bytes ``stream`` inflates to: a zlib stream (MetaImage's), or gzip members one after another (bytes after
    the last that begin none are no part of it); None where it cannot be inflated to its end, its checksums included
    (corrupt or cut short). With it, whether its float voxels (``stream.floats``; True without) are all finite."""
    left = stream.length or math.inf
    inflater, size = zlib.decompressobj(32 + zlib.MAX_WBITS), 0  # gzip or zlib, by its first bytes
    finite, cut = True, b""  # ``cut``: the first bytes of a voxel that the last piece inflated ended within
    try:
        with open(stream.path, "rb") as f:
            f.seek(stream.offset)
            data = b""
            while True:
                if not data and left > 0 and (data := f.read(int(min(_PIECE, left)))):
                    left -= len(data)
                if not data:
                    return None, finite  # the stream ends before its end
                piece = inflater.decompress(data, _PIECE)
                if stream.floats is not None and finite:
                    within = slice(max(stream.voxels_at - size, 0), max(stream.needed - size, 0))
                    voxels = cut + piece[within] if cut else memoryview(piece)[within]
                    whole = len(voxels) // stream.floats.itemsize
                    finite = _all_finite(np.frombuffer(voxels, stream.floats, count=whole))
                    cut = bytes(voxels[whole * stream.floats.itemsize :])
                size += len(piece)
                data = inflater.unconsumed_tail
                if inflater.eof:
                    more = f.read(int(min(2, left)))  # not past its length
                    left -= len(more)
                    data = inflater.unused_data + more
                    if not data.startswith(b"\x1f\x8b"):  # no gzip member follows
                        return size, finite
                    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
    except (OSError, zlib.error):
        return None, finite


def _inflated_size_fault(path: Path, what: str, stream: _Stream, size: int | None, finite: bool) -> str | None:
    """What is wrong with ``stream`` of ``what`` file ``path`` ("image", "label map"), inflated to ``size`` bytes with
    its float voxels ``finite`` or not (``_inflated_size``)."""
    if size is None or (size < stream.needed and not stream.voxels_alone):
        return (f"{path}: truncated or corrupt compressed file" if stream.path == path else
                f"{path}: its voxels file {stream.path} is truncated or corrupt (compressed)")
    if stream.voxels_alone and size != stream.needed:
        return (f"{path}: its header gives voxels of {stream.needed} bytes, and its compressed voxels inflate to "
                f"{size} bytes: the header's size or pixel type is wrong")
    return None if finite else f"{path}: {what} holds NaN or infinite values"


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether an ITK exception says that the memory for an image could not be allocated (ITK's "Failed to allocate
    memory for image.", or a C++ std::bad_alloc)."""
    return "Failed to allocate memory" in str(err) or "bad_alloc" in str(err)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def axes_text(values, spec: str = "") -> str:
    """Numbers along the axes as a message gives a size, spacing or extent: ``64 x 64 x 1``, each formatted by
    ``spec`` (``".3g"``; "" as ``str``)."""
    return " x ".join(format(v, spec) for v in values)


# how a grid's fields are named to a user: words, unit, number format
_GRID_WORDS = {"size": ("size", " voxels", ".0f"), "spacing": ("voxel size", " mm", ".6g"),
               "origin": ("origin", " mm (LPS)", ".2f"), "direction": ("axis directions", "", ".3f")}


def grid_difference(given: Geometry, other: Geometry, others: str) -> str:
    """What differs between grid ``given`` and grid ``other``, in words and millimetres, ``others`` naming the second
    (``"the labelling's"``): a user reads it, so no Python repr of the two grids."""
    def numbers(grid: Geometry, field: str) -> str:
        _, unit, spec = _GRID_WORDS[field]
        values = [format(float(v) + 0.0, spec) for v in getattr(grid, field)]
        if field == "direction":  # row-major 3x3: its columns are the directions of the i, j and k axes (LPS)
            return ", ".join(f"{axis} ({', '.join(values[c::3])})" for c, axis in enumerate("ijk"))
        return axes_text(values) + unit

    return "; ".join(f"{_GRID_WORDS[field][0]} {numbers(given, field)} against {others} {numbers(other, field)}"
                     for field in given.differences(other))


# the most that deflate (gzip, zlib) compresses: about 1032 bytes into 1
_MAX_DEFLATE_RATIO = 1032


def _header_voxels(path: Path, metaimage: bool) -> tuple[tuple[int, ...], str, int] | None:
    """The voxels the header of image file ``path`` gives: size (x, y, z ...), pixel type (as ITK names it) and
    bytes; None where the header cannot be read."""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        if metaimage:
            reader.SetImageIO("MetaImageIO")
        with itk_warnings(False):
            reader.ReadImageInformation()
        pixel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    except Exception:
        return None
    size = reader.GetSize()
    itemsize = sitk.GetArrayViewFromImage(pixel).itemsize * reader.GetNumberOfComponents()
    return size, pixel.GetPixelIDTypeAsString(), math.prod(size) * itemsize


def _voxels_needed(path: Path, metaimage: bool, slices: int = 1, file_holds: bool = False) -> str:
    """`` (X x Y x Z voxels of TYPE: N GB)`` from the header of image file ``path``, its last axis ``slices`` times as
    long (a DICOM series of that many files, one slice each); "" where it cannot be read. With ``file_holds``, and
    ``path`` a file that holds its voxels (``.nrrd``, ``.mha``), what its size says when it is too small to hold them
    even deflated (bzip2, which a NRRD may use, can compress more): a 1 KB file whose header gives 100000^3 voxels was
    said to need memory only."""
    voxels = _header_voxels(path, metaimage)
    if voxels is None:  # the header cannot be read either: the reason stands without the figures
        return ""
    size, pixel_type, nbytes = voxels
    size, nbytes = (*size[:-1], size[-1] * slices), nbytes * slices
    small = ""
    if file_holds and path.suffix.lower() in (".nrrd", ".mha"):
        with contextlib.suppress(OSError):
            if (held := path.stat().st_size) * _MAX_DEFLATE_RATIO < nbytes:
                small = (f"; but the file holds only {held} bytes, too few for those voxels compressed as gzip "
                         "compresses: its header's size may be wrong, or the file truncated")
    return f" ({axes_text(size)} voxels of {pixel_type}: {_gb(nbytes)}){small}"


def _itk_reason(err: RuntimeError) -> str:
    """The line of an ITK exception's many that says what went wrong, without the addresses of ITK's objects."""
    lines = str(err).strip().splitlines()
    # NRRD: ITK's line says only "Error reading FILE"; teem's lines below it give its reasons, the innermost last
    # ('[nrrd] _nrrdReadNrrdParse_type: couldn't parse type "shrot"'), after lines of "trouble reading ..."
    teem = [reason for line in lines if line.startswith("[nrrd] ") and
            (reason := re.sub(r"^\[nrrd\] \w+:", "", line).strip()) and not reason.startswith("trouble")]
    if teem:
        return f"NRRD: {'; '.join(teem[-2:])}"[:200]
    line = next((line for line in lines if "rror" in line or "annot" in line), lines[-1] if lines else "")
    return re.sub(r"\(0x[0-9a-fA-F]+\)", "", line).strip().rstrip(":")[:200]


def _given_path(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``, refused when empty (which would name the current folder) or when its name is not
    valid UTF-8 (ITK's readers abort the whole process on such a name).

    Raises:
        InputError: either of those.
    """
    if not os.fspath(path):
        raise InputError("no file given (an empty path)")
    p = Path(path)
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{p}: the file name is not valid UTF-8, which the image readers cannot open; rename "
                         "it") from None
    return p


def _missing_reason(path: Path) -> str:
    """Why ``path``, which does not exist as a file or folder, cannot be read: a link that leads back to itself (a
    loop of links), a link to a missing file, or nothing there."""
    if not path.is_symlink():
        return "no such file or folder"
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a link that leads back to itself (a loop of links)"
    try:
        return f"a link to {os.readlink(path)}, which does not exist"
    except OSError:
        return "a link to a file that does not exist"


def read_label_map(path: str | os.PathLike) -> sitk.Image:
    """Read and check a label map (a reference or predicted vertebra mask).

    Returns:
        A 3D scalar image of integer voxels, 0 or more, geometry untouched (a 4D map of one time point as 3D). A
        float map whose values are all whole numbers is cast to uint16.

    Raises:
        InputError: missing, unreadable or truncated file, not 3D scalar, values that are negative, NaN, not whole or
            above 65535.
    """
    p = _given_path(path)
    if not p.is_file():
        raise InputError(f"{p}: {'no such file' if p.exists() else _missing_reason(p)}")
    image = _read_file(p, "label map")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p}: not a 3D scalar label map")
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind not in "uif":
        raise InputError(f"{p}: label map of {image.GetPixelIDTypeAsString()} voxels; integers are needed")
    if values.dtype.kind == "f" and not _all_finite(values):
        raise InputError(f"{p}: label map holds NaN or infinite values")
    if values.dtype.kind == "f" and (values != np.round(values)).any():
        raise InputError(f"{p}: label map holds values that are not whole numbers")
    if values.size and values.min() < 0:
        raise InputError(f"{p}: label map holds negative values")
    if values.dtype.kind == "f":
        if values.size and values.max() > np.iinfo(np.uint16).max:
            raise InputError(f"{p}: label map holds values above {np.iinfo(np.uint16).max}")
        image = sitk.Cast(image, sitk.sitkUInt16)
    return image


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read and check a spine image.

    Args:
        path: NIfTI-1 or NIfTI-2 (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
            ``.mhd``) file, or a folder holding one DICOM series.

    Returns:
        A 3D scalar image, pixel type float32 or its original integer type, geometry untouched (but for a DICOM
        series from a tilted gantry, resampled onto a grid with perpendicular axes); voxel values as stored, scaled
        by the file's slope and intercept where it gives them (Hounsfield units for CT). What the user should know of
        how it was read (that resampling; a NIfTI file's disagreeing qform and sform, or an sform ITK could not
        follow) is kept with the image (``read_notes``), for ``label_spine`` to list among its warnings, and logged.

    Raises:
        InputError: missing path, unsupported extension, unreadable or truncated file, a NIfTI-1 file with a negative
            voxel size, not 3D (2D; 4D of more than one time point), not scalar (RGB, vector), empty, holding NaN/inf,
            on a sheared grid or axis directions that are not unit vectors, or of a size no body has
            (``checked_image``).
        TypeError: ``path`` is no ``str`` or ``os.PathLike`` (an image, a number).
    """
    p = _given_path(path)
    if not p.exists():
        raise InputError(f"{p}: {_missing_reason(p)}")
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise InputError(f"{p}: permission denied")
    notes: list[str] = []
    if p.is_dir():
        image = _read_dicom_folder(p, notes)
    elif not p.is_file():  # a pipe would be waited on for ever
        raise InputError(f"{p}: not a file (a pipe, socket or device) nor a folder")
    else:
        if not p.name.lower().endswith(IMAGE_SUFFIXES):
            with open(p, "rb") as file:
                if file.read(132)[128:] == b"DICM":  # the DICOM preamble's mark
                    raise InputError(f"{p}: a DICOM file; give the folder of its series ({p.parent})")
            raise InputError(f"{p}: unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM "
                             "folder")
        image = _read_file(p, "image", notes)
    image = checked_image(image, str(p))
    for note in notes:  # the user reads them among the labelling's warnings
        log.info("%s: %s", p, note)
    if notes:
        image.SetMetaData(_READ_NOTES_KEY, "\n".join(notes))
    elif image.HasMetaDataKey(_READ_NOTES_KEY):  # written into a NRRD or MetaImage file with an image read before
        image.EraseMetaData(_READ_NOTES_KEY)
    return image


def read_notes(image: sitk.Image) -> list[str]:
    """What ``read_image`` noted of how ``image`` was read (see there); [] for any other image. The notes are the
    image's metadata, which SimpleITK's filters (a crop, a cast, a resampling) do not carry to their outputs."""
    return image.GetMetaData(_READ_NOTES_KEY).split("\n") if image.HasMetaDataKey(_READ_NOTES_KEY) else []


def checked_image(image: sitk.Image, name: str = "image") -> sitk.Image:
    """The checks of ``read_image`` on an image already in memory; ``name`` (its file, or what it is) opens the
    messages.

    Returns:
        ``image``, a 4D image of one time point as 3D, a vector image of one component as scalar, float64 as float32.

    Raises:
        InputError: not 3D (2D; 4D of more than one time point), not scalar (RGB, vector, complex), a single slice,
            holding NaN/inf voxels or geometry, on a sheared grid, with axis directions that are not unit vectors (a
            scale in the direction matrix), or of a size no body has (spacing in the wrong units).
    """
    if image.GetNumberOfComponentsPerPixel() == 1 and "vector" in image.GetPixelIDTypeAsString():
        image = sitk.VectorIndexSelectionCast(image, 0)  # a vector of one component is the scalar image it holds
    if image.GetNumberOfComponentsPerPixel() != 1 or "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{name}: {image.GetPixelIDTypeAsString()} image (RGB, vector or complex); a scalar CT or MRI "
                         "volume is needed")
    image = as_3d(image)
    if image.GetDimension() != 3:
        raise InputError(f"{name}: {image.GetDimension()}D image; a 3D volume is needed")
    if min(image.GetSize()) < 2:
        raise InputError(f"{name}: image of {axes_text(image.GetSize())} voxels is a single slice, not a 3D "
                         "volume")
    if not np.isfinite([*image.GetSpacing(), *image.GetOrigin(), *image.GetDirection()]).all():
        raise InputError(f"{name}: its voxel size, origin or axis directions hold NaN or infinite values")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=SHEAR_TOLERANCE):
        if _perpendicular(direction):  # axes of other lengths: a MetaImage TransformMatrix can hold a scale, which
            # ITK keeps apart from the spacing
            lengths = ", ".join(f"{x:.4g}" for x in np.linalg.norm(direction, axis=0))
            raise InputError(f"{name}: its axis directions are not unit vectors (lengths {lengths}): the header's "
                             "direction matrix holds a scale that belongs in the voxel size, or cosines written with "
                             "too few decimals; write the sizes into the spacing and unit directions")
        raise InputError(f"{name}: its axes are not perpendicular (a sheared grid, as from a tilted gantry); "
                         "resample it onto a grid with perpendicular axes first")
    # a NIfTI's scaling, which the reader applies (slope 0: none); a cast to float32 keeps no metadata
    scaling = [image.GetMetaData(k) if image.HasMetaDataKey(k) else "" for k in ("scl_slope", "scl_inter")]
    if image.GetPixelID() == sitk.sitkFloat64:
        try:
            image = sitk.Cast(image, sitk.sitkFloat32)
        except RuntimeError as err:  # ITK's message: a file and line of its build, then "Failed to allocate ..."
            if not _out_of_memory(err):
                raise
            raise InputError(f"{name}: not enough memory to convert its float64 voxels to float32 "
                             f"({_gb(4 * math.prod(image.GetSize()))} more beside the "
                             f"{_gb(8 * math.prod(image.GetSize()))} it holds); save it as float32 to need "
                             "less") from None
    if image.GetPixelID() == sitk.sitkFloat32 and not _all_finite(sitk.GetArrayViewFromImage(image)):
        scaled = (f"; its header scales the stored values by {scaling[0]} (scl_slope) and adds {scaling[1]} "
                  "(scl_inter)" if scaling[0] not in ("", "0", "1") or scaling[1] not in ("", "0") else "")
        raise InputError(f"{name}: image holds NaN or infinite values (or float64 values beyond float32){scaled}")
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    if not MIN_EXTENT_MM <= extent.max() <= MAX_EXTENT_MM or np.sort(extent)[1] > MAX_SECOND_EXTENT_MM:
        raise InputError(f"{name}: a field of view of {axes_text(extent, '.3g')} mm (spacing "
                         f"{axes_text(image.GetSpacing(), '.3g')} mm) cannot be a scan of a body; "
                         "are the spacing's units in the header right?")
    return image


_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)  # of the unit cube


def canonical_grid(image: sitk.Image, spacing_mm: float | tuple[float, float, float]) -> sitk.Image:
    """An empty uint8 image on the model's grid covering ``image``: axes along L, P, S (the input's axes
    permuted and flipped to the closest of those, so an oblique input keeps its tilt), ``spacing_mm`` voxels.

    The resulting arrays are (z, y, x) = (inferior->superior, anterior->posterior, right->left).
    """
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    # Column c of d is the LPS direction of input axis c. Output axis a takes the input axis closest to LPS axis a.
    axis_of = np.argmax(np.abs(d), axis=1)
    if len(set(axis_of.tolist())) != 3:  # strongly oblique: fall back to the plain LPS axes
        new_d = np.eye(3)
    else:
        new_d = np.stack([d[:, axis_of[a]] * np.sign(d[a, axis_of[a]]) for a in range(3)], axis=1)
    size = np.asarray(image.GetSize(), dtype=float)
    in_spacing = np.asarray(image.GetSpacing(), dtype=float)
    lps = np.asarray(image.GetOrigin()) + (_CORNERS * (size - 1) * in_spacing) @ d.T  # the corner voxels' centres
    local = lps @ new_d  # coordinates along the new axes
    lo, hi = local.min(axis=0), local.max(axis=0)
    new_size = np.maximum(np.ceil((hi - lo) / spacing - 1e-6).astype(int) + 1, 1)
    grid = sitk.Image([int(s) for s in new_size], sitk.sitkUInt8)  # its geometry is all that is used
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection([float(x) for x in new_d.ravel()])
    grid.SetOrigin([float(x) for x in new_d @ lo])
    return grid


def extend_to_grid_ends(volume: np.ndarray, image: sitk.Image, grid: sitk.Image) -> None:
    """Give the planes of the model grid that lie beyond the scan (``canonical_grid`` rounds its extent up, by less than
    a model voxel) the values of the plane next to them, in place. Filled with the scan's minimum, such a plane read to
    the network as air beyond a body the scan cuts: the field of view's edge read as the body's (a short scan was then
    not extended by its mirror image there, ``pipeline.with_context``), depending on whether the scan's extent is a
    whole number of model voxels. ``volume``: float32 (z, y, x) on ``grid`` (``canonical_grid``), resampled from
    ``image``."""
    corners = _CORNERS * np.asarray(image.GetSize(), dtype=float) - 0.5  # the scan's outer voxel faces
    inside = np.array([grid.TransformPhysicalPointToContinuousIndex(image.TransformContinuousIndexToPhysicalPoint(
        [float(c) for c in corner])) for corner in corners])[:, ::-1]  # (corners, z y x)
    for axis, (first, last) in enumerate(zip(inside.min(axis=0), inside.max(axis=0))):
        n = volume.shape[axis]
        before, after = int(np.clip(np.ceil(first - 1e-6), 0, n - 1)), int(np.clip(np.floor(last + 1e-6), 0, n - 1))
        if before > after:
            continue
        index = [slice(None)] * 3
        for planes, source in ((slice(0, before), before), (slice(after + 1, n), after)):
            index[axis] = planes
            target = tuple(index)
            index[axis] = slice(source, source + 1)
            volume[target] = volume[tuple(index)]


def resample_to_grid(image: sitk.Image, grid: sitk.Image, *, label: bool = False, default: float = 0.0,
                     pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """Resample ``image`` onto the voxel grid of ``grid``.

    Args:
        image: any 3D image.
        grid: image whose size, spacing, origin and direction define the output grid.
        label: nearest-neighbour interpolation and the input's pixel type (for label maps); otherwise linear
            interpolation to ``pixel_type``.
        default: value outside ``image``.
        pixel_type: SimpleITK pixel type of a linear interpolation's output.
    """
    if label:
        return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, default, image.GetPixelID())
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, default, pixel_type)


def make_writable_folder(folder: str | os.PathLike) -> None:
    """Create ``folder`` (and its parents) and write and remove a file in it: what the outputs to come will need.

    Raises:
        OSError: the folder cannot be made or written to (a permission test alone passes root, or a read-only mount),
            or is a link to nothing.
    """
    if Path(folder).is_symlink() and not Path(folder).exists():  # mkdir says only "File exists"
        raise FileNotFoundError(errno.ENOENT, f"a link to {os.readlink(folder)}, which does not exist")
    Path(folder).mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()


@contextlib.contextmanager
def no_empty_new_folders(*folders: str | os.PathLike) -> Iterator[None]:
    """Around work that writes into ``folders``: the folders of their paths that do not exist now and are empty when
    the block ends (it failed or was stopped before writing anything) are removed, innermost first; not one whose
    ``folder_lock`` another process holds (it is about to write into it)."""
    # os.path: False, not an error, for a name too long for the file system (refused with its reason by the work)
    created = sorted({p for folder in map(Path, folders) for p in (folder, *folder.parents) if not os.path.exists(p)},
                     key=lambda p: len(p.parts), reverse=True)
    try:
        yield
    finally:
        for path in created:
            if os.path.isdir(path) and not any(path.iterdir()):
                try:
                    fd, held = _lock(path, wait=False)
                except FileNotFoundError:
                    continue
                try:
                    if held is not False and not any(path.iterdir()):
                        path.rmdir()
                finally:
                    if fd is not None:
                        os.close(fd)


def _lock(folder: Path, wait: bool) -> tuple[int | None, bool | None]:
    """An open descriptor of ``folder`` and whether its ``flock`` is held: False when another holds it and ``wait`` is
    False; (None, None) where there is no lock to take (no ``flock``, the folder cannot be opened or its file system
    refuses the lock; the last two a warning where ``wait``). Closing the descriptor releases the lock.

    Raises:
        FileNotFoundError: ``folder`` does not exist, or was removed or replaced while its lock was awaited.
    """
    try:
        import fcntl
    except ImportError:
        return None, None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as err:
        _no_lock(folder, err, wait)
        return None, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                return fd, False
            log.info("waiting for another process writing into %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        locked, here = os.fstat(fd), os.stat(folder)
        if (here.st_dev, here.st_ino) != (locked.st_dev, locked.st_ino):
            raise FileNotFoundError(errno.ENOENT, "replaced while its lock was awaited", str(folder))
        return fd, True
    except FileNotFoundError:
        os.close(fd)
        raise
    except OSError as err:  # a file system without flock
        os.close(fd)
        _no_lock(folder, err, wait)
        return None, None


_NO_LOCK_SAID: set[Path] = set()  # the folders warned of, once per process: a run takes a folder's lock many times


def _no_lock(folder: Path, err: OSError, wait: bool) -> None:
    first = wait and folder not in _NO_LOCK_SAID
    if first:
        _NO_LOCK_SAID.add(folder)
    (log.warning if first else log.debug)(
        "no lock on %s (%s): another process writing into it at the same time is not kept apart", folder,
        err.strerror or err)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on the existing ``folder`` itself (``flock``; no lock file is made) for the
    block, so that two processes writing one set of files into it (two ``spinelabel label`` runs into one folder,
    two exports into one dataset) take turns instead of interleaving their renames. A folder removed while this
    waited (the run before failed, and ``no_empty_new_folders`` removed the empty folder it had made) is made again.
    No lock where there is no ``flock`` (Windows), the folder cannot be opened or its file system refuses the lock:
    the block runs as before. On NFS the lock holds among the processes of one machine only. Not re-entrant: a
    process taking it again for the same folder waits for itself."""
    fd = None
    for _ in range(3 if Path(folder).is_dir() else 0):  # a few tries: not forever where the folder keeps changing
        try:
            fd, _held = _lock(Path(folder), wait=True)
            break
        except FileNotFoundError:
            Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


@contextlib.contextmanager
def write_errors_named(final: str | os.PathLike) -> Iterator[None]:
    """Around the write of ``final`` (under its temporary name): an ``OSError`` that does not name it (a full disk
    gives "[Errno 28] No space left on device" alone), or a writer's ``RuntimeError`` (torch's "unexpected pos"),
    is raised again as an ``OSError`` that does."""
    try:
        yield
    except OSError as err:
        if str(final) in str(err):
            raise
        if err.errno is None:  # PIL's "encoder error -2": not "[Errno None] cannot write ..."
            raise OSError(f"cannot write {final}: {err}") from err
        raise OSError(err.errno, f"cannot write {final}: {err.strerror or err}") from err
    except RuntimeError as err:  # SimpleITK's and torch's failed writes, which say nothing of a full disk
        try:
            free = f" ({shutil.disk_usage(Path(final).parent).free / 1e6:.1f} MB free on its file system)"
        except OSError:
            free = ""
        raise OSError(f"cannot write {final}: {err}{free}") from err


def write_nifti(voxels: np.ndarray, geometry: Geometry, path: str | os.PathLike, description: str = "") -> None:
    """Write ``voxels`` (a (z, y, x) array of one value per voxel, any dtype NIfTI-1 holds) on ``geometry``'s grid
    as NIfTI-1 at ``path`` (its voxel-to-RAS mm affine as qform and sform, units mm; ``description`` in the header,
    at most 80 bytes, which ITK reads as ``ITK_FileNotes``), by nibabel: ITK's NIfTI writer reports a full disk on
    stderr only and returns as if it had written the file.

    Raises:
        OSError: the write failed.
    """
    affine = geometry.ijk_to_ras()
    # voxels.T is an (i, j, k) view of the (z, y, x) array: nibabel writes it slice by slice, without a copy
    image = nibabel.Nifti1Image(voxels.T, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)  # scanner coordinates, in both the quaternion and the matrix form
    image.set_sform(affine, code=1)
    image.header["descrip"] = description.encode()[:80]
    nibabel.save(image, path)


def write_image(image: sitk.Image, path: str | os.PathLike, final: str | os.PathLike | None = None,
                notes: str = "") -> None:
    """Write a 3D image of one value per voxel at ``path``: NIfTI (``.nii``, ``.nii.gz``) by ``write_nifti``, with
    ``notes`` as its description (not the image's own ``ITK_FileNotes``, which may be those of the file it was read
    from: an export of a phantom read from its file would say it is a phantom), any other format ITK writes
    (``.nrrd``, ``.mha`` ...) by ITK, compressed, with the image's metadata.

    Raises:
        OSError: the write failed; the message names ``final`` (the name ``path`` is to be renamed to) or ``path``.
    """
    try:
        if str(path).lower().endswith((".nii", ".nii.gz")):
            write_nifti(sitk.GetArrayViewFromImage(image), Geometry.of(image), path, notes)
        else:
            sitk.WriteImage(image, str(path), True)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {final or path}: {err.strerror or err}") from None
    except RuntimeError as err:  # ITK's, which say nothing of a full disk: the free space says it
        try:
            free = f" ({shutil.disk_usage(Path(path).parent).free / 1e6:.1f} MB free on its file system)"
        except OSError:
            free = ""
        raise OSError(f"cannot write {final or path}: {_itk_reason(err).replace(str(path), 'it')}{free}") from None


def _new_file_beside(final: Path, suffix: str) -> Path:
    """Create an empty file ``.tmp{suffix}`` in a new hidden folder ``.spinelabel-XXXXXXXX.tmp`` of ``final``'s
    folder (``tempfile.mkdtemp``), with the permissions the process's umask gives a new file at this moment
    (``tempfile.mkstemp`` would make it private). In a folder of its own, the file of a process killed while writing
    it is none of the folder's files: nnU-Net v2 counts the files of ``imagesTr/`` by their ending, hidden ones
    included, and took one for a case."""
    folder = None
    try:
        folder = Path(tempfile.mkdtemp(prefix=".spinelabel-", suffix=".tmp", dir=final.parent))
        path = folder / f".tmp{suffix}"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise OSError(err.errno, f"cannot write {final}: {err.strerror or err}") from None
    return path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it to ``final``, on error remove it.

    The temporary is hidden and keeps ``final``'s extensions (``.tmp.nii.gz``) so that format-sniffing writers work,
    and its length does not grow with ``final``'s name. It lies in a hidden folder of its own in ``final``'s folder
    (``.spinelabel-XXXXXXXX.tmp/``, removed after), so that a process killed while writing leaves no file in
    ``final``'s folder for a reader that lists its files by ending (nnU-Net); the rename to ``final`` stays within one
    file system. Nobody ever sees a half-written ``final``. A ``final`` that exists and is not a file (a folder) is
    refused before anything is written: the rename onto it would fail only after the work, and after
    ``atomic_paths`` had renamed the files before it.

    Raises:
        IsADirectoryError: ``final`` exists and is not a file.
    """
    final = Path(final)
    if final.exists() and not final.is_file():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {final}: it is a folder (or another non-file); remove it "
                                              "or write elsewhere")
    # lower case: writers tell the format by the extension, and nibabel writes ".Nii.Gz" under another name
    suffix = ("".join(final.suffixes[-2:]) if final.name.lower().endswith((".nii.gz", ".seg.nrrd", ".mrk.json"))
              else final.suffix).lower()
    tmp = _new_file_beside(final, suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:  # with anything a writer put beside its file
        shutil.rmtree(tmp.parent, ignore_errors=True)


_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold back the Python handlers of Ctrl-C, SIGTERM and SIGHUP (``KeyboardInterrupt``, the command line's
    ``_Terminated``) for the block, and run the first one that arrived once it ends. Only in the main thread, where
    Python runs its signal handlers; a signal left to the system (default or ignored) is not touched."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, object]] = []
    previous = {}
    for sig in _DEFERRED_SIGNALS:
        handler = signal.getsignal(sig)
        if callable(handler):
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signum, frame = caught[0]
            previous[signum](signum, frame)


@contextlib.contextmanager
def atomic_paths(finals: list[str | os.PathLike]) -> Iterator[list[Path]]:
    """``atomic_path`` for several files, all or nothing: yield a temporary path beside each of ``finals``; when the
    block succeeds all are renamed to their final names. If anything fails, the temporaries are removed and so is any
    final file this call had already put in place, and the error is raised. The one gap: when earlier files are being
    replaced and a rename fails (a rename within one folder fails only if the folder goes away), the files renamed by
    then stay new and the others old. Ctrl-C, SIGTERM or SIGHUP arriving during the renames takes effect once they
    are all done (in the main thread, where Python runs signal handlers), so it cannot leave that mix either."""
    finals = [Path(p) for p in finals]
    existed = {p for p in finals if p.exists()}
    deferred = contextlib.ExitStack()
    try:
        with deferred:
            with contextlib.ExitStack() as stack:
                temps = [stack.enter_context(atomic_path(p)) for p in finals]
                yield temps
                deferred.enter_context(_signals_deferred())  # the renames, as the stack unwinds, are not split
    except BaseException:
        for p in finals:
            if p not in existed:
                p.unlink(missing_ok=True)
        raise
