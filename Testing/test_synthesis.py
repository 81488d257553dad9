"""Shape library (SpineLabelTrainingLib.shapes) and synthetic whole-spine cases (SpineLabelTrainingLib.synthesis).

Most tests run on a tiny library built from analytic vertebra masks written to tmp_path, so they need no data; the
real-data test skips when ../shared/data is absent.
"""

from __future__ import annotations


import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import DATA
from SpineLabelLib.inference import Cancelled
from SpineLabelLib.vertebrae import BODY, BY_LABEL, BY_NAME, DISC, LEVELS, POSTERIOR, level_index
from SpineLabelTrainingLib import shapes, synthesis

MAIN_LEVELS = [lv.label for lv in LEVELS if not lv.transitional]  # C1..L5, S1
SMALL = (64, 48, 48)  # crop used by the quicker tests (at 3 mm: 19 x 14 x 14 cm)


def labels_of(*names: str) -> list[int]:
    """VerSe label values of the named levels, in the order given."""
    return [BY_NAME[name].label for name in names]


def _analytic_vertebra(shape_zyx: tuple[int, int, int], label: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Whole vertebra and its true body, bool (z, y, x) arrays of ``shape_zyx``: an elliptic-cylinder body sized
    like the level, 4 voxels from the anterior edge, and behind it a ring-shaped arch around the canal with a
    spinous process."""
    h, d, w = (v / spacing for v in shapes.TYPICAL_BODY_MM[label])
    zz, yy, xx = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape_zyx), indexing="ij")
    yy = yy + (shape_zyx[1] - 1) / 2 - (d / 2 + 4)
    body = (np.abs(zz) <= h / 2) & ((yy / (d / 2)) ** 2 + (xx / (w / 2)) ** 2 <= 1)
    canal_r, ring = 0.3 * w, 0.3 * w + 3.0 / spacing
    cy = d / 2 + canal_r - 1
    arch_z = np.abs(zz) <= 0.3 * h
    r = np.sqrt((yy - cy) ** 2 + xx**2)
    arch = arch_z & (r > canal_r) & (r <= ring) & (yy > d / 2 - 2)
    spinous = arch_z & (np.abs(xx) <= 1.5 / spacing + 0.5) & (yy > cy) & (yy <= cy + ring + 20 / spacing)
    return body | arch | spinous, body


BLOCK = (40, 80, 64)  # voxels (z, y, x) of one analytic vertebra's slab


def _stacked_vertebrae(labels, spacing: float) -> np.ndarray:
    """uint8 (z, y, x) label map of analytic vertebrae ``labels`` (cranial first), one ``BLOCK`` each, stacked caudal
    first: the z index grows towards the head."""
    volume = np.zeros((BLOCK[0] * len(labels), *BLOCK[1:]), np.uint8)
    for i, label in enumerate(labels[::-1]):
        whole, _ = _analytic_vertebra(BLOCK, label, spacing)
        volume[i * BLOCK[0] : (i + 1) * BLOCK[0]][whole] = label
    return volume


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory) -> shapes.ShapeLibrary:
    """Library from one analytic 'scan' holding C1, C2, C5, T1, T8, L1 and L5 (the rest filled in by the library)."""
    root = tmp_path_factory.mktemp("data")
    spacing = 1.5
    volume = _stacked_vertebrae(labels_of("C1", "C2", "C5", "T1", "T8", "L1", "L5"), spacing)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((spacing,) * 3)
    (root / "masks_verse").mkdir()
    sitk.WriteImage(image, str(root / "masks_verse" / "sub-analytic_seg-vert_msk.nii.gz"))
    # Bodies-only scan (like mri_lumbar_bodies): L4, L5 and S1 bodies.
    bodies = np.zeros((BLOCK[0] * 3, *BLOCK[1:]), np.uint8)
    for i, label in enumerate(labels_of("S1", "L5", "L4")):
        _, body = _analytic_vertebra(BLOCK, label, spacing)
        bodies[i * BLOCK[0] : (i + 1) * BLOCK[0]][body] = label
    image = sitk.GetImageFromArray(bodies)
    image.SetSpacing((spacing,) * 3)
    (root / "mri_lumbar_bodies").mkdir()
    sitk.WriteImage(image, str(root / "mri_lumbar_bodies" / "analytic_vert-verse.nii.gz"))
    return shapes.build_shape_library(root, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("label", labels_of("C5", "L3", "L5"))  # C5 and L5 take the large ball, L3 the 2 mm one
def test_split_body_recovers_analytic_body(label):
    """The large ball that cuts the transverse processes of C2-C7 and L5 off the body also rounded off its endplate
    rims (body Dice 0.947 at C5 and 0.956 at L5, 0.988 at L3); the body is grown back in front of the canal."""
    whole, body = _analytic_vertebra((48, 80, 80), label, 1.0)
    split = shapes.split_body(whole, label)
    predicted = split == BODY
    dice = 2 * (predicted & body).sum() / (predicted.sum() + body.sum())
    assert dice > 0.98
    assert set(np.unique(split[whole])) == {BODY, POSTERIOR}
    assert not split[~whole].any()


def test_collapsed_or_out_of_region_bodies_are_no_shapes():
    typical = shapes.TYPICAL_BODY_MM

    def shape(label, factors):
        h, d, w = (t * f for t, f in zip(typical[label], factors))
        return shapes.Shape(label, np.zeros((2, 2, 2), np.uint8), np.zeros(3), -h / 2, h / 2, d, w, "test")

    l1, c6, c1 = labels_of("L1", "C6", "C1")
    assert shapes._plausible(shape(l1, (0.72, 1.1, 0.9)))
    assert not shapes._plausible(shape(l1, (0.4, 1.2, 1.2)))  # a fractured L1
    assert not shapes._plausible(shape(c6, (2.0, 2.25, 1.92)))  # a lumbar-sized body labelled C6
    assert shapes._plausible(shape(c1, (2.6, 2.6, 1.7)))  # C1 (no body) is not measured


def test_body_short_for_its_spine_is_no_shape():
    """sub-verse004's T9 and T10 are 0.81 and 0.86 of the height the rest of its spine gives them (17 and 19 mm)."""
    typical = shapes.TYPICAL_BODY_MM

    def shape(name, height_ratio):
        label = BY_NAME[name].label
        h, d, w = typical[label]
        return shapes.Shape(label, np.zeros((2, 2, 2), np.uint8), np.zeros(3), -h * height_ratio / 2,
                            h * height_ratio / 2, d, w, "test")

    spine = [shape("T9", 0.81), shape("T10", 0.86), shape("T11", 1.0), shape("T12", 1.0), shape("L2", 1.0)]
    ratio = shapes._spine_height_ratio(spine)
    assert ratio == pytest.approx(1.0)
    assert [shapes._plausible(s, ratio) for s in spine] == [False, False, True, True, True]
    assert shapes._plausible(spine[1])  # alone, 0.86 of a typical T10 passes


def test_vertebra_cut_by_the_field_of_view_is_skipped():
    """A vertebra reaching the image edge (sub-verse014's transverse processes, cut flat) is no shape."""
    spacing = 1.5
    volume = _stacked_vertebrae(labels_of("T12", "L1", "L2"), spacing)
    last = np.flatnonzero(volume.any(axis=(0, 2)))[-1]  # tip of the spinous processes (posterior)
    counts = []
    for cut in (volume, volume[:, : last - 5]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(cut))
        image.SetSpacing((spacing,) * 3)
        counts.append(len(shapes.canonical_vertebrae(image, "analytic")[0]))
    assert counts == [3, 0]


def test_tiny_library_has_every_level_and_caches(tiny_library, tmp_path_factory):
    for label in MAIN_LEVELS:
        assert tiny_library.shapes_for(label), BY_LABEL[label].name
        for shape in tiny_library.shapes_for(label):
            assert shape.z_low < 0 < shape.z_up
            assert (shape.mask == BODY).any()
    assert tiny_library.discs
    assert sorted(tiny_library.bodies) == labels_of("L4", "L5")  # S1 went into a sacrum
    assert "analytic_vert-verse" in tiny_library.shapes_for(shapes.S1_LABEL)[0].source
    sacrum = tiny_library.shapes_for(shapes.S1_LABEL)[0]
    assert sacrum.mask.shape[0] > 2 * (sacrum.z_up - sacrum.z_low)  # sacral mass below the S1 body
    # Filled level (T3 from its neighbours) has the size of a T3, not of its donor.
    t3_label = BY_NAME["T3"].label
    t3 = tiny_library.shapes_for(t3_label)[0]
    assert abs(t3.depth_mm - shapes.TYPICAL_BODY_MM[t3_label][1]) < 0.25 * shapes.TYPICAL_BODY_MM[t3_label][1]
    path = tmp_path_factory.mktemp("roundtrip") / "lib.npz"
    tiny_library.save(path)
    again = shapes.ShapeLibrary.load(path)
    assert again.summary() == tiny_library.summary()
    for label in MAIN_LEVELS:
        np.testing.assert_array_equal(again.shapes_for(label)[0].mask, tiny_library.shapes_for(label)[0].mask)


def test_case_contract(tiny_library):
    valid_levels = {0} | {lv.label for lv in LEVELS}
    for seed in range(8):
        case = synthesis.synthesize_case(np.random.default_rng(seed), tiny_library, spacing_mm=3.0, size_zyx=SMALL)
        assert case.spacing_mm == 3.0
        for array, dtype in ((case.image, np.float32), (case.tissue, np.uint8), (case.levels, np.uint8)):
            assert array.shape == SMALL and array.dtype == dtype
        assert np.isfinite(case.image).all()
        assert set(np.unique(case.tissue)) <= {0, BODY, POSTERIOR, DISC, synthesis.IGNORE}
        assert set(np.unique(case.levels).tolist()) <= valid_levels
        bone = (case.tissue == BODY) | (case.tissue == POSTERIOR)
        np.testing.assert_array_equal(case.levels > 0, bone)  # bodies and posterior elements carry a level
        assert not case.levels[case.tissue == DISC].any()  # discs carry none


def test_same_seed_same_case(tiny_library):
    a = synthesis.synthesize_case(np.random.default_rng(7), tiny_library, 3.0, SMALL)
    b = synthesis.synthesize_case(np.random.default_rng(7), tiny_library, 3.0, SMALL)
    c = synthesis.synthesize_case(np.random.default_rng(8), tiny_library, 3.0, SMALL)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.tissue, b.tissue)
    np.testing.assert_array_equal(a.levels, b.levels)
    assert not np.array_equal(a.image, c.image)


def test_levels_cranio_caudal_along_z(tiny_library):
    """Higher z = more cranial = earlier in LEVELS; checked on the body centroids of every crop."""
    seen = 0
    for seed in range(6):
        case = synthesis.synthesize_case(np.random.default_rng(100 + seed), tiny_library, modality="ct")
        body = case.tissue == BODY
        z_of = {}
        for label in np.unique(case.levels[body]):
            zs = np.nonzero(body & (case.levels == label))[0]
            if zs.size > 30:
                z_of[int(label)] = zs.mean()
        ordered = sorted(z_of, key=level_index)
        heights = [z_of[label] for label in ordered]
        assert all(a > b for a, b in zip(heights, heights[1:])), (seed, ordered, heights)
        seen += len(ordered) >= 3
    assert seen >= 3  # most crops show several vertebrae


def test_numbering_variants_and_t13_order(tiny_library):
    t12, t13, l1, l6 = labels_of("T12", "T13", "L1", "L6")
    counts = {"T13": 0, "L6": 0, "T11 last": 0}
    t13_seed = None
    for seed in range(1500):
        labels, _ = synthesis._level_sequence(np.random.default_rng(seed))
        cranio_caudal = labels[::-1]
        assert [level_index(lv) for lv in cranio_caudal] == sorted(level_index(lv) for lv in cranio_caudal)
        counts["T13"] += t13 in labels
        counts["L6"] += l6 in labels
        counts["T11 last"] += t12 not in labels
        if t13 in labels and t13_seed is None:
            t13_seed = seed
        if t12 not in labels:
            t11_last_seed = seed
    assert 0.01 < counts["T13"] / 1500 < 0.06
    assert 0.02 < counts["L6"] / 1500 < 0.07
    assert 0.005 < counts["T11 last"] / 1500 < 0.04
    subject = synthesis._Subject(np.random.default_rng(t13_seed), tiny_library)
    z = {pl.label: pl.centre[0] for pl in subject.vertebrae}
    assert z[t12] > z[t13] > z[l1]  # T12 above T13 above L1
    # with 11 thoracic vertebrae T11 carries the last rib, a short one: fewer rib voxels than its own long rib gives
    drawn = {}
    for last in (True, False):
        subject = synthesis._Subject(np.random.default_rng(t11_last_seed), tiny_library)
        t11 = subject.by_label[labels_of("T11")[0]]
        assert subject.lowest_thoracic is t11
        subject.vertebrae = [t11]
        if not last:
            subject.lowest_thoracic = None
        canvas = synthesis._Canvas((60, 160, 160), t11.centre - np.array([30.0, 80.0, 80.0]) * 2.0, 2.0)
        synthesis._draw_ribs(canvas, subject, np.random.default_rng(0))
        drawn[last] = int((canvas.cls == synthesis.RIB).sum())
    assert 0 < drawn[True] < 0.8 * drawn[False], drawn


def test_the_curve_bends_at_the_region_junctions_as_it_does_beside_them(tiny_library):
    """Each region's curve has its own gain; set at the region's edge, it bent the spine by over 10 degrees between
    C7 and T1 and between T12 and L1 in about one spine of four (a cue at the last thoracic label that real spines
    do not give), against 1-2 % at the joints beside them."""
    def bend(subject, upper, lower):
        tangents = [subject.tangents[np.searchsorted(subject.s_grid, subject.by_label[BY_NAME[n].label].s)]
                    for n in (upper, lower)]
        return abs(np.degrees(np.arctan2(tangents[0][1], tangents[0][0]) - np.arctan2(tangents[1][1], tangents[1][0])))

    bends = {pair: [] for pair in (("C7", "T1"), ("T1", "T2"), ("T11", "T12"), ("T12", "L1"), ("L1", "L2"))}
    for seed in range(300):
        subject = synthesis._Subject(np.random.default_rng(seed), tiny_library)
        for pair, values in bends.items():
            if all(BY_NAME[n].label in subject.by_label for n in pair):
                values.append(bend(subject, *pair))
    over = {pair: np.mean(np.array(values) > 10.0) for pair, values in bends.items()}
    assert max(over.values()) < 0.05, over


def test_limited_field_of_view(tiny_library):
    case = synthesis.synthesize_case(np.random.default_rng(5), tiny_library, 3.0, SMALL, modality="t2")
    image, tissue, levels = case.image.copy(), case.tissue.copy(), case.levels.copy()
    synthesis._limit_field_of_view(np.random.default_rng(0), image, tissue, levels)
    outside = tissue == synthesis.IGNORE
    assert 0 < outside.mean() < 0.75
    assert not levels[outside].any()
    assert (image[outside] == case.image.min()).all()
    np.testing.assert_array_equal(image[~outside], case.image[~outside])
    np.testing.assert_array_equal(levels[~outside], case.levels[~outside])
    # The unknown region is made of whole planes across one axis.
    def planes(axis: int) -> bool:
        profile = outside.any(axis=tuple(b for b in range(3) if b != axis))
        shape = [1, 1, 1]
        shape[axis] = -1
        return np.array_equal(outside, np.broadcast_to(profile.reshape(shape), outside.shape))

    assert any(planes(axis) for axis in range(3))


@pytest.mark.parametrize("modality", synthesis.MODALITIES)
def test_every_modality(tiny_library, modality):
    case = synthesis.synthesize_case(np.random.default_rng(3), tiny_library, 3.0, SMALL, modality=modality)
    assert np.isfinite(case.image).all() and case.image.std() > 0


def test_unknown_modality(tiny_library):
    with pytest.raises(ValueError, match="modality"):
        synthesis.synthesize_case(np.random.default_rng(0), tiny_library, modality="pet")
    for spacing in (0.0, -2.0, float("nan")):  # a ZeroDivisionError, numpy's "Number of samples, -163", ...
        with pytest.raises(ValueError, match=f"spacing {spacing}: a finite number of mm above 0"):
            synthesis.synthesize_case(np.random.default_rng(0), tiny_library, spacing_mm=spacing)
    for size in ((0, 32, 32), (32, 32)):  # empty arrays, or a broadcast error
        with pytest.raises(ValueError, match="three whole numbers of voxels"):
            synthesis.synthesize_case(np.random.default_rng(0), tiny_library, size_zyx=size)


def test_real_library(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"real data not available at {DATA}")
    library = shapes.build_shape_library(DATA, cache_dir=tmp_path)
    for label in MAIN_LEVELS:
        assert library.shapes_for(label), BY_LABEL[label].name
    assert len(library.discs) >= 10
    assert len(library.shapes_for(shapes.S1_LABEL)) >= 3  # sacra built on real S1 bodies
    t11_to_l5 = [lv.label for lv in LEVELS[level_index("T11") : level_index("L5") + 1] if not lv.transitional]
    assert all(len(library.bodies.get(label, [])) >= 5 for label in t11_to_l5)  # T11..L5 real bodies
    assert len(library.c1_offsets) >= 1
    assert 10 < library.c1_offsets[:, 0].mean() < 30  # atlas sits above the axis body
    crops = DATA / "crops_tptbox"
    # the crops' file names carry the VerSe label of the level each is centred on (L3, C6)
    for stem, complete in (("sub-ct_{}_label-22_msk", labels_of("L3", "L4")),
                           ("sub-mri_{}_label-6_msk", labels_of("C6", "C7"))):
        dice = shapes.body_split_dice(sitk.ReadImage(str(crops / (stem.format("seg-vert") + ".nii.gz"))),
                                      sitk.ReadImage(str(crops / (stem.format("seg-subreg") + ".nii.gz"))))
        for label in complete:
            assert dice[label] > 0.975, (stem, label, dice)  # 0.981-0.991 (0.97 at C6/C7 before the rims grew back)
    l1 = [shape.source for shape in library.shapes_for(BY_NAME["L1"].label)]
    assert l1 and not any("verse004" in source for source in l1)  # its L1 is fractured: 10 mm tall
    l5 = [shape.source for shape in library.shapes_for(BY_NAME["L5"].label)]
    assert l5 and not any("verse014" in source for source in l5)  # cut by its 80 mm field of view
    # Synthetic subjects: T8-T10 bodies as tall as T7 and T11 (16-19 mm when sub-verse004's short T9/T10 stood in),
    # C3-C4 centroids 19.6 mm apart as on the masks (23 mm with anatomical cervical discs on them).
    heights, c3_c4 = {name: [] for name in ("T7", "T9", "T11")}, []
    for seed in range(200):
        subject = synthesis._Subject(np.random.default_rng(seed), library)
        for name, values in heights.items():
            pl = subject.by_label.get(BY_NAME[name].label)
            if pl is not None:
                values.append((pl.shape.z_up - pl.shape.z_low) * pl.scale[0] / subject.scale)
        c3, c4 = (subject.by_label[label].centre for label in labels_of("C3", "C4"))
        c3_c4.append(np.linalg.norm(c3 - c4))
    median = {name: np.median(values) for name, values in heights.items()}
    assert median["T9"] > 0.9 * min(median["T7"], median["T11"]), median
    assert 18.0 < np.median(c3_c4) < 21.0


def test_mr_presets_disc_to_body_contrast():
    """Nominal nucleus-to-marrow ratios of the MR presets, which the synthetic disc-to-body ratios follow: real
    training scans give water 1.51-3.03, T1 0.71, TIRM 1.29 (they were 1.4, 0.5 and 5.3)."""
    presets = synthesis._PRESETS
    ratio = {name: presets[name][synthesis.NUCLEUS, 0] / presets[name][synthesis.MARROW, 0]
             for name in ("water", "t1", "stir")}
    assert 2.0 < ratio["water"] < 3.0 and 0.6 < ratio["t1"] < 0.8 and 2.0 < ratio["stir"] < 3.0, ratio


@pytest.mark.parametrize("factor, phase", [(2.7, 0.37), (1.9, 0.9), (3.0, 0.5)])
def test_thick_slices_do_not_shift_the_image(factor, phase):
    # A ramp stays a ramp where slices lie on both sides: the slices are centred where they are sampled. Rounding the
    # sample positions to whole voxels shifted the image by up to half a voxel against the labels.
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32), (3, 5, 40)).copy()
    out = synthesis._thick_slices(ramp, 2, factor, phase)
    first, last = int(np.ceil(phase * factor)) + 4, 40 - int(2 * factor) - 4  # away from the blur's edge effects
    np.testing.assert_allclose(out[:, :, first:last], ramp[:, :, first:last], atol=1e-3)


def test_a_shape_folder_that_is_none_or_holds_no_vertebra_is_named(tmp_path):
    with pytest.raises(ValueError, match="nowhere: no such folder of labelled vertebrae"):
        shapes.build_shape_library(tmp_path / "nowhere", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no whole-vertebra masks"):
        shapes.build_shape_library(tmp_path, cache_dir=tmp_path)


def test_a_shape_library_build_can_be_cancelled_and_caches_nothing(tmp_path):
    """A build takes about a minute; Cancel in Slicer's training went unheard until it was done."""
    (tmp_path / "data" / "masks_verse").mkdir(parents=True)
    mask = tmp_path / "data" / "masks_verse" / "a_seg-vert_msk.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkUInt8), str(mask))
    with pytest.raises(Cancelled):
        shapes.build_shape_library(tmp_path / "data", cache_dir=tmp_path / "cache", cancel=lambda: True)
    assert not (tmp_path / "cache").exists()


def test_every_disc_is_drawn_but_a_fused_sacralised_one(tiny_library):
    """A thin cervical disc made thinner (C3-C4 is 1.5 mm, and a dark disc 0.4-0.8 of that) was left out, and the
    bodies beside it touched: about one subject in eight."""
    for seed in range(200):
        _, sacralised = synthesis._level_sequence(np.random.default_rng(seed))
        subject = synthesis._Subject(np.random.default_rng(seed), tiny_library)
        pairs = len(subject.vertebrae) - 2  # every neighbour pair but C1-C2, which has no disc
        assert pairs - sacralised <= len(subject.discs) <= pairs, seed


def test_a_face_the_field_of_view_cuts_gets_no_cortex():
    """The cortical shell is the bone's surface inside the body, not where the crop cuts through a vertebra (a cut
    face read as bright as cortex: 813 HU against 430 three planes in, on a synthetic CT crop)."""
    cls = np.zeros((8, 8, 8), np.uint8)
    cls[:5, 2:6, 2:6] = synthesis._BONE_CLASSES[0]  # a bone cut by the crop's first plane
    synthesis._add_cortex(cls)
    shell = cls == synthesis.CORTEX
    assert not shell[0, 3:5, 3:5].any()  # the cut face, inside its rim (the sides' shell runs on to the cut)
    assert shell[4, 2:6, 2:6].all() and shell[:4, 2, 2:6].all()  # the bone's own end and sides
    assert not shell[1:4, 3:5, 3:5].any()  # the inside


def test_sacralised_l5_rate_and_fusion(tiny_library):
    """About 3 % of subjects have L5 fused to the sacrum: no L5/S1 disc, or a sliver under 2 mm."""
    l5 = BY_NAME["L5"].label
    sacralised = [seed for seed in range(1500) if synthesis._level_sequence(np.random.default_rng(seed))[1]]
    assert 0.01 < len(sacralised) / 1500 < 0.06
    heights = []
    for seed in sacralised[:12]:
        subject = synthesis._Subject(np.random.default_rng(seed), tiny_library)
        low, up = subject.by_label[shapes.S1_LABEL].s, subject.by_label[l5].s
        between = [d for d, _ in subject.discs if low < d.s < up]
        heights += [d.scale[0] * (d.shape.z_up - d.shape.z_low) - 2.0 for d in between] or [0.0]
    assert max(heights) < 2.0 and min(heights) == 0.0, heights


def test_picked_shapes_come_from_the_level_or_a_neighbour_of_its_region_rescaled(tiny_library):
    """A level borrows a neighbour's shape (same region) a quarter of the time; T13 and L6 always take T12's and L5's;
    the factors bring the donor to the level's typical size."""
    t12, t13, l5, l6 = labels_of("T12", "T13", "L5", "L6")
    rng = np.random.default_rng(0)
    borrowed = 0
    for label in labels_of("C4", "C7", "T1", "T6", "T12", "L1", "L4") + [t13, l6]:  # C7/T1: a region's edge
        for _ in range(40):
            shape, factors = synthesis._pick_shape(rng, tiny_library, label)
            donor = shape.label
            if label == t13 or label == l6:
                assert donor == {t13: t12, l6: l5}[label]
            else:
                assert abs(level_index(donor) - level_index(label)) <= 1
                assert BY_LABEL[donor].region == BY_LABEL[label].region
                borrowed += donor != label
            np.testing.assert_allclose(factors, shapes.size_ratio(label, donor))
    assert 0.1 < borrowed / 280 < 0.4


def test_another_scans_body_is_swapped_in_at_the_shapes_size(tiny_library):
    """Half the levels with real bodies (L4, L5 in the tiny library) take one, scaled to the shape's own body."""
    swapped = 0
    for seed in range(20):
        subject = synthesis._Subject(np.random.default_rng(seed), tiny_library)
        for pl in subject.vertebrae:
            if pl.body is None:
                continue
            swapped += 1
            np.testing.assert_allclose(
                [pl.body.z_up - pl.body.z_low, pl.body.depth_mm, pl.body.width_mm] * pl.body_scale,
                [pl.shape.z_up - pl.shape.z_low, pl.shape.depth_mm, pl.shape.width_mm] * pl.scale, rtol=1e-6)
    assert 8 <= swapped <= 32, swapped


def test_sagittal_curves_and_scoliosis(tiny_library):
    """Lordosis in the neck and the lumbar spine, kyphosis in the thorax (the tangent leans further back going up
    through each), and a scoliosis (coronal swing over 18 degrees) in a minority of subjects; compression
    fractures are rare."""
    def sagittal(subject, name):
        t = subject.tangents[np.searchsorted(subject.s_grid, subject.by_label[BY_NAME[name].label].s)]
        return np.degrees(np.arctan2(t[1], t[0]))

    turns = {"cervical": [], "thoracic": [], "lumbar": []}
    scoliotic, fractured, bodies = 0, 0, 0
    for seed in range(60):
        subject = synthesis._Subject(np.random.default_rng(seed), tiny_library)
        turns["cervical"].append(sagittal(subject, "C2") - sagittal(subject, "C7"))
        turns["thoracic"].append(sagittal(subject, "T11") - sagittal(subject, "T3"))
        turns["lumbar"].append(sagittal(subject, "L1") - sagittal(subject, "L5"))
        coronal = np.degrees(np.arcsin(np.clip(subject.tangents[:, 2], -1, 1)))
        scoliotic += np.ptp(coronal) > 18.0  # 8-25 degree waves in 15 % of subjects (16-50 degrees peak to peak)
        for pl in subject.vertebrae:
            if BY_NAME["T4"].label <= pl.label <= BY_NAME["L5"].label:  # height against depth and width, as picked
                ratio = np.asarray(synthesis.size_ratio(pl.label, pl.shape.label))
                bodies += 1
                fractured += pl.scale[0] / pl.scale[1:].mean() < 0.85 * ratio[0] / ratio[1:].mean()
    median = {region: np.median(values) for region, values in turns.items()}
    assert median["cervical"] > 10 and median["thoracic"] > 10 and median["lumbar"] > 10, median
    assert 2 <= scoliotic <= 20, scoliotic
    assert fractured / bodies < 0.1, (fractured, bodies)


def _thoracic_crop(tiny_library, monkeypatch, seed, name="T6"):
    """A synthetic CT case with its crop centred on level ``name``, and the image-class map it was drawn from."""
    drawn = {}

    def centre(rng, subject, extent):
        drawn["centre"] = subject.by_label[BY_NAME[name].label].centre
        return drawn["centre"]

    def appearance(rng, cls, levels, modality, spacing):
        drawn["cls"] = cls.copy()
        return np.zeros(cls.shape, np.float32)

    monkeypatch.setattr(synthesis, "_crop_centre", centre)
    monkeypatch.setattr(synthesis, "_appearance", appearance)
    case = synthesis.synthesize_case(np.random.default_rng(seed), tiny_library, 2.0, (48, 64, 64), modality="ct")
    return case, drawn["cls"]


def test_a_thoracic_crop_holds_ribs_canal_cord_and_discs_behind_and_between_the_bodies(tiny_library, monkeypatch):
    t6 = BY_NAME["T6"].label
    for seed in range(3):
        case, cls = _thoracic_crop(tiny_library, monkeypatch, seed)
        if (case.tissue == synthesis.IGNORE).any():
            continue
        body, post = case.tissue == BODY, case.tissue == POSTERIOR
        # the crop is centred on T6's body
        centroid = np.argwhere(body & (case.levels == t6)).mean(axis=0)
        assert np.abs(centroid - (np.array([48, 64, 64]) - 1) / 2).max() < 6, centroid
        # posterior elements behind the body (y grows posteriorly), canal and cord behind the body too
        b, p = body & (case.levels == t6), post & (case.levels == t6)
        assert np.argwhere(p)[:, 1].mean() > np.argwhere(b)[:, 1].mean() + 5
        for canal_class in (synthesis.CSF, synthesis.CORD):
            assert (cls == canal_class).sum() > 100, canal_class
            assert np.argwhere(cls == canal_class)[:, 1].mean() > np.argwhere(body)[:, 1].mean() + 3
        assert (cls == synthesis.RIB).sum() > 100  # ribs on thoracic levels
        # the image classes follow the targets: bodies are marrow (with its shell), posterior elements bone, discs
        # annulus and nucleus
        assert np.isin(cls[body], [synthesis.MARROW, synthesis.CORTEX]).mean() > 0.95
        assert np.isin(cls[post], [synthesis.POST, synthesis.CORTEX]).mean() > 0.95
        disc = case.tissue == DISC
        assert disc.sum() > 100
        assert np.isin(cls[disc], [synthesis.ANNULUS, synthesis.NUCLEUS, synthesis.NUCLEUS_DARK]).all()
        return
    pytest.fail("every crop was a limited field of view")


def test_modality_field_of_view_and_cortex_are_drawn_at_their_rates(tiny_library, monkeypatch):
    """No modality given: each preset is drawn (CT about 45 %); 15 % of crops keep only a slab, 80 % get a cortex."""
    calls = {"fov": 0, "cortex": 0}
    limit, cortex = synthesis._limit_field_of_view, synthesis._add_cortex
    monkeypatch.setattr(synthesis, "_appearance", lambda rng, cls, *a: np.zeros(cls.shape, np.float32))
    monkeypatch.setattr(synthesis, "_limit_field_of_view",
                        lambda *a: calls.__setitem__("fov", calls["fov"] + 1) or limit(*a))
    monkeypatch.setattr(synthesis, "_add_cortex",
                        lambda *a: calls.__setitem__("cortex", calls["cortex"] + 1) or cortex(*a))
    modalities = []
    n = 120
    for seed in range(n):
        case = synthesis.synthesize_case(np.random.default_rng(seed), tiny_library, 8.0, (8, 8, 8))
        modalities.append(case.modality)
        assert ((case.tissue == synthesis.IGNORE).any()) <= (calls["fov"] > 0)
    assert set(modalities) == set(synthesis.MODALITIES)
    assert 0.3 < modalities.count("ct") / n < 0.6
    assert 0.05 < calls["fov"] / n < 0.3 and 0.65 < calls["cortex"] / n < 0.92, calls


def test_mr_presets_order_the_tissues_as_their_sequences_do():
    """T1: fat bright, CSF dark; T2: CSF bright; STIR and Dixon water: fat suppressed; Dixon fat: fat bright."""
    p = {name: table[:, 0] for name, table in synthesis._PRESETS.items()}
    fat, muscle, csf, cord = synthesis.FAT, synthesis.MUSCLE, synthesis.CSF, synthesis.CORD
    assert p["t1"][fat] > p["t1"][muscle] > p["t1"][csf]
    assert p["t2"][csf] > p["t2"][cord] and p["t2"][csf] > p["t2"][muscle]
    assert p["stir"][fat] < 0.5 * p["stir"][muscle] and p["water"][fat] < 0.5 * p["water"][muscle]
    assert p["fat"][fat] > 2 * p["fat"][muscle]
    assert p["ct"][synthesis.MARROW] > p["ct"][muscle] > p["ct"][fat] > p["ct"][synthesis.LUNG]
    for name in ("t1", "t2", "stir", "water", "fat"):  # the case's means follow its own preset
        means = np.array([synthesis._class_intensities(np.random.default_rng(s), name)[0] for s in range(20)])
        assert np.corrcoef(np.median(means, axis=0), p[name])[0, 1] > 0.95, name


def test_mr_images_carry_a_bias_field():
    """A smooth multiplicative field: the means of a uniform tissue over the eight octants of the image differ by
    15-110 % (1-5 % without it: texture and noise average out)."""
    cls = np.full((40, 40, 40), synthesis.MUSCLE, np.uint8)
    levels = np.zeros_like(cls)
    spread = []
    for seed in range(8):
        image = synthesis._appearance(np.random.default_rng(seed), cls, levels, "t2", 2.0)
        octants = [image[a : a + 20, b : b + 20, c : c + 20].mean() for a in (0, 20) for b in (0, 20) for c in (0, 20)]
        spread.append(max(octants) / min(octants))
    assert np.median(spread) > 1.1, spread


def test_the_sacrums_rudimentary_discs_are_disc_targets(tiny_library, monkeypatch):
    """The sacral shape's discs (S1/S2 .. S4/S5, each visible at random) are drawn as disc tissue without a level."""
    s1 = shapes.S1_LABEL
    where = {}

    def centre(rng, subject, extent):  # on the sacral shape's discs
        pl = subject.by_label[s1]
        local = np.argwhere(pl.shape.mask == shapes.SACRAL_DISC).mean(axis=0) - pl.shape.centre
        where["centre"] = pl.centre + pl.rot @ (local * pl.scale)
        return where["centre"]

    monkeypatch.setattr(synthesis, "_crop_centre", centre)
    monkeypatch.setattr(synthesis, "_appearance", lambda rng, cls, *a: np.zeros(cls.shape, np.float32))
    assert (tiny_library.shapes_for(s1)[0].mask == shapes.SACRAL_DISC).any()
    for seed in range(6):
        case = synthesis.synthesize_case(np.random.default_rng(seed), tiny_library, 2.0, (24, 48, 48), modality="ct")
        if (case.tissue == synthesis.IGNORE).any():
            continue
        disc = case.tissue == DISC
        assert disc[8:16, 16:32, 16:32].sum() > 10  # at the middle of the crop
        assert not case.levels[disc].any()
        return
    pytest.fail("every crop was a limited field of view")


def test_each_disc_fills_the_gap_between_its_two_bodies(tiny_library):
    """One disc per neighbour pair (not C1-C2, not a fused L5-S1), centred in the gap between the two bodies'
    endplates and as high as that gap; lumbar discs are thick, cervical ones thin."""
    c1, l4, l5, c3 = labels_of("C1", "L4", "L5", "C3")
    gaps = {l4: [], l5: [], c3: []}
    for seed in range(30):
        subject = synthesis._Subject(np.random.default_rng(seed), tiny_library)
        for low, up in zip(subject.vertebrae, subject.vertebrae[1:]):  # caudal to cranial
            if up.label == c1:
                continue
            top = low.s + low.shape.z_up * low.scale[0]
            bottom = up.s + up.shape.z_low * up.scale[0]
            inside = [d for d, _ in subject.discs if top < d.s < bottom]
            if low.label == shapes.S1_LABEL and bottom - top < 2.0:  # sacralised: fused
                assert len(inside) <= 1
                continue
            assert len(inside) == 1, (seed, BY_LABEL[up.label].name)
            disc = inside[0]
            assert disc.s == pytest.approx((top + bottom) / 2, abs=0.01)
            assert disc.scale[0] * (disc.shape.z_up - disc.shape.z_low) - 2.0 == pytest.approx(bottom - top, abs=0.01)
            if up.label in gaps:
                gaps[up.label].append(bottom - top)
    median = {BY_LABEL[label].name: np.median(values) for label, values in gaps.items()}
    assert median["L4"] > 7 and median["L5"] > 7 and median["C3"] < 3, median


def test_each_vertebra_gets_its_own_marrow_intensity():
    """Marrow varies from vertebra to vertebra (tens of HU), beyond the texture, which averages out."""
    cls = np.full((40, 24, 24), synthesis.MARROW, np.uint8)
    levels = np.full(cls.shape, BY_NAME["L2"].label, np.uint8)
    levels[20:] = BY_NAME["L1"].label
    differences = []
    for seed in range(8):
        image = synthesis._appearance(np.random.default_rng(seed), cls, levels, "ct", 2.0)
        differences.append(abs(image[2:18].mean() - image[22:38].mean()))
    assert np.median(differences) > 15.0, differences


def test_a_swapped_in_body_is_body_of_its_level(tiny_library, monkeypatch):
    l4 = BY_NAME["L4"].label
    seeds = [seed for seed in range(40)
             if synthesis._Subject(np.random.default_rng(seed), tiny_library).by_label[l4].body is not None]
    for seed in seeds[:4]:
        case, _ = _thoracic_crop(tiny_library, monkeypatch, seed, "L4")
        if (case.tissue == synthesis.IGNORE).any():
            continue
        body, post = (case.tissue == BODY) & (case.levels == l4), (case.tissue == POSTERIOR) & (case.levels == l4)
        assert body.sum() > 500
        assert np.abs(np.argwhere(body).mean(axis=0) - (np.array([48, 64, 64]) - 1) / 2).max() < 6
        assert np.argwhere(post)[:, 1].mean() > np.argwhere(body)[:, 1].mean() + 5
        return
    pytest.fail("no crop on a swapped-in L4 body")


def test_missing_levels_are_filled_from_the_nearest_level_at_their_own_size(tiny_library):
    """T3 (absent from the tiny library) comes from T1, the nearest level present, rescaled by the typical T3/T1
    body ratios, each axis with its own."""
    t1, t3, l3, c5 = labels_of("T1", "T3", "L3", "C5")
    typical = shapes.TYPICAL_BODY_MM
    assert shapes.size_ratio(l3, c5) == pytest.approx([typical[l3][k] / typical[c5][k] for k in range(3)])
    donor, filled = tiny_library.shapes_for(t1)[0], tiny_library.shapes_for(t3)[0]
    assert filled.source.startswith(donor.source + ">")
    ratio = [typical[t3][k] / typical[t1][k] for k in range(3)]
    assert [filled.z_up - filled.z_low, filled.depth_mm, filled.width_mm] == pytest.approx(
        [(donor.z_up - donor.z_low) * ratio[0], donor.depth_mm * ratio[1], donor.width_mm * ratio[2]])


def test_canonical_frames_follow_a_tilted_spine():
    """Each vertebra's superior axis runs along its neighbours' centroids: on a spine tilted 20 degrees towards
    the back, 20 degrees from the scanner axis (not the scanner axis itself)."""
    spacing = 1.5
    volume = _stacked_vertebrae(labels_of("T12", "L1", "L2"), spacing)
    volume = np.pad(volume, ((10, 10), (40, 40), (4, 4)))
    tilted = ndimage.rotate(volume, 20.0, axes=(0, 1), order=0, reshape=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(tilted))
    image.SetSpacing((spacing,) * 3)
    _, frames = shapes.canonical_vertebrae(image, "tilted")
    assert BY_NAME["L1"].label in frames
    for label, (_, rot) in frames.items():
        angle = np.degrees(np.arccos(abs(rot[0, 0])))
        assert 15.0 < angle < 25.0, (BY_LABEL[label].name, angle)
