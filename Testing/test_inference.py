"""Network input and inference: intensity normalisation per modality, the context a short scan is given,
reduced-precision inference."""

import contextlib
import platform
import threading
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SpineLabelLib import inference
from SpineLabelLib.inference import (CT_WINDOW_HU, Cancelled, Prediction, autocast, looks_like_offset_ct,
                                     modality_of, native_bfloat16, normalise, predict, read_modality, resolve_device,
                                     reuse_freed_memory)
from SpineLabelLib.network import SpineUNet
from SpineLabelLib.phantom import make_phantom
from SpineLabelLib.pipeline import LEFT_RIGHT_VOXELS, MIN_CONTEXT_VOXELS, get_model, with_context
from SpineLabelLib.vertebrae import BODY, POSTERIOR


def test_modality_from_the_intensities():
    rng = np.random.default_rng(0)
    inside = rng.normal(40, 20, (30, 40, 40))  # soft tissue, HU
    inside[:, :, :6] = -100  # fat
    inside[10:20, 15:25, 15:25] = 700  # bone
    assert modality_of(np.pad(inside, 4, constant_values=-1024.0)) == "CT"
    assert modality_of(np.pad(inside, 4, constant_values=-3024.0)) == "CT"  # the scanner's padding
    assert modality_of(inside) == "CT"  # cropped inside the body: no air, but fat and bone
    assert modality_of(inside[:, :, 6:]) == "MR"  # neither air nor fat: nothing says Hounsfield units
    mr = rng.uniform(0, 4000, (30, 40, 40))
    assert modality_of(mr) == "MR"
    assert modality_of(mr - 47) == "MR"  # a slightly negative offset
    ringing = mr.copy()
    ringing[::10, ::10, 0] = -300  # interpolation overshoot at a few sharp edges
    assert modality_of(ringing) == "MR"
    ringing[::10, ::10, 0] = -700  # ... of an MR in thousands, resampled with B-splines: few voxels, not air
    assert modality_of(ringing) == "MR"
    assert modality_of((mr - mr.mean()) / mr.std()) == "MR"  # normalised to zero mean and unit variance


def test_mr_padding_is_left_out_of_the_percentiles():
    """An MR of 0-1000 padded with -1024 (read as CT, warned; then given as MR) was mapped with the padding as its
    0.5th percentile, and the network found no spine; its own background of 0 is no padding and stays in."""
    rng = np.random.default_rng(1)
    mr = rng.uniform(0.0, 1000.0, (20, 30, 30)).astype(np.float32)
    mr[:, :, :5] = 0.0  # background
    padded = np.pad(mr, ((0, 0), (6, 6), (6, 6)), constant_values=-1024.0)
    np.testing.assert_allclose(normalise(padded)[:, 6:-6, 6:-6], normalise(mr), atol=1e-6)
    assert not normalise(padded)[:, :6].any()
    assert normalise(mr).min() == 0.0 and np.percentile(mr, 0.5) == 0.0  # the background is the scan's own 0


def test_hot_voxels_far_above_the_scan_are_left_out_of_the_percentiles():
    """1 % of an MR's voxels at 50 times its maximum (hot voxels, a fill value) made its 99.5th percentile: the scan
    was mapped into [0, 0.02] and three real MRI lost their spine (one gained two misnamed vertebrae). They map to 1
    now, the scan as without them; a maximum the scan reaches itself (saturation) stays in the percentiles."""
    rng = np.random.default_rng(2)
    mr = rng.uniform(0.0, 1000.0, (20, 30, 30)).astype(np.float32)
    mr[:, :, :5] = 0.0  # background
    spots = rng.random(mr.shape) < 0.01
    hot = np.where(spots, np.float32(50_000.0), mr)
    np.testing.assert_allclose(normalise(hot)[~spots], normalise(mr)[~spots], atol=0.01)
    assert (normalise(hot)[spots] == 1.0).all()
    saturated = np.minimum(mr, 990.0)  # 1 % of the voxels at the maximum, next to the rest
    lo, hi = np.percentile(saturated, [0.5, 99.5])
    assert hi == 990.0
    np.testing.assert_allclose(normalise(saturated), np.clip((saturated - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_the_modality_read_says_whether_the_intensities_say_it_clearly():
    rng = np.random.default_rng(0)
    body = rng.normal(40, 20, (30, 40, 40))  # soft tissue, HU
    body[:, :, :6] = -100  # fat
    body[10:20, 15:25, 15:25] = 700  # bone
    air = rng.normal(-1000, 20, (30, 40, 8))
    assert read_modality(np.concatenate([air, body], axis=2)) == ("CT", True)
    assert read_modality(np.pad(body, 4, constant_values=-1024.0)) == ("CT", True)  # padding, but fat in HU
    assert read_modality(np.maximum(np.concatenate([air, body], axis=2), -1000)) == ("CT", True)  # air clipped
    assert read_modality(body) == ("CT", False)  # fat and bone alone
    mr = rng.uniform(0, 1000, (30, 40, 40))
    assert read_modality(mr) == ("MR", True)
    # an MR padded as a CT is (a real MR padded so lost two vertebrae as a CT): nothing else lies below -50. A CT
    # whose air is one value and that holds no fat in HU has its skin between air and tissue
    assert read_modality(np.pad(mr, 4, constant_values=-1024.0)) == ("MR", False)
    lean = np.concatenate([np.full((30, 40, 8), -1000.0), np.full((30, 40, 1), -500.0), body[:, :, 6:]], axis=2)
    assert read_modality(lean) == ("CT", False)
    assert read_modality(mr - mr.mean()) == ("CT", False)  # an MR shifted to zero mean in its own units
    assert read_modality(mr / 10 - 60) == ("MR", False)  # negative beyond an offset, no bone in HU


def test_a_ct_stored_1024_above_hounsfield_units_is_recognised():
    """A CT stored as HU + 1024 without a rescale intercept reads as MR, clearly (no voxel below 0): the real ones so
    stored were labelled as MR without a word. Its body of soft tissue near 1024 tells it from an MR of 8 or 12 bits."""
    rng = np.random.default_rng(0)
    body = rng.normal(40, 20, (30, 40, 40))  # soft tissue, HU
    body[:, :, :6] = -100  # fat
    body[10:20, 15:25, 15:25] = 700  # bone
    ct = np.concatenate([rng.normal(-1000, 20, (30, 40, 8)), body], axis=2)
    stored = np.clip(np.round(ct) + 1024, 0, 4095).astype(np.uint16)
    assert read_modality(stored) == ("MR", True)
    assert looks_like_offset_ct(stored)
    stored[15, 20, 20:24] = 13_000  # a screw on an extended CT scale: a few voxels beyond 12 bits
    assert looks_like_offset_ct(stored)
    assert not looks_like_offset_ct(ct)  # in Hounsfield units: read as CT already
    mr = np.concatenate([np.abs(rng.normal(0, 5, (30, 40, 8))), rng.uniform(200, 1000, (30, 40, 40))], axis=2)
    for scale in (0.25, 1.0, 1.7, 4.0):  # 8-bit, 10-bit and 12-bit magnitudes; at 1.7 its median lies near 1024
        assert not looks_like_offset_ct(np.round(mr * scale))


def test_a_ct_stored_1024_above_hounsfield_units_signed_is_recognised():
    """Stored signed (int16) without clipping, the noise of a CT's air reaches below 0 (sub-verse014 so stored: 1 % of
    its voxels, down to -267): such a CT was read as MR without the warning, the 'nothing below 0' test failing it."""
    rng = np.random.default_rng(0)
    body = rng.normal(40, 20, (30, 40, 40))  # soft tissue, HU
    body[:, :, :6] = -100  # fat
    body[10:20, 15:25, 15:25] = 700  # bone
    ct = np.concatenate([rng.normal(-1000, 40, (30, 40, 8)), body], axis=2)
    stored = (np.round(ct) + 1024).astype(np.int16)
    assert stored.min() < 0 and read_modality(stored)[0] == "MR"
    assert looks_like_offset_ct(stored)
    mr = np.concatenate([rng.normal(0, 5, (30, 40, 8)), rng.uniform(200, 1000, (30, 40, 40))], axis=2)
    for scale in (0.25, 1.0, 1.7, 4.0):  # signed MR magnitudes with a noisy background of both signs: no CT
        assert not looks_like_offset_ct(np.round(mr * scale))


def test_ct_window_is_the_same_whatever_the_field_of_view():
    rng = np.random.default_rng(0)
    body = rng.normal(40, 20, (20, 30, 30))  # soft tissue, HU
    body[5:15, 10:20, 10:20] = 700  # bone
    with_air = np.pad(body, 10, constant_values=-1000.0)
    with_air[with_air == -1000.0] += rng.normal(0, 20, int((with_air == -1000.0).sum()))  # air, not padding
    window = normalise(with_air, CT_WINDOW_HU)
    crop = normalise(body, CT_WINDOW_HU)
    assert window.dtype == np.float32 and window.min() == 0.0 and window.max() <= 1.0
    assert crop[10, 15, 15] == pytest.approx(window[20, 25, 25]) == pytest.approx((700 + 1000) / 2200)
    # the percentile mapping of the same two images differs: it follows the field of view
    assert abs(normalise(body)[2, 2, 2] - normalise(with_air)[12, 12, 12]) > 0.2


@pytest.mark.skipif(not native_bfloat16(torch.device("cpu")),
                    reason="this CPU has no native bfloat16 (AVX-512 BF16 or AMX): inference runs in float32 only")
def test_reduced_precision_agrees_with_float32(monkeypatch):
    """bfloat16 autocast (where the CPU runs it natively) labels the same tissue as float32 almost everywhere."""
    model = get_model(None, "cpu")
    phantom = make_phantom(modality="ct", fov="lumbar", spacing=(2.0, 2.0, 2.0), seed=2)
    volume = normalise(sitk.GetArrayFromImage(phantom.image), model.ct_window_hu)
    fast = predict(model, volume, torch.device("cpu"))
    monkeypatch.setattr(inference, "autocast", lambda device: contextlib.nullcontext())
    exact = predict(model, volume, torch.device("cpu"))
    assert (fast.tissue == exact.tissue).mean() > 0.99
    difference = np.abs(fast.body_probability.astype(np.float32) - exact.body_probability.astype(np.float32))
    assert difference.mean() < 0.01


def test_blended_windows_give_consistent_probabilities():
    """Over several overlapping windows: the tissue class is the most probable one, vertebra probability includes
    body probability, the level output is a blend of log-probabilities, all on the documented grids and dtypes."""
    model = get_model(None, "cpu")
    phantom = make_phantom(modality="mr", fov="lumbar", spacing=(2.0, 2.0, 2.0), seed=3)
    volume = normalise(sitk.GetArrayFromImage(phantom.image))
    out = predict(model, volume, torch.device("cpu"), window=(48, 64, 64), overlap=16)
    half = tuple((s + 1) // 2 for s in volume.shape)
    assert out.tissue.shape == out.body_probability.shape == out.bone_probability.shape == volume.shape
    assert out.level_log_probs.shape == (model.network.level_head.out_channels, *half)
    assert (out.tissue.dtype, out.body_probability.dtype, out.level_log_probs.dtype) == (np.uint8, np.float16,
                                                                                          np.float16)
    body = out.body_probability.astype(np.float32)
    bone = out.bone_probability.astype(np.float32)
    assert (body >= 0).all() and (bone <= 1.001).all() and (bone >= body - 1e-3).all()
    assert (body[out.tissue == BODY] >= 0.25 - 1e-3).all()  # the argmax of four classes holds a quarter at least
    assert (body[out.tissue == 0] <= 0.5 + 1e-3).all()
    assert (out.tissue == BODY).sum() > 1000 and (out.tissue == POSTERIOR).any()
    total = np.exp(out.level_log_probs.astype(np.float32)).sum(axis=0)
    assert (total <= 1.01).all() and total.max() > 0.99  # a geometric mean where windows overlap, 1 where one window


def test_levels_only_pass_gives_the_same_levels_and_nothing_else():
    model = get_model(None, "cpu")
    phantom = make_phantom(modality="mr", fov="lumbar", spacing=(2.0, 2.0, 2.0), seed=3)
    volume = normalise(sitk.GetArrayFromImage(phantom.image))
    whole = predict(model, volume, torch.device("cpu"), window=(48, 64, 64), overlap=16)
    levels = predict(model, volume, torch.device("cpu"), window=(48, 64, 64), overlap=16, levels_only=True)
    assert levels.tissue is None and levels.body_probability is None and levels.bone_probability is None
    np.testing.assert_allclose(levels.level_log_probs.astype(np.float32), whole.level_log_probs.astype(np.float32),
                               atol=1e-2)


class _RampNetwork(torch.nn.Module):
    """Stands in for the network: tissue logit c is c times the input, level logit l is l times the input sampled
    at every other voxel, so every window gives the same value at a voxel and the blend must give it back there."""

    divisor = 16
    tissue_head = torch.nn.Conv3d(1, 4, 1)
    level_head = torch.nn.Conv3d(1, 6, 1)

    def forward(self, x, levels_only=False):
        tissue = None if levels_only else x * torch.arange(4.0).view(1, 4, 1, 1, 1)
        level = x[:, :, ::2, ::2, ::2] * torch.arange(6.0).view(1, 6, 1, 1, 1)
        return tissue, level


def test_every_voxel_gets_the_blend_of_the_windows_over_it():
    """Windows in five rows along z, the last one 8 slices on: the blend held one row at a time puts each voxel's
    value back in its place, at full and at half resolution. On every axis the last window would start at an odd
    voxel (103, 7 and 27), half a voxel off the half-resolution grid."""
    volume = np.random.default_rng(0).random((151, 71, 91), dtype=np.float32)
    out = predict(SimpleNamespace(network=_RampNetwork()), volume, torch.device("cpu"), window=(48, 64, 64),
                  overlap=16)
    logits = torch.from_numpy(volume)[None] * torch.arange(4.0).view(4, 1, 1, 1)
    probability = torch.softmax(logits, dim=0).numpy()
    assert (out.tissue == 3).all()
    assert np.allclose(out.body_probability, probability[BODY], atol=1e-3)
    assert np.allclose(out.bone_probability, probability[BODY] + probability[POSTERIOR], atol=1e-3)
    half = torch.from_numpy(volume[::2, ::2, ::2])[None] * torch.arange(6.0).view(6, 1, 1, 1)
    assert np.allclose(out.level_log_probs, torch.log_softmax(half, dim=0).numpy(), atol=1e-2)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is for glibc only")
def test_reuse_freed_memory_is_accepted_by_glibc():
    assert reuse_freed_memory()


def test_reuse_freed_memory_finds_numpy_s_multiarray_beside_a_stub_core(monkeypatch):
    """numpy 1.26.1-1.26.4 (those of Slicer 5.6 and 5.8) hold an empty package numpy._core, which torch imports: the
    labelling process failed at its start with "module 'numpy._core' has no attribute 'multiarray'"."""
    monkeypatch.setattr(np, "_core", ModuleType("numpy._core"), raising=False)
    assert reuse_freed_memory()


def test_short_axes_cut_through_the_body_are_extended_by_reflection():
    volume = np.random.default_rng(0).uniform(0.2, 1.0, (35, 57, 30)).astype(np.float32)
    extended, inner = with_context(volume)
    # z and y are extended; x, the left-right axis of a sagittal stack, only when thinner than MIN_CONTEXT_VOXELS[2]
    assert extended.shape == (*MIN_CONTEXT_VOXELS[:2], 30)
    assert with_context(volume[:, :, :16])[0].shape == MIN_CONTEXT_VOXELS
    assert all(s.start % 2 == 0 for s in inner)  # the half-resolution level grid stays aligned
    np.testing.assert_array_equal(extended[inner], volume)
    z, y, x = inner
    np.testing.assert_array_equal(extended[z.start - 1, y, x], volume[1])  # a mirror, not zeros
    np.testing.assert_array_equal(extended[z.stop, y, x], volume[-2])
    zeros, same = with_context(volume, zero_ends=True)  # the second reading of a short view's levels
    assert same == inner and zeros.shape == extended.shape
    assert not zeros[: z.start].any() and not zeros[z.stop :].any()
    np.testing.assert_array_equal(zeros[z], extended[z])  # the view and its extension front to back as before
    # air on one side (the body ends inside the image): only the cut side is extended
    volume[:, :4] = 0.0
    extended, inner = with_context(volume)
    assert inner[1] == slice(0, 57) and extended.shape[1] == MIN_CONTEXT_VOXELS[1]
    volume[:, -4:] = 0.0  # air on both sides: nothing to extend along y
    assert with_context(volume)[0].shape == (MIN_CONTEXT_VOXELS[0], 57, 30)
    big = np.ones((90, 80, LEFT_RIGHT_VOXELS), dtype=np.float32)
    assert with_context(big)[0] is big


def test_the_planes_of_the_grid_beyond_the_scan_take_the_plane_next_to_them():
    """88 slices 1 mm apart span 87 mm; the 2 mm model grid rounds that up to 88 mm, so its top plane lies beyond the
    scan's last slice and holds the fill value. It takes the values of the plane below it; a scan of 87 slices
    (86 mm, a whole number of model voxels) has no such plane."""
    from SpineLabelLib.io import canonical_grid, extend_to_grid_ends, resample_to_grid

    for slices, beyond in ((88, True), (87, False)):
        image = sitk.GetImageFromArray(np.random.default_rng(0).uniform(1.0, 2.0, (slices, 10, 10)).astype(np.float32))
        image.SetSpacing((2.0, 2.0, 1.0))
        grid = canonical_grid(image, 2.0)
        volume = sitk.GetArrayFromImage(resample_to_grid(image, grid, default=0.0))
        before = volume.copy()
        assert volume.shape == (44 + beyond, 10, 10) and volume[-1].any() != beyond and volume[0].all()
        extend_to_grid_ends(volume, image, grid)
        np.testing.assert_array_equal(volume[:-1], before[:-1])
        np.testing.assert_array_equal(volume[-1], volume[-2] if beyond else before[-1])


def test_a_narrow_stack_is_padded_with_zeros_left_and_right_as_in_training():
    volume = np.random.default_rng(0).uniform(0.2, 1.0, (90, 80, 30)).astype(np.float32)
    extended, inner = with_context(volume)
    assert extended.shape == (90, 80, LEFT_RIGHT_VOXELS) and inner[2].start % 2 == 0
    np.testing.assert_array_equal(extended[inner], volume)
    assert not extended[:, :, : inner[2].start].any() and not extended[:, :, inner[2].stop :].any()
    assert with_context(volume[:40])[0].shape[2] == 30  # a small field of view all round: not padded left and right


def test_a_stack_narrow_front_to_back_is_padded_with_zeros_front_and_back():
    """A coronal stack (60 mm front to back, the whole lumbar spine head to feet) cut through the body in front and
    behind: given its mirror image there, the network saw bodies where the canal and the belly are, and the spine gate
    refused 4 of 10 real lumbar MRI so cut as no spine. It is padded with zeros, as a narrow sagittal stack is left
    and right; a small field of view all round is still extended by reflection."""
    volume = np.random.default_rng(0).uniform(0.2, 1.0, (120, 30, 60)).astype(np.float32)
    extended, inner = with_context(volume)
    assert extended.shape == (120, MIN_CONTEXT_VOXELS[1], LEFT_RIGHT_VOXELS)
    assert all(s.start % 2 == 0 for s in inner)
    np.testing.assert_array_equal(extended[inner], volume)
    assert not extended[:, : inner[1].start].any() and not extended[:, inner[1].stop :].any()
    small, small_inner = with_context(volume[:40])  # short head to feet too: mirrored along both, as before
    assert small.shape[:2] == MIN_CONTEXT_VOXELS[:2]
    z, y, x = small_inner
    np.testing.assert_array_equal(small[z, y.start - 1, x], volume[:40, 1])


def test_prediction_inside_keeps_the_half_resolution_grid_aligned():
    shape, inner = (80, 80, 90), (slice(22, 57), slice(12, 69), slice(0, 90))
    level = np.zeros((2, 40, 40, 45), dtype=np.float16)
    level[0] = np.arange(40)[:, None, None]  # half-resolution z index
    level[1] = np.arange(40)[None, :, None]  # half-resolution y index
    full = Prediction(np.zeros(shape, np.uint8), None, None, level).inside(inner)
    assert full.tissue.shape == (35, 57, 90) and full.body_probability is None
    assert full.level_log_probs.shape == (2, 18, 29, 45)
    assert full.level_log_probs[0, 0, 0, 0] == 11 and full.level_log_probs[1, 0, 0, 0] == 6


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_a_short_scan_is_segmented_with_mirrored_context(modality):
    """70 x 112 x 112 mm cuts of three lumbar phantoms: filled out with zeros, the network takes the edges for air and
    finds far less vertebral body than when the window is filled with the mirrored image (1.3 to 2 times as much)."""
    model = get_model(None, "cpu")
    found = {"zeros": 0, "mirrored": 0}
    for seed in (1, 2, 3):
        phantom = make_phantom(modality=modality, fov="lumbar", spacing=(2.0, 2.0, 2.0), seed=seed)
        c = np.argwhere(sitk.GetArrayFromImage(phantom.labels) > 0).mean(axis=0).astype(int)
        box = (slice(c[0] - 17, c[0] + 18), slice(c[1] - 28, c[1] + 28), slice(c[2] - 28, c[2] + 28))
        volume = normalise(sitk.GetArrayFromImage(phantom.image)[box], model.ct_window_hu if modality == "ct" else None)
        found["zeros"] += np.count_nonzero(predict(model, volume, torch.device("cpu")).tissue == BODY)
        extended, inner = with_context(volume)
        mirrored = predict(model, extended, torch.device("cpu")).inside(inner)
        found["mirrored"] += np.count_nonzero(mirrored.tissue == BODY)
    assert found["mirrored"] > 1.3 * found["zeros"]


def test_a_cancel_stops_the_network_between_its_windows():
    """``cancel`` is polled before each window: True after the first two stops the run there."""
    volume = np.random.default_rng(0).random((151, 71, 91), dtype=np.float32)  # five rows of four windows
    done = []
    with pytest.raises(Cancelled):
        predict(SimpleNamespace(network=_RampNetwork()), volume, torch.device("cpu"), window=(48, 64, 64), overlap=16,
                progress=lambda fraction, message: done.append(fraction), cancel=lambda: len(done) == 2)
    assert len(done) == 2 and done[-1] < 1.0


def test_a_cancel_is_polled_and_progress_reported_within_a_window():
    """A window of the default size takes 3 to 9 s on a 2-core CPU: ``cancel`` is polled before each layer of the
    network, not only before each window (a cancel waited for the window's end), and progress comes within the
    window too, rising (an image of one window showed none between the network's start and its end)."""
    torch.manual_seed(0)
    model = SimpleNamespace(network=SpineUNet().eval())
    volume = np.random.default_rng(0).random((32, 48, 48), dtype=np.float32)  # one window
    polls, done = [], []
    predict(model, volume, torch.device("cpu"), progress=lambda fraction, message: done.append((fraction, message)),
            cancel=lambda: polls.append(1) is not None)
    fractions = [f for f, _ in done]
    assert len(polls) > 10 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len([f for f in fractions if 0 < f < 1]) >= 4 and {m for _, m in done} == {"network window 1/1"}
    polls.clear()
    with pytest.raises(Cancelled):  # True at the third poll: inside the window
        predict(model, volume, torch.device("cpu"), cancel=lambda: polls.append(1) or len(polls) >= 3)
    assert len(polls) == 3
    assert all(not layer._forward_pre_hooks for layer in model.network.modules())  # hooks removed, also on a cancel
    # the hooks of one labelling leave another thread's alone: both run the one cached network
    other = []
    with inference._layers_polled(model.network, lambda: True, lambda f, m: other.append(f), [0], 1):
        thread = threading.Thread(target=lambda: other.append(predict(model, volume, torch.device("cpu"))))
        thread.start()
        thread.join(120)
    assert len(other) == 1 and isinstance(other[0], Prediction)


def test_a_window_is_rounded_up_to_the_network_and_the_overlap_checked():
    model = get_model(None, "cpu")
    volume = np.random.default_rng(0).random((50, 70, 40), dtype=np.float32)
    whole = predict(model, volume, torch.device("cpu"))
    odd = predict(model, volume, torch.device("cpu"), window=(40, 64, 64), overlap=8)  # 40 -> 48
    assert odd.tissue.shape == whole.tissue.shape == volume.shape
    with pytest.raises(ValueError, match="overlap 48"):
        predict(model, volume, torch.device("cpu"), window=(48, 48, 48), overlap=48)
    slab = predict(model, volume[:, :, :6], torch.device("cpu"))  # a thin sagittal slab: one window across, no overlap
    assert slab.tissue.shape == (50, 70, 6)


def test_one_gpu_has_one_device_name(monkeypatch):
    """"cuda" and "cuda:0" are the same GPU: both resolve to cuda:0, so the model cache holds one copy."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == resolve_device("cuda:0") == torch.device("cuda", 0)
    assert str(resolve_device("auto")) == "cuda:0"
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="'cuda:99' was asked for but there are 2 CUDA GPUs"):  # not at its first use
        resolve_device("cuda:99")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda:1")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N', not 'gpu'"):
        resolve_device("GPU")


def test_float32_can_be_forced_where_bfloat16_is_native(monkeypatch):
    from SpineLabelLib import inference

    monkeypatch.setattr(inference, "native_bfloat16", lambda device: True)
    monkeypatch.delenv(inference.FLOAT32_VARIABLE, raising=False)  # a run with it set failed here
    with autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(inference.FLOAT32_VARIABLE, "1")
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_hot_voxels_are_left_out_beside_padding_or_a_few_brighter_voxels():
    """A fill value far above the scan is left out when the scan is padded far below as well (each hid the other: the
    padding's spread made the fill value near, the fill value's made the padding near), or when a few voxels lie above
    it (its value no longer the maximum)."""
    rng = np.random.default_rng(3)
    mr = rng.uniform(0.0, 1000.0, (20, 30, 30)).astype(np.float32)
    spots = rng.random(mr.shape) < 0.01
    padded = mr.copy()
    padded[:, :, :5] = -1024.0
    hot = np.where(spots, np.float32(50_000.0), padded)
    scan = ~spots & (padded > -1024)
    np.testing.assert_allclose(normalise(hot)[scan], normalise(padded)[scan], atol=0.01)
    brighter = np.where(spots, np.float32(50_000.0), mr)
    brighter[0, 0, :3] = 60_000.0
    scan = ~spots & (brighter < 60_000)
    np.testing.assert_allclose(normalise(brighter)[scan], normalise(mr)[scan], atol=0.01)


def test_the_modality_read_and_the_offset_ct_test_at_their_limits():
    """Air is air at a median of -800 or below, not -750; more than 0.1 % of voxels beyond 12 bits is no CT stored
    1024 above Hounsfield units (a few are metal)."""
    rng = np.random.default_rng(0)
    mr = rng.uniform(0, 150, 100_000)
    mr[:2000] = rng.uniform(-780, -720, 2000)  # 2 % noisy 'air' at -750: not CT air, and MR not clearly
    assert read_modality(mr) == ("MR", False)
    mr[:2000] -= 100  # at -850 it is
    assert read_modality(mr) == ("CT", True)
    body = rng.normal(40, 20, (30, 40, 40))
    body[:, :, :6] = -100
    body[10:20, 15:25, 15:25] = 700
    stored = np.clip(np.round(np.concatenate([rng.normal(-1000, 20, (30, 40, 8)), body], axis=2)) + 1024, 0, 4095)
    assert looks_like_offset_ct(stored)
    stored.flat[:: 50] = 13_000  # 2 % of the voxels beyond 12 bits
    assert not looks_like_offset_ct(stored)
    ct = rng.normal(40, 20, 100_000)  # air clipped to one value (-1000), and fat in 1.5 % of the voxels: clearly CT
    ct[:10_000], ct[10_000:11_500] = -1000, rng.uniform(-150, -60, 1500)
    assert read_modality(ct) == ("CT", True)


def test_a_device_is_named_exactly():
    for name in ("mps", "cuda:x", "cpu0", "", "cuda:"):
        with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            resolve_device(name)
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_blended_logits_give_the_lowest_class_on_a_tie_and_vertebra_as_body_plus_posterior():
    from SpineLabelLib.inference import _finish_tissue
    from SpineLabelLib.vertebrae import TISSUE_NAMES

    n = len(TISSUE_NAMES)
    logits = torch.zeros((n, 1, 1, 2))
    logits[:, 0, 0, 1] = torch.arange(n, dtype=torch.float32)  # voxel 0: every class tied
    tissue, body, bone = _finish_tissue(2 * logits, torch.full((1, 1, 2), 2.0))  # sums of two windows' weights
    assert tissue[0, 0].tolist() == [0, n - 1]  # as numpy's argmax
    p = torch.softmax(torch.arange(n, dtype=torch.float32), 0)
    assert float(body[0, 0, 1]) == pytest.approx(float(p[BODY]), abs=1e-3)
    assert float(bone[0, 0, 1]) == pytest.approx(float(p[BODY] + p[POSTERIOR]), abs=1e-3)
    assert float(bone[0, 0, 0]) == pytest.approx(2 / n, abs=1e-3)


def test_a_cuda_index_equal_to_the_number_of_gpus_is_refused(monkeypatch):
    """Two GPUs are cuda:0 and cuda:1: cuda:2 is refused when the device is resolved, by name and count, not at the
    first tensor put there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match=r"'cuda:2' was asked for but there are 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_bfloat16_is_native_on_cuda_gpus_from_compute_capability_8(monkeypatch):
    """Ampere (8.0) and later run bfloat16 natively; Volta and Turing (7.x) emulate it, so they run float32."""
    for capability, native in (((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_bfloat16(torch.device("cuda", 0)) is native, capability


def test_a_body_above_100_hu_is_no_ct_stored_1024_above_hounsfield_units():
    """The body of a CT stored 1024 above Hounsfield units has its median within 50 below and 100 above 0 HU: a
    median of about 86 HU passes, one of about 116 HU does not (as an MR whose soft tissue lies there)."""
    rng = np.random.default_rng(0)
    for median, offset_ct in ((90, True), (120, False)):
        body = rng.normal(median, 20, (30, 40, 40))
        body[:, :, :6] = -100
        body[10:20, 15:25, 15:25] = 700
        stored = np.clip(np.round(np.concatenate([rng.normal(-1000, 20, (30, 40, 8)), body], axis=2)) + 1024, 0, 4095)
        assert looks_like_offset_ct(stored) is offset_ct, median


class _WindowIndexNetwork(torch.nn.Module):
    """Stands in for the network: the vertebral-body logit of every voxel of a window is the number of windows run
    before it (the others 0), so a voxel's blended logit shows the weight each window over it was given."""

    divisor = 16
    tissue_head = torch.nn.Conv3d(1, 4, 1)
    level_head = torch.nn.Conv3d(1, 6, 1)

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, levels_only=False):
        tissue = torch.zeros((1, 4, *x.shape[2:]))
        tissue[:, BODY] = float(self.calls)
        self.calls += 1
        return tissue, torch.zeros((1, 6, *(s // 2 for s in x.shape[2:])))


def test_overlapping_windows_are_blended_with_weights_ramped_over_half_the_overlap_at_both_ends():
    """Three windows of 32 slices along z, starting 16 apart (overlap 16): each window's weight rises linearly over
    its first 8 slices, (k + 1) / 9, and falls the same over its last 8, so that a voxel near a window's edge, where
    the network sees least context, takes its value mostly from the window it lies deeper in."""
    volume = np.zeros((64, 20, 20), dtype=np.float32)
    out = predict(SimpleNamespace(network=_WindowIndexNetwork()), volume, torch.device("cpu"), window=(32, 32, 32),
                  overlap=16)
    k = np.arange(32)
    ramp = np.minimum(np.minimum(k + 1, 32 - k), 9) / 9.0
    weight_sum, logit_sum = np.zeros(64), np.zeros(64)
    for index, start in enumerate((0, 16, 32)):
        weight_sum[start : start + 32] += ramp
        logit_sum[start : start + 32] += ramp * index
    logit = logit_sum / weight_sum
    expected = np.exp(logit) / (np.exp(logit) + 3)  # three other classes at logit 0
    body = out.body_probability.astype(np.float32)
    np.testing.assert_allclose(body, np.broadcast_to(expected[:, None, None], body.shape), atol=2e-3)


def test_a_volume_shorter_than_the_network_s_divisor_is_labelled():
    """An axis shorter than the window is run in one window of at least two divisors: with one, the network's
    bottleneck is a single voxel, which instance normalisation cannot normalise."""
    model = get_model(None, "cpu")
    volume = np.random.default_rng(0).random((10, 10, 10), dtype=np.float32)
    out = predict(model, volume, torch.device("cpu"))
    assert out.tissue.shape == volume.shape
    assert out.level_log_probs.shape == (model.network.level_head.out_channels, 5, 5, 5)
