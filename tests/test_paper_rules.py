"""The TIP paper's rules against hand-computed selections: normalisation, Soft-OR, Q3 score, divergence top-k, bottom-k,
per-rollout budgets, and the importance-weighted entropy sampler (Appendix A.3)."""

import math

import numpy as np
import pytest
import torch

from trl_tip.selection import (
    DivergenceTopK,
    EntropySample,
    EntropyTopK,
    Q3Score,
    QuadrantBudget,
    RandomTokens,
    SelectionContext,
    SoftOR,
    assign_quadrants,
    fit_minmax,
    group_quotas,
    nan_quantile,
)
from trl_tip.selection.budget import poisson_inclusion_probabilities
from trl_tip.signals import TokenSignals


def make_signals(entropy, divergence, seq_idx, finite=None):
    entropy = torch.tensor(entropy, dtype=torch.float32)
    divergence = torch.tensor(divergence, dtype=torch.float32)
    n = entropy.numel()
    finite = torch.ones(n, dtype=torch.bool) if finite is None else torch.tensor(finite)
    zeros = torch.zeros(n)
    # As `compute_token_signals` returns them: non-finite positions hold zeros.
    return TokenSignals(
        entropy=torch.where(finite, entropy, zeros),
        divergence=torch.where(finite, divergence, zeros),
        loss=torch.where(finite, divergence, zeros),
        student_log_prob=zeros,
        teacher_log_prob=zeros,
        teacher_entropy=zeros,
        finite=finite,
        seq_idx=torch.tensor(seq_idx),
        pos_idx=torch.arange(n),
    )


def make_context(signals, extras=None, seed=0, gather=None):
    quadrant = assign_quadrants(signals.entropy, signals.divergence, 0.5, 0.5)
    quadrant = torch.where(signals.finite, quadrant, torch.zeros_like(quadrant))
    return SelectionContext(
        0.5, 0.5, quadrant, torch.Generator().manual_seed(seed), extras=extras or {}, gather=gather
    )


def kept(mask):
    return mask.nonzero().flatten().tolist()


# A micro-batch of three rollouts: rollout 0 has 5 positions, one of them (2) non-finite, so m = 4; rollout 1 has
# m = 3; rollout 2 has a single token (shorter than 1 / 0.5).
SEQ = [0, 0, 0, 0, 0, 1, 1, 1, 2]
FINITE = [True, True, False, True, True, True, True, True, True]
ENTROPY = [0.2, 0.6, 0.99, 0.4, 0.0, 1.0, 0.8, 0.2, 0.5]
DIVERGENCE = [0.5, 0.1, 5.0, 0.9, 1.3, 0.3, 0.1, 0.7, 0.1]
FORWARD_KL = [0.9, 2.0, 9.0, 0.5, 0.6, 3.0, 1.0, 0.4, 0.2]

# By hand. The 8 finite entropies sorted: [0, .2, .2, .4, .5, .6, .8, 1]; the 98th percentile (linear interpolation) is
# at position 0.98 * 7 = 6.86: 0.8 + 0.86 * (1.0 - 0.8) = 0.972. Clipped, min 0 and max 0.972: h_hat = min(h, .972) / .972.
CAP = 0.972
H_HAT = [0.2 / CAP, 0.6 / CAP, 0.0, 0.4 / CAP, 0.0, 1.0, 0.8 / CAP, 0.2 / CAP, 0.5 / CAP]
# Divergence: finite min 0.1, max 1.3 (the non-finite 5.0 is ignored): d_hat = (d - 0.1) / 1.2.
D_HAT = [(0.5 - 0.1) / 1.2, 0.0, 0.0, (0.9 - 0.1) / 1.2, 1.0, (0.3 - 0.1) / 1.2, 0.0, (0.7 - 0.1) / 1.2, 0.0]
SOFT_OR = [h + d - h * d if f else 0.0 for h, d, f in zip(H_HAT, D_HAT, FINITE)]
#            idx: 0       1       2  3       4    5    6       7       8
# SOFT_OR  ≈ [0.4705, 0.6173, 0, 0.8038, 1.0, 1.0, 0.8230, 0.6029, 0.5144]
Q3 = [fkl * (1 - h) if f else 0.0 for fkl, h, f in zip(FORWARD_KL, H_HAT, FINITE)]
# Q3       ≈ [0.7148, 0.7654, 0, 0.2942, 0.6, 0.0, 0.1770, 0.3177, 0.0971]


@pytest.fixture
def batch():
    return make_signals(ENTROPY, DIVERGENCE, SEQ, FINITE)


# ------------------------------------------------------------------------------------------------ normalisation


def test_nan_quantile_is_numpys_linear_interpolation():
    rng = np.random.default_rng(0)
    values = rng.random(37)
    for q in (0.0, 0.02, 0.5, 0.98, 1.0):
        assert nan_quantile(torch.tensor(values), q).item() == pytest.approx(np.quantile(values, q), abs=1e-12)
    with_nan = torch.tensor([0.3, float("nan"), 0.1, 0.2])
    assert nan_quantile(with_nan, 0.5).item() == pytest.approx(0.2)
    assert math.isnan(nan_quantile(torch.tensor([float("nan")]), 0.5).item())
    assert math.isnan(nan_quantile(torch.zeros(0), 0.5).item())


def test_entropy_clipped_at_the_98th_percentile_then_min_max(batch):
    gathered = torch.where(batch.finite, batch.entropy.double(), torch.tensor(float("nan"), dtype=torch.float64))
    entropy_map = fit_minmax(gathered, 0.98)
    assert entropy_map.cap.item() == pytest.approx(CAP)
    assert (entropy_map.low.item(), entropy_map.high.item()) == (0.0, pytest.approx(CAP))
    torch.testing.assert_close(entropy_map(batch.entropy, batch.finite), torch.tensor(H_HAT, dtype=torch.float64))
    # Without clipping the maximum (1.0) sets the scale.
    plain = fit_minmax(gathered)
    torch.testing.assert_close(
        plain(batch.entropy, batch.finite), torch.where(batch.finite, batch.entropy, 0.0).double()
    )


def test_degenerate_axes_map_to_zero():
    same = torch.full((4,), 0.3, dtype=torch.float64)
    valid = torch.ones(4, dtype=torch.bool)
    assert fit_minmax(same, 0.98)(same, valid).tolist() == [0.0] * 4  # span 0
    nothing = torch.full((3,), float("nan"), dtype=torch.float64)
    assert fit_minmax(nothing, 0.98)(torch.ones(3), torch.zeros(3, dtype=torch.bool)).tolist() == [0.0] * 3
    assert fit_minmax(torch.zeros(0), 0.98)(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).numel() == 0


# ------------------------------------------------------------------------------------------------ budgets


def test_budgets_round_as_the_papers_say():
    counts = torch.tensor([0, 1, 3, 4, 10, 100])
    assert group_quotas(counts, 0.5, "floor").tolist() == [0, 0, 1, 2, 5, 50]  # TIP: floor(rho * m)
    assert group_quotas(counts, 0.1, "floor").tolist() == [0, 0, 0, 0, 1, 10]  # shorter than 1/rho keeps none
    assert group_quotas(counts, 0.6, "ceil").tolist() == [0, 1, 2, 3, 6, 60]  # ssToken: ceil(rho * n)
    assert group_quotas(counts, 0.5, "half_up").tolist() == [0, 1, 2, 2, 5, 50]
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29.
    assert group_quotas(torch.tensor([100]), 0.29, "floor").tolist() == [29]
    assert group_quotas(torch.tensor([10]), 0.7, "ceil").tolist() == [7]  # 0.7 * 10 = 7.000000000000001
    with pytest.raises(ValueError, match="allowed values: floor, ceil, half_up"):
        group_quotas(counts, 0.5, "round")


def test_rollout_ids_may_be_sparse_and_unsorted():
    """Rollouts are rows of the micro-batch: their ids can exceed the number of eligible tokens and come in any order."""
    signals = make_signals([0.9, 0.1, 0.5, 0.2, 0.8], [0.5] * 5, [7, 3, 7, 3, 7])
    # Rollout 7: tokens 0, 2, 4 (m = 3: keep 1, the highest entropy, 0); rollout 3: tokens 1, 3 (keep 1: token 3).
    assert kept(EntropyTopK(0.5, budget_scope="rollout")(signals, make_context(signals))) == [0, 3]
    assert kept(SoftOR(0.5)(signals, make_context(signals))) == [0, 3]


# ------------------------------------------------------------------------------------------------ Soft-OR


def test_soft_or_scores_and_per_rollout_top_k_by_hand(batch):
    rule = SoftOR(0.5)
    torch.testing.assert_close(rule.scores(batch, make_context(batch)), torch.tensor(SOFT_OR, dtype=torch.float64))
    # Rollout 0 (m = 4) keeps 2: tokens 4 (1.0) and 3 (0.804); rollout 1 (m = 3) keeps floor(1.5) = 1: token 5
    # (1.0); rollout 2 (m = 1) keeps floor(0.5) = 0. The non-finite token 2 is never kept.
    assert kept(rule(batch, make_context(batch))) == [3, 4, 5]
    # Bottom 50% (the paper's Table 6 control): the lowest scores of each rollout, never the non-finite token.
    assert kept(SoftOR(0.5, score_order="lowest")(batch, make_context(batch))) == [0, 1, 7]
    # Batch scope: round(0.5 * 8) = 4 of the micro-batch: 1.0 (4), 1.0 (5), 0.823 (6), 0.804 (3).
    assert kept(SoftOR(0.5, budget_scope="batch")(batch, make_context(batch))) == [3, 4, 5, 6]
    # Without the clip, h_hat is the entropy itself (min 0, max 1): s(6) = 0.8 instead of 0.823, s(8) = 0.5.
    unclipped = SoftOR(0.5, entropy_clip_quantile=1.0).scores(batch, make_context(batch))
    assert unclipped[6].item() == pytest.approx(0.8) and unclipped[8].item() == pytest.approx(0.5)


def test_soft_or_keeps_nothing_in_rollouts_shorter_than_one_over_rho():
    signals = make_signals([0.1, 0.9, 0.5, 0.3, 0.7], [0.2, 0.4, 0.9, 0.1, 0.3], [0, 0, 0, 0, 1])
    # 20%: rollout 0 has 4 tokens (floor(0.8) = 0), rollout 1 one token: nothing is kept.
    assert not SoftOR(0.2)(signals, make_context(signals)).any()
    # 25%: floor(1.0) = 1 of rollout 0. Token 1 has h_hat = 1 (the clipped maximum), token 2 d_hat = 1: both score
    # exactly 1 (s = 1 - (1 - h_hat)(1 - d_hat)), and the earlier one is kept.
    assert SoftOR(0.25).scores(signals, make_context(signals))[1:3].tolist() == [1.0, 1.0]
    assert kept(SoftOR(0.25)(signals, make_context(signals))) == [1]


def test_ties_go_to_the_earlier_position():
    # Every token alike: both axes have span 0, every score is 0; each rollout keeps its first floor(rho * m).
    signals = make_signals([0.4] * 7, [0.2] * 7, [0, 0, 0, 0, 1, 1, 1])
    context = make_context(signals)
    assert SoftOR(0.5).scores(signals, context).tolist() == [0.0] * 7
    assert kept(SoftOR(0.5)(signals, context)) == [0, 1, 4]
    assert kept(SoftOR(0.5, score_order="lowest")(signals, context)) == [0, 1, 4]
    assert kept(Q3Score(0.5)(signals, make_context(signals, {"forward_kl": torch.ones(7)}))) == [0, 1, 4]


def _stacked(signals):
    columns = torch.stack([signals.entropy.double(), signals.divergence.double()], dim=1)
    return torch.where(signals.finite.unsqueeze(1), columns, torch.tensor(float("nan"), dtype=torch.float64))


def _fake_gather(rank, other):
    """What `Processes.gather_rows` returns on two processes: rank 0's rows, then rank 1's."""
    if rank == 0:
        return lambda v: torch.cat([v, other[:, : v.size(1)]])
    return lambda v: torch.cat([other[:, : v.size(1)], v])


def test_normalisation_uses_every_process_tokens(batch):
    """Split the batch over two fake processes: each one's selection equals the one-process selection of its rows."""
    extras = {"forward_kl": torch.tensor(FORWARD_KL)}
    whole = {
        "tip": SoftOR(0.5)(batch, make_context(batch)),
        "q3": Q3Score(0.5)(batch, make_context(batch, extras)),
    }
    halves = [torch.arange(0, 5), torch.arange(5, 9)]
    parts = [batch.subset(rows) for rows in halves]
    for rank, (rows, part) in enumerate(zip(halves, parts)):
        gather = _fake_gather(rank, _stacked(parts[1 - rank]))
        part_extras = {"forward_kl": extras["forward_kl"][rows]}
        assert torch.equal(SoftOR(0.5)(part, make_context(part, gather=gather)), whole["tip"][rows])
        assert torch.equal(Q3Score(0.5)(part, make_context(part, part_extras, gather=gather)), whole["q3"][rows])


def test_per_process_normalisation_would_choose_otherwise():
    """A crafted case where min-max over this process alone picks another token than over all processes."""
    # Process 0: one rollout with a huge divergence. Process 1: t1 (h .9, d 0), t2 (h 0, d 1), t3 (h 1, d 0).
    rank0 = make_signals([0.5, 0.0], [10.0, 0.0], [0, 0])
    rank1 = make_signals([0.9, 0.0, 1.0], [0.0, 1.0, 0.0], [0, 0, 0])
    rule = SoftOR(1 / 3)  # floor(3 / 3) = 1 token of rank 1's rollout
    # Alone, rank 1 sees d_hat(t2) = 1: s(t2) = 1 = s(t3), and the earlier t2 wins.
    assert kept(rule(rank1, make_context(rank1))) == [1]
    # Over both processes d_hat(t2) = 0.1: s(t2) = 0.1 < s(t1) = 0.9 / 0.992 < s(t3) = 1: t3.
    gathered = rule(rank1, make_context(rank1, gather=_fake_gather(1, _stacked(rank0))))
    assert kept(gathered) == [2]
    one_process = make_signals([0.5, 0.0, 0.9, 0.0, 1.0], [10.0, 0.0, 0.0, 1.0, 0.0], [0, 0, 1, 1, 1])
    assert kept(rule(one_process, make_context(one_process))) == [4]  # the same token, with rank 1's rows last


# ------------------------------------------------------------------------------------------------ Q3 score


def test_q3_score_by_hand(batch):
    extras = {"forward_kl": torch.tensor(FORWARD_KL)}
    rule = Q3Score(0.5)
    assert rule.requires == {"forward_kl"}
    torch.testing.assert_close(rule.scores(batch, make_context(batch, extras)), torch.tensor(Q3, dtype=torch.float64))
    # Rollout 0 keeps 2: tokens 1 (0.765) and 0 (0.715); rollout 1 keeps 1: token 7 (0.318). Token 5 has the largest
    # forward KL but the highest entropy (h_hat = 1 after the clip): its weight is 0.
    assert kept(rule(batch, make_context(batch, extras))) == [0, 1, 7]
    # The paper's default budget, 10%: no rollout here has 10 tokens, so nothing is kept.
    assert not Q3Score()(batch, make_context(batch, extras)).any()
    with pytest.raises(ValueError, match="forward_kl"):
        rule(batch, make_context(batch))


def test_q3_score_default_budget_on_a_long_rollout():
    n = 25
    entropy = torch.linspace(0.05, 0.95, n).tolist()
    signals = make_signals(entropy, [0.5] * n, [0] * n)
    forward_kl = torch.ones(n)
    forward_kl[20] = 10.0  # an uncertain-ish token (h_hat = 0.75 / 0.882) with a large forward KL
    # floor(0.1 * 25) = 2: token 20 (10 * (1 - 0.850) = 1.50) and token 0 (lowest entropy, h_hat = 0: 1.0); token 1
    # (h_hat = 0.0425: 0.957) is next.
    assert kept(Q3Score()(signals, make_context(signals, {"forward_kl": forward_kl}))) == [0, 20]


# ------------------------------------------------------------------------------------------------ divergence top-k


def test_divergence_topk_by_hand(batch):
    # Rollout 0: 1.3 (4), 0.9 (3); rollout 1: 0.7 (7); rollout 2: none. The non-finite 5.0 is never kept.
    assert kept(DivergenceTopK(0.5)(batch, make_context(batch))) == [3, 4, 7]
    assert kept(DivergenceTopK(0.5, score_order="lowest")(batch, make_context(batch))) == [0, 1, 6]
    assert kept(DivergenceTopK(0.25, budget_scope="batch")(batch, make_context(batch))) == [3, 4]


def test_other_budgeted_rules_per_rollout(batch):
    context = make_context(batch)
    assert kept(EntropyTopK(0.5, budget_scope="rollout")(batch, context)) == [1, 3, 5]
    assert kept(EntropyTopK(0.5, budget_scope="rollout", score_order="lowest")(batch, context)) == [0, 4, 7]
    for rule in (RandomTokens(0.5, budget_scope="rollout"), EntropySample(0.5, budget_scope="rollout")):
        mask = rule(batch, make_context(batch, seed=3))
        assert not mask[2]
        assert [int(mask[torch.tensor(SEQ) == r].sum()) for r in range(3)] == [2, 1, 0]
    # The quadrant budget per rollout: quadrants at (0.5, 0.5): rollout 0 is Q3, Q2, -, Q3, Q3 -> K = 2, Q3 share 1.
    mask = QuadrantBudget(0.5, q3_share=0.5, budget_scope="rollout")(batch, context)
    assert kept(mask) == [1, 4, 5]


# ------------------------------------------------------------------------------------------------ importance weighting


def test_inclusion_probabilities_by_hand():
    weights = torch.tensor([0.9, 0.1, 0.1, 0.1, 0.0, 0.5, 0.5, 0.2])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    candidates = torch.ones(8, dtype=torch.bool)
    # Group 0, target 2: c = 2 / 1.2 would give 0.9 c = 1.5 > 1, so token 0 is capped at 1 and the remaining 1 is
    # spread over 0.3 of weight: 1/3 each. Token 4 has weight 0: p = 0. Group 1, target 1: 0.5/1.2, 0.5/1.2, 0.2/1.2.
    p = poisson_inclusion_probabilities(weights, groups, torch.tensor([2.0, 1.0]), candidates)
    expected = [1.0, 1 / 3, 1 / 3, 1 / 3, 0.0, 0.5 / 1.2, 0.5 / 1.2, 0.2 / 1.2]
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64))
    # A target beyond the positive weights: all of them at 1.
    p = poisson_inclusion_probabilities(weights, groups, torch.tensor([4.5, 3.0]), candidates)
    assert p.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    # Non-candidates get 0 and the target is spread over the others.
    p = poisson_inclusion_probabilities(weights, groups, torch.tensor([0.2, 1.0]), candidates & (torch.arange(8) != 0))
    torch.testing.assert_close(p[:4], torch.tensor([0.0, 0.2 / 3, 0.2 / 3, 0.2 / 3], dtype=torch.float64))


def test_importance_weighted_sampler_probabilities_follow_the_entropy():
    signals = make_signals([0.9, 0.1, 0.1, 0.1, 0.6, 0.6, 0.3, 0.5], [0.1] * 8, [0, 0, 0, 0, 1, 1, 1, 1])
    rule = EntropySample(0.5, budget_scope="rollout", estimator="importance_weighted")
    # Normalised by every eligible token (not by the kept ones): Σ_kept g / p / m estimates the all-token mean.
    assert rule.planned_kept(torch.tensor([4, 4])).tolist() == [4.0, 4.0]
    p = rule.inclusion_probabilities(signals)
    # Rollout 0: target 0.5 * 4 = 2 -> [1, 1/3, 1/3, 1/3]; rollout 1: target 2 over 2.0 of entropy -> p = h.
    torch.testing.assert_close(p, torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3, 0.6, 0.6, 0.3, 0.5], dtype=torch.float64))
    draws = 4000
    hits = torch.zeros(8, dtype=torch.float64)
    for seed in range(draws):
        w = rule(signals, make_context(signals, seed=seed))
        kept_now = w > 0
        hits += kept_now.double()
        torch.testing.assert_close(w[kept_now].double(), 1.0 / p[kept_now])
    frequency = hits / draws
    # Binomial standard error at most 0.5 / sqrt(4000) = 0.008: 4 of them.
    assert torch.allclose(frequency, p, atol=0.032), frequency


def test_importance_weighted_estimator_is_unbiased():
    """Σ_kept g_t / p_t / m is unbiased for the mean of g over the tokens, whatever g (fixed seeds)."""
    generator = torch.Generator().manual_seed(0)
    n = 30
    entropy = (torch.rand(n, generator=generator) * 0.9 + 0.05).tolist()
    g = torch.randn(n, generator=generator, dtype=torch.float64) * 2 + torch.tensor(entropy, dtype=torch.float64)
    signals = make_signals(entropy, [0.1] * n, [0] * 12 + [1] * 18)
    truth = g.mean().item()
    for scope in ("rollout", "batch"):
        rule = EntropySample(0.2, budget_scope=scope, estimator="importance_weighted")
        estimates, sizes = [], []
        for seed in range(4000):
            w = rule(signals, make_context(signals, seed=seed)).double()
            estimates.append((w * g).sum().item() / n)
            sizes.append(int((w > 0).sum()))
        estimates = torch.tensor(estimates)
        standard_error = estimates.std().item() / math.sqrt(len(estimates))
        assert abs(estimates.mean().item() - truth) < 4 * standard_error, (scope, estimates.mean(), truth)
        # The kept count is random, with mean keep_ratio * m.
        assert np.mean(sizes) == pytest.approx(0.2 * n, abs=0.15)
    # The fixed-budget sampler's mean over kept tokens is biased towards high-entropy tokens: the contrast.
    fixed = EntropySample(0.2)
    biased = [(g[fixed(signals, make_context(signals, seed=seed))]).mean().item() for seed in range(2000)]
    assert abs(np.mean(biased) - truth) > 0.05


# ------------------------------------------------------------------------------------------------ paper presets


PRESETS = {
    "full_all": ("all", None),
    "full_tip50": ("tip", 0.5),
    "full_tip20": ("tip", 0.2),
    "full_entropy50": ("entropy_sample", 0.5),
    "full_q3score10": ("q3_score", 0.1),
    "full_q3score20": ("q3_score", 0.2),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_paper_presets_have_the_papers_setup(name, tmp_path):
    from pathlib import Path

    from trl_tip.train import make_parser

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "qwen3-4b-from-8b-paper" / f"{name}.yaml"
    _, args, _ = make_parser().parse_args_and_config(
        ["--config", str(recipe), "--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    )
    assert (args.beta, args.lmbda, args.temperature) == (1.0, 1.0, 1.0)  # reverse KL, on-policy, temperature 1
    assert (args.learning_rate, args.lr_scheduler_type.value, args.optim.value) == (1e-6, "cosine", "adamw_torch")
    assert args.divergence == "loss" and args.max_new_tokens == 8192
    rule, ratio = PRESETS[name]
    assert (args.token_selection, args.keep_ratio) == (rule, ratio)
    if rule in ("tip", "q3_score"):
        assert (args.budget_scope, args.score_order, args.entropy_clip_quantile) == ("rollout", "highest", 0.98)
