"""The sequence model: consistent anatomical labels for a chain of vertebrae.

The chain (vertebrae ordered cranial to caudal) is a hidden-Markov chain whose states are the levels of
``vertebrae.LEVELS``. Each vertebra brings per-level log-likelihoods (the network's level head averaged over its
voxels); transitions only go caudally, so no level can repeat and the order is always anatomical:

* one step down the regular ladder (C1 ... C7, T1 ... T12, L1 ... L5, S1) costs nothing;
* the supernumerary levels T13 (between T12 and L1) and L6 (between L5 and S1) cost their prior;
* skipping k regular levels costs k times the missing-level prior, and the gap between the two centroids must
  explain it: a missed vertebra leaves a gap about twice the local spacing, so the gap-to-spacing ratio r is scored
  by a Gaussian around k + 1;
* S1 may follow S1: the sacrum is one bone, but its fused segments (S2-S5) often come out of the network as
  separate bodies below S1, above all on MRI. Each such piece costs its prior; ``label_spine`` merges the pieces
  into the sacrum, so a finished labelling never repeats a level, and ``relabel`` never opens this transition.

Viterbi gives the best labelling; forward-backward gives each vertebra's posterior probability of its label (the
confidence) and the probability of transitional anatomy, from which the warnings come. ``relabel`` re-runs only
this model with some labels forced, which is what interactive correction uses.

All priors live in ``PRIORS`` below, in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from .result import SpineLabeling
from .vertebrae import BY_NAME, LEVELS, level_index

__all__ = ["SequencePriors", "PRIORS", "Solution", "solve", "relabel", "local_gap_ratios"]

log = logging.getLogger(__name__)

K = len(LEVELS)
_NAMES = [level.name for level in LEVELS]


@dataclass(frozen=True)
class SequencePriors:
    """Anatomical priors of the sequence model (probabilities per scan).

    Attributes:
        t13: a 13th thoracic vertebra (about 2-8 % of the population in CT series; 3 % used).
        l6: a sixth lumbar vertebra (lumbarised S1; about 4-7 %; 4 % used).
        missing_level: one regular level absent from the chain (a vertebra the network missed, or 11 thoracic
            vertebrae / sacralised L5); 2 % per skipped level.
        gap_sigma: standard deviation of the gap-to-local-spacing ratio for one step.
        sacral_piece: one more piece of the sacrum below S1 (its segments are body-like and partly separated by
            rudimentary discs); 0 forbids it.
        sacral_spacing: centroid distance between sacral segments relative to the spacing of the vertebrae above
            (segments are about 20-25 mm apart, lumbar vertebrae about 35 mm).
    """

    t13: float = 0.03
    l6: float = 0.04
    missing_level: float = 0.02
    gap_sigma: float = 0.3
    sacral_piece: float = 0.2
    sacral_spacing: float = 0.7


PRIORS = SequencePriors()

_TRANSITIONAL = np.array([level.transitional for level in LEVELS])
# regular levels strictly between a and b (a < b), the number a transition a -> b skips
_REGULAR_BEFORE = np.cumsum(~_TRANSITIONAL) - (~_TRANSITIONAL)
_SKIPS = _REGULAR_BEFORE[None, :] - _REGULAR_BEFORE[:, None] - (~_TRANSITIONAL)[:, None]
_VALID = np.arange(K)[None, :] > np.arange(K)[:, None]
_IS_T13 = np.arange(K) == level_index("T13")
_IS_L6 = np.arange(K) == level_index("L6")
_S1 = level_index("S1")


def local_gap_ratios(gaps_mm: np.ndarray, window: int = 3) -> np.ndarray:
    """Each gap divided by the median of the other gaps within ``window`` neighbours (1.0 when there are none).

    Args:
        gaps_mm: float (n-1,) centroid distances between consecutive vertebrae in chain order, mm.
    """
    gaps = np.asarray(gaps_mm, dtype=float)
    ratios = np.ones_like(gaps)
    for i in range(gaps.size):
        others = np.concatenate([gaps[max(0, i - window) : i], gaps[i + 1 : i + 1 + window]])
        if others.size:
            ratios[i] = gaps[i] / max(float(np.median(others)), 1e-6)
    return ratios


def _transition_scores(ratio: float, priors: SequencePriors) -> np.ndarray:
    """Log-score (K, K) of going from level a (row) to level b (column) across a gap with the given ratio."""
    steps = np.maximum(_SKIPS, 0) + 1.0
    sigma = priors.gap_sigma * steps
    gap_term = -0.5 * ((ratio - steps) / sigma) ** 2 - np.log(steps)
    scores = gap_term + (steps - 1.0) * np.log(priors.missing_level)
    scores = scores + np.where(_IS_T13, np.log(priors.t13), 0.0)[None, :]
    scores = scores + np.where(_IS_L6, np.log(priors.l6), 0.0)[None, :]
    scores = np.where(_VALID, scores, -np.inf)
    if priors.sacral_piece > 0:
        gap_term = -0.5 * ((ratio - priors.sacral_spacing) / priors.gap_sigma) ** 2
        scores[_S1, _S1] = gap_term + np.log(priors.sacral_piece)
    return scores


@dataclass
class Solution:
    """Best labelling of a chain.

    Attributes:
        levels: int (n,) index into ``LEVELS`` per vertebra, chain order.
        confidence: float (n,) posterior probability of that level.
        marginals: float (n, K) posterior probability of every level per vertebra.
        warnings: plain-language warnings.
    """

    levels: np.ndarray
    confidence: np.ndarray
    marginals: np.ndarray
    warnings: list[str]


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def solve(
    log_scores: np.ndarray,
    gaps_mm: np.ndarray,
    fixed: dict[int, str] | None = None,
    priors: SequencePriors = PRIORS,
) -> Solution:
    """Label a chain of vertebrae.

    Args:
        log_scores: float (n, K) per-vertebra log-likelihood of each level of ``LEVELS``, chain order (cranial
            first). Rows of zeros mean "no evidence".
        gaps_mm: float (n-1,) centroid distance between consecutive vertebrae, mm.
        fixed: chain position -> level name that must be kept.
        priors: the anatomical priors.

    Returns:
        The Viterbi labelling with posterior confidences and warnings.

    Raises:
        ValueError: when the fixed labels contradict each other (a duplicate level, other than S1 when
            ``priors.sacral_piece`` allows sacral pieces, or a caudal level above a cranial one), or the chain is
            longer than the number of levels.
    """
    emissions = np.array(log_scores, dtype=float, copy=True).reshape(-1, K)
    n = emissions.shape[0]
    if n == 0:
        return Solution(np.zeros(0, int), np.zeros(0), np.zeros((0, K)), ["no vertebrae found"])
    if n > K:
        raise ValueError(f"a chain of {n} vertebrae is longer than the {K} levels SpineLabel knows")
    for position, name in (fixed or {}).items():
        keep = level_index(name)
        emissions[position, :] = -np.inf
        emissions[position, keep] = 0.0
    ratios = local_gap_ratios(np.asarray(gaps_mm, dtype=float).reshape(-1))
    transitions = [_transition_scores(r, priors) for r in ratios]

    # Viterbi
    score = emissions[0].copy()
    back = np.zeros((n, K), dtype=int)
    for i in range(1, n):
        cand = score[:, None] + transitions[i - 1]
        back[i] = np.argmax(cand, axis=0)
        score = cand[back[i], np.arange(K)] + emissions[i]
    if not np.isfinite(score).any():
        raise ValueError("the fixed labels cannot all hold: each level appears once, cranial to caudal")
    levels = np.zeros(n, dtype=int)
    levels[-1] = int(np.argmax(score))
    for i in range(n - 1, 0, -1):
        levels[i - 1] = back[i, levels[i]]

    # forward-backward in log space
    alpha = np.zeros((n, K))
    beta = np.zeros((n, K))
    alpha[0] = emissions[0]
    for i in range(1, n):
        alpha[i] = _logsumexp(alpha[i - 1][:, None] + transitions[i - 1], axis=0) + emissions[i]
    for i in range(n - 2, -1, -1):
        beta[i] = _logsumexp(transitions[i] + (emissions[i + 1] + beta[i + 1])[None, :], axis=1)
    log_marg = alpha + beta
    log_marg -= _logsumexp(log_marg, axis=1)[:, None]
    marginals = np.exp(log_marg)
    confidence = marginals[np.arange(n), levels]
    return Solution(levels, confidence, marginals, _warnings(levels, confidence, marginals, np.asarray(gaps_mm, float)))


def _warnings(levels: np.ndarray, confidence: np.ndarray, marginals: np.ndarray, gaps_mm: np.ndarray) -> list[str]:
    names = [_NAMES[k] for k in levels]
    out: list[str] = []
    lowest = LEVELS[levels[-1]]
    has_anchor_top = any(n in ("C1", "C2") for n in names)
    if "S1" not in names and lowest.region == "lumbar":
        out.append("sacrum not in view: lumbar numbering assumed from vertebra appearance")
    if "S1" not in names and not has_anchor_top:
        out.append("neither C1/C2 nor the sacrum is in view: numbering inferred from vertebra appearance; check it")
    for name, alt_a, alt_b in (("L6", "L5", "L6"), ("T13", "T12", "T13")):
        p = float(marginals[:, level_index(name)].max(initial=0.0))
        if 0.2 <= p <= 0.8:
            out.append(f"{alt_a}/{alt_b} ambiguous: probability of a {name} is {p:.2f}")
    for i in range(len(levels) - 1):
        skipped = int(_SKIPS[levels[i], levels[i + 1]])
        if skipped > 0:
            missing = [lv.name for lv in LEVELS[levels[i] + 1 : levels[i + 1]] if not lv.transitional]
            out.append(
                f"{'level' if skipped == 1 else 'levels'} {', '.join(missing)} not found between {names[i]} and "
                f"{names[i + 1]} (gap {gaps_mm[i]:.0f} mm)"
            )
    for i, (name, p) in enumerate(zip(names, confidence)):
        if p < 0.5:
            alt = np.argsort(marginals[i])[::-1]
            other = next(_NAMES[k] for k in alt if k != levels[i])
            out.append(f"{name} uncertain (confidence {p:.2f}; next most likely {other})")
    return out


def relabel(result: SpineLabeling, fixed: dict[int, str] | None = None, priors: SequencePriors = PRIORS) -> SpineLabeling:
    """Re-solve the labels of a result with some of them fixed by the user.

    Args:
        result: a labelling; its vertebrae must be in chain order (cranial first).
        fixed: vertebra id -> level name to force. Vertebrae already marked ``fixed`` keep their labels too.
        priors: the anatomical priors.

    Returns:
        A new ``SpineLabeling`` (the component array is shared) with every vertebra's name and confidence
        re-solved, the forced ones marked ``fixed``, and fresh sequence warnings (other warnings are kept).

    Raises:
        KeyError: unknown vertebra id or level name.
        ValueError: fixed labels that cannot all hold.
    """
    fixed = dict(fixed or {})
    for vid, name in fixed.items():
        result.by_id(vid)
        if name.strip().upper() not in BY_NAME and name.strip().lower() != "sacrum":
            raise KeyError(f"unknown vertebra name {name!r}")
    out = result.copy()
    position_fixed: dict[int, str] = {}
    for pos, v in enumerate(out.vertebrae):
        if v.id in fixed:
            v.name = LEVELS[level_index(fixed[v.id])].name
            v.fixed = True
        if v.fixed:
            position_fixed[pos] = v.name
    scores = np.array([v.level_log_scores for v in out.vertebrae]).reshape(-1, K)
    solution = solve(scores, np.asarray(out.gaps_mm, dtype=float), position_fixed, replace(priors, sacral_piece=0.0))
    for v, k, p in zip(out.vertebrae, solution.levels, solution.confidence):
        v.name = _NAMES[k]
        v.confidence = float(p)
    stale = set(result.sequence_warnings)
    out.warnings = [w for w in result.warnings if w not in stale] + solution.warnings
    out.sequence_warnings = list(solution.warnings)
    return out
