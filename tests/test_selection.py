import pytest
import torch

from trl_tip.selection import (
    AllTokens,
    EntropyDivergenceSample,
    EntropySample,
    EntropyTopK,
    QuadrantBudget,
    QuadrantSubset,
    RandomTokens,
    SelectionContext,
    assign_quadrants,
    budget,
    sample_without_replacement,
    validate_selection,
)
from trl_tip.selection.registry import one_of
from trl_tip.selection.rules import check_choice
from trl_tip.signals import TokenSignals


def make_signals(entropy, divergence, finite=None):
    entropy = torch.tensor(entropy, dtype=torch.float32)
    divergence = torch.tensor(divergence, dtype=torch.float32)
    n = entropy.numel()
    zeros = torch.zeros(n)
    return TokenSignals(
        entropy=entropy,
        divergence=divergence,
        loss=divergence.clone(),
        student_log_prob=zeros,
        teacher_log_prob=zeros,
        teacher_entropy=zeros,
        finite=torch.ones(n, dtype=torch.bool) if finite is None else torch.tensor(finite),
        seq_idx=torch.zeros(n, dtype=torch.long),
        pos_idx=torch.arange(n),
    )


def make_context(signals, h_thr=0.5, d_thr=0.5, seed=0):
    quadrant = assign_quadrants(signals.entropy, signals.divergence, h_thr, d_thr)
    return SelectionContext(h_thr, d_thr, quadrant, torch.Generator().manual_seed(seed))


# Tokens by design:           Q1     Q2     Q3     Q4     Q3     Q1     Q4     Q2
ENTROPY = [0.9, 0.8, 0.1, 0.2, 0.3, 0.7, 0.0, 0.6]
DIVERGENCE = [0.9, 0.1, 0.8, 0.2, 0.6, 0.55, 0.0, 0.3]


def test_assign_quadrants_hand_labels():
    s = make_signals(ENTROPY, DIVERGENCE)
    assert assign_quadrants(s.entropy, s.divergence, 0.5, 0.5).tolist() == [1, 2, 3, 4, 3, 1, 4, 2]
    # "High" includes the threshold itself.
    assert assign_quadrants(torch.tensor([0.5]), torch.tensor([0.5]), 0.5, 0.5).tolist() == [1]


def test_budget_rounds_half_up():
    assert [budget(n, 0.5) for n in (0, 1, 2, 3, 7)] == [0, 1, 1, 2, 4]
    assert budget(10, 0.04) == 0 and budget(10, 1.0) == 10


def test_all_keeps_everything():
    s = make_signals(ENTROPY, DIVERGENCE)
    assert AllTokens()(s, make_context(s)).all()


def test_q3_only_keeps_exactly_low_entropy_high_divergence():
    s = make_signals(ENTROPY, DIVERGENCE)
    mask = QuadrantSubset(["Q3"])(s, make_context(s))
    assert mask.nonzero().flatten().tolist() == [2, 4]
    mask13 = QuadrantSubset(["q1", "Q3"])(s, make_context(s))
    assert mask13.nonzero().flatten().tolist() == [0, 2, 4, 5]


def test_quadrant_names_validated():
    with pytest.raises(ValueError, match="Q1, Q2, Q3, Q4"):
        QuadrantSubset(["Q5"])
    with pytest.raises(ValueError, match="at least one"):
        QuadrantSubset([])


def test_entropy_topk_keeps_top_share_by_quantile():
    s = make_signals(ENTROPY, DIVERGENCE)
    mask = EntropyTopK(0.25)(s, make_context(s))
    # Top 25% of 8 entropies: 0.9 and 0.8.
    assert mask.nonzero().flatten().tolist() == [0, 1]
    assert EntropyTopK(1.0)(s, make_context(s)).all()


def test_entropy_topk_uses_gathered_values_for_threshold():
    s = make_signals([0.1, 0.2], [0.0, 0.0])
    ctx = make_context(s)
    # Another "process" holds much larger entropies: none of ours is in the global top half.
    ctx.gather = lambda values: torch.cat([values, torch.tensor([0.8, 0.9])])
    assert not EntropyTopK(0.5)(s, ctx).any()


def test_random_budget_and_determinism():
    s = make_signals([0.5] * 20, [0.5] * 20)
    a = RandomTokens(0.3)(s, make_context(s, seed=1))
    b = RandomTokens(0.3)(s, make_context(s, seed=1))
    c = RandomTokens(0.3)(s, make_context(s, seed=2))
    assert int(a.sum()) == 6 and torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_weights_and_zero_weight_last():
    torch.manual_seed(0)
    weights = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    for seed in range(20):
        mask = sample_without_replacement(weights, 3, torch.Generator().manual_seed(seed))
        assert mask.nonzero().flatten().tolist() == [1, 3, 4]
    counts = torch.zeros(5)
    for seed in range(400):
        counts += sample_without_replacement(weights, 4, torch.Generator().manual_seed(seed)).float()
    assert counts[1] == counts[3] == counts[4] == 400
    assert 150 < counts[0] < 250 and counts[0] + counts[2] == 400


def test_entropy_sample_prefers_high_entropy():
    entropy = [0.01] * 10 + [0.99] * 10
    s = make_signals(entropy, [0.5] * 20)
    hits = torch.zeros(20)
    for seed in range(100):
        mask = EntropySample(0.5)(s, make_context(s, seed=seed))
        assert int(mask.sum()) == 10
        hits += mask.float()
    assert hits[10:].sum() > 5 * hits[:10].sum()
    # alpha = 0 is uniform sampling: both halves are hit about equally.
    uniform = torch.zeros(20)
    for seed in range(100):
        uniform += EntropySample(0.5, alpha=0.0)(s, make_context(s, seed=seed)).float()
    assert 0.7 < uniform[10:].sum() / uniform[:10].sum() < 1.4


def test_entropy_divergence_sample_weights():
    s = make_signals([0.5, 0.5, 0.0], [0.2, 0.0, 0.9])
    rule = EntropyDivergenceSample(0.5, alpha=2.0, gamma=1.0)
    torch.testing.assert_close(rule.weights(s), torch.tensor([0.05, 0.0, 0.0]))
    # Budget 2 of 3: token 0 is the only one with positive weight, so it is always drawn first.
    for seed in range(10):
        mask = rule(s, make_context(s, seed=seed))
        assert int(mask.sum()) == 2 and bool(mask[0])


def test_quadrant_budget_rule_definition():
    s = make_signals(ENTROPY, DIVERGENCE)
    ctx = make_context(s)
    # N = 8, keep_ratio 0.5 -> K = 4; Q3 gets round(0.5 * 4) = 2 (tokens 2 and 4, by divergence), the uncertain
    # tokens (Q1/Q2: 0, 1, 5, 7) fill the other 2 by entropy: 0 (0.9) and 1 (0.8).
    assert QuadrantBudget(0.5)(s, ctx).nonzero().flatten().tolist() == [0, 1, 2, 4]
    # Q3 share 1.0: only 2 Q3 tokens exist, the 2 left places go to the uncertain ones.
    assert QuadrantBudget(0.5, q3_share=1.0)(s, ctx).nonzero().flatten().tolist() == [0, 1, 2, 4]
    # Budget 2, Q3 share 0.5: one Q3 token (highest divergence: 2) and one uncertain (highest entropy: 0).
    assert QuadrantBudget(0.25)(s, ctx).nonzero().flatten().tolist() == [0, 2]
    # Q4 is never kept even with the whole budget.
    full = QuadrantBudget(1.0)(s, ctx)
    assert full.nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 7]


def test_nonfinite_positions_never_selected():
    finite = [True, False, True, True]
    s = make_signals([0.9, 0.95, 0.1, 0.2], [0.9, 0.95, 0.8, 0.1], finite=finite)
    ctx = make_context(s)
    for rule in (RandomTokens(1.0), EntropyTopK(0.5), EntropySample(1.0), QuadrantBudget(1.0)):
        assert not bool(rule(s, ctx)[1]), rule


def test_validate_selection_errors():
    with pytest.raises(ValueError, match=r"shape \(3,\).*expected \(4,\)"):
        validate_selection(torch.ones(3, dtype=torch.bool), 4)
    with pytest.raises(TypeError, match="torch.bool"):
        validate_selection(torch.ones(4, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        validate_selection([True] * 4, 4)
    with pytest.raises(ValueError, match="negative or not finite"):
        validate_selection(torch.tensor([1.0, -1.0, 0.0, 0.0]), 4)
    assert validate_selection(torch.tensor([True, False]), 2).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_keep_ratio_validated(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        RandomTokens(bad)


def test_quadrant_thresholds_are_nan_quantiles_of_the_finite_tokens():
    """The quantile split uses `nan_quantile` (float64, no size limit), like every other quantile of the selection."""
    from trl_tip.selection import nan_quantile
    from trl_tip.selection.context import QuadrantSplit, quadrant_thresholds

    entropy = [0.1, 0.7, 0.3, 0.9, 0.2, 0.6, 0.4]
    divergence = [0.05, 0.5, 0.15, 0.35, 0.25, 0.45, 0.01]
    mask = [True, True, True, True, True, False, True]
    signals = make_signals(entropy, divergence, finite=mask)
    finite = torch.tensor(mask)
    h, d = quadrant_thresholds(signals, QuadrantSplit(entropy_quantile=0.3, divergence_quantile=0.5))
    nan = torch.tensor(float("nan"))
    expected_h = nan_quantile(torch.where(finite, torch.tensor(entropy), nan), 0.3)
    expected_d = nan_quantile(torch.where(finite, torch.tensor(divergence), nan), 0.5)
    assert h.dtype == torch.float64 and torch.equal(h, expected_h) and torch.equal(d, expected_d)
    assert float(d) == pytest.approx(0.2)  # median of the six finite divergences, by hand


def test_one_of_names_the_option_and_the_allowed_values():
    check = one_of("budget_scope", ("rollout", "batch"))
    assert check("batch") is None
    assert check("step") == "budget_scope='step' is unknown; allowed values: rollout, batch."
    assert check_choice("budget_scope", "rollout", ("rollout", "batch")) == "rollout"
    with pytest.raises(ValueError, match=r"^budget_scope='step' is unknown; allowed values: rollout, batch\.$"):
        check_choice("budget_scope", "step", ("rollout", "batch"))


@pytest.mark.parametrize(
    "option, value, build",
    [
        ("keep_ratio", 1.5, lambda v: EntropyTopK(keep_ratio=v)),
        ("keep_ratio", 0.0, lambda v: QuadrantBudget(keep_ratio=v)),
        ("q3_share", 1.2, lambda v: QuadrantBudget(keep_ratio=0.5, q3_share=v)),
        ("entropy_alpha", -1.0, lambda v: EntropySample(keep_ratio=0.5, alpha=v)),
        ("budget_scope", "step", lambda v: EntropyTopK(keep_ratio=0.5, budget_scope=v)),
        ("sampling_estimator", "x", lambda v: EntropySample(keep_ratio=0.5, estimator=v)),
    ],
)
def test_a_rule_and_the_config_refuse_an_option_with_the_same_message(tmp_path, option, value, build):
    """Validate once: the rule's constructor and TIPConfig run the registry's one check of each option."""
    from trl_tip import TIPConfig

    with pytest.raises(ValueError) as from_rule:
        build(value)
    rule = {"keep_ratio": "entropy_topk", "q3_share": "quadrant_budget", "entropy_alpha": "entropy_sample"}
    rule.update(budget_scope="entropy_topk", sampling_estimator="entropy_sample")
    with pytest.raises(ValueError) as from_config:
        TIPConfig(
            output_dir=str(tmp_path), use_cpu=True, report_to="none", token_selection=rule[option], **{option: value}
        )
    assert str(from_rule.value) == str(from_config.value) and option in str(from_rule.value)


def test_keep_ratio_of_another_type_names_the_option():
    with pytest.raises(ValueError, match=r"keep_ratio must be a number in \(0, 1\], got str '0.5'"):
        EntropyTopK(keep_ratio="0.5")
