"""The fused per-chunk math (one log-softmax per model, closed-form JSD gradient) against the reference functions."""

import pytest
import torch
import torch.nn as nn

from trl_tip.fused import chunk_signals, jsd_and_grad
from trl_tip.loss import OutputHead, SignalPlan, chunked_pass, compute_token_signals, kept_token_jsd
from trl_tip.signals import (
    divergence_from_logits,
    generalized_jsd,
    normalized_entropy,
    token_log_probs,
)


def _logits(n=5, v=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    return student, teacher


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_and_grad_matches_autograd(beta):
    s, t = _logits(seed=int(beta * 10))
    s = s.requires_grad_(True)
    ref = generalized_jsd(s, t, beta)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s)
    value, grad = jsd_and_grad(s.detach(), t, beta)
    torch.testing.assert_close(value.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl", "forward_kl"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.7, 1.0])
def test_chunk_signals_match_reference(divergence, beta):
    s, t = _logits(n=6, v=13, seed=3)
    targets = torch.tensor([0, 5, 12, 3, 3, 7])
    entropy, tent, div, loss, slp, tlp, ok, grad, extras = chunk_signals(
        s, t, targets, beta, divergence, with_grad=True, divergences=("jsd", "reverse_kl", "forward_kl")
    )
    assert ok.all()
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy.double(), normalized_entropy(s).double(), **close)
    torch.testing.assert_close(tent.double(), normalized_entropy(t).double(), **close)
    torch.testing.assert_close(div.double(), divergence_from_logits(s, t, divergence).double(), **close)
    torch.testing.assert_close(loss.double(), generalized_jsd(s, t, beta), **close)
    torch.testing.assert_close(slp.double(), token_log_probs(s, targets).double(), **close)
    torch.testing.assert_close(tlp.double(), token_log_probs(t, targets).double(), **close)
    torch.testing.assert_close(grad.double(), jsd_and_grad(s, t, beta)[1].double(), **close)
    for name, value in zip(("jsd", "reverse_kl", "forward_kl"), extras):
        torch.testing.assert_close(value.double(), divergence_from_logits(s, t, name).double(), **close)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradient_scaled_and_cast_in_the_chunk_function(beta):
    # The loss pass asks for the gradient already multiplied by the tokens' weights and in the head's dtype (so no
    # float32 (n, V) copy is made): the same values as scaling and casting the float32 gradient afterwards.
    s, t = _logits(n=6, v=13, seed=5)
    s, t = s.float(), t.float()
    s[2, 4] = float("nan")  # a non-finite row keeps a zero gradient whatever its weight
    targets = torch.tensor([0, 5, 12, 3, 3, 7])
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0, 0.25])
    for dtype in (torch.bfloat16, None):
        _, plain = jsd_and_grad(s, t, beta)
        _, fused = jsd_and_grad(s, t, beta, grad_scale=w, grad_dtype=dtype)
        expected = plain * w.unsqueeze(-1)
        assert fused.dtype == (dtype or torch.float32)
        torch.testing.assert_close(fused, expected if dtype is None else expected.to(dtype), equal_nan=True)
        *_, ok, plain, _ = chunk_signals(s, t, targets, beta, "loss", True)
        *_, ok2, fused, _ = chunk_signals(s, t, targets, beta, "loss", True, grad_scale=w, grad_dtype=dtype)
        assert torch.equal(ok, ok2) and not ok[2]
        expected = plain * w.unsqueeze(-1)
        torch.testing.assert_close(fused, expected if dtype is None else expected.to(dtype), rtol=0, atol=0)
        assert (fused[2] == 0).all() and (fused[1] == 0).all() and fused[0].abs().sum() > 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_axis_is_the_per_token_loss(beta):
    s, t = _logits(n=6, v=13, seed=4)
    targets = torch.tensor([0, 5, 12, 3, 3, 7])
    _, _, div, loss, *_ = chunk_signals(s, t, targets, beta, "loss")
    torch.testing.assert_close(div, loss)
    torch.testing.assert_close(loss.double(), generalized_jsd(s, t, beta), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_temperature_scales_the_loss_and_its_gradient_only(beta):
    s, t = _logits(n=5, v=11, seed=6)
    targets = torch.tensor([0, 1, 2, 3, 4])
    temperature = 0.7
    entropy, _, div, loss, *_, grad, _ = chunk_signals(s, t, targets, beta, "jsd", True, temperature)
    leaf = s.clone().requires_grad_(True)
    ref = generalized_jsd(leaf / temperature, t / temperature, beta)
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref.detach(), **close)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    # Entropy and the divergence axis stay at temperature 1.
    torch.testing.assert_close(entropy.double(), normalized_entropy(s).double(), **close)
    torch.testing.assert_close(div.double(), divergence_from_logits(s, t, "jsd").double(), **close)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("teacher_row", [False, True])
def test_chunk_signals_flag_non_finite_rows(bad, teacher_row):
    s, t = _logits(n=4, v=9, seed=5)
    (t if teacher_row else s)[2, 3] = bad
    targets = torch.tensor([1, 2, 3, 4])
    *values, ok, grad, _ = chunk_signals(s, t, targets, 0.5, "jsd", with_grad=True)
    assert ok.tolist() == [True, True, False, True]
    for value in values:
        assert torch.isfinite(value).all() and value[2] == 0
    assert torch.isfinite(grad).all() and torch.all(grad[2] == 0)
    torch.testing.assert_close(values[0][ok].double(), normalized_entropy(s[ok]).double())


def _heads(d=8, dt=12, v=17, softcap=None, seed=0, scale=1.0, bias=False):
    torch.manual_seed(seed)
    student = nn.Linear(d, v, bias=bias).double()
    teacher = nn.Linear(dt, v, bias=bias).double()
    return OutputHead(student, softcap, scale), OutputHead(teacher, softcap, scale)


def test_output_head_applies_scale_then_softcap():
    head, _ = _heads(softcap=4.0, scale=0.5, bias=True)
    h = torch.randn(3, 8, dtype=torch.float64)
    raw = h @ head.module.weight.t() + head.module.bias
    torch.testing.assert_close(head(h), 4.0 * torch.tanh(0.5 * raw / 4.0))


@pytest.mark.parametrize(
    "softcap, scale, bias", [(None, 1.0, False), (4.0, 1.0, False), (None, 0.25, True), (3.0, 2.0, True)]
)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_kept_token_jsd_grads_match_autograd(softcap, scale, bias, beta, temperature):
    head, teacher_head = _heads(softcap=softcap, scale=scale, bias=bias)
    torch.manual_seed(1)
    hidden = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(7, 12, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    loss = kept_token_jsd(
        hidden, teacher_hidden, head, teacher_head, weights, beta=beta, chunk_size=3, temperature=temperature
    )
    params = (hidden, head.module.weight) + ((head.module.bias,) if bias else ())
    grads = torch.autograd.grad(loss, params)
    ref_jsd = generalized_jsd(head(hidden) / temperature, teacher_head(teacher_hidden) / temperature, beta)
    ref = (ref_jsd * weights).sum()
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-8)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_one_pass_signals_and_loss_equal_the_two_pass_path():
    head, teacher_head = _heads()
    torch.manual_seed(2)
    hidden = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(9, 12, dtype=torch.float64)
    teacher_hidden[4, 0] = float("inf")  # a non-finite teacher row: dropped from loss and signals
    targets = torch.randint(0, 17, (9,))
    idx = torch.arange(9)
    plan = SignalPlan("jsd")
    loss, values = chunked_pass(hidden, teacher_hidden, head, teacher_head, targets, torch.ones(9), plan, chunk_size=4)
    ref = compute_token_signals(
        hidden.detach(), teacher_hidden, targets, head, teacher_head, idx, idx, divergence="jsd", chunk_size=4
    )
    for name in ("entropy", "teacher_entropy", "divergence", "loss", "student_log_prob", "teacher_log_prob"):
        torch.testing.assert_close(values[name].double(), getattr(ref, name).double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(values["finite"], ref.finite) and not values["finite"][4]
    keep = ref.finite.nonzero(as_tuple=True)[0]
    ref_loss = kept_token_jsd(hidden[keep], teacher_hidden[keep], head, teacher_head, torch.ones(len(keep)), 0.5)
    torch.testing.assert_close(loss, ref_loss)
    (g,) = torch.autograd.grad(loss, hidden)
    (g_ref,) = torch.autograd.grad(ref_loss, hidden)
    torch.testing.assert_close(g, g_ref)
    assert torch.all(g[4] == 0)


@pytest.mark.parametrize("softcap, scale, bias", [(None, 1.0, False), (3.0, 0.5, True)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_backend_equals_fused_backend(softcap, scale, bias, beta):
    """TRL's ChunkedDivergenceFunction as the loss backend: same weighted loss and gradients as trl-tip's."""
    head, teacher_head = _heads(softcap=softcap, scale=scale, bias=bias)
    head.module.float()
    teacher_head.module.float()
    head, teacher_head = OutputHead(head.module, softcap, scale), OutputHead(teacher_head.module, softcap, scale)
    torch.manual_seed(3)
    hidden = torch.randn(7, 8, requires_grad=True)
    teacher_hidden = torch.randn(7, 12)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0, 3.0])
    params = (hidden, head.module.weight) + ((head.module.bias,) if bias else ())
    results = []
    for backend in ("fused", "trl"):
        loss = kept_token_jsd(hidden, teacher_hidden, head, teacher_head, weights, beta, 3, 0.8, backend=backend)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_trl_backend_with_no_kept_position_gives_a_zero_loss_with_a_graph():
    head, teacher_head = _heads()
    head, teacher_head = OutputHead(head.module.float()), OutputHead(teacher_head.module.float())
    hidden = torch.randn(0, 8, requires_grad=True)
    loss = kept_token_jsd(hidden, torch.randn(0, 12), head, teacher_head, torch.ones(0), backend="trl")
    assert loss.item() == 0.0 and loss.requires_grad


def test_unknown_loss_backend_names_allowed_values():
    head, teacher_head = _heads()
    with pytest.raises(ValueError, match="allowed values: auto, fused, trl"):
        kept_token_jsd(torch.randn(2, 8), torch.randn(2, 12), head, teacher_head, torch.ones(2), backend="x")
