"""Tests of SpineLabelLib.evaluation on small synthetic label maps (and one check on ../shared/data)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATA
from SpineLabelLib import evaluation as ev
from SpineLabelLib.export import dataset_ignore_value
from SpineLabelLib.io import InputError
from SpineLabelLib.pipeline import Cancelled
from SpineLabelLib.result import Geometry
from SpineLabelLib.vertebrae import BY_NAME


L1, L2, L3, L4, L5, L6, S1, T12, T13 = (BY_NAME[n].label for n in ("L1", "L2", "L3", "L4", "L5", "L6", "S1", "T12", "T13"))
SPACING_ZYX = (2.0, 1.0, 1.0)


def spine(labels: list[int], shape=(60, 12, 12), height: int = 10, body_only: bool = False) -> np.ndarray:
    """Stack of boxes (z, y, x), one per label from top (z=0) down; 'posterior elements' in y >= 6."""
    a = np.zeros(shape, dtype=np.uint8)
    for n, label in enumerate(labels):
        z0 = n * height
        a[z0 + 1 : z0 + height - 1, 1:6, 2:10] = label  # body
        if not body_only:
            a[z0 + 3 : z0 + height - 3, 6:11, 4:8] = label  # posterior elements
    return a


def centroids(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Centroids in mm along (x, y, z), the frame evaluate_case uses when given None."""
    return {v: c * np.array(SPACING_ZYX[::-1]) for v, c in ev.mask_centroids(labels).items()}


def test_perfect_prediction():
    gt = spine([L1, L2, L3, L4, L5])
    r = ev.evaluate_case(gt.copy(), gt, SPACING_ZYX, centroids(gt), centroids(gt), bodies_only=False)
    assert (r.n_gt, r.n_identified, r.id_rate) == (5, 5, 1.0)
    assert r.mean_loc_error_mm == 0.0 and r.mean_dice == 1.0 and r.mean_body_coverage is None
    assert r.n_not_predicted == 0 and r.extra_predicted == [] and r.shift == 0.0 and not r.off_by_one
    assert not r.sacrum_in_gt
    assert [v.name for v in r.vertebrae] == ["L1", "L2", "L3", "L4", "L5"]
    assert r.vertebrae[0].gt_volume_ml == pytest.approx(np.count_nonzero(gt == L1) * 2.0 / 1000)
    json.dumps(asdict(r))


@pytest.mark.parametrize("pred_labels, shift", [([L2, L3, L4, L5, S1], 1.0), ([T12, L1, L2, L3, L4], -1.0)])
def test_shifted_by_one_is_flagged(pred_labels, shift):
    gt = spine([L1, L2, L3, L4, L5])
    pred = spine(pred_labels)
    r = ev.evaluate_case(pred, gt, SPACING_ZYX, None, None, bodies_only=False)
    assert r.id_rate == 0.0 and r.n_identified == 0
    assert r.off_by_one and r.shift == shift and r.n_shift_pairs == 5
    assert r.mean_loc_error_mm == pytest.approx(20.0)  # same label one 10-slice (20 mm) box away, 4 of 5 labels
    assert r.n_not_predicted == 1
    assert r.mean_dice == 0.0 and r.mean_dice_names_aside == 1.0  # every vertebra outlined right, named wrong


def test_dice_names_aside_takes_the_predicted_vertebra_overlapping_most():
    """A GT vertebra whose voxels the prediction splits between two labels is scored against the one holding most
    of them, whatever its name; one no predicted vertebra touches scores 0; bodies-only GT has none."""
    gt = spine([L1, L2, L3])
    pred = spine([T12, L1, L2])
    pred[10:14][pred[10:14] == L1] = L4  # the top 3 body slices and the top posterior slice of the second vertebra
    pred[pred == L2] = 0
    r = ev.evaluate_case(pred, gt, SPACING_ZYX, None, None, bodies_only=False)
    first, second, third = r.vertebrae
    assert first.dice == 0.0 and first.dice_names_aside == 1.0
    shared, size = np.count_nonzero(pred == L1), np.count_nonzero(gt == L2)
    assert second.dice_names_aside == pytest.approx(2 * shared / (shared + size)) and shared > size / 2
    assert third.dice_names_aside == 0.0
    assert r.mean_dice_names_aside == pytest.approx(np.mean([v.dice_names_aside for v in r.vertebrae]))
    bodies = ev.evaluate_case(pred, spine([L1, L2, L3], body_only=True), SPACING_ZYX, None, None, bodies_only=True)
    assert bodies.mean_dice_names_aside is None and bodies.vertebrae[0].dice_names_aside is None
    wide = ev.evaluate_case(pred.astype(np.uint64), gt.astype(np.uint64), SPACING_ZYX, None, None, bodies_only=False)
    assert wide.mean_dice_names_aside == r.mean_dice_names_aside  # int64 + uint64 is float64 in numpy


def test_transitional_levels_count_as_one_level():
    # T12, L1 labelled T13, L2: both one level too caudal. T13 lies between T12 and L1 in anatomical order, so
    # T12 -> T13 is one level (raw label arithmetic would say 28 - 19 = 9 and see one shifted pair of two).
    gt = spine([T12, L1])
    pred = spine([T13, L2])
    r = ev.evaluate_case(pred, gt, SPACING_ZYX, None, None, bodies_only=False)
    assert r.off_by_one and r.shift == 1.0
    # T12, L1 labelled L1, L2 in a spine without T13: each is one level too caudal, not two.
    r = ev.evaluate_case(spine([L1, L2]), gt, SPACING_ZYX, None, None, bodies_only=False)
    assert r.off_by_one and r.shift == 1.0 and r.n_identified == 0
    # L5 labelled L6 and S1 right: one of two pairs off -> not a shifted scan.
    gt = spine([L5, S1])
    r = ev.evaluate_case(spine([L6, S1]), gt, SPACING_ZYX, None, None, bodies_only=False)
    assert r.sacrum_in_gt and not r.off_by_one and r.shift == 0.5 and r.n_identified == 1
    # L4, L5 labelled L5, L4: each one level off, but the other way round -> two swapped names, no shifted scan.
    r = ev.evaluate_case(spine([L5, L4]), spine([L4, L5]), SPACING_ZYX, None, None, bodies_only=False)
    assert not r.off_by_one and r.shift == 0.0 and r.n_shift_pairs == 2
    # L4, L5 labelled L5, S1 in a spine without L6: L5 -> S1 is one level, as L5 -> L6 is, so the scan is off by one
    # (the common lumbosacral miscount); counted as two, one pair of two would be one off and the scan not flagged.
    r = ev.evaluate_case(spine([L5, S1]), spine([L4, L5]), SPACING_ZYX, None, None, bodies_only=False)
    assert r.off_by_one and r.shift == 1.0 and r.n_shift_pairs == 2


def test_missed_vertebra_and_extra_label():
    gt = spine([L1, L2, L3, L4, L5])
    pred = gt.copy()
    pred[pred == L3] = 0
    pred[57:60, :2, :2] = S1  # a spurious label > 20 mm below every GT vertebra
    r = ev.evaluate_case(pred, gt, SPACING_ZYX, None, None, bodies_only=False)
    assert r.n_identified == 4 and r.id_rate == pytest.approx(0.8)
    assert r.not_predicted == ["L3"] and r.n_not_predicted == 1 and r.extra_predicted == ["S1"]
    l3 = next(v for v in r.vertebrae if v.name == "L3")
    assert l3.dice == 0.0 and l3.loc_error_mm is None and not l3.identified
    assert r.mean_dice == pytest.approx(0.8)
    assert r.mean_loc_error_mm == pytest.approx(0.0)
    # the spurious S1 lies beyond 20 mm of every GT centroid: no level-shift pair, so no shift
    assert r.n_shift_pairs == 4 and r.shift == 0.0 and not r.off_by_one


def test_centroid_beyond_20_mm_is_not_identified():
    gt = spine([L1, L2, L3], height=20)  # 40 mm apart: only the moved centroid can be the closest
    gt_ctd = centroids(gt)
    pred_ctd = dict(gt_ctd)
    pred_ctd[L2] = gt_ctd[L2] + np.array([0.0, 20.5, 0.0])
    r = ev.evaluate_case(gt.copy(), gt, SPACING_ZYX, pred_ctd, gt_ctd, bodies_only=False)
    l2 = r.vertebrae[1]
    assert not l2.identified and l2.loc_error_mm == pytest.approx(20.5) and l2.nearest_pred_label == L2
    assert r.n_identified == 2 and r.mean_dice == 1.0
    # beyond 20 mm the closest prediction names nothing: the by-level table says "none", and its confidence rates
    # nothing
    assert ev._by_level([r])["L2"].named_instead == {"none": 1}
    rated = ev.evaluate_case(gt.copy(), gt, SPACING_ZYX, pred_ctd, gt_ctd, bodies_only=False,
                             pred_confidences={L1: 0.9, L2: 0.9, L3: 0.9})
    assert rated.vertebrae[1].nearest_pred_confidence is None and rated.vertebrae[0].nearest_pred_confidence == 0.9
    pred_ctd[L2] = gt_ctd[L2] + np.array([0.0, 20.0, 0.0])  # within 20 mm: at 20 mm too
    assert ev.evaluate_case(gt.copy(), gt, SPACING_ZYX, pred_ctd, gt_ctd, bodies_only=False).n_identified == 3
    pred_ctd[L2] = gt_ctd[L2] + np.array([0.0, 19.5, 0.0])
    assert ev.evaluate_case(gt.copy(), gt, SPACING_ZYX, pred_ctd, gt_ctd, bodies_only=False).n_identified == 3
    for given in ((pred_ctd, None), (None, gt_ctd)):  # centroids from a mask are in another frame than those given
        with pytest.raises(ValueError, match="one of each compares two frames"):
            ev.evaluate_case(gt.copy(), gt, SPACING_ZYX, *given, bodies_only=False)


def test_bodies_only_coverage():
    gt = spine([L3, L4], body_only=True)
    pred = spine([L3, L4])  # whole vertebrae: Dice < 1 but every body voxel covered
    r = ev.evaluate_case(pred, gt, SPACING_ZYX, None, None, bodies_only=True)
    assert r.mean_body_coverage == 1.0 and r.mean_dice is None and r.vertebrae[0].dice is None
    pred[:, :3][pred[:, :3] == L4] = 0  # remove the anterior 2 of 5 body rows of L4
    r = ev.evaluate_case(pred, gt, SPACING_ZYX, None, None, bodies_only=True)
    assert r.vertebrae[0].body_coverage == 1.0
    assert r.vertebrae[1].body_coverage == pytest.approx(3 / 5)
    assert ev.evaluate_case(pred, gt, SPACING_ZYX, None, None, bodies_only=False).vertebrae[0].dice < 1.0


def test_empty_prediction_and_shape_mismatch():
    gt = spine([L1, L2])
    r = ev.evaluate_case(np.zeros_like(gt), gt, SPACING_ZYX, None, None, bodies_only=False)
    assert r.n_identified == 0 and r.mean_loc_error_mm is None and r.n_not_predicted == 2 and r.mean_dice == 0.0
    assert r.shift is None and not r.off_by_one
    with pytest.raises(ValueError, match="shape"):
        ev.evaluate_case(gt[:-1], gt, SPACING_ZYX, None, None, bodies_only=False)


# ------------------------------------------------------------------------------------------------ files


def write_mask(array: np.ndarray, path: Path, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), origin=(10.0, -5.0, 3.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_ZYX[::-1])
    image.SetOrigin(origin)
    image.SetDirection([float(d) for d in direction])
    sitk.WriteImage(image, str(path))
    return image


def write_ctd(path: Path, lps: dict[int, np.ndarray]):
    entries = [{"direction": ["L", "P", "S"]}] + [
        {"label": int(k), "world_lps_mm": [float(x) for x in v]} for k, v in lps.items()]
    path.write_text(json.dumps(entries))


def lps_centroids(image: sitk.Image) -> dict[int, np.ndarray]:
    geometry = Geometry.of(image)
    return {k: geometry.index_to_lps(v) for k, v in ev.mask_centroids(sitk.GetArrayFromImage(image)).items()}


def test_a_centroid_file_is_read_as_utf_8_whatever_the_system_s_encoding(tmp_path):
    """It was read in the system's encoding: cp1252 on Windows, which misreads UTF-8 beyond ASCII or refuses it
    (bytes 0x81, 0x8d, 0x8f, 0x90 and 0x9d are none of its characters); here a C locale (ASCII) without Python's UTF-8
    mode stands for it (a Windows and macOS audit)."""
    path = tmp_path / "c.json"
    entries = [{"direction": ["L", "P", "S"], "note": "Wirbelk\u00f6rper \u00c1"},
               {"label": 20, "X": 1, "Y": 2, "Z": 3}]
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    script = ("import sys, SimpleITK as sitk; from SpineLabelLib.evaluation import read_centroids; "
              "print(sorted(read_centroids(sys.argv[1], sitk.Image([4, 4, 4], sitk.sitkUInt8))))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(Path(ev.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-X", "utf8=0", "-c", script, str(path)], env=env, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[20]", done.stderr[-2000:]


def test_verse_voxel_centroids_follow_direction_code(tmp_path):
    gt = spine([L1, L2, L3])
    image = write_mask(gt, tmp_path / "m.nii.gz")
    nx, ny, nz = image.GetSize()
    entries = [{"direction": ["P", "I", "R"]}]
    for label, (i, j, k) in ev.mask_centroids(gt).items():
        # Axis 0 runs towards P (= +j), axis 1 towards I (= -k), axis 2 towards R (= -i).
        entries.append({"label": label, "X": j, "Y": nz - 1 - k, "Z": nx - 1 - i})
    (tmp_path / "c.json").write_text(json.dumps(entries))
    got = ev.read_centroids(tmp_path / "c.json", image)
    want = lps_centroids(image)
    assert set(got) == set(want)
    for label in want:
        np.testing.assert_allclose(got[label], want[label], atol=1e-6)


def test_folders_verse_layout(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    (gt_dir / "derivatives").mkdir(parents=True)
    pred_dir.mkdir()
    direction = (0, 0, -1, 1, 0, 0, 0, -1, 0)  # an oblique-free but non-LPS grid
    a = write_mask(spine([L1, L2, L3, L4, L5]), gt_dir / "derivatives" / "sub-a_seg-vert_msk.nii.gz", direction)
    write_mask(spine([L3, L4, L5, S1]), gt_dir / "derivatives" / "sub-b_seg-vert_msk.nii.gz", direction)
    write_mask(spine([T12, L1]), gt_dir / "derivatives" / "sub-c_seg-vert_msk.nii.gz", direction)
    write_ctd(gt_dir / "derivatives" / "sub-a_seg-vb_ctd.json", lps_centroids(a))
    # sub-a: perfect, with centroid file; sub-b: labels shifted down by one, no GT centroid file; sub-c: missing.
    write_mask(sitk.GetArrayFromImage(a), pred_dir / "sub-a_ct_seg.nii.gz", direction)
    write_ctd(pred_dir / "sub-a_ct_ctd.json", lps_centroids(a))
    write_mask(spine([L4, L5, L6]), pred_dir / "sub-b_ct_seg.nii.gz", direction)
    write_mask(spine([L1]), pred_dir / "other_ct_seg.nii.gz", direction)

    pairs = ev.match_cases(pred_dir, gt_dir)
    assert [(k, p.name if p else None, g.layout, g.ctd is not None) for k, p, g in pairs] == [
        ("sub-a", "sub-a_ct", "verse", True), ("sub-b", "sub-b_ct", "verse", False), ("sub-c", None, "verse", False)]

    # groups by any name of a case: sub-c's prediction is missing, so only its image's name could give its group
    summary = ev.evaluate_folders(pred_dir, gt_dir, tmp_path / "s.json", tmp_path / "report" / "s.md",
                                  groups={"sub-a": "CT", "sub-b_ct": "CT", "sub-c_ct": "MR"})
    by_name = {c.name: c for c in summary.cases}
    assert by_name["sub-a_ct"].id_rate == 1.0 and by_name["sub-a_ct"].mean_dice == 1.0
    assert by_name["sub-a_ct"].centroid_source == "centroid files"
    assert by_name["sub-b_ct"].off_by_one and by_name["sub-b_ct"].shift == 1.0 and by_name["sub-b_ct"].sacrum_in_gt
    assert by_name["sub-b_ct"].centroid_source == "masks"
    assert by_name["sub-c"].prediction_missing and by_name["sub-c"].n_identified == 0
    assert by_name["sub-c"].n_not_predicted == 2
    o = summary.overall
    assert (o.n_cases, o.n_gt, o.n_identified) == (3, 11, 5)
    assert o.n_off_by_one == 1 and o.missing_predictions == ["sub-c"]
    # pooled over the GT vertebrae of all cases, not averaged over cases (5 + 4 + 2 vertebrae): sub-a's 5 right,
    # sub-b's 4 and sub-c's 2 wrong; sub-a's 5 at 0 mm and sub-b's L4, L5 one box (20 mm) away
    assert o.id_rate == pytest.approx(5 / 11) and o.mean_dice == pytest.approx(5 / 11)
    assert o.mean_loc_error_mm == pytest.approx(40 / 7)
    assert o.n_not_predicted == 4  # sub-b's L3 and S1, and the two of sub-c, whose prediction is missing
    assert summary.groups["CT"].n_cases == 2 and summary.groups["MR"].n_gt == 2
    assert summary.unmatched_predictions == [str(pred_dir / "other_ct_seg.nii.gz")]
    # by level: sub-b's L3-L5 were called L4-L6 (its S1 lies within 20 mm of that L6); sub-c's T12 and L1, no label
    levels = {name: (s.n_gt, s.n_identified, s.named_instead) for name, s in summary.levels.items()}
    assert levels == {"T12": (1, 0, {"none": 1}), "L1": (2, 1, {"none": 1}), "L2": (1, 1, {}),
                      "L3": (2, 1, {"L4": 1}), "L4": (2, 1, {"L5": 1}), "L5": (2, 1, {"L6": 1}), "S1": (1, 0, {"L6": 1})}
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["levels"]["L3"]["named_instead"] == {"L4": 1}
    assert saved["overall"]["n_identified"] == 5 and len(saved["cases"]) == 3
    md = (tmp_path / "report" / "s.md").read_text()
    assert "| sub-b_ct | CT | 4 | 0 | 0.00 |" in md and "prediction missing" in md and "| all | 3 | 11 |" in md
    assert "| L3 | 2 | 1 | 0.0 | L4 x1 |" in md
    assert "| case | group | reference vertebrae |" in md and "GT" not in md  # the README's and the CLI's word
    # without the prediction's centroid file, both sides' centroids come from the masks
    (pred_dir / "sub-a_ct_ctd.json").unlink()
    assert ev.evaluate_folders(pred_dir, gt_dir).cases[0].centroid_source == "masks"


def test_folders_bodies_and_nnunet_layouts(tmp_path):
    bodies, nnunet, pred = tmp_path / "mri_lumbar_bodies", tmp_path / "Dataset001" / "labelsTr", tmp_path / "pred"
    for d in (bodies, nnunet, pred):
        d.mkdir(parents=True)
    g = write_mask(spine([L4, L5, S1], body_only=True), bodies / "VB1_01_vert-verse.nii.gz")
    write_ctd(bodies / "VB1_01_ctd.json", lps_centroids(g))
    write_mask(spine([L4, L5, S1]), pred / "VB1_01_img_seg.nii.gz")
    pairs = ev.match_cases(pred, bodies)
    assert len(pairs) == 1 and pairs[0][2].bodies_only and pairs[0][2].layout == "vert-verse"
    r = ev.evaluate_folders(pred, bodies).cases[0]
    assert r.bodies_only and r.mean_body_coverage == 1.0 and r.mean_dice is None and r.id_rate == 1.0
    # The centroids of the whole predicted vertebrae lie 1-2 mm behind those of the GT bodies, and the report says
    # that two definitions are compared
    assert 0.5 < r.mean_loc_error_mm < 3.0
    assert r.centroid_source == "GT body masks, predicted whole-vertebra masks"
    assert ev.evaluate_folders(pred, bodies, bodies_only=False).cases[0].mean_dice < 1.0
    # without the GT's centroid file its body masks give body centroids, scored against the prediction's file (body
    # centroids, as SpineLabel writes them), not against the whole predicted vertebrae
    (bodies / "VB1_01_ctd.json").unlink()
    write_ctd(pred / "VB1_01_img_ctd.json", lps_centroids(g))
    r = ev.evaluate_folders(pred, bodies).cases[0]
    assert r.centroid_source == "GT body masks, predicted centroid file" and r.mean_loc_error_mm < 1e-6

    gt = write_mask(spine([L1, L2]), nnunet / "case7.nii.gz")
    write_mask(spine([L1, L2]), pred / "case7_0000_seg.nii.gz")
    summary = ev.evaluate_folders(pred, nnunet.parent)
    assert [c.name for c in summary.cases] == ["case7_0000"] and summary.cases[0].id_rate == 1.0
    assert not summary.cases[0].bodies_only
    # an export's centroid file (centroids/ beside labelsTr/: the body centroids, moved points included) is read
    moved = lps_centroids(gt)
    moved[L1] = moved[L1] + [0.0, 0.0, 4.0]
    (nnunet.parent / "centroids").mkdir()
    write_ctd(nnunet.parent / "centroids" / "case7_ctd.json", moved)
    write_ctd(pred / "case7_0000_ctd.json", lps_centroids(gt))
    r = ev.evaluate_folders(pred, nnunet.parent).cases[0]
    assert r.centroid_source == "centroid files" and r.mean_loc_error_mm == pytest.approx(2.0)
    (nnunet.parent / "centroids" / "case7_ctd.json").unlink()

    # a dataset.json names the values: here 1 and 2 are L1 and L2
    write_mask(spine([1, 2]), nnunet / "case7.nii.gz")
    (nnunet.parent / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "L1": 1, "L2": 2}}))
    assert ev.evaluate_folders(pred, nnunet.parent).cases[0].id_rate == 1.0
    # nnU-Net's ignore label: a prediction in voxels nobody annotated is neither right nor wrong (an L1 reaching into
    # the unannotated L2 had Dice 0.67)
    unannotated = np.where(spine([1, 2]) == 2, 3, spine([1, 2]))
    write_mask(unannotated, nnunet / "case7.nii.gz")
    (nnunet.parent / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "L1": 1, "ignore": 3}}))
    write_mask(spine([L1, L1]), pred / "case7_0000_seg.nii.gz")
    (pred / "case7_0000_ctd.json").unlink()
    r = ev.evaluate_folders(pred, nnunet.parent).cases[0]
    assert (r.n_gt, r.n_identified, r.mean_dice) == (1, 1, 1.0)
    # an ignore label of true is no value (nnU-Net refuses it): read as 1, it would hide the reference L1
    (nnunet.parent / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "L1": 1, "ignore": True}}))
    assert dataset_ignore_value(nnunet / "case7.nii.gz") is None

    with pytest.raises(InputError, match="no reference masks"):
        ev.evaluate_folders(pred, pred)


def test_a_folder_of_other_label_conventions_is_refused_with_the_way_to_score_it(tmp_path):
    # TotalSegmentator's ids (31 is its L1, VerSe's 31 is nothing), disc masks, spinal-cord levels: no layout read
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    write_mask(spine([31, 30]), gt / "example_seg.nii.gz")
    write_mask(spine([5, 4]), gt / "IVD_11_instance.nii.gz")
    write_mask(spine([20, 21]), pred / "example_seg_seg.nii.gz")
    with pytest.raises(InputError, match=r"no reference masks .* found; other conventions \(TotalSegmentator's "
                                         r"class ids, disc or spinal-cord labels\) are not read.*dataset\.json naming"):
        ev.evaluate_folders(pred, gt)


def test_bodies_only_comes_from_the_layout_and_dataset_json_not_from_folder_names(tmp_path):
    """An exported dataset of whole vertebrae in a folder named ...Bodies was scored as bodies only."""
    dataset = tmp_path / "Dataset777_SpineBodies"
    for folder in (dataset / "labelsTr", tmp_path / "other"):
        folder.mkdir(parents=True)
    write_mask(spine([L1, L2]), dataset / "labelsTr" / "case7.nii.gz")
    write_mask(spine([L1, L2], body_only=True), tmp_path / "other" / "VB1_01_vert-verse.nii.gz")
    gt = {key: files.bodies_only for key, files in ev._ground_truth(tmp_path).items()}
    assert gt == {"case7": False, "VB1_01": True}
    for flag in (False, True):
        (dataset / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "L1": L1, "L2": L2},
                                                          "bodies_only": flag}))
        assert ev._ground_truth(dataset)["case7"].bodies_only is flag


def test_labelled_cases_find_images_beside_their_masks(tmp_path):
    mask = spine([L1, L2])
    for path in ("verse/sub-a_seg-vert_msk.nii.gz", "verse/sub-a_seg-subreg_msk.nii.gz", "bodies/VB1_01_vert-verse.nii.gz",
                 "Dataset001/labelsTr/case7.nii.gz", "Dataset001/labelsTr/case8.nii.gz", "verse/sub-a_ct.nii.gz",
                 "bodies/VB1_01_img.nii.gz", "Dataset001/imagesTr/case7_0000.nii.gz", "verse/sub-z_ct.nii.gz"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        write_mask(mask, tmp_path / path)
    assert [image for image, _ in ev.labelled_cases(tmp_path)] == [  # case8 has no image, sub-z no reference
        tmp_path / "bodies/VB1_01_img.nii.gz",
        tmp_path / "Dataset001/imagesTr/case7_0000.nii.gz",
        tmp_path / "verse/sub-a_ct.nii.gz",
    ]
    (tmp_path / "other").mkdir()
    write_mask(mask, tmp_path / "other" / "sub-a_img.nii.gz")
    with pytest.raises(InputError, match=r"sub-a_img.nii.gz and .*sub-a_ct.nii.gz both match case sub-a \(case names "
                                         r"are matched without the endings .*\); move one of them out of the folder"):
        ev.labelled_cases(tmp_path)
    with pytest.raises(InputError, match="no reference masks"):
        ev.labelled_cases(tmp_path / "other")


def test_labelled_cases_look_inside_folders_that_are_links(tmp_path):
    """An nnU-Net dataset whose imagesTr/ (or a VerSe folder) links to where the files lie: its images were not found
    ("no labelled case has its image beside it"). A link back up the tree is followed once."""
    mask = spine([L1, L2])
    for path in ("store/images/case7_0000.nii.gz", "store/verse/sub-a_seg-vert_msk.nii.gz",
                 "store/verse/sub-a_ct.nii.gz", "gt/Dataset001/labelsTr/case7.nii.gz"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        write_mask(mask, tmp_path / path)
    (tmp_path / "gt/Dataset001/imagesTr").symlink_to(tmp_path / "store/images", target_is_directory=True)
    (tmp_path / "gt/verse").symlink_to(tmp_path / "store/verse", target_is_directory=True)
    (tmp_path / "gt/verse/up").symlink_to(tmp_path / "gt", target_is_directory=True)
    assert [image for image, _ in ev.labelled_cases(tmp_path / "gt")] == [
        tmp_path / "gt/Dataset001/imagesTr/case7_0000.nii.gz", tmp_path / "gt/verse/sub-a_ct.nii.gz"]


@pytest.mark.parametrize("files, message", [
    (("gt/labelsTr/a.nii.gz", "pred/a_seg.nii.gz", "pred/a_ct_seg.nii.gz"), "predictions .* both match case a"),
    (("gt/labelsTr/a.nii.gz", "gt/a_vert-verse.nii.gz", "pred/a_seg.nii.gz"), "reference masks .* both define case a"),
    # an nnU-Net dataset of two contrasts per patient: why p1_T1w and p1_T2w are one case here
    (("gt/labelsTr/p1_T1w.nii.gz", "gt/labelsTr/p1_T2w.nii.gz", "pred/p1_T1w_seg.nii.gz"),
     r"both define case p1 \(case names are matched without the endings _img, _ct, _0000, _T1w, _T2w\); rename or "),
])
def test_two_files_of_one_case_are_refused_not_one_of_them_scored(tmp_path, files, message):
    for path in files:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        write_mask(spine([L1, L2]), tmp_path / path)
    with pytest.raises(InputError, match=message):
        ev.match_cases(tmp_path / "pred", tmp_path / "gt")


def write_report(path: Path, confidences: dict[int, float], modality: str | None = None):
    document = {"vertebrae": [{"label": k, "confidence": c} for k, c in confidences.items()]}
    if modality is not None:
        document["input"] = {"modality": modality}
    path.write_text(json.dumps(document))


def test_confidences_from_reports_split_the_identified(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt" / "labelsTr", tmp_path / "pred"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    for case in ("a", "b", "c"):
        write_mask(spine([L1, L2, L3, L4, L5]), gt_dir / f"{case}.nii.gz")
    write_mask(spine([L1, L2, L3, L4, L5]), pred_dir / "a_seg.nii.gz")  # right, sure of it
    write_report(pred_dir / "a_report.json", {L1: 1.0, L2: 1.0, L3: 0.999, L4: 1.0, L5: 0.98})
    write_mask(spine([L2, L3, L4, L5, S1]), pred_dir / "b_seg.nii.gz")  # one level off, unsure
    write_report(pred_dir / "b_report.json", {L2: 0.6, L3: 0.62, L4: 0.7, L5: 0.995, S1: 0.9})
    write_mask(spine([L1, L2, L3, L4, L5]), pred_dir / "c_seg.nii.gz")  # no report: not rated

    summary = ev.evaluate_folders(pred_dir, gt_dir.parent, out_md=tmp_path / "s.md")
    o = summary.overall
    assert (o.n_confident, o.n_confident_identified) == (5, 4)  # a's L1-L4, b's L5 (wrong)
    assert (o.n_uncertain, o.n_uncertain_identified) == (5, 1)  # a's L5 (right), b's other four
    by_name = {c.name: c for c in summary.cases}
    assert [v.nearest_pred_confidence for v in by_name["b"].vertebrae] == [0.6, 0.62, 0.7, 0.995, 0.9]
    assert all(v.nearest_pred_confidence is None for v in by_name["c"].vertebrae)
    assert "| all | 3 | 15 | 0.67 |" in (tmp_path / "s.md").read_text()
    assert "| 1 of 5 | 4 of 5 |" in (tmp_path / "s.md").read_text()

    (pred_dir / "b_report.json").write_text("{not json")
    with pytest.raises(InputError, match="b_report.json"):
        ev.evaluate_folders(pred_dir, gt_dir.parent)
    write_report(pred_dir / "b_report.json", {L2: float("nan"), L3: 0.62, L4: 0.7, L5: 1.5, S1: 0.9})
    with pytest.raises(InputError, match=r"b_report.json: confidences that are no probability \(labels \[21, 24\]\)"):
        ev.evaluate_folders(pred_dir, gt_dir.parent)


def test_the_report_a_labelling_writes_rates_its_vertebrae(tmp_path):
    """The confidences that split the identified vertebrae are those SpineLabel wrote: a labelling's own report and
    label map, from ``writers``, read back by the evaluation (an L5 at 0.6 rated uncertain, the rest confident)."""
    from SpineLabelLib import writers
    from SpineLabelLib.result import SpineLabeling, Vertebra
    from SpineLabelLib.vertebrae import BY_LABEL, LEVELS

    gt_dir, pred_dir = tmp_path / "gt" / "labelsTr", tmp_path / "pred"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    labels = [L1, L2, L3, L4, L5]
    reference = write_mask(spine(labels), gt_dir / "a.nii.gz")
    components = spine(labels).astype(np.int16)
    components[components > 0] -= L1 - 1  # component ids 1-5: the labelling's own, not label values
    confidences = [1.0, 0.999, 0.995, 0.99, 0.6]
    geometry = Geometry.of(reference)
    vertebrae = [Vertebra(k + 1, BY_LABEL[label].name, tuple(geometry.index_to_lps(
        np.argwhere(components == k + 1).mean(axis=0)[::-1])), 1.0, confidence, np.zeros(len(LEVELS)))
        for k, (label, confidence) in enumerate(zip(labels, confidences))]
    result = SpineLabeling(geometry, components, vertebrae, gaps_mm=[20.0] * 4, modality="CT")
    writers.write_label_map(result, pred_dir / "a_seg.nii.gz")
    writers.write_report(result, pred_dir / "a_report.json")

    summary = ev.evaluate_folders(pred_dir, gt_dir.parent)
    (case,) = summary.cases
    assert case.n_identified == 5 and case.group == "CT"
    assert [v.nearest_pred_confidence for v in case.vertebrae] == pytest.approx(confidences)
    o = summary.overall
    assert (o.n_confident, o.n_confident_identified, o.n_uncertain, o.n_uncertain_identified) == (4, 4, 1, 1)


def test_cases_are_grouped_by_the_modality_of_their_reports(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt" / "labelsTr", tmp_path / "pred"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    for case, modality, levels in (("a", "CT", [L1, L2, L3]), ("b", "MR", [L2, L3, L4]), ("c", "MR", [L3, L4, L5]),
                                   ("d", None, [L1, L2, L3])):
        write_mask(spine([L1, L2, L3, L4, L5]), gt_dir / f"{case}.nii.gz")
        write_mask(spine(levels), pred_dir / f"{case}_seg.nii.gz")
        if modality is not None:
            write_report(pred_dir / f"{case}_report.json", dict.fromkeys(levels, 1.0), modality)

    summary = ev.evaluate_folders(pred_dir, gt_dir.parent)
    assert {c.name: c.group for c in summary.cases} == {"a": "CT", "b": "MR", "c": "MR", "d": ""}
    assert (summary.groups["CT"].n_cases, summary.groups["MR"].n_cases, summary.overall.n_cases) == (1, 2, 4)
    # without a report (d), or without a prediction (e: its labelling failed), the image beside the mask gives the
    # modality, so the missed vertebrae count in their group
    images = gt_dir.parent / "imagesTr"
    images.mkdir()
    write_mask(np.full((6, 8, 8), 80, dtype=np.uint8), images / "d_0000.nii.gz")  # MR-like intensities
    write_mask(spine([L1, L2, L3, L4, L5]), gt_dir / "e.nii.gz")
    ct = np.full((6, 8, 8), -1000, dtype=np.int16)
    ct[2], ct[3:] = -100, 400  # air, fat and bone in Hounsfield units
    write_mask(ct, images / "e_0000.nii.gz")
    summary = ev.evaluate_folders(pred_dir, gt_dir.parent)
    assert {c.name: c.group for c in summary.cases} == {"a": "CT", "b": "MR", "c": "MR", "d": "MR", "e": "CT"}
    assert summary.groups["CT"].n_missing_predictions == 1 and summary.groups["CT"].n_gt == 5 + 5
    # groups the caller gives replace the reports' modalities
    summary = ev.evaluate_folders(pred_dir, gt_dir.parent, groups={"a": "x", "b": "x"})
    assert sorted(summary.groups) == ["x"] and summary.groups["x"].n_cases == 2


def test_case_key():
    assert ev.case_key("VB1_02_AKa3_img") == "VB1_02_AKa3"
    assert ev.case_key("sub-verse014_ct") == "sub-verse014"
    assert ev.case_key("X_0000") == "X" and ev.case_key("sub-mri_label-6_T2w") == "sub-mri_label-6"
    assert ev.case_key("sub-b_T1w") == "sub-b" and ev.case_key("C_CT") == "C"  # were dropped from training


def test_hidden_files_beside_the_cases_are_passed_over(tmp_path, caplog):
    """The ``._X`` files macOS writes on a shared drive stopped the whole run as unreadable images; a reference mask
    without an image is named, not only counted."""
    cases = ("sub-a_seg-vert_msk.nii.gz", "sub-a_ct.nii.gz", "VB1_01_vert-verse.nii.gz", "sub-c_seg-vert_msk.nii.gz")
    for path in cases:
        write_mask(spine([L1, L2]), tmp_path / path)
    for path in ("._" + cases[0], "._" + cases[1], "._" + cases[2], "._VB1_01_img.nii.gz"):
        (tmp_path / path).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with caplog.at_level(logging.WARNING):
        assert [image for image, _ in ev.labelled_cases(tmp_path)] == [tmp_path / "sub-a_ct.nii.gz"]
    assert "VB1_01_vert-verse.nii.gz" in caplog.text and "sub-c_seg-vert_msk.nii.gz" in caplog.text


def test_ct_verse_against_itself(tmp_path):
    src = DATA / "ct_verse"
    if not src.is_dir():
        pytest.skip(f"real data folder {src} is absent")
    (key, pred, gt), = ev.match_cases(tmp_path, src)
    assert pred is None and gt.layout == "verse" and gt.ctd is not None and not gt.bodies_only
    mask = sitk.ReadImage(str(gt.mask))
    sitk.WriteImage(mask, str(tmp_path / f"{key}_ct_seg.nii.gz"))
    body_ctd = ev.read_centroids(gt.ctd, mask)
    # Body centroids (file) lie within 20 mm of the whole-vertebra centroids of the mask, closest to the same label.
    whole = lps_centroids(mask)
    for label, p in body_ctd.items():
        d = {k: np.linalg.norm(p - w) for k, w in whole.items()}
        assert min(d, key=d.get) == label and d[label] < 20.0
    write_ctd(tmp_path / f"{key}_ct_ctd.json", body_ctd)
    summary = ev.evaluate_folders(tmp_path, src)
    r = summary.cases[0]
    assert r.name == "sub-verse014_ct" and r.n_gt == 5 and r.id_rate == 1.0
    assert r.mean_loc_error_mm == 0.0 and r.mean_dice == 1.0 and not r.off_by_one


def test_tptbox_endplates_belong_to_their_vertebra_and_discs_are_ignored(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    truth = spine([L3, L4])
    mask = truth.copy()
    mask[1, truth[1] == L3] = 200 + L3  # the top layer of L3's body is its endplate
    mask[10, 1:6, 2:10] = 100 + L3  # the disc below L3
    write_mask(mask, gt_dir / "sub-ct_seg-vert_label-22_msk.nii.gz")
    write_mask(truth, pred_dir / "sub-ct_label-22_seg.nii.gz")
    case = ev.evaluate_folders(pred_dir, gt_dir).cases[0]
    assert case.n_gt == 2 and case.mean_dice == 1.0 and case.id_rate == 1.0


@pytest.mark.parametrize("second, reason", [
    ({"label": L2, "world_lps_mm": [float("nan"), 2.0, 3.0]}, "the centroid of label 21 is not a position"),
    ({"label": L2, "world_lps_mm": [1e308, 2.0, 3.0]}, "the centroid of label 21 is not a position"),
    ({"label": L1, "world_lps_mm": [1.0, 2.0, 4.0]}, "label 20 has two centroids"),
    ({"label": 21.7, "world_lps_mm": [1.0, 2.0, 4.0]}, "entry 1 is not a centroid.*label 21.7 is not a whole number"),
    ({"label": True, "world_lps_mm": [1.0, 2.0, 4.0]}, "entry 1 is not a centroid.*label True"),
])
def test_centroid_files_that_do_not_say_one_position_per_label_are_refused(tmp_path, second, reason):
    """A NaN (or a position whose distances overflow) would be dropped or skew the mean; a second centroid of a
    label, or a label rounded from 21.7 or read from true, would score a vertebra the file does not name."""
    path = tmp_path / "x_ctd.json"
    path.write_text(json.dumps([{"label": L1, "world_lps_mm": [1.0, 2.0, 3.0]}, second]))
    with pytest.raises(InputError, match=f"x_ctd.json: {reason}"):
        ev.read_centroids(path, sitk.Image([4, 4, 4], sitk.sitkUInt8))
    path.write_text(json.dumps([{"label": L1, "world_lps_mm": [1, 2, 3]}, {"label": 21.0, "world_lps_mm": [1, 2, 5]}]))
    assert list(ev.read_centroids(path, sitk.Image([4, 4, 4], sitk.sitkUInt8))) == [L1, L2]


@pytest.mark.parametrize("entries, reason", [
    ([{"direction": ["L", "P", "S"]}, {"label": L1, "X": 1, "Y": 2}], r"\(no 'Z'\)$"),
    ([{"direction": ["L", "P", "S"]}, {"label": "L1", "X": 1, "Y": 2, "Z": 3}],
     r"\(label 'L1' is not a whole number\)$"),
    ([{"direction": ["P", "I", "X"]}, {"label": L1, "X": 1, "Y": 2, "Z": 3}], r"\('PIX' is no direction code\)$"),
    ([{"label": L1, "world_lps_mm": [1.0, 2.0]}], r"\('world_lps_mm' is not three numbers\)$"),
    ([{"label": L1, "world_lps_mm": [10 ** 400, 2.0, 3.0]}], r"\(int too large to convert to float\)$"),
])
def test_centroid_entries_that_are_not_centroids_name_file_and_entry(tmp_path, entries, reason):
    path = tmp_path / "x_ctd.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(InputError, match=f"x_ctd.json: entry {len(entries) - 1} is not a centroid.*{reason}"):
        ev.read_centroids(path, sitk.Image([4, 4, 4], sitk.sitkUInt8))


def test_folders_that_cannot_be_scored_leave_no_report(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    write_mask(spine([L1, L2, L3]), gt_dir / "sub-a_seg-vert_msk.nii.gz")
    write_mask(spine([L1, L2, L3]), pred_dir / "sub-x_seg.nii.gz")
    with pytest.raises(InputError, match=f"{pred_dir}: no prediction matches a reference case"):
        ev.evaluate_folders(pred_dir, gt_dir, tmp_path / "r" / "s.json")
    assert not (tmp_path / "r").exists()  # no report folder left behind, nothing half-written


def test_references_without_a_vertebra_label_are_refused_not_scored(tmp_path):
    """Masks of values the VerSe table lacks (27, 120...) were scored as nothing: exit 0 and a report of dashes."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for folder, name in ((gt_dir, "sub-a_seg-vert_msk.nii.gz"), (pred_dir, "sub-a_seg.nii.gz")):
        write_mask(np.where(spine([L1, L2, L3]) > 0, 27, 0).astype(np.uint8), folder / name)
    with pytest.raises(InputError, match=f"{gt_dir}: no reference case holds a vertebra label"):
        ev.evaluate_folders(pred_dir, gt_dir, tmp_path / "r" / "s.json")
    assert not (tmp_path / "r").exists()


def test_a_prediction_on_another_grid_is_resampled_onto_its_reference(tmp_path, caplog):
    """One slice shorter and shifted by half a voxel: scored on the reference's grid, with a warning, instead of
    stopping the whole run."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    reference = write_mask(spine([L1, L2, L3]), gt_dir / "sub-a_seg-vert_msk.nii.gz")
    shifted = np.add(reference.GetOrigin(), 0.5 * np.array(reference.GetSpacing())).tolist()
    write_mask(spine([L1, L2, L3])[:-1], pred_dir / "sub-a_seg.nii.gz", origin=shifted)
    case = ev.evaluate_folders(pred_dir, gt_dir).cases[0]
    assert "is resampled onto it" in caplog.text
    assert re.search(r"sub-a_seg.nii.gz: prediction grid \(\d+ x \d+ x \d+ voxels of [0-9.]+ x [0-9.]+ x [0-9.]+ mm, "
                     r"origin .* mm\) differs from reference .*sub-a_seg-vert_msk.nii.gz \(", caplog.text)
    assert case.n_identified == 3 and case.mean_dice > 0.9
    # centroid files in voxel coordinates are read on their own mask's grid, not on the reference's
    grown = np.concatenate([np.zeros((10, 12, 12), np.uint8), spine([L1, L2, L3])])
    write_mask(grown, pred_dir / "sub-a_seg.nii.gz", origin=np.subtract(reference.GetOrigin(), [0, 0, 10 * SPACING_ZYX[0]]))
    for mask, path in ((spine([L1, L2, L3]), gt_dir / "sub-a_seg-vb_ctd.json"), (grown, pred_dir / "sub-a_ctd.json")):
        path.write_text(json.dumps([{"direction": ["L", "P", "S"]}] + [
            {"label": int(k), "X": float(x), "Y": float(y), "Z": float(z)} for k, (x, y, z) in ev.mask_centroids(mask).items()]))
    case = ev.evaluate_folders(pred_dir, gt_dir).cases[0]
    assert case.centroid_source == "centroid files" and case.n_identified == 3 and case.mean_loc_error_mm < 1e-6


def test_a_prediction_centroid_file_unlike_its_map_is_scored_with_a_warning(tmp_path, caplog):
    """A prediction's centroid file of no entries (or leaving out L3) scored its vertebrae as not predicted, and a
    centroid of a label with no voxel (T12, put on the reference L3) took L3's identification, without a word."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    reference = write_mask(spine([L1, L2, L3]), gt_dir / "sub-a_seg-vert_msk.nii.gz")
    truth = ev._mask_centroids_lps(spine([L1, L2, L3]), Geometry.of(reference))
    write_ctd(gt_dir / "sub-a_seg-vb_ctd.json", truth)
    write_mask(spine([L1, L2, L3]), pred_dir / "sub-a_seg.nii.gz")
    write_ctd(pred_dir / "sub-a_ctd.json", truth)
    with caplog.at_level(logging.WARNING):
        assert ev.evaluate_folders(pred_dir, gt_dir).cases[0].n_identified == 3
    assert "does not name the vertebrae" not in caplog.text
    write_ctd(pred_dir / "sub-a_ctd.json", {L1: truth[L1], L2: truth[L2], T12: truth[L3] + 0.5})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        case = ev.evaluate_folders(pred_dir, gt_dir).cases[0]
    assert case.n_identified == 2 and case.not_predicted == ["L3"]  # scored as the file says
    assert (f"sub-a_ctd.json does not name the vertebrae of its label map sub-a_seg.nii.gz: no centroid for labels "
            f"[{L3}] of the map (counted as not predicted); centroids of labels [{T12}] that the map has no voxel of"
            in caplog.text)


def test_a_reference_centroid_of_a_label_its_mask_lacks_is_scored_with_a_warning(tmp_path, caplog):
    """A reference centroid file naming T12 beside a mask of L1-L3 lowered the score (3 of 4) without a word."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    reference = write_mask(spine([L1, L2, L3]), gt_dir / "sub-a_seg-vert_msk.nii.gz")
    truth = ev._mask_centroids_lps(spine([L1, L2, L3]), Geometry.of(reference))
    write_ctd(gt_dir / "sub-a_seg-vb_ctd.json", {**truth, T12: truth[L1] + np.array([0.0, 0.0, 12.0])})
    write_mask(spine([L1, L2, L3]), pred_dir / "sub-a_seg.nii.gz")
    write_ctd(pred_dir / "sub-a_ctd.json", truth)
    with caplog.at_level(logging.WARNING):
        case = ev.evaluate_folders(pred_dir, gt_dir).cases[0]
    assert case.n_gt == 4 and case.n_identified == 3  # scored as the file says
    assert (f"sub-a: {gt_dir / 'sub-a_seg-vb_ctd.json'} has centroids of labels [{T12}] that "
            f"{gt_dir / 'sub-a_seg-vert_msk.nii.gz'} has no voxel of" in caplog.text)


def test_a_prediction_of_another_numbering_is_refused(tmp_path):
    """A TotalSegmentator label map given as the prediction (its L1 31, L2 30, L3 29 and organs 1-24) was scored as
    VerSe levels, its organs named cervical vertebrae, with only a log line that the values above 28 were ignored;
    SPINEPS's discs (100+) beside VerSe vertebrae are still left out."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    write_mask(spine([L1, L2, L3]), gt_dir / "sub-a_seg-vert_msk.nii.gz")
    totalsegmentator = spine([31, 30, 29])
    totalsegmentator[0, :2, :2] = 5  # an organ
    write_mask(totalsegmentator, pred_dir / "sub-a_seg.nii.gz")
    with pytest.raises(InputError, match=r"sub-a_seg.nii.gz: label values \[29, 30, 31\] are no VerSe values .* "
                                         "TotalSegmentator's"):
        ev.evaluate_folders(pred_dir, gt_dir)
    with_discs = spine([L1, L2, L3])
    with_discs[9:11, 1:6, 2:10] = 101  # a disc between L1 and L2, as SPINEPS labels it
    write_mask(with_discs, pred_dir / "sub-a_seg.nii.gz")
    assert ev.evaluate_folders(pred_dir, gt_dir).cases[0].n_identified == 3


def test_a_prediction_or_centroid_file_of_another_image_is_refused(tmp_path):
    """A prediction that lies wholly outside its reference's grid, or a centroid file whose centroids are far from
    its own mask's vertebrae, was scored as identified from the centroid files while covering nothing."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    reference = write_mask(spine([L1, L2, L3]), gt_dir / "sub-a_seg-vert_msk.nii.gz")
    write_ctd(gt_dir / "sub-a_seg-vb_ctd.json", ev._mask_centroids_lps(spine([L1, L2, L3]), Geometry.of(reference)))
    elsewhere = np.add(reference.GetOrigin(), [0.0, 0.0, 500.0]).tolist()
    moved = write_mask(spine([L1, L2, L3]), pred_dir / "sub-a_seg.nii.gz", origin=elsewhere)
    write_ctd(pred_dir / "sub-a_ctd.json", ev._mask_centroids_lps(spine([L1, L2, L3]), Geometry.of(reference)))
    with pytest.raises(InputError, match=r"sub-a_seg.nii.gz: no labelled voxel of this prediction lies inside the grid "
                                         r"of its reference .*sub-a_seg-vert_msk.nii.gz"):
        ev.evaluate_folders(pred_dir, gt_dir)
    write_mask(spine([L1, L2, L3]), pred_dir / "sub-a_seg.nii.gz", origin=reference.GetOrigin())
    write_ctd(pred_dir / "sub-a_ctd.json", ev._mask_centroids_lps(spine([L1, L2, L3]), Geometry.of(moved)))
    with pytest.raises(InputError, match=r"sub-a_ctd.json: the centroid of label 20 lies 500 mm from that label in "
                                         r".*sub-a_seg.nii.gz"):
        ev.evaluate_folders(pred_dir, gt_dir)


def test_masks_in_other_image_formats_are_found(tmp_path):
    """Reference masks and predictions in .nrrd or .mha, in the VerSe, bodies-only and nnU-Net layouts."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    (gt_dir / "nn" / "labelsTr").mkdir(parents=True)
    pred_dir.mkdir()
    write_mask(spine([L1, L2, L3]), gt_dir / "sub-a_seg-vert_msk.nrrd")
    write_mask(spine([L1, L2, L3], body_only=True), gt_dir / "b_vert-verse.MHA")
    write_mask(spine([L1, L2, L3]), gt_dir / "nn" / "labelsTr" / "c.mha")
    for case in ("sub-a", "b_img", "c_0000"):
        write_mask(spine([L1, L2, L3]), pred_dir / f"{case}_seg.nrrd")
    (gt_dir / "sub-a_seg-vert_msk.seg.nrrd").write_bytes(b"")  # a 3D Slicer save beside the mask: no case "sub-a_msk"
    (pred_dir / "sub-a.seg.nrrd").write_bytes(b"")
    summary = ev.evaluate_folders(pred_dir, gt_dir)
    assert sorted(c.name for c in summary.cases) == ["b_img", "c_0000", "sub-a"]
    assert summary.overall.n_identified == 9


def test_a_report_folder_that_cannot_be_made_leaves_none_behind(tmp_path):
    pred_dir, gt_dir = three_cases(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(InputError, match="afile/r: cannot write the report there"):
        ev.evaluate_folders(pred_dir, gt_dir, tmp_path / "new" / "sub" / "r.json", tmp_path / "afile" / "r" / "r.md")
    assert not (tmp_path / "new").exists()


def three_cases(tmp_path: Path) -> tuple[Path, Path]:
    """(prediction folder, GT folder) of three nnU-Net cases a, b, c, each predicted right."""
    gt_dir, pred_dir = tmp_path / "gt" / "labelsTr", tmp_path / "pred"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    for case in ("a", "b", "c"):
        write_mask(spine([L1, L2, L3]), gt_dir / f"{case}.nii.gz")
        write_mask(spine([L1, L2, L3]), pred_dir / f"{case}_seg.nii.gz")
    return pred_dir, gt_dir.parent


def test_folders_report_progress_once_per_case(tmp_path):
    pred_dir, gt_dir = three_cases(tmp_path)
    calls: list[tuple[float, str]] = []
    summary = ev.evaluate_folders(pred_dir, gt_dir, progress=lambda *call: calls.append(call))
    assert [fraction for fraction, _ in calls] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [message for _, message in calls] == ["scored a", "scored b", "scored c"]
    assert summary.overall.n_identified == 9


def test_cancelled_folders_leave_no_report(tmp_path):
    pred_dir, gt_dir = three_cases(tmp_path)
    polls: list[int] = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) == 2  # stop before the second case

    calls: list[float] = []
    out_json, out_md = tmp_path / "r" / "s.json", tmp_path / "r" / "md" / "s.md"
    with pytest.raises(Cancelled):
        ev.evaluate_folders(pred_dir, gt_dir, out_json, out_md, progress=lambda fraction, _: calls.append(fraction),
                            cancel=cancel)
    assert len(polls) == 2 and calls == pytest.approx([1 / 3])
    assert not (tmp_path / "r").exists()  # no report, no empty report folder


def test_the_vertebrae_of_a_case_are_listed_in_anatomical_order():
    """T13 (VerSe 28) lies between T12 and L1, not after every other label value."""
    gt = spine([T12, T13, L1, L2])
    r = ev.evaluate_case(gt.copy(), gt, SPACING_ZYX, None, None, bodies_only=False)
    assert [v.name for v in r.vertebrae] == ["T12", "T13", "L1", "L2"]


def test_the_predicted_label_sharing_most_with_a_vertebra_is_the_lower_value_on_a_tie():
    gt = np.array([L1, L1, L1, L1, 0, 0, 0, 0, 0, 0])
    pred = np.array([L1, L1, L2, L2, L2, L2, L2, L2, L2, L2])
    inter, pred_count, gt_count, shared, best = ev._overlaps(pred, gt)
    assert shared[L1] == 2 and best[L1] == L1
    r = ev.evaluate_case(pred.reshape(1, 1, -1), gt.reshape(1, 1, -1), (1.0, 1.0, 1.0), None, None, bodies_only=False)
    assert r.vertebrae[0].dice_names_aside == pytest.approx(2 * 2 / (4 + 2))


def test_a_report_path_evaluate_would_read_as_an_input_is_refused(tmp_path):
    """A report named like a prediction's file in the prediction folder, or like a reference file under the reference
    folder, would be read by the next evaluation (or would replace a dataset.json): refused before any work."""
    pred_dir, gt_dir = three_cases(tmp_path)
    dataset = json.dumps({"labels": {"background": 0, "L1": L1, "L2": L2, "L3": L3}})
    (gt_dir / "dataset.json").write_text(dataset)
    for out in (pred_dir / "x_seg.nii.gz", pred_dir / "x_ctd.json", pred_dir / "x_report.json",
                gt_dir / "dataset.json", gt_dir / "labelsTr" / "d.nii.gz", gt_dir / "centroids" / "a_ctd.json"):
        with pytest.raises(InputError, match=out.name):
            ev.evaluate_folders(pred_dir, gt_dir, out_json=out)
        assert not out.exists() or out.read_text() == dataset
        with pytest.raises(InputError, match=out.name):
            ev.evaluate_folders(pred_dir, gt_dir, out_md=out)
    assert not (gt_dir / "centroids").exists()
    ev.evaluate_folders(pred_dir, gt_dir, pred_dir / "evaluation.json", gt_dir / "evaluation.md")  # no input's name
    assert ev.evaluate_folders(pred_dir, gt_dir).unmatched_predictions == []


def test_warnings_name_a_case_as_its_row_does(tmp_path, caplog):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    write_mask(spine([L1, L2, L3], body_only=True), gt_dir / "VB1_01_vert-verse.nii.gz")  # bodies, no centroid file
    write_mask(spine([L1, L2, L3]), pred_dir / "VB1_01_img_seg.nii.gz")
    b = write_mask(spine([L1, L2, L3]), gt_dir / "sub-b_seg-vert_msk.nii.gz")
    write_ctd(gt_dir / "sub-b_seg-vb_ctd.json", {k: v for k, v in lps_centroids(b).items() if k != L3})
    write_mask(spine([L1, L2, L3]), pred_dir / "sub-b_ct_seg.nii.gz")
    write_ctd(pred_dir / "sub-b_ct_ctd.json", lps_centroids(b))
    write_mask(spine([L1, L2, L3]), gt_dir / "sub-c_seg-vert_msk.nii.gz")  # no prediction
    with caplog.at_level(logging.WARNING, logger="SpineLabelLib.evaluation"):
        summary = ev.evaluate_folders(pred_dir, gt_dir)
    named = {record.getMessage().split(": ")[0] for record in caplog.records}
    assert sorted(named) == sorted(c.name for c in summary.cases) == ["VB1_01_img", "sub-b_ct", "sub-c"]


@pytest.mark.parametrize("link", ["pred/a_ctd.json", "pred/a_report.json", "gt/centroids/a_ctd.json"])
def test_a_centroid_file_or_report_that_links_to_nothing_is_refused(tmp_path, link):
    pred_dir, gt_dir = three_cases(tmp_path)
    (tmp_path / "gt" / "centroids").mkdir()
    (tmp_path / link).symlink_to(tmp_path / "gone.json")
    with pytest.raises(InputError, match=Path(link).name):
        ev.evaluate_folders(pred_dir, gt_dir, tmp_path / "r" / "s.json")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("label", [L1 + 0.7, True, str(L1), float("inf")])
def test_a_report_label_that_is_no_whole_number_is_refused(tmp_path, label):
    path = tmp_path / "a_report.json"
    write_report(path, {L1: 0.9})
    assert ev.read_report(path)[0] == {L1: 0.9}
    path.write_text(json.dumps({"vertebrae": [{"label": label, "confidence": 0.9}]}))
    with pytest.raises(InputError, match=r"a_report.json: not a readable SpineLabel report: each of its 'vertebrae' "
                                         r"needs a whole-number 'label' and a 'confidence' number \(label .* is not a "
                                         r"whole number\)$"):
        ev.read_report(path)
    path.write_text(json.dumps({"vertebrae": [{"label": float(L1), "confidence": 0.9}]}))
    assert ev.read_report(path)[0] == {L1: 0.9}


@pytest.mark.parametrize("text, reason", [
    ("", r"not JSON text \(Expecting value: line 1 column 1"),
    (json.dumps({"input": {}}), "no 'vertebrae' list$"),
    (json.dumps([{"label": L1}]), "no 'vertebrae' list$"),
    (json.dumps({"vertebrae": [{"label": L1}]}), r"needs a whole-number 'label' and a 'confidence' number \(no "
                                                 r"'confidence'\)$"),
    (json.dumps({"vertebrae": [], "input": "CT"}), "its 'input' is no JSON object$"),
    (json.dumps({"vertebrae": [{"label": L1, "confidence": 10 ** 400}]}), r"\(int too large to convert to float\)$"),
])
def test_a_file_that_is_no_report_is_refused_in_words(tmp_path, text, reason):
    """It said which Python exception was raised ("KeyError: 'vertebrae'"), not what the file lacks."""
    path = tmp_path / "a_report.json"
    path.write_text(text)
    with pytest.raises(InputError, match=f"a_report.json: not a readable SpineLabel report: .*{reason}") as err:
        ev.read_report(path)
    assert "Error" not in str(err.value)
