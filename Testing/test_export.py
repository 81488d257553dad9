"""nnU-Net v2 dataset export of corrected labellings (SpineLabelLib.export)."""

from __future__ import annotations

import errno
import gzip
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import build_spine
from SpineLabelLib import edits, export
from SpineLabelLib.io import InputError
from SpineLabelLib.vertebrae import BY_NAME, LEVELS


def test_labels_are_consecutive_and_cover_every_level():
    labels = export.dataset_labels()
    assert list(labels.values()) == list(range(len(labels)))
    assert all(labels[level.name] == level.label for level in LEVELS)


def test_export_writes_nnunet_case_and_appends(tmp_path, spine):
    corrected = edits.rename(spine.result, spine.result.vertebrae[0].id, "T12")
    log = [{"action": "rename", "vertebra_id": spine.result.vertebrae[0].id, "from": "T11", "to": "T12"}]
    label_path = export.export_case(corrected, spine.image, tmp_path, corrections=log)
    assert label_path == tmp_path / "labelsTr" / "spine_ct_0001.nii.gz"

    image = sitk.ReadImage(str(tmp_path / "imagesTr" / "spine_ct_0001_0000.nii.gz"))
    label = sitk.ReadImage(str(label_path))
    assert label.GetPixelID() == sitk.sitkUInt8
    for got in (image, label):
        assert got.GetSize() == spine.image.GetSize()
        np.testing.assert_allclose(got.GetSpacing(), spine.image.GetSpacing())
        np.testing.assert_allclose(got.GetOrigin(), spine.image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(spine.image), atol=1e-4)
    labels = sitk.GetArrayFromImage(label)
    np.testing.assert_array_equal(labels, corrected.label_map())
    assert set(np.unique(labels)) == {0} | {BY_NAME[n].label for n in ("T12", "L1", "L2", "L3", "L4", "L5")}

    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset["labels"] == export.dataset_labels() and dataset["labels"]["background"] == 0
    assert dataset["numTraining"] == 1 and dataset["file_ending"] == ".nii.gz"
    assert dataset["bodies_only"] is False  # whole vertebrae, whatever the folder is called

    centroids = json.loads((tmp_path / "centroids" / "spine_ct_0001_ctd.json").read_text())
    assert [c["name"] for c in centroids[1:]] == [v.name for v in corrected.vertebrae]
    provenance = json.loads((tmp_path / "provenance" / "spine_ct_0001.json").read_text())
    assert provenance["model"] == {"name": "synthetic", "version": "0"}
    assert provenance["corrections"] == log and provenance["corrected"] == ["T12"]
    fixed = [(v.name, v.fixed) for v in corrected.vertebrae]  # the renamed one fixed
    assert [(v["name"], v["fixed"]) for v in provenance["vertebrae"]] == fixed and any(f for _, f in fixed)
    assert provenance["exported_at"].endswith("+00:00")

    second = build_spine(names=("L1", "L2", "L3", "L4"), seed=1)
    assert export.export_case(second.result, second.image, tmp_path).name == "spine_ct_0002.nii.gz"
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert dataset["numTraining"] == 2
    assert sorted(p.name for p in (tmp_path / "imagesTr").iterdir()) == ["spine_ct_0001_0000.nii.gz", "spine_ct_0002_0000.nii.gz"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_an_export_names_neither_the_patient_nor_the_user(tmp_path, spine):
    """The dataset is shared with other sites: the provenance record named the image's file by its absolute path (the
    user's home, a folder named after the patient) and the model card's (under the user's home for a registered
    model); the image's own metadata (here DICOM tags) must not reach the exported image either."""
    home = tmp_path / "home" / "jdoe"
    image = sitk.Image(spine.image)
    for key, value in {"0010|0010": "DOE^JANE", "0010|0020": "MRN12345", "0008|0080": "SPRINGFIELD HOSPITAL"}.items():
        image.SetMetaData(key, value)
    result = spine.result.copy(source=str(home / "DOE_JANE_MRN12345" / "series"))
    result.model = {"name": "site-model", "version": "0.1.0", "device": "cpu",
                    "path": str(home / ".local" / "share" / "spinelabel" / "models" / "site-model.json")}
    export.export_case(result, image, tmp_path / "share")
    for path in (tmp_path / "share").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            data = gzip.decompress(data) if path.name.endswith(".gz") else data
            for needle in (b"jdoe", b"DOE", b"MRN12345", b"SPRINGFIELD", str(tmp_path).encode()):
                assert needle not in data, (path, needle)
    record = json.loads((tmp_path / "share" / "provenance" / "spine_ct_0001.json").read_text())
    assert record["model"] == {"name": "site-model", "version": "0.1.0", "device": "cpu"}  # still traced
    assert len(record["image_sha256"]) == 64


def test_export_never_overwrites_and_checks_inputs(tmp_path, spine):
    export.export_case(spine.result, spine.image, tmp_path, case_id="case-A")
    before = (tmp_path / "labelsTr" / "case-A.nii.gz").read_bytes()
    with pytest.raises(FileExistsError):
        export.export_case(spine.result, spine.image, tmp_path, case_id="case-A")
    assert (tmp_path / "labelsTr" / "case-A.nii.gz").read_bytes() == before
    with pytest.raises(ValueError, match="case id"):
        export.export_case(spine.result, spine.image, tmp_path, case_id="../escape")
    with pytest.raises(ValueError, match="modality"):
        export.export_case(spine.result.copy(modality=""), spine.image, tmp_path)
    mr = spine.result.copy(modality="MR")
    with pytest.raises(ValueError, match="CT images"):
        export.export_case(mr, spine.image, tmp_path)
    shifted = sitk.Image(spine.image)
    shifted.SetOrigin((5.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="grid"):
        export.export_case(spine.result, shifted, tmp_path)
    one = spine.result.copy(vertebrae=spine.result.vertebrae[:1])
    with pytest.raises(ValueError, match="at least 2 labelled vertebrae"):
        export.export_case(one, spine.image, tmp_path)
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 1


def test_a_failed_export_leaves_no_part_of_its_case(tmp_path, spine, monkeypatch):
    export.export_case(spine.result, spine.image, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.writers, "write_centroids", disk_full)  # after the image and the label map
    with pytest.raises(OSError, match="No space"):
        export.export_case(spine.result, spine.image, tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    with pytest.raises(OSError, match="No space"):  # the first export into a new dataset: no folder of it stays
        export.export_case(spine.result, spine.image, tmp_path / "new" / "Dataset002_Spine")
    assert not (tmp_path / "new").exists()


def test_a_dataset_json_without_channel_names_is_named(tmp_path, spine):
    """An nnU-Net v1 dataset.json says "modality", not "channel_names": the modality of its images is unknown."""
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"background": 0}}))
    with pytest.raises(ValueError, match="names no channel '0' under 'channel_names'"):
        export.export_case(spine.result, spine.image, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.json"]


def test_a_dataset_of_two_channels_takes_no_export(tmp_path, spine):
    """An export writes one image per case, and rewrote such a dataset.json with channel 0 alone."""
    document = {"channel_names": {"0": spine.result.modality, "1": "PET"}, "labels": export.dataset_labels()}
    (tmp_path / "dataset.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"names 2 channels \(0: CT, 1: PET\); an export writes one"):
        export.export_case(spine.result, spine.image, tmp_path)
    assert json.loads((tmp_path / "dataset.json").read_text()) == document


def test_a_dataset_that_lost_its_dataset_json_takes_no_export(tmp_path, spine):
    """Its cases' modality and label values are unknown: an export would write a dataset.json that says what the new
    case is for all of them."""
    export.export_case(spine.result, spine.image, tmp_path)
    (tmp_path / "dataset.json").unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="holds cases .* but no dataset.json"):
        export.export_case(spine.result, spine.image, tmp_path, case_id="again")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_bodies_only_dataset_takes_no_export(tmp_path, spine):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "bodies_only": True}))
    with pytest.raises(ValueError, match="vertebral bodies only; an export labels whole vertebrae"):
        export.export_case(spine.result, spine.image, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.json"]


def test_dataset_json_labels_must_map_names_to_values(tmp_path):
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": ["L1", "L2"]}))
    with pytest.raises(ValueError, match="'labels' must map each name"):
        export.dataset_label_values(tmp_path / "labelsTr" / "a.nii.gz", np.ones((2, 2, 2), np.uint8))


def test_case_ids_that_readers_would_take_for_another_case_are_refused(tmp_path, spine):
    """evaluate and train match cases by their names less _img, _ct, _0000 and _T2w: p1 and p1_ct would be one case,
    and the whole dataset unreadable."""
    export.export_case(spine.result, spine.image, tmp_path, case_id="p1")
    for case_id in ("p1_ct", "a_img", "b_T2w"):
        with pytest.raises(ValueError, match=f"case id '{case_id}': readers of the dataset take it for case"):
            export.export_case(spine.result, spine.image, tmp_path, case_id=case_id)
    (tmp_path / "labelsTr" / "q_ct.nii.gz").write_bytes(b"")  # a case another tool wrote
    with pytest.raises(ValueError, match="as they take q_ct"):
        export.export_case(spine.result, spine.image, tmp_path, case_id="q")


def test_temporaries_of_an_interrupted_export_are_no_case(tmp_path, spine):
    export.export_case(spine.result, spine.image, tmp_path)
    (tmp_path / "labelsTr" / ".spine_ct_0002.abc123.tmp.nii.gz").write_bytes(b"half")  # a killed export's leftover
    other = sitk.Image(spine.image)
    other.SetOrigin((1.0, 2.0, 3.0))  # another scan: not a replacement of the first case
    moved = spine.result.copy(geometry=spine.result.geometry.__class__.of(other))
    export.export_case(moved, other, tmp_path)
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 2
    assert export.next_case_id(tmp_path, "spine_ct") == "spine_ct_0003"



def test_an_export_killed_while_writing_leaves_no_file_nnunet_takes_for_a_case(tmp_path, spine, monkeypatch):
    """A killed export removes nothing: it leaves the dataset as it is while the image is written. nnU-Net v2 takes
    every file of imagesTr/ ending in file_ending for a case, hidden ones included (batchgenerators' subfiles), and
    its dataset check failed on a temporary there: more cases than numTraining, one without a label map."""
    export.export_case(spine.result, spine.image, tmp_path)
    writing, go_on = threading.Event(), threading.Event()
    write_image = export.write_image

    def slow(image, path, final=None):
        Path(path).write_bytes(b"half")
        writing.set()
        go_on.wait(60)
        write_image(image, path, final)

    monkeypatch.setattr(export, "write_image", slow)
    other = build_spine(names=("L1", "L2", "L3", "L4"), seed=1)
    thread = threading.Thread(target=export.export_case, args=(other.result, other.image, tmp_path))
    thread.start()
    try:
        assert writing.wait(60)
        images = tmp_path / "imagesTr"
        assert [p.name for p in images.iterdir() if p.is_file() and p.name.endswith(".nii.gz")] == [
            "spine_ct_0001_0000.nii.gz"]
    finally:
        go_on.set()
        thread.join()
    assert sorted(p.name for p in images.iterdir()) == ["spine_ct_0001_0000.nii.gz", "spine_ct_0002_0000.nii.gz"]


def test_a_ct_and_an_mr_dataset_under_one_folder_are_read_together(tmp_path, spine):
    """Export refuses to mix modalities in one dataset, so a user keeps a CT and an MR dataset side by side; training
    and evaluation given their parent read both. Numbered alike (spine_0001 in each), the two cases were taken for one
    and the folder refused; the modality in the automatic ids keeps them apart."""
    from SpineLabelLib.evaluation import labelled_cases

    export.export_case(spine.result, spine.image, tmp_path / "ct")
    mr = spine.result.copy(modality="MR")
    assert export.export_case(mr, spine.image, tmp_path / "mr").name == "spine_mr_0001.nii.gz"
    cases = labelled_cases(tmp_path)
    assert sorted(gt.mask.name for _, gt in cases) == ["spine_ct_0001.nii.gz", "spine_mr_0001.nii.gz"]


def test_an_unreadable_dataset_json_is_named(tmp_path):
    (tmp_path / "dataset.json").write_text("{broken")
    with pytest.raises(InputError, match=r"dataset.json: unreadable dataset.json"):
        export.read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text('{"bodies_only": "yes"}')  # read as false: bodies scored as vertebrae
    with pytest.raises(InputError, match=r"dataset.json: bodies_only must be true or false, not 'yes'"):
        export.read_dataset_json(tmp_path)


def test_exporting_a_scan_again_replaces_its_case(tmp_path, spine):
    export.export_case(spine.result, spine.image, tmp_path)
    other = build_spine(names=("L1", "L2", "L3", "L4"), seed=1)
    export.export_case(other.result, other.image, tmp_path)
    corrected = edits.rename(spine.result, spine.result.vertebrae[0].id, "T12")  # corrected once more, exported again
    assert export.export_case(corrected, spine.image, tmp_path).name == "spine_ct_0003.nii.gz"
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == ["spine_ct_0002.nii.gz", "spine_ct_0003.nii.gz"]
    assert not (tmp_path / "provenance" / "spine_ct_0001.json").exists()
    assert not (tmp_path / "imagesTr" / "spine_ct_0001_0000.nii.gz").exists()
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 2
    provenance = json.loads((tmp_path / "provenance" / "spine_ct_0003.json").read_text())
    assert provenance["replaces"] == ["spine_ct_0001"] and provenance["corrected"] == ["T12"]
    # exported under an id of the user's, the highest automatic case goes; its number is not given to another scan
    # (model cards name the cases they were trained on)
    export.export_case(corrected, spine.image, tmp_path, case_id="mine")
    assert export.next_case_id(tmp_path, "spine_ct") == "spine_ct_0004"
    for replaces in (5, [["spine_ct_0007"]], "spine_ct_0009"):  # hand-edited records: not ids, and no error
        (tmp_path / "provenance" / "odd.json").write_text(json.dumps({"replaces": replaces}))
        assert export.next_case_id(tmp_path, "spine_ct") == "spine_ct_0004"


@pytest.mark.parametrize("document, reason", [
    ({"labels": {"background": 0, "vertebrae_L5": 1, "sacrum": 2}}, "numbers the vertebrae otherwise"),
    ({"labels": {"background": 0, "spine": 1}}, "numbers the vertebrae otherwise"),
    ({"file_ending": ".mha"}, "gives its files the ending '.mha'"),
])
def test_a_dataset_numbered_or_stored_otherwise_takes_no_export(tmp_path, spine, document, reason):
    # its earlier cases would change meaning (L5 read as C1) or drop out of numTraining
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, **document}))
    with pytest.raises(ValueError, match=reason):
        export.export_case(spine.result, spine.image, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.json"]


def test_a_dataset_that_lists_its_cases_takes_no_export(tmp_path, spine):
    """nnU-Net v2 reads the cases of a dataset.json with a "dataset" key from that list, not from imagesTr/ and
    labelsTr/: an appended case would go untrained, and nnUNetv2_plan_and_preprocess --verify_dataset_integrity
    refuses the dataset (numTraining counts it, the list does not)."""
    export.export_case(spine.result, spine.image, tmp_path)
    document = json.loads((tmp_path / "dataset.json").read_text())
    document["dataset"] = {"spine_ct_0001": {"images": ["imagesTr/spine_ct_0001_0000.nii.gz"],
                                             "label": "labelsTr/spine_ct_0001.nii.gz"}}
    (tmp_path / "dataset.json").write_text(json.dumps(document))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    other = build_spine(names=("L1", "L2", "L3", "L4"), seed=1)
    with pytest.raises(ValueError, match="lists its cases under 'dataset'"):
        export.export_case(other.result, other.image, tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert json.loads((tmp_path / "dataset.json").read_text()) == document


def test_a_failed_dataset_json_write_leaves_the_dataset_as_it_was(tmp_path, spine, monkeypatch):
    export.export_case(spine.result, spine.image, tmp_path)
    corrected = edits.rename(spine.result, spine.result.vertebrae[0].id, "T12")  # would replace the first case
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    write_json = export.writers.write_json

    def interrupted(document, path):
        if "numTraining" in document:
            raise KeyboardInterrupt
        write_json(document, path)

    monkeypatch.setattr(export.writers, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_case(corrected, spine.image, tmp_path)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("given, error", [("afile/dataset", errno.ENOTDIR), ("link", errno.ENOENT)])
def test_a_dataset_folder_that_cannot_be_made_is_named_with_the_reason(tmp_path, spine, given, error):
    """A folder below a file named the first of the case's subfolders made (labelsTr, provenance ...), never the
    folder given; a link to nothing said only that it exists."""
    (tmp_path / "afile").touch()
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError) as raised:
        export.export_case(spine.result, spine.image, tmp_path / given)
    assert raised.value.errno == error
    assert str(tmp_path / given) in str(raised.value)
    assert not re.search("imagesTr|labelsTr|centroids|provenance", str(raised.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link"]


def test_the_label_map_takes_the_image_grid_exactly(tmp_path, spine):
    image = sitk.Image(spine.image)
    image.SetSpacing([s + 0.0008 for s in image.GetSpacing()])  # within the grid check's tolerance
    image.SetOrigin([o + 0.008 for o in image.GetOrigin()])
    label = sitk.ReadImage(str(export.export_case(spine.result, image, tmp_path)))
    written = sitk.ReadImage(str(tmp_path / "imagesTr" / "spine_ct_0001_0000.nii.gz"))
    assert label.GetSpacing() == written.GetSpacing() and label.GetOrigin() == written.GetOrigin()


def test_export_never_overwrites_a_centroid_file_of_its_case(tmp_path, spine):
    (tmp_path / "centroids").mkdir()
    stray = tmp_path / "centroids" / "case-B_ctd.json"
    stray.write_text("[]")
    with pytest.raises(FileExistsError):
        export.export_case(spine.result, spine.image, tmp_path, case_id="case-B")
    assert stray.read_text() == "[]"


def test_a_value_dataset_json_does_not_name_is_refused_below_its_highest_value(tmp_path):
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                       "labels": {"background": 0, "L1": 1, "L3": 3}}))
    with pytest.raises(ValueError, match=r"label values \[2\] are not in"):
        export.dataset_label_values(tmp_path / "labelsTr" / "a.nii.gz", np.array([0, 1, 2, 3], np.uint8))


@pytest.mark.parametrize("labels, reason", [
    ({"background": 0, "L1": 1, "S1": 2, "T12": -1}, r"whole numbers, 0 or more, not 'T12': -1"),
    ({"background": 0, "L1": 1, "L2": 1, "S1": 2}, r"label values \[1\] are given to names of different levels"),
    ({"background": 0, "vertebra": 1, "L1": 1, "S1": 2}, r"label values \[1\] are given to names of different levels")])
def test_a_dataset_json_value_that_would_read_another_values_voxels_is_refused(tmp_path, labels, reason):
    """A negative value indexed the lookup table from its end (S1's voxels were read as T12); a value named twice
    took the last name written: both silently scored and trained the wrong level."""
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels}))
    with pytest.raises(ValueError, match=reason):
        export.dataset_label_values(tmp_path / "labelsTr" / "a.nii.gz", np.array([0, 1, 2], np.uint8))


def test_two_names_of_one_level_may_share_a_value(tmp_path):
    """"S1" and "sacrum" name one level: a value given to both reads as it, not as a conflict."""
    (tmp_path / "labelsTr").mkdir()
    labels = {"background": 0, "L1": 1, "S1": 2, "sacrum": 2}
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels}))
    lookup = export.dataset_label_values(tmp_path / "labelsTr" / "a.nii.gz", np.array([0, 1, 2], np.uint8))
    assert lookup[1] == BY_NAME["L1"].label and lookup[2] == BY_NAME["S1"].label


def test_a_full_disk_while_the_label_map_is_written_names_the_file(tmp_path, spine, monkeypatch):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.writers, "write_nifti", disk_full)  # the label map, after the image
    with pytest.raises(OSError, match=r"cannot write .*labelsTr/spine_ct_0001\.nii\.gz: No space left on device"):
        export.export_case(spine.result, spine.image, tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_two_exports_at_once_into_one_dataset_keep_both_cases(tmp_path, spine, monkeypatch):
    """Two exports of different scans at the same moment (two Slicer sessions): each gets its own case, as one after
    the other would (they both took spine_ct_0001 and the second silently replaced the first's files)."""
    second = build_spine(names=("L1", "L2", "L3", "L4"), seed=1)
    first_writing = threading.Event()
    write_case = export._write_case

    def slow_write_case(*args, **kwargs):
        first_writing.set()
        threading.Event().wait(0.5)  # the other export starts meanwhile
        return write_case(*args, **kwargs)

    monkeypatch.setattr(export, "_write_case", slow_write_case)
    results = {}
    a = threading.Thread(target=lambda: results.update(a=export.export_case(spine.result, spine.image, tmp_path)))
    b = threading.Thread(target=lambda: results.update(b=export.export_case(second.result, second.image, tmp_path)))
    a.start()
    assert first_writing.wait(10)
    b.start()
    a.join(), b.join()
    assert sorted(p.name for p in results.values()) == ["spine_ct_0001.nii.gz", "spine_ct_0002.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "labelsTr").iterdir()) == ["spine_ct_0001.nii.gz", "spine_ct_0002.nii.gz"]
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 2


def test_an_export_waiting_while_a_refused_one_removes_the_new_dataset_folder_still_exports(tmp_path, monkeypatch):
    """Two exports into a new dataset folder: the first, of one vertebra, is refused while the second waits for the
    lock; the first removed the folder it had made after releasing the lock, and the second failed ('cannot write to
    dataset folder ...: No such file or directory')."""
    one, four = build_spine(names=("L1",)), build_spine(names=("L1", "L2", "L3", "L4"), seed=1)
    dataset, export_inner, results = tmp_path / "new", export._export_case, {}

    def slow_for_the_first(*args):
        if threading.current_thread() is first:
            threading.Event().wait(0.5)  # the second export starts meanwhile and waits for the lock
        return export_inner(*args)

    def run(tag, spine):
        try:
            results[tag] = export.export_case(spine.result, spine.image, dataset)
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            results[tag] = err

    monkeypatch.setattr(export, "_export_case", slow_for_the_first)
    first = threading.Thread(target=run, args=("first", one))
    second = threading.Thread(target=run, args=("second", four))
    first.start()
    threading.Event().wait(0.2)
    second.start()
    first.join(), second.join()
    assert isinstance(results["first"], ValueError)
    assert results["second"] == dataset / "labelsTr" / "spine_ct_0001.nii.gz" and results["second"].is_file()


@pytest.mark.parametrize("channel", ["ct", "Ct"])
def test_a_dataset_whose_channel_says_ct_in_another_case_takes_a_ct_export(tmp_path, spine, channel):
    """nnU-Net reads channel names case-insensitively ("ct" is its CT normalisation as "CT" is); the export refused
    such a dataset with "dataset holds ct images, this one is CT", and its cases were read as of no recorded
    modality."""
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": channel}, "labels": {"background": 0},
                                                       "numTraining": 0, "file_ending": ".nii.gz"}))
    label_path = export.export_case(spine.result, spine.image, tmp_path)
    assert json.loads((tmp_path / "dataset.json").read_text())["channel_names"] == {"0": channel}  # its spelling
    assert export.recorded_modality(label_path) == "CT"
    with pytest.raises(ValueError, match=f"dataset holds {channel} images, this one is MR; export it into a dataset "
                                         "of MR images"):
        export.export_case(spine.result.copy(modality="MR"), spine.image, tmp_path)


def test_no_file_of_a_case_is_in_the_dataset_before_all_its_files_are_written(tmp_path, spine, monkeypatch):
    """nnU-Net counts the images of imagesTr/ as cases: an export killed after its image was renamed into place and
    before its label map was written left an image without a label map, and nnU-Net refused the dataset from then on
    (later exports count their cases from labelsTr/). The case's files are renamed together at the end now."""
    seen = {}

    def write_label_map(result, path):
        seen["imagesTr"] = sorted(p.name for p in (tmp_path / "imagesTr").glob("*.nii.gz"))
        writers_write_label_map(result, path)

    writers_write_label_map = export.writers.write_label_map
    monkeypatch.setattr(export.writers, "write_label_map", write_label_map)
    label_path = export.export_case(spine.result, spine.image, tmp_path)
    assert seen["imagesTr"] == []  # a kill here would have left nothing a reader counts
    assert label_path.is_file() and (tmp_path / "imagesTr" / "spine_ct_0001_0000.nii.gz").is_file()


def test_a_label_map_left_without_its_image_is_not_counted_in_num_training(tmp_path, spine):
    """A process killed between the renames of a case (the image's comes last) leaves its label map, centroids and
    provenance without its image. nnU-Net counts the cases of imagesTr/ and asserts numTraining is their number; the
    next export counted labelsTr/ and wrote one more, and nnU-Net refused the dataset from then on."""
    export.export_case(spine.result, spine.image, tmp_path)
    for folder, name in (("labelsTr", "{}.nii.gz"), ("centroids", "{}_ctd.json"), ("provenance", "{}.json")):
        first = tmp_path / folder / name.format("spine_ct_0001")
        (tmp_path / folder / name.format("spine_ct_0002")).write_bytes(first.read_bytes().replace(
            b"spine_ct_0001", b"spine_ct_0002").replace(b'"image_sha256": "', b'"image_sha256": "0'))
    label_path = export.export_case(spine.result, spine.image + 1, tmp_path)
    assert label_path.name == "spine_ct_0003.nii.gz"
    images = list((tmp_path / "imagesTr").glob("*_0000.nii.gz"))
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == len(images) == 2


@pytest.mark.parametrize("channel", [0, ["CT"], ""])
def test_a_channel_0_that_is_no_name_is_refused_as_no_channel(tmp_path, spine, channel):
    """A hand-edited channel 0 that is no string was refused as "dataset holds ['CT'] images, this one is CT"."""
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": channel}, "labels": {"background": 0},
                                                       "numTraining": 0, "file_ending": ".nii.gz"}))
    with pytest.raises(ValueError, match=re.escape(f"names no channel '0' under 'channel_names' (nnU-Net v2): it holds "
                                                   f"{channel!r}, so the modality")):
        export.export_case(spine.result, spine.image, tmp_path)


def test_an_exported_phantom_is_no_phantom_file(tmp_path):
    """An image read from a phantom's file carries its header note; written into the dataset with it, the export
    said it was a phantom, and `spinelabel phantom` replaced the dataset's image without a word."""
    from SpineLabelLib.io import read_image
    from SpineLabelLib.phantom import make_phantom

    spine = build_spine()
    phantom = make_phantom("ct", "lumbar", seed=5, size=(64, 64, 96), spacing=(2.5, 2.5, 2.5))
    phantom.image, phantom.labels = spine.image, spine.image  # any image: what matters is the phantom's file
    image_path, _ = phantom.save(tmp_path / "ph.nii.gz")
    image = read_image(image_path)
    assert image.GetMetaData("ITK_FileNotes") == "SpineLabel phantom"
    export.export_case(spine.result, image, tmp_path / "Dataset001_Spine", "case1")
    exported = tmp_path / "Dataset001_Spine" / "imagesTr" / "case1_0000.nii.gz"
    kept = exported.read_bytes()
    with pytest.raises(FileExistsError, match="no phantom SpineLabel wrote"):
        phantom.save(exported)
    assert exported.read_bytes() == kept
