"""Reading and checking inputs, the model grid in any orientation, and atomic writes."""

import bz2
import gzip
import itertools
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SpineLabelLib import io
from SpineLabelLib.io import (InputError, atomic_path, atomic_paths, canonical_grid, case_name, checked_image,
                              itk_warnings, read_image, read_label_map, read_notes, resample_to_grid)
from SpineLabelLib.result import Geometry


def oriented_image(direction, size=(20, 24, 30), spacing=(1.0, 1.5, 2.0)):
    """A test volume whose value encodes the LPS position, on a grid with the given direction."""
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetDirection([float(x) for x in np.asarray(direction, float).ravel()])
    img.SetOrigin((10.0, -20.0, 30.0))
    idx = np.indices(size[::-1]).reshape(3, -1)[::-1].T  # (i, j, k)
    d = np.asarray(direction, float).reshape(3, 3)
    lps = np.asarray(img.GetOrigin()) + (idx * spacing) @ d.T
    arr = (lps @ np.array([1.0, 10.0, 100.0])).reshape(size[::-1]).astype(np.float32)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            d = np.zeros((3, 3))
            for col, (row, s) in enumerate(zip(perm, signs)):
                d[row, col] = s
            yield d


@pytest.mark.parametrize("direction", list(signed_permutations())[::5])
def test_canonical_grid_is_lps_aligned_and_round_trips(direction):
    img = oriented_image(direction)
    grid = canonical_grid(img, 2.0)
    assert np.allclose(np.asarray(grid.GetDirection()).reshape(3, 3), np.eye(3))
    on_grid = sitk.GetArrayFromImage(resample_to_grid(img, grid))
    # value = x + 10 y + 100 z in LPS mm: increasing along each array axis as LPS says (z->S, y->P, x->L)
    inside = on_grid != 0
    assert np.all(np.diff(on_grid, axis=2)[inside[:, :, 1:] & inside[:, :, :-1]] > 0)
    assert np.all(np.diff(on_grid, axis=1)[inside[:, 1:] & inside[:, :-1]] > 0)
    assert np.all(np.diff(on_grid, axis=0)[inside[1:] & inside[:-1]] > 0)
    labels = sitk.Cast(img > float(np.median(sitk.GetArrayViewFromImage(img))), sitk.sitkUInt8)
    back = resample_to_grid(resample_to_grid(labels, canonical_grid(img, 1.0), label=True), img, label=True)
    assert back.GetSize() == img.GetSize() and back.GetDirection() == img.GetDirection()
    agree = (sitk.GetArrayFromImage(back) == sitk.GetArrayFromImage(labels)).mean()
    assert agree > 0.97


def put(path, data):
    path.write_bytes(data)
    return path


def write(tmp_path, name, image):
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def test_reads_each_format(tmp_path):
    img = oriented_image(np.eye(3))
    for name in ("a.nii.gz", "b.nii", "c.nrrd", "d.mha", "e.mhd"):
        out = read_image(write(tmp_path, name, img))
        assert out.GetSize() == img.GetSize()
    assert case_name(tmp_path / "a.nii.gz") == "a" and case_name(tmp_path / "c.nrrd") == "c"


def test_reads_metaimage_and_cosines_of_few_decimals_whatever_the_case_of_the_suffix(tmp_path):
    """ITK knows MetaImage's suffixes in lower case only; direction cosines written with three decimals (an oblique
    grid's, not quite orthonormal) are taken as they are, and a 5 degree shear is still refused."""
    img = oriented_image(np.eye(3))
    for name in ("A.MHA", "B.Mhd", "C.NRRD"):  # written in lower case (ITK's writers too know no other), renamed
        path = write(tmp_path, name.lower(), img).rename(tmp_path / name)
        assert read_image(path).GetSize() == img.GetSize()
    turn = np.deg2rad(17)
    rounded = np.round([np.cos(turn), -np.sin(turn), 0, np.sin(turn), np.cos(turn), 0, 0, 0, 1], 3)
    img.SetDirection([float(x) for x in rounded])
    for name in ("r.mha", "r.nrrd"):
        out = read_image(write(tmp_path, name, img))
        assert np.allclose(out.GetDirection(), rounded, atol=2e-3)  # as written (NRRD) or straightened by ITK (.mha)
        geometry = Geometry.of(out)
        ijk = np.array([3.0, 4.0, 5.0])
        assert np.allclose(geometry.lps_to_index(geometry.index_to_lps(ijk)), ijk)
    lean = np.deg2rad(5)
    img.SetDirection((1, np.sin(lean), 0, 0, np.cos(lean), 0, 0, 0, 1))
    with pytest.raises(InputError, match="not perpendicular"):
        read_image(write(tmp_path, "lean.mha", img))


def test_reads_a_volume_stored_as_one_time_point(tmp_path):
    img = oriented_image(np.eye(3))
    for name, reader in itertools.product(("a.nrrd", "b.mha"), (read_image, read_label_map)):
        out = reader(write(tmp_path, name, sitk.JoinSeries([sitk.Cast(img, sitk.sitkUInt8)])))  # 4D, fourth size 1
        assert out.GetDimension() == 3 and out.GetSize() == img.GetSize()
        assert np.allclose(out.GetOrigin(), img.GetOrigin()) and np.allclose(out.GetDirection(), img.GetDirection())
        assert np.allclose(out.GetSpacing(), img.GetSpacing())


def test_reads_nifti2_with_the_geometry_of_nifti1(tmp_path):
    """ITK reads NIfTI-1 only; a NIfTI-2 file (nibabel's reader) comes back with the same voxels, type and geometry
    as the same volume stored as NIfTI-1 (ITK's reader), on an oblique anisotropic grid."""
    turn = sitk.Euler3DTransform((0, 0, 0), 0.2, -0.35, 0.5).GetMatrix()
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(turn, (3, 3)) @ np.diag([0.8, 0.9, 3.0])
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    voxels = np.random.default_rng(0).integers(0, 2000, (20, 21, 22)).astype(np.int16)  # (i, j, k)
    for kind, name in ((nibabel.Nifti1Image, "one.nii.gz"), (nibabel.Nifti2Image, "two.nii.gz"), (nibabel.Nifti2Image, "two.nii")):
        nibabel.save(kind(voxels, affine), tmp_path / name)
    one = read_image(tmp_path / "one.nii.gz")
    for two in (read_image(tmp_path / "two.nii.gz"), read_image(tmp_path / "two.nii"), read_label_map(tmp_path / "two.nii")):
        assert two.GetPixelID() == one.GetPixelID() and two.GetSize() == one.GetSize()
        assert np.array_equal(sitk.GetArrayViewFromImage(two), sitk.GetArrayViewFromImage(one))
        for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
            assert np.allclose(get(two), get(one))


@pytest.mark.parametrize("voxels, reason", [(np.ones((5, 6, 7, 2), np.float32), "4D image"),
                                            (np.full((5, 6, 7), np.nan, np.float32), "NaN"),
                                            (np.ones((5, 6, 7), np.int16), "truncated")])
def test_bad_nifti2_names_file_and_reason(tmp_path, voxels, reason):
    path = tmp_path / "two.nii"
    nibabel.save(nibabel.Nifti2Image(voxels, np.eye(4)), path)
    if reason == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match=f"{path}: .*{reason}"):
        read_image(path)


def test_odd_nifti2_and_corrupt_headers_name_file_and_reason(tmp_path):
    rgb = np.zeros((4, 5, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for name, voxels, reason in (("rgb.nii", rgb, "not a 3D scalar"), ("line.nii", np.ones(10, np.int16), "1D"),
                                 ("six.nii", np.ones((3, 3, 3, 1, 2, 2), np.int16), "6D")):
        nibabel.save(nibabel.Nifti2Image(voxels, np.eye(4)), tmp_path / name)
        for reader in (read_image, read_label_map):
            with pytest.raises(InputError, match=f"{name}: .*{reason}"):
                reader(tmp_path / name)
    path = tmp_path / "nan_offset.nii"  # a NIfTI-1 header whose voxel offset is NaN
    nibabel.save(nibabel.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), path)
    data = bytearray(path.read_bytes())
    data[108:112] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="nan_offset.nii: unreadable image"):
        read_image(path)


def test_nifti2_without_qform_or_sform_reads_as_itk_reads_nifti1(tmp_path):
    """Without either transform nibabel makes up an affine of its own (j flipped, centred); ITK takes pixdim spacing,
    origin 0 and the identity direction, and a NIfTI-2 copy must come back on the same grid as the NIfTI-1."""
    voxels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    for kind, name in ((nibabel.Nifti1Image, "one.nii"), (nibabel.Nifti2Image, "two.nii")):
        image = kind(voxels, None)
        image.header.set_zooms((2.0, 3.0, 4.0))
        image.header.set_qform(None, code=0)
        image.header.set_sform(None, code=0)
        nibabel.save(image, tmp_path / name)
    one, two = read_image(tmp_path / "one.nii"), read_image(tmp_path / "two.nii")
    assert np.array_equal(sitk.GetArrayViewFromImage(two), sitk.GetArrayViewFromImage(one))
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        assert np.allclose(get(two), get(one)), get.__name__
    assert two.GetSpacing() == (2.0, 3.0, 4.0)


def test_float_nifti_with_bytes_after_its_voxels_is_read(tmp_path):
    """Bytes after the voxels (some writers append them) are not voxels: the NaN test stops at the voxels' end."""
    path = tmp_path / "tail.nii"
    nibabel.save(nibabel.Nifti1Image(np.ones((6, 7, 8), np.float32), np.eye(4)), path)
    path.write_bytes(path.read_bytes() + b"\xff\xff\xff\xff")  # a NaN, were it a voxel
    assert sitk.GetArrayViewFromImage(read_image(path)).max() == 1.0


@pytest.mark.parametrize("dtype, version", [("<f4", 1), (">f8", 2)])
def test_nan_in_a_compressed_float_nifti_is_found_as_its_stream_is_inflated(tmp_path, monkeypatch, dtype, version):
    """The voxels of a .nii.gz are checked for NaN and infinities as its stream is inflated beside the reader, in
    pieces that end within a voxel (here pieces of 1000 bytes at most, and fewer where the compressed bytes read run
    out): a value split between two pieces is found, and the bytes after the voxels are none."""
    monkeypatch.setattr(io, "_PIECE", 1000)
    kind = nibabel.Nifti1Image if version == 1 else nibabel.Nifti2Image
    values = np.random.default_rng(0).normal(size=(9, 10, 11)).astype(dtype)
    path = tmp_path / "float.nii.gz"
    nibabel.save(kind(values, np.eye(4)), path)
    path.write_bytes(path.read_bytes() + gzip.compress(b"\xff" * 16))  # a second member, after the voxels: no NaN
    assert read_image(path).GetSize() == (9, 10, 11)
    for index, value in ((0, np.nan), (values.size // 2, np.inf), (values.size - 1, -np.inf), (257, np.nan)):
        bad = values.copy()
        bad.flat[index] = value
        nibabel.save(kind(bad, np.eye(4)), path)
        with pytest.raises(InputError, match=f"{path}: image holds NaN or infinite values"):
            read_image(path)


@pytest.mark.parametrize("voxels, slope, scaling", [
    (np.int16, 1e38, "; its header scales the stored values by 1e+38 (scl_slope) and adds 0 (scl_inter)"),
    (np.float64, None, ""),  # a value beyond float32 as stored
])
def test_values_beyond_float32_after_a_nifti_s_scaling_name_the_scaling(tmp_path, voxels, slope, scaling):
    """ITK applies the header's scaling as it reads: int16 voxels scaled by 1e38 came back infinite, and the message
    named NaN or float64 values alone, which the file does not hold."""
    values = np.full((20, 20, 20), 100, voxels)
    values[0, 0, 0] = 30000 if slope else 1e300
    nii = nibabel.Nifti1Image(values, np.eye(4))
    nii.header.set_slope_inter(slope, None if slope is None else 0.0)
    nibabel.save(nii, tmp_path / "scaled.nii")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'scaled.nii'}: image holds NaN or infinite values "
                                                   f"(or float64 values beyond float32){scaling}") + "$"):
        read_image(tmp_path / "scaled.nii")


def sheared() -> sitk.Image:
    """An image whose second axis leans 20 degrees towards its first (a tilted-gantry grid)."""
    image = sitk.Image([8, 8, 8], sitk.sitkInt16)
    lean = np.deg2rad(20)
    image.SetDirection((1, np.sin(lean), 0, 0, np.cos(lean), 0, 0, 0, 1))
    return image


def spaced(spacing_mm: float) -> sitk.Image:
    """A 64 x 64 x 40 image at ``spacing_mm``: a lumbar spine's view with its spacing in micrometres or metres."""
    image = sitk.Image([64, 64, 40], sitk.sitkInt16)
    image.SetSpacing([spacing_mm] * 3)
    return image


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p / "missing.nii.gz", "no such file"),
        (lambda p: put(p / "x.txt", b"hi"), "unsupported file type"),
        (lambda p: put(p / "bad.nii.gz", b"\x1f\x8b garbage"), "unreadable"),
        (lambda p: put(p / "empty.nii.gz", gzip.compress(b"")), "0 bytes: too short for a NIfTI header"),
        (lambda p: put(p / "packed.nii", gzip.compress(b"x" * 400)), "named without .gz"),
        (lambda p: write(p, "flat.nii.gz", sitk.Image([16, 16], sitk.sitkInt16)), "2D image"),
        (lambda p: write(p, "four.nii.gz", sitk.Image([4, 4, 4, 3], sitk.sitkInt16)), "4D image"),
        (lambda p: write(p, "rgb.nii.gz", sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3)), "RGB"),
        (lambda p: write(p, "slice.nii.gz", sitk.Image([8, 8, 1], sitk.sitkInt16)),
         "of 8 x 8 x 1 voxels is a single slice"),
        (lambda p: write(p, "nan.mha", sitk.GetImageFromArray(np.full((4, 4, 4), np.nan, np.float32))), "NaN"),
        (lambda p: write(p, "nan.nii.gz", sitk.GetImageFromArray(np.full((4, 4, 4), np.nan, np.float32))), "NaN"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no DICOM series"),
        (lambda p: os.mkfifo(p / "pipe.nii.gz") or p / "pipe.nii.gz", "not a file (a pipe"),  # read for ever
        (lambda p: write(p, "sheared.nrrd", sheared()), "not perpendicular"),
        (lambda p: write(p, "micron.nrrd", spaced(0.001)), "cannot be a scan of a body; are the spacing's units"),
        (lambda p: write(p, "metre.nrrd", spaced(1000.0)), "cannot be a scan of a body; are the spacing's units"),
        (lambda p: write(p, "cm.nrrd", spaced(20.0)), "1.28e+03 x 1.28e+03 x 800 mm (spacing 20 x 20 x 20 mm)"),
    ],
)
def test_bad_inputs_name_file_and_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        read_image(path)
    assert str(path) in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("header, data", [("a.mhd", "a.raw"), ("b.nhdr", "b.raw")])
def test_a_header_whose_data_file_is_missing_says_so(tmp_path, header, data):
    """ITK said only that the header could not be read."""
    write(tmp_path, header, sitk.Image([8, 8, 8], sitk.sitkInt16))
    assert read_image(tmp_path / header).GetSize() == (8, 8, 8)
    (tmp_path / data).unlink()
    with pytest.raises(InputError, match=f"{header}: its voxels are in {tmp_path / data}, which is missing"):
        read_image(tmp_path / header)


def test_a_plain_nifti_named_nii_gz_is_read(tmp_path):
    """ITK reads it; the header check took it for gzip by its name and refused it ('Not a gzipped file')."""
    write(tmp_path, "plain.nii", sitk.Image([8, 8, 8], sitk.sitkInt16)).rename(tmp_path / "plain.nii.gz")
    assert read_image(tmp_path / "plain.nii.gz").GetSize() == (8, 8, 8)


_NRRD_SPACE = rb"space: [^\n]*\n(.*)space directions: [^\n]*\n(.*)space origin: [^\n]*\n"


@pytest.mark.parametrize("name, old, new, reason", [
    ("a.nrrd", _NRRD_SPACE, rb"\1spacings: 1 1.5 2\n\2", "no space directions"),  # spacings alone, as in older files
    ("a.nhdr", _NRRD_SPACE, rb"\1spacings: 1 1.5 2\n\2", "no space directions"),
    ("a.mha", rb"TransformMatrix = [^\n]*\n", b"", "no TransformMatrix"),
    ("four.nrrd", rb"space directions: [^\n]*\n", b"", "no space directions"),  # a volume as a 4D file's time point
    ("four.mha", rb"TransformMatrix = [^\n]*\n", b"", "no TransformMatrix"),
])
def test_a_nrrd_or_metaimage_whose_header_gives_no_orientation_is_read_with_a_warning(tmp_path, name, old, new,
                                                                                      reason):
    """ITK reads such a header along the axes of its voxel array without a word, where a NIfTI without a qform or an
    sform has the warning; a label map has no notes."""
    image = oriented_image(np.eye(3))
    if name.startswith("four"):
        image = sitk.JoinSeries([image])
    path = write(tmp_path, name, image)
    path.write_bytes(re.sub(old, new, path.read_bytes(), count=1, flags=re.DOTALL))
    assert read_notes(read_image(path)) == [f"its header gives no orientation ({reason}), so it was read with the "
                                            "axes of its voxel array: if the vertebrae come out in the wrong order, "
                                            "or none, correct the header"]
    assert read_notes(read_label_map(path)) == []
    write(tmp_path, "oriented" + path.suffix, oriented_image(np.eye(3)))
    assert read_notes(read_image(tmp_path / ("oriented" + path.suffix))) == []


@pytest.mark.parametrize("name, edit, surplus, needed", [
    ("a.mhd", lambda path: path.with_suffix(".raw").open("ab").write(b"\0" * 20 * 24 * 2), 960, 28800),  # a slice more
    ("a.nrrd", lambda path: path.open("ab").write(b"\0" * 20 * 24 * 2), 960, 28800),
    ("a.mha", lambda path: path.write_bytes(path.read_bytes().replace(b"MET_SHORT", b"MET_UCHAR")), 14400, 14400),
    ("a.nhdr", lambda path: path.write_bytes(path.read_bytes().replace(b"sizes: 20 24 30", b"sizes: 20 24 29")), 960,
     27840),
    ("b.mha", lambda path: path.open("ab").write(b"\0" * 959), None, None),  # less than a slice: appended, no note
])
def test_a_file_holding_a_slice_or_more_beyond_its_voxels_is_read_with_a_warning(tmp_path, name, edit, surplus, needed):
    """ITK read the voxels its header gives and left the rest without a word: a header whose slice count is short, or
    that gives int16 voxels as uint8, read another image."""
    path = write(tmp_path, name, sitk.Cast(oriented_image(np.eye(3)), sitk.sitkInt16))
    edit(path)
    holds = "the file holds" if name.endswith(("nrrd", "mha")) else f"its voxels file {path.with_suffix('.raw')} holds"
    assert read_notes(read_image(path)) == ([] if surplus is None else [
        f"{holds} {surplus} bytes beyond the {needed} of the voxels its header gives (a slice or more, left unread): "
        "if the header's size or voxel type is wrong, the image was read wrong"])
    assert read_notes(read_label_map(path)) == []


@pytest.mark.parametrize("name, compressed, reason", [
    ("t.nii", False, r"truncated file \(\d+ of \d+ bytes\)"),
    ("t.nii.gz", True, "truncated or corrupt compressed file"),
    ("t.nrrd", False, r"truncated file \(\d+ of \d+ bytes\)"),
    ("t.nrrd", True, "truncated or corrupt compressed file"),
    ("t.mha", False, r"truncated file \(\d+ of \d+ bytes\)"),
    ("t.mha", True, r"truncated file \(\d+ of \d+ bytes\)"),  # MetaImage's header gives its compressed size
    ("t.mhd", False, r"its voxels file .*t\.raw is truncated \(\d+ of \d+ bytes\)"),
    ("t.nhdr", False, r"its voxels file .*t\.raw is truncated \(\d+ of \d+ bytes\)"),
])
def test_a_truncated_file_is_named_truncated_and_the_readers_print_nothing(tmp_path, capfd, name, compressed, reason):
    """NRRD and MetaImage files cut short were "unreadable image (ITK ERROR: MetaImageIO: File cannot be read ...)" or
    "(... NrrdImageIO: Read: Error reading ...)", after MetaIO's own lines ("M_ReadElementsData: data not read
    completely"), where a NIfTI was said to be truncated."""
    path = tmp_path / name
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (30, 24, 20), dtype=np.int16))
    sitk.WriteImage(image, str(path), useCompression=compressed)
    voxels = tmp_path / "t.raw" if name.endswith(("mhd", "nhdr")) else path
    data = voxels.read_bytes()
    voxels.write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    with pytest.raises(InputError, match=f"{re.escape(str(path))}: {reason}$"):
        read_image(path)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("offset, value, reason", [
    (345, b"x", r"corrupt NIfTI header: it lacks NIfTI's mark \('n\+1' at byte 344, found b'nx1\\x00'\)"),
    (70, struct.pack("<h", 999), "corrupt NIfTI header: datatype 999 is none of NIfTI's"),
    (108, struct.pack("<f", 348.0),
     r"corrupt NIfTI header: its voxel offset \(vox_offset 348\) lies within the header"),
])
def test_a_damaged_nifti_header_is_refused_with_its_reason(tmp_path, capfd, offset, value, reason):
    """ITK read a NIfTI-1 file whose mark ("n+1") had one byte damaged as Analyze 7.5: at the origin, along the voxel
    array's axes, without a word; a datatype code NIfTI has not was "unreadable image (ITK ERROR: ... is not
    recognized as a NIFTI file)" after the NIfTI library's "bad datatype" on stderr; a voxel offset inside the header
    was read from there, its voxels shifted, after "vox offset 348 too low" on stderr."""
    path = tmp_path / "a.nii"
    image = sitk.GetImageFromArray(np.arange(8 * 8 * 8, dtype=np.int16).reshape(8, 8, 8))
    image.SetOrigin((-30.0, 20.0, -100.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(data)
    capfd.readouterr()
    with pytest.raises(InputError, match=f"{re.escape(str(path))}: {reason}"):
        read_image(path)
    assert capfd.readouterr().err == ""


def test_a_nifti_whose_sform_is_degenerate_is_read_by_its_qform(tmp_path):
    """An sform with one axis along another (a damaged srow) beside a qform: the check of the two forms raised
    "TypeError: sequence item 1: expected str instance, NoneType found" (nibabel names no axis code for it)."""
    path = tmp_path / "a.nii"
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    sform = affine.copy()
    sform[:3, 1] = [1.0, 0.0, 0.0]
    nii = nibabel.Nifti1Image(np.zeros((8, 8, 8), np.int16), affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(sform, code=1)
    nibabel.save(nii, path)
    assert read_image(path).GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("name", ["t.nii.gz", "t.nrrd", "t.mha"])
def test_a_damaged_compressed_file_is_refused_not_read_with_other_voxels(tmp_path, capfd, name):
    """ITK inflates a gzip or zlib stream without checking it: 16 bytes zeroed in the middle of a compressed file gave
    half its voxels other values without a word (MetaIO printed "Uncompress failed", or nothing)."""
    path = tmp_path / name
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (30, 24, 20), dtype=np.int16))
    sitk.WriteImage(image, str(path), useCompression=True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    path.write_bytes(data)
    capfd.readouterr()
    with pytest.raises(InputError, match=f"{re.escape(str(path))}: truncated or corrupt compressed file$"):
        read_image(path)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("name, field", [("t.nrrd", rb"(sizes: \d+ \d+ )(\d+)"),
                                         ("t.mha", rb"(DimSize = \d+ \d+ )(\d+)")])
def test_a_compressed_file_whose_header_gives_another_size_is_refused(tmp_path, name, field):
    """A compressed NRRD or MetaImage whose header gives one slice fewer (or more) than its voxels was read as an
    image of that many slices, the rest of the voxels dropped (or made up), without a word."""
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 24, 20), np.int16)), str(path), useCompression=True)
    for slices in (29, 31):
        path.write_bytes(re.sub(field, rb"\g<1>" + str(slices).encode(), path.read_bytes(), count=1))
        with pytest.raises(InputError, match=re.escape(f"{path}: its header gives voxels of {960 * slices} bytes, "
                                                       "and its compressed voxels inflate to 28800 bytes: the header's "
                                                       "size or pixel type is wrong") + "$"):
            read_image(path)


def test_a_gzip_nifti_of_several_members_or_with_bytes_after_them_is_read(tmp_path):
    """Gzip members one after another are one stream (as parallel compressors write them), and bytes after the last
    that begin none are no part of it: each such file is read with the voxels of the file it was made from."""
    voxels = np.random.default_rng(0).integers(-1000, 1000, (30, 24, 20), dtype=np.int16)
    write(tmp_path, "plain.nii", sitk.GetImageFromArray(voxels))
    data = (tmp_path / "plain.nii").read_bytes()
    (tmp_path / "members.nii.gz").write_bytes(b"".join(gzip.compress(data[i : i + 5000])
                                                       for i in range(0, len(data), 5000)))
    (tmp_path / "tail.nii.gz").write_bytes(gzip.compress(data) + b"\0" * 100)
    for name in ("members.nii.gz", "tail.nii.gz"):
        assert np.array_equal(sitk.GetArrayFromImage(read_image(tmp_path / name)), voxels)


def test_a_nifti_whose_qform_and_sform_disagree_is_read_with_a_warning(tmp_path):
    """A header whose two forms point the spine different ways numbers it from the wrong end; the reader says so and
    names the form it followed (ITK takes the sform, unless the sform is not orthonormal), and the note reaches the
    labelling's warnings. A label map (read for evaluation) gets no such note."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    flipped = affine @ np.diag([1.0, 1.0, -1.0, 1.0])
    sheared = flipped.copy()
    sheared[0, 1] = 0.4  # not orthonormal: ITK falls back on the qform
    for name, qform, sform, note in (
        ("agree.nii.gz", affine, affine, None),
        ("flipped.nii.gz", flipped, affine, "its qform and sform disagree (axes toward RAI and RAS), and it was read "
                                            "by the sform: if the vertebrae come out in the wrong order, correct the "
                                            "header"),
        ("degenerate.nii.gz", flipped, affine * [[1], [1], [0], [1]], None),  # an sform that points nowhere
        ("sheared.nii.gz", affine, sheared, "it was read by the qform"),
    ):
        nii = nibabel.Nifti1Image(np.zeros((20, 20, 20), np.int16), None)
        nii.set_sform(sform, code=1)
        nii.set_qform(qform, code=1)
        nibabel.save(nii, tmp_path / name)
        image = read_image(tmp_path / name)
        assert read_notes(image) == [] if note is None else note in read_notes(image)[0], name
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.diag([-1.0, -1.0, 1.0]))  # the qform, in LPS
    assert read_notes(read_label_map(tmp_path / "flipped.nii.gz")) == []
    # an image read along neither form (not seen from ITK or nibabel, which follow one): said in words
    across = sitk.Image([20, 20, 20], sitk.sitkInt16)
    across.SetDirection([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0])
    assert "disagree (axes toward RAI and RAS), and it was read by neither of them: if" in io._forms_note(
        tmp_path / "flipped.nii.gz", across)
    turned = sitk.Image([20, 20, 20], sitk.sitkInt16)  # turned 45 degrees: equal forms whose nearest axes are a tie
    c = np.cos(np.radians(45.0))
    turned.SetDirection([c, -c, 0.0, c, c, 0.0, 0.0, 0.0, 1.0])
    sitk.WriteImage(turned, str(tmp_path / "turned.nii.gz"))
    assert read_notes(read_image(tmp_path / "turned.nii.gz")) == []
    for shape in ((20, 20, 20), (20, 20, 20, 1)):  # codes 0; a volume as a 4D file's one time point too
        nibabel.save(nibabel.Nifti1Image(np.zeros(shape, np.int16), None), tmp_path / "none.nii.gz")
        assert "its header gives no orientation" in read_notes(read_image(tmp_path / "none.nii.gz"))[0]
    sitk.WriteImage(read_image(tmp_path / "flipped.nii.gz"), str(tmp_path / "copy.nrrd"))  # NRRD keeps the key
    assert read_notes(read_image(tmp_path / "copy.nrrd")) == []  # but a note speaks of the file it was made for


def test_nibabel_s_complaint_about_a_header_is_logged_not_printed(tmp_path, caplog, monkeypatch):
    """nibabel's own handler printed it on stderr, and the log printed it again: twice on the command line."""
    nii = nibabel.Nifti2Image(np.zeros((20, 20, 20), np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))  # nibabel reads it
    nii.header["pixdim"][1:4] = [-2.0, 2.0, 2.0]
    nibabel.save(nii, tmp_path / "negative.nii.gz")
    printed = logging.Handler()
    printed.emit = lambda record: pytest.fail(f"printed: {record.getMessage()}")
    monkeypatch.setattr(nibabel.imageglobals.logger, "handlers", [printed])
    read_image(tmp_path / "negative.nii.gz")
    assert "pixdim[1,2,3] should be positive" in caplog.text
    assert nibabel.imageglobals.logger.handlers == [printed]  # nibabel's own handler is back for others


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path):
    final = tmp_path / "x_seg.nii.gz"
    with atomic_path(final) as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent.parent == tmp_path  # the rename stays in one file system
        tmp.write_text("ok")
    with atomic_path(tmp_path / "X_SEG.Nii.Gz") as tmp:  # the writers tell formats by both extensions, in any case
        assert tmp.name.endswith(".tmp.nii.gz")
    (tmp_path / "X_SEG.Nii.Gz").unlink()
    assert final.read_text() == "ok"
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "y.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_seg.nii.gz"]
    (tmp_path / "folder.json").mkdir()  # the rename onto it would fail after the work: refused before it
    with pytest.raises(IsADirectoryError, match="folder.json: it is a folder"):
        with atomic_path(tmp_path / "folder.json"):
            pytest.fail("the block ran")


def test_a_write_killed_midway_leaves_no_file_in_the_folder_of_its_output(tmp_path):
    """A killed process removes nothing: it leaves the folder as it is while the file is written. nnU-Net v2 takes
    every file of imagesTr/ that ends in the dataset's file ending for a case, hidden ones included (not the files
    of its subfolders), and a temporary kept that ending for the writers."""
    (tmp_path / "a_0000.nii.gz").write_bytes(b"done")
    writing = atomic_path(tmp_path / "b_0000.nii.gz")
    writing.__enter__().write_bytes(b"half")  # the block is not left: as in a process killed here
    assert [p.name for p in tmp_path.iterdir() if p.is_file() and p.name.endswith(".nii.gz")] == ["a_0000.nii.gz"]
    writing.__exit__(None, None, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_0000.nii.gz", "b_0000.nii.gz"]


def test_atomic_path_gives_the_permissions_of_the_umask_at_write_time(tmp_path):
    """A host that tightens its umask after import (patient data) gets private files, not world-readable ones."""
    for umask, mode in ((0o077, 0o600), (0o022, 0o644)):
        previous = os.umask(umask)
        try:
            with atomic_path(tmp_path / f"{umask:o}.json") as tmp:
                tmp.write_text("{}")
        finally:
            os.umask(previous)
        assert (tmp_path / f"{umask:o}.json").stat().st_mode & 0o777 == mode


def test_reads_a_dicom_series_folder(tmp_path):
    folder = write_dicom_series(tmp_path / "series")
    image = read_image(folder)
    assert image.GetSize() == (24, 20, 6) and np.allclose(image.GetSpacing(), (1.0, 1.0, 2.5))
    assert case_name(folder) == "series"
    (tmp_path / "case001").symlink_to(folder)  # the common study/DICOM layout, linked under the case's name
    assert case_name(tmp_path / "case001") == "case001"


def test_an_evenly_spaced_sagittal_series_is_read(tmp_path):
    """ITK flags rounding errors of the slice positions as uneven spacing; a sagittal series has them."""
    sagittal = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # rows P, columns I, slices R
    folder = write_dicom_series(tmp_path / "sagittal", sagittal, spacing=(0.7, 0.7, 1.2))
    image = read_image(folder)
    assert image.GetSize() == (24, 20, 6) and np.allclose(image.GetSpacing(), (0.7, 0.7, 1.2))
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), sagittal)


def test_a_folder_of_two_series_or_of_series_folders_is_refused_saying_what_it_holds(tmp_path, capfd):
    folder = write_dicom_series(tmp_path / "study" / "series", number=3)
    with pytest.raises(InputError, match="study: folder holds no DICOM series; its subfolders hold files "
                                         "[(]as series[)]: give the folder of one series"):
        read_image(tmp_path / "study")
    assert capfd.readouterr().err == ""  # the library says it; ITK's "No Series were found" is not printed
    nifti = tmp_path / "niftis"
    nifti.mkdir()
    for name in ("b.nii.gz", "a.nrrd"):
        sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16), str(nifti / name))
    with pytest.raises(InputError, match="niftis: folder holds no DICOM series; it holds 2 image files "
                                         "[(]as a.nrrd[)]: give the files themselves"):
        read_image(nifti)
    for path in write_dicom_series(tmp_path / "other", number=4).iterdir():
        path.rename(folder / f"4-{path.name}")
    with pytest.raises(InputError, match=r"series: folder holds 2 DICOM series [(]number [34] CT, 6 files; "
                                         r"number [34] CT, 6 files[)]; give a folder with exactly one"):
        read_image(folder)
    for path in folder.glob("4-*"):  # the other series of one image only, as a scout exported beside its volume
        if path.name != "4-000.dcm":
            path.unlink()
    image = read_image(folder)
    assert image.GetSize() == (24, 20, 6)
    assert read_notes(image) == ["the folder's series of one image were left out (number 4 CT, 1 file)"]
    (folder / "4-000.dcm").unlink()  # a volume in one multi-frame file is no single image
    multiframe = sitk.Image([24, 20, 40], sitk.sitkInt16)
    for tag, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.1.4242.7"), ("0020|0011", "7"), ("0008|0060", "CT")):
        multiframe.SetMetaData(tag, value)
    sitk.WriteImage(multiframe, str(folder / "volume.dcm"))
    with pytest.raises(InputError, match=r"folder holds 2 DICOM series"):
        read_image(folder)


def test_a_folder_of_pictures_is_refused_saying_so(tmp_path):
    (tmp_path / "shots").mkdir()
    for name in ("slice010.jpg", "slice000.jpg"):
        sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(tmp_path / "shots" / name))
    with pytest.raises(InputError, match="shots: folder holds no DICOM series; it holds 2 picture files "
                                         "[(]as slice000.jpg[)]: pictures have no voxel size or position"):
        read_image(tmp_path / "shots")


def test_a_dicom_file_given_alone_is_told_to_give_its_folder(tmp_path):
    folder = write_dicom_series(tmp_path / "series")
    (folder / "000.dcm").rename(folder / "IM000003")  # as a PACS export names them: no extension
    for path in (folder / "001.dcm", folder / "IM000003"):
        with pytest.raises(InputError, match=f"{path.name}: a DICOM file; give the folder of its series"):
            read_image(path)


def test_a_dicom_series_with_a_slice_missing_is_refused(tmp_path, capfd):
    folder = write_dicom_series(tmp_path / "series")
    capfd.readouterr()
    (folder / "002.dcm").unlink()
    with pytest.raises(InputError, match="series: DICOM slices are not evenly spaced: steps of 2.5 to 5 mm where most "
                                         "are 2.5 mm, the first off before 003.dcm"):
        read_image(folder)
    (tmp_path / "twice").mkdir()  # a slice given twice (or two echoes at each position) is no missing one
    for name in ("000", "001", "003", "004", "005"):
        (tmp_path / "twice" / f"{name}.dcm").write_bytes((folder / f"{name}.dcm").read_bytes())
    (tmp_path / "twice" / "001b.dcm").write_bytes((folder / "001.dcm").read_bytes())
    with pytest.raises(InputError, match="001.dcm and 001b.dcm lie at one position"):
        read_image(tmp_path / "twice")
    (tmp_path / "twice" / "001b.dcm").rename(tmp_path / "twice" / "zz.dcm")  # named after the last slice: ITK
    with pytest.raises(InputError, match="001.dcm and zz.dcm lie at one position"):  # keeps the files in name order
        read_image(tmp_path / "twice")
    assert "WARNING" not in capfd.readouterr().err  # ITK's warning of non-uniform sampling: said in the message


@pytest.mark.parametrize("cut, zeroed", [("002.dcm", False), ("005.dcm", False), ("005.dcm", True)])
def test_a_dicom_slice_cut_short_is_named(tmp_path, cut, zeroed):
    """GDCM leaves out a file it cannot parse without a word: cut short (or overwritten with zeros) in the stack, the
    refusal guessed "a slice missing or unreadable?"; at an end of it, the series was read one slice short with no
    warning."""
    folder = write_dicom_series(tmp_path / "series")
    data = (folder / cut).read_bytes()
    # zeros a few bytes fewer than the slice: the files of a series differ in size by a UID or a position's digits, and
    # a zeroed slice smaller than the smallest other went unnamed (in about 1 run of 30)
    (folder / cut).write_bytes(bytes(len(data) - 4) if zeroed else data[: len(data) // 2])
    (folder / "notes.txt").write_text("a file beside the series that is no DICOM file")
    unread = f"1 DICOM file of the folder could not be read (cut short or damaged: {cut})"
    if cut == "002.dcm":
        with pytest.raises(InputError, match=re.escape(f"the first off before 003.dcm (a slice missing or "
                                                       f"unreadable?); {unread}") + "$"):
            read_image(folder)
    else:
        image = read_image(folder)
        assert image.GetSize() == (24, 20, 5)
        assert read_notes(image) == [f"{unread} and was left out: the series may lack a slice at one end"]
    (folder / "001.dcm").write_bytes(data[:300])
    with pytest.raises(InputError, match="2 DICOM files of the folder could not be read \\(cut short or damaged: "
                                         f"001.dcm, {cut}\\)"):
        read_image(folder)
    for path in folder.glob("*.dcm"):
        path.write_bytes(data[:300])
    with pytest.raises(InputError, match=re.escape(f"{folder}: folder holds no DICOM series; 6 DICOM files of the "
                                                   "folder could not be read as images (cut short or damaged, or "
                                                   "holding no image, as a report does: 000.dcm, 001.dcm, 002.dcm ...)")
                       + "$"):
        read_image(folder)


def dicom_file_of_no_image(path, sop_class, series):
    """A DICOM file that GDCM parses and that holds no image (as a CT's dose report, a structured report, does)."""
    def element(group, number, vr, value):
        value += (b"\0" if vr == "UI" else b" ") * (len(value) % 2)
        if vr == "OB":
            return struct.pack("<HH2sHI", group, number, b"OB", 0, len(value)) + value
        return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value
    meta = (element(2, 1, "OB", b"\0\1") + element(2, 2, "UI", sop_class) + element(2, 3, "UI", b"1.2.3.4.5.6")
            + element(2, 0x10, "UI", b"1.2.840.10008.1.2.1"))
    data = (element(8, 0x16, "UI", sop_class) + element(8, 0x18, "UI", b"1.2.3.4.5.6") + element(8, 0x60, "CS", b"SR")
            + element(0x20, 0xE, "UI", series))
    path.write_bytes(bytes(128) + b"DICM" + element(2, 0, "UL", struct.pack("<I", len(meta))) + meta + data)


@pytest.mark.parametrize("series", [b"1.2.3.4.99", b"1.2.826.0.1.3680043.2.1125.1.4242.1"])
def test_a_dicom_file_of_no_image_or_a_small_file_of_zeros_beside_a_series_is_not_called_damaged(tmp_path, series):
    """A dose report (a structured report: no image) exported beside the CT's slices, of its own series or of the
    slices', and a small file of zero bytes: GDCM leaves them out of the series, and the reader's note called them "cut
    short or damaged" and warned that the series might lack a slice."""
    folder = write_dicom_series(tmp_path / "series")
    dicom_file_of_no_image(folder / "SR000001.dcm", b"1.2.840.10008.5.1.4.1.1.88.67", series)
    (folder / "zeros.bin").write_bytes(bytes(200))
    image = read_image(folder)
    assert image.GetSize() == (24, 20, 6) and read_notes(image) == []
    (folder / "005.dcm").write_bytes((folder / "005.dcm").read_bytes()[:300])  # a slice cut short is still named
    assert read_notes(read_image(folder)) == ["1 DICOM file of the folder could not be read (cut short or damaged: "
                                              "005.dcm) and was left out: the series may lack a slice at one end"]


def test_a_gantry_tilted_series_is_put_where_its_slices_are(tmp_path):
    """Slices that step along the table, not along their normal (here 0.7 mm sideways per 2.5 mm slice, 15.6
    degrees): ITK stacks them along the normal, 3.5 mm off by the last slice. Read, every voxel sits where its file
    puts it: the values, a linear function of the true position, match the position on the grid returned."""
    folder = write_dicom_series(tmp_path / "tilted", drift=(0.0, 0.7, 0.0))
    image = read_image(folder)
    assert read_notes(image) == ["the slices stand 15.6 degrees off their normal (a tilted gantry): the image was "
                                 "resampled onto a grid with perpendicular axes, slices along the table, on which the "
                                 "outputs lie"]
    step = np.array([0.0, 0.7, 2.5])  # the table's move from one slice to the next: the patient's long axis
    axes = np.reshape(image.GetDirection(), (3, 3))
    assert np.allclose(axes[:, 0], (1, 0, 0)) and np.allclose(axes[:, 2], step / np.linalg.norm(step))
    assert np.allclose(image.GetSpacing(), (1, 1, np.linalg.norm(step)))
    values = sitk.GetArrayFromImage(image).astype(float)
    idx = np.indices(values.shape).reshape(3, -1)[::-1].T
    lps = np.asarray(image.GetOrigin()) + (idx * image.GetSpacing()) @ axes.T
    expected = (lps @ [1.0, 10.0, 100.0]).reshape(values.shape)
    # the widened grid's corners lie outside every slice, and the voxels next to them are partly outside
    inside = ndimage.binary_erosion(values > values.min(), np.ones((3, 3, 1)))  # the data's edges are oblique
    assert inside.mean() > 0.4 and np.abs(values - expected)[inside].max() <= 1.0  # int16 rounding


def test_a_gantry_tilted_series_is_put_on_the_patients_axes(tmp_path):
    """A real gantry tilt: slice planes tilted about left-right, positions stepping along the table (z) only."""
    t = np.radians(15)
    tilted = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    image = read_image(write_dicom_series(tmp_path / "t", direction=tilted, drift=[0, 0, 2.5 / np.cos(t)]
                                          - 2.5 * tilted[:, 2]))
    assert read_notes(image) and np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.eye(3))
    assert np.allclose(image.GetSpacing(), (1, 1, 2.5 / np.cos(t)))


def test_a_dicom_series_whose_slices_scale_their_values_differently_keeps_every_slice_s_values(tmp_path):
    """ITK reads a series in the pixel type that fits its first file's values and casts the other slices to it: after
    a first slice of integer values (slope 1), the half values of slices of slope 0.5 were cut to integers, and a
    slice of negative values after an unsigned first one wrapped round to 65535 and below (per-slice slopes: some
    MR and PET series)."""
    folder = write_dicom_series(tmp_path / "series")
    expected = sitk.GetArrayFromImage(read_image(folder)).astype(np.float64)
    reader, writer = sitk.ImageFileReader(), sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(1, 6):  # the slices after the first: their values plus one half, stored at slope 0.5
        reader.SetFileName(str(folder / f"{k:03d}.dcm"))
        slice_ = reader.Execute()
        halves = sitk.Cast(slice_, sitk.sitkFloat32) + 0.5 - 5000.0 * (k == 5)  # the last slice's values below 0
        for key in reader.GetMetaDataKeys():
            halves.SetMetaData(key, reader.GetMetaData(key))
        halves.SetMetaData("0028|1053", "0.5")
        halves.SetMetaData("0028|1052", "0")
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(halves)
        expected[k] += 0.5 - 5000.0 * (k == 5)
    image = read_image(folder)
    assert np.array_equal(sitk.GetArrayFromImage(image).astype(np.float64), expected)


def test_the_localisers_of_a_dicom_series_are_left_out(tmp_path):
    """A localiser (scout) in the series of the slices, across them or beside them: ITK stacked it with the slices,
    and the series was refused as unevenly spaced, "a slice missing", naming a slice and not the localiser."""
    folder = write_dicom_series(tmp_path / "series")
    expected = sitk.GetArrayFromImage(read_image(folder))
    first = sitk.ReadImage(str(folder / "000.dcm"))
    across, beside = first[:, :, 0], first[:, :, 0]
    for scout, tags in ((across, {"0020|0037": "1\\0\\0\\0\\0\\-1"}),  # a coronal plane across axial slices
                        (beside, {"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER", "0020|0032": "0\\0\\-50"})):
        for key in first.GetMetaDataKeys():
            scout.SetMetaData(key, first.GetMetaData(key))
        for key, value in {**tags, "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.99.{len(tags)}"}.items():
            scout.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for name, scout in (("scout1.dcm", across), ("scout2.dcm", beside)):
        writer.SetFileName(str(folder / name))
        writer.Execute(scout)
    image = read_image(folder)
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)
    assert re.fullmatch(r"the series' localiser images scout[12].dcm, scout[12].dcm left out", *read_notes(image))


def test_slices_turned_a_little_are_no_localisers_and_a_slope_spelled_otherwise_is_the_same(tmp_path):
    """Two slices turned 10 degrees (slabs angled to a disc, in one series) were left out as localisers, where they
    had been read with the others; "1" and "1.0" counted as two slopes, and the series was read as float (a
    helper's review)."""
    folder = write_dicom_series(tmp_path / "series")
    reader, writer = sitk.ImageFileReader(), sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    turn = np.radians(10.0)
    turned = {"0020|0037": f"1\\0\\0\\0\\{np.cos(turn)}\\{np.sin(turn)}"}
    for k, tags in ((4, turned), (5, turned), (1, {"0028|1053": "1.0"}), (2, {"0028|1053": "1"})):
        reader.SetFileName(str(folder / f"{k:03d}.dcm"))
        slice_ = reader.Execute()
        for key in reader.GetMetaDataKeys():
            slice_.SetMetaData(key, reader.GetMetaData(key))
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(slice_)
    image = read_image(folder)  # as before the localisers were looked for
    assert image.GetSize() == (24, 20, 6) and image.GetPixelID() == sitk.sitkInt16 and not read_notes(image)


@pytest.mark.parametrize("orientation, said", [
    (None, "absent"),  # the element gone
    ("0\\1\\0\\0\\0", "'0\\1\\0\\0\\0'"),  # a number lost
    ("0\\1\\0\\0\\0.002\\-1", "'0\\1\\0\\0\\0.002\\-1'"),  # askew beyond GDCM's 1e-3
    ("0\\1\\0\\0\\0\\-1\\0", None),  # one number too many: GDCM reads the first six
])
def test_a_dicom_series_whose_slices_give_no_usable_orientation_is_read_with_a_warning(tmp_path, orientation, said):
    """GDCM reads such a series with the axes of its voxel array (a sagittal series as axial) without a word, where a
    NIfTI, NRRD or MetaImage without orientation was warned of."""
    sagittal = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # columns: rows, columns, slices (LPS)
    folder = write_dicom_series(tmp_path / "series", direction=sagittal)
    for path in folder.iterdir():  # the element (0020,0037) in the files' implicit-VR little-endian data set
        data = bytearray(path.read_bytes())
        at = data.index(b"\x20\x00\x37\x00")
        length = struct.unpack("<I", data[at + 4 : at + 8])[0]
        if orientation is None:
            data[at + 2] = 0x36  # an element no reader knows
        else:
            value = orientation.encode() + b" " * (len(orientation) % 2)
            data[at + 4 : at + 8 + length] = struct.pack("<I", len(value)) + value
        path.write_bytes(bytes(data))
    image = read_image(folder)
    if said is None:
        assert np.allclose(image.GetDirection(), sagittal.ravel()) and not read_notes(image)
    else:
        assert np.allclose(image.GetDirection(), np.eye(3).ravel())
        assert read_notes(image) == [f"its slices give no orientation (ImageOrientationPatient {said}), so it was read "
                                     "with the axes of its voxel array: if the vertebrae come out in the wrong order, "
                                     "or none, correct the header"]


def test_a_multi_frame_dicom_file_is_read_by_its_own_orientation_without_a_warning(tmp_path):
    """It keeps its orientation in its frames' groups, not in the ImageOrientationPatient of its data set: read so,
    it was warned of as a series without one."""
    sagittal = [0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
    volume = sitk.Image([24, 20, 40], sitk.sitkInt16)
    volume.SetDirection(sagittal)
    volume.SetMetaData("0008|0060", "CT")
    (tmp_path / "series").mkdir()
    sitk.WriteImage(volume, str(tmp_path / "series" / "volume.dcm"))
    image = read_image(tmp_path / "series")
    assert np.allclose(image.GetDirection(), sagittal) and not read_notes(image)


def test_a_series_description_in_latin_1_is_named_as_written(tmp_path):
    """A DICOM text in ISO 8859-1 ("R\\xfccken ax") came into the refusal of a folder of two series as a lone
    surrogate, which a message cannot print as UTF-8."""
    folder = write_dicom_series(tmp_path / "series", number=3)
    other = write_dicom_series(tmp_path / "other", number=4)
    reader, writer = sitk.ImageFileReader(), sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for path in other.iterdir():
        reader.SetFileName(str(path))
        slice_ = reader.Execute()
        for key in reader.GetMetaDataKeys():
            slice_.SetMetaData(key, reader.GetMetaData(key))
        slice_.SetMetaData("0008|103e", "RXcken ax")
        writer.SetFileName(str(folder / f"4-{path.name}"))
        writer.Execute(slice_)
        written = folder / f"4-{path.name}"
        written.write_bytes(written.read_bytes().replace(b"RXcken", b"R\xfccken"))
    with pytest.raises(InputError) as refused:
        read_image(folder)
    assert 'number 4 "R\u00fccken ax" CT, 6 files' in str(refused.value)
    str(refused.value).encode()


def write_dicom_series(folder, direction=np.eye(3), spacing=(1.0, 1.0, 2.5), drift=(0.0, 0.0, 0.0), number=1):
    """A 24 x 20 x 6 CT series (1 x 1 x 2.5 mm, axial by default), one file per slice; each slice moved by
    ``drift`` LPS mm from the one before, as a tilted gantry does, and its values encoding its true positions."""
    volume = oriented_image(direction, size=(24, 20, 6), spacing=spacing)
    position = lambda k: np.add(volume.TransformIndexToPhysicalPoint((0, 0, k)), np.multiply(k, drift))
    volume = sitk.Cast(volume, sitk.sitkInt16)
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        slice_ = volume[:, :, k] + int(round(np.dot(np.multiply(k, drift), [1.0, 10.0, 100.0])))
        for tag, value in (("0020|000e", f"1.2.826.0.1.3680043.2.1125.1.4242.{number}"), ("0020|0013", str(k + 1)),
                           ("0020|0011", str(number)),
                           ("0020|0032", "\\".join(map(str, position(k)))),
                           ("0020|0037", "\\".join(map(str, np.asarray(direction).T[:2].ravel()))),
                           ("0008|0060", "CT")):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(slice_)
    return folder


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_an_itk_write_that_fails_says_how_much_space_is_free(tmp_path, suffix):
    # ITK's writers say "failed to write to file" alone where the disk is full; a file-size limit fails the write as
    # a full disk does (Python ignores SIGXFSZ: EFBIG)
    resource = pytest.importorskip("resource")  # POSIX
    arr = np.random.default_rng(0).integers(-1000, 1000, (64, 64, 64)).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError, match=r"cannot write .*x" + re.escape(suffix) + r": .* MB free on its file system"):
            io.write_image(image, tmp_path / f"x{suffix}")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_atomic_paths_are_all_or_nothing(tmp_path):
    old = tmp_path / "a.json"
    old.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_paths([old, tmp_path / "b.md"]) as (a, b):
            a.write_text("new")
            b.write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and old.read_text() == "old"
    with atomic_paths([old, tmp_path / "b.md"]) as (a, b):
        a.write_text("new")
        b.write_text("new")
    assert old.read_text() == "new" and (tmp_path / "b.md").read_text() == "new"


@pytest.mark.parametrize("earlier", [True, False])
def test_atomic_paths_a_ctrl_c_between_the_renames_leaves_no_mix(tmp_path, monkeypatch, earlier):
    # a real SIGINT right after the first rename: the files are either all of the earlier run or all of this one,
    # and where there was no earlier run, none
    finals = [tmp_path / name for name in ("a.json", "b.md", "c.png")]
    if earlier:
        for path in finals:
            path.write_text("old")
    replace, renamed = os.replace, []

    def replace_then_interrupt(src, dst):
        replace(src, dst)
        renamed.append(dst)
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    # Python's Ctrl-C handler, which it does not install where it starts with Ctrl-C ignored (a shell's background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_paths(finals) as temps:
                for tmp in temps:
                    tmp.write_text("new")
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    contents = {path.read_text() for path in finals if path.exists()}
    assert len(contents) == 1 if earlier else contents == set(), contents
    assert sorted(p.name for p in tmp_path.iterdir()) == (sorted(p.name for p in finals) if earlier else [])


@pytest.mark.parametrize("name", ["bad_seg.nii.gz", "bad_seg.nrrd"])
@pytest.mark.parametrize("values, reason", [
    (np.array([0, 1.5, 2], np.float32), "not whole numbers"),
    (np.array([0, np.nan, 2], np.float32), "NaN or infinite"),
    (np.array([0, -1, 2], np.int16), "negative"),
    (np.array([0, 70000, 2], np.float32), "above 65535"),  # would wrap round in the cast to uint16
])
def test_bad_label_maps_name_file_and_reason(tmp_path, name, values, reason):
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(np.resize(values, (4, 4, 4))), str(path))
    with pytest.raises(InputError, match=f"{path}.*({reason})"):
        read_label_map(path)


def test_an_empty_path_is_refused_as_no_file():
    # Path("") is the current folder: read as a DICOM folder or a missing file, the message would not say what is wrong
    for read in (read_image, read_label_map):
        with pytest.raises(InputError, match="empty path"):
            read("")


def test_label_maps_are_checked_like_images(tmp_path):
    path = tmp_path / "seg.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.resize(np.arange(30, dtype=np.float32), (8, 8, 8))), str(path))
    whole = read_label_map(path)  # a float map of whole numbers is read as integers
    assert whole.GetPixelID() == sitk.sitkUInt16 and sitk.GetArrayViewFromImage(whole).max() == 29
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"{path}: (truncated|unreadable label map)"):
        read_label_map(path)


@pytest.mark.parametrize("sform", [None, np.diag([2.0, 3.0, 4.0, 1.0])])
def test_a_nifti_without_a_voxel_size_is_refused(tmp_path, sform):
    """ITK takes 1 mm for a pixdim of 0, even beside an sform that gives the voxel size: a scan of unknown voxel size
    would be labelled at a made-up scale."""
    image = nibabel.Nifti1Image(np.ones((4, 4, 4), np.int16), None)
    if sform is not None:
        image.header.set_sform(sform, code=1)
    image.header["pixdim"][1:4] = 0
    path = tmp_path / "nosize.nii.gz"
    nibabel.save(image, path)
    with pytest.raises(InputError, match="nosize.nii.gz: the header gives no voxel size"):
        read_image(path)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("form", ["qform", "sform"])
def test_a_nifti_whose_transform_holds_nan_is_refused(tmp_path, version, form):
    """ITK read a NaN offset as 0 (nibabel, for NIfTI-2, as NaN): the scan placed elsewhere, or no scan at all."""
    image = (nibabel.Nifti1Image if version == 1 else nibabel.Nifti2Image)(np.ones((4, 4, 4), np.int16), None)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[0, 3] = np.nan
    (image.header.set_qform if form == "qform" else image.header.set_sform)(affine, code=1)
    path = tmp_path / f"nan_{form}.nii"
    nibabel.save(image, path)
    with pytest.raises(InputError, match=f"nan_{form}.nii: unreadable image .*{form} holds NaN"):
        read_image(path)


def test_a_nifti_whose_header_size_is_corrupt_is_refused(tmp_path):
    """ITK read it all the same, without the checks of its size and voxels: a truncated file was labelled."""
    path = write(tmp_path, "badsize.nii", sitk.Image([8, 8, 8], sitk.sitkInt16))
    data = bytearray(path.read_bytes())
    data[0:4] = bytes(4)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(InputError, match="badsize.nii: corrupt NIfTI header"):
        read_image(path)


def test_an_image_whose_geometry_holds_nan_is_refused():
    image = sitk.Image([8, 8, 8], sitk.sitkInt16)
    image.SetOrigin((float("nan"), 0.0, 0.0))
    with pytest.raises(InputError, match="scan: its voxel size, origin or axis directions hold NaN"):
        checked_image(image, "scan")


@pytest.mark.parametrize("name", ["f64.nii", "f64.nii.gz"])
def test_a_float64_nifti_is_read_as_float32_on_itk_s_grid(tmp_path, name, monkeypatch):
    """Read a slab at a time into float32, not by ITK, which held two float64 copies (3.5 GB for the benchmark's 512 x
    512 x 800); with the values and the grid ITK gives, its slope and intercept applied."""
    voxels = np.random.default_rng(1).normal(0, 300, (20, 25, 30))
    affine = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -20], [0, 1.2, 0, 30], [0, 0, 0, 1]])
    image = nibabel.Nifti1Image(voxels, affine)
    image.header.set_slope_inter(2.0, 5.0)
    nibabel.save(image, tmp_path / name)
    itk = sitk.ReadImage(str(tmp_path / name))
    with monkeypatch.context() as patch:
        patch.setattr(sitk, "ReadImage", None)  # the voxels never go through ITK
        read = read_image(tmp_path / name)
    assert read.GetPixelID() == sitk.sitkFloat32 and itk.GetPixelID() == sitk.sitkFloat64
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(itk), rtol=1e-6)
    assert Geometry.of(read).matches(Geometry.of(itk)) and read.GetSize() == itk.GetSize()


# what ITK raises when the memory for an image's voxels cannot be allocated (SimpleITK 2.5, ITK 5.4)
_ITK_NO_MEMORY = ("Exception thrown in SimpleITK {}: /tmp/SimpleITK-build/ITK-prefix/include/ITK-5.4/"
                  "itkImportImageContainer.hxx:179:\nFailed to allocate memory for image.")


@pytest.mark.parametrize("name", ["big.nrrd", "big.mha", "big.nii.gz"])
def test_an_image_too_large_for_memory_is_said_so_not_unreadable(tmp_path, name, monkeypatch):
    """An image whose voxels do not fit in memory (a 4096 x 4096 x 2000 header, 67 GB of int16, on a 24 GB machine) was
    refused as "unreadable image (Failed to allocate memory for image.)": the file is fine, the memory is missing.
    The message says so, with the header's size and how much memory its voxels need."""
    sitk.WriteImage(sitk.Image([40, 30, 20], sitk.sitkInt16), str(tmp_path / name))

    def no_memory(*args, **kwargs):
        raise RuntimeError(_ITK_NO_MEMORY.format("ImageFileReader_execute"))

    monkeypatch.setattr(sitk, "ReadImage", no_memory)
    with pytest.raises(InputError, match=rf"{name}: not enough memory to read this image \(40 x 30 x 20 voxels of "
                       r"16-bit signed integer: 4\.8e-05 GB\)$"):
        read_image(tmp_path / name)


def test_a_dicom_series_too_large_for_memory_is_said_so_not_unreadable(tmp_path, monkeypatch):
    """As for an image file: a DICOM series whose voxels do not fit in memory read "unreadable DICOM series (Failed to
    allocate memory for image.)"."""
    folder = write_dicom_series(tmp_path / "series")

    def no_memory(*args, **kwargs):
        raise RuntimeError(_ITK_NO_MEMORY.format("ImageSeriesReader_Execute"))

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", no_memory)
    with pytest.raises(InputError, match=r"series: not enough memory to read this DICOM series \(24 x 20 x 6 voxels of "
                       r"16-bit signed integer: 5\.76e-06 GB\)$"):
        read_image(folder)


def test_a_float64_image_too_large_to_convert_is_said_so(monkeypatch):
    """A float64 image (a NRRD, MetaImage or one made in memory) is converted to float32 whole, beside its float64
    voxels (12 bytes a voxel at once): where that memory is missing, ITK's message named a file of its build."""
    def no_memory(*args, **kwargs):
        raise RuntimeError(_ITK_NO_MEMORY.format("Cast"))

    monkeypatch.setattr(sitk, "Cast", no_memory)
    with pytest.raises(InputError, match=r"scan: not enough memory to convert its float64 voxels to float32 \(9\.6e-05 "
                       r"GB more beside the 0\.000192 GB it holds\)"):
        checked_image(sitk.Image([40, 30, 20], sitk.sitkFloat64), "scan")


@pytest.mark.parametrize("qform_code, sform_code", [(0, 2), (1, 0), (1, 1)])
def test_a_nifti1_with_a_negative_voxel_size_is_refused(tmp_path, qform_code, sform_code):
    """ITK turned the axes of a negative pixdim round, against both forms (nibabel reads the size as positive): a
    real lumbar MRI so written, its sform right, was labelled T9-T13, L1-L5 without S1, every centroid 430-530 mm from
    the sform's, with no word of the header."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    nii = nibabel.Nifti1Image(np.zeros((20, 20, 20), np.int16), None)
    nii.set_qform(affine, code=qform_code)
    nii.set_sform(affine, code=sform_code)
    nibabel.save(nii, tmp_path / "negative.nii")
    data = bytearray((tmp_path / "negative.nii").read_bytes())
    data[80:92] = struct.pack("<3f", -1.0, -1.0, -1.0)  # pixdim[1:4], which nibabel will not write negative
    (tmp_path / "negative.nii").write_bytes(bytes(data))
    with pytest.raises(InputError, match="negative voxel size"):
        read_image(tmp_path / "negative.nii")


def test_a_nifti_whose_sform_itk_cannot_follow_is_read_with_a_warning(tmp_path, capfd):
    """A tilted gantry's NIfTI (the slices drifting 15 degrees along the table, in the sform; the qform rigid): ITK
    reads the qform, and the outputs lay up to 24 mm (a real CT) and 42 mm (a real MRI) from where the sform puts the
    scan, with no warning, since the forms' axes lie within 30 degrees of each other; so too an sform whose axes are
    longer than the voxel size (ITK printed its own warning, which it no longer does)."""
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    sheared = affine.copy()
    sheared[1, 2] = 2.0 * np.tan(np.radians(15.0))
    nii = nibabel.Nifti1Image(np.zeros((20, 20, 40), np.int16), None)
    nii.set_sform(sheared, code=1)
    nii.set_qform(sheared, code=1)  # nibabel stores the rigid part
    nibabel.save(nii, tmp_path / "tilted.nii.gz")
    notes = read_notes(read_image(tmp_path / "tilted.nii.gz"))
    assert len(notes) == 1 and "not perpendicular" in notes[0] and "read by its qform" in notes[0], notes
    assert "WARNING" not in capfd.readouterr().err
    nii.set_sform(affine @ np.diag([1.0, 1.0, 1.5, 1.0]), code=1)  # perpendicular, but not the voxel size long
    nii.set_qform(affine, code=1)
    nibabel.save(nii, tmp_path / "scaled.nii.gz")
    notes = read_notes(read_image(tmp_path / "scaled.nii.gz"))
    # 39 slices, each 1 mm too short
    assert len(notes) == 1 and "not as long as the voxel size" in notes[0] and "up to 39 mm" in notes[0], notes
    nii.set_qform(affine, code=0)  # the sform alone: ITK took its axes at pixdim's size, without a word
    nibabel.save(nii, tmp_path / "scaled-sform-only.nii.gz")
    notes = read_notes(read_image(tmp_path / "scaled-sform-only.nii.gz"))
    assert len(notes) == 1 and "not as long as the voxel size" in notes[0] and "up to 39 mm" in notes[0], notes
    nii.set_sform(affine @ np.diag([1.0, 1.0, 1.0 + 1e-4, 1.0]), code=1)  # orthonormal: read by the sform, no note
    nii.set_qform(affine, code=1)
    nibabel.save(nii, tmp_path / "plain.nii.gz")
    assert read_notes(read_image(tmp_path / "plain.nii.gz")) == []


def test_a_direction_matrix_with_a_scale_is_refused_as_such(tmp_path):
    """A MetaImage TransformMatrix of perpendicular axes 1.5 long was refused as 'not perpendicular (a sheared
    grid)'."""
    image = oriented_image(np.diag([1.5, 1.0, 1.0]))
    sitk.WriteImage(image, str(tmp_path / "scaled.mha"))
    with pytest.raises(InputError, match="not unit vectors"):
        read_image(tmp_path / "scaled.mha")
    sheared = np.eye(3)
    sheared[0, 2] = 0.3  # a sheared grid whose direction columns are not unit vectors either: said to be sheared
    sitk.WriteImage(oriented_image(sheared), str(tmp_path / "sheared.mha"))
    with pytest.raises(InputError, match="not perpendicular"):
        read_image(tmp_path / "sheared.mha")


def test_a_nifti_whose_only_form_is_a_sheared_sform_is_refused_as_sheared(tmp_path):
    """A tilted gantry's NIfTI-1 with its sheared sform alone (qform_code 0): ITK refuses it, and the message was
    'unreadable image (ITK ERROR: ITK only supports orthonormal direction cosines...)', where the same grid from a NRRD
    or with a qform beside it is said to be sheared, with the remedy."""
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    sheared = affine.copy()
    sheared[1, 2] = 2.0 * np.tan(np.radians(15.0))
    nii = nibabel.Nifti1Image(np.zeros((20, 20, 40), np.int16), None)
    nii.set_sform(sheared, code=1)
    nii.set_qform(affine, code=0)
    nibabel.save(nii, tmp_path / "tilted-sform-only.nii.gz")
    with pytest.raises(InputError, match="not perpendicular") as raised:
        read_image(tmp_path / "tilted-sform-only.nii.gz")
    assert "resample it onto a grid with perpendicular axes" in str(raised.value)
    assert "unreadable" not in str(raised.value)


def test_a_nifti_of_1_bit_voxels_is_refused_saying_so(tmp_path, capfd):
    """A NIfTI-1 of datatype DT_BINARY (1 bit per voxel; nibabel writes none, but the standard has it): ITK's NIfTI
    library printed '** ERROR: nifti_convert_nhdr2nim: bad datatype' and the message was '... is not recognized as a
    NIFTI file', which it is."""
    nii = nibabel.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4))
    header = bytearray(nii.header.binaryblock)
    struct.pack_into("<2h", header, 70, 1, 1)  # datatype DT_BINARY, bitpix 1
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    (tmp_path / "mask.nii").write_bytes(bytes(header) + bytes(4) + bytes(8 * 8 * 8 // 8))
    with pytest.raises(InputError, match="1-bit voxels"):
        read_image(tmp_path / "mask.nii")
    assert "bad datatype" not in capfd.readouterr().err


def test_itk_warnings_in_two_threads_at_once_leave_the_setting_as_it_was():
    """Each block saved and restored ITK's process-wide setting for itself: of two threads reading images, the one that
    entered second saved the first one's "off", restored it last, and ITK's warnings stayed off for the process."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    entered, first_left, seen = threading.Event(), threading.Event(), []

    def second():
        with itk_warnings(False):
            entered.set()
            first_left.wait(10)
            seen.append(sitk.ProcessObject.GetGlobalWarningDisplay())  # still within its block
        with itk_warnings(True):
            seen.append(sitk.ProcessObject.GetGlobalWarningDisplay())

    try:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)
        thread = threading.Thread(target=second)
        with itk_warnings(False):
            thread.start()
            assert entered.wait(10)
        first_left.set()
        thread.join(10)
        assert seen == [False, True] and sitk.ProcessObject.GetGlobalWarningDisplay()
        with itk_warnings(False):  # nested: the inner block's setting holds within it, the outer's after it
            with itk_warnings(True):
                assert sitk.ProcessObject.GetGlobalWarningDisplay()
            assert not sitk.ProcessObject.GetGlobalWarningDisplay()
        assert sitk.ProcessObject.GetGlobalWarningDisplay()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def test_a_link_that_loops_or_leads_nowhere_is_named_as_such(tmp_path):
    """Both were refused as "no such file or folder", though the link is there."""
    (tmp_path / "self.nii.gz").symlink_to("self.nii.gz")
    (tmp_path / "dangling.nii.gz").symlink_to("nowhere.nii.gz")
    for reader in (read_image, read_label_map):
        with pytest.raises(InputError, match=r"self\.nii\.gz: a link that leads back to itself \(a loop of links\)$"):
            reader(tmp_path / "self.nii.gz")
    with pytest.raises(InputError, match=r"dangling\.nii\.gz: a link to nowhere\.nii\.gz, which does not exist$"):
        read_image(tmp_path / "dangling.nii.gz")
    with pytest.raises(InputError, match="missing.nii.gz: no such file or folder$"):
        read_image(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("name", ["e.mha", "e.mhd", "e.nrrd", "e.nhdr", "e.nii", "e.nii.gz"])
def test_an_empty_file_is_refused_as_empty_and_the_readers_print_nothing(tmp_path, name, capfd):
    """MetaIO printed four lines of its own ("NDims required and not defined." ...) before the message, and ITK said
    of an empty NRRD that it found no reader for it."""
    (tmp_path / name).write_bytes(b"")
    capfd.readouterr()
    for reader in (read_image, read_label_map):
        with pytest.raises(InputError, match=rf"{re.escape(str(tmp_path / name))}: empty file \(0 bytes\)$"):
            reader(tmp_path / name)
    assert capfd.readouterr().err == ""


def test_a_header_whose_size_its_small_file_cannot_hold_is_said_so_beside_the_memory(tmp_path, monkeypatch):
    """A 1 KB file whose header gives 100000^3 voxels was refused as "not enough memory" alone, as if the file were
    fine; the same NIfTI is refused as truncated. (Gzip and zlib streams are inflated beside the reader, and found too
    short: ``test_a_compressed_file_whose_header_gives_another_size_is_refused``.)"""
    (tmp_path / "huge.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 100000\n"
                                         b"spacings: 1.5 1.5 1.5\nencoding: bzip2\nendian: little\n\n"
                                         + bz2.compress(b"\0" * 1000))

    def no_memory(*args, **kwargs):
        raise RuntimeError(_ITK_NO_MEMORY.format("ImageFileReader_execute"))

    monkeypatch.setattr(sitk, "ReadImage", no_memory)
    with pytest.raises(InputError, match=r"not enough memory to read this image \(100000 x 100000 x 100000 voxels of "
                       r"16-bit signed integer: 2e\+06 GB\); but the file holds only \d+ bytes, too few for those "
                       r"voxels compressed as gzip compresses: its header's size may be wrong, or the file truncated$"):
        read_image(tmp_path / "huge.nrrd")


@pytest.mark.parametrize("old, new, reason", [
    (rb"Offset = (\S+)", rb"Offset = z\1", r"its Offset 'z-30 20 -100' is not 3 numbers \(NDims 3\)"),
    (rb"Offset = (\S+ \S+) \S+", rb"Offset = \1", r"its Offset '-30 20' is not 3 numbers \(NDims 3\)"),
    (rb"TransformMatrix = ", rb"TransformMatrix = q", r"its TransformMatrix 'q1 0 0 0 1 0 0 0 1' is not 9 numbers"),
    (rb"ElementSpacing = ", rb"ElementSpacing = x", r"its ElementSpacing 'x1 1.5 2' is not 3 numbers"),
    (rb"NDims = 3", rb"NDims = 4", r"its DimSize '20 24 30' is not 4 numbers \(NDims 4\)"),
    (rb"DimSize =", rb"DimSiez =", "it gives no DimSize"),
])
def test_a_metaimage_header_whose_grid_fields_are_damaged_is_refused(tmp_path, capfd, old, new, reason):
    """MetaIO read an Offset garbled or a number short as zeros: the scan put at the origin (or its third coordinate at
    0) without a word; a damaged TransformMatrix or ElementSpacing was "unreadable image (0 0 0)" or "(Refusing to
    change spacing ...)", a missing DimSize MetaIO's lines on stderr and "File cannot be read"."""
    path = tmp_path / "a.mha"
    image = oriented_image(np.eye(3))
    image.SetOrigin((-30.0, 20.0, -100.0))
    sitk.WriteImage(image, str(path))
    path.write_bytes(re.sub(old, new, path.read_bytes(), count=1))
    capfd.readouterr()
    with pytest.raises(InputError, match=f"{re.escape(str(path))}: corrupt MetaImage header: {reason}"):
        read_image(path)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr"])
@pytest.mark.parametrize("old, new, reason", [
    (rb"space origin: \(-30,20,-100\)", b"space origin: (-30,2y0,-100)",
     r"its space origin '\(-30,2y0,-100\)' is not a vector of numbers as long as its space directions' \(3\)"),
    (rb"space origin: \(-30,20,-100\)", b"space origin: (-30,20,-1e)", r"its space origin '\(-30,20,-1e\)'"),
    (rb"space directions: \(1,", b"space directions: (1x,",
     r"its space directions '\(1x,0,0\) \(0,1.5,0\) \(0,0,2\)' are not 3 vectors of numbers or none"),
    (rb"sizes: 20 24 30", b"sizes: 20 24 30q", r"its sizes '20 24 30q' are not 3 whole numbers \(dimension 3\)"),
    (rb"space directions: \S+ \S+ \S+", b"spacings: 1 1.5 2.0.1", r"its spacings '1 1.5 2.0.1' are not 3 numbers"),
])
def test_a_nrrd_header_whose_grid_fields_are_damaged_is_refused(tmp_path, suffix, old, new, reason):
    """NRRD's reader takes a number by its first characters: a space origin of "(-30,2y0,-100)" put the scan 18 mm off
    without a word, "1x" was read as 1."""
    path = tmp_path / f"a{suffix}"
    image = oriented_image(np.eye(3))
    image.SetOrigin((-30.0, 20.0, -100.0))
    sitk.WriteImage(image, str(path))
    path.write_bytes(re.sub(old, new, path.read_bytes(), count=1))
    with pytest.raises(InputError, match=f"{re.escape(str(path))}: corrupt NRRD header: {reason}"):
        read_image(path)


def test_a_metaimage_header_that_names_its_grid_otherwise_is_read(tmp_path):
    """Position and Orientation, the other names of Offset and TransformMatrix, pass the check of the grid fields."""
    path = write(tmp_path, "a.mha", oriented_image(np.eye(3)))
    path.write_bytes(path.read_bytes().replace(b"Offset =", b"Position =").replace(b"TransformMatrix =",
                                                                                    b"Orientation ="))
    assert read_image(path).GetSize() == (20, 24, 30)


@pytest.mark.parametrize("name", ["LOC%sAL", "LOC%nAL", "scan%20s.raw", "slice%03d.raw"])
def test_a_metaimage_data_file_name_with_a_percent_is_refused_not_crashed_on(tmp_path, name):
    """MetaIO takes an ElementDataFile with a "%" for the pattern of numbered files: a header whose LOCAL was damaged
    into "LOC%sAL" killed the process (segmentation fault); a numbered pattern without its numbers was "unreadable
    image (ITK ERROR: MetaImageIO: File cannot be read ...)" after MetaIO's "cannot construct file". Run in a child
    process, which the crash would kill."""
    path = tmp_path / "a.mha"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkInt16), str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementDataFile = LOCAL", b"ElementDataFile = " + name.encode()))
    child = ("import sys\nfrom SpineLabelLib.io import read_image, InputError\n"
             "try:\n    read_image(sys.argv[1])\nexcept InputError as err:\n    print(err)\n")
    run = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == ""
    if name == "slice%03d.raw":  # a numbered pattern, each of its numbers optional, whose files are missing
        assert run.stdout.startswith(f"{path}: its voxels are in numbered files ('{name}'), the first of which, "
                                     f"{tmp_path / 'slice001.raw'}, is missing")
    else:
        assert run.stdout.startswith(f"{path}: its ElementDataFile '{name}' holds a '%'")


@pytest.mark.parametrize("suffix, named", [(".mhd", "slice%03d.raw 1 8 1"), (".mhd", "slice%03d.raw 1"),
                                           (".mhd", "slice%03d.raw"), (".mhd", "my dir/slice%03d.raw 1 8 1"),
                                           (".mhd", "LIST"), (".mhd", "LIST 2D"), (".nhdr", "LIST"),
                                           (".nhdr", "LIST 2")])
def test_numbered_and_listed_data_files_in_each_form_are_read(tmp_path, suffix, named):
    """MetaIO reads a numbered pattern with its first, last and step numbers each left out, and a folder with a space
    in its name; MetaImage's "LIST 2D" and NRRD's "LIST 2" give the dimension of each listed file: such headers were
    refused (no pattern: "holds a '%' ... it is none"; a list: "its voxels are in .../LIST 2D, which is missing")."""
    image = sitk.GetImageFromArray(np.arange(8 * 7 * 6, dtype=np.int16).reshape(8, 7, 6))
    image.CopyInformation(oriented_image(np.eye(3), size=(6, 7, 8)))
    write(tmp_path, "a" + suffix, image)
    folder = tmp_path / "my dir" if named.startswith("my dir") else tmp_path
    folder.mkdir(exist_ok=True)
    voxels = (tmp_path / "a.raw").read_bytes()
    for k in range(8):
        (folder / f"slice{k + 1:03d}.raw").write_bytes(voxels[k * 84 : (k + 1) * 84])
    key = "ElementDataFile = " if suffix == ".mhd" else "data file: "
    header = (tmp_path / ("a" + suffix)).read_text().splitlines()
    lines = [key + named if line.startswith(key) else line for line in header]
    if named.startswith("LIST"):
        lines += [f"slice{k + 1:03d}.raw" for k in range(8)]
    (tmp_path / ("a" + suffix)).write_text("\n".join(lines) + "\n")
    (tmp_path / "a.raw").unlink()
    read = read_image(tmp_path / ("a" + suffix))
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_a_compressed_mha_without_its_compressed_size_is_refused(tmp_path, capfd):
    """MetaIO cannot inflate the voxels of a compressed .mha whose header gives no CompressedDataSize: it printed
    "Uncompress failed" and ITK gave other voxels (memory it had not filled), read without a word."""
    path = write(tmp_path, "a.mha", sitk.Cast(oriented_image(np.eye(3)), sitk.sitkInt16))
    sitk.WriteImage(sitk.ReadImage(str(path)), str(path), True)
    header = path.read_bytes()
    path.write_bytes(re.sub(rb"CompressedDataSize = (\d+)\n", b"", header, count=1))
    size = int(re.search(rb"CompressedDataSize = (\d+)", header)[1])
    capfd.readouterr()
    with pytest.raises(InputError, match=re.escape(f"{path}: compressed MetaImage whose header gives no "
                                                   f"CompressedDataSize") + f".*'CompressedDataSize = {size}'"):
        read_image(path)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("old, new, reason", [
    (b"type: short", b"type: shrot", 'couldn\'t parse type "shrot"'),
    (b"endian: little", b"endian: littel", 'couldn\'t parse endian "littel"'),
    (b"kinds: domain", b"kinds: domian", 'couldn\'t parse "domian" kind 1 of 3'),  # grid fields are refused before
])
def test_a_damaged_nrrd_header_is_refused_with_teems_reason(tmp_path, old, new, reason):
    """ITK's message for a NRRD header it cannot parse says only "NrrdImageIO: ReadImageInformation: Error reading
    FILE"; the reason (which field, which value) is in teem's lines below it."""
    path = tmp_path / "a.nrrd"
    image = sitk.Image([8, 8, 8], sitk.sitkInt16)
    image.SetOrigin((-30.0, 20.0, -100.0))
    sitk.WriteImage(image, str(path))
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: unreadable image \(NRRD: .*{re.escape(reason)}"):
        read_image(path)


@pytest.mark.parametrize("suffix, key", [(".mhd", "ElementDataFile = "), (".nhdr", "data file: ")])
def test_a_missing_data_file_whose_name_has_spaces_is_named(tmp_path, suffix, key):
    """A header naming "../data dir/my data.raw" is read when the file is there; when it is missing, ITK said only that
    the header could not be read (names with spaces were not checked)."""
    write(tmp_path, "a" + suffix, sitk.Image([8, 8, 8], sitk.sitkInt16))
    header = tmp_path / "sub" / ("a" + suffix)
    header.parent.mkdir()
    (tmp_path / "data dir").mkdir()
    (tmp_path / "a.raw").rename(tmp_path / "data dir" / "my data.raw")
    lines = [(key + "../data dir/my data.raw") if line.startswith(key) else line
             for line in (tmp_path / ("a" + suffix)).read_text().splitlines()]
    header.write_text("\n".join(lines) + "\n")
    assert read_image(header).GetSize() == (8, 8, 8)
    (tmp_path / "data dir" / "my data.raw").unlink()
    data = re.escape(str(header.parent / "../data dir/my data.raw"))
    with pytest.raises(InputError, match=f"its voxels are in {data}, which is missing"):
        read_image(header)


def test_a_folder_of_a_report_alone_is_not_said_to_hold_damaged_files(tmp_path):
    """A folder holding a valid structured report and no image (the wrong folder given): the refusal called the report
    'cut short or damaged'."""
    (tmp_path / "sr").mkdir()
    dicom_file_of_no_image(tmp_path / "sr" / "SR000001.dcm", b"1.2.840.10008.5.1.4.1.1.88.67", b"1.2.3.4.99")
    with pytest.raises(InputError, match="folder holds no DICOM series") as raised:
        read_image(tmp_path / "sr")
    assert "holding no image, as a report does: SR000001.dcm" in str(raised.value)


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_damaged_float64_nifti_gz_is_refused_as_such(tmp_path, damage):
    """A 3D float64 NIfTI-1 is read by ``_read_float64_nifti1``: cut short, gzip's EOFError (a byte flipped: its
    zlib.error or BadGzipFile) escaped it, where the gzip size field was checked before."""
    values = np.random.default_rng(0).normal(size=(40, 40, 40)) * 100
    nibabel.save(nibabel.Nifti1Image(values, np.eye(4)), tmp_path / "f64.nii.gz")
    data = bytearray((tmp_path / "f64.nii.gz").read_bytes())
    if damage == "cut":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0xFF
    (tmp_path / "f64.nii.gz").write_bytes(bytes(data))
    with pytest.raises(InputError, match="f64.nii.gz: truncated or corrupt compressed file"):
        read_image(tmp_path / "f64.nii.gz")


@pytest.mark.parametrize("name", ["v.nhdr", "v.mhd"])
def test_a_damaged_compressed_voxels_file_of_a_detached_header_is_named(tmp_path, name):
    """A byte flipped in the .raw.gz of a .nhdr (the .zraw of a .mhd): the message named the header alone, where a
    voxels file cut short is named ('its voxels file F is truncated')."""
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(30 * 24 * 20, dtype=np.int16).reshape(30, 24, 20)),
                    str(tmp_path / name), useCompression=True)
    data = next(p for p in tmp_path.iterdir() if p.name != name)
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    with pytest.raises(InputError, match=re.escape(f"{name}: its voxels file {data} is truncated or corrupt")):
        read_image(tmp_path / name)


def test_a_metaimage_header_without_a_last_newline_is_checked(tmp_path):
    """A .mhd whose last line (ElementDataFile) ends without a newline, as a header written by hand may: its missing
    voxels file was named before this stop's _header_fields, then ITK's 'File cannot be read' alone; and its lack
    of a TransformMatrix went without the note."""
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 24, 20), np.int16)), str(tmp_path / "a.mhd"))
    text = "".join(line for line in (tmp_path / "a.mhd").read_text().splitlines(True)
                   if not line.startswith("TransformMatrix")).rstrip("\n")
    (tmp_path / "a.mhd").write_text(text)
    assert read_notes(read_image(tmp_path / "a.mhd"))[0].startswith("its header gives no orientation")
    (tmp_path / "a.raw").unlink()
    with pytest.raises(InputError, match=re.escape(f"a.mhd: its voxels are in {tmp_path / 'a.raw'}, which is missing")):
        read_image(tmp_path / "a.mhd")


@pytest.mark.parametrize("named, error", [("slice%0300d.raw", "is missing"), ("x" * 300 + ".raw", "which is missing"),
                                          ("slice%999999999999d.raw", "holds a '%'")])
def test_a_metaimage_data_file_name_too_long_is_refused(tmp_path, named, error):
    """A damaged or odd ElementDataFile whose name (or first numbered file's) is longer than a file name may be: the
    OSError of ENAMETOOLONG escaped (a width of 10^12: a MemoryError)."""
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 24, 20), np.int16)), str(tmp_path / "c.mhd"))
    header = (tmp_path / "c.mhd").read_text()
    (tmp_path / "c.mhd").write_text(header.replace("ElementDataFile = c.raw", f"ElementDataFile = {named}"))
    with pytest.raises(InputError, match=re.escape(error)):
        read_image(tmp_path / "c.mhd")


def test_a_dicom_storage_class_is_read_from_the_file_meta_not_the_preamble():
    """The preamble's 128 bytes are free (a TIFF header in a file that is both): the search began there."""
    preamble = bytearray(128)
    preamble[10:22] = b"\x02\x00\x02\x00UI\x04\x009.9\0"
    meta = b"\x02\x00\x02\x00UI\x06\x001.2.3\0"
    assert io._storage_class(bytes(preamble) + b"DICM" + meta) == "1.2.3"


def test_a_compressed_metaimage_is_inflated_to_its_compressed_size_alone(tmp_path):
    """MetaIO reads CompressedDataSize bytes; two bytes after them that begin as a gzip member did were taken for one,
    and the valid file refused as corrupt."""
    values = np.arange(30 * 24 * 20, dtype=np.int16).reshape(30, 24, 20)
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "c.mha"), useCompression=True)
    (tmp_path / "c.mha").write_bytes((tmp_path / "c.mha").read_bytes() + b"\x1f\x8b and more")
    assert np.array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "c.mha")), values)
