"""The result of labelling one spine image: what every writer, the CLI and the Slicer logic consume."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field, replace

import numpy as np

from .vertebrae import BY_NAME, Level

__all__ = ["Geometry", "Vertebra", "SpineLabeling", "nonzero_box", "zeros_on_demand"]

_ON_DEMAND_BYTES = 1 << 24  # arrays from 16 MB: a label volume on a scan's input grid


def zeros_on_demand(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array (as ``np.zeros``) of at least 16 MB in memory of its own that the system gives a page at a time
    as it is written (an anonymous map): the pages never written, most of a label volume outside the spine, take no
    memory, and all of it goes back to the system when the array is freed. ``inference.reuse_freed_memory`` makes
    every ``np.zeros`` come from a heap that keeps freed memory, where an array as large as the input takes freshly
    faulted memory or whole reused pages; on the 512x512x1800 phantom the input-grid label volumes so placed raised the
    peak above 3 GB. Smaller arrays are ``np.zeros``."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < _ON_DEMAND_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: np.zeros
        return np.zeros(shape, dtype=dtype)
    # private: a shared anonymous map gets a page for every page read, even one never written
    try:
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as err:  # as np.zeros says it
        raise MemoryError(f"cannot allocate {nbytes / 1e9:.2f} GB for an array of shape {tuple(shape)} and type "
                          f"{dtype} ({err.strerror or err})") from None
    if hasattr(memory, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)  # 4 kB pages: a 2 MB page would be resident for one voxel written
    return np.frombuffer(memory, dtype=dtype).reshape(shape)  # writable; the map is closed with the last view


def nonzero_box(array: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) holding every non-zero element of ``array`` (any shape and dtype), or
    None when there is none. Found from one projection per axis: on the 512x512x800 benchmark's label map 0.04 s,
    where ``ndimage.find_objects`` takes 0.33 s."""
    box = []
    for axis in range(array.ndim):
        hits = np.flatnonzero(array.any(axis=tuple(a for a in range(array.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of an image as ITK defines it.

    Attributes:
        size: number of voxels along (i, j, k), i.e. (x, y, z).
        spacing: voxel size in mm along (i, j, k).
        origin: physical position of voxel (0, 0, 0) in LPS mm.
        direction: 3x3 direction cosines, row-major as ``sitk.Image.GetDirection()`` returns them.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image) -> "Geometry":
        """Geometry of a ``SimpleITK.Image``."""
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(s) for s in image.GetOrigin()),
            tuple(float(s) for s in image.GetDirection()),
        )

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (..., 3) in (i, j, k) = (x, y, z) order, not the (z, y, x) of numpy arrays, any
        real dtype -> LPS mm (..., 3), float64."""
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        return np.asarray(self.origin) + (np.asarray(ijk, dtype=float) * np.asarray(self.spacing)) @ d.T

    def ijk_to_ras(self) -> np.ndarray:
        """float64 (4, 4) matrix from voxel indices (i, j, k, 1) to RAS mm (the world of NIfTI and of Slicer's
        scene)."""
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        matrix = np.eye(4)
        matrix[:3, :3] = d * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix  # LPS -> RAS: L and P change sign

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """LPS mm (..., 3), any real dtype -> continuous voxel indices (..., 3), float64, in (i, j, k) = (x, y, z)
        order, not the (z, y, x) of numpy arrays."""
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)  # its inverse, not its transpose: cosines written
        # with a few decimals are not quite orthonormal (io.SHEAR_TOLERANCE)
        return np.linalg.solve(d, (np.asarray(lps, dtype=float) - np.asarray(self.origin))[..., None])[..., 0] / \
            np.asarray(self.spacing)

    def matches(self, other: "Geometry") -> bool:
        """Same grid: no ``differences``."""
        return not self.differences(other)

    def differences(self, other: "Geometry") -> list[str]:
        """The fields of this grid that differ from ``other``'s, of "size", "spacing", "origin" and "direction": sizes
        unequal; spacing, origin (mm) and direction unequal beyond the rounding of file formats."""
        return [name for name, same in (("size", tuple(self.size) == tuple(other.size)),
                                        ("spacing", np.allclose(self.spacing, other.spacing, atol=1e-3)),
                                        ("origin", np.allclose(self.origin, other.origin, atol=1e-2)),
                                        ("direction", np.allclose(self.direction, other.direction, atol=1e-3)))
                if not same]

    def as_dict(self) -> dict:
        return {"size": list(self.size), "spacing_mm": list(self.spacing), "origin_lps_mm": list(self.origin),
                "direction": list(self.direction)}


@dataclass
class Vertebra:
    """One labelled vertebra.

    Attributes:
        id: component id, the value of this vertebra's voxels in ``SpineLabeling.components``; stable across
            re-solves.
        name: level name (``"L1"``); ``label``/``level`` follow from it.
        centroid_lps_mm: vertebral-body centroid, LPS mm (of the arch, for the arch of a vertebra whose body lies
            above the view).
        volume_ml: volume of the whole vertebra (body + posterior elements), millilitres.
        confidence: posterior probability (0-1) of ``name`` under the sequence model.
        level_log_scores: per-level log-likelihood of this component, float64 of length ``len(LEVELS)`` in
            ``LEVELS`` order; what the sequence model re-solves from.
        fixed: True when a user fixed this label; it is then kept in every re-solve.
        confidence_log_scores: the evidence the confidences are read from when it differs from
            ``level_log_scores`` (a short view read twice: the mean of both readings), same layout; else None.
    """

    id: int
    name: str
    centroid_lps_mm: tuple[float, float, float]
    volume_ml: float
    confidence: float
    level_log_scores: np.ndarray
    fixed: bool = False
    confidence_log_scores: np.ndarray | None = None

    @property
    def level(self) -> Level:
        return BY_NAME[self.name]

    @property
    def label(self) -> int:
        return self.level.label


@dataclass
class SpineLabeling:
    """Vertebrae found in one image, on the image's own grid.

    Attributes:
        geometry: the input image's grid.
        components: int16 array (z, y, x) on the input grid; 0 background, otherwise the ``Vertebra.id`` of the
            vertebra (body and posterior elements) the voxel belongs to. A read-only view of the array given: the
            labellings that ``relabel`` and the edits return share it (an edit of voxels makes a new array).
        vertebrae: the vertebrae, cranial to caudal (chain order).
        gaps_mm: centroid distance between each pair of consecutive vertebrae in chain order (len n-1).
        warnings: every plain-language warning about this scan ("no sacrum found: ...").
        sequence_warnings: the part of ``warnings`` that the sequence model wrote (replaced on each re-solve).
        model: ``{"name": ..., "version": ...}`` of the network that made it.
        timings_s: seconds per stage.
        source: where the image came from (path), for reports.
        modality: "CT" or "MR" as detected or given.
        spine_probability: median vertebral-body probability of the vertebra-like components the network found that
            the field of view leaves whole (all of them when it cuts every one), the figure the spine gate
            (``pipeline.is_spine``) judges; None when no component was found.
        orientation_margin: how much more decisively the level head names the vertebrae with the image turned head
            to feet (``features.level_sharpness``, turned minus as read); None when not checked.
        removed_up_to: the highest id of the vertebrae that edits removed (0: none), so that an added vertebra never
            takes the id of a deleted one (edit logs and Slicer segment IDs name vertebrae by id).
        sacral_pieces: the pieces of the sacrum the network left below S1, in chain order, the one next to S1 first
            (their voxels are the S1 vertebra's), each ``{"centroid_lps_mm": [3 floats], "level_log_scores":
            [len(LEVELS) floats], "confidence_log_scores": [len(LEVELS) floats] or None}``: evidence the chain was
            solved with, which ``relabel`` solves with again while the last vertebra is still ``sacral_pieces_below``.
        sacral_pieces_below: the id of the vertebra the sacral pieces lie below (0: none).

    Raises:
        ValueError: ``components`` of a dtype that is no integer.
    """

    geometry: Geometry
    components: np.ndarray
    vertebrae: list[Vertebra]
    gaps_mm: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sequence_warnings: list[str] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    source: str = ""
    modality: str = ""
    spine_probability: float | None = None
    orientation_margin: float | None = None
    removed_up_to: int = 0
    sacral_pieces: list[dict] = field(default_factory=list)
    sacral_pieces_below: int = 0

    def __post_init__(self) -> None:
        if not np.issubdtype(self.components.dtype, np.integer):
            raise ValueError(f"components: an integer array of vertebra ids, not {self.components.dtype}")
        self.components = self.components.view()  # a read-only view: the caller's own array stays writable
        self.components.flags.writeable = False

    def __setstate__(self, state: dict) -> None:
        """Unpickling and ``copy.deepcopy`` (which skip ``__post_init__``): the components stay read-only."""
        self.__dict__.update(state)
        self.__post_init__()

    def label_map(self) -> np.ndarray:
        """VerSe label map, uint8 (z, y, x) on the input grid.

        Raises:
            ValueError: a negative component id.
        """
        out = zeros_on_demand(self.components.shape, np.uint8)
        box = nonzero_box(self.components)
        if box is None:
            return out
        ids = self.components[box]
        if ids.min() < 0:  # it would index the table from its end
            raise ValueError(f"components: vertebra ids are 0 or more, not {int(ids.min())}")
        lut = np.zeros(int(ids.max()) + 1, dtype=np.uint8)
        for v in self.vertebrae:
            if v.id < lut.size:
                lut[v.id] = v.label
        # a slab at a time: lut[...] of the whole box would be a second uint8 copy of it
        target = out[box]
        step = max(1, _ON_DEMAND_BYTES // max(1, ids[0].size))  # 16 MB of labels a slab
        for z in range(0, ids.shape[0], step):
            target[z : z + step] = lut[ids[z : z + step]]
        return out

    def by_id(self, vertebra_id: int) -> Vertebra:
        for v in self.vertebrae:
            if v.id == vertebra_id:
                return v
        raise KeyError(f"no vertebra with id {vertebra_id}")

    def copy(self, **changes) -> "SpineLabeling":
        """Shallow copy with fresh Vertebra records (the component array is shared, never modified in place)."""
        fresh = [replace(v) for v in self.vertebrae]
        changes.setdefault("vertebrae", fresh)
        changes.setdefault("warnings", list(self.warnings))
        changes.setdefault("gaps_mm", list(self.gaps_mm))
        changes.setdefault("sequence_warnings", list(self.sequence_warnings))
        return replace(self, **changes)

