"""Property-based tests: the selection rules on random signals keep their invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
)
from trl_tip.signals import TokenSignals
from trl_tip.sstoken import SSToken
from trl_tip.stats import TIPStatistics


SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)


@st.composite
def random_signals(draw, max_n=48):
    """Signals of `n` positions as `compute_token_signals` returns them: non-finite positions hold zeros.

    Some draws quantise the values to a few levels (many ties, many exact zeros), some use continuous values.
    """
    n = draw(st.integers(0, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    finite_p = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    levels = draw(st.sampled_from([0, 2, 5]))  # 0 = continuous
    g = torch.Generator().manual_seed(seed)
    entropy, divergence, loss = torch.rand(3, n, generator=g)
    if levels:
        entropy = torch.floor(entropy * levels) / levels
        divergence = torch.floor(divergence * levels) / levels
    finite = torch.rand(n, generator=g) < finite_p
    num_seq = draw(st.integers(1, 4))
    seq_idx = torch.sort(torch.randint(0, num_seq, (n,), generator=g)).values

    def zeroed(values):
        return torch.where(finite, values, torch.zeros_like(values))

    return TokenSignals(
        entropy=zeroed(entropy),
        divergence=zeroed(divergence),
        loss=zeroed(loss),
        student_log_prob=zeroed(-loss),
        teacher_log_prob=zeroed(-divergence),
        teacher_entropy=zeroed(entropy.flip(0)),
        finite=finite,
        seq_idx=seq_idx,
        pos_idx=torch.arange(n),
    )


def context_for(signals, h_thr, d_thr, seed=0, extras=None):
    """The context `TIPTrainer.select_tokens` builds: quadrant 0 at non-finite positions."""
    quadrant = assign_quadrants(signals.entropy, signals.divergence, h_thr, d_thr)
    quadrant = torch.where(signals.finite, quadrant, torch.zeros_like(quadrant))
    return SelectionContext(
        entropy_threshold=h_thr,
        divergence_threshold=d_thr,
        quadrant=quadrant,
        generator=torch.Generator().manual_seed(seed),
        extras=extras or {},
    )


thresholds = st.floats(0.0, 1.0)
keep_ratios = st.floats(0.01, 1.0)
seeds = st.integers(0, 2**31 - 1)


def check_mask(mask, signals):
    assert isinstance(mask, torch.Tensor)
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == (len(signals),)


@pytest.mark.parametrize(
    "make_rule",
    [
        RandomTokens,
        EntropySample,
        lambda r: EntropySample(r, alpha=2.0),
        EntropyDivergenceSample,
        lambda r: EntropyDivergenceSample(r, alpha=0.5, gamma=2.0),
    ],
    ids=["random", "entropy_sample", "entropy_sample_alpha2", "entropy_divergence", "entropy_divergence_a05_g2"],
)
@SETTINGS
@given(signals=random_signals(), keep_ratio=keep_ratios, h_thr=thresholds, d_thr=thresholds, seed=seeds)
def test_sampling_rules_keep_exactly_the_budget_of_finite_tokens(make_rule, signals, keep_ratio, h_thr, d_thr, seed):
    rule = make_rule(keep_ratio)
    mask = rule(signals, context_for(signals, h_thr, d_thr, seed))
    check_mask(mask, signals)
    n_finite = int(signals.finite.sum())
    # Exactly the budget, even when fewer finite tokens than the budget have a positive weight (H = 0 or D = 0).
    assert int(mask.sum()) == budget(n_finite, keep_ratio)
    assert not (mask & ~signals.finite).any(), "a non-finite position was kept"
    again = rule(signals, context_for(signals, h_thr, d_thr, seed))
    assert torch.equal(mask, again), "same generator seed, different selection"


@SETTINGS
@given(signals=random_signals(), keep_ratio=keep_ratios, seed=seeds)
def test_weighted_sampling_prefers_positive_weights(signals, keep_ratio, seed):
    """Zero-weight finite tokens are taken only once every positive-weight token is."""
    rule = EntropySample(keep_ratio)
    mask = rule(signals, context_for(signals, 0.5, 0.5, seed))
    positive = signals.finite & (signals.entropy > 0)
    if (mask & signals.finite & (signals.entropy == 0)).any():
        assert mask[positive].all()


@SETTINGS
@given(signals=random_signals(), keep_ratio=keep_ratios)
def test_entropy_topk_keeps_a_top_set_around_the_quantile(signals, keep_ratio):
    mask = EntropyTopK(keep_ratio)(signals, context_for(signals, 0.5, 0.5))
    check_mask(mask, signals)
    assert not (mask & ~signals.finite).any()
    finite_h = signals.entropy[signals.finite]
    kept_h, dropped_h = signals.entropy[mask], signals.entropy[signals.finite & ~mask]
    if kept_h.numel() and dropped_h.numel():
        assert kept_h.min() > dropped_h.max(), "a dropped token has an entropy at least a kept one's"
    n = finite_h.numel()
    if n and keep_ratio < 1.0 and torch.unique(finite_h).numel() == n:
        # Distinct values: the (1 - r)-quantile (linear interpolation) keeps r * n tokens within one.
        assert abs(int(mask.sum()) - keep_ratio * n) <= 1.0 + 1e-6
    if n and keep_ratio < 1.0:
        assert int(mask.sum()) >= 1  # the maximum is always at or above the quantile


@SETTINGS
@given(
    signals=random_signals(), keep_ratio=keep_ratios, q3_share=st.floats(0.0, 1.0), h_thr=thresholds, d_thr=thresholds
)
def test_quadrant_budget_fills_its_budget_from_q1_to_q3_by_rank(signals, keep_ratio, q3_share, h_thr, d_thr):
    context = context_for(signals, h_thr, d_thr)
    mask = QuadrantBudget(keep_ratio, q3_share=q3_share)(signals, context)
    check_mask(mask, signals)
    q = context.quadrant
    assert not (mask & ~signals.finite).any()
    assert not (mask & (q == 4)).any(), "a Q4 token was kept"
    k = budget(int(signals.finite.sum()), keep_ratio)
    assert int(mask.sum()) == min(k, int(((q >= 1) & (q <= 3)).sum()))
    for group, score in (((q == 3), signals.divergence), (((q == 1) | (q == 2)), signals.entropy)):
        kept, dropped = score[mask & group], score[~mask & group]
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max(), "a group is not filled in descending score order"


@SETTINGS
@given(signals=random_signals(), h_thr=thresholds, d_thr=thresholds)
def test_q3_keeps_exactly_the_finite_low_entropy_high_divergence_tokens(signals, h_thr, d_thr):
    context = context_for(signals, h_thr, d_thr)
    mask = QuadrantSubset(["Q3"])(signals, context)
    check_mask(mask, signals)
    expected = signals.finite & (signals.entropy < h_thr) & (signals.divergence >= d_thr)
    assert torch.equal(mask, expected)
    both = QuadrantSubset(["Q1", "Q3"])(signals, context)
    assert torch.equal(both, signals.finite & (signals.divergence >= d_thr))


@SETTINGS
@given(signals=random_signals(), h_thr=thresholds, d_thr=thresholds, keep_ratio=keep_ratios)
def test_statistics_quadrant_fractions_sum_to_one(signals, h_thr, d_thr, keep_ratio):
    context = context_for(signals, h_thr, d_thr)
    stats = TIPStatistics()
    for rule in (AllTokens(), QuadrantBudget(keep_ratio), QuadrantSubset(["Q3"])):
        # As `TIPTrainer.select_tokens` does: non-finite positions are dropped whatever the rule returns.
        weights = rule(signals, context).float() * signals.finite.float()
        stats.update(signals, context.quadrant, weights, h_thr, d_thr)
    metrics = stats.compute(num_steps=3)
    n_finite, n = int(signals.finite.sum()), len(signals)
    fractions = sum(metrics[f"tip/q{q}/frac"] for q in range(1, 5))
    assert fractions == pytest.approx(1.0 if n_finite else 0.0)
    assert metrics["tip/skipped_nonfinite"] == pytest.approx(n - n_finite)
    assert metrics["tip/tokens_eligible"] == pytest.approx(n_finite)
    for q in range(1, 5):
        count = int((context.quadrant == q).sum())
        assert metrics[f"tip/q{q}/frac"] == pytest.approx(count / n_finite if n_finite else 0.0)
        assert 0.0 <= metrics[f"tip/q{q}/kept_frac"] <= 1.0
    assert 0.0 <= metrics["tip/kept_frac"] <= 1.0


@SETTINGS
@given(signals=random_signals(), keep_ratio=keep_ratios, gamma=st.sampled_from([0.0, 0.5, 1.0]), seed=seeds)
def test_sstoken_keeps_the_budget_of_each_sequence(signals, keep_ratio, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(signals)
    extras = {"history_divergence": torch.rand(n, generator=g), "prompt_attention": torch.rand(n, generator=g)}
    rule = SSToken(keep_ratio, gamma=gamma, loss="divergence")
    context = context_for(signals, 0.5, 0.5, extras={k: extras[k] for k in rule.requires})
    mask = rule(signals, context)
    check_mask(mask, signals)
    assert not (mask & ~signals.finite).any()
    for s in torch.unique(signals.seq_idx).tolist():
        in_seq = signals.seq_idx == s
        # ssToken's budget: ceil(keep_ratio * n) of each sequence's n finite tokens.
        assert int((mask & in_seq).sum()) == math.ceil(keep_ratio * int((in_seq & signals.finite).sum()) - 1e-9)
    assert torch.equal(mask, rule(signals, context))


@SETTINGS
@given(signals=random_signals(), h_thr=thresholds, d_thr=thresholds)
def test_all_tokens_keeps_every_position(signals, h_thr, d_thr):
    mask = AllTokens()(signals, context_for(signals, h_thr, d_thr))
    check_mask(mask, signals)
    assert bool(mask.all())


def _floor_budget(n: int, keep_ratio: float) -> int:
    return math.floor(keep_ratio * n + 1e-9)


def _score_rules(keep_ratio, scope, order):
    from trl_tip.selection import DivergenceTopK, Q3Score, SoftOR

    return [
        SoftOR(keep_ratio, budget_scope=scope, score_order=order),
        SoftOR(keep_ratio, budget_scope=scope, score_order=order, entropy_clip_quantile=1.0),
        Q3Score(keep_ratio, budget_scope=scope, score_order=order),
        DivergenceTopK(keep_ratio, budget_scope=scope, score_order=order),
        EntropyTopK(keep_ratio, budget_scope="rollout", score_order=order),
    ]


@SETTINGS
@given(
    signals=random_signals(),
    keep_ratio=keep_ratios,
    scope=st.sampled_from(["rollout", "batch"]),
    order=st.sampled_from(["highest", "lowest"]),
    seed=seeds,
)
def test_score_rules_keep_their_budget_in_score_order(signals, keep_ratio, scope, order, seed):
    """Per rollout floor(rho * m) of its finite tokens (batch: rho * N rounded half up), never a non-finite token, and
    every kept token scored at least (at most, for "lowest") as high as every dropped token of its group."""
    g = torch.Generator().manual_seed(seed)
    forward_kl = torch.where(signals.finite, torch.rand(len(signals), generator=g), torch.zeros(len(signals)))
    for rule in _score_rules(keep_ratio, scope, order):
        context = context_for(signals, 0.5, 0.5, seed, extras={"forward_kl": forward_kl})
        mask = rule(signals, context)
        check_mask(mask, signals)
        assert not (mask & ~signals.finite).any(), rule
        rule_scope = getattr(rule, "budget_scope", scope)
        groups = torch.unique(signals.seq_idx).tolist() if rule_scope == "rollout" else [None]
        scores = rule.scores(signals, context) if hasattr(rule, "scores") else signals.entropy.double()
        for s in groups:
            group = signals.finite & (signals.seq_idx == s if s is not None else torch.ones_like(signals.finite))
            m = int(group.sum())
            expected = _floor_budget(m, keep_ratio) if s is not None else budget(m, keep_ratio)
            assert int((mask & group).sum()) == expected, (rule, s)
            kept_s, dropped_s = scores[mask & group], scores[~mask & group]
            if kept_s.numel() and dropped_s.numel():
                if order == "highest":
                    assert kept_s.min() >= dropped_s.max(), rule
                else:
                    assert kept_s.max() <= dropped_s.min(), rule
        assert torch.equal(
            mask, rule(signals, context_for(signals, 0.5, 0.5, seed, extras={"forward_kl": forward_kl}))
        )


@SETTINGS
@given(signals=random_signals(), keep_ratio=keep_ratios, seed=seeds)
def test_soft_or_scores_are_in_the_unit_interval_and_monotone(signals, keep_ratio, seed):
    from trl_tip.selection import SoftOR, normalized_entropy_and_divergence

    context = context_for(signals, 0.5, 0.5, seed)
    h_hat, d_hat = normalized_entropy_and_divergence(signals, context)
    scores = SoftOR(keep_ratio).scores(signals, context)
    for values in (h_hat, d_hat, scores):
        assert ((values >= 0) & (values <= 1)).all()
        assert (values[~signals.finite] == 0).all()
    # Soft-OR is at least each axis, at most their sum.
    assert (scores >= torch.maximum(h_hat, d_hat) - 1e-12).all() and (scores <= h_hat + d_hat + 1e-12).all()


@pytest.mark.parametrize("estimator", ["fixed_budget", "importance_weighted"])
@SETTINGS
@given(signals=random_signals(), keep_ratio=keep_ratios, seed=seeds)
def test_entropy_sampling_per_rollout(estimator, signals, keep_ratio, seed):
    rule = EntropySample(keep_ratio, budget_scope="rollout", estimator=estimator)
    weights = rule(signals, context_for(signals, 0.5, 0.5, seed))
    assert weights.shape == (len(signals),) and not (weights[~signals.finite] != 0).any()
    for s in torch.unique(signals.seq_idx).tolist():
        group = signals.finite & (signals.seq_idx == s)
        m = int(group.sum())
        if estimator == "fixed_budget":
            assert int((weights.bool() & group).sum()) == _floor_budget(m, keep_ratio)
        else:
            p = rule.inclusion_probabilities(signals)
            positive = group & (signals.entropy > 0)
            # Σ p = rho * m when the positive-entropy tokens can carry it, else every one of them has p = 1.
            target = keep_ratio * m
            if int(positive.sum()) > target:
                assert float(p[group].sum()) == pytest.approx(target, rel=1e-9, abs=1e-9)
            else:
                assert (p[positive] == 1).all()
            assert ((p >= 0) & (p <= 1)).all() and (p[group & (signals.entropy == 0)] == 0).all()
            kept = weights > 0
            torch.testing.assert_close(weights[kept].double(), (1 / p[kept]).float().double())
