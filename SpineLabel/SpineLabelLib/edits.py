"""User corrections of a labelling: rename, lock, move, delete and add vertebrae.

Every function takes a :class:`~SpineLabelLib.result.SpineLabeling`, never modifies it (nor its component
array), and returns a new one whose labels were re-solved by :func:`SpineLabelLib.sequence.relabel`: the vertebrae
a user fixed keep their names and every other name, confidence and sequence warning follows from them.

Chain order (cranial first) is recomputed from the centroids whenever a centroid moves or a vertebra is added:
the vertebra goes where it lengthens the centroid polyline least, so curved spines keep their order.

Coordinates are LPS millimetres; component arrays are int16 (z, y, x) on the input grid.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .io import as_3d, grid_difference
from .result import Geometry, SpineLabeling, Vertebra
from .sequence import relabel
from .vertebrae import LEVELS, level_index

__all__ = [
    "ADD_BOX_MM",
    "ADD_REACH_MM",
    "MOVE_REACH_MM",
    "rename",
    "set_locked",
    "move_point",
    "restore",
    "delete",
    "add_vertebra",
    "component_at",
    "check_image_grid",
]

log = logging.getLogger(__name__)

# Region-growing box of ``add_vertebra`` in a labelling without vertebrae: full extent along L, P and S in mm (a
# lumbar body is about 45 mm wide, 35 mm deep and 27 mm high; the box leaves room for the posterior elements without
# reaching the next level).
ADD_BOX_MM = (50.0, 50.0, 40.0)
# A grown region below this volume is not a vertebra (seed on a thin cortex, noise): a ball is used instead.
_MIN_GROWN_ML = 1.0
_FALLBACK_RADIUS_MM = 10.0
# Box about an added vertebra's point within which it takes the shape of its nearest labelled neighbour (full extent
# along L, P and S in mm): room for the transverse processes (a lumbar vertebra spans about 100 mm across), the
# spinous process (up to about 100 mm behind the body's centroid) and its slope down the thoracic spine.
SHAPE_BOX_MM = (150.0, 220.0, 110.0)
# A moved centroid marker stays within this distance of its own vertebra's voxels (mm): a better place for the
# centroid, not a vertebra elsewhere.
MOVE_REACH_MM = 15.0
# A vertebra is added within this distance of the centroid of an existing one (mm): one and a half lumbar pitches
# (``sequence.PRIORS.pitch_mm``), room for one missed level beside the chain, not a click elsewhere in the image.
ADD_REACH_MM = 55.0
# A vertebra is added between two others only where their gap is at least this many times the gaps beside them
# (``_no_room_between``): a missed vertebra leaves about twice its neighbours' gap, a click in the disc about one.
ROOM_FOR_MISSED = 1.5


def _fixed_names(result: SpineLabeling) -> dict[int, str]:
    return {v.id: v.name for v in result.vertebrae if v.fixed}


def _with_chain(result: SpineLabeling, vertebrae: list[Vertebra],
                components: np.ndarray | None = None) -> SpineLabeling:
    """Copy of ``result`` with the given vertebrae (in chain order), fresh gaps (mm, between consecutive
    ``centroid_lps_mm``), the ids of the vertebrae left out counted in ``removed_up_to``, and optionally new
    components (same dtype as ``result.components``: int16 (z, y, x) on the input grid)."""
    centroids = np.array([v.centroid_lps_mm for v in vertebrae], dtype=float).reshape(-1, 3)
    gaps = np.linalg.norm(np.diff(centroids, axis=0), axis=1).tolist() if len(vertebrae) > 1 else []
    kept = {v.id for v in vertebrae}
    removed = max([result.removed_up_to] + [v.id for v in result.vertebrae if v.id not in kept])
    changes: dict = {"vertebrae": vertebrae, "gaps_mm": [float(g) for g in gaps], "removed_up_to": removed}
    if components is not None:
        changes["components"] = components
    return result.copy(**changes)


def _insertion_position(chain: np.ndarray, point: np.ndarray) -> int:
    """Where ``point`` goes in a polyline of centroids: the position that lengthens it least.

    Args:
        chain: float (n, 3) centroids in chain order, LPS mm.
        point: float (3,) LPS mm.
    """
    n = chain.shape[0]
    if n == 0:
        return 0
    dist = np.linalg.norm(chain - point, axis=1)
    costs = [dist[0]]  # before the first
    for k in range(1, n):
        costs.append(dist[k - 1] + dist[k] - float(np.linalg.norm(chain[k] - chain[k - 1])))
    costs.append(dist[-1])  # after the last
    return int(np.argmin(costs))


def _insert_in_chain(vertebrae: list[Vertebra], new: Vertebra) -> list[Vertebra]:
    """``vertebrae`` (chain order, cranial first) with ``new`` inserted where it fits, their own order kept: beside a
    single vertebra by height (largest S first), else where it lengthens the centroid polyline least."""
    point = np.asarray(new.centroid_lps_mm, dtype=float)
    if len(vertebrae) == 1:
        pos = 0 if point[2] > vertebrae[0].centroid_lps_mm[2] else 1
    else:
        pos = _insertion_position(np.array([v.centroid_lps_mm for v in vertebrae], dtype=float).reshape(-1, 3), point)
    return vertebrae[:pos] + [new] + vertebrae[pos:]


def _solve(result: SpineLabeling) -> SpineLabeling:
    return relabel(result, _fixed_names(result))


def _voxel(result: SpineLabeling, point_lps) -> np.ndarray | None:
    """Index (i, j, k = x, y, z; int) of the voxel of ``result``'s grid nearest to ``point_lps`` (LPS mm), or None
    when that lies outside the grid.

    Raises:
        ValueError: a point that is not three finite numbers.
    """
    point = np.asarray(point_lps, dtype=float)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise ValueError(f"a point is three finite numbers (LPS mm), not {point_lps!r}")
    ijk = np.rint(result.geometry.lps_to_index(point)).astype(int)
    return ijk if np.all(ijk >= 0) and np.all(ijk < np.asarray(result.geometry.size)) else None


def component_at(result: SpineLabeling, point_lps: tuple[float, float, float]) -> int:
    """Component id under a point (0 for background or outside the grid).

    Args:
        result: the labelling whose ``components`` (int16, (z, y, x)) are looked up.
        point_lps: LPS position in mm.

    Raises:
        ValueError: a point that is not three finite numbers.
    """
    ijk = _voxel(result, point_lps)
    return 0 if ijk is None else int(result.components[tuple(ijk[::-1])])


def check_image_grid(result: SpineLabeling, image: sitk.Image | Geometry) -> sitk.Image | Geometry:
    """Raise ``ValueError`` unless ``image`` (or a grid) is the labelling's grid (size, spacing, origin, direction);
    return it, a 4D image of one time point as the 3D volume it holds (as ``label_spine`` reads it). ``TypeError`` for
    anything else than a ``SimpleITK.Image`` or a ``Geometry`` (a numpy array, a path)."""
    if isinstance(image, sitk.Image):
        image = as_3d(image)
    elif not isinstance(image, Geometry):
        raise TypeError(f"image must be the SimpleITK.Image that was labelled, not {type(image).__name__} (read a path "
                        "with io.read_image; an array has no grid)")
    g, h = image if isinstance(image, Geometry) else Geometry.of(image), result.geometry
    if not g.matches(h):
        difference = grid_difference(g, h, "the labelling's")
        raise ValueError("the image is not on the grid it was labelled on (moved, cropped or resampled since? label it "
                         f"again): {difference}")
    return image


def _release(result: SpineLabeling, name: str) -> None:
    """Unfix, in place, a vertebra of ``result`` fixed to ``name``: the latest correction takes the name."""
    for v in result.vertebrae:
        if v.fixed and v.name == name:
            log.info("vertebra %d loses its fixed name %s", v.id, name)
            v.fixed = False


def rename(result: SpineLabeling, vertebra_id: int, name: str, lock: bool = True) -> SpineLabeling:
    """Give a vertebra a level name and re-solve the others around it.

    Args:
        result: the labelling.
        vertebra_id: id of the vertebra to rename.
        name: level name (``"L1"``, ``"S1"``/``"sacrum"``).
        lock: keep the name fixed in later re-solves. With ``lock=False`` the name is forced for this re-solve
            only (the neighbours are re-numbered around it) and the vertebra is left unfixed, so a later
            correction elsewhere may change it again.

    Another vertebra that was fixed to the same name loses that fix: the latest correction wins.

    Raises:
        KeyError: unknown vertebra id or level name.
        ValueError: the fixed labels contradict each other (e.g. an L1 fixed above this new T12).
    """
    canonical = LEVELS[level_index(name)].name
    target = result.by_id(vertebra_id)
    out = result.copy()
    _release(out, canonical)
    fixed = _fixed_names(out)
    fixed[target.id] = canonical
    solved = relabel(out, fixed)
    if not lock:
        solved.by_id(target.id).fixed = False
    return solved


def set_locked(result: SpineLabeling, vertebra_id: int, locked: bool) -> SpineLabeling:
    """Fix a vertebra's current name (``locked=True``) or release it to the sequence model (``False``).

    Args:
        result: the labelling.
        vertebra_id: id of the vertebra to lock or release.
        locked: True to fix its current name, False to release it.

    Raises:
        KeyError: unknown vertebra id.
        ValueError: the fixed labels contradict each other.
    """
    out = result.copy()
    out.by_id(vertebra_id).fixed = bool(locked)
    return _solve(out)


def move_point(result: SpineLabeling, vertebra_id: int, new_lps: tuple[float, float, float]) -> SpineLabeling:
    """React to a vertebra's centroid marker being moved to ``new_lps`` (LPS mm).

    * Dropped on another vertebra's component: the user is saying "this one is <name>". The component under
      the point takes the moved vertebra's name, fixed; the moved vertebra keeps its own centroid and is
      released (unfixed) so the sequence model re-numbers it. Both markers stay at their own components.
    * Dropped anywhere else (its own component, background near it): the centroid moves there, and the chain's
      gaps with it. The vertebra's voxels do not move with it, so a drop that lies outside the image, that would
      change its place in the chain (past a neighbour; also on its own voxels, such as a spinous process reaching
      behind the vertebra above), or farther than ``MOVE_REACH_MM`` from the vertebra's voxels is refused.

    Args:
        result: the labelling.
        vertebra_id: id of the vertebra whose marker was moved.
        new_lps: where it was dropped, LPS mm.

    Raises:
        KeyError: unknown vertebra id.
        ValueError: the fixed labels contradict each other, or the drop is refused (above).
    """
    moved = result.by_id(vertebra_id)
    under = component_at(result, new_lps)
    ids = {v.id for v in result.vertebrae}
    if under and under != moved.id and under in ids:
        out = result.copy()
        out.by_id(moved.id).fixed = False
        _release(out, moved.name)
        fixed = _fixed_names(out)
        fixed[under] = moved.name
        log.info("marker %s dropped on vertebra %d: it becomes %s", moved.name, under, moved.name)
        return relabel(out, fixed)
    out = result.copy()
    vertebrae = [v for v in out.vertebrae if v.id != moved.id]
    relocated = out.by_id(moved.id)
    relocated.centroid_lps_mm = tuple(float(c) for c in new_lps)
    chain = _insert_in_chain(vertebrae, relocated)
    if _voxel(result, new_lps) is None:
        where = "outside the image"
    elif [v.id for v in chain] != [v.id for v in result.vertebrae]:
        where = "past a neighbour"
    elif not _near_component(result, moved.id, new_lps, MOVE_REACH_MM):
        where = f"more than {MOVE_REACH_MM:g} mm from its vertebra"
    else:
        return _solve(_with_chain(out, chain))
    on = "on its own voxels" if under == moved.id else "on no vertebra"
    raise ValueError(f"{moved.name}'s point was dropped {where}, {on}; its voxels stay where they are, so the point "
                     f"goes back (drop it on another vertebra to give that one the name {moved.name})")


def _near_component(result: SpineLabeling, vertebra_id: int, point_lps, reach_mm: float) -> bool:
    """Whether a voxel centre of the vertebra's component lies within ``reach_mm`` of ``point_lps`` (LPS mm, inside
    the grid); True when the component has no voxels (nothing to measure against). Only the box of that reach around
    the point is searched, not the whole volume."""
    point = np.asarray(point_lps, dtype=float)
    box = _box_slices(result.geometry, result.geometry.lps_to_index(point), (2 * reach_mm,) * 3)
    zyx = np.argwhere(result.components[box] == vertebra_id) + [s.start for s in box]
    if zyx.size == 0:
        return not (result.components == vertebra_id).any()
    lps = result.geometry.index_to_lps(zyx[:, ::-1].astype(float))
    return bool(np.min(np.linalg.norm(lps - point, axis=1)) <= reach_mm)


def delete(result: SpineLabeling, vertebra_id: int) -> SpineLabeling:
    """Remove a vertebra: its voxels become background, its record goes, the rest is re-solved.

    Args:
        result: the labelling (not changed; a labelling with a new component array is returned).
        vertebra_id: id of the vertebra to remove.

    Raises:
        KeyError: unknown vertebra id.
    """
    result.by_id(vertebra_id)
    components = result.components.copy()  # one copy, not np.where's and astype's
    components[components == vertebra_id] = 0
    out = result.copy()
    vertebrae = [v for v in out.vertebrae if v.id != vertebra_id]
    return _solve(_with_chain(out, vertebrae, components))


def restore(result: SpineLabeling, vertebrae: list[Vertebra]) -> SpineLabeling:
    """Put back vertebrae that an earlier correction removed, whose voxels ``result.components`` holds again (an
    undo in the Segment Editor): each record goes where it fits in the chain, released (its name not fixed), and the
    names are re-solved.

    Args:
        result: the labelling whose ``components`` hold the removed vertebrae's voxels again.
        vertebrae: the removed ``Vertebra`` records, as the labelling before the removal held them.

    Raises:
        ValueError: an id the labelling still has, one whose voxels are not in ``result.components``, or names fixed
            since that cannot stand with the vertebrae put back.
    """
    out = result.copy()
    chain = list(out.vertebrae)
    for vertebra in vertebrae:
        if any(v.id == vertebra.id for v in chain) or not (result.components == vertebra.id).any():
            raise ValueError(f"vertebra {vertebra.id} cannot be restored: it is still there, or has no voxels")
        chain = _insert_in_chain(chain, replace(vertebra, fixed=False))
    return _solve(_with_chain(out, chain))


def _box_slices(geometry: Geometry, centre_ijk: np.ndarray,
                size_mm: tuple[float, float, float] = ADD_BOX_MM) -> tuple[slice, slice, slice]:
    """(z, y, x) array slices of the box of ``size_mm`` (along L, P, S) around the voxel whose float index is
    ``centre_ijk`` (i, j, k = x, y, z, as ``Geometry.lps_to_index`` gives it), clipped to the grid."""
    d = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    half = np.zeros(3)
    for axis in range(3):  # voxel axis -> the anatomical axis it mostly runs along
        half[axis] = size_mm[int(np.argmax(np.abs(d[:, axis])))] / 2.0 / geometry.spacing[axis]
    lo = np.maximum(np.floor(centre_ijk - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre_ijk + half).astype(int) + 1, np.asarray(geometry.size))
    return tuple(slice(int(lo[a]), int(hi[a])) for a in (2, 1, 0))  # type: ignore[return-value]


def _grow(image_zyx: np.ndarray, free: np.ndarray, seed_zyx: tuple[int, int, int],
          spacing_xyz: tuple[float, ...]) -> np.ndarray:
    """Region grown from a seed over voxels of similar intensity.

    Args:
        image_zyx: float32 (z, y, x) intensities of the box.
        free: bool (z, y, x), voxels that may be taken (not part of another vertebra).
        seed_zyx: seed voxel inside the box, (z, y, x) indices.
        spacing_xyz: voxel size in mm along (x, y, z).

    Returns:
        bool (z, y, x): the connected region of voxels whose intensity lies within the seed neighbourhood's
        statistics (``sitk.ConfidenceConnected``), restricted to ``free``, holes filled; a ball of
        ``_FALLBACK_RADIUS_MM`` around the seed (within ``free``) when that region is smaller than 1 ml.
    """
    lowest = float(image_zyx.min()) - 1.0
    masked = sitk.GetImageFromArray(np.where(free, image_zyx, lowest).astype(np.float32))
    masked.SetSpacing(spacing_xyz)
    seed_xyz = [int(s) for s in reversed(seed_zyx)]
    grown = sitk.ConfidenceConnected(masked, seedList=[seed_xyz], numberOfIterations=3, multiplier=2.5,
                                     initialNeighborhoodRadius=1, replaceValue=1)
    region = ndimage.binary_fill_holes(sitk.GetArrayFromImage(grown).astype(bool)) & free
    labels, _ = ndimage.label(region)
    region = labels == labels[seed_zyx] if labels[seed_zyx] else np.zeros_like(region)
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    if region.sum() * voxel_ml < _MIN_GROWN_ML:
        log.info("region growing found %.2f ml; using a %.0f mm ball", region.sum() * voxel_ml, _FALLBACK_RADIUS_MM)
        zz, yy, xx = np.indices(image_zyx.shape, dtype=float)
        sx, sy, sz = spacing_xyz
        dist2 = ((zz - seed_zyx[0]) * sz) ** 2 + ((yy - seed_zyx[1]) * sy) ** 2 + ((xx - seed_zyx[2]) * sx) ** 2
        region = (dist2 <= _FALLBACK_RADIUS_MM**2) & free
    return region


def _shifted_neighbour(result: SpineLabeling, point_lps: tuple[float, float, float]
                       ) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """The voxels of the labelled vertebra nearest ``point_lps`` (LPS mm), moved so that its body centroid lands on
    the point (whole voxels), where they are free (no other vertebra's): the shape of a missed vertebra is that of its
    neighbour, near enough for training labels and far nearer than a region grown on intensity, which on CT runs into
    the soft tissue around the spine. C1, C2 and S1, whose shapes are their own, lend theirs only when no other
    vertebra is labelled.

    Returns:
        ((z, y, x) slices of the box of ``SHAPE_BOX_MM`` about the point, clipped to the grid), bool (z, y, x) mask
        of the new vertebra within that box.
    """
    geometry, point = result.geometry, np.asarray(point_lps, dtype=float)
    ordinary = [v for v in result.vertebrae if v.name not in ("C1", "C2", "S1")] or result.vertebrae
    donor = min(ordinary, key=lambda v: np.linalg.norm(np.asarray(v.centroid_lps_mm) - point))
    ijk = geometry.lps_to_index(point)
    shift_zyx = np.rint(ijk - geometry.lps_to_index(np.asarray(donor.centroid_lps_mm)))[::-1].astype(int)
    box = _box_slices(geometry, ijk, SHAPE_BOX_MM)
    size_zyx = result.components.shape
    # the box, and where its voxels come from, both within the grid
    lo = [max(b.start, s) for b, s in zip(box, shift_zyx)]
    hi = [min(b.stop, n + s) for b, n, s in zip(box, size_zyx, shift_zyx)]
    region = np.zeros(tuple(b.stop - b.start for b in box), dtype=bool)
    if all(h > l for l, h in zip(lo, hi)):
        target = tuple(slice(l - b.start, h - b.start) for l, h, b in zip(lo, hi, box))
        source = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, shift_zyx))
        region[target] = result.components[source] == donor.id
    return box, region & (result.components[box] == 0)


def _level_with(result: SpineLabeling, point_lps: tuple[float, float, float]) -> str | None:
    """The name of the vertebra nearest ``point_lps`` (LPS mm) when the point lies level with it: along the chain's
    local direction, closer to its centroid than a third of its shorter gap to a chain neighbour. A missed vertebra
    lies about one spacing from its neighbours (whose gap across it is two spacings); a point beside a vertebra
    (outside its component, in soft tissue or air) does not. A neighbour that the head or feet end of the image cuts
    (``_cut_by_view``) is left out while the other remains: the centroid of the part in view, a piece behind the body,
    can turn the direction so far that a vertebra placed back where it was deleted lies 'level with' its neighbour.
    None for a chain of fewer than two vertebrae."""
    vertebrae = result.vertebrae
    if len(vertebrae) < 2:
        return None
    centroids = np.array([v.centroid_lps_mm for v in vertebrae], dtype=float)
    point = np.asarray(point_lps, dtype=float)
    i = int(np.argmin(np.linalg.norm(centroids - point, axis=1)))
    neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(vertebrae)]
    cut = _cut_by_view(result)
    neighbours = [j for j in neighbours if vertebrae[j].id not in cut] or neighbours
    axis = centroids[neighbours[-1]] - centroids[neighbours[0] if len(neighbours) == 2 else i]
    gap = min(np.linalg.norm(centroids[j] - centroids[i]) for j in neighbours)
    along = abs(float(np.dot(point - centroids[i], axis / max(np.linalg.norm(axis), 1e-6))))
    return vertebrae[i].name if along < gap / 3 else None


def _cut_by_view(result: SpineLabeling) -> set[int]:
    """Ids of the vertebrae whose voxels reach the first or last plane of the image along its head-feet axis (the
    voxel axis that runs most along S): cut by the field of view. Only those two planes are read."""
    d = np.asarray(result.geometry.direction, dtype=float).reshape(3, 3)
    axis = 2 - int(np.argmax(np.abs(d[2])))  # numpy axis of (z, y, x)
    ends = np.take(result.components, [0, result.components.shape[axis] - 1], axis=axis)
    return {int(i) for i in np.unique(ends) if i}


def _no_room_between(result: SpineLabeling, point_lps: tuple[float, float, float]) -> tuple[str, str, float] | None:
    """(upper name, lower name, their gap in mm) when ``point_lps`` (LPS mm) goes into the chain between two
    vertebrae that lie too close for a vertebra between them: less than ``ROOM_FOR_MISSED`` times the shortest of up
    to two gaps on either side (a missed vertebra leaves about twice its neighbours' gap; a point in the disc between
    two found ones, about one), leaving out gaps under 0.6 times their median (a body split in two; one missed
    vertebra more beside it does not hide this one) and, while others remain, the gaps to a vertebra that the head or
    feet end of the image cuts (``_cut_by_view``: its centroid is that of the part in view, so its gap is short; on
    sub-verse014's CT the cut S1's 21 mm let a click in the L3/L4 disc add an 'L4' and rename the two below). None
    where it lies between none, or the chain has no other gap to compare with."""
    chain = np.array([v.centroid_lps_mm for v in result.vertebrae], dtype=float).reshape(-1, 3)
    gaps = np.linalg.norm(np.diff(chain, axis=0), axis=1)
    pos = _insertion_position(chain, np.asarray(point_lps, dtype=float))
    if not 0 < pos < len(chain) or len(gaps) < 2:
        return None
    cut = _cut_by_view(result)
    whole = np.array([result.vertebrae[k].id not in cut and result.vertebrae[k + 1].id not in cut
                      for k in range(len(gaps))])
    parts = (slice(max(pos - 3, 0), pos - 1), slice(pos, pos + 2))
    beside, uncut = (np.concatenate([values[p] for p in parts]) for values in (gaps, whole))
    if uncut.any():
        beside = beside[uncut]
    if gaps[pos - 1] >= ROOM_FOR_MISSED * beside[beside >= 0.6 * np.median(beside)].min():
        return None
    return result.vertebrae[pos - 1].name, result.vertebrae[pos].name, float(gaps[pos - 1])


def add_vertebra(result: SpineLabeling, image: sitk.Image, point_lps: tuple[float, float, float],
                 name: str | None = None) -> SpineLabeling:
    """Add a vertebra the network missed, from a point the user placed on its body.

    The new component takes the shape of the nearest labelled vertebra, moved onto the point
    (``_shifted_neighbour``); in a labelling without vertebrae, or where that shape moved onto the point has no free
    voxel in the image, it is grown from the point over voxels of similar intensity within a vertebra-sized box
    (``ADD_BOX_MM`` along L, P, S). It never takes voxels of existing vertebrae. The new vertebra has the point as
    its centroid, uninformative level scores (zeros, the sequence model places it from its neighbours), goes into
    the chain where it fits along the spine, and everything is re-solved.

    Args:
        result: the labelling.
        image: the image it was made from (same grid as ``result.geometry``); intensities of any type.
        point_lps: a point on the missed vertebra's body, LPS mm.
        name: level name to fix for the new vertebra, or None to let the sequence model name it.

    Raises:
        TypeError: ``image`` is no ``SimpleITK.Image`` (a numpy array, a path).
        ValueError: the image is not on the labelling's grid, the point is outside it, inside an existing vertebra,
            farther than ``ADD_REACH_MM`` from every vertebra's centroid, level with one (``_level_with``) or between
            two without room for a third (``_no_room_between``), or the fixed labels contradict each other.
        KeyError: unknown level name.
    """
    image = check_image_grid(result, image)
    ijk = _voxel(result, point_lps)
    if ijk is None:
        raise ValueError("the point is outside the image")
    existing = component_at(result, point_lps)
    if existing:
        inside = next((v.name for v in result.vertebrae if v.id == existing), "an existing segment")
        raise ValueError(f"the point lies inside {inside}; rename or move that vertebra instead")
    centroids = np.array([v.centroid_lps_mm for v in result.vertebrae], dtype=float).reshape(-1, 3)
    if len(centroids) and np.min(np.linalg.norm(centroids - np.asarray(point_lps, dtype=float), axis=1)) > ADD_REACH_MM:
        raise ValueError(f"the point is more than {ADD_REACH_MM:g} mm from every labelled vertebra: place it on the "
                         "body of a vertebra missed beside them")
    level_with = _level_with(result, point_lps)
    if level_with is not None:
        raise ValueError(f"the point lies level with {level_with} along the spine, beside it rather than between two "
                         "vertebrae: place it on the body of the missed vertebra")
    no_room = _no_room_between(result, point_lps)
    if no_room is not None:
        raise ValueError("the point lies between {} and {}, {:.0f} mm apart, as close as the vertebrae beside them: no "
                         "vertebra is missed there (a click in the disc?)".format(*no_room))
    region = None
    if result.vertebrae:
        box, region = _shifted_neighbour(result, point_lps)
    if region is None or not region.any():
        # no vertebra to take a shape from, or its shape moved onto the point falls outside the image or on other
        # vertebrae (a neighbour whose centroid lies off its voxels after Segment Editor edits): grown from the point,
        # which is free, so the vertebra has voxels (it was added with none: an empty segment, deleted without a word
        # by the next read-back)
        box = _box_slices(result.geometry, ijk)
        seed = tuple(int(ijk[a] - box[2 - a].start) for a in (2, 1, 0))
        intensities = sitk.GetArrayViewFromImage(image)[box].astype(np.float32)
        region = _grow(intensities, result.components[box] == 0, seed, result.geometry.spacing)

    new_id = max([int(result.components.max(initial=0)), result.removed_up_to] + [v.id for v in result.vertebrae]) + 1
    if new_id > np.iinfo(result.components.dtype).max:
        raise ValueError(f"no component id left in {result.components.dtype}")
    components = result.components.copy()
    components[box][region] = new_id
    volume_ml = float(region.sum() * np.prod(result.geometry.spacing) / 1000.0)
    canonical = LEVELS[level_index(name)].name if name is not None else LEVELS[0].name  # unnamed: solved below
    vertebra = Vertebra(id=new_id, name=canonical, centroid_lps_mm=tuple(float(c) for c in point_lps),
                        volume_ml=volume_ml, confidence=0.0, level_log_scores=np.zeros(len(LEVELS)),
                        fixed=name is not None)
    out = result.copy()
    if name is not None:
        _release(out, canonical)
    log.info("added vertebra %d (%.1f ml) at %s", new_id, volume_ml, tuple(point_lps))
    return _solve(_with_chain(out, _insert_in_chain(out.vertebrae, vertebra), components))
