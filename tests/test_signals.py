import math

import pytest
import torch

from trl_tip._compat import GKDTrainer
from trl_tip.loss import compute_token_signals
from trl_tip.signals import (
    chunk_slices,
    divergence_from_logits,
    generalized_jsd,
    normalized_entropy,
    token_log_probs,
)


def test_chunk_slices_cover_every_position_once():
    assert list(chunk_slices(7, 3)) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert list(chunk_slices(6, 3)) == [slice(0, 3), slice(3, 6)]
    assert list(chunk_slices(2, 5)) == [slice(0, 2)] and list(chunk_slices(0, 4)) == []


def test_normalized_entropy_hand_values():
    uniform = torch.zeros(1, 4)
    assert normalized_entropy(uniform).item() == pytest.approx(1.0)
    # p = (0.5, 0.5, 0, 0) -> H = ln 2, / ln 4 = 0.5
    half = torch.tensor([[0.0, 0.0, -1e9, -1e9]])
    assert normalized_entropy(half).item() == pytest.approx(0.5, abs=1e-6)
    peaked = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    assert normalized_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_generalized_jsd_matches_gkd_per_token():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    for beta in (0.0, 0.3, 0.5, 1.0):
        ours = generalized_jsd(s, t, beta)
        ref = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, reduction="none").sum(-1)
        torch.testing.assert_close(ours, ref)


def test_jsd_hand_value_and_bounds():
    # Disjoint supports: JSD = ln 2, normalised to 1.
    s = torch.tensor([[50.0, -50.0]])
    t = torch.tensor([[-50.0, 50.0]])
    assert divergence_from_logits(s, t, "jsd").item() == pytest.approx(1.0, abs=1e-5)
    assert divergence_from_logits(s, s, "jsd").item() == pytest.approx(0.0, abs=1e-6)
    # p = (0.5, 0.5), q = (1, 0): M = (0.75, 0.25); JSD = 0.5*KL(p||M) + 0.5*KL(q||M)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])
    m = (p + q) / 2
    expected = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q[:1] * (q[:1] / m[:1]).log()).sum()
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, -1e4]])
    assert divergence_from_logits(s, t, "jsd").item() == pytest.approx(expected.item() / math.log(2), abs=1e-5)


def test_kl_directions_hand_values():
    s = torch.log(torch.tensor([[0.25, 0.75]]))
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert divergence_from_logits(s, t, "reverse_kl").item() == pytest.approx(reverse, abs=1e-6)
    assert divergence_from_logits(s, t, "forward_kl").item() == pytest.approx(forward, abs=1e-6)


def test_divergence_top_k_renormalises_over_teacher_top_tokens():
    t = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    s = torch.log(torch.tensor([[0.2, 0.2, 0.3, 0.3]]))
    # Over the teacher's top-2 tokens {0, 1}: teacher (2/3, 1/3), student (1/2, 1/2).
    expected = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    got = divergence_from_logits(s, t, "forward_kl", top_k=2).item()
    assert got == pytest.approx(expected, abs=1e-6)
    assert divergence_from_logits(s, t, "forward_kl", top_k=2).item() != pytest.approx(
        divergence_from_logits(s, t, "forward_kl").item()
    )


def test_unknown_divergence_names_allowed_values():
    with pytest.raises(ValueError, match="jsd, reverse_kl, forward_kl"):
        divergence_from_logits(torch.zeros(1, 2), torch.zeros(1, 2), "tv")


def test_token_log_probs():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert token_log_probs(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.75))


def test_compute_token_signals_is_chunk_invariant_and_skips_nonfinite():
    torch.manual_seed(0)
    n, d, v = 11, 5, 9
    hs, ht = torch.randn(n, d), torch.randn(n, d)
    ws, wt = torch.randn(v, d), torch.randn(v, d)
    targets = torch.randint(0, v, (n,))
    seq, pos = torch.zeros(n, dtype=torch.long), torch.arange(n)
    head_s = lambda h: h @ ws.T  # noqa: E731
    head_t = lambda h: h @ wt.T  # noqa: E731
    full = compute_token_signals(hs, ht, targets, head_s, head_t, seq, pos, chunk_size=100)
    chunked = compute_token_signals(hs, ht, targets, head_s, head_t, seq, pos, chunk_size=3)
    for name in ("entropy", "divergence", "loss", "student_log_prob", "teacher_log_prob", "teacher_entropy"):
        torch.testing.assert_close(getattr(full, name), getattr(chunked, name))
    s_logits, t_logits = head_s(hs), head_t(ht)
    torch.testing.assert_close(full.entropy, normalized_entropy(s_logits))
    torch.testing.assert_close(full.loss, generalized_jsd(s_logits, t_logits, 0.5))
    assert full.finite.all()

    ht_bad = ht.clone()
    ht_bad[4] = float("nan")
    hs_bad = hs.clone()
    hs_bad[7, 0] = float("inf")
    bad = compute_token_signals(hs_bad, ht_bad, targets, head_s, head_t, seq, pos, chunk_size=4)
    assert bad.finite.tolist() == [i not in (4, 7) for i in range(n)]
    for name in ("entropy", "divergence", "loss"):
        values = getattr(bad, name)
        assert torch.isfinite(values).all()
        assert values[4] == 0 and values[7] == 0
    ok = bad.finite
    torch.testing.assert_close(bad.entropy[ok], full.entropy[ok])
