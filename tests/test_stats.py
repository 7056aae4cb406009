import pytest
import torch

from trl_tip.signals import TokenSignals
from trl_tip.stats import TIPStatistics, metric_names


def signals(entropy, divergence, loss, finite=None):
    n = len(entropy)
    return TokenSignals(
        entropy=torch.tensor(entropy),
        divergence=torch.tensor(divergence),
        loss=torch.tensor(loss),
        student_log_prob=torch.zeros(n),
        teacher_log_prob=torch.log(torch.full((n,), 0.5)),
        teacher_entropy=torch.full((n,), 0.25),
        finite=torch.ones(n, dtype=torch.bool) if finite is None else torch.tensor(finite),
        seq_idx=torch.zeros(n, dtype=torch.long),
        pos_idx=torch.arange(n),
    )


def test_hand_computed_metrics_over_two_micro_batches():
    st = TIPStatistics()
    assert st.empty
    s1 = signals([0.9, 0.1, 0.1, 0.2], [0.9, 0.8, 0.1, 0.0], [1.0, 2.0, 1.0, 0.0])
    st.update(s1, torch.tensor([1, 3, 4, 4]), torch.tensor([1.0, 1.0, 0.0, 0.0]), 0.5, 0.4)
    s2 = signals([0.3, 0.7], [0.6, 0.2], [4.0, 2.0], finite=[True, False])
    st.update(s2, torch.tensor([3, 0]), torch.tensor([1.0, 0.0]), 0.7, 0.6)
    m = st.compute(num_steps=2)
    assert set(m) == set(metric_names())
    # 5 finite tokens: Q1 = 1, Q3 = 2, Q4 = 2.
    assert m["tip/q1/frac"] == pytest.approx(0.2)
    assert m["tip/q2/frac"] == 0.0
    assert m["tip/q3/frac"] == pytest.approx(0.4)
    assert m["tip/q4/frac"] == pytest.approx(0.4)
    assert sum(m[f"tip/q{q}/frac"] for q in range(1, 5)) == pytest.approx(1.0)
    assert m["tip/q3/kept_frac"] == pytest.approx(1.0) and m["tip/q4/kept_frac"] == 0.0
    assert m["tip/q3/entropy"] == pytest.approx(0.2) and m["tip/q3/divergence"] == pytest.approx(0.7)
    # Loss total 8: Q1 1, Q3 6, Q4 1.
    assert m["tip/q3/loss_share"] == pytest.approx(6 / 8) and m["tip/q1/loss_share"] == pytest.approx(1 / 8)
    assert m["tip/kept_frac"] == pytest.approx(3 / 5)
    assert m["tip/entropy_threshold"] == pytest.approx(0.6)
    assert m["tip/divergence_threshold"] == pytest.approx(0.5)
    assert m["tip/tokens_eligible"] == pytest.approx(2.5)
    assert m["tip/tokens_kept"] == pytest.approx(1.5)
    assert m["tip/skipped_nonfinite"] == pytest.approx(0.5)
    assert m["tip/teacher_token_prob"] == pytest.approx(0.5)
    assert m["tip/teacher_entropy"] == pytest.approx(0.25)


def test_reduce_sum_combines_processes():
    a, b = TIPStatistics(), TIPStatistics()
    a.update(signals([0.9], [0.9], [1.0]), torch.tensor([1]), torch.tensor([1.0]), 0.5, 0.5)
    b.update(signals([0.1], [0.1], [3.0]), torch.tensor([4]), torch.tensor([0.0]), 0.5, 0.5)
    other = torch.cat([b.per_quadrant.flatten(), b.totals])
    m = a.compute(reduce_sum=lambda t: t + other)
    assert m["tip/q1/frac"] == pytest.approx(0.5) and m["tip/q4/frac"] == pytest.approx(0.5)
    assert m["tip/q4/loss_share"] == pytest.approx(0.75)
    assert m["tip/kept_frac"] == pytest.approx(0.5)


def test_state_dict_roundtrip_and_reset():
    st = TIPStatistics()
    st.update(signals([0.9], [0.9], [1.0]), torch.tensor([1]), torch.tensor([1.0]), 0.5, 0.5)
    other = TIPStatistics()
    other.load_state_dict(st.state_dict())
    assert other.compute() == st.compute()
    st.reset()
    assert st.empty
