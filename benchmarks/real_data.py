"""Train the default model and measure it on the real scans in ``../shared/data``.

The real scans are split once, here: the cases in ``HOLDOUT_MRI`` and ``HOLDOUT_FOLDERS`` never enter training and are
the development test set, scored by ``spinelabel evaluate``'s ``evaluation.evaluate_folders`` (in this process, to score
the ``discs_mri`` scans as a group of their own), together with those scans, whose images are never trained on either
(their disc masks shape the synthetic discs). The other real CT (``TRAINING_CT``) is trained on. (The data's owners hold
back more cases of every source for an independent score.)

Usage (from the repository root):
    python benchmarks/real_data.py train --out SpineLabel/SpineLabelLib/weights/spinelabel-default.json [--epochs N ...]
    python benchmarks/real_data.py evaluate [--model CARD.json] [--workdir DIR] [--selection] [--slice-mm MM]
                                            [--slab-mm MM]
    python benchmarks/real_data.py evaluate --selection --length-mm MM [--correct-one] [--model CARD.json]
                                            [--workdir DIR]
    python benchmarks/real_data.py cervical [--model CARD.json] [--workdir DIR]
    python benchmarks/real_data.py pitches

``pitches`` prints the mean centroid distance between consecutive levels in the whole-vertebra VerSe masks
(``masks_verse``: centres of mass) and the lumbar MRI bodies (``mri_lumbar_bodies``: body centroids) of the training
view, the source of ``SpineLabelLib.sequence.SequencePriors.pitch_mm``; the real CT is not read.

``cervical`` labels the three MRI of ``cervical_sct``, which have no vertebra masks (the PAM50 template and the small
cervical T1 and T2 MRI; never trained on, but the T1 set one edge of the gap in which the spine gate's
``pipeline.MIN_SPINE_PROBABILITY`` was placed), and prints the label closest to each vertebra its level labels place
(``_sct_references``; VerSe identification, along head-feet only).

``evaluate`` labels every held-out scan with ``spinelabel label``, then writes ``evaluation.json`` and
``evaluation.md`` (groups CT, MR and "MR discs") into the work folder. With ``--slice-mm MM`` it labels copies made
as thick-slice acquisitions are (MRI: MM-thick sagittal slices, CT: MM-thick axial slices, each the mean of the
voxels it covers) and scores their labels, brought back onto the original grids, against the same references. With
``--slab-mm MM`` the MRI copies are also cut to a sagittal stack MM wide left to right (the whole number of slices
nearest it), centred on the reference vertebrae where a body mask lies beside the image, else on the image: a clinical
stack of 11 slices of 3 mm is ``--slice-mm 3 --slab-mm 33``. The voxels outside the stack score as background.

``--selection --length-mm MM`` scores short scans of real images: from each training scan, one copy per reference
vertebra, cut along its axis closest to head-feet to the whole number of slices nearest MM centred on that vertebra's
centroid (as far as the image allows), like a targeted scan of a few vertebrae. Each copy is scored against the
reference cut the same way, on the vertebrae whose centroid lies in the copy; the others are left out of its
reference. The training scans only: the held-out set is too small to cut this way and stays untouched.
With ``--correct-one`` each copy is labelled in this process, as ``spinelabel label`` labels it, and then corrected
as a user would correct it: where the vertebra holding most of the reference vertebra the copy is centred on is named
otherwise, it is renamed to the reference's name (``edits.rename``, locked) and the rest re-solved around it. Both
are scored (``evaluation.json`` as labelled, ``evaluation-corrected.json`` after the correction), with the number of
copies renamed and the time of each rename.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataclasses import asdict

import numpy as np
import SimpleITK as sitk

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Development test cases, never trained on, not even as shapes for synthesis: the last cases (by name) of each lumbar
# MRI source (VB1 2 of 5, VB2 2 of 9, VB3 4 of 18) and the TPTBox crops (a CT and an MRI of a source that nothing else
# comes from).
HOLDOUT_MRI = ["VB1_07_AKs7_img", "VB1_08_AKs8_img", "VB2_19_img", "VB2_23_img",
               "VB3_43_img", "VB3_46_img", "VB3_49_img", "VB3_52_img"]
HOLDOUT_FOLDERS = ["crops_tptbox"]
_HOLDOUT_MRI_PREFIXES = tuple(f"{name[: -len('_img')]}_" for name in HOLDOUT_MRI)  # the image's mask, centroids...
# Real CT trained on: name -> (image, VerSe label map; None for the TotalSegmentator one, converted by
# _totalseg_to_verse), as real_ct/ in nnU-Net layout inside the training view
TRAINING_CT = {
    "sub-verse014": ("ct_verse/sub-verse014_ct.nii.gz", "ct_verse/sub-verse014_seg-vert_msk.nii.gz"),
    "example_ct_sm": ("ct_mr_totalsegmentator/example_ct_sm.nii.gz", None),
}
DISC_MIDPOINT_RADIUS_MM = 4.0


def _workdir(args: argparse.Namespace, prefix: str) -> Path:
    """``--workdir``, which must be new or empty (files of an earlier run would be scored or trained on), or a new
    temporary folder."""
    if args.workdir is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    if args.workdir.exists() and not args.workdir.is_dir():
        raise SystemExit(f"{args.workdir}: not a folder; give a new or empty folder as --workdir")
    if args.workdir.exists() and any(args.workdir.iterdir()):
        raise SystemExit(f"{args.workdir}: work folder not empty; give a new one (an earlier run's files would count)")
    return args.workdir


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def _link_mri(names: list[str], gt: Path) -> list[Path]:
    """Link the labels of these ``mri_lumbar_bodies`` cases into the ground-truth folder; their images."""
    for name in names:
        stem = name[: -len("_img")]
        for suffix in ("_vert-verse.nii.gz", "_ctd.json"):
            _link(DATA / "mri_lumbar_bodies" / f"{stem}{suffix}", gt / "mri_lumbar_bodies" / f"{stem}{suffix}")
    return [DATA / "mri_lumbar_bodies" / f"{name}.nii.gz" for name in names]


def _totalseg_to_verse() -> sitk.Image:
    """The TotalSegmentator abdominal CT's vertebra labels (ids 27..50 = L5..C1, 25/26 = sacrum/S1) in VerSe values."""
    from SpineLabelLib.vertebrae import BY_NAME, LEVELS

    ts = sitk.ReadImage(str(DATA / "ct_mr_totalsegmentator" / "example_seg.nii.gz"))
    lut = np.zeros(256, np.uint8)
    regular = [level.name for level in LEVELS if not level.transitional and level.name != "S1"]  # C1 ... L5
    for ts_id, name in zip(range(50, 26, -1), regular):  # TotalSegmentator: 50 = C1 ... 27 = L5
        lut[ts_id] = BY_NAME[name].label
    lut[[25, 26]] = BY_NAME["S1"].label
    out = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(ts)])
    out.CopyInformation(ts)
    return out


def _training_ct_labels(name: str, folder: Path) -> Path:
    """The VerSe label map of a ``TRAINING_CT`` case, linked or (TotalSegmentator) written into ``folder``."""
    label = TRAINING_CT[name][1]
    path = folder / f"{name}.nii.gz"
    if label is not None:
        _link(DATA / label, path)
    elif not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(_totalseg_to_verse(), str(path))
    return path


def build_selection_set(root: Path) -> tuple[dict[str, list[Path]], Path]:
    """The training MRI (every ``mri_lumbar_bodies`` case not held out) and the training CT: the set on which model
    choices are made."""
    names = sorted(p.name[: -len(".nii.gz")] for p in (DATA / "mri_lumbar_bodies").glob("*_img.nii.gz"))
    gt = root / "gt"
    images = {"MR": _link_mri([n for n in names if n not in HOLDOUT_MRI], gt), "CT": []}
    for name, (image, _) in TRAINING_CT.items():
        _training_ct_labels(name, gt / "real_ct" / "labelsTr")  # nnU-Net layout: centroids from the masks
        _link(DATA / image, root / "images" / f"{name}.nii.gz")
        images["CT"].append(root / "images" / f"{name}.nii.gz")
    return images, gt


def build_test_set(root: Path) -> tuple[dict[str, list[Path]], Path]:
    """Images to label per modality, and a ground-truth folder in layouts ``spinelabel evaluate`` reads."""
    gt = root / "gt"
    images: dict[str, list[Path]] = {"MR": _link_mri(HOLDOUT_MRI, gt), "CT": []}
    # small real crops (TPTBox): CT L2-L4 and T2 MRI C5-C7
    crops = root / "images"
    for src_image, src_mask, name, group in (
        ("sub-ct_label-22_ct.nii.gz", "sub-ct_seg-vert_label-22_msk.nii.gz", "tptbox-ct_ct", "CT"),
        ("sub-mri_label-6_T2w.nii.gz", "sub-mri_seg-vert_label-6_msk.nii.gz", "tptbox-mri_T2w", "MR"),
    ):
        _link(DATA / "crops_tptbox" / src_image, crops / f"{name}.nii.gz")
        _link(DATA / "crops_tptbox" / src_mask, gt / "crops" / f"{name.rsplit('_', 1)[0]}_seg-vert_msk.nii.gz")
        images[group].append(crops / f"{name}.nii.gz")
    images["MR discs"] = [_disc_midpoints(instance, gt / "discs") for instance in
                          sorted((DATA / "discs_mri").glob("*_instance.nii.gz"))]
    return images, gt


def _disc_midpoints(instance: Path, folder: Path) -> Path:
    """Ground truth for a ``discs_mri`` case, whose images are never trained on (only their disc masks shape the
    synthetic discs): each vertebra between two labelled discs (L2 between L1/L2 and L2/L3 ... L5) at the midpoint
    of the two disc centroids, its mask a ball of ``DISC_MIDPOINT_RADIUS_MM`` there, so that body coverage is that
    of the body's core. Writes ``X_vert-verse.nii.gz`` and ``X_ctd.json`` into ``folder``; returns the image."""
    from SpineLabelLib.vertebrae import BY_NAME

    case = instance.name[: -len("_instance.nii.gz")]
    discs = {e["level"]: np.asarray(e["world_lps_mm"], dtype=float)
             for e in json.loads((instance.parent / f"{case}_ctd.json").read_text()) if "level" in e}
    centroids = {}
    for upper, lower in zip(discs, list(discs)[1:]):
        between = upper.split("/")[1]
        if between == lower.split("/")[0]:
            centroids[BY_NAME[between].label] = (discs[upper] + discs[lower]) / 2
    reference = sitk.ReadImage(str(instance))
    grid = np.indices(reference.GetSize()[::-1], dtype=np.float32)
    spacing = np.asarray(reference.GetSpacing())[::-1]
    mask = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
    for label, lps in centroids.items():
        index = np.asarray(reference.TransformPhysicalPointToContinuousIndex(lps.tolist()))[::-1]
        distance = np.sqrt(sum(((g - i) * s) ** 2 for g, i, s in zip(grid, index, spacing)))
        mask[distance <= DISC_MIDPOINT_RADIUS_MM] = label
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(reference)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(folder / f"{case}_vert-verse.nii.gz"))
    (folder / f"{case}_ctd.json").write_text(json.dumps(
        [{"label": label, "world_lps_mm": lps.tolist()} for label, lps in centroids.items()], indent=1))
    return instance.parent / f"{case}_img.nii.gz"


def _axis_along(image: sitk.Image, lps_axis: int) -> int:
    """The voxel axis of ``image`` closest to LPS axis ``lps_axis`` (0 left-right, 2 head-feet)."""
    return int(np.argmax(np.abs(np.asarray(image.GetDirection()).reshape(3, 3)[lps_axis])))


def _thick_slices(image: sitk.Image, lps_axis: int, mm: float) -> sitk.Image:
    """``image`` as a thick-slice acquisition: averaged over slabs of a whole number of voxels, the nearest to ``mm``
    (at least one: a 3 mm CT stays 3 mm at 4 mm; 1.5 mm voxels make 4.5 mm slabs), along its axis closest to LPS
    axis ``lps_axis`` (0 left-right: sagittal slices; 2 inferior-superior: axial slices), one float32 slice per slab,
    centred on the slab. The voxels left over at the far end (fewer than a slab) are left out, and score as
    background. The slice thickness used is the spacing of the result along that axis."""
    axis = _axis_along(image, lps_axis)
    k = max(1, int(round(mm / image.GetSpacing()[axis])))
    array = np.moveaxis(sitk.GetArrayFromImage(image).astype(np.float32), 2 - axis, 0)
    n = array.shape[0] // k
    slabs = np.moveaxis(array[: n * k].reshape(n, k, *array.shape[1:]).mean(axis=1), 0, 2 - axis)
    out = sitk.GetImageFromArray(np.ascontiguousarray(slabs))
    spacing, centre = list(image.GetSpacing()), [0.0, 0.0, 0.0]
    spacing[axis], centre[axis] = spacing[axis] * k, (k - 1) / 2
    out.SetSpacing(spacing)
    out.SetDirection(image.GetDirection())
    out.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(centre))
    return out


def _slab(image: sitk.Image, mm: float, centre_lps: np.ndarray, lps_axis: int = 0) -> sitk.Image:
    """``image`` cut along its axis closest to LPS axis ``lps_axis`` (``_axis_along``) to the whole number of slices
    nearest ``mm`` (at least one), centred on the LPS point ``centre_lps`` (as far as the image allows)."""
    axis = _axis_along(image, lps_axis)
    n = min(max(1, int(round(mm / image.GetSpacing()[axis]))), image.GetSize()[axis])
    middle = image.TransformPhysicalPointToContinuousIndex([float(v) for v in centre_lps])[axis]
    start = int(np.clip(round(middle - (n - 1) / 2), 0, image.GetSize()[axis] - n))
    index, size = [0, 0, 0], list(image.GetSize())
    index[axis], size[axis] = start, n
    return sitk.RegionOfInterest(image, size, index)


def _spine_centre(image_path: Path, image: sitk.Image) -> np.ndarray:
    """LPS centre of the reference bodies beside an ``mri_lumbar_bodies`` image, else of the image."""
    mask = image_path.with_name(image_path.name.replace("_img.nii.gz", "_vert-verse.nii.gz"))
    if mask != image_path and mask.exists():
        labels = sitk.ReadImage(str(mask))
        centre = np.argwhere(sitk.GetArrayViewFromImage(labels) > 0).mean(axis=0)[::-1]
        return np.asarray(labels.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre]))
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))


def _reference_of(image: Path, group: str, gt: Path) -> tuple[Path, Path | None]:
    """(label map, centroid json or None) of a scan of ``build_selection_set``."""
    if group == "CT":
        return gt / "real_ct" / "labelsTr" / image.name, None
    stem = image.name[: -len("_img.nii.gz")]
    return gt / "mri_lumbar_bodies" / f"{stem}_vert-verse.nii.gz", gt / "mri_lumbar_bodies" / f"{stem}_ctd.json"


def _short_copies(images: dict[str, list[Path]], gt: Path, root: Path, mm: float
                  ) -> tuple[dict[str, list[Path]], Path, dict[Path, tuple[int, Path]]]:
    """Copies of the selection scans cut to MM along head-feet (``_slab``), one centred on each reference vertebra,
    with their references cut the same way and holding only the vertebrae whose centroid is in the copy (module
    docstring); their images per group and their ground-truth folder, in the layouts of ``build_selection_set``, and
    for each copy the VerSe label of the vertebra it is centred on and the copy's reference label map."""
    from SpineLabelLib.evaluation import mask_centroids, read_centroids, reference_labels
    from SpineLabelLib.result import Geometry

    out_images: dict[str, list[Path]] = {group: [] for group in images}
    centred: dict[Path, tuple[int, Path]] = {}
    short_gt = root / f"gt-{mm:g}mm"
    for group, paths in images.items():
        for path in paths:
            image = sitk.ReadImage(str(path))
            mask_path, ctd_path = _reference_of(path, group, gt)
            mask = sitk.ReadImage(str(mask_path))
            labels = sitk.GetImageFromArray(reference_labels(sitk.GetArrayViewFromImage(mask), mask_path).astype(np.uint8))
            labels.CopyInformation(mask)
            centroids = (read_centroids(ctd_path, mask) if ctd_path else
                         {v: Geometry.of(mask).index_to_lps(ijk)
                          for v, ijk in mask_centroids(sitk.GetArrayViewFromImage(labels)).items()})
            for v, centre in sorted(centroids.items()):
                cut = _slab(image, mm, centre, lps_axis=2)
                axis = _axis_along(cut, 2)
                inside = [u for u, c in centroids.items()
                          if -0.5 <= cut.TransformPhysicalPointToContinuousIndex(c.tolist())[axis] < cut.GetSize()[axis] - 0.5]
                reference = _slab(labels, mm, centre, lps_axis=2)
                kept = sitk.GetArrayFromImage(reference)
                kept[~np.isin(kept, inside)] = 0
                reference = sitk.GetImageFromArray(kept)
                reference.CopyInformation(cut)
                if group == "CT":
                    name = f"{path.name[: -len('.nii.gz')]}-at{v}.nii.gz"
                    image_out, mask_out = root / f"images-{mm:g}mm" / name, short_gt / "real_ct" / "labelsTr" / name
                else:
                    stem = f"{path.name[: -len('_img.nii.gz')]}-at{v}"
                    image_out = root / f"images-{mm:g}mm" / f"{stem}_img.nii.gz"
                    mask_out = short_gt / "mri_lumbar_bodies" / f"{stem}_vert-verse.nii.gz"
                    mask_out.parent.mkdir(parents=True, exist_ok=True)
                    (mask_out.parent / f"{stem}_ctd.json").write_text(json.dumps(
                        [{"label": u, "world_lps_mm": centroids[u].tolist()} for u in sorted(inside)], indent=1))
                for target, volume in ((image_out, cut), (mask_out, reference)):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    sitk.WriteImage(volume, str(target))
                out_images[group].append(image_out)
                centred[image_out] = (v, mask_out)
    return out_images, short_gt, centred


def _label(images: list[Path], out: Path, model: Path | None) -> None:
    cmd = [sys.executable, "-m", "SpineLabelLib.cli", "label", *map(str, images), "-o", str(out), "--quiet",
           "--device", "cpu"]  # the figures are CPU ones, as the other benchmarks'
    if model:
        cmd += ["--model", str(model)]
    status = subprocess.run(cmd, check=False).returncode
    if status not in (0, 1):  # 1: some inputs failed, scored as missed; else it could not run or was killed
        raise SystemExit(f"spinelabel label did not finish (exit status {status}); see its message above. Nothing "
                         "was scored")


def _label_and_correct(copies: dict[Path, tuple[int, Path]], pred: Path, corrected: Path, model: Path | None
                       ) -> list[float]:
    """``--correct-one`` (module docstring): label each copy in this process into ``pred`` (a copy without vertebrae
    gets no outputs, as with ``spinelabel label``) and write into ``corrected`` the labelling after the one rename a
    user would make, which ``copies`` (copy -> label of the vertebra it is centred on, reference label map) decides.
    Returns the seconds of each rename."""
    from SpineLabelLib.edits import rename
    from SpineLabelLib.io import case_name, read_image
    from SpineLabelLib.pipeline import get_model, label_spine
    from SpineLabelLib.vertebrae import BY_LABEL
    from SpineLabelLib.writers import write_all

    loaded = get_model(model, device="cpu")
    seconds = []
    for path, (label, reference) in copies.items():
        image, name = read_image(path), case_name(path)  # read once, labelled as spinelabel label labels it
        result = label_spine(image, loaded)
        if not result.vertebrae:
            continue
        write_all(result, image, pred, name, input_path=path)
        under = result.components[sitk.GetArrayFromImage(sitk.ReadImage(str(reference))) == label]
        under = under[under > 0]
        vertebra = int(np.bincount(under).argmax()) if under.size else None
        wanted = BY_LABEL[label].name
        if vertebra is not None and result.by_id(vertebra).name != wanted:
            start = time.perf_counter()
            result = rename(result, vertebra, wanted)
            seconds.append(time.perf_counter() - start)
        write_all(result, image, corrected, name, input_path=path)
    return seconds


def _label_thick(images: dict[str, list[Path]], root: Path, pred: Path, mm: float | None, slab_mm: float | None,
                 model: Path | None) -> None:
    """Label thick-slice copies of the images (MRI sagittal, CT axial; ``_thick_slices``; voxels as they are without
    ``mm``), the MRI cut to a stack ``slab_mm`` wide (``_slab``), and bring their label maps back onto the original
    grids in ``pred``, beside their centroids and reports, for scoring against the unchanged references."""
    from SpineLabelLib.io import case_name

    tag = f"{mm or 0:g}mm-{slab_mm or 0:g}mm"
    thick, raw = root / f"thick-{tag}", root / f"pred-thick-{tag}"
    thick.mkdir(parents=True, exist_ok=True)
    originals, copies = {}, []
    for group, paths in images.items():
        for path in paths:
            copies.append(thick / path.name)
            image = sitk.ReadImage(str(path))
            copy = _thick_slices(image, 2 if group == "CT" else 0, mm) if mm else sitk.Cast(image, sitk.sitkFloat32)
            if slab_mm and group != "CT":
                copy = _slab(copy, slab_mm, _spine_centre(path, image))
            spacing = " x ".join(f"{v:g}" for v in copy.GetSpacing())
            print(f"{path.name}: copy of {copy.GetSize()} voxels at {spacing} mm (x, y, z)")
            sitk.WriteImage(copy, str(copies[-1]))
            originals[case_name(path)] = path
    _label(copies, raw, model)
    pred.mkdir(parents=True, exist_ok=True)
    for name, original in originals.items():
        if not (raw / f"{name}_seg.nii.gz").exists():
            continue  # not labelled: scored as a missing prediction
        seg = sitk.Resample(sitk.ReadImage(str(raw / f"{name}_seg.nii.gz")), sitk.ReadImage(str(original)),
                            sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(seg, str(pred / f"{name}_seg.nii.gz"))
        for suffix in ("_ctd.json", "_report.json"):
            (pred / f"{name}{suffix}").write_bytes((raw / f"{name}{suffix}").read_bytes())


def evaluate(args: argparse.Namespace) -> int:
    from SpineLabelLib.evaluation import evaluate_folders, summary_markdown
    from SpineLabelLib.io import case_name

    root = _workdir(args, "spinelabel-eval-")
    images, gt = (build_selection_set if args.selection else build_test_set)(root)
    pred = root / "pred"
    if args.length_mm:
        images, gt, centred = _short_copies(images, gt, root, args.length_mm)
    if args.slice_mm or args.slab_mm:
        _label_thick(images, root, pred, args.slice_mm, args.slab_mm, args.model)
    elif args.correct_one:
        seconds = _label_and_correct(centred, pred, root / "pred-corrected", args.model)
    else:
        _label([p for group in images.values() for p in group], pred, args.model)
    groups = {case_name(p): group for group, paths in images.items() for p in paths}
    bodies_only = {case_name(p): True for p in images.get("MR discs", [])}
    summary = evaluate_folders(pred, gt, out_json=root / "evaluation.json", out_md=root / "evaluation.md", groups=groups,
                               bodies_only=bodies_only)
    print(summary_markdown(summary))
    print(f"\nwritten: {root / 'evaluation.json'}, {root / 'evaluation.md'}")
    if args.correct_one:
        corrected = evaluate_folders(root / "pred-corrected", gt, out_json=root / "evaluation-corrected.json",
                                     out_md=root / "evaluation-corrected.md", groups=groups)
        print(f"\n# After one correction per copy\n\n{len(seconds)} of {len(centred)} copies renamed"
              + (f" (each rename {1e3 * np.median(seconds):.1f} ms median, {1e3 * max(seconds):.1f} ms at most)"
                 if seconds else "") + "\n")
        print(summary_markdown(corrected))
        print(f"\nwritten: {root / 'evaluation-corrected.json'}, {root / 'evaluation-corrected.md'}")
    if args.write_card:
        from SpineLabelLib.models import default_model_path

        card_path = args.model or default_model_path()
        card = json.loads(card_path.read_text())
        groups_out = {name: asdict(group) for name, group in summary.groups.items()}
        card["evaluation"] = {
            "command": "python benchmarks/real_data.py evaluate --write-card" + (f" --model {card_path}" if args.model else ""),
            "test_set": "real scans of ../shared/data never used in training: " + ", ".join(
                [*HOLDOUT_MRI, *HOLDOUT_FOLDERS]) + "; discs_mri, whose images are never trained on (its disc masks "
                "are disc shapes for synthesis), scored at the midpoints between its labelled discs",
            "groups": {name: {k: v for k, v in g.items() if not isinstance(v, list)} for name, g in groups_out.items()},
            "cases": [{"case": c.name, "group": c.group, "id_rate": c.id_rate, "shift": c.shift} for c in summary.cases],
        }
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"evaluation written into {card_path}")
    return 0


# Real MRI without vertebra masks, never trained on, whose levels the Spinal Cord Toolbox (SCT) labels: its PAM50 T2
# template (an average of whole-spine MRI) by its discs C1/C2 to T11/T12 (value n lies above vertebra n, 3 is
# C2/C3), and its small cervical T1 and T2 MRI of one subject in one frame: the T1 by the C2/C3 disc that its
# init_label_vertebrae.txt gives ("-initz SLICE,3": the slice counted from the feet), the T2 by points at the middle of
# the C3, C4 and C5 bodies, on the cord (t2_labeled_center_manual). The T2's own init file and level-labelled cord
# follow SCT's older disc numbering, one level lower (value 3 the C3/C4 disc), and are not read: its C3 point lies
# midway between the T1's C2/C3 disc and the next.
CERVICAL_SCT = DATA / "cervical_sct"
HALF_PITCH_MM = 9.0  # half a cervical pitch (C3-C6: 17.8-18.7 mm, sequence.PRIORS): a centroid's distance from a disc


def _points(path: Path) -> dict[int, np.ndarray]:
    """Value -> LPS mm of each labelled voxel of a point-label image."""
    labels = sitk.ReadImage(str(path))
    values = sitk.GetArrayFromImage(labels)
    return {int(values[tuple(i)]): np.array(labels.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]))
            for i in np.argwhere(values > 0)}


def _sct_references(image_path: Path) -> dict[str, np.ndarray]:
    """Reference centroids (level name -> LPS mm) of a ``CERVICAL_SCT`` image, of which only the head-feet
    coordinate is known (the points lie on the cord: the template's 13-21 mm behind the predicted body centres): on
    the template vertebra n at the midpoint of discs n and n + 1 (C2-T11); on the T2 MRI its mid-body points; on the
    T1 MRI, beside its one disc n, vertebrae n - 1 and n ``HALF_PITCH_MM`` above and below it."""
    from SpineLabelLib.vertebrae import LEVELS

    regular = [level.name for level in LEVELS if not level.transitional]  # regular[n - 1] is vertebra n
    if image_path.parent.name == "template":
        discs = _points(image_path.parent / "PAM50_small_label_disc.nii.gz")
        return {regular[n - 1]: (discs[n] + discs[n + 1]) / 2 for n in sorted(discs) if n + 1 in discs}
    centres = image_path.parent / "t2_labeled_center_manual.nii.gz"
    if centres.exists():
        return {regular[n - 1]: lps for n, lps in sorted(_points(centres).items())}
    slice_, value = map(int, (image_path.parent / "init_label_vertebrae.txt").read_text().split()[1].split(","))
    image = sitk.ReadImage(str(image_path))
    axis = _axis_along(image, 2)  # SCT counts slices from the feet along the image's head-feet axis
    upward = np.array(image.GetDirection()).reshape(3, 3)[:, axis]
    index = [0] * 3
    index[axis] = slice_ if upward[2] > 0 else image.GetSize()[axis] - 1 - slice_
    disc = np.array(image.TransformIndexToPhysicalPoint(index)) * [0, 0, 1]
    head = np.array([0.0, 0.0, HALF_PITCH_MM])
    return {regular[value - 2]: disc + head, regular[value - 1]: disc - head}


def cervical(args: argparse.Namespace) -> int:
    """Label the ``CERVICAL_SCT`` images and score their names against ``_sct_references`` (VerSe identification)."""
    from SpineLabelLib.evaluation import ID_RADIUS_MM
    from SpineLabelLib.io import case_name

    root = _workdir(args, "spinelabel-cervical-")
    images = [CERVICAL_SCT / "template" / "template" / "PAM50_small_t2.nii.gz", CERVICAL_SCT / "t1" / "t1w.nii.gz",
              CERVICAL_SCT / "t2" / "t2.nii.gz"]
    _label(images, root, args.model)
    total = found = 0
    for image in images:
        reference = _sct_references(image)
        ctd = root / f"{case_name(image)}_ctd.json"
        predicted = [(e["name"], np.array(e["world_lps_mm"])) for e in
                     (json.loads(ctd.read_text())[1:] if ctd.exists() else [])]
        named = []
        for name, lps in reference.items():
            distance = [float(abs(p[2] - lps[2])) for _, p in predicted]  # head-feet: the references lie on the cord
            closest = int(np.argmin(distance)) if predicted else None
            hit = closest is not None and distance[closest] <= ID_RADIUS_MM
            named.append(f"{name}:{predicted[closest][0] if hit else '-'}")
            found += hit and predicted[closest][0] == name
        total += len(reference)
        print(f"{image.name}: {' '.join(named) if predicted else 'no vertebrae'} (reference:closest label within "
              f"{ID_RADIUS_MM:g} mm head-feet)")
    print(f"identified {found} of {total} reference vertebrae")
    return 0


def is_test_image(path: Path) -> bool:
    """Whether a file under ``DATA`` belongs to the development test set that ``evaluate`` scores (the held-out cases
    and the ``discs_mri`` images): a threshold placed on real scans should be placed without these."""
    rel = path.relative_to(DATA)
    return rel.parts[0] in (*HOLDOUT_FOLDERS, "discs_mri") or path.name.startswith(_HOLDOUT_MRI_PREFIXES)


def training_view(root: Path) -> Path:
    """A copy of ``../shared/data`` made of symbolic links, without the held-out cases, plus ``real_ct/``: the
    training CT in nnU-Net layout with VerSe labels."""
    from SpineLabelLib.export import dataset_labels

    view = root / "training_data"
    for path in sorted(DATA.rglob("*")):
        rel = path.relative_to(DATA)
        if path.is_dir() or rel.parts[0] in HOLDOUT_FOLDERS or path.name.startswith(_HOLDOUT_MRI_PREFIXES):
            continue
        if rel.parts[0] == "discs_mri" and not path.name.endswith("_instance.nii.gz"):
            continue  # scored as never trained on: only the disc masks may shape the synthetic discs
        _link(path, view / rel)
    for name, (image, _) in TRAINING_CT.items():
        _link(DATA / image, view / "real_ct" / "imagesTr" / f"{name}_0000.nii.gz")
        _training_ct_labels(name, view / "real_ct" / "labelsTr")
    # what its label values mean, as an export says it (training refuses a labelsTr/ without it)
    (view / "real_ct" / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": dataset_labels(), "numTraining": len(TRAINING_CT),
        "file_ending": ".nii.gz"}, indent=2) + "\n", encoding="utf-8")
    return view


def train(args: argparse.Namespace, extra: list[str]) -> int:
    view = training_view(_workdir(args, "spinelabel-train-"))
    cmd = [sys.executable, "-m", "SpineLabelLib.cli", "train", "--out", str(args.out),
           "--data", "synthetic:0.52", "--data", f"{view / 'mri_lumbar_bodies'}:0.26",
           "--data", f"{view / 'real_ct'}:0.13", "--data", "phantom:0.04", "--data", "negative:0.05",
           "--data-dir", str(view), *extra]
    print(" ".join(cmd))
    return subprocess.run(cmd).returncode


def pitches(args: argparse.Namespace) -> int:
    from SpineLabelLib.vertebrae import BY_LABEL, LEVELS, level_index

    view = training_view(_workdir(args, "spinelabel-pitch-"))
    regular = [lv.label for lv in LEVELS if not lv.transitional]
    gaps: dict[int, list[float]] = {}
    for path in sorted(view.glob("masks_verse/*_msk.nii.gz")) + sorted(view.glob("mri_lumbar_bodies/*_vert-verse.nii.gz")):
        image = sitk.ReadImage(str(path))
        labels = sitk.GetArrayFromImage(image)
        centroid = {}
        for value in np.unique(labels):
            if int(value) in regular:
                index = np.argwhere(labels == value).mean(axis=0)[::-1]
                centroid[int(value)] = np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
        for upper, lower in zip(regular, regular[1:]):
            if upper in centroid and lower in centroid:
                gaps.setdefault(upper, []).append(float(np.linalg.norm(centroid[upper] - centroid[lower])))
    for label in sorted(gaps, key=level_index):
        values = np.array(gaps[label])
        print(f"{BY_LABEL[label].name:>4} to next: {values.mean():5.1f} mm (sd {values.std():.1f}, {values.size} scans)")
    return 0


def _positive_mm(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: a length in mm above 0")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on synthetic + real data minus the held-out cases (extra args go to spinelabel train)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, help="where the view of the training data is made")
    p = sub.add_parser("evaluate", help="label the held-out real scans and score them")
    p.add_argument("--model", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--write-card", action="store_true", help="record the scores in the model card's evaluation entry")
    p.add_argument("--selection", action="store_true",
                   help="score the training MRI and CT instead (the set model choices are made on), not the held-out scans")
    p.add_argument("--slice-mm", type=_positive_mm, metavar="MM",
                   help="label thick-slice copies instead: MRI averaged into MM-thick sagittal slices, CT into MM-thick "
                        "axial slices; scored on the original grids")
    p.add_argument("--slab-mm", type=_positive_mm, metavar="MM",
                   help="cut the MRI copies to a sagittal stack MM wide left to right, centred on the spine")
    p.add_argument("--length-mm", type=_positive_mm, metavar="MM",
                   help="with --selection: label short copies, MM along head-feet, one centred on each reference vertebra")
    p.add_argument("--correct-one", action="store_true",
                   help="with --length-mm: also score each copy after renaming the vertebra it is centred on to its "
                        "reference name where it is named otherwise, as a user correcting it would")
    p = sub.add_parser("cervical", help="label the cervical MRI of the Spinal Cord Toolbox and score their names "
                                      "against its level labels")
    p.add_argument("--model", type=Path)
    p.add_argument("--workdir", type=Path)
    p = sub.add_parser("pitches", help="centroid distances between consecutive levels in the training label maps")
    p.add_argument("--workdir", type=Path)
    args, extra = parser.parse_known_args()
    if extra and args.command != "train":  # only train passes options on (to spinelabel train)
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if args.command == "evaluate":
        if args.length_mm and (not args.selection or args.slice_mm or args.slab_mm):
            parser.error("--length-mm goes with --selection only, without --slice-mm or --slab-mm")
        if args.correct_one and not args.length_mm:
            parser.error("--correct-one goes with --length-mm")
        if args.write_card and (args.selection or args.slice_mm or args.slab_mm):
            parser.error("--write-card records the held-out scores as stored: not with --selection, --slice-mm or "
                         "--slab-mm")
    if not DATA.is_dir():
        print(f"{DATA}: real data folder not found", file=sys.stderr)
        return 2
    return {"train": lambda: train(args, extra), "evaluate": lambda: evaluate(args), "cervical": lambda: cervical(args),
            "pitches": lambda: pitches(args)}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
