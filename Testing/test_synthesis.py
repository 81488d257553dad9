"""Shape library (SpineLabelTrainingLib.shapes) and synthetic whole-spine cases (SpineLabelTrainingLib.synthesis).

Most tests run on a tiny library built from analytic vertebra masks written to tmp_path, so they need no data; the
real-data test skips when ../shared/data is absent.
"""

from __future__ import annotations


import numpy as np
import pytest
import SimpleITK as sitk

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


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory) -> shapes.ShapeLibrary:
    """Library from one analytic 'scan' holding C1, C2, C5, T1, T8, L1 and L5 (the rest filled in by the library)."""
    root = tmp_path_factory.mktemp("data")
    spacing = 1.5
    labels = labels_of("C1", "C2", "C5", "T1", "T8", "L1", "L5")
    block = (40, 80, 64)
    volume = np.zeros((block[0] * len(labels), *block[1:]), np.uint8)
    for i, label in enumerate(labels[::-1]):  # caudal first: z index grows towards the head
        whole, _ = _analytic_vertebra(block, label, spacing)
        volume[i * block[0] : (i + 1) * block[0]][whole] = label
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((spacing,) * 3)
    (root / "masks_verse").mkdir()
    sitk.WriteImage(image, str(root / "masks_verse" / "sub-analytic_seg-vert_msk.nii.gz"))
    # Bodies-only scan (like mri_lumbar_bodies): L4, L5 and S1 bodies.
    bodies = np.zeros((block[0] * 3, *block[1:]), np.uint8)
    for i, label in enumerate(labels_of("S1", "L5", "L4")):
        _, body = _analytic_vertebra(block, label, spacing)
        bodies[i * block[0] : (i + 1) * block[0]][body] = label
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
    spacing, block = 1.5, (40, 80, 64)
    labels = labels_of("T12", "L1", "L2")
    volume = np.zeros((block[0] * len(labels), *block[1:]), np.uint8)
    for i, label in enumerate(labels[::-1]):
        whole, _ = _analytic_vertebra(block, label, spacing)
        volume[i * block[0] : (i + 1) * block[0]][whole] = label
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
