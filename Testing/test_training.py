"""Training: partial-label losses, dataset layouts, and a tiny end-to-end run that writes a loadable model."""

import hashlib
import json
import logging
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from SpineLabelLib.export import dataset_labels, export_case
from SpineLabelLib.inference import CT_WINDOW_HU, Cancelled
from SpineLabelLib.io import InputError
from SpineLabelLib.models import load_model, save_model
from SpineLabelLib.network import SpineUNet
from SpineLabelLib.pipeline import with_context
from SpineLabelLib.vertebrae import BODY, BY_NAME, COCCYX_LABEL, DISC, LEVELS, POSTERIOR
from SpineLabelTrainingLib import training
from SpineLabelTrainingLib.negatives import KINDS, non_spine_image
from SpineLabelTrainingLib.synthesis import IGNORE
from SpineLabelTrainingLib.training import (NOT_BODY, NOT_VERTEBRA, UNSURE_MM, VERTEBRA, TrainConfig,
                                            cases_metadata_sha256, find_cases, level_loss, load_case, make_source,
                                            tissue_loss, train, unknown_beyond_labelled_ends)

L3, L4, L5 = (BY_NAME[name].label for name in ("L3", "L4", "L5"))  # VerSe labels of the levels write_pair draws


def logits_for(classes, confidence=8.0):
    """(1, 4, n, 1, 1) logits that put most probability on the given class per voxel."""
    out = torch.zeros(1, 4, len(classes), 1, 1)
    for i, c in enumerate(classes):
        out[0, c, i] = confidence
    return out


def test_partial_labels_accept_every_allowed_class():
    target = torch.tensor([[NOT_BODY, NOT_BODY, NOT_BODY]]).view(1, 3, 1, 1)
    ok = tissue_loss(logits_for([0, POSTERIOR, DISC]), target)
    wrong = tissue_loss(logits_for([BODY, BODY, BODY]), target)
    assert ok < 0.05 and wrong > 5
    target = torch.tensor([[VERTEBRA, VERTEBRA, NOT_VERTEBRA]]).view(1, 3, 1, 1)
    assert tissue_loss(logits_for([BODY, POSTERIOR, DISC]), target) < 0.05
    assert tissue_loss(logits_for([0, 0, BODY]), target) > 5
    ignored = torch.full((1, 3, 1, 1), IGNORE)
    assert float(tissue_loss(logits_for([0, 1, 2]), ignored)) == pytest.approx(0.0, abs=1e-6)  # nothing known, no loss
    # ignored voxels neither add to the loss of the known ones nor dilute it (a mean over the known voxels only)
    one = tissue_loss(logits_for([BODY]), torch.tensor([[NOT_BODY]]).view(1, 1, 1, 1))
    mixed = tissue_loss(logits_for([BODY, 0, 0]), torch.tensor([[NOT_BODY, IGNORE, IGNORE]]).view(1, 3, 1, 1))
    assert float(one) > 5 and float(mixed) == pytest.approx(float(one), rel=1e-4)


def test_level_loss_only_on_vertebra_voxels():
    levels = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    logits = torch.zeros(1, len(LEVELS), 2, 2, 2, requires_grad=True)
    assert float(level_loss(logits, levels).detach()) == 0.0
    levels[0, 0, 0, 0] = BY_NAME["L1"].label  # L1 -> level index of L1
    loss = level_loss(logits, levels)
    assert float(loss.detach()) == pytest.approx(np.log(len(LEVELS)), rel=1e-4)
    # the seven voxels off the spine cost nothing, whatever level the head gives them: logits sure of L1 everywhere
    sure = torch.zeros(1, len(LEVELS), 2, 2, 2)
    sure[0, int(training._level_target(levels)[0, 0, 0, 0])] = 20.0
    assert float(level_loss(sure, levels)) < 1e-6


def write_pair(folder, image_name, label_name, size=(40, 40, 60), background=0):
    """An image of three boxes in soft tissue and their label map (L3-L5), at ``folder / image_name`` and
    ``folder / label_name``; in an nnU-Net layout (``labelsTr/``) with the dataset.json naming the levels by their
    VerSe values."""
    if label_name.startswith("labelsTr/"):
        (folder / "dataset.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / "dataset.json").write_text(json.dumps({"labels": dataset_labels()}))
    arr = np.full(size[::-1], background, np.int16)
    arr[:, 5:35, 5:35] = 100  # soft tissue: of background and bone alone the network reads a blank image
    lab = np.zeros(size[::-1], np.uint8)
    for i, label in enumerate((L3, L4, L5)):
        arr[10 + 15 * i : 20 + 15 * i, 10:30, 10:30] = 300
        lab[10 + 15 * i : 20 + 15 * i, 10:30, 10:30] = label
    for name, a in ((image_name, arr), (label_name, lab)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(a), str(folder / name))


def test_dataset_layouts(tmp_path):
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    write_pair(tmp_path / "verse", "s1_ct.nii.gz", "s1_seg-vert_msk.nii.gz")
    write_pair(tmp_path / "bodies", "b1_img.nii.gz", "b1_vert-verse.nii.gz")
    assert [c[2] for c in find_cases(tmp_path / "nn")] == [False]
    assert [c[2] for c in find_cases(tmp_path / "verse")] == [False]
    (image, label, bodies_only), = find_cases(tmp_path / "bodies")
    assert bodies_only
    case = load_case(image, label, bodies_only, 2.0)
    assert set(np.unique(case.tissue)) == {BODY, NOT_BODY, IGNORE}
    assert set(np.unique(case.levels)) == {0, L3, L4, L5}
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    whole = load_case(*find_cases(tmp_path / "verse")[0][:2], False, 2.0)
    assert set(np.unique(whole.tissue)) == {VERTEBRA, NOT_VERTEBRA, IGNORE}
    with pytest.raises(FileNotFoundError):
        find_cases(tmp_path / "nn" / "imagesTr")


def test_how_a_training_image_was_read_is_said_as_a_warning(tmp_path, caplog):
    """What read_image notes of a file (a header without orientation) a labelling lists among its warnings; training
    logged it at INFO, which the command line does not show."""
    write_pair(tmp_path / "verse", "s1_ct.nii.gz", "s1_seg-vert_msk.nii.gz")
    for name in ("s1_ct.nii.gz", "s1_seg-vert_msk.nii.gz"):  # neither a qform nor an sform
        nii = nibabel.load(tmp_path / "verse" / name)
        nibabel.save(nibabel.Nifti1Image(np.asanyarray(nii.dataobj), None), tmp_path / "verse" / name)
    with caplog.at_level(logging.WARNING):
        load_case(*find_cases(tmp_path / "verse")[0][:2], False, 2.0)
    assert any("s1_ct.nii.gz: its header gives no orientation" in r.getMessage() for r in caplog.records)


def test_cases_are_found_at_any_depth_as_evaluation_finds_them(tmp_path):
    # TPTBox naming, one folder down; its endplates (200 + L) are vertebra L, its discs (100 + L) no vertebra
    write_pair(tmp_path / "crops", "sub-ct_label-22_ct.nii.gz", "sub-ct_seg-vert_label-22_msk.nii.gz")
    mask_path = tmp_path / "crops" / "sub-ct_seg-vert_label-22_msk.nii.gz"
    mask = sitk.ReadImage(str(mask_path))
    values = sitk.GetArrayFromImage(mask)
    values[values == L3] = 200 + L3  # L3 given as its endplate label
    values[20:25, 10:30, 10:30] = 100 + L3  # the disc below L3
    relabelled = sitk.GetImageFromArray(values)
    relabelled.CopyInformation(mask)
    sitk.WriteImage(relabelled, str(mask_path))
    (image, label, bodies_only), = find_cases(tmp_path)
    assert image.name == "sub-ct_label-22_ct.nii.gz" and label == mask_path and not bodies_only
    case = load_case(image, label, bodies_only, 2.0)
    assert set(np.unique(case.levels)) == {0, L3, L4, L5}


def test_nnunet_s_ignore_label_costs_nothing_and_a_blank_image_is_refused(tmp_path):
    """Voxels of nnU-Net's ignore label (nobody annotated them) were taught as background, and a constant image was
    trained on."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    label = tmp_path / "nn" / "labelsTr" / "c1.nii.gz"
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    values[values == L4] = 250  # L4 not annotated
    sitk.WriteImage(sitk.GetImageFromArray(values), str(label))
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({"labels": {**dataset_labels(), "ignore": 250}}))
    case = load_case(*find_cases(tmp_path / "nn")[0], 2.0)
    assert set(np.unique(case.levels)) == {0, L3, L5}
    assert np.all(case.tissue[13:17, 6:14, 6:14] == IGNORE)  # inside L4's box (z 25-35, y and x 10-30 mm)
    assert np.count_nonzero(case.tissue == VERTEBRA) > 0 and np.count_nonzero(case.tissue == NOT_VERTEBRA) > 0
    image = tmp_path / "nn" / "imagesTr" / "c1_0000.nii.gz"
    sitk.WriteImage(sitk.Image([40, 40, 60], sitk.sitkInt16), str(image))
    with pytest.raises(InputError, match=f"{image}: image is constant"):
        load_case(*find_cases(tmp_path / "nn")[0], 2.0)


def test_a_dataset_of_more_than_one_channel_is_refused(tmp_path):
    """A two-channel nnU-Net dataset (water-fat MRI: imagesTr/c1_0000 and c1_0001) was trained on channel 0 alone,
    whichever contrast it held, without a word."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    dataset = {"channel_names": {"0": "fat", "1": "water"}, "labels": dataset_labels()}
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(InputError, match=r"dataset.json: names 2 channels \(0: fat, 1: water\)"):
        load_case(*find_cases(tmp_path / "nn")[0], 2.0)
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({**dataset, "channel_names": {"0": "MR"}}))
    load_case(*find_cases(tmp_path / "nn")[0], 2.0)  # one channel: trained on
    second = tmp_path / "nn" / "imagesTr" / "c1_0001.nii.gz"  # a second channel the dataset.json does not name
    shutil.copy(tmp_path / "nn" / "imagesTr" / "c1_0000.nii.gz", second)
    assert [image.name for image, _, _ in find_cases(tmp_path / "nn")] == ["c1_0000.nii.gz"]
    with pytest.raises(InputError, match=f"{second}: a second channel of the case of c1_0000.nii.gz"):
        load_case(*find_cases(tmp_path / "nn")[0], 2.0)


def test_a_case_whose_image_is_a_link_to_nothing_is_refused(tmp_path):
    """imagesTr/c1_0000.nii.gz linking to a drive not mounted: the case was left out with a warning that its label map
    had no image beside it, and training went on with the other cases."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    write_pair(tmp_path / "nn", "imagesTr/c2_0000.nii.gz", "labelsTr/c2.nii.gz")
    link = tmp_path / "nn" / "imagesTr" / "c2_0000.nii.gz"
    link.unlink()
    link.symlink_to(tmp_path / "unmounted" / "c2_0000.nii.gz")
    with pytest.raises(FileNotFoundError, match=f"{link}: the image of case c2 is a link to a file that does not exist"):
        find_cases(tmp_path / "nn")
    link.unlink()
    assert [image.name for image, _, _ in find_cases(tmp_path / "nn")] == ["c1_0000.nii.gz"]  # no image: left out


def test_real_ct_goes_in_through_the_ct_window(tmp_path):
    write_pair(tmp_path, "s1_ct.nii.gz", "s1_seg-vert_msk.nii.gz", background=-1000)
    image = sitk.ReadImage(str(tmp_path / "s1_ct.nii.gz"))
    voxels = sitk.GetArrayFromImage(image)
    voxels[:, :, :5] = -100  # fat: air of one value and bone alone could be an MR padded with -1024
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(tmp_path / "s1_ct.nii.gz"))
    case = load_case(*find_cases(tmp_path)[0][:2], False, 2.0)
    bone = case.levels > 0
    expected = (300 - CT_WINDOW_HU[0]) / (CT_WINDOW_HU[1] - CT_WINDOW_HU[0])
    assert np.median(case.image[bone]) == pytest.approx(expected, abs=0.02) and case.image.min() == 0.0


def test_the_modality_an_export_recorded_is_the_one_trained(tmp_path):
    """A CT that the automatic rule takes for MR (no air, no fat), labelled as CT: trained as CT, not as MR."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")  # background 0: detected as MR
    dataset = {"channel_names": {"0": "CT"}, "labels": dataset_labels()}
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps(dataset))
    case = load_case(*find_cases(tmp_path / "nn")[0], 2.0)
    expected = (300 - CT_WINDOW_HU[0]) / (CT_WINDOW_HU[1] - CT_WINDOW_HU[0])
    assert np.median(case.image[case.levels > 0]) == pytest.approx(expected, abs=0.02)


def test_an_image_recorded_as_ct_that_holds_no_hounsfield_units_is_refused(tmp_path):
    """A CT rescaled to [0, 1] by another tool, in a dataset whose channel 0 is CT: the CT window read it as a nearly
    blank image (every voxel within 0.45-0.46), and it was trained on."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz", background=-1000)
    dataset = {"channel_names": {"0": "CT"}, "labels": dataset_labels()}
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps(dataset))
    image = tmp_path / "nn" / "imagesTr" / "c1_0000.nii.gz"
    hounsfield = sitk.GetArrayFromImage(sitk.ReadImage(str(image))).astype(np.float32)
    load_case(*find_cases(tmp_path / "nn")[0], 2.0)  # in Hounsfield units: trained on
    rescaled = (hounsfield - hounsfield.min()) / (hounsfield.max() - hounsfield.min())
    sitk.WriteImage(sitk.GetImageFromArray(rescaled), str(image))
    with pytest.raises(InputError, match=f"{image}: its dataset.json records CT, but its values span only 0 to 1"):
        load_case(*find_cases(tmp_path / "nn")[0], 2.0)
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({**dataset, "channel_names": {"0": "MR"}}))
    case = load_case(*find_cases(tmp_path / "nn")[0], 2.0)  # not recorded as CT: read by its percentiles
    assert case.image.max() - case.image.min() > 0.5


def test_voxels_near_exported_vertebrae_whose_voxels_were_not_edited_are_unknown(tmp_path, spine):
    """The network's vertebrae miss voxels of the real ones: exported unedited, they were taught as background."""
    edited = [{"action": "segment_edit", "vertebra_ids": [v.id for v in spine.result.vertebrae]}]
    for folder, corrections in (("auto", None), ("edited", edited)):
        export_case(spine.result, spine.image, tmp_path / folder, corrections=corrections)
    auto, painted = (load_case(*find_cases(tmp_path / folder)[0], 2.0) for folder in ("auto", "edited"))
    distance = ndimage.distance_transform_edt(auto.levels == 0, sampling=2.0)  # mm to the nearest vertebra voxel
    changed = auto.tissue != painted.tissue
    assert changed.any() and distance[changed].max() <= UNSURE_MM
    assert (auto.tissue[changed] == IGNORE).all() and (painted.tissue[changed] == NOT_VERTEBRA).all()
    assert not ((auto.tissue == NOT_VERTEBRA) & (distance <= UNSURE_MM)).any()
    assert ((auto.tissue == NOT_VERTEBRA) & (distance > UNSURE_MM + 2)).any()  # farther away, still background


def test_a_malformed_provenance_record_is_named(tmp_path, spine):
    export_case(spine.result, spine.image, tmp_path)
    record = next((tmp_path / "provenance").iterdir())
    record.write_text(json.dumps({"vertebrae": [{"id": 1}]}))  # no label
    image, labels, bodies_only = find_cases(tmp_path)[0]
    with pytest.raises(InputError, match="provenance record of this exported case is malformed \\(a vertebra "
                                         "without 'label': its 'vertebrae' must each have an 'id'"):
        load_case(image, labels, bodies_only, 2.0)


def test_images_without_a_spine_are_taught_as_background_everywhere():
    draw, cases = make_source("negative", 2.0, (24, 20, 16), None)
    assert cases is None
    names = set()
    for seed in range(12):
        case = draw(np.random.default_rng(seed))
        names.add(case.name)
        assert case.image.shape == (24, 20, 16) and 0.0 <= case.image.min() < case.image.max() <= 1.0
        assert not case.tissue.any() and not case.levels.any()  # every voxel known background, no level
    assert len(names) >= 4
    a, b = (non_spine_image(np.random.default_rng(3), KINDS[-1], (24, 20, 16), 2.0) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown kind"):
        non_spine_image(np.random.default_rng(0), "spine", (8, 8, 8), 2.0)


@pytest.mark.parametrize("spacing_mm", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["blobs (MR)", "blobs (CT)"])
def test_blob_images_have_blobs_at_any_voxel_size(kind, spacing_mm):
    # the smoothed noise's spread shrinks with finer voxels: a fixed threshold left 1 mm images empty
    image = non_spine_image(np.random.default_rng(5), kind, (60, 60, 60), spacing_mm)
    bright = image > np.median(image) + 100
    assert 0.08 < bright.mean() < 0.3


def test_each_kind_of_non_spine_image_is_what_its_name_says():
    """CT kinds: bright parts near 300 HU on air; MR balls 1000 on 0; smoothed noise is correlated from voxel to
    voxel, white noise is not; uniform noise lies in 0-255; a seed gives the same image for every kind."""
    shape = (40, 40, 40)
    images = {kind: non_spine_image(np.random.default_rng(2), kind, shape, 2.0) for kind in KINDS}
    for kind, image in images.items():
        np.testing.assert_array_equal(image, non_spine_image(np.random.default_rng(2), kind, shape, 2.0))

    def neighbour_correlation(image):
        return np.corrcoef(image[:-1].ravel(), image[1:].ravel())[0, 1]

    assert neighbour_correlation(images["white noise"]) < 0.1 < 0.5 < neighbour_correlation(images["smoothed noise"])
    assert 0.0 <= images["uniform noise"].min() and images["uniform noise"].max() <= 255.0
    for kind, (low, high) in (("blobs (CT)", (-1000, 300)), ("balls (CT)", (-1000, 300)), ("balls (MR)", (0, 1000))):
        image = images[kind]
        bright = image > (low + high) / 2
        assert 0.01 < bright.mean() < 0.4, kind
        assert abs(np.median(image[bright]) - high) < 60 and abs(np.median(image[~bright]) - low) < 60, kind
    assert np.median(images["blobs (MR)"]) > 0  # MR blobs lie on tissue, not on air

def test_unlabelled_vertebrae_beyond_the_labelled_ones_are_not_taught_as_background():
    # L3, L4, L5 labelled along z; the image would show L2 above and the sacrum below, unlabelled
    verse = np.zeros((60, 8, 8), np.uint8)
    for i, label in enumerate((L3, L4, L5)):
        verse[10 + 15 * i : 20 + 15 * i] = label
    tissue = np.where(verse > 0, BODY, NOT_BODY).astype(np.uint8)
    out = unknown_beyond_labelled_ends(tissue, verse)
    assert (out[:15][verse[:15] == 0] == IGNORE).all()  # cranial of the L3 centroid
    assert (out[46:][verse[46:] == 0] == IGNORE).all()  # caudal of the L5 centroid
    assert (out[20:25] == NOT_BODY).all() and (out[35:40] == NOT_BODY).all()  # the discs between labelled levels
    assert (out[verse > 0] == BODY).all()
    assert (tissue != IGNORE).all()  # the input is left alone
    single = np.where(verse == L4, L4, 0).astype(np.uint8)
    # one labelled level: every direction leads beyond it, and L3 and L5 beside it are not taught as background
    out = unknown_beyond_labelled_ends(tissue, single)
    assert (out[single == 0] == IGNORE).all() and (out[single > 0] == BODY).all()
    unlabelled = np.zeros_like(verse)
    assert (unknown_beyond_labelled_ends(tissue, unlabelled) == tissue).all()  # no level: nothing to go beyond


def test_training_steps_run_in_float32_on_a_cpu(tmp_path, monkeypatch):
    """On a CPU that runs bfloat16 natively, oneDNN's bfloat16 weight gradients of a 32-voxel patch's deepest level came
    out with garbage now and then: training steps on a CPU run float32 whatever the CPU."""
    from SpineLabelLib import inference
    monkeypatch.setattr(inference, "native_bfloat16", lambda device: True)
    forward, autocast_on = SpineUNet.forward, []

    def spy(net, x):
        autocast_on.append(torch.is_autocast_enabled("cpu"))
        return forward(net, x)

    monkeypatch.setattr(SpineUNet, "forward", spy)
    train(TrainConfig(data=[("phantom", 1.0)], out=tmp_path / "m.json", epochs=1, iterations=2, batch=1,
                      patch=(32, 32, 32), spacing_mm=4.0, device="cpu", validation_cases=0))
    assert autocast_on == [False, False]


def test_training_leaves_the_caller_s_random_numbers_alone(tmp_path):
    """A run seeded the process's generator with its own seed (torch.manual_seed), and drew from it, for good: the
    caller's seed and the numbers it drew next were the run's. The same seed still trains the same weights."""
    cfg = TrainConfig(data=[("phantom", 1.0)], out=tmp_path / "m.json", epochs=1, iterations=1, batch=1,
                      patch=(32, 32, 32), spacing_mm=4.0, device="cpu", validation_cases=0, seed=3)
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    first = load_model(train(cfg)).network.state_dict()
    assert torch.initial_seed() == 11 and torch.equal(torch.rand(4), expected)
    second = load_model(train(replace(cfg, out=tmp_path / "again.json"))).network.state_dict()
    assert all(torch.equal(value, second[name]) for name, value in first.items())


def test_tiny_training_run_writes_a_loadable_model_and_resumes(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    cfg = TrainConfig(data=[("phantom", 1.0), (str(tmp_path / "nn"), 1.0)], out=tmp_path / "m.json", epochs=2,
                      iterations=2, batch=1, patch=(32, 32, 32), spacing_mm=4.0, device="cpu", validation_cases=1)
    seen = []
    with pytest.raises(Cancelled):  # stopped after the first epoch
        train(cfg, progress=seen.append, cancel=lambda: len(seen) == 1)
    assert cfg.out.with_suffix(".ckpt").exists() and not cfg.out.exists()
    state = torch.load(cfg.out.with_suffix(".ckpt"), weights_only=False)
    del state["settings"]["validation_cases"]  # as a checkpoint written before that setting was checked
    torch.save(state, cfg.out.with_suffix(".ckpt"))
    cfg = replace(cfg, resume=True, data=[("phantom", 1.0), ("./nn", 1.0)])  # the same folder, spelt otherwise
    card = train(cfg, progress=seen.append)
    model = load_model(card)
    assert [m["epoch"] for m in seen] == [1, 2]
    assert model.card["spacing_mm"] == 4.0 and len(model.card["training"]["history"]) == 2
    assert model.card["training"]["validation_crops"][0].startswith("phantom-")
    assert model.card["training_data"]["sources"][1]["cases"] == ["imagesTr/c1_0000.nii.gz"]
    assert "shape_library" not in model.card["training_data"]  # no synthetic source
    json.loads(card.read_text(), parse_constant=pytest.fail)  # valid JSON: no NaN for the unknown body Dice
    assert model.ct_window_hu == CT_WINDOW_HU
    # the same batches as a run that was never stopped: the same weights
    straight = load_model(train(replace(cfg, out=tmp_path / "straight.json", resume=False)))
    for name, value in straight.network.state_dict().items():
        assert torch.equal(value, model.network.state_dict()[name]), name
    with pytest.raises(ValueError, match=r"other settings \(--epochs, --lr, --validation-cases\)"):
        train(replace(cfg, epochs=3, lr=1e-3, validation_cases=2))  # one history, one validation set
    state = torch.load(cfg.out.with_suffix(".ckpt"), weights_only=False)
    del state["settings"]["tilt_deg"]  # as a checkpoint written before crops could be tilted: it had none
    torch.save(state, cfg.out.with_suffix(".ckpt"))
    with pytest.raises(ValueError, match=r"other settings \(--tilt-deg\)"):
        train(replace(cfg, tilt_deg=20.0))
    write_pair(tmp_path / "nn", "imagesTr/c2_0000.nii.gz", "labelsTr/c2.nii.gz")  # an export added a case
    with pytest.raises(ValueError, match=r"other settings \(the cases of its --data folders\)"):
        train(cfg)
    with pytest.raises(ValueError, match="'synthetic' needs --data-dir"):
        train(replace(cfg, data=[("synthetic", 1.0)], resume=False))
    unread = [("phantom", 0.0), (str(tmp_path / "missing"), 0.0)]
    finetuned = train(TrainConfig(data=[*unread, (str(tmp_path / "nn"), 1.0)], out=tmp_path / "f.json",
                                  base_model=card, epochs=1, iterations=1, batch=1, patch=(32, 32, 32), device="cpu",
                                  validation_cases=2))
    base = load_model(card).card  # the weights a fine-tune started from are named by their hash too
    assert load_model(finetuned).card["base_model"] == {key: base[key] for key in ("name", "version", "sha256")}
    assert "can forget what the base model knew" in caplog.text  # a fine-tune on a folder alone
    # a source of weight 0 is not read (a missing folder does not stop the run), trained on, scored or listed
    assert not any(name.startswith("phantom") for name in load_model(finetuned).card["training"]["validation_crops"])
    listed = [source["source"] for source in load_model(finetuned).card["training_data"]["sources"]]
    assert listed == ["nn"]  # by its name: a path would name the user's folders in a card shared with the model
    assert str(tmp_path) not in Path(finetuned).read_text()


def test_a_cancel_stops_the_loading_of_a_folder_between_cases(tmp_path, monkeypatch):
    for case in ("c1", "c2", "c3"):
        write_pair(tmp_path / "nn", f"imagesTr/{case}_0000.nii.gz", f"labelsTr/{case}.nii.gz")
    loaded = []
    exact = training.load_case
    monkeypatch.setattr(training, "load_case", lambda *args: loaded.append(args[0]) or exact(*args))
    cfg = TrainConfig(data=[(str(tmp_path / "nn"), 1.0)], out=tmp_path / "m.json", epochs=1, iterations=1, batch=1,
                      patch=(32, 32, 32), device="cpu", validation_cases=0)
    with pytest.raises(Cancelled):
        train(cfg, cancel=lambda: len(loaded) == 1)
    assert len(loaded) == 1 and not cfg.out.exists()


def test_a_fine_tune_never_replaces_its_base_model_or_the_shipped_one(tmp_path, monkeypatch):
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    torch.manual_seed(0)
    base = save_model(SpineUNet(), {"name": "base", "version": "1", "spacing_mm": 4.0,
                                    "ct_window_hu": list(CT_WINDOW_HU)}, tmp_path / "base" / "m.json")
    shipped = tmp_path / "shipped" / "spinelabel-default.json"  # a copy: a failing test must not replace the real one
    shipped.parent.mkdir()
    for suffix in (".json", ".pt"):
        shutil.copyfile(base.with_suffix(suffix), shipped.with_suffix(suffix))
    monkeypatch.setattr(training, "default_model_path", lambda: shipped)
    before = {p: p.read_bytes() for p in (*tmp_path.glob("base/*"), *tmp_path.glob("shipped/*"))}
    cfg = TrainConfig(data=[(str(tmp_path / "nn"), 1.0)], out=tmp_path / "x.json", base_model=base, epochs=1,
                      iterations=1, batch=1, patch=(32, 32, 32), device="cpu", validation_cases=0)
    respelt = tmp_path / "base" / ".." / "base" / "m"  # m.json, spelt otherwise
    for out, start in ((base, base), (base.with_suffix(".pt"), base), (respelt, base), (shipped, base),
                       (shipped.with_suffix(".pt"), base), (shipped, None)):  # a new model neither
        with pytest.raises(ValueError, match="is a file of the model .*give --out another path") as refused:
            train(replace(cfg, out=out, base_model=start))
        assert str(refused.value).startswith(str(out))
    # a base that reads CT otherwise than this version trains it
    card = json.loads(base.read_text())
    for window, reads in ((None, "by its percentiles"), ([-500, 1500], r"through \(-500.0, 1500.0\) HU")):
        other = tmp_path / "base" / f"window-{window is None}.json"
        other.write_text(json.dumps({**card, "ct_window_hu": window}))
        with pytest.raises(ValueError, match=f"reads CT {reads}, and this version"):
            train(replace(cfg, base_model=other))
    # nor a registered model (that folder is --register's), and it keeps its base's grid
    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path / "base"))
    with pytest.raises(ValueError, match="lies in the folder of registered models"):
        train(replace(cfg, out=tmp_path / "base" / "other.json"))
    with pytest.raises(ValueError, match="--spacing 2.0: a fine-tune keeps the grid spacing of its base model"):
        train(replace(cfg, spacing_mm=2.0))
    assert {p: p.read_bytes() for p in before} == before and len(list(tmp_path.glob("*/*.ckpt"))) == 0


@pytest.mark.parametrize("corrected", ["label map", "dataset.json"])
def test_a_case_corrected_in_place_is_not_resumed_on_and_the_card_hashes_it(tmp_path, corrected):
    """A case corrected in place between a stop and --resume, its label map (the same file name) or its dataset.json
    (its levels named one lower, bodies only: the label map's bytes the same, its targets not): the run went on with
    other targets than its first epochs had, and the cards of the two readings gave the same hashes."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    cfg = TrainConfig(data=[(str(tmp_path / "nn"), 1.0)], out=tmp_path / "m.json", epochs=2, iterations=1, batch=1,
                      patch=(32, 32, 32), spacing_mm=4.0, device="cpu", validation_cases=0)
    seen = []
    with pytest.raises(Cancelled):  # stopped after the first epoch
        train(cfg, progress=seen.append, cancel=lambda: len(seen) == 1)
    first = load_model(train(replace(cfg, out=tmp_path / "first.json"))).card["training_data"]["sources"][0]
    label = tmp_path / "nn" / "labelsTr" / "c1.nii.gz"
    if corrected == "label map":
        before = sitk.ReadImage(str(label))
        levels = sitk.GetArrayFromImage(before)
        after = sitk.GetImageFromArray(np.where(levels > 0, levels + 1, 0).astype(levels.dtype))  # each a level lower
        after.CopyInformation(before)
        sitk.WriteImage(after, str(label))
    else:
        names = dataset_labels()
        lower = {"background": 0, "L2": names["L3"], "L3": names["L4"], "L4": names["L5"]}
        (tmp_path / "nn" / "dataset.json").write_text(json.dumps({"labels": lower, "bodies_only": True}))
    with pytest.raises(ValueError, match="other contents of its cases"):
        train(replace(cfg, resume=True))
    second = load_model(train(cfg)).card["training_data"]["sources"][0]
    assert (first["cases_sha256"] != second["cases_sha256"]) == (corrected == "label map")
    assert (first["cases_metadata_sha256"] != second["cases_metadata_sha256"]) == (corrected == "dataset.json")
    image = tmp_path / "nn" / "imagesTr" / "c1_0000.nii.gz"
    line = f"{hashlib.sha256(image.read_bytes()).hexdigest()} {hashlib.sha256(label.read_bytes()).hexdigest()}\n"
    assert second["cases"] == ["imagesTr/c1_0000.nii.gz"]
    assert second["cases_sha256"] == hashlib.sha256(line.encode()).hexdigest()


def test_the_metadata_hash_reads_what_gives_the_labels_their_meaning_only(tmp_path):
    """A dataset.json's description edited since a stop made --resume refuse the run, saying that what its labels
    mean had changed (a helper's review)."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    first = cases_metadata_sha256(tmp_path / "nn")
    document = json.loads((tmp_path / "nn" / "dataset.json").read_text())
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({**document, "description": "corrected cases"}))
    assert cases_metadata_sha256(tmp_path / "nn") == first
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({**document, "bodies_only": True}))
    assert cases_metadata_sha256(tmp_path / "nn") != first
    # the modality its images are normalised for
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({**document, "channel_names": {"0": "MR"}}))
    assert cases_metadata_sha256(tmp_path / "nn") != first


def test_a_fine_tune_resumes_only_from_the_base_weights_it_started_from(tmp_path):
    """A base model replaced at its path since: the run would go on from the first base's weights, and the card name
    the second as its base."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    card = {"name": "base", "version": "1", "spacing_mm": 4.0, "ct_window_hu": list(CT_WINDOW_HU)}
    torch.manual_seed(0)
    base = save_model(SpineUNet(), card, tmp_path / "base.json")
    cfg = TrainConfig(data=[(str(tmp_path / "nn"), 1.0)], out=tmp_path / "f.json", base_model=base, epochs=2,
                      iterations=1, batch=1, patch=(32, 32, 32), device="cpu", validation_cases=0)
    seen = []
    with pytest.raises(Cancelled):  # stopped after the first epoch
        train(cfg, progress=seen.append, cancel=lambda: len(seen) == 1)
    torch.manual_seed(1)
    save_model(SpineUNet(), card, base)
    with pytest.raises(ValueError, match=r"other settings \(the --base-model's weights\)"):
        train(replace(cfg, resume=True))


def test_body_dice_is_unknown_without_a_body_target():
    """Whole-vertebra crops say nothing of body; a network predicting body everywhere scored 0, not n/a."""

    class AllBody(torch.nn.Module):
        def forward(self, image):
            tissue = torch.zeros(1, 4, *image.shape[2:])
            tissue[:, BODY] = 1.0
            return tissue, torch.zeros(1, len(LEVELS), *(n // 2 for n in image.shape[2:]))

    levels = np.zeros((8, 8, 8), np.uint8)
    whole = training.Case(np.zeros(levels.shape, np.float32), np.full(levels.shape, NOT_VERTEBRA, np.uint8), levels)
    whole.tissue[:4] = VERTEBRA
    assert training._validate(AllBody(), [whole], torch.device("cpu"))["body_dice"] is None
    bodies = replace(whole, tissue=np.where(whole.tissue == VERTEBRA, BODY, NOT_BODY).astype(np.uint8))
    assert training._validate(AllBody(), [whole, bodies], torch.device("cpu"))["body_dice"] == pytest.approx(0.5)


def test_the_same_weights_make_the_same_file(tmp_path):
    """torch.save given a path names the archive's records after it: the random temporary name changed the sha256."""
    network = SpineUNet()
    about = {"name": "m", "version": "1", "spacing_mm": 2.0}
    cards = [save_model(network, about, tmp_path / f"{n}.json") for n in "ab"]
    digests = {hashlib.sha256(card.with_suffix(".pt").read_bytes()).hexdigest() for card in cards}
    assert len(digests) == 1 and len({json.loads(card.read_text())["sha256"] for card in cards}) == 1


def test_weights_averaged_over_the_last_epochs(tmp_path):
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    cfg = TrainConfig(data=[(str(tmp_path / "nn"), 1.0)], out=tmp_path / "a.json", epochs=3, iterations=2, batch=1,
                      patch=(32, 32, 32), spacing_mm=4.0, device="cpu", validation_cases=1, average_last=2,
                      tilt_deg=20.0)
    ckpt = cfg.out.with_suffix(".ckpt")
    weights = []  # the network at the end of each epoch, read from the checkpoint written before progress is called
    train(cfg, progress=lambda metrics: weights.append(torch.load(ckpt, weights_only=False)["network"]))
    model = load_model(cfg.out)
    assert model.card["training"]["averaged_last_epochs"]["epochs"] == 2
    assert model.card["training"]["tilt_deg"] == 20.0
    # a step can be skipped for a non-finite gradient (bfloat16 on some CPUs), so the last two epochs may end equal
    for name, written in model.network.state_dict().items():
        assert torch.allclose(written, (weights[1][name] + weights[2][name]) / 2, atol=1e-6), name


def test_a_step_with_a_non_finite_gradient_is_skipped(tmp_path, monkeypatch):
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    exact = training.tissue_loss
    monkeypatch.setattr(training, "tissue_loss", lambda logits, target: exact(logits, target) * float("inf"))
    cfg = TrainConfig(data=[(str(tmp_path / "nn"), 1.0)], out=tmp_path / "a.json", epochs=1, iterations=2, batch=1,
                      patch=(32, 32, 32), device="cpu", validation_cases=1, seed=5)
    with pytest.raises(ValueError, match="training diverged: every step of the last epoch") as diverged:  # no model
        train(cfg)
    # the way forward: a resume ends the same way (the checkpoint is of the last epoch, and another --lr is refused)
    assert "train again from the start with a lower --lr" in str(diverged.value)
    assert "--resume would end the same way" in str(diverged.value)
    assert not cfg.out.exists() and not cfg.out.with_suffix(".pt").exists()
    state = torch.load(cfg.out.with_suffix(".ckpt"), weights_only=False)
    assert state["history"][0]["skipped_steps"] == 2
    torch.manual_seed(5)
    untrained = SpineUNet().state_dict()
    assert all(torch.equal(value, untrained[name]) for name, value in state["network"].items())


def test_tilted_crops_turn_image_and_labels_together():
    shape = (64, 48, 48)
    image, tissue, levels = np.zeros(shape, np.float32), np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    image[8:56, 22:26, 22:26], tissue[8:56, 22:26, 22:26], levels[8:56, 22:26, 22:26] = 0.8, BODY, L4  # a rod along z
    case = training.Case(image, tissue, levels, "rod")
    same = training._tilted(case, 0.0, 0.0)
    assert all(np.array_equal(getattr(same, n), getattr(case, n)) for n in ("image", "tissue", "levels"))
    turned = training._tilted(case, 30.0, 0.0)
    assert turned.image.shape == shape and turned.tissue.dtype == np.uint8 and turned.levels.dtype == np.uint8
    assert set(np.unique(turned.levels)) == {0, L4} and set(np.unique(turned.tissue)) == {0, BODY}
    zyx = np.argwhere(turned.levels == L4).astype(float)
    axis = np.linalg.svd(zyx - zyx.mean(axis=0))[2][0]
    assert np.degrees(np.arccos(abs(axis[0]))) == pytest.approx(30, abs=3)  # leans 30 degrees from z ...
    assert abs(axis[2]) < 0.05  # ... in the z-y plane (about left-right)
    assert np.mean((turned.image > 0.4) != (turned.levels == L4)) < 0.002  # the image moved with its labels
    sideways = training._tilted(case, 0.0, 20.0)
    zyx = np.argwhere(sideways.levels == L4).astype(float)
    axis = np.linalg.svd(zyx - zyx.mean(axis=0))[2][0]
    assert np.degrees(np.arccos(abs(axis[0]))) == pytest.approx(20, abs=3) and abs(axis[1]) < 0.05


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    cfg = TrainConfig(data=[("phantom", 0.0)], out=tmp_path / "run" / "m.json", patch=(32, 32, 32), device="cpu",
                      epochs=1, iterations=1)  # a check that slips fails in seconds, not after a whole run
    with pytest.raises(ValueError, match="--data weights 0: each must be 0 or more, and one more than 0"):
        train(cfg)
    cfg = replace(cfg, data=[("phantom", 1.0)])
    with pytest.raises(ValueError, match="--patch 33 x 32 x 32: each size must be a multiple of 16"):
        train(replace(cfg, patch=(33, 32, 32)))
    for change, message in ((dict(patch=(0, 32, 32)), "1 or more"), (dict(patch=(-16, 32, 32)), "1 or more"),
                            (dict(epochs=0), "--epochs 0"), (dict(iterations=0), "--iterations 0"),
                            (dict(batch=0), "--batch 0"), (dict(validation_cases=-1), "--validation-cases -1"),
                            (dict(average_last=-1), "--average-last -1"), (dict(tilt_deg=-1), "--tilt-deg -1"),
                            (dict(tilt_deg=float("nan")), "--tilt-deg nan"),
                            (dict(tilt_deg=float("inf")), "--tilt-deg inf: must be a finite number"),
                            (dict(short_window=-0.1), "--short-window -0.1"),
                            (dict(short_window=1.5), "--short-window 1.5: a share"),
                            (dict(short_window=0.1), "--short-window with --patch 32 x 32 x 32"),
                            *((dict(lr=lr), f"--lr {lr}: the learning rate must be")
                              for lr in (0.0, -1e-3, math.nan, math.inf))):
        with pytest.raises(ValueError, match=message):
            train(replace(cfg, **change))
    assert not (tmp_path / "run").exists()
    for name in ("m.pt", "m.json"):  # a folder where the weights or the card would go: found before training
        (tmp_path / "run" / name).mkdir(parents=True)
        with pytest.raises(ValueError, match=f"{name}: is a folder"):
            train(cfg)
        (tmp_path / "run" / name).rmdir()
    with pytest.raises(ValueError, match="run: is a folder"):  # --out run/ wrote run.json beside it
        train(replace(cfg, out=str(tmp_path / "run") + "/"))
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    with pytest.raises(ValueError, match="dataset.json: lies inside the training data"):  # it replaced the dataset.json
        train(replace(cfg, data=[(str(tmp_path / "nn"), 1.0)], out=tmp_path / "nn" / "dataset.json"))
    assert json.loads((tmp_path / "nn" / "dataset.json").read_text())["labels"] == dataset_labels()


def test_short_runs_and_a_bad_checkpoint(tmp_path):
    """A run of 20 steps had a warm-up of 0 steps, and torch divided by it; a checkpoint that is not one is named."""
    cfg = TrainConfig(data=[("phantom", 1.0)], out=tmp_path / "m.json", epochs=1, iterations=1, batch=1,
                      patch=(32, 32, 32), spacing_mm=4.0, device="cpu", validation_cases=0, average_last=5)
    for iterations in (1, 2, 20):
        card = train(replace(cfg, iterations=iterations))
    assert load_model(card).card["training"]["averaged_last_epochs"]["epochs"] == 1  # of 1 epoch, not 5
    cfg.out.with_suffix(".ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"m.ckpt: not a SpineLabel training checkpoint \(torch cannot read it\); "
                                         "remove it"):
        train(replace(cfg, resume=True))
    # a file that runs code when unpickled (here: makes a file) is refused unrun: the checkpoint is read as data only
    marker = tmp_path / "ran"
    torch.save({"settings": _RunsOnLoad(marker)}, cfg.out.with_suffix(".ckpt"))
    with pytest.raises(ValueError, match=r"m.ckpt: not a SpineLabel training checkpoint \(torch cannot read it\)"):
        train(replace(cfg, resume=True))
    assert not marker.exists()


class _RunsOnLoad:
    """Unpickled, calls ``Path.touch`` on its path, as a crafted file could call anything."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_label_map_on_another_grid_is_refused(tmp_path):
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    labels = tmp_path / "nn" / "labelsTr" / "c1.nii.gz"
    moved = sitk.ReadImage(str(labels))
    moved.SetOrigin((0.0, 0.0, 500.0))
    sitk.WriteImage(moved, str(labels))
    with pytest.raises(InputError, match=r"c1.nii.gz: label map grid differs from its image .*: origin 0\.00 x 0\.00 x "
                       r"500\.00 mm \(LPS\) against the image's 0\.00 x 0\.00 x 0\.00 mm \(LPS\)$"):
        load_case(*find_cases(tmp_path / "nn")[0][:2], False, 2.0)
    moved.SetOrigin((0.0, 0.0, 0.0))
    moved.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # flipped left-right, all else the same
    sitk.WriteImage(moved, str(labels))
    with pytest.raises(InputError) as refused:  # the message showed size, spacing and origin, all equal
        load_case(*find_cases(tmp_path / "nn")[0][:2], False, 2.0)
    assert str(refused.value).endswith(": axis directions i (-1.000, 0.000, 0.000), j (0.000, 1.000, 0.000), k (0.000, "
                                       "0.000, 1.000) against the image's i (1.000, 0.000, 0.000), j (0.000, 1.000, "
                                       "0.000), k (0.000, 0.000, 1.000)"), str(refused.value)


def test_an_image_blank_once_normalised_is_refused(tmp_path):
    """Zero but for one voxel: not constant, so trained on, though the network read it as a blank image (every voxel
    0 after the percentile mapping) under 3 vertebrae of labels."""
    write_pair(tmp_path / "verse", "s1.nii.gz", "s1_seg-vert_msk.nii.gz")
    image = tmp_path / "verse" / "s1.nii.gz"
    blank = np.zeros((60, 40, 40), np.int16)
    blank[0, 0, 0] = 1
    sitk.WriteImage(sitk.GetImageFromArray(blank), str(image))
    with pytest.raises(InputError, match=f"{image}: image is blank as the network reads it"):
        load_case(*find_cases(tmp_path / "verse")[0], 2.0)


def test_a_broken_folder_case_is_named_before_a_shape_library_is_built(tmp_path, monkeypatch):
    """--data synthetic --data FOLDER: the shape library (a minute's build without its cache) came first, the broken
    case after it; the sources keep their order."""
    write_pair(tmp_path / "verse", "s1_ct.nii.gz", "s1_seg-vert_msk.nii.gz")
    image = tmp_path / "verse" / "s1_ct.nii.gz"
    sitk.WriteImage(sitk.Image([40, 40, 60], sitk.sitkInt16), str(image))  # constant
    built = []
    monkeypatch.setattr(training, "_synthetic_source", lambda *args: built.append(args) or (lambda rng: None))
    cfg = TrainConfig(data=[("synthetic", 1.0), (str(tmp_path / "verse"), 1.0)], out=tmp_path / "m.json",
                      data_dir=tmp_path, epochs=1, iterations=1, batch=1, patch=(32, 32, 32), device="cpu",
                      validation_cases=0)
    with pytest.raises(InputError, match=f"{image}: image is constant"):
        train(cfg)
    assert not built
    order = []
    monkeypatch.setattr(training, "make_source", lambda spec, *args: order.append(spec) or (spec, None))
    monkeypatch.setattr(training, "_batches", lambda sources, *args: pytest.fail(f"sources {sources}"))
    with pytest.raises(pytest.fail.Exception, match=r"sources \('phantom', 'synthetic', 'negative'\)"):
        train(replace(cfg, data=[("phantom", 1.0), ("synthetic", 1.0), ("negative", 1.0)]))
    assert order == ["phantom", "negative", "synthetic"]


def test_a_file_at_the_model_s_names_that_training_did_not_write_is_not_replaced(tmp_path):
    """--out over the user's notes.json, or beside weights of another model: both were replaced without a word
    after the epochs; an earlier run's model is replaced."""
    cfg = TrainConfig(data=[("phantom", 1.0)], out=tmp_path / "m.json", epochs=1, iterations=1, batch=1,
                      patch=(32, 32, 32), spacing_mm=4.0, device="cpu", validation_cases=0)
    (tmp_path / "m.json").write_text('{"my": "notes"}')
    with pytest.raises(ValueError, match="m.json: exists and is no model card that training wrote there"):
        train(cfg)
    assert (tmp_path / "m.json").read_text() == '{"my": "notes"}' and not (tmp_path / "m.pt").exists()
    (tmp_path / "m.json").unlink()
    (tmp_path / "m.pt").write_bytes(b"other weights")
    with pytest.raises(ValueError, match="m.pt: exists and is no model card that training wrote there"):
        train(cfg)
    assert (tmp_path / "m.pt").read_bytes() == b"other weights" and not (tmp_path / "m.json").exists()
    (tmp_path / "m.pt").unlink()
    first = load_model(train(cfg)).card["sha256"]
    assert load_model(train(replace(cfg, seed=1))).card["sha256"] != first  # an earlier run's model: replaced


@pytest.mark.parametrize("value, reason", [(0, "holds no vertebra label SpineLabel knows"),
                                           (COCCYX_LABEL, "holds no vertebra label SpineLabel knows"),
                                           (99, r"label values \[99\] are no VerSe vertebra value")])
def test_a_label_map_without_a_vertebra_is_refused(tmp_path, value, reason):
    """Empty, or only values that are no vertebra: its whole spine would be taught as background."""
    write_pair(tmp_path / "verse", "s1_ct.nii.gz", "s1_seg-vert_msk.nii.gz")
    labels = tmp_path / "verse" / "s1_seg-vert_msk.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    sitk.WriteImage(sitk.GetImageFromArray(np.where(array > 0, value, 0).astype(np.uint8)), str(labels))
    with pytest.raises(InputError, match="s1_seg-vert_msk.nii.gz: " + reason):
        load_case(*find_cases(tmp_path / "verse")[0][:2], False, 2.0)


def test_label_maps_whose_values_cannot_be_read_as_levels_are_refused(tmp_path):
    """An nnU-Net labelsTr without its dataset.json (its values were read as VerSe values whatever they meant), and
    one voxel of value 300,000,000 (a table of that many values took 7 GB before the refusal)."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    case = find_cases(tmp_path / "nn")[0][:2]
    (tmp_path / "nn" / "dataset.json").unlink()
    with pytest.raises(InputError, match="labelsTr: an nnU-Net labelsTr folder without its dataset.json"):
        load_case(*case, False, 2.0)
    write_pair(tmp_path / "verse", "s1_ct.nii.gz", "s1_seg-vert_msk.nii.gz")
    for folder, label_path, error, message in (
            (tmp_path / "verse", tmp_path / "verse" / "s1_seg-vert_msk.nii.gz", InputError,
             r"label values \[300000000\] are no VerSe vertebra value"),
            (tmp_path / "big", tmp_path / "big" / "labelsTr" / "c1.nii.gz", ValueError,
             r"label values \[300000000\] are not in .*dataset.json")):
        if folder.name == "big":
            write_pair(folder, "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).astype(np.uint32)
        array[0, 0, 0] = 300_000_000
        sitk.WriteImage(sitk.GetImageFromArray(array), str(label_path))
        with pytest.raises(error, match=message):
            load_case(*find_cases(folder)[0][:2], False, 2.0)


def test_a_value_that_is_no_vertebra_beside_vertebrae_is_refused_not_taught_as_background(tmp_path):
    """L5 relabelled 40 beside L3 and L4; a TPTBox disc value (100 + L3) and the coccyx are no vertebra and pass."""
    write_pair(tmp_path / "verse", "s1_ct.nii.gz", "s1_seg-vert_msk.nii.gz")
    labels = tmp_path / "verse" / "s1_seg-vert_msk.nii.gz"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    array[0, 0, :2] = 100 + L3, COCCYX_LABEL
    sitk.WriteImage(sitk.GetImageFromArray(array), str(labels))
    assert set(np.unique(load_case(*find_cases(tmp_path / "verse")[0][:2], False, 2.0).levels)) == {0, L3, L4, L5}
    array[array == L5] = 40
    sitk.WriteImage(sitk.GetImageFromArray(array), str(labels))
    with pytest.raises(InputError, match=r"s1_seg-vert_msk.nii.gz: label values \[40\] are no VerSe vertebra value"):
        load_case(*find_cases(tmp_path / "verse")[0][:2], False, 2.0)


def test_a_label_map_whose_vertebrae_vanish_on_the_model_grid_says_so(tmp_path):
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    labels = tmp_path / "nn" / "labelsTr" / "c1.nii.gz"
    tiny = np.zeros((60, 40, 40), np.uint8)
    tiny[31, 21, 21] = L3  # one voxel of 1 mm, off the 8 mm grid's points
    sitk.WriteImage(sitk.GetImageFromArray(tiny), str(labels))
    with pytest.raises(InputError, match="c1.nii.gz: its vertebra labels vanish on the model's 8 mm grid"):
        load_case(*find_cases(tmp_path / "nn")[0][:2], False, 8.0)


def test_a_short_window_is_extended_as_labelling_extends_a_short_scan():
    """A slab of the crop through a vertebra, mirrored out to the extent labelling gives a short scan
    (``pipeline.with_context``), targets known inside the slab only; a crop without a vertebra stays as it is."""
    rng = np.random.default_rng(0)
    crop = training._phantom_source(2.0, (128, 80, 80))(rng)
    for _ in range(4):
        short = training._short_window(crop, rng, 2.0)
        known = np.flatnonzero((short.tissue != IGNORE).any(axis=(1, 2)))
        top, width = known[0], len(known)
        assert 15 <= width <= 55 and top % 2 == 0 and short.levels[known].any()
        start = next(z for z in range(128 - width + 1) if np.array_equal(crop.image[z : z + width],
                                                                          short.image[top : top + width]))
        np.testing.assert_array_equal(short.levels[top : top + width], crop.levels[start : start + width])
        assert not short.levels[: top].any() and not short.levels[top + width :].any()
        extended, inner = with_context(crop.image[start : start + width])
        placed = np.flatnonzero(short.image.any(axis=(1, 2)))
        assert placed[-1] - placed[0] + 1 <= extended.shape[0] == 80
    empty = training.Case(crop.image, crop.tissue, np.zeros_like(crop.levels), "none")
    assert training._short_window(empty, rng, 2.0) is empty


def test_a_case_whose_labels_miss_every_fourth_voxel_can_be_cropped():
    levels = np.zeros((40, 40, 40), np.uint8)
    levels[5, 5, 5] = L3  # off the grid of every fourth voxel
    case = training.Case(np.zeros(levels.shape, np.float32), np.zeros(levels.shape, np.uint8), levels, "tiny")
    for seed in range(5):
        assert training._crop(case, (16, 16, 16), np.random.default_rng(seed)).image.shape == (16, 16, 16)


def test_nnunet_labels_are_read_by_their_names_in_dataset_json(tmp_path, caplog):
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")  # L3, L4, L5 as their VerSe labels
    labels = tmp_path / "nn" / "labelsTr" / "c1.nii.gz"
    verse = sitk.ReadImage(str(labels))
    renumbered = sitk.GetArrayFromImage(verse).astype(np.uint16)
    renumbered[renumbered > 0] += 300 - L3  # L3, L4, L5 as 300-302: beyond uint8
    image = sitk.GetImageFromArray(renumbered)
    image.CopyInformation(verse)
    sitk.WriteImage(image, str(labels))
    # spelt as SpineLabel, TotalSegmentator and a lower-case writer name them
    names = {"background": 0, **{f"x{v}": v for v in range(1, 300)}, "L3": 300, "vertebrae_L4": 301, "l5": 302}
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({"labels": names}))
    case = load_case(*find_cases(tmp_path / "nn")[0][:2], False, 2.0)
    assert set(np.unique(case.levels)) == {0, L3, L4, L5}
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "vertebra": 1}}))
    with pytest.raises(ValueError, match="no label is named after a vertebral level"):
        load_case(*find_cases(tmp_path / "nn")[0][:2], False, 2.0)
    # a level's value written as text, or as an nnU-Net region's list: said so, not "no level named"
    for value in ("300", [300], True, 300.0):
        (tmp_path / "nn" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "L3": value}}))
        with pytest.raises(ValueError, match=re.escape(f"must be whole numbers, 0 or more, not 'L3': {value!r}")):
            load_case(*find_cases(tmp_path / "nn")[0][:2], False, 2.0)
    # a name with a level inside that SpineLabel does not read: background, and said
    names = {"background": 0, **{f"x{v}": v for v in range(1, 300)}, "L3": 300, "vertebrae_L4": 301, "vertebra_L5": 302}
    (tmp_path / "nn" / "dataset.json").write_text(json.dumps({"labels": names}))
    with caplog.at_level(logging.WARNING):
        case = load_case(*find_cases(tmp_path / "nn")[0][:2], False, 2.0)
    assert set(np.unique(case.levels)) == {0, L3, L4}
    assert "label names ['vertebra_L5'] look like vertebral levels" in caplog.text


def test_an_nnunet_image_without_its_label_map_is_left_out_with_a_warning(tmp_path, caplog):
    """imagesTr/c2_0000 without labelsTr/c2 was left out without a word (a label map without its image is named); a
    second channel (c1_0001) is no case."""
    write_pair(tmp_path / "nn", "imagesTr/c1_0000.nii.gz", "labelsTr/c1.nii.gz")
    for name in ("c2_0000.nii.gz", "c1_0001.nii.gz"):
        shutil.copy(tmp_path / "nn" / "imagesTr" / "c1_0000.nii.gz", tmp_path / "nn" / "imagesTr" / name)
    with caplog.at_level(logging.WARNING):
        assert [image.name for image, _, _ in find_cases(tmp_path / "nn")] == ["c1_0000.nii.gz"]
    assert "1 images in imagesTr/ have no label map in labelsTr/, left out: " in caplog.text
    assert "c2_0000.nii.gz" in caplog.text and "c1_0001" not in caplog.text


def test_a_missing_data_folder_is_named_as_such(tmp_path):
    """It was called a "ground-truth folder", the words of ``spinelabel evaluate``, in a training run."""
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(tmp_path / 'nowhere'))}: folder does not exist$"):
        find_cases(tmp_path / "nowhere")
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileNotFoundError, match="afile: a file, not a folder$"):
        find_cases(tmp_path / "afile")
    # a keyword mistyped (a helper's audit of the messages: "synthtic: folder does not exist")
    with pytest.raises(FileNotFoundError, match="^synthtic: no such folder, nor one of the generated sources "
                                                "synthetic, phantom, negative$"):
        make_source("synthtic", 2.0, (32, 32, 32), None)


def test_a_case_found_twice_in_the_data_folders_is_named(tmp_path, caplog):
    """One folder inside another given too: each case is drawn as two, which the run says, naming one."""
    for case in ("c1", "c2"):
        write_pair(tmp_path / "data" / "nn", f"imagesTr/{case}_0000.nii.gz", f"labelsTr/{case}.nii.gz")
    nn, data = str(tmp_path / "data" / "nn"), str(tmp_path / "data")
    cfg = TrainConfig(data=[(nn, 1.0), (data, 1.0)], out=tmp_path / "m.json", epochs=1, iterations=1, batch=1,
                      patch=(32, 32, 32), spacing_mm=4.0, device="cpu", validation_cases=0)
    with caplog.at_level(logging.WARNING):
        train(cfg)
    image = (tmp_path / "data" / "nn" / "imagesTr" / "c1_0000.nii.gz").resolve()
    assert f"2 cases found twice in the --data folders ({image}, in {nn} and in {data})" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(replace(cfg, data=[(nn, 1.0), ("phantom", 1.0)]))
    assert "found twice" not in caplog.text
