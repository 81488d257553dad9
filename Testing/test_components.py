"""Body components, splitting merged bodies, attaching posterior elements, and per-component features."""

from types import SimpleNamespace

import numpy as np
import pytest

from SpineLabelLib.components import (arch_above_view, atlas_beside_dens, attach_posterior, body_components,
                                       confine_across, confine_posterior, cut_across, dense_bone_as_posterior,
                                       join_sacrum,
                                       off_axis_components, posterior_by_level, present_ids, split_merged,
                                       vertebra_components)
from SpineLabelLib.features import chain_order, drop_detached_ends, level_scores, level_sharpness, measure, off_the_line
from SpineLabelLib.vertebrae import BODY, DISC, LEVELS, POSTERIOR, level_index
from SpineLabelLib.result import Geometry

SPACING = (2.0, 2.0, 2.0)


def stacked_spine(n=4, height=10, disc=3, shape_yx=(40, 40)):
    """Tissue map (z, y, x) of n bodies stacked along z with discs between, a posterior block behind each."""
    z_total = n * (height + disc) + 4
    tissue = np.zeros((z_total, *shape_yx), np.uint8)
    for i in range(n):
        z0 = 2 + i * (height + disc)
        tissue[z0 : z0 + height, 10:24, 12:28] = BODY
        tissue[z0 + 2 : z0 + height - 2, 24:32, 17:23] = POSTERIOR
        if i < n - 1:
            tissue[z0 + height : z0 + height + disc, 10:24, 12:28] = DISC
    return tissue


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.uint8])
def test_present_ids(dtype):
    labels = np.zeros((4, 5, 6), dtype)
    labels[0, 0, 0], labels[3, 4, 5], labels[1, 2, 3] = 7, 2, 7  # id 7 twice, ids 1 and 3-6 absent
    ids = present_ids(labels)
    assert ids.dtype == np.int64 and ids.tolist() == [2, 7]
    assert present_ids(np.zeros((3, 3, 3), dtype)).tolist() == []


def test_one_component_per_body_cranial_first():
    tissue = stacked_spine()
    bodies = body_components(tissue, SPACING)
    assert bodies.max() == 4
    z_means = [np.argwhere(bodies == i)[:, 0].mean() for i in range(1, 5)]
    assert z_means == sorted(z_means, reverse=True)  # id 1 is the most cranial (highest z)


def test_specks_are_dropped():
    tissue = stacked_spine()
    tissue[0, 0, 0] = BODY
    tissue[0:2, 35:37, 35:37] = BODY
    assert body_components(tissue, SPACING).max() == 4


def test_a_body_cut_by_the_field_of_view_is_kept_however_small():
    tissue = stacked_spine()[:42]  # one slice of the most cranial body left: 1.8 ml, a tenth of a whole body
    tissue[20, 26:36, 30:40] = BODY  # the same thin slab away from the edges: a speck
    bodies = body_components(tissue, SPACING)
    assert bodies.max() == 4
    assert set(np.unique(np.argwhere(bodies == 1)[:, 0])) == {41}


def test_merged_bodies_are_split():
    tissue = stacked_spine(n=5)
    # a collapsed disc: bodies 2 and 3 bridged by a thin column of body voxels
    z0 = 2 + 1 * 13 + 10
    tissue[z0 : z0 + 3, 15:19, 18:22] = BODY
    bodies = body_components(tissue, SPACING)
    assert bodies.max() == 4
    split = split_merged(bodies, (tissue == BODY).astype(np.float32), SPACING)
    assert split.max() == 5
    sizes = np.bincount(split.ravel())[1:]
    assert sizes.min() > 0.5 * sizes.max()


def test_a_column_of_bodies_is_cut_at_its_discs_but_a_tall_sacrum_is_not():
    tissue = stacked_spine(n=4)
    prob = np.where(tissue == BODY, 0.95, 0.0).astype(np.float32)
    prob[tissue == DISC] = 0.55  # the network saw the discs only faintly: all one body component
    tissue[tissue == DISC] = BODY
    merged = body_components(tissue, SPACING)
    assert merged.max() == 1
    split = split_merged(merged, prob, SPACING)
    assert split.max() == 4
    sacrum = np.zeros((60, 30, 30), np.uint8)
    sacrum[5:55, 8:22, 8:22] = BODY  # 100 mm tall, uniform probability: stays one piece
    assert split_merged(body_components(sacrum, SPACING), (sacrum == BODY) * 0.9, SPACING).max() == 1


def test_the_end_of_a_body_beyond_a_missed_disc_at_the_edge_of_the_view_is_cut_off():
    # the view ends 6 mm into the most cranial body, and the network missed the disc below it: that end joins the
    # whole body below, too short together (32 mm) to be taken for merged bodies
    top = 2 + 4 * 13 + 3
    tissue = stacked_spine(n=5)[:top]
    prob = np.where(tissue == BODY, 0.95, 0.0).astype(np.float32)
    missed = np.zeros(tissue.shape, bool)
    missed[top - 6 : top - 3] = tissue[top - 6 : top - 3] == DISC
    prob[missed] = 0.55
    tissue[missed] = BODY
    merged = body_components(tissue, SPACING)
    assert merged.max() == 4
    split = split_merged(merged, prob, SPACING)
    assert split.max() == 5
    assert set(np.unique(np.argwhere(split == 1)[:, 0])) <= set(range(top - 6, top))  # that end and part of its disc
    # a body cut by the edge without a valley next to it stays whole, however tall
    sacrum = np.zeros((60, 30, 30), np.uint8)
    sacrum[0:55, 8:22, 8:22] = BODY
    assert split_merged(body_components(sacrum, SPACING), (sacrum == BODY) * 0.9, SPACING).max() == 1


def _level_head(levels_zyx: np.ndarray, n_levels: int = len(LEVELS), sure: float = 0.9) -> np.ndarray:
    """Half-resolution level log-probabilities (n_levels, ceil(z/2), ceil(y/2), ceil(x/2)) that give each voxel the
    level in ``levels_zyx`` (int level indices into ``LEVELS``, full resolution) with probability ``sure``."""
    half = levels_zyx[::2, ::2, ::2]
    probs = np.full((n_levels, *half.shape), (1 - sure) / (n_levels - 1), np.float32)
    np.put_along_axis(probs, half[None].astype(np.int64), sure, axis=0)
    return np.log(probs).astype(np.float16)


def _column_without_discs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A thoracic CT: four bodies and the discs between them all one component of uniform probability. Returns the
    component, its body probability and the level index of each voxel (T8 at the top ... T5; 0 outside)."""
    tissue = stacked_spine(n=4)
    whole = tissue > 0
    tissue[tissue == DISC] = BODY
    z = np.indices(tissue.shape)[0]
    levels = np.where(whole, level_index("T8") - (z - 2) // 13, 0)
    return body_components(tissue, SPACING), np.where(tissue == BODY, 0.95, 0.0).astype(np.float32), levels


def test_a_column_without_discs_or_valleys_is_cut_where_the_level_head_changes_level():
    merged, prob, levels = _column_without_discs()
    assert split_merged(merged, prob, SPACING).max() == 1
    split = split_merged(merged, prob, SPACING, level_log_probs=_level_head(levels))
    assert split.max() == 4
    for k in range(1, 5):  # every piece holds one body, give or take a disc
        assert np.unique(levels[split == k]).size <= 2 and np.bincount(levels[split == k]).max() > 0.6 * (split == k).sum()
    # a tall body that looks like one level throughout (a sacrum) stays whole, and so does an unsure head
    sacrum = np.zeros((60, 30, 30), np.uint8)
    sacrum[5:55, 8:22, 8:22] = BODY
    one_level = _level_head(np.full(sacrum.shape, level_index("S1")))
    assert split_merged(body_components(sacrum, SPACING), (sacrum == BODY) * 0.9, SPACING,
                        level_log_probs=one_level).max() == 1
    unsure = _level_head(levels, sure=0.3)
    assert split_merged(merged, prob, SPACING, level_log_probs=unsure).max() == 1


def test_a_body_the_level_head_hesitates_over_stays_whole():
    # the column above, the level head torn between two levels over the lowest body: its left half one level, its
    # right half another. The two parts lie side by side, not one above the other, so they stay one body
    merged, prob, levels = _column_without_discs()
    z, _, x = np.indices(merged.shape)
    levels[(z < 13) & (x >= 20) & (levels > 0)] = level_index("L1")
    split = split_merged(merged, prob, SPACING, level_log_probs=_level_head(levels))
    assert split.max() == 4
    assert np.unique(split[2:12, 10:24, 12:28]).size == 1


def test_bodies_bridged_across_a_tilted_disc_are_split_between_their_cores():
    # L5 on a sacrum tilted 45 degrees: the bridge follows the tilt, so no z slice is a valley, but the network is
    # surer of the two bodies than of the bridge between them
    z, y, x = np.indices((60, 40, 30))
    tilt = z - 30 - 0.8 * (y - 20)  # signed distance-like coordinate across the tilted disc plane
    tissue = np.zeros(z.shape, np.uint8)
    tissue[(np.abs(y - 20) < 10) & (np.abs(x - 15) < 8) & (np.abs(tilt) < 24)] = BODY
    prob = np.where(tissue == BODY, np.where(np.abs(tilt) < 3, 0.6, 0.97), 0.0).astype(np.float32)
    merged = body_components(tissue, SPACING)
    assert merged.max() == 1
    split = split_merged(merged, prob, SPACING)
    assert split.max() == 2
    upper, lower = (tilt[split == k] for k in (1, 2))
    assert (upper > -3).all() and (lower < 3).all()  # cut along the tilted plane, not across z


def test_posterior_elements_join_their_body():
    tissue = stacked_spine()
    tissue[5, 36:39, 1:3] = POSTERIOR  # a loose posterior fragment touching no body
    bodies, whole, _ = vertebra_components(tissue, (tissue == BODY).astype(np.float32), SPACING)
    for vid in range(1, 5):
        body_z = np.argwhere(bodies == vid)[:, 0]
        post = np.argwhere((whole == vid) & (tissue == POSTERIOR))
        assert len(post) > 0 and body_z.min() <= post[:, 0].min() and post[:, 0].max() <= body_z.max()
    assert whole[5, 36:39, 1:3].max() == 0
    assert attach_posterior(np.zeros_like(bodies), tissue).max() == 0


def test_a_posterior_column_touching_one_body_is_shared_along_the_spine():
    """Posterior elements that run as one column along the spine and touch only the top body (faint pedicles on MRI)
    were flooded whole to that vertebra; each vertebra now keeps those within its band along the spine."""
    tissue = stacked_spine(n=6)
    tissue[tissue == POSTERIOR] = 0
    tissue[2:-2, 26:32, 17:23] = POSTERIOR  # the column, apart from the bodies (they end at y = 24) ...
    top = np.argwhere(tissue == BODY)[:, 0].max()
    tissue[top - 8 : top - 2, 24:26, 17:23] = POSTERIOR  # ... but for a bridge to the top body
    bodies, whole, _ = vertebra_components(tissue, (tissue == BODY).astype(np.float32), SPACING)
    column = tissue == POSTERIOR
    assert set(np.unique(whole[column])) == {1}
    confined = confine_posterior(whole, bodies, list(range(1, 7)), SPACING, last_is_s1=False)
    assert set(np.unique(confined[column])) == set(range(1, 7))
    for vid in range(1, 7):  # 1 crossed levels: the column is shared by the nearest body, half a gap (6.5) either way
        centre, z = np.argwhere(bodies == vid)[:, 0].mean(), np.argwhere(column & (confined == vid))[:, 0]
        assert centre - 7 <= z.min() and z.max() <= centre + 8  # the top vertebra also keeps the bridge above
    assert np.array_equal(confined[~column], whole[~column])
    assert confine_posterior(whole, bodies, [1], SPACING, last_is_s1=False) is whole


def test_posterior_elements_inside_their_band_stay_and_those_in_no_band_go():
    """Four vertebrae 26, 30 and 34 mm apart, z growing cranially as on the model grid, each with a process sloping 1.4
    gaps below its body (the gap below it; the last takes the one above): inside its band, kept. A piece 40 mm above
    the top body lies in no band and is left out."""
    centres, below = [82, 69, 54, 37], [13, 15, 17, 17]
    bodies = np.zeros((112, 20, 10), np.int32)
    for i, centre in enumerate(centres):
        bodies[centre - 4 : centre + 5, 2:8, 2:8] = i + 1
    vertebrae = bodies.copy()
    for i, centre in enumerate(centres):  # side by side, so that no process covers another
        vertebrae[centre - round(1.4 * below[i]) : centre + 3, 10:14, 2 * i + 1 : 2 * i + 3] = i + 1
    assert np.array_equal(confine_posterior(vertebrae, bodies, [1, 2, 3, 4], SPACING, last_is_s1=False), vertebrae)
    vertebrae[102, 10:12, 1:3] = 1
    assert not confine_posterior(vertebrae, bodies, [1, 2, 3, 4], SPACING, last_is_s1=False)[102].any()


def test_a_process_beyond_its_band_stays_where_its_new_vertebra_would_hold_it_apart():
    """Two vertebrae 26 mm apart (z grows cranially); the lower one's process, beside the bodies, runs up past its band
    into the band of the one above, apart from that one's body and arch. The band step gave its top to the vertebra
    above, a patch of that one's label apart from it; it stays with the vertebra it is part of."""
    bodies = np.zeros((100, 20, 20), np.int32)
    bodies[78:87, 2:8, 2:8], bodies[65:74, 2:8, 2:8] = 1, 2  # centres z 82 and 69: band of 2 up to z 82
    vertebrae = bodies.copy()
    vertebrae[76:88, 10:18, 2:7] = 1  # the arch of 1
    vertebrae[62:76, 10:18, 2:7] = 2  # the arch of 2
    vertebrae[66:70, 2:8, 8:14] = 2  # a bridge from body 2 ...
    vertebrae[66:90, 2:8, 14:17] = 2  # ... to the process, apart from 1 (x 2-7)
    confined = confine_posterior(vertebrae, bodies, [1, 2], SPACING, last_is_s1=False)
    assert np.array_equal(confined, vertebrae)


def test_rib_pieces_beyond_the_widest_transverse_processes_leave_their_vertebra():
    """A thoracic vertebra whose rib runs on 120 mm to one side (joined to it by dense bone on the CT phantom) keeps
    what lies within 60 mm left and right of its body centroid; S1 keeps its alae."""
    bodies = np.zeros((20, 20, 140), np.int32)
    bodies[2:8, 2:12, 60:80] = 1  # centred at x = 69.5 voxels (2 mm)
    bodies[12:18, 2:12, 60:80] = 2
    vertebrae = bodies.copy()
    vertebrae[4:6, 12:14, 10:130] = 1  # a rib and its twin reaching 119 mm to either side
    vertebrae[14:16, 12:14, 10:130] = 2
    for last_is_s1 in (False, True):
        out = confine_across(vertebrae, bodies, [1, 2], SPACING, last_is_s1=last_is_s1)
        xs = np.flatnonzero((out == 1).any(axis=(0, 1)))
        assert xs.min() == 40 and xs.max() == 99  # 60 mm either way of 69.5: x 40-99 (59 mm off at the ends)
        assert np.array_equal(out[bodies > 0], bodies[bodies > 0])
        assert (out == 2).any(axis=(0, 1)).sum() == (120 if last_is_s1 else 60)
    assert confine_across(vertebrae, bodies, [1], SPACING, last_is_s1=True) is vertebrae


def test_an_arch_flooded_to_the_vertebra_above_goes_back_to_its_own_level():
    """Lumbar MRI: the network misses L4's pedicles, its arch touches only L3's through the facet joints, and the flood
    gives it to L3, whose band (1.5 gaps below) holds it. Past the half-way plane to a neighbour that holds less
    posterior tissue than it does there, a vertebra keeps none; where the neighbour has its own arch, a process
    reaching over is kept (``test_posterior_elements_inside_their_band_stay_and_those_in_no_band_go``)."""
    tissue = np.zeros((70, 50, 30), np.uint8)
    for zc in (58, 40, 22):  # body centres 36 mm apart, z growing cranially: ids 1, 2, 3
        tissue[zc - 6 : zc + 6, 5:20, 8:22] = BODY
    tissue[47:64, 20:24, 13:17] = POSTERIOR  # body 1's pedicle
    tissue[28:64, 24:40, 10:20] = POSTERIOR  # the arches of 1 and 2 as one column, touching body 2 nowhere
    bodies = body_components(tissue, SPACING)
    whole = attach_posterior(bodies, tissue)
    column = (tissue == POSTERIOR) & (bodies == 0)
    assert set(np.unique(whole[column])) == {1}
    confined = confine_posterior(whole, bodies, [1, 2, 3], SPACING, last_is_s1=False)
    z = np.arange(70)[:, None, None]
    # the half-way planes: z 49 between 1 and 2, z 31 between 2 and 3 (which the column also reaches)
    assert (confined[column & (z >= 49)] == 1).all() and (confined[column & (z < 31)] == 3).all()
    assert (confined[column & (z >= 31) & (z < 49)] == 2).all()
    assert np.array_equal(confined[~column], whole[~column])


def test_s1_keeps_what_lies_at_its_own_level_and_claims_nothing():
    """The same column, the lowest vertebra named S1: L5 (id 2) still claims its level from the vertebra above, but
    what lies at S1's level stays where it is, and S1's own posterior mass there stays S1's however small L5's arch."""
    vertebrae = np.zeros((90, 30, 30), np.int32)
    for i, zc in ((1, 75), (2, 50), (3, 25)):  # L4, L5, S1 bodies 25 mm apart, z growing cranially
        vertebrae[zc - 5 : zc + 5, 5:15, 10:20] = i
    bodies = vertebrae.copy()
    vertebrae[45:55, 15:18, 13:17] = 2  # L5's small arch at its own level
    vertebrae[12:30, 15:25, 10:20] = 3  # S1's posterior mass at and below its level
    mass = (bodies == 0) & (vertebrae == 3)
    for last_is_s1 in (False, True):
        confined = confine_posterior(vertebrae, bodies, [1, 2, 3], (1.0, 1.0, 1.0), last_is_s1=last_is_s1)
        assert (confined[mass] == 3).all() and np.array_equal(confined[~mass], vertebrae[~mass])


def _three_arches() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2, L3 and L4 (ids 1, 2, 3; z grows cranially) whose arches the flood cut too high: each vertebra below holds
    the lower arch of the one above. Returns (vertebrae, bodies) int32 (z, y, x) and the level each voxel truly
    has, int (z, y, x) indices into ``LEVELS`` (L2 from z 40, L3 from z 20, L4 below)."""
    bodies = np.zeros((60, 30, 20), np.int32)
    for vid, z0 in ((1, 44), (2, 25), (3, 6)):
        bodies[z0 : z0 + 10, 2:12, 5:15] = vid
    vertebrae = bodies.copy()
    for vid, (z0, z1) in ((1, (46, 56)), (2, (28, 46)), (3, (10, 28))):
        vertebrae[z0:z1, 15:25, 8:12] = vid
    truth = np.full(bodies.shape, level_index("L4"))
    truth[20:], truth[40:] = level_index("L3"), level_index("L2")
    return vertebrae, bodies, truth


def test_arch_voxels_go_to_the_neighbour_whose_level_the_level_head_gives_them():
    vertebrae, bodies, truth = _three_arches()
    arch = (vertebrae > 0) & (bodies == 0)
    z = np.arange(60)[:, None, None] + np.zeros_like(vertebrae)
    out = posterior_by_level(vertebrae, bodies, [1, 2, 3], _level_head(truth), last_is_s1=False)
    assert (out[arch & (z >= 40)] == 1).all() and (out[arch & (z >= 20) & (z < 40)] == 2).all()
    assert (out[arch & (z < 20)] == 3).all() and np.array_equal(out[~arch], vertebrae[~arch])
    far = vertebrae.copy()
    far[12:14, 26:28, 8:12] = 1  # L2 arch voxels at L4's level: two levels away, not a neighbour's; they stay
    assert (posterior_by_level(far, bodies, [1, 2, 3], _level_head(truth), last_is_s1=False)[12:14, 26:28, 8:12]
            == 1).all()
    # a level head that cannot tell the levels apart moves nothing; nor does one below the margin
    assert posterior_by_level(vertebrae, bodies, [1, 2, 3], _level_head(truth, sure=1 / len(LEVELS)),
                              last_is_s1=False) is vertebrae
    assert posterior_by_level(vertebrae, bodies, [1, 2, 3], _level_head(truth), last_is_s1=False,
                              margin=10.0) is vertebrae


def test_arch_voxels_the_level_head_moves_apart_from_their_new_vertebra_stay():
    """L3 (id 2) with a process reaching up beside the arches to L2's level (z 40-43), apart from L2's body and arch:
    the level head gives its top to L2, but those voxels would lie apart from L2, a patch of L2's label on L3; they
    stay L3's. The top of L3's arch, which reaches over to L2's arch (z 40-45), still goes to L2."""
    vertebrae, bodies, truth = _three_arches()
    vertebrae[30:34, 15:25, 12:16] = 2  # a bridge from L3's arch (x 8-11) ...
    vertebrae[30:44, 15:25, 16:19] = 2  # ... to the process, two voxels from L2's body (x 5-14, z 44-53)
    out = posterior_by_level(vertebrae, bodies, [1, 2, 3], _level_head(truth), last_is_s1=False)
    assert (out[30:44, 15:25, 16:19] == 2).all()
    assert (out[40:46, 15:25, 8:12] == 1).all() and (out[20:40, 15:25, 8:12] == 2).all()


def test_s1_neither_gives_nor_takes_arch_voxels_by_level():
    """Named S1, the lowest vertebra keeps what it holds at the level above (``join_sacrum`` gives S1 its posterior
    elements); the two above it still trade."""
    vertebrae, bodies, truth = _three_arches()
    arch = (vertebrae > 0) & (bodies == 0)
    out = posterior_by_level(vertebrae, bodies, [1, 2, 3], _level_head(truth), last_is_s1=True)
    assert np.array_equal(out == 3, vertebrae == 3)
    assert (out[arch & (np.arange(60)[:, None, None] >= 40)] == 1).all()


def test_the_arch_of_the_vertebra_above_the_view_is_found_in_the_top_planes():
    """T12 (id 1) at the top of the view, its body reaching the top plane; behind it, in the top planes, the sloping
    spinous process of T11, whose body is out of view, which the flood gave to T12."""
    vertebrae = np.zeros((40, 40, 20), np.int32)
    vertebrae[10:40, 2:16, 5:15] = 1  # the body
    bodies = vertebrae.copy()
    vertebrae[20:40, 16:30, 8:12] = 1  # T12's own arch
    vertebrae[30:40, 30:38, 8:12] = 1  # T11's spinous process: 10 x 8 x 4 voxels, 0.32 ml at 1 mm, 2.56 ml at 2 mm
    t11, t12 = level_index("T11"), level_index("T12")
    truth = np.full(vertebrae.shape, t12)
    truth[30:, 30:] = t11

    def find(levels, top_plane=39, spacing=(2.0, 2.0, 2.0)):
        cut = slice(0, top_plane + 1)
        return arch_above_view(vertebrae[cut], bodies[cut], 1, _level_head(levels[cut]), t12, t11, spacing)

    assert find(truth, spacing=(1.0, 1.0, 1.0)) is None  # under 1 ml
    assert np.array_equal(np.argwhere(find(truth)), np.argwhere(vertebrae[30:, 30:] > 0) + [30, 30, 0])
    # where the level head reads the top vertebra's own level there: nothing
    assert find(np.full_like(truth, t12)) is None
    # T11 read in z 30-37 only: the piece stops short of the top plane, unless the scan ends there
    shifted = np.where(np.arange(40)[:, None, None] >= 38, t12, truth)
    assert find(shifted) is None and find(shifted, top_plane=37) is not None
    # a level head that reads the body as T11 too disagrees with the chain's name for it: no vertebra above
    assert find(np.where(bodies > 0, t11, truth)) is None


def test_c1_beside_the_dens_is_parted_from_c2():
    """A top vertebra named C2 that holds C1: the network's body mask joined C1's anterior arch and lateral masses,
    which lie around the dens at its height, to C2; no cut across the spine could part them."""
    vertebrae = np.zeros((40, 40, 40), np.int32)
    vertebrae[0:20, 10:20, 14:26] = 1  # C2's body
    vertebrae[20:32, 12:18, 18:22] = 1  # its dens
    atlas = np.zeros(vertebrae.shape, bool)
    atlas[24:30, 8:12, 12:28] = True  # C1's anterior arch, in front of the dens
    atlas[24:30, 12:20, 12:16] = atlas[24:30, 12:20, 24:28] = True  # its lateral masses, beside it
    bodies = np.where(atlas, 1, vertebrae)
    vertebrae = bodies.copy()
    vertebrae[4:20, 20:30, 18:22] = 1  # C2's arch
    c1, c2 = level_index("C1"), level_index("C2")
    truth = np.where(atlas, c1, c2)  # 768 voxels: 6.1 ml at 2 mm, 0.8 ml at 1 mm

    def find(levels, spacing=SPACING):
        return atlas_beside_dens(vertebrae, bodies, 1, _level_head(levels), spacing)

    assert np.array_equal(find(truth), atlas)
    assert find(truth, spacing=(1.0, 1.0, 1.0)) is None  # under 2 ml
    assert find(np.full_like(truth, c2)) is None
    # a level head that reads the whole vertebra as C1 disagrees with the chain's C2: nothing is parted
    assert find(np.full_like(truth, c1)) is None
    # C1 voxels beyond the largest piece stay with C2
    stray = truth.copy()
    stray[2:4, 10:12, 14:16] = c1
    assert np.array_equal(find(stray), atlas)


def test_a_vertebra_is_cut_across_at_its_body_centroid():
    bodies = np.zeros((30, 10, 10), np.int32)
    bodies[5:25, 2:6, 2:8] = 1  # a body 20 slices tall, z 5-24: centroid 14.5
    vertebrae = bodies.copy()
    vertebrae[8:22, 6:9, 4:6] = 1
    cut_bodies, cut_vertebrae = cut_across(bodies, vertebrae, 1, 2)
    assert (cut_bodies[5:15] == 2 * (bodies[5:15] > 0)).all() and (cut_bodies[15:] == bodies[15:]).all()
    assert (cut_vertebrae[8:15, 6:9, 4:6] == 2).all() and (cut_vertebrae[15:22, 6:9, 4:6] == 1).all()
    flat = np.zeros_like(bodies)
    flat[10, 2:6, 2:8] = 1  # a body in one plane is left whole
    assert cut_across(flat, flat, 1, 2)[0] is flat


def test_sacrum_called_posterior_elements_joins_s1_not_l5():
    # L4 and L5 (z grows cranially), and below L5 a sacral mass that the network calls posterior elements and the
    # level head S1 (``levels`` holds level indices into LEVELS, as the level head's channels do)
    tissue = np.pad(stacked_spine(n=2), ((16, 0), (0, 0), (0, 0)))
    tissue[2:18, 10:32, 12:28] = POSTERIOR
    levels = np.full(tissue.shape, level_index("L4"))
    levels[:30], levels[:16] = level_index("L5"), level_index("S1")
    in_sacrum = (tissue == POSTERIOR) & (levels == level_index("S1"))
    bodies = body_components(tissue, SPACING)
    assert (attach_posterior(bodies, tissue)[in_sacrum] == 2).all()  # without the level head it floods into L5
    bodies, whole, sacrum = vertebra_components(tissue, (tissue == BODY).astype(np.float32), SPACING,
                                                _level_head(levels))
    assert (sacrum == in_sacrum).all() and (whole[sacrum] == 0).all()  # held back from L5 ...
    assert ((whole == 2) & (tissue == POSTERIOR)).any()  # ... which keeps its own posterior elements
    assert (join_sacrum(whole, sacrum, [2])[sacrum] == 2).all()  # ... unless the sequence model names it S1,
    assert (join_sacrum(whole, sacrum)[sacrum] == 2).all()  # or names no vertebra S1
    tissue[4:10, 10:24, 12:28] = BODY  # the S1 body comes into view
    bodies, whole, sacrum = vertebra_components(tissue, (tissue == BODY).astype(np.float32), SPACING,
                                                _level_head(levels))
    joined = join_sacrum(whole, sacrum, [3])
    assert sacrum.any() and (joined[sacrum] == 3).all() and (joined[~sacrum] == whole[~sacrum]).all()


def test_a_sacral_mass_apart_from_the_sliver_named_s1_joins_it():
    # the network took the whole sacrum, S1 body included, for posterior elements, and only a sliver at the edge of
    # the scan for a body, which the chain names S1: the held-back mass below L5 is not connected to that sliver
    whole = np.zeros((44, 40, 40), np.int32)
    whole[30:40, 10:24, 12:28] = 1  # L5 (z grows cranially)
    whole[0:2, 5:8, 5:8] = 2  # the sliver named S1
    sacrum = np.zeros(whole.shape, bool)
    sacrum[5:25, 10:20, 10:20] = True  # the sacral mass, below L5's centroid
    sacrum[38:40, 30:32, 30:32] = True  # held back level with L5, connected to nothing
    joined = join_sacrum(whole, sacrum, [2], above=1)
    assert (joined[5:25, 10:20, 10:20] == 2).all() and (joined[38:40, 30:32, 30:32] == 0).all()
    assert (joined[~sacrum] == whole[~sacrum]).all()
    assert (join_sacrum(whole, sacrum, [2])[sacrum] == 2).all()  # S1 is the whole chain: all of it is sacrum
    sacrum[38:40] = False
    sacrum[42:44, 30:32, 30:32] = True  # held back in the grid's last planes, above L5's centroid: the box ends there
    joined = join_sacrum(whole, sacrum, [2], above=1)
    assert (joined[5:25, 10:20, 10:20] == 2).all() and (joined[42:44, 30:32, 30:32] == 0).all()


def test_dense_bone_near_the_spine_joins_the_posterior_elements_but_a_rib_is_not_followed():
    tissue = stacked_spine()
    bone = np.where(tissue == DISC, 0.0, (tissue > 0) * 0.9).astype(np.float32)
    hu = np.where(tissue > 0, 400.0, 30.0)
    z = slice(4, 8)
    # a dense bar from the first posterior block outwards (a rib, or a lamina the network under-called)
    hu[z, 26:30, 23:40] = 700.0
    bone[z, 26:30, 23:40] = 0.3
    # dense but not vertebra to the network (a vessel with contrast) right next to a body
    hu[z, 14:18, 28:31] = 300.0
    bone[z, 14:18, 28:31] = 0.02
    # vertebra-like to the network but soft tissue density
    bone[z, 10:14, 28:31] = 0.4
    new_tissue, new_bone = dense_bone_as_posterior(tissue, bone, hu, SPACING)
    added = (new_tissue == POSTERIOR) & (tissue != POSTERIOR)
    # the bar is taken up to 4 mm (2 voxels) from the posterior block that ends at x = 22, not beyond
    assert added[z, 26:30, 23:25].all() and not added[:, :, 25:].any()
    assert (new_bone[added] == 1).all() and (new_bone[~added] == bone[~added]).all()
    assert (new_tissue[tissue > 0] == tissue[tissue > 0]).all()
    assert added.sum() == 4 * 4 * 2
    unchanged_tissue, _ = dense_bone_as_posterior(tissue, bone, np.full_like(hu, 30.0), SPACING)
    assert (unchanged_tissue == tissue).all()


def test_features_and_chain():
    tissue = stacked_spine()
    bodies, whole, _ = vertebra_components(tissue, (tissue == BODY).astype(np.float32), SPACING)
    grid = Geometry(tissue.shape[::-1], SPACING, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    feats = measure(bodies, whole, (tissue == BODY).astype(np.float32), grid)
    assert len(feats) == 4
    f = feats[0]
    assert np.allclose(f.extent_mm, [20, 28, 32])  # the body's box: 10 x 14 x 16 voxels of 2 mm
    assert f.volume_ml > 10 * 14 * 16 * 8 / 1000  # more than the body alone
    assert f.body_probability == pytest.approx(1.0)
    assert not any(f.at_view_end for f in feats)
    top = int(np.argwhere(bodies == 1)[:, 0].max())  # body 1 is the most superior: cut it with the top of the view
    view = np.s_[: top - 2]
    cut = measure(bodies[view], whole[view], (tissue[view] == BODY).astype(np.float32), grid)
    assert [f.at_view_end for f in cut] == [True, False, False, False]
    ordered, gaps = chain_order(list(reversed(feats)))
    assert [o.id for o in ordered] == [1, 2, 3, 4]
    assert np.allclose(gaps, 13 * 2.0)
    c6 = level_index("C6")
    lp = np.log(np.full((len(LEVELS), *[(s + 1) // 2 for s in tissue.shape]), 1 / len(LEVELS), np.float32))
    lp[c6] = 0.0
    scores = level_scores(bodies, lp, [1, 2])
    assert scores.shape == (2, len(LEVELS)) and np.allclose(scores[:, c6], 0.0)


def test_components_detached_from_the_chain_ends_are_dropped():
    items = list("abcdefg")
    spacing = np.array([30.0, 31, 29, 30, 32, 30])
    kept, gaps, dropped = drop_detached_ends(items, spacing)
    assert kept == items and dropped == []
    kept, gaps, dropped = drop_detached_ends(items, np.r_[130.0, spacing[1:-1], 62.0])  # 62 mm: one missed vertebra
    assert kept == items[1:] and dropped == [130.0] and np.allclose(gaps, np.r_[spacing[1:-1], 62.0])
    kept, _, dropped = drop_detached_ends(items, np.r_[spacing[:-1], 140.0])
    assert kept == items[:-1] and dropped == [140.0]
    assert drop_detached_ends(items[:3], np.array([30.0, 150.0]))[0] == items[:3]  # too short to judge


def test_a_component_off_the_line_of_its_neighbours_is_found():
    def chain(*centroids):
        return [SimpleNamespace(body_centroid_lps_mm=np.asarray(c, float)) for c in centroids]

    angles = np.linspace(0.0, 1.2, 6)  # a lordosis: 30 mm spacing on an arc of 120 mm radius
    arc = chain(*[(0.0, 120 * np.sin(a), -120 * (1 - np.cos(a))) for a in angles])
    assert off_the_line(arc) is None and off_the_line(arc[:2]) is None
    straight = chain(*[(0.0, 0.0, -30.0 * k) for k in range(6)])
    assert off_the_line(straight[:3] + straight[4:]) is None  # a missed vertebra is no detour
    beside = straight[:3] + chain((0.0, 25.0, -75.0)) + straight[3:]  # 25 mm behind, between the 3rd and 4th
    position, off_mm = off_the_line(beside)
    assert position == 3 and off_mm == pytest.approx(25.0)
    past_the_end = straight + chain((0.0, 25.0, -152.0))  # sorted last, it makes the last vertebra the detour
    assert off_the_line(past_the_end) == (6, pytest.approx(25.0))
    assert off_the_line(chain((0.0, 25.0, 2.0)) + straight)[0] == 0
    assert off_the_line(past_the_end, last_fixed=True)[0] == 5  # S1 stays, whatever it does to its neighbour


def test_fragments_off_the_column_become_posterior_elements():
    tissue = stacked_spine(n=5)
    tissue[16:26, 34:40, 13:27] = BODY  # a spinous process the network called body, far behind the column
    bodies = body_components(tissue, SPACING)
    assert bodies.max() == 6
    stray = off_axis_components(bodies, SPACING)
    assert stray.size == 1 and np.argwhere(bodies == stray[0])[:, 1].min() >= 34
    clean, whole, _ = vertebra_components(tissue, (tissue == BODY).astype(np.float32), SPACING)
    assert clean.max() == 5


def test_a_far_fragment_beside_a_short_chain_is_off_the_column():
    # three lumbar bodies and a rib fragment 176 mm to one side (the TotalSegmentator abdominal CT): the fragment
    # must not pull the column towards itself and push a real body off it
    bodies = np.zeros((60, 50, 120), np.int32)
    for vid, (z_mm, y_mm, x_mm, half) in enumerate([(104, 26, 200, 5), (140, 35, 200, 5), (148, 77, 24, 4),
                                                     (175, 42, 200, 4)], start=1):
        z, y, x = int((z_mm - 90) / 2), int(y_mm / 2), int(x_mm / 2)
        bodies[z - half : z + half, y - half : y + half, x - half : x + half] = vid
    assert off_axis_components(bodies, SPACING).tolist() == [3]


def test_pieces_in_a_line_beside_the_spine_do_not_push_its_bodies_off_the_column():
    """A synthetic T2 crop (selection.py, seed 900018): beside six lumbar bodies (ids 1, 2, 5, 8, 14, 15; centroids z,
    y, x in mm and volumes in voxels of 2 mm, each box an eighth of it) lies a line of background pieces, some as large
    as the smaller bodies. A body and a piece level with it each measure the other off the column alike; dropping the
    further of the two dropped bodies (L1-L3), dropping the smaller keeps every body."""
    pieces = [(179.2, 115.2, 124.1, 1997), (150.5, 111.4, 123.5, 3569), (143.3, 179.5, 46.5, 733),
              (126.6, 174.5, 38.5, 1190), (117.1, 106.4, 124.7, 3257), (109.8, 179.9, 43.2, 1223),
              (95.9, 176.2, 34.3, 420), (80.7, 103.3, 126.0, 3954), (77.8, 183.2, 41.9, 777), (75.0, 202.9, 101.3, 260),
              (63.7, 158.2, 10.9, 162), (53.7, 174.0, 24.4, 79), (48.6, 208.6, 95.8, 1122), (45.2, 105.9, 130.1, 3388),
              (10.7, 120.0, 133.8, 514)]
    bodies = np.zeros((95, 112, 112), np.int32)
    for vid, (*centroid_mm, volume) in enumerate(pieces, start=1):
        half = max(0, round(((volume / 8) ** (1 / 3) - 1) / 2))
        lo = np.round(np.array(centroid_mm) / 2).astype(int) - half
        bodies[lo[0] : lo[0] + 2 * half + 1, lo[1] : lo[1] + 2 * half + 1, lo[2] : lo[2] + 2 * half + 1] = vid
    assert not set(off_axis_components(bodies, SPACING).tolist()) & {1, 2, 5, 8, 14, 15}


def test_a_blob_level_with_one_of_two_bodies_is_off_the_column():
    # an axial abdominal MRI 60 mm tall (the TotalSegmentator MR): two thoracic bodies and, level with the lower
    # one, a bowel blob as large as it 100 mm in front of it, the upper body cut smaller by the edge of the scan.
    # Two bodies make a short column, but one that rises; a body and the blob level with it make none
    bodies = np.zeros((30, 110, 90), np.int32)
    for vid, (z_mm, y_mm, x_mm, half_z) in enumerate([(46, 190, 90, 5), (16, 184, 90, 6), (15, 86, 70, 6)], start=1):
        z, y, x = int(z_mm / 2), int(y_mm / 2), int(x_mm / 2)
        bodies[z - half_z : z + half_z, y - 8 : y + 8, x - 8 : x + 8] = vid
    assert off_axis_components(bodies, SPACING).tolist() == [3]


@pytest.mark.parametrize("amplitude_mm", [30.0, 45.0, 50.0])
def test_a_scoliotic_column_keeps_its_bodies(amplitude_mm):
    # eight bodies 25 mm tall every 33 mm on a coronal arc (a C-curve whose ends lean 20-31 degrees), larger and
    # smaller in turn, so that the column through the larger half skips every other level: the end body, beyond the
    # column's last one, was measured against that body's centroid and dropped (45 and 50 mm); it is measured against
    # the column going on along its slope
    length = 8 * 33.0
    bodies = np.zeros((int(length / 2) + 4, 40, 120), np.int32)
    for vid, half in enumerate([9, 7] * 4, start=1):
        z_mm = 2 + (vid - 0.5) * 33.0
        x = int((120 + amplitude_mm * np.sin(np.pi * z_mm / length)) / 2)
        bodies[int((z_mm - 12.5) / 2) : int((z_mm + 12.5) / 2), 20 - half : 20 + half, x - half : x + half] = vid
    assert off_axis_components(bodies, SPACING).tolist() == []


@pytest.mark.xfail(strict=True, reason="a known limit (benchmarks/RESULTS.md, Rules Y2-Y6): the curve through a "
                   "column with no point between T1 and T6 swings out across the apex of a tight S-curve")
def test_the_small_bodies_of_an_s_curve_stay_on_the_column():
    """The body components of a whole-spine CT phantom bent into an S-curve of 30 mm either way over 250 mm (centroids
    z, y, x in mm and volumes in voxels of 2 mm, each a cube of that volume). The column, drawn through the larger
    half of the components, the lumbar ones, has no point between T1 and T6, and the curve through it drops two
    bodies at the apex (the straight line between its points, before Rule Y, dropped none)."""
    components = [(663.9, 109.7, 118.5, 1540), (628.8, 105.7, 119.5, 874), (604.3, 105.4, 122.1, 574),
                  (577.3, 109.7, 122.9, 1493), (551.9, 116.4, 123.6, 1093), (521.9, 126.2, 121.1, 2590),
                  (490.6, 135.1, 118.1, 1296), (467.0, 140.5, 116.4, 1251), (445.7, 142.8, 113.1, 925),
                  (426.2, 146.4, 94.2, 1240), (399.8, 145.5, 86.8, 2068), (369.7, 141.8, 90.2, 2281),
                  (347.4, 136.5, 100.9, 1071), (324.4, 126.9, 125.2, 1526), (300.7, 117.5, 142.2, 2541),
                  (271.0, 107.2, 149.8, 3188), (239.2, 97.2, 143.3, 3146), (210.1, 91.4, 119.6, 4445),
                  (173.6, 93.7, 114.9, 5003), (136.2, 103.4, 116.4, 5246), (97.3, 114.3, 118.3, 10831),
                  (61.1, 120.6, 122.7, 12626)]
    bodies = np.zeros((349, 121, 121), np.int32)
    for vid, (*centroid_mm, volume) in enumerate(components, start=1):
        side = round(volume ** (1 / 3))
        lo = np.round(np.array(centroid_mm) / 2).astype(int) - side // 2
        bodies[lo[0] : lo[0] + side, lo[1] : lo[1] + side, lo[2] : lo[2] + side] = vid
    assert off_axis_components(bodies, SPACING).tolist() == []


def test_count_ids_is_bincount_slab_by_slab(monkeypatch):
    import SpineLabelLib.components as comp

    monkeypatch.setattr(comp, "_COUNT_SLAB_VOXELS", 50)  # many slabs, the later ones holding larger ids
    rng = np.random.default_rng(3)
    labels = np.zeros((12, 5, 7), dtype=np.int32)
    labels[8:] = rng.integers(0, 40, size=(4, 5, 7))
    labels[:3] = rng.integers(0, 6, size=(3, 5, 7))
    for array in (labels, labels[:, 1:4, 2:], labels[:0]):
        for minlength in (0, 3, 60):
            expected = np.bincount(array.ravel(), minlength=minlength)
            got = comp.count_ids(array, minlength=minlength)
            assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_the_chain_rules_at_their_limits():
    """A detour just above 1.3 is off the line, one just below is not; a gap beyond an end is judged against the
    spacing of the rest of the chain only; a body the half-resolution grid misses is scored over the cells it lies in;
    the sharpness of a chain is the mean over its vertebrae, not its least decisive one."""
    def chain(*centroids):
        return [SimpleNamespace(body_centroid_lps_mm=np.asarray(c, float)) for c in centroids]

    for behind_mm, found in ((25.0, True), (24.0, False)):  # detours 1.302 and 1.280
        points = chain((0, 0, 0), (0, 0, -30), (0, behind_mm, -60), (0, 0, -90), (0, 0, -120))
        assert (off_the_line(points) == (2, pytest.approx(behind_mm))) if found else off_the_line(points) is None
    # 100 mm is more than 3 times the median (30 mm) of the gaps before it, not of all three (40 mm)
    kept, gaps, dropped = drop_detached_ends(list("abcd"), np.array([20.0, 40.0, 100.0]))
    assert kept == list("abc") and dropped == [100.0] and gaps.tolist() == [20.0, 40.0]
    bodies = np.zeros((6, 6, 6), np.int32)
    bodies[3, 3, 3] = 1  # at odd indices only: in no voxel of bodies[::2, ::2, ::2]
    lp = np.full((len(LEVELS), 3, 3, 3), -5.0, np.float16)
    lp[:, 1, 1, 1] = np.log(np.full(len(LEVELS), 1 / len(LEVELS)))
    assert np.allclose(level_scores(bodies, lp, [1]), np.log(1 / len(LEVELS)), atol=1e-2)
    sure, unsure = np.log([0.9, 0.1]), np.log([0.5, 0.5])
    assert level_sharpness(np.array([sure, unsure])) == pytest.approx((np.log(0.9) + np.log(0.5)) / 2)


def test_measures_on_an_anisotropic_grid():
    grid = Geometry((4, 4, 4), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))  # spacing x, y, z
    bodies = np.zeros((4, 4, 4), np.int32)
    bodies[0:2, 1:3, 2:4] = 1  # 2 x 2 x 2 voxels (z, y, x)
    whole = bodies.copy()
    whole[3, 0, 0] = 1  # one voxel of posterior elements
    f = measure(bodies, whole, bodies.astype(np.float32), grid)[0]
    assert f.volume_ml == pytest.approx(9 * 6.0 / 1000)  # 9 voxels of 6 mm^3
    assert f.extent_mm.tolist() == [6.0, 4.0, 2.0]  # z, y, x
    assert np.allclose(f.body_centroid_lps_mm, grid.index_to_lps(np.array([2.5, 1.5, 0.5])))  # index order x, y, z
