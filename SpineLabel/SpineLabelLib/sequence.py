"""The sequence model: consistent anatomical labels for a chain of vertebrae.

The chain (vertebrae ordered cranial to caudal) is a hidden-Markov chain whose states are the levels of
``vertebrae.LEVELS``. Each vertebra brings per-level log-likelihoods (the network's level head averaged over its
voxels); transitions only go caudally, so no level can repeat and the order is always anatomical:

* one step down the regular ladder (C1 ... C7, T1 ... T12, L1 ... L5, S1) costs nothing;
* the supernumerary levels T13 (between T12 and L1) and L6 (between L5 and S1) cost their prior;
* skipping k regular levels costs k times the missing-level prior;
* S1 may follow S1: the sacrum is one bone, but its fused segments (S2-S5) sometimes come out of the network as
  separate bodies below S1. Each such piece costs its prior; ``label_spine`` merges the pieces into the sacrum, so a
  finished labelling never repeats a level, and ``relabel`` never opens this transition.

Every transition also has to explain the distance between the two body centroids. Vertebrae grow from about 18 mm
apart in the neck to 37 mm in the lumbar spine (``SequencePriors.pitch_mm``), so the spacing says which region a
chain is in whatever the image looks like, and a gap of two spacings says a vertebra was missed. Patients differ in
size: the expected distances are multiplied by one scale per scan, which the model sums over (a grid of scales
with a log-normal prior), so only the profile of the spacing along the chain counts, not the patient's height. A
gap is scored by a log-normal around its expected value, wider at the two ends of the chain (where vertebrae are
cut by the field of view), with a small outlier share for badly split components.

Viterbi gives the best labelling (at the best scale); forward-backward gives each vertebra's posterior probability
of its label (the confidence, over all scales, with the level evidence tempered by ``TEMPERATURE``) and the
probability of transitional anatomy, from which the warnings come. ``relabel`` re-runs only this model with some
labels forced, which is what interactive correction uses; once a forced label overrules the level head's own
labelling, the names too come from the tempered evidence.

All priors live in ``PRIORS`` below, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .result import SpineLabeling
from .vertebrae import LEVELS, level_index

__all__ = ["SequencePriors", "PRIORS", "Solution", "solve", "vertebrae_in", "skipped_levels", "relabel",
           "expected_gaps_mm", "CHECKED_SCALE", "UNCERTAIN_BELOW", "NOTHING_FOUND", "TEMPERATURE", "confidence_text"]


K = len(LEVELS)
_NAMES = [level.name for level in LEVELS]


@dataclass(frozen=True)
class SequencePriors:
    """Anatomical priors of the sequence model (probabilities per scan, distances in mm).

    Attributes:
        t13: a 13th thoracic vertebra (about 2-8 % of the population in CT series; 3 % used).
        l6: a sixth lumbar vertebra (lumbarised S1; about 4-7 %; 4 % used).
        missing_level: one regular level absent from the chain, a vertebra the network missed; 2 % per skipped
            level. Its gap is expected to span the missing vertebra, so at a normal spacing a skip costs far more
            than that: 11 thoracic vertebrae or a sacralised L5, which leave no gap, are numbered as a regular
            spine unless the user fixes a name, not always counted from the sacrum (a lumbar MRI with L3 cut out and
            the gap closed came out numbered from its top: its L4, L5 and S1 called L3, L4 and L5, the sacral piece
            below S1 called S1).
        pitch_mm: (level, distance) pairs: from the body centroid of each regular level to that of the next regular
            level caudally, in an adult of average size. Measured on the label maps of the training data (mean over
            scans; ``python benchmarks/real_data.py pitches``): C1-T5 on two whole-spine VerSe masks, T9-S1 on two
            VerSe masks and 24 lumbar MRI; T5-T9, which no scan there covers, set to 25 mm. T13 and L6 take the
            pitch of T12 and L5.
        pitch_sigma: spread of one measured gap around its expected value (log units) once the scan's scale is
            known: anatomy plus centroid error of the network's components (0.074 measured between the labelled
            components of 32 lumbar MRI, the 8 held out by ``benchmarks/real_data.py`` among them; the reference
            centroids of the 24 others spread 0.055 around the pitches, of all 32 0.058).
        end_pitch_sigma: the same for the first and last gap of a chain, whose end vertebrae are often cut by the
            field of view or are the sacrum (0.2 measured on the same scans).
        scale_sigma: spread of the per-scan size scale (log units; adults vary by about 10-15 %).
        gap_outlier: share of gaps that follow no anatomy (a component cut by the field of view, a bad split).
        sacral_piece: one more piece of the sacrum below S1 (its segments are body-like and partly separated by
            rudimentary discs); 0 forbids it.
        sacral_spacing_mm: centroid distance between consecutive sacral segments (about 20-25 mm). The pieces that
            model 1.7.0 leaves below S1 on real MRI lie further apart (4 of the 24 training MRI of
            ``mri_lumbar_bodies`` have them; their 10 gaps are 28-76 mm), but a prior fitted to those (47 mm, with a
            log spread of 0.35 of its own) took the L6 of a synthetic crop for S1 and its S1 for a piece, and lost two
            vertebrae on ``benchmarks/selection.py``: an L6 sits about as far above S1.
    """

    t13: float = 0.03
    l6: float = 0.04
    missing_level: float = 0.02
    pitch_mm: tuple[tuple[str, float], ...] = (
        ("C1", 19.4), ("C2", 21.2), ("C3", 17.8), ("C4", 18.5), ("C5", 18.4), ("C6", 18.7), ("C7", 20.5),
        ("T1", 24.5), ("T2", 26.0), ("T3", 25.9), ("T4", 25.3), ("T5", 25.0), ("T6", 25.0), ("T7", 25.0),
        ("T8", 25.0), ("T9", 23.5), ("T10", 26.6), ("T11", 31.2), ("T12", 33.5), ("L1", 35.0), ("L2", 36.7),
        ("L3", 37.7), ("L4", 36.6), ("L5", 34.4),
    )
    pitch_sigma: float = 0.1
    end_pitch_sigma: float = 0.2
    scale_sigma: float = 0.15
    gap_outlier: float = 0.05
    sacral_piece: float = 0.2
    sacral_spacing_mm: float = 22.0


PRIORS = SequencePriors()

# A vertebra whose confidence is below this gets an "uncertain" warning. On the selection set of the default model 1.7.0
# (``python benchmarks/selection.py``: phantoms, synthetic crops and short scans), with the evidence tempered by
# ``TEMPERATURE``, 95 % of the 662 predicted vertebrae named at a confidence of 0.99 or more carry the label of the
# closest reference vertebra, against 64 % of the 74 at 0.95-0.99 and 60 % of the 134 below 0.95 (95 %, 75 % and 53 %
# of 673, 55 and 135 in a second sample, ``--seed-offset 50000``): below 0.99, a name is wrong about one time in three.
UNCERTAIN_BELOW = 0.99
NOTHING_FOUND = "no vertebrae found"  # the warning of a chain without vertebrae, the last of a labelling without any


def confidence_text(p: float) -> str:
    """A confidence (0-1) as shown everywhere: two decimals, rounded down, so that one shown as 0.99 is never below
    ``UNCERTAIN_BELOW`` (0.9899 read 0.99 in Slicer beside an 'uncertain' warning); within 1e-8 below a hundredth as
    that one (a sure name's 1.0 comes out 0.9999999999999996 with numpy 1.24-1.26: not 0.99; 0.58 is
    0.57999999999999996: not 0.57), except where that would show one below ``UNCERTAIN_BELOW`` at or above it."""
    p = float(p)
    shown = np.floor(p * 100 + 1e-6) / 100
    if p < UNCERTAIN_BELOW <= shown:
        shown = np.floor(UNCERTAIN_BELOW * 100 - 1e-6) / 100
    return f"{shown:.2f}"

# Temperature of the level head's evidence in the confidences: forward-backward divides each vertebra's level log-scores
# by it (the population priors, the gap likelihoods and the scale prior stay as they are), while the labels come from
# the Viterbi path of the evidence as it is, so no name of an uncorrected chain depends on it. Once the user forces a
# name that path does not give, the path too is taken on the tempered evidence: such a correction says the level head
# misread this image, and at full weight its evidence made skipping a level at a normal spacing cheaper than renumbering
# three or four neighbours (an L2 forced to L3 on a labelled lumbar phantom gave T12 L1 L3 L4, the renumbered ones at
# confidence 0.00). Tempered, it still did so for eight (L6 forced on the L5 of a real lumbar MRI read T9 ... S1 kept T9
# ... L4 and left L5 missing at a 36 mm gap; 13 of 24 such renames of real lumbar MRI), so the evidence of such a chain
# is also read shifted by the correction's count where it counts from no C1, C2 or sacrum (``_shifted``). A name forced
# as it was (a lock) keeps the path: the tempered one renamed other vertebrae on 44 of 329 such locks on the procedural
# phantoms of ``benchmarks/selection.py``. Decoding every chain on the tempered evidence lost 8 and 6 identified
# vertebrae on the two samples of ``benchmarks/selection.py`` (670 and 688 of 860 and 863). The level head reads every
# vertebra of a chain from one image and its errors go together: a short chain without the sacrum or C1/C2 is often
# shifted whole, yet the chain counted its vertebrae as independent witnesses and was as sure of such a shift as of a
# whole spine. Re-solving the chains of 1.7.0 offline: 2 is the warmest of 1, 1.5, 2, 2.5, 3 and 4 that leaves at most 8
# of the 206 vertebrae of the whole training scans (``real_data.py evaluate --selection``, all named right where they
# have a reference) below 0.99 (1, 7, 7, 9, 12, 30). At 2, of the vertebrae named at 0.99 or more, 35 of 662 are wrong
# on selection sample 1 (65 of 764 at 1) and 33 of 673 on sample 2 (57 of 744). Of the reference vertebrae whose closest
# label has 0.99 or more, 5 of 48 are not identified on the real short copies of ``real_data.py evaluate --selection
# --length-mm 70`` (38 of 119 at 1), and 4 of 71 on the held-out set of ``real_data.py evaluate`` (7 of 74): the disc
# scan IVD_25, numbered one level off with the sacrum in view (at 3c2438d, which pads narrow stacks left and right, 0 of
# the 70 there). Dividing the whole chain's log-score instead (priors too) raised the population rates of L6 and T13
# with it, to about 0.2: 35 of the 206 fell below 0.99 at 2, most of them an S1 next to L6 or a T12 next to T13.
TEMPERATURE = 2.0

_TRANSITIONAL = np.array([level.transitional for level in LEVELS])
# regular levels strictly between a and b (a < b), the number a transition a -> b skips
_REGULAR_BEFORE = np.cumsum(~_TRANSITIONAL) - (~_TRANSITIONAL)
_SKIPS = _REGULAR_BEFORE[None, :] - _REGULAR_BEFORE[:, None] - (~_TRANSITIONAL)[:, None]
_VALID = np.arange(K)[None, :] > np.arange(K)[:, None]
_IS_T13 = np.arange(K) == level_index("T13")
_IS_L6 = np.arange(K) == level_index("L6")
_S1 = level_index("S1")
_REGULAR = np.flatnonzero(~_TRANSITIONAL)  # level indices of the regular levels, cranial to caudal
_SHAPED = [level_index("C1"), level_index("C2"), _S1]  # levels told by their shape, not by counting: ``_shifted``
_COUNTED = ~_TRANSITIONAL & ~np.isin(np.arange(K), _SHAPED)
# scales of the patient's size the model sums over, in units of scale_sigma (+-3 sigma)
_SCALE_STEPS = np.linspace(-3.0, 3.0, 19)
_LOG_GAP_RANGE = float(np.log(200.0 / 5.0))  # outliers: uniform in log gap over 5-200 mm


def expected_gaps_mm(priors: SequencePriors = PRIORS) -> np.ndarray:
    """Expected centroid distance, float64 (K, K), from level a (row) to a caudal level b (column) at scale 1, in
    mm: the pitches of a and of every regular level between them (a transitional level takes its regular
    neighbour's pitch); ``sacral_spacing_mm`` on the S1 -> S1 diagonal; NaN elsewhere."""
    pitch = dict(priors.pitch_mm)
    pitch.update(T13=pitch["T12"], L6=pitch["L5"], S1=priors.sacral_spacing_mm)
    own = np.array([pitch[name] for name in _NAMES])
    regular = np.where(_TRANSITIONAL, 0.0, own)
    before = np.concatenate([[0.0], np.cumsum(regular)])  # sum of regular pitches above each level
    expected = own[:, None] + before[None, :K] - before[:K, None] - regular[:, None]
    expected = np.where(_VALID, expected, np.nan)
    expected[_S1, _S1] = own[_S1]
    return expected


def _transition_priors(priors: SequencePriors) -> np.ndarray:
    """Log-prior, float64 (K, K), of going from level a (row) to level b (column), before the gap is seen."""
    scores = np.maximum(_SKIPS, 0) * np.log(priors.missing_level)
    scores = scores + np.where(_IS_T13, np.log(priors.t13), 0.0)[None, :]
    scores = scores + np.where(_IS_L6, np.log(priors.l6), 0.0)[None, :]
    scores = np.where(_VALID, scores, -np.inf)
    scores[_S1, _S1] = np.log(priors.sacral_piece) if priors.sacral_piece > 0 else -np.inf
    return scores


def _start_priors(priors: SequencePriors) -> np.ndarray:
    """Log-prior, float64 (K,), of the first vertebra's level: the transitional levels cost their population rate
    there as they do when a later vertebra enters them (``_transition_priors``); the rest is uniform."""
    return np.where(_IS_T13, np.log(priors.t13), 0.0) + np.where(_IS_L6, np.log(priors.l6), 0.0)


def _gap_scores(gaps_mm: np.ndarray, scales: np.ndarray, priors: SequencePriors, corrected: bool = False
                ) -> np.ndarray:
    """Log-likelihood, float64 (n-1, scales, K, K), of each measured gap for each transition a -> b at each scale, in
    log-gap space: a log-normal around the expected gap (wider for the two end gaps) plus a uniform outlier share;
    -inf for transitions that cannot happen. ``gaps_mm``: float (n-1,) centroid distances in mm; ``scales``: float
    (scales,) patient size factors on the expected gaps (no unit). ``corrected`` (a chain with a fixed label its own
    labelling does not give): a transition that skips a level takes the narrower spread at the end gaps too."""
    expected = expected_gaps_mm(priors)
    valid = ~np.isnan(expected)
    sigma = np.full((len(gaps_mm), 1, int(valid.sum())), priors.pitch_sigma)  # (n-1, 1, transitions)
    # With the wider end spread for every transition, forcing T3 on the top vertebra T4 of a chain at normal gaps
    # gave T3 T5 T6 ..., a level skipped, where the same force in mid-chain renumbers the neighbours. Otherwise the
    # end spread stays as it was for skips too: narrowing it for every chain named no vertebra otherwise but made the
    # chains surer (on benchmarks/selection.py, 51 of 729 names at 0.99 or more wrong, against 43 of 717), and a lock
    # (a fixed name the chain already has) must rename nothing.
    end = (np.where(_SKIPS[valid] > 0, priors.pitch_sigma, priors.end_pitch_sigma) if corrected
           else priors.end_pitch_sigma)
    sigma[[0, -1] if len(gaps_mm) else [], :, :] = end
    z = (np.log(np.maximum(gaps_mm, 1e-3))[:, None, None] - np.log(scales)[None, :, None]
         - np.log(expected[valid])[None, None, :]) / sigma
    normal = np.log((1.0 - priors.gap_outlier) / (sigma * np.sqrt(2 * np.pi))) - 0.5 * z**2
    # A transition that skips a level has no outlier share: the missing level must be explained by the gap itself.
    # With that share, forcing L3 on L2 kept L1 above it and skipped L2 at a normal 35 mm gap.
    outlier = np.where(_SKIPS[valid] > 0, -np.inf, np.log(priors.gap_outlier / _LOG_GAP_RANGE))
    out = np.full((len(gaps_mm), len(scales), K, K), -np.inf)
    out[:, :, valid] = np.logaddexp(normal, outlier)
    return out


@dataclass
class Solution:
    """Best labelling of a chain.

    Attributes:
        levels: int (n,) index into ``LEVELS`` per vertebra, chain order.
        confidence: float (n,) posterior probability of that level.
        marginals: float (n, K) posterior probability of every level per vertebra.
        warnings: plain-language warnings about the vertebrae (down to the first S1; not the sacral pieces below).
    """

    levels: np.ndarray
    confidence: np.ndarray
    marginals: np.ndarray
    warnings: list[str]


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(a))) along ``axis`` of ``a`` (float log-scores, any shape; -inf allowed), that axis removed; -inf
    where every term is -inf. float64 for the float64 arrays of this module."""
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def solve(
    log_scores: np.ndarray,
    gaps_mm: np.ndarray,
    fixed: dict[int, str] | None = None,
    priors: SequencePriors = PRIORS,
    temperature: float | None = None,
    describe: Callable[[int], str] | None = None,
    confidence_scores: np.ndarray | None = None,
) -> Solution:
    """Label a chain of vertebrae.

    Args:
        log_scores: float (n, K) per-vertebra log-likelihood of each level of ``LEVELS``, chain order (cranial
            first). Rows of zeros mean "no evidence".
        gaps_mm: float (n-1,) centroid distance between consecutive vertebrae, mm.
        fixed: chain position -> level name that must be kept.
        priors: the anatomical priors.
        temperature: of the level evidence in the confidences (``TEMPERATURE`` when None).
        describe: names the vertebra at a chain position in the message of fixed labels that cannot all hold
            (default: its place from the top).
        confidence_scores: float (n, K) evidence the confidences are read from, tempered (default ``log_scores``).

    Returns:
        The Viterbi labelling (at the most probable patient scale; on the tempered evidence, read shifted by the
        correction's count too (``_shifted``), when a fixed label differs from the labelling without fixed labels) with
        the posterior confidences of its names (over all scales, on ``confidence_scores``, read shifted alike) and
        warnings.

    Raises:
        ValueError: when the fixed labels contradict each other (a duplicate level, other than S1 when
            ``priors.sacral_piece`` allows sacral pieces, or a caudal level above a cranial one), the chain is
            longer than the number of levels where no sacral piece is allowed, a fixed position is outside it, or
            the gaps (not n-1, or not finite), the scores (NaN or +inf) or the confidence scores (not (n, K), NaN,
            +inf, a row ruling out every level, or -inf entries that leave no labelling) are not usable.
    """
    emissions = np.array(log_scores, dtype=float, copy=True).reshape(-1, K)
    n = emissions.shape[0]
    if n == 0:
        return Solution(np.zeros(0, int), np.zeros(0), np.zeros((0, K)), [NOTHING_FOUND])
    if n > K and priors.sacral_piece <= 0:  # without sacral pieces every level appears once at most
        raise ValueError(f"a chain of {n} vertebrae is longer than the {K} levels SpineLabel knows")
    gaps = np.asarray(gaps_mm, dtype=float).reshape(-1)
    if gaps.size != n - 1 or not np.isfinite(gaps).all() or np.isnan(emissions).any() or (emissions == np.inf).any():
        raise ValueError(f"a chain of {n} vertebrae needs {n - 1} finite gaps (got {gaps.tolist()}) and log-scores "
                         "without NaN or +inf")
    evidence = emissions.copy() if confidence_scores is None else np.array(confidence_scores, dtype=float)
    if confidence_scores is not None and (evidence.shape != emissions.shape or np.isnan(evidence).any()
                                          or (evidence == np.inf).any() or (evidence == -np.inf).all(axis=1).any()):
        raise ValueError(f"confidence scores of shape {evidence.shape} for a chain of {n}: (n, {K}) without NaN, +inf "
                         "or a row ruling out every level")
    for position in fixed or {}:
        if not 0 <= position < n:
            raise ValueError(f"fixed position {position} is outside the chain of {n} vertebrae")

    def with_fixed(scores: np.ndarray) -> np.ndarray:
        """``scores`` (float64 (n, K) log scores, position x level), modified in place and returned: each fixed
        position 0 for its level and -inf for the others."""
        for position, name in (fixed or {}).items():
            scores[position, :] = -np.inf
            scores[position, level_index(name)] = 0.0
        return scores

    free, free_evidence = emissions.copy(), evidence.copy()  # the evidence without the fixed labels
    emissions, evidence = with_fixed(emissions), with_fixed(evidence)
    scales = np.exp(_SCALE_STEPS * priors.scale_sigma)
    log_scale_prior = -0.5 * _SCALE_STEPS**2 - _logsumexp(-0.5 * _SCALE_STEPS**2, axis=0)
    # (n-1, scales, K, K): log-score of a -> b across each gap at each scale
    level_priors = _transition_priors(priors)
    transitions = level_priors + _gap_scores(gaps, scales, priors)
    temperature = TEMPERATURE if temperature is None else temperature
    tempered_evidence = evidence / temperature
    start = _start_priors(priors)
    for e in (emissions, tempered_evidence):
        e[0] += start
    overruled = False  # a fixed label the level head's own labelling does not give: the names follow the tempered path
    if fixed:
        free_paths, free_scores = _viterbi(np.concatenate([free[:1] + start, free[1:]]), transitions)
        own = free_paths[int(np.argmax(free_scores + log_scale_prior))]
        overruled = any(own[position] != level_index(name) for position, name in fixed.items())
    if overruled:
        transitions = level_priors + _gap_scores(gaps, scales, priors, corrected=True)
        shifts = _correction_shifts(own, fixed)
        tempered, tempered_evidence = (with_fixed(_shifted(e, shifts)) / temperature for e in (free, free_evidence))
        for e in (tempered, tempered_evidence):
            e[0] += start
    paths, scores = _viterbi(tempered if overruled else emissions, transitions)
    best = int(np.argmax(scores + log_scale_prior))
    if not np.isfinite(scores[best]):
        if fixed:
            raise ValueError(_conflict(fixed, n, transitions, start, describe or (lambda p: f"vertebra {p + 1} from "
                                                                                                "the top")))
        raise ValueError("no labelling is possible: the log-scores rule out every level of some vertebra")
    levels = paths[best]
    log_z, per_scale = _forward_backward(tempered_evidence, transitions)
    log_weights = log_z + log_scale_prior
    if not np.isfinite(log_weights).any():  # the best path holds, yet the confidence evidence rules out every path
        raise ValueError("confidence scores that rule out every labelling of the chain: (n, K) whose -inf entries "
                         "must leave some path")
    weights = np.exp(log_weights - np.max(log_weights))
    marginals = np.tensordot(weights / weights.sum(), per_scale, axes=1)
    confidence = np.clip(marginals[np.arange(n), levels], 0.0, 1.0)
    n = vertebrae_in(levels)  # the warnings speak of the vertebrae, not of the sacral pieces below them
    return Solution(levels, confidence, marginals, _warnings(levels[:n], confidence[:n], marginals[:n], gaps[: n - 1],
                                                            expected_gaps_mm(priors), anchored=bool(fixed)))


def _regular_beside(level: int, side: int) -> int | None:
    """Position in ``_REGULAR`` of the regular level next above (``side`` -1) or below (+1) level index ``level``;
    None at either end."""
    beside = _REGULAR[_REGULAR < level] if side < 0 else _REGULAR[_REGULAR > level]
    return None if beside.size == 0 else int(np.searchsorted(_REGULAR, beside[-1] if side < 0 else beside[0]))


def _correction_shifts(own: np.ndarray, fixed: dict[int, str]) -> list[set[int]]:
    """Per chain position, by how many regular levels the fixed names (chain position -> name) move its name from the
    level head's own labelling ``own`` (int (n,) level indices, chain order): a fixed name moves the vertebrae on each
    side of it by as many levels as it moves the regular level next to it on that side (L6 forced on an L5 moves those
    above one level down and leaves S1 below), unless the own labelling names C1, C2 or the sacrum on that side: a run
    that reaches one of them is numbered from it, not by counting. A side ends at the next fixed name that differs from
    ``own``, which numbers the vertebrae beyond it (a lock of the L1 shown below a rename to T13, the level head's L2,
    moved the vertebrae above the T13 one level up too, and across a long gap they were renamed). 0 left out."""
    shifts: list[set[int]] = [set() for _ in own]
    anchored = np.isin(own, _SHAPED)
    overruling = sorted(position for position, name in fixed.items() if own[position] != level_index(name))
    for position, name in fixed.items():
        above = max((p for p in overruling if p < position), default=-1)
        below = min((p for p in overruling if p > position), default=len(own))
        for side, rows in ((-1, range(above + 1, position)), (1, range(position + 1, below))):
            forced, before = _regular_beside(level_index(name), side), _regular_beside(int(own[position]), side)
            if forced is None or before is None or forced == before or anchored[rows].any():
                continue
            for row in rows:
                shifts[row].add(forced - before)
    return shifts


def _shifted(scores: np.ndarray, shifts: list[set[int]]) -> np.ndarray:
    """Level evidence (float (n, K) log-scores, chain order) of each vertebra read as it is or, for each of its
    ``shifts`` (``_correction_shifts``), that many counted levels further caudal, summed: a correction says the level
    head misread this image, and its readings of one image go wrong together, so a vertebra counted from a renamed one
    is as likely misread by the same count. Only the counted levels C3 ... L5 take shifted evidence or give it: C1, C2
    and the sacrum are known by their shape, T13 and L6 by their own evidence."""
    out = scores.copy()
    for row, row_shifts in enumerate(shifts):
        for shift in row_shifts:
            source = np.arange(len(_REGULAR)) - shift
            takes = _COUNTED[_REGULAR] & (source >= 0) & (source < len(_REGULAR))
            takes[takes] = _COUNTED[_REGULAR[source[takes]]]
            moved = np.full(K, -np.inf)
            moved[_REGULAR[takes]] = scores[row, _REGULAR[source[takes]]]
            out[row] = np.logaddexp(out[row], moved)
    return out


def _conflict(fixed: dict[int, str], n: int, transitions: np.ndarray, start: np.ndarray,
              describe: Callable[[int], str]) -> str:
    """Why fixed labels (chain position -> level name) of a chain of ``n`` cannot all hold: the first one that
    cannot hold alone, else the first two next to each other among them that cannot hold together; ``transitions``
    and ``start`` as ``solve`` chains them (float64 log-scores: ``transitions`` (n-1, scales, K, K) of each
    transition a -> b across each gap at each scale, ``start`` (K,) the first vertebra's level prior,
    ``_start_priors``), ``describe`` names the vertebra at a position."""

    def possible(subset: dict[int, str]) -> bool:
        evidence = np.zeros((n, K))
        evidence[0] += start
        for position, name in subset.items():
            evidence[position, :] = -np.inf
            evidence[position, level_index(name)] = 0.0
        return bool(np.isfinite(_viterbi(evidence, transitions)[1]).any())

    items = sorted(fixed.items())  # given the fixed labels, the stretches between them are solved apart: a conflict
    for position, name in items:  # lies in one fixed label alone or between two next to each other
        if not possible({position: name}):
            if position > level_index(name):
                why = f"{_vertebrae(position)} above it, and fewer levels come before {name}"
            else:
                why = f"{_vertebrae(n - 1 - position)} below it, more than can be named after {name}"
            return f"{describe(position)} cannot be {name}: {why}"
    for (upper, upper_name), (lower, lower_name) in zip(items, items[1:]):
        if not possible({upper: upper_name, lower: lower_name}):
            if level_index(lower_name) <= level_index(upper_name):
                why = f"levels run cranial to caudal, each once, and {lower_name} is not below {upper_name}"
            else:
                why = f"{_vertebrae(lower - upper - 1)} between them, more than can be named between the two"
            return (f"{describe(upper)} as {upper_name} and {describe(lower)} below it as {lower_name} cannot "
                    f"both hold: {why}; rename or unlock one of them")
    return "the fixed labels cannot all hold: each level appears once, cranial to caudal; rename or unlock some"


def _vertebrae(count: int) -> str:
    return "1 vertebra lies" if count == 1 else f"{count} vertebrae lie"


def skipped_levels(levels: np.ndarray) -> np.ndarray:
    """int (n-1,) how many regular levels a solved chain skips between each vertebra and the next (0 for none; T13
    and L6 are no regular levels). ``levels`` int (n,) indices into ``LEVELS``, chain order."""
    levels = np.asarray(levels, dtype=int)
    return np.maximum(_SKIPS[levels[:-1], levels[1:]], 0) if levels.size > 1 else np.zeros(0, dtype=int)


def vertebrae_in(levels: np.ndarray) -> int:
    """How many of a solved chain's components are vertebrae: those down to the first S1 (the components below it are
    pieces of the sacrum), else all. ``levels`` int (n,) indices into ``LEVELS``, chain order."""
    is_s1 = np.asarray(levels) == _S1
    return int(np.argmax(is_s1)) + 1 if is_s1.any() else len(is_s1)


def _viterbi(emissions: np.ndarray, transitions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best path at every scale, int64 (scales, n) indices into ``LEVELS``, and its log-score, float64 (scales,), for
    float64 log-score emissions (n, K) and transitions (n-1, scales, K, K)."""
    n, n_scales = emissions.shape[0], transitions.shape[1] if len(transitions) else _SCALE_STEPS.size
    score = np.repeat(emissions[:1], n_scales, axis=0)
    back = np.zeros((n, n_scales, K), dtype=int)
    for i in range(1, n):
        cand = score[:, :, None] + transitions[i - 1]
        back[i] = np.argmax(cand, axis=1)
        score = np.take_along_axis(cand, back[i][:, None, :], axis=1)[:, 0] + emissions[i]
    levels = np.zeros((n_scales, n), dtype=int)
    levels[:, -1] = np.argmax(score, axis=1)
    for i in range(n - 1, 0, -1):
        levels[:, i - 1] = np.take_along_axis(back[i], levels[:, i : i + 1], axis=1)[:, 0]
    return levels, np.take_along_axis(score, levels[:, -1:], axis=1)[:, 0]


def _forward_backward(emissions: np.ndarray, transitions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-partition function, float64 (scales,), and posterior marginals, float64 (scales, n, K), at every scale, for
    emissions (n, K) and transitions (n-1, scales, K, K), all float64 log-scores.

    In log space, so that no range of scores underflows (a scaled pass in probability space lost every path through
    an emission 800 below its row's best; the marginals came out NaN); a scale at which no path is possible gets
    zero marginals.
    """
    n, n_scales = emissions.shape[0], transitions.shape[1] if len(transitions) else _SCALE_STEPS.size
    log_alpha = np.empty((n_scales, n, K))
    log_beta = np.zeros((n_scales, n, K))
    log_alpha[:, 0] = emissions[0]
    for i in range(1, n):
        log_alpha[:, i] = _logsumexp(log_alpha[:, i - 1, :, None] + transitions[i - 1], axis=1) + emissions[i]
    for i in range(n - 2, -1, -1):
        log_beta[:, i] = _logsumexp(transitions[i] + (emissions[i + 1] + log_beta[:, i + 1])[:, None, :], axis=2)
    log_z = _logsumexp(log_alpha[:, -1], axis=1)
    possible = np.isfinite(log_z)
    with np.errstate(invalid="ignore"):
        marginals = np.exp(log_alpha + log_beta - np.where(possible, log_z, 0.0)[:, None, None])
    return log_z, np.where(possible[:, None, None], marginals, 0.0)


# An inner gap of a chain of four or more vertebrae (not its first or last: the view often cuts the end vertebrae, which
# moves their centroids; the gap likelihood widens its spread there too) is odd when its length, relative to its
# expected gap and to the median of that ratio over the chain's gaps (the patient's scale), is below this or above its
# inverse: on the real scans of ../shared/data as labelled the ratio lies within 0.68-1.17; a piece of a vertebra named
# as one in a noisy MRI gave 0.55 (benchmarks/RESULTS.md, Rules B and B2). Four vertebrae at least: of two gaps the
# median is their mean, which the odd one moves as much as the other.
ODD_GAP = 0.6


def _odd_gaps(levels: np.ndarray, gaps_mm: np.ndarray, expected_mm: np.ndarray, scale: float | None
              ) -> list[tuple[int, float]]:
    """(i, ratio) for each odd inner gap (``ODD_GAP``), i between chain positions i and i + 1. ``levels`` int (n,)
    indices into ``LEVELS``, chain order; ``gaps_mm`` float64 (n-1,) centroid distances; ``expected_mm`` float64 (K, K)
    as ``expected_gaps_mm`` gives it; ``scale`` the chain's (``_chain_scale``), the ratios measured against it; None:
    no odd gap."""
    if scale is None:
        return []
    ratios = gaps_mm / expected_mm[levels[:-1], levels[1:]] / scale
    return [(i, float(r)) for i, r in enumerate(ratios) if 0 < i < len(ratios) - 1 and not ODD_GAP <= r <= 1 / ODD_GAP]


# The patient sizes the names were checked on: a chain of four or more vertebrae whose scale (``_chain_scale``: its
# spacing over that of an average adult at the levels it is named) lies outside this range is named with a warning.
# exp(-/+1.5 scale_sigma) of the sequence model's size prior; the real scans of ../shared/data as labelled lie at
# 0.81-1.11. Scaled to 0.7 and 0.8 of their size (a child, a small adult) they got wrong names at confidence 0.99 or
# more, the level head reading small lumbar vertebrae as thoracic ones or losing the sacrum, in chains whose gaps fit
# the names so given (benchmarks/RESULTS.md, patient size).
CHECKED_SCALE = (float(np.exp(-1.5 * PRIORS.scale_sigma)), float(np.exp(1.5 * PRIORS.scale_sigma)))


def _chain_scale(levels: np.ndarray, gaps_mm: np.ndarray, expected_mm: np.ndarray) -> float | None:
    """The patient's scale that a named chain implies: the median, over its gaps longer than 0 mm (points can be moved
    onto each other), of each gap over the expected gap of its named transition; None for chains of fewer than four
    vertebrae (of two gaps the median is their mean, which one odd gap moves as much as the other) or without such a
    gap. ``levels`` int (n,) indices into ``LEVELS``, chain order; ``gaps_mm`` float64 (n-1,) centroid distances;
    ``expected_mm`` float64 (K, K) as ``expected_gaps_mm`` gives it."""
    if len(levels) < 4:
        return None
    ratios = np.asarray(gaps_mm, dtype=float) / expected_mm[levels[:-1], levels[1:]]
    if not (ratios > 0).any():
        return None
    return float(np.median(ratios[ratios > 0]))


def _warnings(levels: np.ndarray, confidence: np.ndarray, marginals: np.ndarray, gaps_mm: np.ndarray,
              expected_mm: np.ndarray, anchored: bool = False) -> list[str]:
    """Plain-language warnings about a solved chain: no sacrum or C1/C2 found (unless ``anchored``: a user's fixed
    name numbers the chain, not the vertebrae's appearance), T13/L6 ambiguous or named, skipped levels, odd gaps
    (``_odd_gaps``), uncertain labels.
    ``levels`` int (n,) indices into ``LEVELS`` and ``confidence`` float64 (n,) probabilities, chain order;
    ``marginals`` float64 (n, K) probabilities; ``gaps_mm`` float64 (n-1,) centroid distances in mm; ``expected_mm``
    float64 (K, K) as ``expected_gaps_mm`` gives it."""
    names = [_NAMES[k] for k in levels]
    out: list[str] = []
    lowest = LEVELS[levels[-1]]
    has_anchor_top = any(n in ("C1", "C2") for n in names)
    if "S1" not in names and not anchored:  # one warning of the two: a lumbar chain is numbered by its lumbar look
        if lowest.region == "lumbar":
            out.append("no sacrum found: lumbar numbering assumed from vertebra appearance"
                       + ("" if has_anchor_top else "; check it"))
        elif not has_anchor_top:
            out.append("no C1/C2 or sacrum found: numbering inferred from vertebra appearance; check it")
    for name, alt_a, alt_b, article in (("L6", "L5", "L6", "an"), ("T13", "T12", "T13", "a")):
        p = min(float(marginals[:, level_index(name)].sum()), 1.0)  # a labelling has at most one: the chain's chance
        if 0.2 <= p <= 0.8:
            out.append(f"{alt_a}/{alt_b} ambiguous: probability of {article} {name} is {p:.2f}")
        elif name in names:  # a correction can make one as sure as any other name: never named without a word
            out.append(f"{name} named, a transitional vertebra (probability {p:.2f}): check the count")
    skips = skipped_levels(levels)
    for i, skipped in enumerate(skips):
        if skipped > 0:
            missing = [lv.name for lv in LEVELS[levels[i] + 1 : levels[i + 1]] if not lv.transitional]
            out.append(
                f"{'level' if skipped == 1 else 'levels'} {', '.join(missing)} not found between {names[i]} and "
                f"{names[i + 1]} (gap {gaps_mm[i]:.0f} mm)"
            )
    scale = _chain_scale(levels, gaps_mm, expected_mm)
    for i, ratio in _odd_gaps(levels, gaps_mm, expected_mm, scale):
        if skips[i] > 0:  # said above, with its gap (a forced name can leave a level out across an ordinary gap)
            continue
        what = ("one may be a piece of a vertebra, or a vertebra split in two" if ratio < 1.0 else
                "a vertebra may be missing between them, or two joined")
        out.append(f"{names[i]} and {names[i + 1]} {gaps_mm[i]:.0f} mm apart, {ratio:.2f} times the spacing of the "
                   f"rest of the chain: {what}; check them")
    if scale is not None and not CHECKED_SCALE[0] <= scale <= CHECKED_SCALE[1]:
        out.append(f"vertebrae spaced {scale:.2f} times as widely as an average adult's at the levels named: the "
                   f"names were checked on spines {CHECKED_SCALE[0]:.2f}-{CHECKED_SCALE[1]:.2f} times that size (a "
                   "small spine can be read as one further up, or its L5 as S1); check them")
    for i, (name, p) in enumerate(zip(names, confidence)):
        if p < UNCERTAIN_BELOW:
            alt = np.argsort(marginals[i])[::-1]
            other = next(_NAMES[k] for k in alt if k != levels[i])
            out.append(f"{name} uncertain (confidence {confidence_text(p)}; next most likely {other})")
    return out


def relabel(result: SpineLabeling, fixed: dict[int, str] | None = None,
            priors: SequencePriors = PRIORS) -> SpineLabeling:
    """Re-solve the labels of a result with some of them fixed by the user.

    Args:
        result: a labelling; its vertebrae must be in chain order (cranial first).
        fixed: vertebra id -> level to force, by name (``"L3"``, any case; ``"sacrum"`` for S1) or VerSe label value
            (22). Vertebrae already marked ``fixed`` keep their labels too.
        priors: the anatomical priors.

    Returns:
        A new ``SpineLabeling`` (the component array is shared) with every vertebra's name and confidence
        re-solved, the forced ones marked ``fixed``, and fresh sequence warnings (other warnings are kept). The
        chain is solved with the pieces of the sacrum below its S1 (``SpineLabeling.sacral_pieces``) as
        ``label_spine`` solved it, unless the fixed names end the spine above them; never with a vertebra made one.

    Raises:
        KeyError: unknown vertebra id or level name.
        ValueError: fixed labels that cannot all hold.
    """
    fixed = dict(fixed or {})
    for vid, name in fixed.items():  # both checked before anything changes
        result.by_id(vid)
        level_index(name)
    out = result.copy()
    position_fixed: dict[int, str] = {}
    for pos, v in enumerate(out.vertebrae):
        if v.id in fixed:
            v.name = LEVELS[level_index(fixed[v.id])].name
            v.fixed = True
        if v.fixed:
            position_fixed[pos] = v.name
    n = len(out.vertebrae)
    rows = [(v.level_log_scores, v.confidence_log_scores) for v in out.vertebrae]
    gaps = list(out.gaps_mm)
    # the sacral pieces below the last vertebra (while it is still the one they lie below) are solved with as the
    # labelling solved them: left out, a lock that changed nothing took away the doubt of an S1 that may be an L6
    pieces = out.sacral_pieces if n and out.vertebrae[-1].id == out.sacral_pieces_below else []
    if pieces:
        rows += [(np.asarray(p["level_log_scores"], float), None if p["confidence_log_scores"] is None
                  else np.asarray(p["confidence_log_scores"], float)) for p in pieces]
        points = np.array([out.vertebrae[-1].centroid_lps_mm] + [p["centroid_lps_mm"] for p in pieces], float)
        gaps += np.linalg.norm(np.diff(points, axis=0), axis=1).tolist()
    scores = np.array([r for r, _ in rows]).reshape(-1, K)
    evidence = None
    if any(c is not None for _, c in rows):
        evidence = np.array([r if c is None else c for r, c in rows]).reshape(-1, K)
    if pieces and position_fixed:
        # with the pieces, the solve may end the vertebrae early (S1 after S1 above the last one), a labelling never
        # kept below; in a corrected chain it must not count in the confidences either (an L6 that the fixed names
        # leave certain read 0.58). Uncorrected, the confidences stay those of the labelling's own solve
        for e in (scores, evidence) if evidence is not None else (scores,):
            e[: n - 1, _S1] = -np.inf

    shown = [v.name for v in result.vertebrae]  # the names before this correction: the ones the user sees

    def describe(position: int) -> str:  # the id alone names no point or segment a Slicer user can find
        return f"vertebra {out.vertebrae[position].id} (named {shown[position]})"

    solution = None
    if pieces:
        try:
            solution = solve(scores, np.asarray(gaps, dtype=float), position_fixed, priors, describe=describe,
                             confidence_scores=evidence)
        except ValueError:  # said by the solve without them, if they are not the cause
            solution = None
        if solution is not None and vertebrae_in(solution.levels) != n:  # the fixed names end the spine elsewhere
            solution = None
    if solution is None:
        solution = solve(scores[:n], np.asarray(gaps[: n - 1], dtype=float), position_fixed,
                         replace(priors, sacral_piece=0.0), describe=describe,
                         confidence_scores=None if evidence is None else evidence[:n])
    for v, k, p in zip(out.vertebrae, solution.levels, solution.confidence):
        v.name = _NAMES[k]
        v.confidence = float(p)
    stale = set(result.sequence_warnings)
    out.warnings = [w for w in result.warnings if w not in stale] + solution.warnings
    out.sequence_warnings = list(solution.warnings)
    return out
