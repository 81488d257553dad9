"""label_spine end to end: geometry of the outputs in any orientation, progress, cancel, empty inputs, models."""

import json
import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import DATA
from SpineLabelLib.inference import looks_like_label_map, read_modality
from SpineLabelLib.io import InputError, canonical_grid
from SpineLabelLib.models import (CARD_FORMAT, ModelError, card_file, load_model, read_card, register_model, save_model,
                                 sha256_of)
from SpineLabelLib.network import SpineUNet
from SpineLabelLib.phantom import make_phantom
from SpineLabelLib.pipeline import (AIR_HU, DENSE_BONE_REACH_MM, ENCLOSED_MAX_ML, LONG_COLUMN, MIN_SPINE_PROBABILITY,
                                    MIN_SPINE_PROBABILITY_LONG_COLUMN, MIN_SPINE_PROBABILITY_REGULAR_COLUMN,
                                    ORIENTATION_MARGIN, REGULAR_COLUMN, Cancelled, NoVertebrae,
                                    components_on_input_grid, is_spine, label_spine, regular_column, require_vertebrae)
from SpineLabelLib.sequence import solve
from SpineLabelLib.vertebrae import BODY, BY_NAME, LEVELS, level_index


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A model with random weights: exercises the plumbing, independent of what the default model learnt."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "random.json"
    return save_model(SpineUNet(), {"name": "random", "version": "0", "spacing_mm": 4.0}, path)


@pytest.fixture(scope="module")
def small_phantom():
    return make_phantom(modality="ct", fov="lumbar", spacing=(2.0, 2.0, 2.5), seed=4)


def permuted(image: sitk.Image, order, flips) -> sitk.Image:
    out = sitk.Flip(sitk.PermuteAxes(image, order), flips)
    return out


@pytest.mark.parametrize("order, flips", [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)),
                                          ((1, 2, 0), (False, True, False)), ((0, 1, 2), (False, True, True))])
def test_result_lies_on_the_input_grid_in_any_orientation(small_phantom, order, flips):
    """The shipped model's label map lands on the anatomy whatever the order and direction of the input's axes: the
    labels agree voxel by voxel with the phantom's reference stored the same way (a label map that ignored the
    input's direction, or came back mirrored, passed when this test used a random model that found no vertebra)."""
    image = permuted(small_phantom.image, order, flips)
    reference = sitk.GetArrayFromImage(permuted(small_phantom.labels, order, flips))
    result = label_spine(image, device="cpu")
    assert result.components.shape == reference.shape
    assert result.geometry.size == image.GetSize()
    assert np.allclose(result.geometry.direction, image.GetDirection())
    labels = result.label_map()
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0} | {v.label for v in result.vertebrae}
    # T10 is cut by the top of the view (1466 reference voxels against 3814 of T11)
    assert [v.name for v in result.vertebrae] == ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert np.mean(labels[reference > 0] == reference[reference > 0]) > 0.85  # 0.96 in every orientation (0.93 before T10)
    assert set(result.timings_s) >= {"resample", "network", "components", "total"}
    assert result.modality == "CT"



def test_an_array_is_refused_with_what_to_pass_instead():
    with pytest.raises(TypeError, match="SimpleITK.Image or a path, not ndarray.*GetImageFromArray"):
        label_spine(np.zeros((8, 8, 8), np.float32))
    for hooks, named in (({"progress": 1}, "progress must be a callable or None, not int"),
                         ({"cancel": True}, "cancel must be a callable or None, not bool")):
        with pytest.raises(TypeError, match=named):  # said before the image is read, not "'int' object is not callable"
            label_spine("/nonexistent.nii.gz", **hooks)

def test_progress_and_cancel(random_model, small_phantom):
    seen = []
    label_spine(small_phantom.image, model=random_model, device="cpu", progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        label_spine(small_phantom.image, model=random_model, device="cpu", cancel=cancel)


def test_a_cancel_while_the_labels_are_written_on_the_input_grid_stops_it(small_phantom):
    """The last stage, labels brought back to the input grid, polled nothing: a cancel there took its whole time."""
    at = []
    with pytest.raises(Cancelled):
        label_spine(small_phantom.image, device="cpu", progress=lambda f, m: at.append(f),
                    cancel=lambda: bool(at) and at[-1] >= 0.9)
    assert at[-1] == 0.9


@pytest.mark.parametrize("fill", [0.0, 1234.0])
def test_constant_volume_gives_no_vertebrae_and_a_warning(random_model, fill):
    image = sitk.GetImageFromArray(np.full((40, 50, 50), fill, np.float32))
    result = label_spine(image, model=random_model, device="cpu")
    assert result.vertebrae == [] and "no vertebrae found" in result.warnings
    assert not result.components.any() and result.spine_probability is None


def test_mr_in_any_units_and_a_tiny_bright_object(small_phantom, random_model):
    """MR intensities have no unit: a scan stored at 1e-9 times its values is labelled as the scan itself (it was
    taken for a constant image), and a one-component vector image as its scalar one. An object so small that the
    network's window would shrink to one voxel at its bottleneck is not a spine (instance normalisation failed)."""
    image = sitk.Cast(small_phantom.image, sitk.sitkFloat32)
    plain = label_spine(image, model=random_model, device="cpu", modality="mr", spine_gate=False)
    for variant in (image * 1e-9, sitk.Compose([image])):
        other = label_spine(variant, model=random_model, device="cpu", modality="mr", spine_gate=False)
        assert np.array_equal(other.components, plain.components)
        assert [v.name for v in other.vertebrae] == [v.name for v in plain.vertebrae]
    spike = np.zeros((60, 60, 60), np.float32)
    spike[30, 30, 30] = 1000.0
    result = label_spine(sitk.GetImageFromArray(spike), model=random_model, device="cpu")
    assert result.vertebrae == [] and "no vertebrae found" in result.warnings


def test_a_model_of_no_kind_is_named_as_such():
    from SpineLabelLib.pipeline import get_model

    with pytest.raises(TypeError, match="model must be a model card's path, a model's name or a LoadedModel, not int"):
        get_model(123, "cpu")


def test_load_model_names_a_bad_device(random_model):
    """torch's own error for "gpu", and an AssertionError for "cuda" on a machine without CUDA."""
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not 'gpu'"):
        load_model(random_model, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
            load_model(random_model, device="cuda")


def test_model_card_hash_is_checked(tmp_path, random_model):
    model = load_model(random_model)
    card = tmp_path / "m.json"
    save_model(model.network, {"name": "m", "version": "1", "spacing_mm": 4.0}, card)
    weights = card.with_suffix(".pt")
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelError, match="corrupt"):
        load_model(card)
    weights.unlink()
    with pytest.raises(ModelError, match="not found"):
        load_model(card)
    with pytest.raises(ModelError, match="card not found"):
        load_model(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelError, match="lacks"):
        load_model(bad)
    good = json.loads(card.read_text())
    assert good["format"] == CARD_FORMAT
    for change, reason in (({"format": CARD_FORMAT + 1}, f"format {CARD_FORMAT + 1} .*update SpineLabel"),
                           ({"format": 0}, "format 0 is not one"), ({"format": "1"}, "format '1'"),
                           ({"format": True}, "format True"), ({"format": 1.5}, "format 1.5"),
                           ({"level_classes": good["level_classes"][::-1]}, "level_classes"),
                           ({"spacing_mm": 0}, "spacing_mm"), ({"spacing_mm": True}, "spacing_mm"),
                           ({"spacing_mm": 1e400}, "spacing_mm"), ({"spacing_mm": 1e-4}, "spacing_mm"),
                           ({"architecture": {}}, "channels"),
                           ({"architecture": {"channels": [True, True, True]}}, "channels"),
                           ({"architecture": {**good["architecture"], "type": "SpineUNetV9"}}, "architecture.type"),
                           ({"ct_window_hu": [1200, -1000]}, "ct_window_hu"),
                           ({"ct_window_hu": "wide"}, "ct_window_hu"), ({"ct_window_hu": [0]}, "ct_window_hu"),
                           ({"weights": 5}, "weights"),
                           ({"weights": None}, "weights"), ({"weights": "../other/m.pt"}, "weights"),
                           ({"weights": str(card.with_suffix(".pt"))}, "weights")):
        bad.write_text(json.dumps({**good, **change}))
        with pytest.raises(ModelError, match=f"{re.escape(str(bad))}: .*{reason}"):
            load_model(bad)
    bad.write_text(json.dumps({k: v for k, v in good.items() if k != "format"}))  # cards written before the format
    assert read_card(bad)["name"] == "m"
    bad.write_bytes(json.dumps({**good, "notes": "vertebra é"}, ensure_ascii=False).encode("latin-1"))  # not UTF-8
    with pytest.raises(ModelError, match="unreadable model card"):
        load_model(bad)
    with pytest.raises(ValueError, match="three resolution levels"):
        SpineUNet((8, 16))
    card.with_suffix(".pt").write_bytes(b"")  # the hash of these weights, in a card whose network cannot be built
    bad.write_text(json.dumps({**good, "architecture": {"channels": [10**6] * 3}, "sha256": sha256_of(weights)}))
    with pytest.raises(ModelError, match=f"{re.escape(str(bad))}: architecture.channels .* cannot be built"):
        load_model(bad)


def test_a_model_written_again_is_loaded_again(tmp_path, random_model):
    from SpineLabelLib.pipeline import get_model

    card = tmp_path / "m.json"
    first = load_model(random_model)
    save_model(first.network, {"name": "m", "version": "1", "spacing_mm": 4.0}, card)
    assert get_model(card, "cpu") is get_model(tmp_path / "m.pt", "cpu")  # cached, by card or by weights
    save_model(first.network, {"name": "m", "version": "2", "spacing_mm": 4.0}, card)
    assert get_model(card, "cpu").card["version"] == "2"
    bracketed = tmp_path / "spine[v2].json"  # a glob pattern, were the name not escaped
    save_model(first.network, {"name": "b", "version": "1", "spacing_mm": 4.0}, bracketed)
    assert get_model(bracketed, "cpu").card["version"] == "1"
    save_model(first.network, {"name": "b", "version": "2", "spacing_mm": 4.0}, bracketed)
    assert get_model(bracketed, "cpu").card["version"] == "2"
    # weights of another name than the card's, altered after the model was loaded: checked again
    renamed = tmp_path / "other.pt"
    bracketed.with_suffix(".pt").rename(renamed)
    bracketed.write_text(json.dumps({**json.loads(bracketed.read_text()), "weights": renamed.name}))
    get_model(bracketed, "cpu")
    renamed.write_bytes(renamed.read_bytes()[: renamed.stat().st_size // 2])
    with pytest.raises(ModelError, match="corrupt or altered"):
        get_model(bracketed, "cpu")
    # a loaded model is not checked again, but the device asked for is
    with pytest.raises(ValueError, match="device must be"):
        get_model(first, "gpu")


def test_loading_a_model_leaves_the_caller_s_random_numbers_alone(random_model):
    """The network built to take the weights drew its random initial weights from the process's generator: a script
    seeded for its own work drew other numbers after its first labelling than after its second."""
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    load_model(random_model)
    assert torch.equal(torch.rand(4), expected)


def test_weights_that_do_not_load_name_the_reason(tmp_path, random_model):
    card = json.loads(Path(random_model).read_text())
    (tmp_path / "m.pt").write_bytes(b"")  # empty, with its hash in the card: torch's error has no message
    (tmp_path / "m.json").write_text(json.dumps({**card, "weights": "m.pt", "sha256": sha256_of(tmp_path / "m.pt")}))
    with pytest.raises(ModelError, match=r"m.pt: weights do not load into the model \(EOFError\)"):
        load_model(tmp_path / "m.json")
    # weights of another network: one line naming the first difference and the card's channels, not torch's line per
    # parameter (the command line promises a line per failure)
    channels = [2 * c for c in card["architecture"]["channels"]]
    shutil.copy(Path(random_model).with_name(card["weights"]), tmp_path / "w.pt")
    (tmp_path / "w.json").write_text(json.dumps({**card, "weights": "w.pt", "architecture": {
        **card["architecture"], "channels": channels}}))
    with pytest.raises(ModelError, match=r"w.pt: weights do not load into the model \(size mismatch for ") as refused:
        load_model(tmp_path / "w.json")
    # the length without the path, which a long TMPDIR makes as long as it likes
    assert "\n" not in str(refused.value) and len(str(refused.value).replace(str(tmp_path), "")) < 500
    assert str(refused.value).endswith("more such): the card's architecture is not that of the network these "
                                       "weights were saved from")


def test_weights_that_are_not_finite_are_refused(tmp_path, random_model):
    network = load_model(random_model).network
    with torch.no_grad():
        next(network.parameters()).fill_(float("nan"))
    card = save_model(network, {"name": "nan", "version": "1", "spacing_mm": 4.0}, tmp_path / "nan.json")
    with pytest.raises(ModelError, match="nan.pt: weights hold values that are not finite"):
        load_model(card)


def test_register_model_never_replaces(tmp_path, monkeypatch, random_model):
    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path / "registry"))
    from SpineLabelLib.models import list_models

    registered = register_model(random_model, name="mine")
    assert load_model(registered).card["name"] == "mine"
    monkeypatch.chdir(tmp_path)
    from SpineLabelLib.models import DEFAULT_MODEL_NAME, default_model_path

    assert card_file(DEFAULT_MODEL_NAME) == default_model_path()  # the shipped model by its name too
    (tmp_path / "mine").mkdir()  # a folder of that name is no model card
    assert load_model("mine").path == registered  # by its name, where no file of that name is
    (tmp_path / "mine").rmdir()
    (tmp_path / "mine").write_text("{}")  # a file of that name is what the name means
    with pytest.raises(ModelError, match="mine: model card lacks"):
        load_model("mine")
    assert "mine" in [c["name"] for c in list_models()]
    with pytest.raises(ModelError, match="registered already"):
        register_model(random_model, name="mine")
    for name in ("team/spine-v2", "../escaped", ".hidden", " ", "v2?", "spine.", 'a"b'):  # the last three: Windows
        with pytest.raises(ModelError, match="a model name is a file name"):
            register_model(random_model, name=name)
    for name in (DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME.upper()):  # listed twice, reachable by its name never
        with pytest.raises(ModelError, match="is the name of the model shipped with SpineLabel"):
            register_model(random_model, name=name)
    assert sorted(p.name for p in (tmp_path / "registry").iterdir()) == ["mine.json", "mine.pt"]
    (tmp_path / "registry" / "broken.json").write_bytes(b'{"name": "\xe9"}')  # one unreadable card is skipped
    assert [c["name"] for c in list_models()][-1] == "mine"
    (tmp_path / "registry" / "mine.pt").unlink()  # listed, it could be chosen and failed only when loaded
    assert "mine" not in [c["name"] for c in list_models()]


def test_a_folder_of_registered_models_that_cannot_be_read_is_named(tmp_path, monkeypatch, caplog):
    """Its models were left out of the list without a word (its glob came back empty)."""
    from SpineLabelLib import models

    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(registry))
    access = os.access
    monkeypatch.setattr(models.os, "access", lambda path, mode: Path(path) != registry and access(path, mode))
    with caplog.at_level(logging.WARNING):
        assert [c["name"] for c in models.list_models()] == [models.DEFAULT_MODEL_NAME]
    assert f"skipping the registered models: {registry} cannot be read" in caplog.text


def test_a_model_name_windows_keeps_for_a_device_is_refused(tmp_path, monkeypatch):
    """NUL.json, con.v2.json, COM1.json are the devices NUL, CON and COM1 on Windows, not files: a model registered
    as one of them could not be written there (a Windows audit)."""
    from SpineLabelLib.models import registration_path

    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path / "registry"))
    for name in ("NUL", "con", "con.v2", "Com1", "lpt9", "aux .x", "COM\u00b9", "lpt\u00b3.v1"):
        with pytest.raises(ModelError, match="Windows keeps .* for a device"):
            registration_path(name)
    for name in ("console", "nul-model", "com10", "con_v2", "spine.con"):  # only the whole name before a dot
        assert registration_path(name) == tmp_path / "registry" / f"{name}.json"


def test_two_registering_one_name_at_once_do_not_replace_each_other(tmp_path, monkeypatch, random_model):
    """Both pass the check for a registered model of that name; the one that comes second is refused, and the
    model the first registered is kept (a rename of the second's files replaced it, and both said registered)."""
    from SpineLabelLib import models

    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path / "registry"))
    other = json.loads(Path(random_model).read_text())
    shutil.copy(Path(random_model).with_name(other["weights"]), tmp_path / "other.pt")
    (tmp_path / "other.json").write_text(json.dumps({**other, "version": "other", "weights": "other.pt"}))
    check = models.registration_path

    def checked_then_overtaken(name):
        target = check(name)
        monkeypatch.setattr(models, "registration_path", check)
        models.register_model(tmp_path / "other.json", name)  # the other process, between the check and the write
        return target

    monkeypatch.setattr(models, "registration_path", checked_then_overtaken)
    with pytest.raises(ModelError, match="'race' is registered already"):
        models.register_model(random_model, "race")
    assert load_model("race").card["version"] == "other"
    assert sorted(p.name for p in (tmp_path / "registry").iterdir()) == ["race.json", "race.pt"]


def test_default_model_labels_a_phantom():
    """The shipped model names the lumbar vertebrae of a phantom it has never seen, each centroid inside the vertebra
    of its name (1.4.0, 1.5.0 and 1.6.0 name 8 of 9; 1.7.0 all 9, T10-S1, while the model grid's plane beyond the
    scan held the scan's minimum; with it taking the plane next to it, the T10 that the top of the view cuts to 8 ml
    comes out joined to T11: 8 of 9). The network leaves the sacrum in pieces below S1 here; they are labelled S1 with
    it (98 % of the phantom's sacrum; 60 % when they were dropped)."""
    phantom = make_phantom(modality="ct", fov="lumbar", seed=123)
    result = label_spine(phantom.image, device="cpu")
    truth = sitk.GetArrayViewFromImage(phantom.labels)
    found = {}
    for v in result.vertebrae:
        idx = np.round(result.geometry.lps_to_index(np.array(v.centroid_lps_mm))).astype(int)[::-1]
        found[v.name] = int(truth[tuple(np.clip(idx, 0, np.array(truth.shape) - 1))])
    levels = np.setdiff1d(np.unique(truth), [0])
    assert len(levels) == 9 and len(found) >= 8 and all(BY_NAME[name].label == label for name, label in found.items())
    sacrum = truth == BY_NAME["S1"].label
    assert np.mean(result.label_map()[sacrum] == BY_NAME["S1"].label) > 0.9
    assert result.spine_probability >= MIN_SPINE_PROBABILITY
    voxel_ml = float(np.prod(result.geometry.spacing)) / 1000.0  # volumes are those of the written label map
    assert [v.volume_ml for v in result.vertebrae] == [
        round(int((result.components == v.id).sum()) * voxel_ml, 3) for v in result.vertebrae]


def test_a_short_view_is_read_twice_for_its_confidences():
    """A view extended along head-feet has its level head read again with zeros beyond its ends: the names are those of
    the first reading, the confidences the posterior of the mean of both; a view tall enough is read once."""
    image = make_phantom(modality="ct", fov="lumbar", seed=123).image
    slices = int(round(70 / image.GetSpacing()[2]))
    start = (image.GetSize()[2] - slices) // 2
    short = label_spine(image[:, :, start : start + slices], device="cpu", spine_gate=False)
    assert short.vertebrae and "short_view_reading" in short.timings_s
    first = np.array([v.level_log_scores for v in short.vertebrae])
    both = np.array([v.confidence_log_scores for v in short.vertebrae])
    assert not np.allclose(first, both)
    solved = solve(first, np.asarray(short.gaps_mm), confidence_scores=both)
    assert [v.name for v in short.vertebrae] == [LEVELS[k].name for k in solve(first, np.asarray(short.gaps_mm)).levels]
    np.testing.assert_allclose([v.confidence for v in short.vertebrae], solved.confidence)
    whole = label_spine(image, device="cpu")
    assert all(v.confidence_log_scores is None for v in whole.vertebrae) and "short_view_reading" not in whole.timings_s


def test_the_second_readings_of_a_short_view_and_the_orientation_check_report_progress():
    """The short view's second reading reported nothing: the progress stood at 0.83 for a third of the run. Each
    network pass now reports its windows, in its own share of the progress, rising to 1."""
    image = make_phantom(modality="ct", fov="lumbar", seed=123).image
    slices = int(round(70 / image.GetSpacing()[2]))
    start = (image.GetSize()[2] - slices) // 2
    seen = []
    result = label_spine(image[:, :, start : start + slices], device="cpu", spine_gate=False, check_orientation=True,
                         progress=lambda f, m: seen.append((f, m)))
    assert result.vertebrae and "short_view_reading" in result.timings_s
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    for stage in ("short view: network window", "orientation check: network window"):
        within = [f for f, m in seen if m.startswith(stage)]
        assert within and max(within) - min(within) > 0.1, stage


def test_orientation_check_warns_on_a_phantom_turned_head_to_feet():
    """With ``check_orientation``, the shipped model warns on a lumbar phantom whose voxels run head to feet under an
    unchanged header, and not on the phantom as made (margins -0.08 and +0.20 with 1.6.0, -0.06 and +0.16 with
    1.7.0)."""
    image = make_phantom(modality="ct", fov="lumbar", seed=3).image
    turned = sitk.Flip(image, [False, False, True], flipAboutOrigin=False)  # z is inferior-superior
    turned.CopyInformation(image)
    upright = label_spine(image, device="cpu", check_orientation=True)
    wrong = label_spine(turned, device="cpu", check_orientation=True)
    assert upright.orientation_margin < ORIENTATION_MARGIN < wrong.orientation_margin
    assert not any("head to feet" in w for w in upright.warnings)
    assert any("head to feet" in w for w in wrong.warnings)




@pytest.mark.skipif(not (DATA / "ct_verse").is_dir(), reason="real data ../shared/data/ct_verse not present")
def test_real_lumbar_ct_end_to_end(tmp_path):
    """The shipped model on the real VerSe lumbar CT (L1-L5) through the CLI: every vertebra found and localised.
    It checks the real-CT path end to end, not accuracy: since 1.5.0 this scan is trained on (the model card's
    evaluation scores held-out scans only)."""
    from SpineLabelLib.cli import main
    from SpineLabelLib.evaluation import read_centroids

    image = DATA / "ct_verse" / "sub-verse014_ct.nii.gz"
    assert main(["label", str(image), "-o", str(tmp_path / "pred"), "--quiet"]) == 0
    report = json.loads((tmp_path / "pred" / "sub-verse014_ct_report.json").read_text())
    names = [v["name"] for v in report["vertebrae"]]
    assert len(names) == len(set(names)) >= 4
    truth = read_centroids(DATA / "ct_verse" / "sub-verse014_seg-vb_ctd.json",
                           sitk.ReadImage(str(DATA / "ct_verse" / "sub-verse014_seg-vert_msk.nii.gz")))
    predicted = np.array([v["centroid_lps_mm"] for v in report["vertebrae"]])
    found = [np.linalg.norm(predicted - c, axis=1).min() <= 20.0 for c in truth.values()]
    assert sum(found) >= 4


def test_the_spine_gate_asks_less_of_a_long_column_and_never_takes_one_component():
    between = (MIN_SPINE_PROBABILITY + MIN_SPINE_PROBABILITY_LONG_COLUMN) / 2
    assert not is_spine(between, LONG_COLUMN - 1) and is_spine(between, LONG_COLUMN)
    assert is_spine(MIN_SPINE_PROBABILITY, 2) and not is_spine(0.99, 1)


def test_the_spine_gate_asks_least_of_a_column_spaced_like_vertebrae():
    # a neck and a lumbar spine are regular columns; an even spacing far beyond a vertebra's, or one broken up, is not
    assert regular_column([19.0, 18.0, 17.5, 18.5, 20.0]) == 6 and regular_column([30.0, 34.0, 36.0]) == 4
    assert regular_column([]) == 0 and regular_column([80.0, 90.0]) == 0
    assert regular_column([25.0, 25.0, 120.0, 25.0, 25.0, 25.0, 9.0, 25.0]) == 4
    assert regular_column([40.0, 20.0, 42.0, 21.0, 44.0]) == 2  # in range, each gap far from the one before
    low = MIN_SPINE_PROBABILITY_REGULAR_COLUMN
    assert is_spine(low, REGULAR_COLUMN, column=REGULAR_COLUMN) and not is_spine(low, 20, column=REGULAR_COLUMN - 1)
    assert not is_spine(low - 0.01, REGULAR_COLUMN, column=REGULAR_COLUMN)


def test_a_view_of_one_vertebra_is_refused_as_too_few_to_number():
    """A lumbar MR phantom cut to 40 mm about L3's centre: one vertebra-like component, read as a body with high
    probability, which the gate refuses without saying that one is too few."""
    phantom = make_phantom(modality="mr", fov="lumbar", seed=0)
    centre = int(np.nonzero(sitk.GetArrayViewFromImage(phantom.labels) == BY_NAME["L3"].label)[0].mean())
    half = round(20.0 / phantom.image.GetSpacing()[2])
    refused = label_spine(phantom.image[:, :, centre - half : centre + half], device="cpu")
    assert refused.vertebrae == [] and refused.warnings[0].startswith(
        "no spine recognised: 1 vertebra-like part only (a spine is numbered from 2 or more in view), with a median "
        "probability of 0.")


def test_the_spine_gate_can_be_switched_off(random_model, small_phantom, monkeypatch):
    """The network's output is made up: four bodies under discs, 32 mm apart, at a vertebral-body probability of 0.5,
    which the gate takes for no spine. (The random model's own output, used before, held nothing vertebra-like with
    some seeds, and it changes with the CPU's vector instructions.)"""
    from SpineLabelLib import pipeline
    from SpineLabelLib.inference import Prediction
    from SpineLabelLib.vertebrae import DISC

    def faint_column(loaded, volume, device, **kwargs):  # volume: (z, y, x) on the model's 4 mm grid
        tissue = np.zeros(volume.shape, np.uint8)
        z, y, x = (n // 2 for n in volume.shape)
        for k in range(4):
            top = z + 16 - 8 * k
            tissue[top - 6 : top, y - 4 : y + 4, x - 5 : x + 5] = BODY
            tissue[top - 8 : top - 6, y - 4 : y + 4, x - 5 : x + 5] = DISC
        body = (tissue == BODY).astype(np.float16) * np.float16(0.5)
        levels = np.zeros((len(LEVELS), *((n + 1) // 2 for n in volume.shape)), np.float16)  # no level evidence
        return Prediction(tissue, body, body.copy(), levels)

    monkeypatch.setattr(pipeline, "_predict_in_context", faint_column)
    refused = label_spine(small_phantom.image, model=random_model, device="cpu")
    assert refused.vertebrae == [] and any(w.startswith("no spine recognised") for w in refused.warnings)
    # the refusal names the switch in both interfaces, as the Slicer panel spells it
    panel = (Path(__file__).resolve().parents[1] / "SpineLabel" / "Resources" / "UI" / "SpineLabel.ui").read_text()
    switch = re.search(r'name="skipSpineGateCheckBox".*?<property name="text">\s*<string>(.*?)</string>', panel, re.S)
    assert any("--no-spine-gate" in w and f"'{switch.group(1)}'" in w for w in refused.warnings)
    assert any(re.match(r"no spine recognised: \d+ vertebra-like parts, with a median probability of 0\.\d\d of being "
                        "a vertebral body; if this is a spine, check that its header orients it right", w)
               for w in refused.warnings)
    # a scan the detection takes for the wrong modality finds no spine: the refusal says how it was read
    with pytest.raises(NoVertebrae, match="no spine recognised.*; read as CT from its intensities; if it is MR, "
                                          r"label it as MR \(modality mr\)$"):  # no closing 'no vertebrae found'
        require_vertebrae(refused, "phantom.nii.gz")
    # where no warning says why nothing was found, the refusal says that first
    empty = refused.copy(warnings=["read as MR from its intensities; if it is CT, label it as CT (modality ct)",
                                   "no vertebrae found"])
    with pytest.raises(NoVertebrae, match=r"^tiny.nii.gz: no vertebrae found; read as MR"):
        require_vertebrae(empty, "tiny.nii.gz")
    # an image too small to show a vertebra, as one whose header gives its voxel size in cm: the refusal says so
    in_cm = empty.copy(geometry=replace(empty.geometry, spacing=tuple(0.1 * s for s in empty.geometry.spacing)))
    with pytest.raises(NoVertebrae, match=r"; the image spans only [0-9.]+ x [0-9.]+ x [0-9.]+ mm: is the voxel size "
                                          r"in its header in mm\?$"):
        require_vertebrae(in_cm, "in_cm.nii.gz")
    given = label_spine(small_phantom.image, model=random_model, device="cpu", modality="ct")
    assert given.vertebrae == [] and not any("read as" in w for w in given.warnings)
    labelled = label_spine(small_phantom.image, model=random_model, device="cpu", spine_gate=False)
    assert labelled.vertebrae and labelled.spine_probability == refused.spine_probability
    assert not any(w.startswith("no spine recognised") for w in labelled.warnings)
    # ... but says that the gate would have refused it
    assert any(re.fullmatch(r"labelled as asked although no spine is recognised: \d+ vertebra-like parts, with a "
                            r"median probability of 0\.\d\d of being a vertebral body", w) for w in labelled.warnings)


def test_a_label_map_given_as_the_image_is_named(random_model, small_phantom):
    labels = sitk.Cast(small_phantom.labels, sitk.sitkInt16)
    result = label_spine(labels, model=random_model, device="cpu", spine_gate=False)
    assert any("is it a label map rather than a scan?" in w for w in result.warnings)
    assert looks_like_label_map(np.array([0, 1, 2, 26], dtype=np.float32))  # stored as floats too
    assert not looks_like_label_map(np.array([0, 0.5, 1]))  # not whole numbers
    assert not looks_like_label_map(np.zeros(8, dtype=np.int16))  # constant: said so otherwise
    assert not looks_like_label_map(np.arange(-1000, 1000, dtype=np.int16))  # a scan
    assert looks_like_label_map(np.arange(118, dtype=np.uint8))  # every class of TotalSegmentator's "total" task


@pytest.mark.skipif(not (DATA / "ct_mr_totalsegmentator").is_dir(), reason="real data ../shared/data not present")
def test_a_totalsegmentator_map_is_taken_for_a_label_map_and_no_real_scan_is():
    """TotalSegmentator's 42-value map of its abdominal CT was labelled as a scan without a word."""
    def pixels(path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    for name in ("example_seg.nii.gz", "example_seg_mr.nii.gz"):
        assert looks_like_label_map(pixels(DATA / "ct_mr_totalsegmentator" / name)), name
    kinds = (("mri_lumbar_bodies", "*_img.nii.gz"), ("discs_mri", "*_img.nii.gz"), ("ct_verse", "*_ct.nii.gz"),
             ("crops_tptbox", "*_ct.nii.gz"), ("crops_tptbox", "*_T2w.nii.gz"),
             ("ct_mr_totalsegmentator", "example_*_sm.nii.gz"))
    scans = [path for folder, pattern in kinds for path in sorted((DATA / folder).glob(pattern))]
    assert len(scans) >= 42  # 32 lumbar MRI, 5 disc MRI, a VerSe CT, TPTBox's CT and MRI, TotalSegmentator's CT and MR
    assert not [scan.name for scan in scans if looks_like_label_map(pixels(scan))]


def test_the_modality_can_be_given(small_phantom):
    # the default model has a CT window: its CT and MR paths normalise differently
    detected = label_spine(small_phantom.image, device="cpu", spine_gate=False)
    as_mr = label_spine(small_phantom.image, device="cpu", spine_gate=False, modality="mr")
    assert detected.modality == "CT" and as_mr.modality == "MR"
    assert as_mr.spine_probability != detected.spine_probability  # the network saw the MR normalisation
    for wrong in ("PET", None):
        with pytest.raises(ValueError, match="modality"):
            label_spine(small_phantom.image, device="cpu", modality=wrong)


def test_a_modality_given_against_clear_intensities_is_warned(small_phantom):
    """A CT labelled as MR (--modality mr, the Slicer modality box) was labelled without a word: on a real CT the names
    stayed but Dice fell from 0.82 to 0.75. Given as the intensities read it, or where they do not say it clearly,
    nothing is said."""
    def told(result):
        return [w for w in result.warnings if "as asked, but its intensities read clearly as" in w]

    as_mr = label_spine(small_phantom.image, device="cpu", spine_gate=False, modality="mr")
    assert told(as_mr) == ["labelled as MR as asked, but its intensities read clearly as CT (air in Hounsfield units); "
                           "if it is CT, label it as CT (modality ct)"]
    assert not told(label_spine(small_phantom.image, device="cpu", spine_gate=False, modality="ct"))
    assert not told(label_spine(small_phantom.image, device="cpu", spine_gate=False))
    mr = make_phantom(modality="mr", fov="lumbar", spacing=(2.0, 2.0, 2.5), seed=4).image
    assert not told(label_spine(mr, device="cpu", spine_gate=False, modality="mr"))


def test_a_ct_stored_1024_above_hounsfield_units_in_signed_voxels_given_as_ct_is_told_so():
    """Stored signed, the noise of its air reaches below -50 (sub-verse014 so stored: down to -267), so the warning
    of no intensity below -50 stays silent, and its intensities read clearly as MR: labelled as CT as asked, it was
    told to label it as MR, not to subtract 1024."""
    rng = np.random.default_rng(0)
    body = rng.normal(40, 20, (30, 40, 40))  # soft tissue, HU
    body[:, :, :6] = -100  # fat
    body[10:20, 15:25, 15:25] = 700  # bone
    ct = np.concatenate([rng.normal(-1000, 40, (30, 40, 8)), body], axis=2)
    stored = sitk.GetImageFromArray((np.round(ct) + 1024).astype(np.int16))
    stored.SetSpacing((2.0, 2.0, 2.0))
    result = label_spine(stored, device="cpu", spine_gate=False, modality="ct")
    assert any(w.startswith("labelled as CT as asked, but its intensities look like a CT stored 1024 above "
                            "Hounsfield units") for w in result.warnings), result.warnings
    assert not any("label it as MR" in w for w in result.warnings)


def test_a_modality_read_from_unclear_intensities_or_a_ct_without_hounsfield_units_is_warned(small_phantom):
    """An MR padded with -1024 was read as CT (padding looks like air) and labelled without a word but 'as CT' on the
    summary line; the warnings say how an image was read when its intensities do not say it clearly (padding alone
    below -50 reads as MR now). A CT stored as HU + 1024, labelled as CT, is told so."""
    mr = make_phantom(modality="mr", fov="lumbar", spacing=(2.0, 2.0, 2.5), seed=4).image
    padded = sitk.ConstantPad(sitk.Cast(mr, sitk.sitkFloat32), (6, 6, 0), (6, 6, 0), -1024.0)
    result = label_spine(padded, device="cpu", spine_gate=False)
    assert result.modality == "MR" and any(w.startswith("read as MR from its intensities") for w in result.warnings)
    clear = label_spine(small_phantom.image, device="cpu")
    assert not any("read as" in w for w in clear.warnings)
    box = sitk.ConstantPad(sitk.Image([30, 30, 30], sitk.sitkFloat32) + 300.0, (8, 8, 8), (8, 8, 8), -1024.0)
    empty = label_spine(box, device="cpu", spine_gate=False)  # no spine: said once, not again with 'no vertebrae'
    assert not empty.vertebrae and sum(w.startswith("read as MR") for w in empty.warnings) == 1
    raw = sitk.Cast(sitk.Cast(small_phantom.image, sitk.sitkFloat32) + 1024.0, sitk.sitkUInt16)
    result = label_spine(raw, device="cpu", spine_gate=False, modality="ct")
    assert any("are they Hounsfield units?" in w for w in result.warnings)


def test_a_ct_stored_1024_above_hounsfield_units_is_warned_when_read_as_mr(small_phantom):
    """A CT stored as HU + 1024 with no rescale intercept (unsigned, as some converters write it) was read as MR,
    clearly, and labelled without a word; on the real CT so stored the vertebrae came out 5 to 24 % smaller."""
    stored = sitk.Cast(sitk.Clamp(small_phantom.image + 1024, sitk.sitkFloat32, 0.0, 4095.0), sitk.sitkUInt16)
    result = label_spine(stored, device="cpu", spine_gate=False)
    assert result.modality == "MR" and any("1024 above Hounsfield units" in w for w in result.warnings)
    assert not any("1024 above" in w for w in label_spine(small_phantom.image, device="cpu").warnings)


@pytest.mark.skipif(not (DATA / "ct_verse").is_dir(), reason="real data ../shared/data/ct_verse not present")
def test_the_real_ct_stored_1024_above_hounsfield_units_is_warned():
    image = sitk.ReadImage(str(DATA / "ct_verse" / "sub-verse014_ct.nii.gz"))
    stored = sitk.Cast(sitk.Clamp(image + 1024, sitk.sitkInt32, 0, 4095), sitk.sitkUInt16)
    result = label_spine(stored, device="cpu")
    assert result.modality == "MR" and any("1024 above Hounsfield units" in w for w in result.warnings)


@pytest.mark.parametrize("kind", ["noise", "ball"])
def test_non_spine_images_give_no_vertebrae_and_a_warning(kind):
    rng = np.random.default_rng(0)
    if kind == "noise":
        array = rng.normal(0, 100, (60, 80, 80)).astype(np.float32)
    else:
        z, y, x = np.mgrid[:60, :80, :80]
        array = (((z - 30) ** 2 + (y - 40) ** 2 + (x - 40) ** 2) < 400).astype(np.float32) * 1000
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    result = label_spine(image, device="cpu")
    assert result.vertebrae == [] and "no vertebrae found" in result.warnings
    assert result.spine_probability is None or result.spine_probability < MIN_SPINE_PROBABILITY


def test_components_reach_the_input_grid_with_their_half_probability_surface():
    """Two balls whose probability falls linearly from 1 at the centre to 0.5 at 8 mm, their components reaching
    12 mm: on a grid twice as fine, every voxel within 7 mm of a centre carries that ball's id, and none beyond 9 mm
    is labelled (the probability, not the component, draws the surface)."""
    grid = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 2.0))
    image = sitk.Image([40, 40, 40], sitk.sitkInt16)
    image.SetOrigin((-0.5, -0.5, -0.5))
    centres_mm = {3: np.array([10.0, 20.0, 20.0]), 5: np.array([30.0, 20.0, 20.0])}  # (x, y, z)

    def distances(size: int, spacing: float, origin: float) -> dict[int, np.ndarray]:
        zyx = np.indices((size,) * 3) * spacing + origin
        return {i: np.sqrt(sum((zyx[a] - c[2 - a]) ** 2 for a in range(3))) for i, c in centres_mm.items()}

    model = distances(20, 2.0, 0.0)
    probability = np.clip(1 - np.minimum(*model.values()) / 16.0, 0, 1).astype(np.float32)
    components = np.zeros((20, 20, 20), np.int16)
    for i, r in model.items():
        components[(r < 12.0) & (r == np.minimum(*model.values()))] = i
    out, voxels = components_on_input_grid(components, probability, grid, image)
    assert out.dtype == np.int16 and out.shape == (40, 40, 40)
    assert voxels == {i: int((out == i).sum()) for i in model}
    fine = distances(40, 1.0, -0.5)
    for i, r in fine.items():
        assert (out[r < 7.0] == i).all()
    assert not out[np.minimum(*fine.values()) > 9.0].any()


@pytest.mark.parametrize("spacing_xyz", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0), (0.5, 0.5, 3.0000001)])
def test_on_ct_dense_bone_next_to_a_vertebra_joins_it_on_the_input_grid(spacing_xyz):
    """Two balls labelled to 8 mm on the model grid (2 mm), 18 mm apart, the second cut by the edge of the view,
    inside dense bone (400 HU) to 15 mm, on CT grids of any spacing: with ``dense_bone_hu`` each vertebra takes the
    dense voxels within ``DENSE_BONE_REACH_MM`` of its label and no others (a voxel within reach of both goes to the
    lower id), never a voxel below that density, and the counts are those of the label map; without it (MR) nothing
    grows."""
    grid = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    grid.SetSpacing((2.0, 2.0, 2.0))
    centres = {3: np.array([20.0, 20.0, 12.0]), 5: np.array([20.0, 20.0, 30.0])}  # (z, y, x) mm
    model_zyx = np.indices((20,) * 3) * 2.0
    r_model = {i: np.sqrt(((model_zyx - c[:, None, None, None]) ** 2).sum(axis=0)) for i, c in centres.items()}
    probability = (np.minimum(*r_model.values()) <= 8.0).astype(np.float32)
    components = np.zeros((20, 20, 20), np.int16)
    for i, r in r_model.items():
        components[(r <= 10.0) & (r == np.minimum(*r_model.values()))] = i
    spacing_zyx = np.array(spacing_xyz[::-1])
    shape = tuple(int(v) for v in np.floor(np.array([40.0, 40.0, 34.0]) / spacing_zyx))  # the view ends at x = 34 mm
    zyx = np.indices(shape) * spacing_zyx[:, None, None, None]
    r = np.minimum(*(np.sqrt(((zyx - c[:, None, None, None]) ** 2).sum(axis=0)) for c in centres.values()))
    hu = np.where(r <= 15.0, 400, 50).astype(np.int16)
    hu[zyx[1] < 20.0] = np.where(r[zyx[1] < 20.0] <= 15.0, 150, 50)  # one half: dense, but below the bone density
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing_xyz)
    plain, plain_voxels = components_on_input_grid(components, probability, grid, image)
    out, voxels = components_on_input_grid(components, probability, grid, image, dense_bone_hu=200.0)
    assert voxels == {i: int((out == i).sum()) for i in centres}
    assert plain_voxels == {i: int((plain == i).sum()) for i in centres}
    assert (out[plain != 0] == plain[plain != 0]).all()  # nothing taken away or renamed
    added = (out != 0) & (plain == 0)
    assert added.any() and (hu[added] >= 200).all()
    near = {i: ndimage.distance_transform_edt(plain != i, sampling=spacing_zyx) <= DENSE_BONE_REACH_MM * (1 + 1e-5)
            for i in centres}
    for i in centres:
        assert (out[added & (out == i)] == i).all() and near[i][added & (out == i)].all()
        assert (out[near[i] & (plain == 0) & (hu >= 200)] != 0).all()
    assert (out[near[3] & near[5] & (plain == 0) & (hu >= 200)] == 3).all()
    assert (added & (out == 5)).any()  # the vertebra at the edge of the view grows too


def test_input_voxels_halfway_between_model_voxels_are_labelled_alike_whatever_the_header_rounding():
    """A 1 mm input grid starts at the model grid's first voxel (``canonical_grid``), so every other input voxel lies
    halfway between two model voxels. A header whose axes differ by 1e-9 (as the same scan read from a DICOM series
    and from a NIfTI file) must give the same label map: on sub-verse014 read from a DICOM series of itself, 6 % of its
    labelled voxels changed, those ties decided by the rounding (1157 of 13754 voxels here)."""
    def labelled(direction: tuple[float, ...]) -> np.ndarray:
        image = sitk.Image([40, 40, 40], sitk.sitkInt16)
        image.SetDirection(direction)
        grid = canonical_grid(image, 2.0)
        components = np.zeros(sitk.GetArrayViewFromImage(grid).shape, np.int16)
        components[4:16, 4:16, 4:16] = 3
        components[10:16, 4:16, 4:16] = 5  # two vertebrae meeting at a plane
        probability = (components > 0).astype(np.float32)  # 0.5 exactly halfway across their surface
        return components_on_input_grid(components, probability, grid, image)[0]

    tilt = sitk.VersorTransform((1.0, 1.0, 1.0), 1e-9)  # a rounding of the header's cosines
    direction = tuple(np.array(tilt.GetMatrix()).reshape(3, 3).ravel())
    plain, tilted = labelled((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)), labelled(direction)
    assert plain.any() and (plain == 5).any()
    assert (plain == tilted).all(), f"{int((plain != tilted).sum())} of {int((plain > 0).sum())} voxels differ"


def test_an_image_in_memory_is_checked_as_a_file_is():
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5, 5, 5] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        label_spine(sitk.GetImageFromArray(volume))
    with pytest.raises(InputError, match="2D image"):
        label_spine(sitk.GetImageFromArray(volume[0]))


def _labelled_made_up(model, monkeypatch, column_y: slice, strays, image_y: int = 40):
    """``label_spine`` on a made-up network output on the 4 mm grid of the random model: five 24 mm bodies under 8 mm
    discs, 32 mm apart from the top down, at rows ``column_y``, and body-like ``strays`` ((z from the grid's end: the
    slice ``z - a : z - b`` for (a, b), y slice, x slice) each), without level evidence; the image 170 x ``image_y`` x
    40 voxels of 2 mm."""
    from SpineLabelLib import pipeline
    from SpineLabelLib.inference import Prediction
    from SpineLabelLib.vertebrae import BODY, DISC

    def made_up(loaded, volume, device, **kwargs):
        z = volume.shape[0]
        tissue = np.zeros(volume.shape, np.uint8)
        for k in range(5):
            top = z - 4 - 8 * k
            tissue[top - 6 : top, column_y, 5:15] = BODY
            tissue[top - 8 : top - 6, column_y, 5:15] = DISC
        for (a, b), y, x in strays:
            tissue[z - a : z - b, y, x] = BODY
        body = (tissue == BODY).astype(np.float16) * np.float16(0.95)
        levels = np.zeros((len(LEVELS), *((n + 1) // 2 for n in volume.shape)), np.float16)  # no level evidence
        return Prediction(tissue, body, body.copy(), levels)

    monkeypatch.setattr(pipeline, "_predict_in_context", made_up)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100.0, 5.0, (170, image_y, 40)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    return label_spine(image, model=model, device="cpu", modality="mr")


def test_a_component_far_beyond_the_end_of_the_spine_is_left_out_and_named(random_model, monkeypatch):
    """A body-like component four spacings below the last vertebra (an artefact at the edge of the view, a femoral
    head) is no vertebra a miss explains: it gets no level and no voxels in the label map, and the warnings say it
    was left out, so that a user who sees a vertebra there knows to add it. The network's output is made up here:
    five bodies 32 mm apart and the component 128 mm below them."""
    # its centre 32 voxels below the last body's (z - 39.5)
    result = _labelled_made_up(random_model, monkeypatch, slice(6, 14), [((74, 68), slice(6, 14), slice(5, 15))])
    assert len(result.vertebrae) == 5 and result.gaps_mm == pytest.approx([32.0] * 4)
    assert "ignored a vertebra-like part 128 mm beyond the end of the spine" in result.warnings
    assert set(np.unique(result.components)) == {0} | {v.id for v in result.vertebrae}



def test_a_regular_column_of_faint_bodies_is_taken_for_a_spine(random_model, monkeypatch):
    """Six bodies 32 mm apart at a vertebral-body probability of 0.75, under the 0.82 that five or more components
    need, lie in a regular column, which the gate takes (``regular_column``); five do not. The network's output is
    made up, as in the test above."""
    from SpineLabelLib import pipeline
    from SpineLabelLib.inference import Prediction
    from SpineLabelLib.vertebrae import BODY, DISC

    def made_up(n):
        def predict(loaded, volume, device, **kwargs):
            z = volume.shape[0]
            tissue = np.zeros(volume.shape, np.uint8)
            for k in range(n):  # 24 mm bodies under 8 mm discs, from the top down
                top = z - 4 - 8 * k
                tissue[top - 6 : top, 6:14, 5:15] = BODY
                tissue[top - 8 : top - 6, 6:14, 5:15] = DISC
            body = (tissue == BODY).astype(np.float16) * np.float16(0.75)
            levels = np.zeros((len(LEVELS), *((m + 1) // 2 for m in volume.shape)), np.float16)
            return Prediction(tissue, body, body.copy(), levels)
        return predict

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100.0, 5.0, (170, 40, 40)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    for n, labelled in ((REGULAR_COLUMN, REGULAR_COLUMN), (REGULAR_COLUMN - 1, 0)):
        monkeypatch.setattr(pipeline, "_predict_in_context", made_up(n))
        result = label_spine(image, model=random_model, device="cpu", modality="mr")
        assert len(result.vertebrae) == labelled and result.spine_probability == pytest.approx(0.75, abs=1e-3)


def test_a_body_holding_two_vertebrae_beside_a_skipped_level_is_cut_in_two(random_model, monkeypatch):
    """Six bodies 32 mm apart, the fourth and fifth one component 56 mm tall (their disc unseen): the chain would skip a
    level beside it. The level evidence names the levels C3-C6 and T1 from the top, the tall one C6 throughout, so the
    chain reads C3 C4 C5 C6 T1: C7 not found. Cut across at its centroid, six vertebrae are named C3-T1."""
    from SpineLabelLib import pipeline
    from SpineLabelLib.inference import Prediction
    from SpineLabelLib.vertebrae import BODY, DISC

    names = ["C3", "C4", "C5", "C6", "C7", "T1"]

    def predict(loaded, volume, device, **kwargs):
        z = volume.shape[0]
        tissue = np.zeros(volume.shape, np.uint8)
        levels = np.full((len(LEVELS), *((m + 1) // 2 for m in volume.shape)), np.float16(np.log(0.2 / len(LEVELS))))
        for k, name in enumerate(names):  # 24 mm bodies under 8 mm discs, from the top down (4 mm grid)
            top = z - 4 - 8 * k
            tissue[top - 6 : top, 6:14, 5:15] = BODY
            tissue[top - 8 : top - 6, 6:14, 5:15] = DISC if k != 3 else BODY  # no disc between the 4th and 5th
            level = level_index("C6" if name == "C7" else name)  # the one component reads as C6 throughout
            levels[level, (top - 8) // 2 : top // 2] = np.float16(np.log(0.8))
        body = (tissue == BODY).astype(np.float16) * np.float16(0.95)
        return Prediction(tissue, body, body.copy(), levels)

    monkeypatch.setattr(pipeline, "_predict_in_context", predict)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100.0, 5.0, (170, 40, 40)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    result = label_spine(image, model=random_model, device="cpu", modality="mr")
    assert [v.name for v in result.vertebrae] == names
    assert not any("not found" in w for w in result.warnings)


def _made_up_column(shape: tuple[int, int, int], names: list[str], first_top: int, front: int):
    """A made-up network output for a volume of ``shape`` (z, y, x) on the 4 mm grid of the random model: ``names``,
    cranial first, as 24 mm bodies (y from ``front``, 6 voxels deep) with an arch behind each and 8 mm discs below,
    the first body ending just below plane ``first_top``, each read by the level head as its level (0.8). Returns the
    uint8 tissue map and the float16 half-resolution level log-probabilities, for the caller to add to."""
    from SpineLabelLib.vertebrae import BODY, DISC, POSTERIOR

    tissue = np.zeros(shape, np.uint8)
    levels = np.full((len(LEVELS), *((m + 1) // 2 for m in shape)), np.float16(np.log(0.2 / len(LEVELS))))
    for k, name in enumerate(names):
        top = first_top - 8 * k
        tissue[top - 6 : top, front : front + 6, 5:15] = BODY
        tissue[top - 6 : top, front + 6 : front + 12, 8:12] = POSTERIOR
        tissue[top - 8 : top - 6, front : front + 6, 5:15] = DISC
        levels[level_index(name), (top - 8) // 2 : (top + 1) // 2] = np.float16(np.log(0.8))
    return tissue, levels


def _prediction(tissue: np.ndarray, levels: np.ndarray):
    """The ``Prediction`` of a made-up tissue map and level head output (body and bone probability 0.95 inside)."""
    from SpineLabelLib.inference import Prediction
    from SpineLabelLib.vertebrae import BODY

    body = (tissue == BODY).astype(np.float16) * np.float16(0.95)
    return Prediction(tissue, body, (tissue > 0).astype(np.float16) * np.float16(0.95), levels)


def test_the_arch_of_a_vertebra_above_the_view_is_labelled_the_level_above(random_model, monkeypatch):
    """T12 to L3 from the top, T12's body cut by the top of the view; behind it, in the top three planes, a spinous
    process that the level head reads as T11 (3 ml on the 4 mm grid): it is named T11, the others keep their names.
    Read as T12, it stays T12's."""
    from SpineLabelLib import pipeline
    from SpineLabelLib.vertebrae import POSTERIOR

    names = ["T12", "L1", "L2", "L3"]

    def made_up(spinous: str):
        def predict(loaded, volume, device, **kwargs):
            z = volume.shape[0]
            tissue, levels = _made_up_column(volume.shape, names, z, front=2)  # T12 cut by the top of the view
            tissue[z - 3 :, 14:18, 8:12] = POSTERIOR
            cells = (slice((z - 3) // 2, None), slice(7, 9), slice(4, 6))
            levels[(level_index("T12"), *cells)] = np.float16(np.log(0.2 / len(LEVELS)))
            levels[(level_index(spinous), *cells)] = np.float16(np.log(0.8))
            return _prediction(tissue, levels)
        return predict

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100.0, 5.0, (120, 40, 40)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    for spinous, expected in (("T11", ["T11", *names]), ("T12", names)):
        monkeypatch.setattr(pipeline, "_predict_in_context", made_up(spinous))
        result = label_spine(image, model=random_model, device="cpu", modality="mr", spine_gate=False)
        assert [v.name for v in result.vertebrae] == expected
    monkeypatch.setattr(pipeline, "_predict_in_context", made_up("T11"))
    result = label_spine(image, model=random_model, device="cpu", modality="mr", spine_gate=False)
    arch = result.label_map() == result.vertebrae[0].label
    assert arch.any() and result.vertebrae[0].volume_ml < 5.0


def test_an_arch_above_the_view_that_reaches_below_the_top_body_centroid_is_labelled(random_model, monkeypatch):
    """T12 whole, one disc below the top of the view; behind it T11's lamina in the top planes and its bulky spinous
    process sloping down past T12's body centroid, all read as T11: named T11 (only C1 must lie above the rest of the
    vertebra it is parted from)."""
    from SpineLabelLib import pipeline
    from SpineLabelLib.vertebrae import POSTERIOR

    names = ["T12", "L1", "L2", "L3"]

    def predict(loaded, volume, device, **kwargs):
        z = volume.shape[0]
        tissue, levels = _made_up_column(volume.shape, names, z - 2, front=2)
        tissue[z - 3 :, 14:16, 9:11] = POSTERIOR  # the lamina, in the top planes
        tissue[z - 12 : z - 3, 14:18, 6:14] = POSTERIOR  # the spinous process below it
        cells = (slice((z - 12) // 2, None), slice(7, 9), slice(3, 7))
        levels[(level_index("T12"), *cells)] = np.float16(np.log(0.2 / len(LEVELS)))
        levels[(level_index("T11"), *cells)] = np.float16(np.log(0.8))
        return _prediction(tissue, levels)

    monkeypatch.setattr(pipeline, "_predict_in_context", predict)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100.0, 5.0, (120, 40, 40)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    result = label_spine(image, model=random_model, device="cpu", modality="mr", spine_gate=False)
    assert [v.name for v in result.vertebrae] == ["T11", *names]
    assert result.vertebrae[0].centroid_lps_mm[2] < result.vertebrae[1].centroid_lps_mm[2]  # below T12's centroid


def test_c1_beside_the_dens_is_labelled_c1(random_model, monkeypatch):
    """C2 to C5 from the top; in front of C2's upper body, joined to it in the body mask, C1's anterior arch, which the
    level head reads as C1 (10 ml on the 4 mm grid): it is named C1, the others keep their names, and
    C2 no longer holds it. Read as C2, it stays C2's; and so does a lower half of C2 read as C1 below an upper half
    read as C2 (C1 cannot lie below C2)."""
    from SpineLabelLib import pipeline
    from SpineLabelLib.vertebrae import BODY

    names = ["C2", "C3", "C4", "C5"]

    def made_up(arch: str):
        def predict(loaded, volume, device, **kwargs):
            z = volume.shape[0]
            tissue, levels = _made_up_column(volume.shape, names, z - 2, front=4)  # below 8 mm of neck
            tissue[z - 6 : z - 2, 0:4, 5:15] = BODY  # C1's ring lies around the dens, above C2's body
            cells = (slice((z - 6) // 2, (z - 1) // 2), slice(0, 2), slice(None))
            if arch == "C1 below":
                cells = (slice((z - 8) // 2, (z - 5) // 2), slice(None), slice(None))
            levels[(level_index("C2"), *cells)] = np.float16(np.log(0.2 / len(LEVELS)))
            levels[(level_index(arch[:2]), *cells)] = np.float16(np.log(0.8))
            return _prediction(tissue, levels)
        return predict

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100.0, 5.0, (128, 40, 40)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    for arch, expected in (("C1", ["C1", *names]), ("C2", names), ("C1 below", names)):
        monkeypatch.setattr(pipeline, "_predict_in_context", made_up(arch))
        result = label_spine(image, model=random_model, device="cpu", modality="mr", spine_gate=False)
        assert [v.name for v in result.vertebrae] == expected
    monkeypatch.setattr(pipeline, "_predict_in_context", made_up("C1"))
    result = label_spine(image, model=random_model, device="cpu", modality="mr", spine_gate=False)
    c1, c2 = result.vertebrae[:2]
    assert 5.0 < c1.volume_ml < 12.0
    assert c1.centroid_lps_mm[1] < c2.centroid_lps_mm[1] - 10.0  # C1 in front of C2 (anterior: smaller LPS y)


def test_s1_is_never_the_body_cut_for_a_skipped_level():
    """L5 skipped between L4 and S1: the sacrum's box is the tallest of a chain, and a merged L4+L5 beside it is not
    told apart by height; nothing is cut. A tall L2 beside a skipped L3 is cut."""
    from types import SimpleNamespace

    from SpineLabelLib.pipeline import _merged_beside_skip
    chain = [SimpleNamespace(id=k + 1, extent_mm=np.array([h, 30.0, 40.0])) for k, h in enumerate([30, 30, 52, 70])]
    assert _merged_beside_skip(np.array([level_index(n) for n in ("L2", "L3", "L4", "S1")]), chain) == []
    assert [f.id for f in _merged_beside_skip(np.array([level_index(n) for n in ("T12", "L1", "L2", "L4")]),
                                              chain[:2] + chain[2:][::-1])] == [4]


def test_voxels_coarser_than_the_names_were_checked_on_are_said(random_model):
    """The names were checked on slices up to 6 mm thick; an image of 8 mm slices is labelled with a warning."""
    image = sitk.Image([40, 40, 20], sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 8.0))
    coarse = label_spine(image, model=random_model, device="cpu")
    assert ("voxels 8 mm apart along one axis: the names were checked on slices up to 6 mm; check them"
            in coarse.warnings)
    image.SetSpacing((1.0, 1.0, 6.000000000000002))  # 6 mm as computed from DICOM slice positions
    assert not any("apart along one axis" in w for w in label_spine(image, model=random_model, device="cpu").warnings)


def test_a_view_narrower_front_to_back_than_the_names_were_checked_on_is_said(random_model):
    """Real lumbar MRI cut into coronal stacks of 40 and 60 mm were named one level off at 0.99 or more; a view under
    80 mm front to back is labelled with a warning, whichever image axis runs front to back."""
    voxels = np.random.default_rng(0).integers(0, 100, (20, 10, 40)).astype(np.int16)  # (k, j, i): not constant
    image = sitk.GetImageFromArray(voxels)  # stored as a coronal stack: i along L, j along S, k along P
    image.SetSpacing((2.0, 4.0, 3.0))
    image.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))
    narrow = label_spine(image, model=random_model, device="cpu")
    assert ("the view is 60 mm front to back: the names were checked on views of 80 mm or more; check them"
            in narrow.warnings)
    image.SetSpacing((2.0, 4.0, 4.0))
    assert not any("checked on views" in w for w in label_spine(image, model=random_model, device="cpu").warnings)


def test_what_the_reader_noted_is_among_the_warnings(tmp_path, random_model):
    """How a file was read (here a NIfTI header whose qform and sform point the spine different ways) is said with
    the labelling's warnings, in the report as on the screen, not only in the log."""
    nibabel = pytest.importorskip("nibabel")
    nii = nibabel.Nifti1Image(np.zeros((20, 20, 20), np.int16), None)
    nii.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    nii.set_qform(np.diag([2.0, 2.0, -2.0, 1.0]), code=1)
    nibabel.save(nii, tmp_path / "flipped.nii.gz")
    result = label_spine(tmp_path / "flipped.nii.gz", model=random_model, device="cpu")
    assert result.warnings[0].startswith("its qform and sform disagree (axes toward RAI and RAS), and it was read by "
                                         "the sform")


def test_a_stray_beyond_the_end_is_left_out_once_a_component_off_the_line_no_longer_bridges_to_it(random_model,
                                                                                                  monkeypatch):
    """A component 52 mm in front of the spine below its last vertebra split the gap to a stray 112 mm below it
    (61 mm, then 95: neither three spacings), so the stray was kept past the end; once the one off the line
    was left out, the stray took a level. As a CT's metal streaks made them (a helper's probe: 'T11' at 0.995 in front
    of T12). The network's output is made up here."""
    result = _labelled_made_up(random_model, monkeypatch, slice(26, 34), [
        ((50, 44), slice(13, 21), slice(5, 15)),  # 32 mm below the last body, 52 mm in front of it
        ((70, 64), slice(28, 32), slice(7, 12)),  # small, 112 mm below the last body
    ], image_y=80)
    assert len(result.vertebrae) == 5 and result.gaps_mm == pytest.approx([32.0] * 4)
    assert result.warnings[:2] == ["ignored a vertebra-like part 52 mm off the line of the spine",
                                   "ignored a vertebra-like part 112 mm beyond the end of the spine"]


def _middle_body(prediction) -> tuple[float, float, float]:
    """Centroid (z, y, x, model voxels) of the middle one of a prediction's vertebral bodies (500 voxels or more, no
    speck)."""
    bodies, n = ndimage.label(prediction.tissue == BODY)
    large = [i for i, size in enumerate(ndimage.sum(bodies > 0, bodies, range(1, n + 1)), 1) if size >= 500]
    return sorted(ndimage.center_of_mass(bodies > 0, bodies, large))[len(large) // 2]


def _painted(prediction, where, tissue: int, probability: float):
    """``prediction`` (an ``inference.Prediction``) with the voxels ``where`` (bool, its (z, y, x) grid) given the
    tissue code ``tissue`` and that body and bone probability."""
    from SpineLabelLib.inference import Prediction

    painted = [prediction.tissue.copy(), prediction.body_probability.copy(), prediction.bone_probability.copy()]
    for array, value in zip(painted, (tissue, probability, probability)):
        array[where] = value
    return Prediction(*painted, prediction.level_log_probs)


def test_a_component_beside_the_spine_takes_no_level(monkeypatch):
    """A body-like blob in front of the column (as a bowel loop might come out of the network) is sorted into the
    chain beside a vertebra; left in, it took a level (an L6 here, 10 vertebrae) and renamed the vertebrae below it."""
    from SpineLabelLib import pipeline

    phantom = make_phantom(modality="ct", fov="lumbar", seed=123)
    clean = label_spine(phantom.image, device="cpu")
    predict = pipeline._predict_in_context

    def with_blob(loaded, volume, device, **kwargs):
        p = predict(loaded, volume, device, **kwargs)
        z, y, x = _middle_body(p)
        zz, yy, xx = np.ogrid[tuple(slice(0, s) for s in p.tissue.shape)]  # 2 mm voxels: 28 mm in front of it
        blob = ((zz - z) / 6) ** 2 + ((yy - y + 14) / 4.5) ** 2 + ((xx - x) / 7) ** 2 <= 1
        return _painted(p, blob, BODY, 0.95)

    monkeypatch.setattr(pipeline, "_predict_in_context", with_blob)
    result = label_spine(phantom.image, device="cpu")
    assert [v.name for v in result.vertebrae] == [v.name for v in clean.vertebrae]
    # placed 28 mm in front of a body's centroid, it lies about as far off the line through the centroids
    assert any(re.fullmatch(r"ignored a vertebra-like part 2[5-9] mm off the line of the spine", w)
               for w in result.warnings), result.warnings


def test_a_body_like_blob_in_front_of_and_below_the_sacrum_is_not_joined_to_s1(monkeypatch):
    """A body-like blob below S1 and in front of the sacrum (pelvic soft tissue, as the network found 55-105 mm below
    S1 on sagittal lumbar MRI) is sorted into the chain below S1 as a sacral piece; joined to S1 wherever it lay, it
    made S1 as large as a pelvis. It neither continues the sacrum (beyond reach of it) nor lies behind the S1 body:
    it stays unlabelled, while the phantom's own sacral pieces still join S1, and the names do not change."""
    from SpineLabelLib import pipeline

    phantom = make_phantom(modality="ct", fov="lumbar", seed=123)
    clean = label_spine(phantom.image, device="cpu")
    predict = pipeline._predict_in_context

    def with_blob(loaded, volume, device, **kwargs):
        p = predict(loaded, volume, device, **kwargs)
        bodies, n = ndimage.label(p.tissue == BODY)
        large = [i for i, size in enumerate(ndimage.sum(bodies > 0, bodies, range(1, n + 1)), 1) if size >= 500]
        z, y, x = sorted(ndimage.center_of_mass(bodies > 0, bodies, large))[0]  # the lowest body: the sacrum's
        zz, yy, xx = np.ogrid[tuple(slice(0, s) for s in p.tissue.shape)]  # 2 mm voxels: 28 mm below, 40 mm in front
        blob = ((zz - z + 14) / 5) ** 2 + ((yy - y + 20) / 5) ** 2 + ((xx - x) / 7) ** 2 <= 1
        return _painted(p, blob, BODY, 0.95)

    monkeypatch.setattr(pipeline, "_predict_in_context", with_blob)
    result = label_spine(phantom.image, device="cpu")
    assert [v.name for v in result.vertebrae] == [v.name for v in clean.vertebrae]
    assert len(result.sacral_pieces) == len(clean.sacral_pieces) + 1  # the blob is one of the sacral pieces
    s1, clean_s1 = result.vertebrae[-1], clean.vertebrae[-1]
    assert s1.name == "S1" and s1.volume_ml == pytest.approx(clean_s1.volume_ml, rel=0.01)
    assert np.array_equal(result.components == s1.id, clean.components == clean_s1.id)


def test_a_join_or_cut_of_bodies_is_warned_of(monkeypatch):
    """Joining two components into one vertebra (``_split_in_two``) or cutting one in two (``_merged_beside_skip``)
    changes the count of the chain: the labelling says so. Real lumbar MRI with L3-L5 fused (the disc spaces filled
    with the bodies' own intensity): two small pieces of the block, 20 mm apart, were joined, and the sacrum was then
    named L5 at confidence 0.997 with no word of the join."""
    from SpineLabelLib import pipeline

    phantom = make_phantom(modality="ct", fov="lumbar", seed=123)
    clean = label_spine(phantom.image, device="cpu")
    assert not any(w.startswith(("joined two", "cut a body")) for w in clean.warnings), clean.warnings
    predict = pipeline._predict_in_context

    def split_body(loaded, volume, device, **kwargs):  # a middle body parted by a 4 mm slab of background
        p = predict(loaded, volume, device, **kwargs)
        if kwargs.get("levels_only"):
            return p
        z = int(round(_middle_body(p)[0]))
        gap = np.zeros(p.tissue.shape, bool)
        gap[z - 1: z + 1] = True
        return _painted(p, gap & (p.tissue == BODY), 0, 0.0)

    monkeypatch.setattr(pipeline, "_predict_in_context", split_body)
    joined = label_spine(phantom.image, device="cpu")
    assert [v.name for v in joined.vertebrae] == [v.name for v in clean.vertebrae]
    assert any(re.fullmatch(r"joined two vertebra-like parts \d+ mm apart into one vertebra, .*check the count", w)
               for w in joined.warnings), joined.warnings

    monkeypatch.setattr(pipeline, "_predict_in_context", predict)
    merged = pipeline._merged_beside_skip
    calls = []

    def one_tall(levels, chain):  # the decision itself: test_s1_is_never_the_body_cut_for_a_skipped_level
        calls.append(1)
        return [chain[len(chain) // 2]] if len(calls) == 1 else merged(levels, chain)

    monkeypatch.setattr(pipeline, "_merged_beside_skip", one_tall)
    cut = label_spine(phantom.image, device="cpu")
    assert any(re.fullmatch(r"cut a body \d+ mm tall in two beside a skipped level, .*check the count", w)
               for w in cut.warnings), cut.warnings


def test_a_body_split_in_two_is_joined():
    """Two neighbours far closer than their levels' spacing and together no bigger than one vertebra are one body
    split in two (an L5 of a clinical stack of 3 mm sagittal slices: 20 and 11 ml, 16 mm apart); not two whole
    vertebrae that close, nor a pair at a normal spacing, nor a piece beside S1 or cut by the view."""
    from types import SimpleNamespace

    from SpineLabelLib.pipeline import _split_in_two

    def chain(volumes, cut=()):
        return [SimpleNamespace(id=k + 1, volume_ml=v, at_view_end=k in cut) for k, v in enumerate(volumes)]

    levels = np.array([level_index(n) for n in ("T12", "L1", "L2", "L3", "L4", "L5", "S1")])
    gaps = np.array([35.0, 37.0, 38.0, 37.0, 16.0, 28.0])
    assert _split_in_two(levels, chain([30, 32, 33, 34, 20, 11, 30]), gaps) == [(5, 6)]
    assert _split_in_two(levels, chain([30, 32, 33, 34, 20, 11, 30], cut=(5,)), gaps) == []
    assert _split_in_two(levels, chain([30, 32, 33, 34, 33, 34, 30]), gaps) == []  # two whole vertebrae
    assert _split_in_two(levels, chain([30, 32, 33, 34, 20, 11, 30]), np.full(6, 36.0)) == []
    beside_s1 = np.array([35.0, 37.0, 38.0, 37.0, 36.0, 14.0])
    assert _split_in_two(levels, chain([30, 32, 33, 34, 34, 11, 20]), beside_s1) == []
    # one pitch apart across a skipped level: half the expected gap of L2 -> L4, but two vertebrae, not one split
    skipping = np.array([level_index(n) for n in ("T12", "L1", "L2", "L4", "L5", "S1")])
    assert _split_in_two(skipping, chain([30, 32, 14, 20, 33, 30]), np.array([33.0, 36.0, 37.0, 36.0, 34.0])) == []


@pytest.mark.parametrize("step", ["straight", "diagonal"])
def test_a_vertebra_connected_on_the_model_grid_stays_connected_on_the_input_grid(step):
    """A body and an arch joined by a bridge one model voxel wide at a vertebra probability of 0.6 (a thin pedicle),
    running along x or stepping diagonally: on the 1 mm input grid the vertebra is one 26-connected piece, as on the
    model grid. The interpolated probability between two diagonal bridge voxels is 0.3, and the arch of a lumbar MRI
    (IVD_20, 19 ml) lay one voxel apart from its body."""
    image = sitk.Image([48, 32, 32], sitk.sitkInt16)
    grid = canonical_grid(image, 2.0)
    components = np.zeros(sitk.GetArrayViewFromImage(grid).shape, np.int16)
    probability = np.zeros(components.shape, np.float32)
    for x0, x1 in ((2, 8), (14, 20)):
        components[4:12, 4:12, x0:x1] = 7
        probability[4:12, 4:12, x0:x1] = 1.0
    for i, x in enumerate(range(8, 14)):
        y = 8 + (i // 2 if step == "diagonal" else 0)
        components[8, y, x] = 7
        probability[8, y, x] = 0.6
    structure = np.ones((3, 3, 3), dtype=bool)
    assert ndimage.label(components == 7, structure=structure)[1] == 1
    out, voxels = components_on_input_grid(components, probability, grid, image)
    assert ndimage.label(out == 7, structure=structure)[1] == 1
    assert voxels == {7: int((out == 7).sum())}


def test_dense_bone_joins_a_vertebra_only_where_it_connects_to_it():
    """On CT, dense bone within ``DENSE_BONE_REACH_MM`` of a vertebra joins it, but not across a voxel that is not
    dense: a shell of dense voxels 2 mm from the label, behind a shell of soft tissue, stays out (it made specks apart
    from the vertebra, 9-36 pieces of each vertebra of sub-verse014); a patch dense through both shells joins, and the
    vertebra stays one piece."""
    image = sitk.Image([40, 40, 40], sitk.sitkInt16)
    grid = canonical_grid(image, 2.0)
    components = np.zeros(sitk.GetArrayViewFromImage(grid).shape, np.int16)
    components[6:14, 6:14, 6:14] = 3
    probability = (components > 0).astype(np.float32)
    plain, _ = components_on_input_grid(components, probability, grid, image)
    distance = ndimage.distance_transform_edt(plain == 0)
    hu = np.full(plain.shape, 50, np.int16)
    patch = np.zeros(plain.shape, dtype=bool)
    patch[18:22, 18:22, :] = True
    apart = (np.indices(plain.shape) % 3 == 0).all(axis=0)  # specks no two of which touch
    specks = apart & (distance > 1.75) & (distance <= 2.0) & ~ndimage.binary_dilation(patch, iterations=3)
    assert specks.sum() > 20
    hu[specks] = 400  # 2 mm away, behind soft tissue
    hu[patch & (distance > 0) & (distance <= 2.0)] = 400  # dense through both shells
    ct = sitk.GetImageFromArray(hu)
    out, voxels = components_on_input_grid(components, probability, grid, ct, dense_bone_hu=200.0)
    added = (out == 3) & (plain == 0)
    assert added.any() and patch[added].all()
    assert ndimage.label(out == 3, structure=np.ones((3, 3, 3), dtype=bool))[1] == 1
    assert voxels == {3: int((out == 3).sum())}


def test_a_vertebra_encloses_no_small_cavity_on_the_input_grid():
    """Voxels of vertebra probability just under 0.5 inside a vertebra (pinholes in the bone on CT, 24-96 per vertebra
    of sub-verse014) are labelled: a cube with one model voxel of probability 0.3 at its centre has no unlabelled voxel
    inside; a cavity larger than ``ENCLOSED_MAX_ML`` (a closed canal) stays empty; the counts are the label map's."""
    image = sitk.Image([40, 40, 40], sitk.sitkInt16)
    grid = canonical_grid(image, 2.0)
    components = np.zeros(sitk.GetArrayViewFromImage(grid).shape, np.int16)
    components[4:16, 4:16, 4:16] = 3
    probability = (components > 0).astype(np.float32)
    probability[9:11, 9:11, 9:11] = 0.3  # a pinhole, 8 model voxels
    components[3:18, 3:18, 17:19] = 5
    probability[3:18, 3:18, 17:19] = 1.0
    out, voxels = components_on_input_grid(components, probability, grid, image)
    assert not (ndimage.binary_fill_holes(out == 3) & (out == 0)).any()
    assert voxels == {i: int((out == i).sum()) for i in (3, 5)}
    big = np.zeros(components.shape, np.int16)
    big[2:18, 2:18, 2:18] = 4  # encloses a cavity of 10 mm x 10 mm x 10 mm = 1 ml
    big[6:11, 6:11, 6:11] = 0
    out, _ = components_on_input_grid(big, (big > 0).astype(np.float32), grid, image)
    assert (ndimage.binary_fill_holes(out == 4) & (out == 0)).sum() > 0.5 * ENCLOSED_MAX_ML * 1000


def test_on_ct_no_voxel_of_air_is_labelled():
    """A vertebra whose model-grid label and probability reach over the edge of the scanned field into a band of
    -1024 HU (as sub-verse014's S1 took 2.8 ml of the padding at the end of its scan): on CT none of those voxels is
    labelled, and nothing else changes; on MR (no Hounsfield units) they are."""
    image_array = np.full((40, 40, 40), 100, np.int16)  # below the dense-bone density: nothing grows
    image_array[:, :, 30:] = -1024
    ct = sitk.GetImageFromArray(image_array)
    grid = canonical_grid(ct, 2.0)
    components = np.zeros(sitk.GetArrayViewFromImage(grid).shape, np.int16)
    components[5:15, 5:15, 8:18] = 3
    probability = (components > 0).astype(np.float32)
    plain, _ = components_on_input_grid(components, probability, grid, ct)
    out, voxels = components_on_input_grid(components, probability, grid, ct, dense_bone_hu=200.0)
    assert (plain[image_array < AIR_HU] == 3).any()
    assert not out[image_array < AIR_HU].any()
    assert (out[image_array >= AIR_HU] == plain[image_array >= AIR_HU]).all()
    assert voxels == {3: int((out == 3).sum())}


def test_a_card_is_checked_field_by_field_and_each_refusal_names_its_field(tmp_path, random_model):
    """Each field a card may get wrong is refused with its own reason, not found later as another error (a network
    that cannot be built, weights 'not found' or 'corrupt')."""
    good = json.loads(Path(random_model).read_text())
    shutil.copy(Path(random_model).with_name(good["weights"]), tmp_path / good["weights"])
    bad = tmp_path / "bad.json"
    for change, reason in (({"architecture": {"channels": [8, 16]}}, "architecture.channels must be three or more"),
                           ({"architecture": {"channels": [0, 8, 16]}}, "architecture.channels must be three or more"),
                           ({"spacing_mm": 10.5}, "spacing_mm must be a number from 0.25 to 10.0"),
                           ({"weights": ".."}, "weights must be the name of a file beside the card"),
                           ({"sha256": 5}, "sha256 must be a string"),
                           ({"tissue_classes": good["tissue_classes"][::-1]}, "tissue_classes must be"),
                           ({"level_classes": good["level_classes"][:-1]}, "level_classes must be")):
        bad.write_text(json.dumps({**good, **change}))
        with pytest.raises(ModelError, match=f"^{re.escape(str(bad))}: {re.escape(reason)}"):
            load_model(bad)
    bad.write_text(json.dumps({key: value for key, value in good.items() if key != "version"}))
    with pytest.raises(ModelError, match=f"^{re.escape(str(bad))}: model card lacks version$"):
        load_model(bad)
    bad.write_text("[]")
    with pytest.raises(ModelError, match="a model card is a JSON object"):
        load_model(bad)
    bad.write_text(json.dumps({**good, "sha256": good["sha256"].upper()}))  # a hash in capitals is the same hash
    assert load_model(bad).card["sha256"] == good["sha256"].upper()


def test_a_path_ending_in_a_model_s_name_is_a_path_not_that_model(tmp_path, monkeypatch):
    from SpineLabelLib.models import DEFAULT_MODEL_NAME, user_models_dir

    assert card_file(tmp_path / DEFAULT_MODEL_NAME) == tmp_path / DEFAULT_MODEL_NAME
    with pytest.raises(ModelError, match=f"^{re.escape(str(tmp_path / DEFAULT_MODEL_NAME))}: model card not found$"):
        load_model(tmp_path / DEFAULT_MODEL_NAME)
    monkeypatch.setenv("SPINELABEL_MODELS_DIR", "")  # set but empty: the default folder, not the current one
    assert user_models_dir() == Path.home() / ".local" / "share" / "spinelabel" / "models"


def test_a_name_whose_weights_alone_are_in_the_registry_is_taken(tmp_path, monkeypatch, random_model):
    """Weights without their card: a registration killed half way, or under way in another process."""
    from SpineLabelLib import models
    from SpineLabelLib.models import registration_path

    monkeypatch.setenv("SPINELABEL_MODELS_DIR", str(tmp_path))
    (tmp_path / "half.pt").write_bytes(b"")
    with pytest.raises(ModelError, match="a model named 'half' is registered already"):
        registration_path("half")

    def copy_fails(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models.shutil, "copyfile", copy_fails)
    with pytest.raises(OSError, match="No space left"):
        register_model(random_model, name="full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.pt"]  # the claim on 'full' is given up


def test_a_constant_image_too_small_for_a_vertebra_is_refused_as_constant_only():
    """The hint on the voxel size is for an image with content; a constant one has nothing to label whatever its
    size."""
    from conftest import build_spine

    spine = build_spine().result
    tiny = replace(spine.geometry, spacing=tuple(0.1 * s for s in spine.geometry.spacing))
    constant = spine.copy(vertebrae=[], geometry=tiny, warnings=["image is constant: nothing to label"])
    with pytest.raises(NoVertebrae, match=r"^c.nii.gz: image is constant: nothing to label$"):
        require_vertebrae(constant, "c.nii.gz")


def test_a_modality_of_no_kind_is_refused_before_anything_is_read():
    for modality in ("xray", None, 3, ""):
        with pytest.raises(ValueError, match=r"^modality must be 'auto', 'ct' or 'mr', not "):
            label_spine(sitk.Image(8, 8, 8, sitk.sitkFloat32), model="no-such-model", modality=modality)


def test_a_view_just_under_80_mm_front_to_back_is_said(random_model):
    voxels = np.random.default_rng(0).integers(0, 100, (20, 10, 40)).astype(np.int16)  # as in the test above
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((2.0, 4.0, 3.9))  # 78 mm front to back
    image.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))
    assert ("the view is 78 mm front to back: the names were checked on views of 80 mm or more; check them"
            in label_spine(image, model=random_model, device="cpu").warnings)


def test_a_modality_given_is_questioned_only_where_the_intensities_say_the_other_clearly(random_model):
    rng = np.random.default_rng(0)
    voxels = rng.normal(40, 20, (20, 40, 40))
    voxels.flat[::40], voxels.flat[1::40] = -100, 700  # fat and bone in HU, no air: CT, but not clearly
    image = sitk.GetImageFromArray(voxels.astype(np.float32))
    assert read_modality(voxels) == ("CT", False)
    warnings = label_spine(image, model=random_model, device="cpu", modality="mr").warnings
    assert not any("as asked" in w or "read as" in w for w in warnings), warnings
    body = rng.normal(40, 20, (30, 40, 40))  # a CT stored 1024 above HU (test_inference), given as MR: as asked
    body[:, :, :6], body[10:20, 15:25, 15:25] = -100, 700
    stored = np.clip(np.round(np.concatenate([rng.normal(-1000, 20, (30, 40, 8)), body], axis=2)) + 1024, 0, 4095)
    warnings = label_spine(sitk.GetImageFromArray(stored.astype(np.int16)), model=random_model, device="cpu",
                           modality="mr").warnings
    assert not any("1024 above Hounsfield units" in w for w in warnings), warnings


def test_save_model_names_the_file_a_full_disk_stopped(tmp_path):
    # torch says only "unexpected pos" where the disk is full; a file-size limit fails the write as a full disk does
    resource = pytest.importorskip("resource")  # POSIX

    card = tmp_path / "m.json"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # Python ignores SIGXFSZ: the write fails, EFBIG
    try:
        with pytest.raises(OSError, match=re.escape(str(card.with_suffix(".pt")))):
            save_model(SpineUNet(), {"name": "m", "version": "1", "spacing_mm": 4.0}, card)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []
