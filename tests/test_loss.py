import pytest
import torch
import torch.nn as nn

from trl_tip.loss import OutputHead, kept_token_jsd
from trl_tip.signals import generalized_jsd


def reference(hidden, teacher_hidden, head, teacher_head, weights, beta):
    logits = head(hidden).float()
    with torch.no_grad():
        t_logits = teacher_head(teacher_hidden).float()
    return (generalized_jsd(logits, t_logits, beta) * weights).sum()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_linear_matches_autograd(beta, bias, softcap):
    torch.manual_seed(0)
    k, d, v = 13, 6, 11
    lin = nn.Linear(d, v, bias=bias)
    t_lin = nn.Linear(8, v, bias=False)
    head = OutputHead(lin, softcap)
    assert head.is_plain_linear
    weights = torch.rand(k)
    h1 = torch.randn(k, d, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    th = torch.randn(k, 8)
    ours = kept_token_jsd(h1, th, head, t_lin, weights, beta=beta, chunk_size=4)
    ours.backward()
    grads_ours = [h1.grad] + [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    ref = reference(h2, th, head, t_lin, weights, beta)
    ref.backward()
    grads_ref = [h2.grad] + [p.grad.clone() for p in lin.parameters()]
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert t_lin.weight.grad is None


def test_generic_head_path_matches_autograd():
    torch.manual_seed(1)
    k, d, v = 9, 5, 7
    module = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, v))
    head = OutputHead(module)
    assert not head.is_plain_linear
    t_lin = nn.Linear(d, v)
    weights = torch.ones(k)
    h1 = torch.randn(k, d, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    th = torch.randn(k, d)
    ours = kept_token_jsd(h1, th, head, t_lin, weights, chunk_size=2)
    ours.backward()
    g_ours = [h1.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    ref = reference(h2, th, head, t_lin, weights, 0.5)
    ref.backward()
    g_ref = [h2.grad] + [p.grad.clone() for p in module.parameters()]
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_head_gets_no_grad_and_empty_input_is_zero():
    lin = nn.Linear(4, 5, bias=False)
    lin.weight.requires_grad_(False)
    head = OutputHead(lin)
    h = torch.randn(3, 4, requires_grad=True)
    loss = kept_token_jsd(h, torch.randn(3, 4), head, nn.Linear(4, 5), torch.ones(3))
    loss.backward()
    assert lin.weight.grad is None and h.grad is not None
    empty = torch.zeros(0, 4, requires_grad=True)
    zero = kept_token_jsd(empty, torch.zeros(0, 4), head, nn.Linear(4, 5), torch.ones(0))
    assert zero.item() == 0.0
    zero.backward()
    assert empty.grad.shape == (0, 4)


def test_no_grad_mode_returns_value():
    lin = nn.Linear(4, 5)
    h = torch.randn(3, 4)
    th = torch.randn(3, 4)
    t_lin = nn.Linear(4, 5)
    with torch.no_grad():
        value = kept_token_jsd(h, th, OutputHead(lin), t_lin, torch.ones(3))
    torch.testing.assert_close(value, reference(h, th, OutputHead(lin), t_lin, torch.ones(3), 0.5).detach())


def _fsdp_class_swap(module: nn.Module) -> nn.Module:
    # What FSDP2's `fully_shard` does to a module's class (torch.distributed.fsdp._fully_shard): a dynamic subclass of
    # FSDPModule and the original class, the forward unchanged.
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    module.__class__ = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {})
    return module


def test_an_fsdp2_wrapped_linear_head_takes_the_fused_pass():
    # On an H100, FSDP2 turned the student's `lm_head` into `FSDPLinear`; an exact-type check sent it down the
    # per-chunk path, whose repeated `lm_head` calls made FSDP2 free the final norm's weights before their backward.
    from trl_tip.loss import is_linear_layer

    torch.manual_seed(2)
    lin = nn.Linear(6, 11, bias=False)
    ref_lin = nn.Linear(6, 11, bias=False)
    ref_lin.load_state_dict(lin.state_dict())
    swapped = _fsdp_class_swap(lin)
    assert type(swapped).__name__ == "FSDPLinear" and is_linear_layer(swapped)
    head = OutputHead(swapped)
    assert head.is_plain_linear
    calls = []
    swapped.register_forward_pre_hook(lambda *args: calls.append(1))
    t_lin = nn.Linear(8, 11, bias=False)
    h1 = torch.randn(9, 6, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    th, weights = torch.randn(9, 8), torch.rand(9)
    ours = kept_token_jsd(h1, th, head, t_lin, weights, chunk_size=4)
    ours.backward()
    assert calls == []  # the head's weight is read, its module (and FSDP2's hooks) never called
    ref = reference(h2, th, OutputHead(ref_lin), t_lin, weights, 0.5)
    ref.backward()
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(swapped.weight.grad, ref_lin.weight.grad, rtol=1e-4, atol=1e-6)


def test_a_linear_subclass_with_its_own_forward_is_not_read_as_its_weight():
    from trl_tip.loss import is_linear_layer

    class Scaled(nn.Linear):  # e.g. bitsandbytes' Linear4bit: an nn.Linear whose forward is not `x @ W.T + b`
        def forward(self, x):
            return 2.0 * super().forward(x)

    assert is_linear_layer(nn.Linear(2, 3)) and not is_linear_layer(Scaled(2, 3))
    assert not OutputHead(Scaled(2, 3)).is_plain_linear
    assert not is_linear_layer(nn.Sequential(nn.Linear(2, 3)))


def test_an_fsdp2_unit_head_that_is_not_linear_is_refused_with_grad():
    module = _fsdp_class_swap(nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 7)))
    head = OutputHead(module)
    h = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(ValueError, match="lm_head.*FSDP2.*target_modules"):
        kept_token_jsd(h, torch.randn(4, 5), head, nn.Linear(5, 7), torch.ones(4))
    with torch.no_grad():  # evaluation calls the head without a backward: allowed
        kept_token_jsd(h, torch.randn(4, 5), head, nn.Linear(5, 7), torch.ones(4))


def test_undo_output_cast_keeps_the_inner_value_and_the_wrapper_gradient_path():
    # FSDP2 with accelerate's bf16 policy casts the student forward's outputs (the loss among them) to bf16; the
    # trainer gives back the inner float32 value while the gradient still goes through the returned (cast) tensor.
    from trl_tip.loss import undo_output_cast

    x = torch.tensor([0.1234567, 0.7654321], requires_grad=True)
    inner = (x * x).sum() * 1.0001
    seen = []
    returned = inner.to(torch.bfloat16)
    returned.register_hook(lambda g: seen.append(g.dtype))  # stands in for FSDP2's hooks on the forward's outputs
    loss = undo_output_cast(returned, inner)
    assert loss.dtype == torch.float32 and loss.item() == inner.item() and returned.item() != inner.item()
    loss.backward()
    assert seen == [torch.bfloat16]
    torch.testing.assert_close(x.grad, 2 * x.detach() * 1.0001)
    same = inner.detach().clone().requires_grad_(True)
    assert undo_output_cast(same, inner) is same and undo_output_cast(same, None) is same
