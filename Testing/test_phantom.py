"""Tests of the procedural spine phantom (SpineLabelLib.phantom)."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SpineLabelLib.phantom import FOVS, make_phantom
from SpineLabelLib.vertebrae import BODY, BY_LABEL, BY_NAME, DISC, LEVELS, POSTERIOR, TISSUE_NAMES

SMALL = dict(size=(64, 64, 96), spacing=(2.5, 2.5, 2.5))
STANDARD = [lv.name for lv in LEVELS if not lv.transitional]  # C1..L5, S1
EXPECTED = {
    "whole": STANDARD,
    "cervical": STANDARD[: STANDARD.index("T2") + 1],
    "thoracic": STANDARD[STANDARD.index("C7") : STANDARD.index("L1") + 1],
    "lumbar": STANDARD[STANDARD.index("T11") :],
}


def arrays(phantom):
    """(image, labels, tissue) as numpy (z, y, x) arrays."""
    return tuple(sitk.GetArrayFromImage(img) for img in (phantom.image, phantom.labels, phantom.tissue))


def present(labels: np.ndarray) -> list[str]:
    """Level names present in a label map, ordered from cranial (high z) to caudal by their centroid z."""
    values = [int(v) for v in np.unique(labels) if v]
    centroid = {v: np.nonzero(labels == v)[0].mean() for v in values}
    return [BY_LABEL[v].name for v in sorted(values, key=lambda v: -centroid[v])]


@pytest.fixture(scope="module")
def fov_phantoms():
    return {fov: make_phantom("ct", fov, seed=1) for fov in FOVS}


def test_deterministic_per_seed():
    a, b, c = (arrays(make_phantom("mr", "lumbar", seed=s, **SMALL)) for s in (7, 7, 8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])  # another seed, another anatomy
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("fov", FOVS)
def test_fov_levels_in_cranio_caudal_order(fov_phantoms, fov):
    _, labels, tissue = arrays(fov_phantoms[fov])
    names = present(labels)
    expected = EXPECTED[fov]
    # the expected levels, in anatomical order from high z to low z ...
    assert [n for n in names if n in expected] == expected
    # ... with their bodies inside the field of view (not touching the first or last slice) ...
    bodies = np.where(tissue == BODY, labels, 0)
    edges = set(np.unique(bodies[0]).tolist()) | set(np.unique(bodies[-1]).tolist())
    assert not edges & {BY_NAME[n].label for n in expected}
    # ... and otherwise only parts of the one or two levels beyond each end
    first, last = names.index(expected[0]), names.index(expected[-1])
    assert names[first : last + 1] == expected
    assert first <= 2 and len(names) - 1 - last <= 2, names


def test_labels_and_tissue_consistent(fov_phantoms):
    _, labels, tissue = arrays(fov_phantoms["whole"])
    assert labels.dtype == np.uint8 and tissue.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0} | set(BY_LABEL)
    assert set(np.unique(tissue).tolist()) == set(range(len(TISSUE_NAMES)))
    labelled = labels > 0
    np.testing.assert_array_equal(labelled, (tissue == BODY) | (tissue == POSTERIOR))
    assert not labelled[tissue == DISC].any()  # discs are unlabelled
    assert (tissue[labels == BY_NAME["C1"].label] == BODY).all()
    assert (tissue[labels == BY_NAME["S1"].label] == BODY).all()
    for name in ("C5", "T6", "L3"):
        classes = np.bincount(tissue[labels == BY_NAME[name].label], minlength=len(TISSUE_NAMES))
        assert classes[BODY] > 0 and classes[POSTERIOR] > 0, name  # a body and posterior elements


def test_vertebral_body_proportions():
    phantom = make_phantom("ct", "whole", spacing=(1.0, 1.0, 1.0), seed=2)
    _, labels, tissue = arrays(phantom)
    expected_width = {"C5": (12, 24), "T6": (22, 35), "L3": (38, 56)}
    expected_height = {"C5": (9, 16), "T6": (15, 24), "L3": (22, 32)}
    for name in expected_width:
        body = (labels == BY_NAME[name].label) & (tissue == BODY)
        z, y, x = np.nonzero(body)
        middle = body[int(round(z.mean()))]
        width = np.ptp(np.nonzero(middle)[1]) + 1
        height = np.ptp(z[np.abs(x - x.mean()) < 3]) + 1  # along z through the body's middle column
        assert expected_width[name][0] <= width <= expected_width[name][1], (name, width)
        assert expected_height[name][0] <= height <= expected_height[name][1] + 4, (name, height)
    # discs: thin in the neck, thick in the lumbar spine
    discs, count = ndimage.label(tissue == DISC)
    assert count == 23  # C2/C3 .. L5/S1
    thickness = []  # along z through each disc's centre, mm; labels are numbered along z, caudal first
    for centre in ndimage.center_of_mass(discs > 0, discs, range(1, count + 1)):
        z, y, x = (int(round(c)) for c in centre)
        thickness.append(int((discs[:, y, x] == discs[z, y, x]).sum()))
    assert 2 <= thickness[-1] <= 7 and 7 <= thickness[0] <= 14, thickness


def test_geometry_matches_size_and_spacing():
    phantom = make_phantom("ct", "thoracic", size=(40, 50, 60), spacing=(3.0, 2.5, 2.0), seed=0)
    for image in (phantom.image, phantom.labels, phantom.tissue):
        assert image.GetSize() == (40, 50, 60)
        assert image.GetSpacing() == (3.0, 2.5, 2.0)
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert image.GetOrigin() == phantom.image.GetOrigin()
    assert phantom.image.GetPixelID() == sitk.sitkInt16
    assert make_phantom("mr", **SMALL).image.GetPixelID() == sitk.sitkFloat32


def test_spine_posterior_and_centred(fov_phantoms):
    _, labels, _ = arrays(fov_phantoms["lumbar"])
    z, y, x = np.nonzero(labels)
    assert y.mean() > 0.5 * labels.shape[1]  # behind the middle (y grows posteriorly)
    assert abs(x.mean() - labels.shape[2] / 2) < 0.1 * labels.shape[2]


def test_ct_intensities(fov_phantoms):
    image, labels, tissue = arrays(fov_phantoms["whole"])
    assert image.min() >= -1024 and image.max() <= 3071
    bone = np.median(image[tissue == BODY])
    assert 150 < bone < 700
    assert 40 < np.median(image[tissue == DISC]) < 150
    assert (image < -900).mean() > 0.05  # air outside the body (and in the lungs)
    assert np.median(image[labels > 0]) > 150 > np.median(image[labels == 0])
    fat = ((image > -140) & (image < -60)).mean()
    assert fat > 0.01  # subcutaneous fat is there
    # ribs: bone-dense unlabelled voxels far lateral of the spine, but only in the thorax
    dense = (image > 400) & (labels == 0)
    thorax = labels == BY_NAME["T6"].label
    lumbar = labels == BY_NAME["L3"].label
    x_spine = np.nonzero(labels)[2].mean()
    lateral = np.abs(np.arange(image.shape[2]) - x_spine) * 1.5 > 60  # mm
    for region, has_ribs in ((thorax, True), (lumbar, False)):
        zs = np.unique(np.nonzero(region)[0])
        assert (dense[zs][:, :, lateral].sum() > 20) == has_ribs


def test_mr_contrast():
    image, labels, tissue = arrays(make_phantom("mr", "lumbar", seed=3))
    assert image.dtype == np.float32 and image.min() >= 0
    marrow = np.median(image[tissue == BODY])
    disc = np.percentile(image[tissue == DISC], 90)
    assert disc > 1.5 * marrow
    assert np.median(image[:, :, :2]) < 0.2 * marrow or np.median(image[:, -2:, :]) < 0.2 * marrow  # air


@pytest.mark.parametrize(
    "insert, after, label",
    [("T13", "T12", 28), ("L6", "L5", 25)],
)
def test_transitional_levels(insert, after, label):
    names = list(STANDARD)
    names.insert(names.index(after) + 1, insert)
    _, labels, _ = arrays(make_phantom("ct", "lumbar", seed=4, levels=names))
    order = present(labels)
    assert order[order.index(after) + 1] == insert
    assert BY_NAME[insert].label == label and (labels == label).sum() > 1000


def test_eleven_thoracic_levels():
    names = [n for n in STANDARD if n != "T12"]
    _, labels, _ = arrays(make_phantom("ct", "thoracic", seed=4, levels=names))
    order = present(labels)
    assert "T12" not in order and order[order.index("T11") + 1] == "L1"


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_phantom("pet")
    with pytest.raises(ValueError):
        make_phantom(fov="pelvis")
    with pytest.raises(ValueError):
        make_phantom(levels=["L2", "L1"])
    with pytest.raises(ValueError):
        make_phantom(levels=["L1", "L7"])
    with pytest.raises(ValueError):
        make_phantom(fov="lumbar", levels=["C1", "C2", "C3"])
    with pytest.raises(ValueError):
        make_phantom(size=(10, 10), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="three positive numbers"):
        make_phantom(spacing=(float("nan"), 1, 1))
    with pytest.raises(ValueError, match="spacing .* leaves fewer than 2 voxels"):
        make_phantom(spacing=(1e6, 1e6, 1e6))
    for seed in (-1, 1.5, True):  # numpy's message for -1 named no argument
        with pytest.raises(ValueError, match="seed must be a whole number, 0 or more"):
            make_phantom(seed=seed, **SMALL)
    for spacing in (0.001, 1000.0):  # an image of no vertebra was written
        with pytest.raises(ValueError, match="holds no vertebra of the lumbar field of view"):
            make_phantom(fov="lumbar", size=(48, 48, 80), spacing=(spacing,) * 3)


def test_save_writes_image_and_labels(tmp_path):
    phantom = make_phantom("mr", "cervical", seed=5, **SMALL)
    paths = phantom.save(tmp_path / "case.nii.gz")
    assert paths == [tmp_path / "case.nii.gz", tmp_path / "case_seg-vert_msk.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz", "case_seg-vert_msk.nii.gz"]  # no temporaries
    image, labels = (sitk.ReadImage(str(p)) for p in paths)
    for read, original in ((image, phantom.image), (labels, phantom.labels)):
        assert read.GetSize() == original.GetSize()
        np.testing.assert_allclose(read.GetSpacing(), original.GetSpacing())
        np.testing.assert_allclose(read.GetOrigin(), original.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(read.GetDirection(), original.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(original))


@pytest.mark.parametrize("name", ["case.nii.gz", "case.nrrd"])
def test_save_replaces_an_earlier_phantom_and_nothing_else(tmp_path, name):
    """`spinelabel phantom` replaced any file of its names without a word: a scan, or a reference mask beside it."""
    phantom = make_phantom("ct", "lumbar", seed=5, **SMALL)
    image_path, label_path = phantom.save(tmp_path / name)
    phantom.save(tmp_path / name)  # an earlier phantom is replaced
    for path in (image_path, label_path):
        sitk.WriteImage(phantom.labels, str(path))  # a phantom's voxels, but no phantom's file
        kept = path.read_bytes()
        with pytest.raises(FileExistsError, match=f"{path} would be replaced, and it is no phantom SpineLabel wrote"):
            phantom.save(tmp_path / name)
        assert path.read_bytes() == kept
        path.unlink()
        phantom.save(tmp_path / name)
    with pytest.raises(ValueError, match="nothing before its extension"):
        phantom.save(tmp_path / ".nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([image_path.name, label_path.name])


def test_curves_lordosis_kyphosis_and_a_mild_scoliosis():
    """Cervical and lumbar lordosis (the middle of the region anterior of its ends: y grows posteriorly), thoracic
    kyphosis (posterior), and a lateral deviation of up to 5 mm."""
    from SpineLabelLib import phantom

    names = tuple(STANDARD)
    lateral = []
    for seed in range(6):
        anat = phantom._build_anatomy(names, np.random.default_rng(seed))
        y = {el.name: el.centre[1] for el in anat.elements}
        for first, middle, last, sign in (("C2", "C5", "C7", -1), ("T1", "T7", "T12", 1), ("L1", "L3", "L5", -1)):
            assert sign * (y[middle] - (y[first] + y[last]) / 2) > 2.0, (seed, middle)
        lateral.append(np.ptp(anat.curve.x))
    assert 0.5 < max(lateral) <= 10.0 and min(lateral) < 10.0, lateral


def test_intensities_mr_bias_brighter_behind_and_blurred_noise():
    """MR: a bias field brighter at the back (posterior coil); CT: noise of 40 HU lowered to about 12 by the
    partial-volume blur."""
    from SpineLabelLib import phantom

    grid = phantom._Grid((24, 24, 24), np.array([2.0, 2.0, 2.0]), np.zeros(3))
    material = np.full((24, 24, 24), phantom._MUSCLE, np.uint8)
    for seed in range(4):
        mr = sitk.GetArrayFromImage(phantom._intensities(material, "mr", grid, np.random.default_rng(seed)))
        assert mr[:, -4:, :].mean() > 1.2 * mr[:, :4, :].mean()  # y grows posteriorly
        ct = sitk.GetArrayFromImage(phantom._intensities(material, "ct", grid, np.random.default_rng(seed)))
        assert 5 < ct[4:-4, 4:-4, 4:-4].std() < 25


def test_canal_holds_csf_and_cord_behind_the_bodies_down_to_the_dural_sac_end():
    """CSF and the cord lie behind the vertebral bodies; the dural sac (CSF) ends at S2, the cord above it."""
    from SpineLabelLib import phantom

    names = tuple(STANDARD)
    anat = phantom._build_anatomy(names, np.random.default_rng(0))
    grid = phantom._default_grid("lumbar", anat, names, (64, 64, 96), (2.5, 2.5, 2.5))
    vol = phantom._Volumes(grid)
    phantom._paint_soft_tissue(vol, anat)
    phantom._paint_canal(vol, anat)
    phantom._paint_vertebrae(vol, anat)
    csf, cord, body = vol.material == phantom._CSF, vol.material == phantom._CORD, vol.tissue == BODY
    assert csf.sum() > 200 and cord.sum() > 20
    for part in (csf, cord):
        assert np.argwhere(part)[:, 1].mean() > np.argwhere(body)[:, 1].mean() + 4  # y grows posteriorly
    s2 = [el for el in anat.elements if el.kind == "sacral"][1]
    lowest = grid.origin[2] + grid.spacing[2] * np.argwhere(csf)[:, 0].min()
    assert lowest > s2.centre[2] - 5.0, (lowest, s2.centre[2])
    assert np.argwhere(cord)[:, 0].min() > np.argwhere(csf)[:, 0].min()


def test_mr_phantom_shows_bright_csf_behind_the_lumbar_bodies():
    image, labels, tissue = arrays(make_phantom("mr", "lumbar", seed=3, **SMALL))
    body = (labels == BY_NAME["L3"].label) & (tissue == BODY)
    z, y, x = (int(round(c)) for c in np.argwhere(body).mean(axis=0))
    back = int(np.argwhere(body[z])[:, 0].max())  # posterior edge of the body (y grows posteriorly)
    canal = image[z - 2 : z + 3, back + 2 : back + 6, x - 2 : x + 3]
    assert np.median(canal) > 1.5 * np.median(image[body])
