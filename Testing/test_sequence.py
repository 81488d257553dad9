"""The sequence model: consistent labels, transitional anatomy, missing levels, partial fields of view, relabel."""

from dataclasses import replace

import numpy as np
import pytest

from SpineLabelLib.result import Geometry, SpineLabeling, Vertebra
from SpineLabelLib.sequence import (K, PRIORS, TEMPERATURE, UNCERTAIN_BELOW, _shifted, _warnings, expected_gaps_mm,
                                    relabel, skipped_levels, solve)
from SpineLabelLib.vertebrae import LEVELS, level_index


def scores_for(names, strength=4.0, neighbour=1.5):
    """Log-scores that favour each given level, with some weight on its anatomical neighbours."""
    s = np.full((len(names), K), -strength)
    for i, name in enumerate(names):
        k = level_index(name)
        s[i, k] = 0.0
        for j in (k - 1, k + 1):
            if 0 <= j < K:
                s[i, j] = -neighbour
    return s


def names_of(solution):
    return [LEVELS[k].name for k in solution.levels]


def test_clear_evidence_is_followed_and_confident():
    names = ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    sol = solve(scores_for(names), np.full(7, 32.0))
    assert names_of(sol) == names
    assert (sol.confidence > 0.9).all()
    assert not any("sacrum" in w for w in sol.warnings)


def test_the_warnings_speak_of_the_vertebrae_not_of_the_sacral_pieces_below_s1():
    """A piece of the sacrum below S1 takes S1's level in the chain; an 'S1 uncertain' about it, beside S1's own,
    read as two contradicting warnings about the one S1 the labelling has."""
    scores = np.zeros((2, K))
    scores[:, level_index("S1")] = 6.0, 3.0  # the pair as on a real MR taken for CT: S1 and the piece both unsure
    sol = solve(scores, np.array([30.0]))
    assert names_of(sol) == ["S1", "S1"] and (sol.confidence < UNCERTAIN_BELOW).all()
    assert [w for w in sol.warnings if "uncertain" in w] == ["S1 uncertain (confidence 0.31; next most likely L5)"]

def test_labels_never_repeat_even_when_evidence_does():
    # every vertebra looks like L3: the chain still gets distinct, consecutive levels
    sol = solve(scores_for(["L3"] * 5), np.full(4, 35.0))
    got = [int(k) for k in sol.levels]
    assert len(set(got)) == 5 and got == sorted(got)
    assert any(w.startswith("L") and "uncertain" in w for w in sol.warnings)


def test_confidences_stay_probabilities_whatever_the_range_of_the_scores():
    # both vertebrae look like L1 and like nothing else by 800 log-units: the chain must name one of them otherwise
    scores = np.full((2, K), -800.0)
    scores[:, level_index("L1")] = 0.0
    sol = solve(scores, np.array([35.0]))
    assert np.isfinite(sol.marginals).all() and np.allclose(sol.marginals.sum(axis=1), 1.0)
    assert np.isfinite(sol.confidence).all() and (sol.confidence <= 1.0 + 1e-12).all()


def test_the_temperature_changes_how_sure_the_chain_is_not_its_labels():
    rng = np.random.default_rng(0)
    for n in (1, 3, 8):
        for _ in range(10):
            scores, gaps = rng.normal(0.0, 3.0, (n, K)), rng.uniform(15.0, 45.0, n - 1)
            cold, warm = solve(scores, gaps, temperature=1.0), solve(scores, gaps, temperature=2.5)
            assert names_of(cold) == names_of(warm)
            np.testing.assert_allclose(warm.marginals.sum(axis=1), 1.0)
    # a short chain without sacrum or C1/C2, read clearly: less sure when warm than when cold
    scores, gaps = scores_for(["L1", "L2", "L3"]), np.full(2, 36.0)
    cold, warm = solve(scores, gaps, temperature=1.0), solve(scores, gaps, temperature=2.5)
    assert names_of(cold) == names_of(warm) == ["L1", "L2", "L3"]
    assert (warm.confidence < cold.confidence).all()


def test_fixing_a_name_the_chain_already_has_changes_no_name():
    """A lock confirms a name: the other names stay, also on chains whose tempered path (taken once a fixed name
    overrules the level head) differs from the path of the evidence as it is."""
    rng = np.random.default_rng(1)
    tempered_differs = 0
    for _ in range(40):
        n = int(rng.integers(3, 9))
        scores, gaps = rng.normal(0.0, 3.0, (n, K)), rng.uniform(15.0, 45.0, n - 1)
        own = names_of(solve(scores, gaps))
        tempered_differs += names_of(solve(scores / TEMPERATURE, gaps)) != own
        for position in range(n):
            assert names_of(solve(scores, gaps, fixed={position: own[position]})) == own
    assert tempered_differs  # the case that matters is among them


def test_a_lock_after_a_rename_changes_no_name():
    """A name locked as shown after another correction renames nothing. T10 T11 T12 L1 L2 with a missed vertebra's
    gap between T12 and L1: renamed T13 there, the chain shows T10 T11 T12 T13 L1; locking that L1 (the level head's
    L2) read the vertebrae above the T13 one level up too, and across the long gap they were renamed T9 T10 T11."""
    names = ["T10", "T11", "T12", "L1", "L2"]
    expected = expected_gaps_mm()
    gaps = np.array([expected[level_index(a), level_index(b)] for a, b in zip(names, names[1:])])
    gaps[2] *= 2
    renamed = solve(scores_for(names), gaps, fixed={3: "T13"})
    assert names_of(renamed) == ["T10", "T11", "T12", "T13", "L1"]
    assert names_of(solve(scores_for(names), gaps, fixed={3: "T13", 4: "L1"})) == names_of(renamed)


def test_unusable_gaps_scores_and_positions_are_named():
    scores = scores_for(["L1", "L2", "L3"])
    for gaps in ([35.0], [35.0, np.nan], [35.0, 35.0, 35.0]):
        with pytest.raises(ValueError, match="2 finite gaps"):
            solve(scores, np.array(gaps))
    with pytest.raises(ValueError, match="without NaN"):
        solve(np.where(scores == 0.0, np.nan, scores), np.full(2, 35.0))
    with pytest.raises(ValueError, match="without NaN or [+]inf"):
        solve(np.where(scores == 0.0, np.inf, scores), np.full(2, 35.0))
    with pytest.raises(ValueError, match="position 3 is outside"):
        solve(scores, np.full(2, 35.0), fixed={3: "L4"})
    scores[1] = -np.inf
    with pytest.raises(ValueError, match="rule out every level"):
        solve(scores, np.full(2, 35.0))


def test_every_vertebra_below_the_uncertainty_cut_is_named_in_a_warning():
    # weak evidence: the chain's names are likely but not sure
    sol = solve(scores_for(["L1", "L2", "L3", "L4"], strength=2.0, neighbour=1.0), np.full(3, 35.0))
    uncertain = [w.split()[0] for w in sol.warnings if "uncertain" in w]
    expected = [name for name, p in zip(names_of(sol), sol.confidence) if p < UNCERTAIN_BELOW]
    assert uncertain == expected
    assert any(0.5 <= p < UNCERTAIN_BELOW for p in sol.confidence)  # the band the 0.5 cut of old left silent


def test_an_uncertain_confidence_is_never_shown_as_the_cut():
    marginals = np.zeros((1, K))
    marginals[0, level_index("L1")], marginals[0, level_index("L2")] = 0.9855, 0.0145
    warnings = _warnings(np.array([level_index("L1")]), np.array([0.9855]), marginals, np.zeros(0), expected_gaps_mm())
    assert "L1 uncertain (confidence 0.98; next most likely L2)" in warnings  # it read 0.99, the cut itself


def test_one_wrong_vote_is_outvoted_by_the_chain():
    names = ["L1", "L2", "L3", "L4", "L5", "S1"]
    s = scores_for(names)
    s[2] = scores_for(["L5"])[0]  # the network calls L3 an L5
    sol = solve(s, np.full(5, 35.0))
    assert names_of(sol) == names


def test_sacral_segments_below_s1_are_more_sacrum_not_a_shift():
    # the network found S2 and S3 as bodies of their own; they look sacral, not like lumbar vertebrae
    names = ["L2", "L3", "L4", "L5", "S1", "S1", "S1"]
    sol = solve(scores_for(names), np.array([35.0, 35, 35, 33, 25, 22]))
    assert names_of(sol) == names
    # relabel (interactive correction) never repeats a level
    result = make_result(names[:5])
    assert [v.name for v in relabel(result).vertebrae] == names[:5]
    with pytest.raises(ValueError):
        relabel(result, {14: "S1", 13: "S1"})


def test_missing_level_needs_a_gap():
    names = ["L1", "L2", "L4", "L5", "S1"]  # L3 missed by the network
    gaps = np.array([35.0, 70.0, 35.0, 35.0])
    sol = solve(scores_for(names), gaps)
    assert names_of(sol) == names
    assert any("L3 not found between L2 and L4" in w for w in sol.warnings)
    # without the gap the same evidence is better explained without a skip
    sol2 = solve(scores_for(names, strength=1.0, neighbour=0.5), np.full(4, 35.0))
    assert not any("not found" in w for w in sol2.warnings)


def test_a_gap_of_one_and_a_half_spacings_is_no_missed_level():
    """A missed vertebra leaves a gap of two spacings; one of 55 mm in a lumbar chain (1.5 spacings: a large disc, a
    centroid pulled by a cut) is no reason to skip a level, even on weak evidence. At a missing-level prior of 0.2
    instead of 0.02 this clean L1-L5 became T12 L1 L3 L4 L5 with 'L2 not found'; at 70 mm the skip is right."""
    names = ["L1", "L2", "L3", "L4", "L5"]
    weak = scores_for(names, strength=1.0, neighbour=0.5)
    sol = solve(weak, np.array([35.0, 55.0, 35.0, 35.0]))
    assert names_of(sol) == names
    assert not any("not found" in w for w in sol.warnings)
    missed = solve(weak, np.array([35.0, 70.0, 35.0, 35.0]))
    assert "level L2 not found between L1 and L3 (gap 70 mm)" in missed.warnings


def test_a_whole_spine_with_sacral_pieces_may_be_longer_than_the_levels():
    """C1-S1 and three sacral pieces below: 28 components for 27 levels. The pieces are S1 again (the labelling merges
    them into the sacrum); without sacral pieces (a correction) a chain that long cannot be named."""
    regular = [lv.name for lv in LEVELS if not lv.transitional]
    names = regular + ["S1"] * 3
    gaps = np.array([dict(PRIORS.pitch_mm).get(n, 22.0) for n in names[:-1]])
    sol = solve(scores_for(names), gaps)
    assert names_of(sol) == names and len(names) > K
    with pytest.raises(ValueError, match="longer than the 27 levels"):
        solve(scores_for(names), gaps, priors=replace(PRIORS, sacral_piece=0.0))


def test_l6_is_allowed_with_its_prior():
    names = ["L1", "L2", "L3", "L4", "L5", "L6", "S1"]
    sol = solve(scores_for(names), np.full(6, 35.0))
    assert names_of(sol) == names
    # named at a probability above the ambiguous band (a correction can make it 1.00): said all the same
    assert "L6 named, a transitional vertebra (probability 0.81): check the count" in sol.warnings
    # an L6 the level head is not sure of (3 log-units for it, 1.5 for L5): named, and the doubt said
    doubtful = solve(scores_for(names, strength=3.0), np.full(6, 35.0))
    assert names_of(doubtful) == names
    assert "L5/L6 ambiguous: probability of an L6 is 0.78" in doubtful.warnings  # 0.77 the L6 here, 0.01 elsewhere
    # a short chain whose evidence hardly hints at an L6 (probability 0.04): no word of one
    unlikely = solve(scores_for(["L4", "L5", "L6", "S1"], strength=1.0), np.full(3, 35.0))
    assert not any("ambiguous" in w for w in unlikely.warnings)


def test_the_chance_of_a_transitional_level_is_the_chain_s_not_one_vertebra_s():
    """A chain holds at most one T13: its chance is the sum over the vertebrae of each one's, not the largest."""
    levels = np.array([level_index(n) for n in ("T11", "T12", "T13", "L1")])
    marginals = np.zeros((4, len(LEVELS)))
    marginals[np.arange(4), levels] = 1.0
    marginals[2:, level_index("T13")] = 0.45  # the T13 may be the third or the fourth vertebra: a T13 at 0.9
    warnings = _warnings(levels, np.ones(4), marginals, np.full(3, 30.0), expected_gaps_mm())
    assert not any("ambiguous" in w for w in warnings)
    assert "T13 named, a transitional vertebra (probability 0.90): check the count" in warnings
    marginals[2:, level_index("T13")] = 0.15  # at 0.3
    warnings = _warnings(levels, np.ones(4), marginals, np.full(3, 30.0), expected_gaps_mm())
    assert "T12/T13 ambiguous: probability of a T13 is 0.30" in warnings


def test_a_chain_with_a_quarter_chance_of_a_t13_is_warned_of():
    """The ambiguous band starts at 0.2: a T13 at 0.25 (0.125 on each of the two vertebrae that may be it) is said."""
    levels = np.array([level_index(n) for n in ("T11", "T12", "T13", "L1")])
    marginals = np.zeros((4, len(LEVELS)))
    marginals[np.arange(4), levels] = 1.0
    marginals[2:, level_index("T13")] = 0.125
    warnings = _warnings(levels, np.ones(4), marginals, np.full(3, 30.0), expected_gaps_mm())
    assert "T12/T13 ambiguous: probability of a T13 is 0.25" in warnings


@pytest.mark.parametrize("regular, transitional, below", [("L5", "L6", "S1"), ("T12", "T13", "L1")])
def test_the_first_vertebra_pays_the_transitional_prior_too(regular, transitional, below):
    # the top vertebra looks as much like L5 as like L6 (T12 as T13): its population rate decides, as mid-chain
    scores = np.full((2, K), -10.0)
    scores[0, [level_index(regular), level_index(transitional)]] = 0.0
    scores[1, level_index(below)] = 0.0
    sol = solve(scores, np.array([35.0]))
    assert names_of(sol)[0] == regular and sol.marginals[0, level_index(transitional)] < 0.1


def test_t13_between_t12_and_l1():
    names = ["T10", "T11", "T12", "T13", "L1", "L2"]
    sol = solve(scores_for(names), np.full(5, 30.0))
    assert names_of(sol) == names


def test_partial_field_of_view_warnings():
    lumbar = solve(scores_for(["L2", "L3", "L4", "L5"]), np.full(3, 35.0))
    # once, not also as "no C1/C2 or sacrum found" (a helper's audit of the messages: said twice)
    assert [w for w in lumbar.warnings if "appearance" in w] == [
        "no sacrum found: lumbar numbering assumed from vertebra appearance; check it"]
    whole = solve(scores_for(["C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9",
                              "T10", "T11", "T12", "L1", "L2", "L3"]), np.full(20, 25.0))
    assert [w for w in whole.warnings if "appearance" in w] == [  # counted from C2: nothing to check
        "no sacrum found: lumbar numbering assumed from vertebra appearance"]
    cervical = solve(scores_for(["C2", "C3", "C4", "C5"]), np.full(3, 16.0))
    assert names_of(cervical) == ["C2", "C3", "C4", "C5"]
    assert not any("no sacrum found" in w for w in cervical.warnings)
    thoracic = solve(scores_for(["T4", "T5", "T6"]), np.full(2, 24.0))
    assert any("no C1/C2 or sacrum found" in w for w in thoracic.warnings)
    # a name the user fixed numbers the chain: no warning says the numbering comes from the vertebrae's appearance
    for names, gap in ((["L2", "L3", "L4", "L5"], 35.0), (["T4", "T5", "T6"], 24.0)):
        fixed = solve(scores_for(names), np.full(len(names) - 1, gap), {0: names[0]})
        assert names_of(fixed) == names and not any("appearance" in w for w in fixed.warnings)


def test_only_c1_c2_or_the_sacrum_anchor_the_numbering():
    """Counting from C1/C2 or from the sacrum is what makes the numbering sure; a chain that reaches neither is named
    from appearance only, and says so, whichever region it lies in: C3-T1 as much as T4-T6. Lumbar numbering is only
    assumed for a chain that ends in the lumbar spine."""
    cervical = solve(scores_for(["C3", "C4", "C5", "C6", "C7", "T1"]), np.full(5, 19.0))
    assert names_of(cervical) == ["C3", "C4", "C5", "C6", "C7", "T1"]
    assert any("no C1/C2 or sacrum found" in w for w in cervical.warnings)
    anchored = solve(scores_for(["C1", "C2", "C3", "C4"]), np.full(3, 19.0))
    assert not any("no C1/C2 or sacrum found" in w for w in anchored.warnings)
    thoracic = solve(scores_for(["T8", "T9", "T10", "T11", "T12"]), np.full(4, 27.0))
    assert names_of(thoracic) == ["T8", "T9", "T10", "T11", "T12"]
    assert any("no C1/C2 or sacrum found" in w for w in thoracic.warnings)
    assert not any("lumbar numbering assumed" in w for w in thoracic.warnings)  # it ends at T12: nothing lumbar


def test_fixed_labels_are_kept_and_propagate():
    names = ["L1", "L2", "L3", "L4", "L5"]
    sol = solve(scores_for(names, strength=1.0, neighbour=0.5), np.full(4, 35.0), fixed={4: "S1"})
    assert names_of(sol) == ["L2", "L3", "L4", "L5", "S1"]
    with pytest.raises(ValueError):
        solve(scores_for(names), np.full(4, 35.0), fixed={0: "L3", 1: "L3"})
    with pytest.raises(ValueError):
        solve(scores_for(names), np.full(4, 35.0), fixed={0: "L4", 1: "L2"})


def test_empty_chain():
    sol = solve(np.zeros((0, K)), np.zeros(0))
    assert sol.levels.size == 0 and sol.warnings == ["no vertebrae found"]


def test_expected_gaps_follow_the_ladder():
    expected = expected_gaps_mm()
    at = lambda a, b: expected[level_index(a), level_index(b)]
    assert at("C4", "C5") < at("T6", "T7") < at("L2", "L3")
    assert at("L2", "L4") == pytest.approx(at("L2", "L3") + at("L3", "L4"))  # a skipped level adds its pitch
    assert at("T12", "T13") == at("T13", "L1") == at("T12", "L1")
    # L6 takes the pitch of L5, as T13 that of T12
    assert at("L5", "L6") == pytest.approx(at("L6", "S1")) and at("L5", "L6") == pytest.approx(at("L5", "S1"))
    assert np.isnan(at("L3", "L2")) and np.isnan(at("L3", "L3"))


def test_spacing_tells_the_region_when_appearance_does_not():
    # three vertebrae with no level evidence at all, 18 mm apart: a cervical crop, not a lumbar one
    sol = solve(np.zeros((3, K)), np.full(2, 18.0))
    assert all(LEVELS[k].region == "cervical" for k in sol.levels)
    lumbar = solve(np.zeros((3, K)), np.full(2, 36.0))
    assert all(LEVELS[k].region in ("lumbar", "thoracic") for k in lumbar.levels)
    assert "L" in names_of(lumbar)[-1]
    # the patient's size is absorbed by the scale: a small patient's lumbar spine stays lumbar
    names = ["L1", "L2", "L3", "L4", "L5", "S1"]
    small = solve(scores_for(names, strength=1.0, neighbour=0.5), np.full(5, 30.0))
    assert names_of(small) == names


def test_confidences_can_be_read_from_other_evidence_than_the_names():
    """A short view read twice (pipeline: mirrored and zero-filled beyond its ends): the names follow the first
    reading, the confidences the evidence given for them, here a second reading one level lower."""
    names, lower = ["L1", "L2", "L3"], ["L2", "L3", "L4"]
    first = scores_for(names)
    alone, both = solve(first, np.full(2, 35.0)), solve(first, np.full(2, 35.0), confidence_scores=scores_for(lower))
    assert names_of(both) == names_of(alone) == names
    assert (alone.confidence > 0.8).all() and (both.confidence < 0.2).all()
    assert [LEVELS[k].name for k in both.marginals.argmax(axis=1)] == lower
    # the readings agreeing, the confidences are those of the one reading
    same = solve(first, np.full(2, 35.0), confidence_scores=first)
    np.testing.assert_allclose(same.confidence, alone.confidence)
    # a fixed name holds in the confidence evidence too
    fixed = solve(first, np.full(2, 35.0), {0: "L1"}, confidence_scores=scores_for(lower))
    assert names_of(fixed) == names and fixed.confidence[0] == pytest.approx(1.0)
    ruled_out = scores_for(lower)
    ruled_out[1] = -np.inf
    no_path = np.full((3, K), -np.inf)  # each row allows one level, but in an order no chain can take: no labelling
    no_path[np.arange(3), [level_index("S1"), level_index("L1"), level_index("C1")]] = 0.0  # (the marginals were NaN)
    for bad in (scores_for(lower)[:2], ruled_out, np.full((3, K), np.nan), no_path):
        with pytest.raises(ValueError, match="confidence scores"):
            solve(first, np.full(2, 35.0), confidence_scores=bad)


def make_result(names):
    scores = scores_for(names, strength=1.0, neighbour=0.5)
    vertebrae = [
        Vertebra(id=10 + i, name=n, centroid_lps_mm=(0.0, 0.0, -35.0 * i), volume_ml=30.0, confidence=0.5,
                 level_log_scores=scores[i])
        for i, n in enumerate(names)
    ]
    comps = np.zeros((4, 4, 4), np.int16)
    geom = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    sol = solve(scores, np.full(len(names) - 1, 35.0))
    return SpineLabeling(geom, comps, vertebrae, gaps_mm=[35.0] * (len(names) - 1),
                         warnings=["input note"] + sol.warnings, sequence_warnings=sol.warnings)


def test_relabel_reads_confidences_from_the_confidence_evidence():
    result = make_result(["L1", "L2", "L3", "L4", "L5"])
    lower = scores_for(["L2", "L3", "L4", "L5", "S1"], strength=1.0, neighbour=0.5)
    for v, row in zip(result.vertebrae, lower):
        v.confidence_log_scores = row
    out, plain = relabel(result, {}), relabel(make_result(["L1", "L2", "L3", "L4", "L5"]), {})
    assert [v.name for v in out.vertebrae] == [v.name for v in plain.vertebrae] == ["L1", "L2", "L3", "L4", "L5"]
    assert all(a.confidence < b.confidence for a, b in zip(out.vertebrae, plain.vertebrae))
    # an added vertebra (no confidence evidence of its own) is read from its level scores in the same chain
    result.vertebrae[2].confidence_log_scores = None
    mixed = relabel(result, {})
    assert [v.name for v in mixed.vertebrae] == ["L1", "L2", "L3", "L4", "L5"]
    assert mixed.vertebrae[2].confidence > out.vertebrae[2].confidence


def test_relabel_solves_with_the_sacral_pieces_below_s1_as_the_labelling_did():
    """The pieces of the sacrum below S1 are evidence the labelling solved its chain with; a correction that left
    them out took away the doubt of an S1 that may be an L6 (VB1_02: 0.79 before a lock of T12, 1.00 after)."""
    names = ["L2", "L3", "L4", "L5", "S1", "S1", "S1"]
    scores = scores_for(names)
    scores[4, level_index("L6")], scores[4, level_index("S1")] = 0.0, -1.0  # the S1 might be an L6
    gaps = np.array([35.0, 35.0, 35.0, 33.0, 25.0, 22.0])
    labelled = solve(scores, gaps)
    assert names_of(labelled) == names
    result = make_result(names[:5])
    for v, row in zip(result.vertebrae, scores):
        v.level_log_scores = row
    z = [0.0, -35.0, -70.0, -105.0, -138.0, -163.0, -185.0]
    for v, at in zip(result.vertebrae, z):
        v.centroid_lps_mm = (0.0, 0.0, at)
    result.gaps_mm = gaps[:4].tolist()
    result.sacral_pieces = [{"centroid_lps_mm": [0.0, 0.0, at], "level_log_scores": row.tolist(),
                             "confidence_log_scores": None} for at, row in zip(z[5:], scores[5:])]
    result.sacral_pieces_below = result.vertebrae[-1].id
    np.testing.assert_allclose([v.confidence for v in relabel(result, {}).vertebrae], labelled.confidence[:5])
    locked = relabel(result, {10: "L2"})  # a lock that changes no name keeps the doubt
    np.testing.assert_allclose(locked.vertebrae[-1].confidence, solve(scores, gaps, {0: "L2"}).confidence[4])
    without = solve(scores[:5], gaps[:4], priors=replace(PRIORS, sacral_piece=0.0))
    assert abs(without.confidence[4] - labelled.confidence[4]) > 0.005
    result.sacral_pieces_below = 99  # the last vertebra is no longer the one they lie below: left out
    np.testing.assert_allclose([v.confidence for v in relabel(result, {}).vertebrae], without.confidence)
    result.sacral_pieces_below = result.vertebrae[-1].id
    with pytest.raises(ValueError):  # L5 named S1 above the S1: no vertebra is made a piece of the sacrum
        relabel(result, {13: "S1"})


def test_relabel_fixes_one_and_renames_the_rest():
    result = make_result(["L1", "L2", "L3", "L4", "L5"])
    out = relabel(result, {12: "L4"})
    assert [v.name for v in out.vertebrae] == ["L2", "L3", "L4", "L5", "S1"]
    assert out.by_id(12).fixed and not out.by_id(10).fixed
    assert [v.name for v in result.vertebrae] == ["L1", "L2", "L3", "L4", "L5"]  # input untouched
    assert "input note" in out.warnings
    # the fixed label survives a later correction elsewhere
    again = relabel(out, {10: "L2"})
    assert again.by_id(12).name == "L4" and again.by_id(10).name == "L2"
    with pytest.raises(KeyError):
        relabel(result, {99: "L1"})
    with pytest.raises(KeyError):
        relabel(result, {10: "X9"})


def test_relabel_keeps_the_vertebrae_already_fixed_against_a_correction_elsewhere():
    """relabel keeps the names of vertebrae already marked fixed, not only those it is given: L1 forced on the top of
    a chain whose L4 is locked leaves a level out between them rather than renumbering the lock away (a correction
    elsewhere that already implies the locked name, as L2 forced two above L4, cannot tell)."""
    locked = relabel(make_result(["L1", "L2", "L3", "L4", "L5"]), {12: "L4"})
    assert [v.name for v in locked.vertebrae] == ["L2", "L3", "L4", "L5", "S1"]
    again = relabel(locked, {10: "L1"})
    assert [v.name for v in again.vertebrae] == ["L1", "L3", "L4", "L5", "S1"]
    assert again.by_id(12).fixed and again.by_id(10).fixed and not again.by_id(11).fixed
    assert "level L2 not found between L1 and L3 (gap 35 mm)" in again.warnings


def test_a_level_is_fixed_by_its_verse_label_value_as_by_its_name():
    """A fixed label given as a VerSe value (22 for L3) names the level that value stands for, not the level at that
    place in LEVELS: from L1 (20) on, the values and the places differ by T13 (28), which sits between T12 and L1."""
    assert [level_index(level.label) for level in LEVELS] == list(range(K))
    result = make_result(["L1", "L2", "L3", "L4", "L5"])
    by_value = relabel(result, {12: LEVELS[level_index("L4")].label})
    assert [v.name for v in by_value.vertebrae] == [v.name for v in relabel(result, {12: "L4"}).vertebrae]
    assert by_value.by_id(12).name == "L4" and by_value.by_id(12).fixed


def test_each_relabel_replaces_the_sequence_warnings_and_keeps_the_others():
    """Corrections come one after another: each re-solve's sequence warnings replace the last ones, so a warning
    the correction answered (no sacrum found, once S1 is named) goes and none is listed twice; the warnings
    of other origin ("input note") stay."""
    result = make_result(["L1", "L2", "L3", "L4", "L5"])
    assert any("no sacrum found" in w for w in result.warnings)
    once = relabel(result, {12: "L4"})  # the chain now ends at S1
    twice = relabel(once, {10: "L2"})
    for out in (once, twice):
        assert out.warnings == ["input note"] + out.sequence_warnings
        assert not any("no sacrum found" in w for w in out.warnings)
        assert len(set(out.warnings)) == len(out.warnings)


@pytest.mark.parametrize("margin", [5.0, 8.0])
def test_a_forced_name_renumbers_rather_than_skips_a_level_at_a_normal_gap(margin):
    """Forcing L3 on the vertebra the evidence calls L2: the vertebra above, called L1, becomes L2, because no level
    can be missing at a normal lumbar gap (with the gap model's outlier share, L2 was skipped at a 35 mm gap; with
    the evidence at full weight in the path, it was skipped at a margin of 8, as the network's evidence often is)."""
    names = ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    scores = np.full((len(names), K), -margin)
    for i, name in enumerate(names):
        scores[i, level_index(name)] = 0.0
    gaps = [31.0, 33.0, 35.0, 36.0, 37.0, 36.0]
    solution = solve(scores, np.array(gaps), fixed={3: "L3"})
    assert [LEVELS[i].name for i in solution.levels] == ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]


@pytest.mark.parametrize("end, name, expected", [(0, "T3", ["T3", "T4", "T5", "T6", "T7", "T8", "T9"]),
                                                 (-1, "T11", ["T5", "T6", "T7", "T8", "T9", "T10", "T11"])])
def test_a_name_forced_on_an_end_vertebra_renumbers_the_chain_too(end, name, expected):
    # the end gaps are wider (a cut end vertebra), but a level skipped there must be explained by the gap as well:
    # T4 forced to T3 gave T3 T5 T6 ..., a skip at a normal 25 mm gap
    names = ["T4", "T5", "T6", "T7", "T8", "T9", "T10"]
    scores = np.full((len(names), K), -5.0)
    for i, level in enumerate(names):
        scores[i, level_index(level)] = 0.0
    solution = solve(scores, np.full(len(names) - 1, 25.0), fixed={end % len(names): name})
    assert [LEVELS[i].name for i in solution.levels] == expected
    assert not any("not found" in w for w in solution.warnings)
    if end == 0:  # a real missed level still is one: a 50 mm gap below the forced T3
        missed = solve(scores, np.array([50.0] + [25.0] * 5), fixed={0: name})
        assert [LEVELS[i].name for i in missed.levels][:2] == ["T3", "T5"]
        assert any("T4 not found" in w for w in missed.warnings)


def test_a_name_forced_on_the_top_of_a_chain_read_weakly_renumbers_it_down_to_its_sacrum():
    """T7 forced on the top of a chain read T8 ... S1 at a margin of 3 and the gaps the model expects: every name
    moves up one, the sacrum's too, where with the wide end spread of an uncorrected chain for a skip as well the top
    gap took the skip (T7 T9 ... S1, T8 missing at a normal gap)."""
    names = ["T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    scores = np.full((len(names), K), -3.0)
    for i, name in enumerate(names):
        scores[i, level_index(name)] = 0.0
    expected = expected_gaps_mm(PRIORS)
    gaps = np.array([expected[level_index(a), level_index(b)] for a, b in zip(names, names[1:])])
    solution = solve(scores, gaps, fixed={0: "T7"})
    assert [LEVELS[i].name for i in solution.levels] == ["T7", *names[:-1]]


@pytest.mark.parametrize("sacrum_margin, renumbered", [(5.0, ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]),
                                                       (40.0, ["T10", "T11", "L1", "L2", "L3", "L4", "L5", "S1"])])
def test_a_name_forced_on_the_top_of_a_chain_with_its_sacrum_can_leave_a_level_missing(sacrum_margin, renumbered):
    """As the README says of corrections: T10 forced on the top vertebra of a chain read T11 ... S1 leaves T11 missing
    below it, with a warning; T11 forced on the next one as well renumbers the rest, the sacrum too, unless the
    network reads the sacrum surely: then the missing level moves down beside the forced names."""
    names = ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    scores = np.full((len(names), K), -5.0)
    scores[-1] = -sacrum_margin
    for i, name in enumerate(names):
        scores[i, level_index(name)] = 0.0
    gaps = np.array([33.0, 35.0, 36.0, 37.0, 37.0, 36.0, 35.0])
    top = solve(scores, gaps, fixed={0: "T10"})
    assert [LEVELS[i].name for i in top.levels] == ["T10", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    assert "level T11 not found between T10 and T12 (gap 33 mm)" in top.warnings
    both = solve(scores, gaps, fixed={0: "T10", 1: "T11"})
    assert [LEVELS[i].name for i in both.levels] == renumbered
    assert any("T12 not found" in w for w in both.warnings) == (renumbered[-1] == "S1")


@pytest.mark.parametrize("margin", [10.0, 20.0])
def test_l6_forced_on_the_l5_of_a_chain_read_surely_renumbers_the_vertebrae_above(margin):
    """L6 forced on the L5 of a lumbar MRI read T9 ... S1 kept T9 ... L4 and left L5 missing across a normal 36 mm gap:
    the level head reads every vertebra surely, and its evidence against renumbering eight of them outweighed the
    skip. Its readings of one image go wrong together, so after the correction those above follow it."""
    names = ["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    scores = np.full((len(names), K), -margin)
    for i, name in enumerate(names):
        scores[i, level_index(name)] = 0.0
    gaps = np.array([24.0, 27.0, 31.0, 33.0, 35.0, 36.0, 37.0, 36.0, 35.0])
    solution = solve(scores, gaps, fixed={8: "L6"})
    assert [LEVELS[i].name for i in solution.levels] == ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "L6", "S1"]
    assert not any("not found" in w for w in solution.warnings)
    missed = solve(scores, np.concatenate([gaps[:7], [70.0, 35.0]]), fixed={8: "L6"})  # room for a missed L5
    assert [LEVELS[i].name for i in missed.levels][-4:] == ["L3", "L4", "L6", "S1"]
    assert any("L5 not found" in w for w in missed.warnings)


@pytest.mark.parametrize("forced", [{18: "T13"}, {23: "L6"}])
def test_a_transitional_name_forced_on_a_whole_spine_leaves_c1_c2_and_the_sacrum_alone(forced):
    """Both ends of a whole spine are told by their shape: reading the evidence shifted by the correction's count on
    every vertebra (as once done) named C1 C2 as C2 C3 when T13 or L6 was forced on a whole-spine phantom."""
    names = [level.name for level in LEVELS if not level.transitional]  # C1 ... L5, S1
    scores = np.full((len(names), K), -5.0)
    for i, name in enumerate(names):
        scores[i, level_index(name)] = 0.0
    gaps = np.array([expected_gaps_mm()[level_index(a), level_index(b)] for a, b in zip(names, names[1:])])
    solution = solve(scores, gaps, fixed=forced)
    named = [LEVELS[i].name for i in solution.levels]
    assert named[:2] == ["C1", "C2"] and named[-1] == "S1"
    assert any("not found" in w for w in solution.warnings)  # the count cannot hold without a level left out


@pytest.mark.parametrize("shift, shaped, counted", [(1, "S1", "L5"), (-1, "C2", "C3")])
def test_shifted_evidence_never_names_c1_c2_or_the_sacrum(shift, shaped, counted):
    """Evidence read shifted by a correction's count moves between counted levels only: an L5 read one level further
    caudal gives no evidence of S1, a C3 read one level further cranial none of C2 (they are told by their shape)."""
    scores = np.full((1, K), -10.0)
    scores[0, level_index(counted)] = 0.0
    out = _shifted(scores, [{shift}])
    assert out[0, level_index(shaped)] == -10.0
    beside = np.full((1, K), -10.0)  # the counted level on the other side gives its evidence to this one
    beside[0, level_index(counted) - shift] = 0.0
    assert _shifted(beside, [{shift}])[0, level_index(counted)] == pytest.approx(0.0, abs=1e-4)


def test_fixed_labels_that_cannot_hold_are_named():
    scores, gaps = np.zeros((5, K)), [30.0] * 4
    with pytest.raises(ValueError, match="vertebra 2 from the top cannot be C1: 1 vertebra lies above it"):
        solve(scores, gaps, {1: "C1"})
    with pytest.raises(ValueError, match="vertebra 1 from the top as L2 and vertebra 3 from the top below it as L1 "
                                         "cannot both hold: levels run cranial to caudal"):
        solve(scores, gaps, {0: "L2", 2: "L1"})
    with pytest.raises(ValueError, match="1 vertebra lies between them"):
        solve(scores, gaps, {0: "L2", 2: "L3"})


def test_one_level_fixed_on_two_vertebrae_is_named_as_such():
    """Two vertebrae fixed to the same level: the message says a level comes once, not that too many vertebrae lie
    between them (one does, and L3 to L3 has room for none)."""
    with pytest.raises(ValueError, match="vertebra 1 from the top as L3 and vertebra 3 from the top below it as L3 "
                                         "cannot both hold: levels run cranial to caudal, each once, and L3 is not "
                                         "below L3"):
        solve(np.zeros((5, K)), [30.0] * 4, {0: "L3", 2: "L3"})


def test_the_conflict_named_is_between_fixed_labels_next_to_each_other():
    """With L1, L2 and L3 locked and L4 forced two below L3, the message named L1 and L4: unlocking L1 as it advised
    changed nothing, and every pair was tried (a second of CPU on a locked whole spine)."""
    with pytest.raises(ValueError, match="vertebra 4 from the top as L3 and vertebra 6 from the top below it as L4 "
                                         "cannot both hold: 1 vertebra lies between them"):
        solve(np.zeros((6, K)), [35.0] * 5, {1: "L1", 2: "L2", 3: "L3", 5: "L4"})


def test_a_corrected_chain_s_confidences_count_no_vertebra_made_a_sacral_piece():
    """L3 renamed L4 above a sure S1 leaves L5 and L6 for the two vertebrae between: the L6 is certain. With a sacral
    piece below S1 the solve also counted labellings that end the vertebrae early (two named S1), which relabel never
    returns, and the L6 read 0.58 with an 'L5/L6 ambiguous' warning."""
    names = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    result = make_result(names)
    z = np.concatenate([[0.0], -np.cumsum([34.0, 37.0, 38.0, 40.0, 38.0, 52.0])])
    for v, at, row in zip(result.vertebrae, z, scores_for(names)):
        v.centroid_lps_mm, v.level_log_scores = (0.0, 0.0, at), row
    result.gaps_mm = np.diff(-z).tolist()
    result.sacral_pieces = [{"centroid_lps_mm": [0.0, 0.0, z[-1] - 25.0],
                             "level_log_scores": scores_for(["S1"])[0].tolist(), "confidence_log_scores": None}]
    result.sacral_pieces_below = result.vertebrae[-1].id
    out = relabel(result, {13: "L4"})
    assert [v.name for v in out.vertebrae] == ["L1", "L2", "L3", "L4", "L5", "L6", "S1"]
    assert out.vertebrae[5].confidence > 0.99 and not any("ambiguous" in w for w in out.warnings)


def test_skipped_levels_count_regular_levels_only():
    chain = [level_index(n) for n in ("T11", "T12", "L2", "L5", "L6", "S1", "S1")]
    assert skipped_levels(chain).tolist() == [0, 1, 2, 0, 0, 0]  # T13 and L6 are no regular levels; S1 pieces none
    assert skipped_levels([level_index("T12"), level_index("T13"), level_index("L1")]).tolist() == [0, 0]
    assert skipped_levels([level_index("L1")]).size == 0


def test_a_confidence_an_ulp_below_one_reads_1_00_and_one_below_the_warning_never_0_99():
    """numpy 1.24/1.26 gave 0.9999999999999996 where numpy 2.4 gave 1.0 on the README's phantom: 0.99 against 1.00."""
    from SpineLabelLib.sequence import UNCERTAIN_BELOW, confidence_text

    assert confidence_text(1.0) == confidence_text(1.0 - 4e-16) == "1.00"
    assert confidence_text(UNCERTAIN_BELOW) == "0.99"
    assert confidence_text(np.nextafter(UNCERTAIN_BELOW, 0.0)) == "0.98"


def test_a_confidence_an_ulp_below_any_hundredth_reads_that_hundredth_but_none_uncertain_reads_0_99():
    """0.58 is 0.57999999999999996 and read 0.57 (so did 0.29 and 0.57): the ulp below a hundredth that 1.0 was given
    only at or above the warning's threshold."""
    from SpineLabelLib.sequence import UNCERTAIN_BELOW, confidence_text

    assert [confidence_text(k / 100) for k in range(100)] == [f"{k / 100:.2f}" for k in range(100)]
    assert confidence_text(0.58 - 1e-12) == "0.58" and confidence_text(0.5799) == "0.57"
    below = [np.nextafter(UNCERTAIN_BELOW, 0.0), UNCERTAIN_BELOW - 1e-12, UNCERTAIN_BELOW - 1e-9, 0.9899]
    assert [confidence_text(p) for p in below] == ["0.98"] * 4


def test_a_gap_far_from_the_chain_s_spacing_is_warned_and_changes_no_name():
    """A piece of a vertebra named as one (a noisy lumbar MRI: a posterior fragment between T10 and T11 named T10, the
    real T10 above it T9, at 1.00, 13 and 15 mm apart) gave no warning: the gap likelihood's outlier share explains
    odd gaps without a word. Gaps within 0.6-1.67 times the chain's own spacing (real chains: 0.68-1.17) give none."""
    names = ["T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    expected = expected_gaps_mm()
    regular = np.array([expected[level_index(a), level_index(b)] for a, b in zip(names, names[1:])])
    plain = solve(scores_for(names, strength=8.0), regular)
    assert names_of(plain) == names and not any("apart" in w for w in plain.warnings)
    odd = regular.copy()
    odd[1] *= 0.5  # T10 -> T11 half its expected length
    odd[5] *= 1.8  # L2 -> L3 nearly twice
    sol = solve(scores_for(names, strength=8.0), odd)
    assert names_of(sol) == names
    apart = [w for w in sol.warnings if "apart" in w]
    assert len(apart) == 2
    assert apart[0].startswith(f"T10 and T11 {odd[1]:.0f} mm apart, 0.50 times the spacing of the rest of the chain: "
                               "one may be a piece of a vertebra")
    assert apart[1].startswith("L2 and L3") and "a vertebra may be missing between them, or two joined" in apart[1]


def test_odd_gaps_are_read_inside_chains_of_four_or_more_only():
    """Of a chain's two gaps the median is their mean: L3 L4 L5 at 1.0 and 2.4 times their expected gaps named the
    ordinary L3-L4 gap "0.59 times the spacing of the rest of the chain" (it is 0.42 times the other) and not the long
    one. A chain's first and last gaps are not read either: the view often cuts its end vertebrae, which moves their
    centroids (on synthetic crops, 8 of the 14 chains so warned, several named right throughout)."""
    expected = expected_gaps_mm()

    def apart(names, factors):
        gaps = np.array([expected[level_index(a), level_index(b)] for a, b in zip(names, names[1:])]) * factors
        sol = solve(scores_for(names, strength=8.0), gaps)
        assert names_of(sol) == names
        return [w for w in sol.warnings if "apart" in w]

    assert apart(["L3", "L4", "L5"], [1.0, 2.4]) == []
    assert apart(["L1", "L2", "L3", "L4", "L5"], [0.5, 1.0, 1.0, 2.4]) == []  # the two end gaps
    four = apart(["L2", "L3", "L4", "L5"], [1.0, 2.4, 1.0])
    assert len(four) == 1 and four[0].startswith("L3 and L4 ") and "a vertebra may be missing" in four[0]


def test_a_spine_far_from_adult_size_is_named_with_a_warning():
    """Real lumbar MRI with their voxel spacing scaled by 0.7 (a child's or a small adult's spine) were named L1-S1
    where they are T12-L5, their sacrum lost, at confidence 0.99 or more and without a warning: the gaps of a chain so
    named fit a patient 0.73 times an adult's size, which the sequence model's size prior allows. A chain whose
    spacing at the levels named lies outside CHECKED_SCALE is now named with a warning; at adult sizes none is given."""
    names = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    expected = np.array([expected_gaps_mm()[level_index(a), level_index(b)] for a, b in zip(names, names[1:])])

    def size_warnings(factor):
        sol = solve(scores_for(names, strength=8.0), expected * factor)
        assert names_of(sol) == names and (sol.confidence[1:-1] >= UNCERTAIN_BELOW).all()  # confident: no other word
        return [w for w in sol.warnings if "average adult" in w]

    assert size_warnings(1.0) == [] and size_warnings(0.85) == [] and size_warnings(1.15) == []
    small = size_warnings(0.7)
    assert len(small) == 1 and small[0].startswith("vertebrae spaced 0.70 times as widely as an average adult's")
    assert small[0].endswith("check them")
    assert len(size_warnings(1.4)) == 1
    # three vertebrae: the median of two gaps says too little of the patient's size
    short = solve(scores_for(names[2:5], strength=8.0), expected[2:4] * 0.7)
    assert not any("average adult" in w for w in short.warnings)


def test_a_gap_across_a_skipped_level_is_warned_of_once():
    """T10 forced on the top vertebra of a chain read T11 ... S1 leaves T11 out across an ordinary 33 mm gap, which
    the skipped-level warning names with its gap; the odd-gap warning spoke of the same gap as a piece of a vertebra
    or one split in two."""
    names = ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    scores = np.full((len(names), K), -5.0)
    for i, name in enumerate(names):
        scores[i, level_index(name)] = 0.0
    sol = solve(scores, np.array([33.0, 35.0, 36.0, 37.0, 37.0, 36.0, 35.0]), fixed={0: "T10"})
    assert "level T11 not found between T10 and T12 (gap 33 mm)" in sol.warnings
    assert not any("apart" in w for w in sol.warnings)


def test_a_skipped_level_inside_a_chain_is_warned_of_once():
    """The gap across a skipped level inside a chain (where odd gaps are read, unlike the end gap of the test above)
    is half the two pitches it spans: the skipped-level warning names it, and no odd-gap warning speaks of it again."""
    levels = np.array([level_index(n) for n in ("L1", "L2", "L4", "L5", "S1")])
    marginals = np.zeros((5, K))
    marginals[np.arange(5), levels] = 1.0
    warnings = _warnings(levels, np.ones(5), marginals, np.array([35.0, 37.0, 36.0, 35.0]), expected_gaps_mm())
    assert warnings == ["level L3 not found between L2 and L4 (gap 37 mm)"]


def test_gaps_of_0_mm_give_no_inf_or_nan_ratio():
    """Points moved onto each other (move_point into the background between two bodies, which keeps the chain's
    order) left half the gaps of a chain 0 mm: its median ratio 0, and a 60 mm gap read "inf times the spacing of the
    rest of the chain", a 0 mm one "nan times" with "a vertebra may be missing between them". The scale is that of
    the gaps longer than 0 mm."""
    expected = expected_gaps_mm()
    names = ["L1", "L2", "L3", "L4", "L5", "S1"]
    pitch = np.array([expected[level_index(a), level_index(b)] for a, b in zip(names, names[1:])])
    with np.errstate(divide="raise", invalid="raise"):
        sol = solve(scores_for(names, strength=8.0), pitch * [0.0, 0.0, 1.0, 0.0, 1.0])
        apart = [w for w in sol.warnings if "apart" in w]
        assert not any("inf" in w or "nan" in w for w in apart)
        assert [w.split(" mm apart")[0] for w in apart] == ["L2 and L3 0", "L4 and L5 0"]
        assert all("0.00 times" in w and "a piece of a vertebra" in w for w in apart)
        four = solve(scores_for(names[:4], strength=8.0), pitch[:3] * [0.0, 2.0, 0.0])
        assert not any("apart" in w for w in four.warnings)  # its 0 mm gaps are end gaps; the other one sets the scale
        none = solve(scores_for(names[:4], strength=8.0), np.zeros(3))
        assert not any("apart" in w for w in none.warnings)
