"""The engine's one chunked pipeline: declared signals, one pass for a rule that declares it keeps every token, and
`teacher_signals="kept"` (the teacher's head on the kept tokens only) for rules that read no teacher signal."""

import pytest
import torch
import torch.nn as nn

from trl_tip import TIPConfig, TokenSelectionEngine, build_selector
from trl_tip.engine import TokenBatch
from trl_tip.fused import student_signals
from trl_tip.loss import OutputHead
from trl_tip.selection import EntropyDivergenceSample, EntropySample, EntropyTopK, RandomTokens, Union
from trl_tip.selection.base import reads_teacher_signals, required_signals
from trl_tip.signals import normalized_entropy, token_log_probs


class CountingHead(OutputHead):
    """An `OutputHead` that counts the rows it projects (teacher lm_head rows computed)."""

    rows = 0

    def __call__(self, hidden):
        self.rows += hidden.size(0)
        return super().__call__(hidden)


def _batch(n=40, vocab=50, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = nn.Linear(d, vocab, bias=False).double()
    teacher = nn.Linear(d + 4, vocab, bias=False).double()
    with torch.no_grad():
        student.weight.copy_(torch.randn(vocab, d, generator=g))
        teacher.weight.copy_(torch.randn(vocab, d + 4, generator=g))
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(n, d + 4, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=g)
    seq = torch.arange(n) // 10
    pos = torch.arange(n) % 10
    return student, teacher, hidden, teacher_hidden, targets, seq, pos


def _run(rule, teacher_signals, seed=0, **options):
    student, teacher, hidden, teacher_hidden, targets, seq, pos = _batch(seed=seed)
    args = TIPConfig(
        output_dir="/tmp/unused",
        use_cpu=True,
        bf16=False,
        report_to="none",
        token_selection=rule,
        teacher_signals=teacher_signals,
        tip_chunk_size=7,
        **options,
    )
    engine = TokenSelectionEngine(build_selector(args), args, beta=0.5, seed=0)
    teacher_head = CountingHead(teacher)
    batch = TokenBatch(hidden, teacher_hidden, OutputHead(student), teacher_head, targets, seq, pos)
    loss, record = engine.compute(batch, global_step=0, training=True)
    grads = torch.autograd.grad(loss, (hidden, student.weight))
    return loss.detach(), grads, record, teacher_head.rows, engine


def test_rules_declare_what_they_read():
    assert not reads_teacher_signals(EntropyTopK(0.5))
    assert not reads_teacher_signals(EntropySample(0.5))
    assert not reads_teacher_signals(RandomTokens(0.5))
    assert reads_teacher_signals(EntropyDivergenceSample(0.5))  # H^alpha * D^gamma
    assert not reads_teacher_signals(EntropyDivergenceSample(0.5, gamma=0.0))

    class Undeclared:
        requires = frozenset({"history_nll"})  # names no signal of the logits: reads them all

        def __call__(self, signals, context):
            return signals.finite

    assert "divergence" in required_signals(Undeclared()) and reads_teacher_signals(Undeclared())
    assert reads_teacher_signals(Union(EntropyTopK(0.5), Undeclared()))
    assert not reads_teacher_signals(Union(EntropyTopK(0.5), RandomTokens(0.5)))


def test_student_signals_match_the_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 13, generator=g, dtype=torch.float64) * 3
    logits[2, 4] = float("nan")
    targets = torch.tensor([0, 5, 12, 3, 3, 7])
    entropy, slp, ok = student_signals(logits, targets)
    assert ok.tolist() == [True, True, False, True, True, True]
    torch.testing.assert_close(entropy[ok].double(), normalized_entropy(logits[ok]).double())
    torch.testing.assert_close(slp[ok].double(), token_log_probs(logits[ok], targets[ok]).double())
    assert entropy[2] == 0 and slp[2] == 0


def test_all_takes_its_loss_in_the_signals_pass_because_it_declares_so(monkeypatch):
    import trl_tip.engine as engine_module

    calls = []
    original = engine_module.chunked_pass

    def counting(*args, **kwargs):
        calls.append(kwargs.get("weights", args[5] if len(args) > 5 else None) is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "chunked_pass", counting)
    *_, rows, engine = _run("all", "all")
    assert engine.keeps_every_token and calls == [True] and rows == 40  # one pass, signals and loss
    calls.clear()
    *_, rows, engine = _run("entropy_topk", "all", keep_ratio=0.25)
    assert not engine.keeps_every_token and calls == [False, True]  # signals, then the kept tokens' loss
    assert rows == 40 + 10  # the teacher's head on every token for the signals, again on the 10 kept ones


@pytest.mark.parametrize(
    "rule, options",
    [
        ("entropy_topk", dict(keep_ratio=0.25)),
        ("entropy_topk", dict(keep_ratio=0.5, budget_scope="rollout")),
        ("entropy_sample", dict(keep_ratio=0.3)),
        ("random", dict(keep_ratio=0.5)),
    ],
)
def test_kept_teacher_signals_select_the_same_tokens_with_the_same_loss(rule, options):
    loss_all, grads_all, rec_all, rows_all, _ = _run(rule, "all", **options)
    loss_kept, grads_kept, rec_kept, rows_kept, engine = _run(rule, "kept", **options)
    assert not engine.signal_plan.teacher
    kept = rec_all.weights > 0
    assert torch.equal(rec_kept.weights, rec_all.weights)  # same selection from the student's signals
    # The teacher's lm_head ran on the kept tokens only (before: every token, then the kept ones again).
    assert rows_kept == int(kept.sum()) and rows_all == 40 + int(kept.sum())
    torch.testing.assert_close(loss_kept, loss_all)
    for a, b in zip(grads_kept, grads_all, strict=True):
        torch.testing.assert_close(a, b)
    # The kept tokens' teacher signals are those of the full pass; the dropped ones' are not computed (NaN).
    for name in ("divergence", "loss", "teacher_entropy", "teacher_log_prob"):
        torch.testing.assert_close(getattr(rec_kept.signals, name)[kept], getattr(rec_all.signals, name)[kept])
        assert getattr(rec_kept.signals, name)[~kept].isnan().all()
    torch.testing.assert_close(rec_kept.signals.entropy, rec_all.signals.entropy)
    # The quadrants and the teacher statistics describe the kept tokens: q fractions sum to 1 over them.
    assert (rec_kept.quadrant[~kept] == 0).all() and (rec_kept.quadrant[kept] > 0).all()
    metrics = engine.log_metrics(num_steps=1)
    assert sum(metrics[f"tip/q{q}/frac"] for q in range(1, 5)) == pytest.approx(1.0)
    assert metrics["tip/q1/kept_frac"] in (0.0, 1.0) and metrics["tip/tokens_eligible"] == 40
    assert metrics["tip/divergence"] == pytest.approx(float(rec_kept.signals.divergence[kept].double().mean()))


def test_kept_teacher_signals_refuse_a_rule_that_reads_the_teacher():
    with pytest.raises(ValueError, match="teacher_signals='kept' needs a rule that reads no signal of the teacher"):
        TIPConfig(
            output_dir="/tmp/unused", use_cpu=True, report_to="none", token_selection="tip", teacher_signals="kept"
        )
    with pytest.raises(ValueError, match="teacher_signals='x' is unknown; allowed values: all, kept"):
        TIPConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", teacher_signals="x")
