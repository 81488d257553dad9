"""Network inference on the model grid: intensity normalisation and a sliding window with bounded memory."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .io import Cancelled
from .models import LoadedModel
from .vertebrae import BODY, POSTERIOR

__all__ = ["Cancelled", "Prediction", "CT_WINDOW_HU", "modality_of", "read_modality", "looks_like_offset_ct",
           "normalise", "resolve_device", "predict", "native_bfloat16", "autocast", "reuse_freed_memory",
           "release_freed_memory"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (any case) as named.
    A CUDA device always comes back with its index (``"cuda"`` is the current GPU, e.g. ``cuda:0``), so that one GPU
    has one name.

    Raises:
        ValueError: another name.
        RuntimeError: a CUDA device asked for without a CUDA GPU, or of an index beyond the GPUs there are.
    """
    device = str(device).strip().lower()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was asked for but no CUDA GPU is available; use device auto or "
                               "cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        elif resolved.index >= torch.cuda.device_count():  # found now, not at the first tensor put there
            raise RuntimeError(f"device {device!r} was asked for but there are {torch.cuda.device_count()} CUDA GPUs "
                               f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return resolved


def reuse_freed_memory() -> bool:
    """Make this process keep the memory it frees for its next arrays (Linux with glibc); True when it was set.

    glibc gives every block over 32 MB fresh pages from the kernel and hands them back when the block is freed, so
    each large array or tensor is faulted in again page by page: every layer's activations, in every network window.
    Labelling the 512x512x800 benchmark took 1.65 million page faults and 9 s of system time that way. With these
    settings large blocks come from the heap, and freed memory stays there until the process exits. numpy's arrays
    are also kept off 2 MB pages: on them a full-volume array of which little is written (the label maps) is resident
    in full, 2 MB for every page touched. Only for a process SpineLabel runs for one job (``spinelabel label`` and
    ``train``, the Slicer worker), never inside a host application.
    """
    if not sys.platform.startswith("linux"):
        return False
    # numpy 2 names it _core.multiarray, numpy 1 core.multiarray; numpy 1.26.1-1.26.4 (Slicer 5.6 and 5.8) also have
    # a stub package numpy._core, which a module built against numpy 2 (torch) imports without its multiarray
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    hugepages = getattr(multiarray, "_set_madvise_hugepage", None)
    if hugepages is not None:
        hugepages(False)
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_max, 0))


def release_freed_memory() -> bool:
    """Give back to the system the whole pages of the memory this process has freed and keeps (glibc's
    ``malloc_trim``, which also releases free pages inside the heap, where ``reuse_freed_memory`` keeps every freed
    block); True when some memory was released. For the end of a job's largest step: its freed memory would otherwise
    stay resident beside what follows (on the 512x512x1800 phantom the model-grid arrays, freed before the labels go
    to the input grid, held 1 GB). Elsewhere than Linux with glibc it does nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # another C library
        return False
    return bool(trim(0))


# CT window of the models this version trains: Hounsfield units mapped to 0 and 1 (air to cortical bone).
CT_WINDOW_HU = (-1000.0, 1200.0)


# At most this many voxels, evenly strided, are read to tell a CT without air from an MR image.
_MODALITY_SAMPLE = 1_000_000


def modality_of(volume: np.ndarray) -> str:
    """``"CT"`` or ``"MR"``, from the intensities of a scan: ``read_modality``'s reading. ``volume``: as there, the
    scan's intensities, any shape, layout and real dtype (HU for CT)."""
    return read_modality(volume)[0]


def read_modality(volume: np.ndarray) -> tuple[str, bool]:
    """``"CT"`` or ``"MR"``, from the intensities of a scan, and whether they say so clearly.

    CT when at least 0.5 % of the voxels lie below -500 and half of those at -800 or below: air (-1000 HU) or the
    scanner's padding, in Hounsfield units. Or when at least 1 % of the voxels are below -50 and at least 1 % above
    200: fat and bone in HU, as in a CT cropped to the inside of the body, where no air is left (the TPTBox CT crop
    keeps 22 voxels of air out of 250,000). Else MR: magnitude MR is not negative beyond a small offset or the ringing
    of a resampling (a real MR scaled to thousands and resampled with B-splines rings below -500 in a few voxels; it
    was read as CT by its minimum alone), and an MR normalised to zero mean stays within a few units of zero.

    Not clearly: CT from fat and bone alone, or from "air" of a single value without fat (-200 to -30) in 1 % of the
    voxels (the padding of a resampled or rotated image of any kind); MR from such "air" with nothing else below -50
    (in under 0.1 % of the voxels: a CT's skin, lungs and bowel gas lie there; an MR padded with -1024), or with
    intensities below -50 in 1 % of its voxels (an MR shifted to zero mean in units of hundreds).

    Args:
        volume: the scan's intensities, any shape, layout and real dtype (HU for CT); not copied beyond a strided
            sample of ``_MODALITY_SAMPLE`` voxels.
    """
    sample = volume.flat[:: max(1, volume.size // _MODALITY_SAMPLE)]
    air = sample[sample < -500].astype(np.float64)  # float64: the median of two float32 minima overflows
    if air.size >= 0.005 * sample.size and np.median(air) <= -800:
        # clear when the air is noisy, as real air is, or the body holds fat in HU (a CT clipped at -1000 has air of
        # one value, an MR padded with -1024 no fat)
        fat = np.mean((sample >= -200) & (sample <= -30)) >= 0.01
        floor = air.min()
        padding = np.mean(air == floor) >= 0.9
        if padding and not fat and np.mean((sample > floor) & (sample < -50)) < 0.001:
            return "MR", False  # nothing else below -50: no skin, lung or bowel gas of a CT, a padded MR
        return "CT", bool(not padding or fat)
    negative = bool(np.mean(sample < -50) >= 0.01)
    return ("CT", False) if negative and np.mean(sample > 200) >= 0.01 else ("MR", not negative)


def looks_like_offset_ct(volume: np.ndarray) -> bool:
    """Whether the intensities of a scan that ``read_modality`` reads as MR are those of a CT stored 1024 above
    Hounsfield units with no rescale intercept (unsigned, 0-4095, as some converters write NIfTI, NRRD or MetaImage):
    nothing below -1024 (-2048 HU: stored signed, the noise of the air reaches below 0; sub-verse014 so stored has 1 %
    of its voxels there, down to -267, and was read as MR without a word), nothing above 4095 but metal (0.1 % of the
    voxels at most); minus 1024 they read as CT clearly (``read_modality``); and the voxels above -500 HU that way, at
    least a fifth of them, are a body of soft tissue: their median within 50 below and 100 above 0 HU, their
    interquartile range under 250. The real CT so stored (sub-verse014, example_ct_sm) were read as MR without a word,
    their vertebrae 24 % and 5 % smaller; 8-bit and 12-bit MR (up to 4080, training MRI scaled) fail the test of the
    body.

    Args:
        volume: the scan's intensities, any shape, layout and real dtype; not copied beyond a strided sample of
            ``_MODALITY_SAMPLE`` voxels.
    """
    sample = volume.flat[:: max(1, volume.size // _MODALITY_SAMPLE)].astype(np.float64)
    if sample.size == 0 or sample.min() < -1024 or np.mean(sample > 4095) > 0.001:  # beyond 12 bits: metal at most
        return False
    body = sample[sample > 1024 - 500]
    if body.size < 0.2 * sample.size:
        return False
    low, median, high = np.percentile(body, [25, 50, 75]) - 1024
    return bool(-50 <= median <= 100 and high - low < 250 and read_modality(sample - 1024) == ("CT", True))


# Fewer distinct values than this, all whole numbers, make an image more likely a label map than a scan: a VerSe label
# map holds 29 at most, a TotalSegmentator one up to 118 (its 117 classes; 42 on its abdominal CT example, which 32
# let through), while the sample of the sparsest real 8-bit MRI of ../shared/data holds 186
LABEL_MAP_VALUES = 128


def looks_like_label_map(volume: np.ndarray) -> bool:
    """Whether a strided sample of ``_MODALITY_SAMPLE`` voxels of ``volume`` (any shape, layout and real dtype) holds
    only whole numbers, from 2 to ``LABEL_MAP_VALUES`` - 1 distinct ones (one is a constant image)."""
    values = np.unique(volume.flat[:: max(1, volume.size // _MODALITY_SAMPLE)])
    return 1 < values.size < LABEL_MAP_VALUES and bool(np.all(values == np.round(values)))


def normalise(volume: np.ndarray, ct_window_hu: tuple[float, float] | None = None) -> np.ndarray:
    """Map intensities to [0, 1], clipped.

    CT with a window (``ct_window_hu``, from the model card) is mapped linearly from that fixed Hounsfield range,
    so that bone, soft tissue and air look the same in every scan whatever its field of view. Everything else (MR of
    any contrast, or CT for a model without a window) maps its own 0.5th and 99.5th percentiles to 0 and 1; a
    minimum that fills 0.5 % of the voxels or more and lies further below the others than they spread (padding, such
    as -1024 around an MR of 0-1000) is left out of those percentiles and maps to 0; so is a maximum that fills 0.5 %
    of the voxels or more and lies ten times further above the others than they spread, which maps to 1: a fill
    value or hot voxels of one value, also beside padding or below a few brighter voxels (at 50 times the scan's
    maximum in 0.6 % of the voxels they mapped three real MRI into [0, 0.02]: no spine found). Hot voxels of many
    values are not found. A bright structure of one value less than ten times above the rest (a phantom's bone) is no
    such value.

    Args:
        volume: (z, y, x) any real dtype; Hounsfield units when ``ct_window_hu`` is given.
        ct_window_hu: (low, high) HU mapped to 0 and 1, or None for the percentile mapping.

    Returns:
        float32 (z, y, x) in [0, 1].
    """
    if ct_window_hu is not None:
        lo, hi = (float(v) for v in ct_window_hu)
    else:
        sample = volume[:: max(1, volume.shape[0] // 64)].astype(np.float32, copy=False)
        lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
        padded = hot = False
        for _ in range(2):  # each of padding and hot voxels judged again without the other (they hid each other)
            if not padded and lo == float(sample.min()):  # the minimum fills 0.5 % of the voxels: background, padding
                rest = sample[sample > lo]
                if rest.size and lo < rest.min() - (hi - rest.min()):  # padding: the percentiles of the scan alone
                    sample, padded = rest, True
                    lo, hi = (float(v) for v in np.percentile(rest, [0.5, 99.5]))
            if not hot:  # 0.5 % of the voxels at or above hi: saturation, a fill value, hot voxels (a few brighter)
                rest = sample[sample < hi]
                above = rest[rest > rest.min()] if rest.size else rest  # its spread measured above any padding
                if above.size and hi > rest.max() + 10 * (rest.max() - above.min()):  # far above: the scan alone
                    sample, hot = rest, True
                    lo, hi = (float(v) for v in np.percentile(rest, [0.5, 99.5]))
    scale = 1.0 / (hi - lo) if hi > lo else 1.0  # any units: MR magnitudes can be 1e-6 and less
    out = volume.astype(np.float32)  # copy
    out -= lo
    out *= scale
    np.clip(out, 0.0, 1.0, out=out)
    return out


def native_bfloat16(device: torch.device) -> bool:
    """Whether the hardware runs bfloat16 natively: CUDA GPUs from Ampere on (compute capability 8), CPUs with the
    AVX-512 BF16 or AMX instructions (where it is about twice as fast as float32). Elsewhere it is emulated: slower
    than float32, or no faster, and less precise. (``torch.cuda.is_bf16_supported`` and oneDNN's own check also count
    emulation: an AVX-512 CPU without BF16 ran bfloat16 no faster than float32.)"""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    instructions = (getattr(torch.cpu, name, lambda: False)() for name in
                    ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(instructions) and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# Set to 1, the network runs in float32 on every machine: bfloat16 rounds the network's probabilities otherwise than
# float32, so a scan's labels can differ in places between a machine with native bfloat16 and one without
FLOAT32_VARIABLE = "SPINELABEL_FLOAT32"


def autocast(device: torch.device):
    """bfloat16 autocast where the hardware runs it natively (``native_bfloat16``) unless ``FLOAT32_VARIABLE`` is 1 in
    the environment, else a context that changes nothing."""
    float32 = os.environ.get(FLOAT32_VARIABLE, "").strip() == "1"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=not float32 and native_bfloat16(device))


@dataclass
class Prediction:
    """Network output on the model grid.

    Attributes:
        tissue: uint8 (z, y, x) argmax tissue class (``vertebrae.TISSUE_NAMES``); None from a levels-only pass.
        body_probability: float16 (z, y, x) probability of vertebral body; None from a levels-only pass.
        bone_probability: float16 (z, y, x) probability of vertebra (body or posterior elements); None from a
            levels-only pass.
        level_log_probs: float16 (n_levels, z2, y2, x2) level log-probabilities at half resolution
            (z2 = ceil(z / 2) ...).
    """

    tissue: np.ndarray | None
    body_probability: np.ndarray | None
    bone_probability: np.ndarray | None
    level_log_probs: np.ndarray

    def inside(self, inner: tuple[slice, ...]) -> Prediction:
        """The prediction on the part ``inner`` (full-resolution slices with even starts, ``with_context``) of the
        volume it was made on."""
        half = (slice(None),) + tuple(slice(s.start // 2, s.start // 2 + (s.stop - s.start + 1) // 2) for s in inner)
        crop = lambda a: None if a is None else np.ascontiguousarray(a[inner])
        return Prediction(crop(self.tissue), crop(self.body_probability), crop(self.bone_probability),
                          np.ascontiguousarray(self.level_log_probs[half]))


def _starts(length: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis: even, so that the network's half-resolution output of every window lies on the
    half-resolution grid of the volume. A last window that would start at an odd voxel starts one later and is
    padded."""
    if length <= window:
        return [0]
    step = window - overlap
    starts = list(range(0, length - window, step)) + [length - window]
    return sorted({s + s % 2 for s in starts})


def _ramp(length: int, margin: int) -> np.ndarray:
    """1-D blending weight, float32 (length,): linear ramp over ``margin`` voxels at both ends, never 0."""
    w = np.ones(length, dtype=np.float32)
    if margin > 0 and length > 2 * margin:
        ramp = (np.arange(margin, dtype=np.float32) + 1) / (margin + 1)
        w[:margin] = ramp
        w[-margin:] = ramp[::-1]
    return w


def _finish_tissue(logit_sum: torch.Tensor, weight_sum: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tissue class (uint8), body and vertebra probability (float16) of blended logits, per voxel, each (z, y, x).

    ``logit_sum`` float32 (classes, z, y, x), the weighted sum of logits, is overwritten; ``weight_sum`` float32
    (z, y, x) is the sum of the weights. The reductions over the class axis and the float16 casts run in
    torch, in place and multi-threaded (numpy's are single-threaded, strided along that axis, and copy). The class is
    found by comparing each class with the peak: torch's argmax along the leading axis takes seconds on a large
    volume, its amax a fraction of one.
    """
    logits = logit_sum.div_(weight_sum)
    peak = logits.amax(dim=0)
    tissue = torch.zeros(peak.shape, dtype=torch.uint8)
    for c in range(logits.shape[0] - 1, -1, -1):  # the lowest class wins a tie, as in argmax
        tissue.masked_fill_(logits[c] == peak, c)
    probability = logits.sub_(peak).exp_()
    probability.div_(probability.sum(dim=0, keepdim=True))
    return tissue, probability[BODY].half(), (probability[BODY] + probability[POSTERIOR]).half()


# Progress is reported this many times within a window (``_layers_polled``), besides once at its end
_WITHIN_WINDOW_REPORTS = 8


@contextlib.contextmanager
def _layers_polled(net: torch.nn.Module, cancel: CancelFn | None, progress: ProgressFn | None, window_done: list[int],
                   n_windows: int) -> Iterator[None]:
    """Within this block, poll ``cancel`` before each layer (module without submodules) of ``net`` runs, raising
    ``Cancelled`` when it returns True, and report to ``progress`` ``_WITHIN_WINDOW_REPORTS`` times in a window how
    far through its layers the window is (``window_done[0]``: the windows done before it, of ``n_windows``). A whole
    window of the default size took 3 to 9 s on a 2-core CPU, a single layer under 2 s: a cancel waited for the end of
    the window, and an image of one window showed no progress between the network's start and end. The hooks act
    in the calling thread only: another thread's labelling runs the same (cached) network meanwhile."""
    layers = [m for m in net.modules() if next(m.children(), None) is None] if isinstance(net, torch.nn.Module) else []
    if not layers or (cancel is None and progress is None):
        yield
        return
    every = max(1, len(layers) // _WITHIN_WINDOW_REPORTS)
    state = {"window": -1, "layers": 0}  # layers run in the current window
    caller = threading.get_ident()

    def before_layer(module, inputs) -> None:
        if threading.get_ident() != caller:
            return
        if cancel is not None and cancel():
            raise Cancelled()
        if state["window"] != window_done[0]:
            state["window"], state["layers"] = window_done[0], 0
        state["layers"] += 1
        if progress is not None and state["layers"] % every == 0:
            within = min(state["layers"] / len(layers), 1.0)  # a levels-only pass runs fewer layers
            progress((window_done[0] + within) / n_windows, f"network window {window_done[0] + 1}/{n_windows}")

    handles = [layer.register_forward_pre_hook(before_layer) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def predict(
    model: LoadedModel,
    volume: np.ndarray,
    device: torch.device,
    window: tuple[int, int, int] = (96, 224, 224),
    overlap: int = 16,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    levels_only: bool = False,
) -> Prediction:
    """Run the network over a volume in overlapping windows, blending their logits.

    Windows run row by row along z. The blended logits are held for one row of windows only: the slices no later
    window reaches are turned into the outputs before the next row starts, and the shared slices move to the front.

    Args:
        model: loaded model.
        volume: float32 (z, y, x), already normalised (``normalise``), on the model grid.
        device: where to run.
        window: largest window (z, y, x) in voxels; each is rounded up to the network's divisor.
        overlap: voxels shared by neighbouring windows.
        progress: called with (fraction 0-1 of the windows done, message), after each window and within it
            (``_layers_polled``).
        cancel: polled before each window and before each layer of the network within it; True raises
            ``Cancelled``.
        levels_only: run the network up to its level head only (``SpineUNet.forward``): the prediction holds the
            level log-probabilities alone, for about half the network time.

    Returns:
        The :class:`Prediction` on the grid of ``volume`` (its attributes give their types and axes).

    Peak memory is about 12 bytes per voxel of ``volume`` for the outputs, 34 bytes per voxel of one row of windows
    for the blending, and one window's activations.
    """
    net = model.network
    div = net.divisor
    shape = np.array(volume.shape)
    largest = (np.array(window) + div - 1) // div * div
    if not 0 <= overlap < int(largest.min()):
        raise ValueError(f"overlap {overlap} must be 0 or more and less than the window {tuple(map(int, largest))}")
    # an axis shorter than the window takes one window, of at least two divisors: one would leave the network's
    # bottleneck a single voxel, which instance normalisation cannot normalise
    win = np.minimum(largest, np.maximum((shape + div - 1) // div * div, 2 * div))
    starts = [_starts(int(s), int(w), overlap) for s, w in zip(shape, win)]
    in_plane = [(y, x) for y in starts[1] for x in starts[2]]
    n_windows = len(starts[0]) * len(in_plane)
    n_tissue = net.tissue_head.out_channels
    n_levels = net.level_head.out_channels
    half = (shape + 1) // 2
    rows, half_rows = int(win[0]), int(win[0]) // 2  # slices of one row of windows, at full and half resolution
    # accumulators are torch tensors: the blending below runs in place and multi-threaded, without temporaries.
    # Allocated in this order (tissue, then levels; sums, then outputs) whether or not levels_only: the order sets how
    # the heap that reuse_freed_memory keeps is reused later, and another order cost a whole run system time.
    tissue_acc = tissue_w = tissue = body = bone = None
    if not levels_only:
        tissue_acc = torch.zeros((n_tissue, rows, *shape[1:]), dtype=torch.float32)
        tissue_w = torch.zeros((rows, *shape[1:]), dtype=torch.float32)
    level_acc = torch.zeros((n_levels, half_rows, *half[1:]), dtype=torch.float32)
    level_w = torch.zeros((half_rows, *half[1:]), dtype=torch.float32)
    if not levels_only:
        tissue = np.empty(volume.shape, dtype=np.uint8)
        body = np.empty(volume.shape, dtype=np.float16)
        bone = np.empty(volume.shape, dtype=np.float16)
    level = np.empty((n_levels, *half), dtype=np.float16)
    weight = torch.from_numpy(
        _ramp(int(win[0]), overlap // 2)[:, None, None]
        * _ramp(int(win[1]), overlap // 2)[None, :, None]
        * _ramp(int(win[2]), overlap // 2)[None, None, :]
    )
    window_done = [0]  # windows done before the one running, for the progress within it
    with torch.inference_mode(), autocast(device), _layers_polled(net, cancel, progress, window_done, n_windows):
        for row, z in enumerate(starts[0]):
            for i, (y, x) in enumerate(in_plane):
                if cancel is not None and cancel():
                    raise Cancelled()
                window_done[0] = row * len(in_plane) + i
                patch = volume[z : z + win[0], y : y + win[1], x : x + win[2]]
                real = patch.shape
                pad = [(0, int(w - r)) for w, r in zip(win, real)]
                patch = np.pad(patch, pad) if any(p[1] for p in pad) else patch
                tensor = torch.from_numpy(np.ascontiguousarray(patch))[None, None].to(device)
                tissue_logits, level_logits = net(tensor, levels_only)
                if not levels_only:
                    t = tissue_logits[0].float().cpu()[:, : real[0], : real[1], : real[2]]
                    wt = weight[: real[0], : real[1], : real[2]]
                    tissue_acc[:, : real[0], y : y + real[1], x : x + real[2]].addcmul_(t, wt)
                    tissue_w[: real[0], y : y + real[1], x : x + real[2]].add_(wt)
                lv = F.log_softmax(level_logits[0].float(), dim=0).cpu()
                hy, hx = y // 2, x // 2
                hr = [(r + 1) // 2 for r in real]
                hw = weight[::2, ::2, ::2][: hr[0], : hr[1], : hr[2]]
                level_acc[:, : hr[0], hy : hy + hr[1], hx : hx + hr[2]].addcmul_(lv[:, : hr[0], : hr[1], : hr[2]], hw)
                level_w[: hr[0], hy : hy + hr[1], hx : hx + hr[2]].add_(hw)
                # this window's outputs and input freed before the next window runs (not kept over its forward)
                del tensor, patch, tissue_logits, level_logits, lv
                if not levels_only:
                    del t
                n = row * len(in_plane) + i + 1  # windows done
                if progress is not None:
                    progress(n / n_windows, f"network window {n}/{n_windows}")
            # the slices below the next row's start are final
            last = row == len(starts[0]) - 1
            done = int(shape[0]) - z if last else starts[0][row + 1] - z
            half_done = int(half[0]) - z // 2 if last else starts[0][row + 1] // 2 - z // 2
            if not levels_only:
                finished = _finish_tissue(tissue_acc[:, :done], tissue_w[:done])
                for out, part in zip((tissue, body, bone), finished):
                    out[z : z + done] = part.numpy()
            level[:, z // 2 : z // 2 + half_done] = level_acc[:, :half_done].div_(level_w[:half_done]).half().numpy()
            if not last:
                for acc, acc_w, d in ((tissue_acc, tissue_w, done), (level_acc, level_w, half_done)):
                    if acc is None:  # levels_only
                        continue
                    kept = acc.shape[1] - d
                    acc[:, :kept] = acc[:, d:].clone()
                    acc[:, kept:] = 0
                    acc_w[:kept] = acc_w[d:].clone()
                    acc_w[kept:] = 0
    return Prediction(tissue, body, bone, level)
