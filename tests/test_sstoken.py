"""ssToken: history model, retrospective excess loss, prompt attention, selection, trainer integration."""

import math
import os
import shutil
import types

import pytest
import torch
import torch.nn as nn
from conftest import tiny_args

from trl_tip import (
    HistoryEMACallback,
    Intersect,
    ModelHistory,
    QuadrantSubset,
    SelectionContext,
    SSToken,
    SSTokenWarmupCallback,
    TIPTrainer,
    TokenSignals,
    Union,
    build_selector,
)
from trl_tip.signals import history_token_losses, token_log_probs
from trl_tip.sstoken import (
    adapter_is_noop,
    history_model,
    per_sequence_minmax,
    per_sequence_top_k,
    retrospective_excess_loss,
    sstoken_score,
)
from trl_tip.sstoken.attention import capture_attention_inputs, prompt_attention_mass, prompt_mass_from_qk
from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer


# ----------------------------------------------------------------------------- helpers


def make_signals(student_log_prob, loss, seq_idx, finite=None):
    n = len(seq_idx)
    zeros = torch.zeros(n)
    return TokenSignals(
        entropy=zeros.clone(),
        divergence=zeros.clone(),
        loss=torch.as_tensor(loss, dtype=torch.float32),
        student_log_prob=torch.as_tensor(student_log_prob, dtype=torch.float32),
        teacher_log_prob=zeros.clone(),
        teacher_entropy=zeros.clone(),
        finite=torch.ones(n, dtype=torch.bool) if finite is None else torch.as_tensor(finite),
        seq_idx=torch.as_tensor(seq_idx),
        pos_idx=torch.arange(n),
    )


def make_context(quadrant, extras, step=0, training=True):
    return SelectionContext(
        entropy_threshold=0.0,
        divergence_threshold=0.0,
        quadrant=torch.as_tensor(quadrant),
        generator=torch.Generator().manual_seed(0),
        global_step=step,
        extras=extras,
        training=training,
    )


def base_args(tmp_path, **kwargs):
    return tiny_args(tmp_path, **{"max_new_tokens": 5, "token_selection": "sstoken", **kwargs})


# ----------------------------------------------------------------------------- history model


def test_ema_arithmetic_by_hand():
    model = nn.Linear(2, 2, bias=False)
    frozen = nn.Linear(2, 1)
    frozen.requires_grad_(False)
    model.frozen = frozen
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    history = ModelHistory(model, decay=0.75, mode="ema")
    assert set(history.shadow) == {"weight"}  # frozen parameters are shared, not copied
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
    history.update(model)
    # 0.75 * old + 0.25 * new
    expected = torch.tensor([[2.0, 3.0], [4.0, 5.0]])
    assert torch.allclose(history.shadow["weight"], expected)
    with torch.no_grad():
        model.weight.zero_()
    history.update(model)
    assert torch.allclose(history.shadow["weight"], 0.75 * expected)
    assert history.num_updates == 2

    # The swap puts the history weights in and restores the student's exactly.
    with history.swapped_in(model):
        assert torch.allclose(model.weight, 0.75 * expected)
    assert torch.equal(model.weight, torch.zeros(2, 2))


def test_fixed_history_and_cpu_device_and_callback_interval():
    model = nn.Linear(3, 3)
    initial = model.weight.detach().clone()
    fixed = ModelHistory(model, mode="fixed", device="cpu")
    ema = ModelHistory(model, decay=0.5, mode="ema")
    callback = HistoryEMACallback(ema, update_interval=2)
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.add_(1.0)
        fixed.update(model)
        callback.on_step_end(None, types.SimpleNamespace(global_step=step), None, model=model)
    assert torch.equal(fixed.shadow["weight"], initial)
    assert fixed.shadow["weight"].device.type == "cpu" and not fixed.uses_base_model
    fixed.reset(model)  # a fixed history is the model at construction: a reset leaves it
    assert torch.equal(fixed.shadow["weight"], initial)
    # Updates after steps 2 and 4 only: w0 -> 0.5 w0 + 0.5 (w0 + 2) = w0 + 1 -> 0.5 (w0 + 1) + 0.5 (w0 + 4) = w0 + 2.5
    assert ema.num_updates == 2
    assert torch.allclose(ema.shadow["weight"], initial + 2.5)
    with pytest.raises(ValueError, match="sstoken_ema_update_interval"):
        HistoryEMACallback(ema, update_interval=0)
    with pytest.raises(ValueError, match="sstoken_history"):
        ModelHistory(model, mode="slow")
    with pytest.raises(ValueError, match="sstoken_ema_decay"):
        ModelHistory(model, decay=1.0)


def test_lora_history_tracks_only_the_adapter():
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    model = get_peft_model(
        make_model(tokenizer, 32, 1, seed=0),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    history = ModelHistory(model, decay=0.5, mode="ema")
    assert history.shadow and all("lora_" in name for name in history.shadow)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert set(history.shadow) == set(lora)
    assert history.num_parameters == sum(p.numel() for p in lora.values())
    assert history.num_parameters < 0.1 * sum(p.numel() for p in model.parameters())

    ids = torch.randint(4, len(tokenizer), (2, 7))
    with torch.no_grad():
        for name, p in lora.items():
            if "lora_B" in name:
                p.normal_()
        current = model(input_ids=ids).logits
    # The history holds the initial adapter (lora_B = 0): the base model's output.
    with history.swapped_in(model), torch.no_grad():
        old = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.allclose(old, base, atol=1e-6)
    assert not torch.allclose(old, current)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, current)
    history.update(model)
    for name, p in lora.items():
        if "lora_B" in name:
            assert torch.allclose(history.shadow[name], 0.5 * p.detach())


# ----------------------------------------------------------------------------- pure functions


def test_rel_sign_and_per_sequence_minmax_on_crafted_logits():
    # Two sequences; the history model puts less mass on the target than the current model at positions 0 and 2.
    targets = torch.tensor([0, 1, 2, 0, 1])
    current_logits = torch.tensor(
        [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    )
    history_logits = torch.tensor(
        [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    )
    seq_idx = torch.tensor([0, 0, 0, 1, 1])
    his = history_token_losses(history_logits, targets, lambda h: h, ("nll",))["nll"]
    cur = -token_log_probs(current_logits, targets)
    rel = retrospective_excess_loss(his, cur)
    expected = torch.tensor(
        [
            -math.log(1 / 3) + math.log(math.e**3 / (math.e**3 + 2)),
            0.0,
            -math.log(math.e / (math.e + 2)) + math.log(math.e**5 / (math.e**5 + 2)),
            0.0,
            0.0,
        ]
    )
    assert torch.allclose(rel, expected, atol=1e-6)
    assert rel[0] > rel[2] > 0  # tokens the current model has learnt have positive REL
    norm = per_sequence_minmax(rel, seq_idx)
    assert torch.allclose(norm[:3], (rel[:3] - rel[1]) / (rel[0] - rel[1]))
    # The reference code's (v - min) / (max - min + 1e-8).
    assert norm[1] == 0 and norm[0] == pytest.approx(1.0, abs=1e-7) and 0 < norm[2] < 1
    assert torch.equal(norm[3:], torch.zeros(2))  # a constant sequence maps to 0

    values = torch.tensor([1.0, 5.0, 3.0, -2.0, 2.0, 100.0])
    valid = torch.tensor([True, True, True, True, True, False])
    got = per_sequence_minmax(values, torch.tensor([0, 0, 0, 1, 1, 1]), valid)
    assert torch.allclose(got, torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.0]))  # invalid: excluded and 0


def test_history_divergence_loss_matches_generalized_jsd():
    from trl_tip.signals import generalized_jsd

    torch.manual_seed(0)
    hidden, teacher = torch.randn(5, 7), torch.randn(5, 7)
    out = history_token_losses(
        hidden, torch.zeros(5, dtype=torch.long), lambda h: h, ("divergence", "nll"), teacher, lambda h: h, 0.3, 2
    )
    assert torch.allclose(out["divergence"], generalized_jsd(hidden, teacher, 0.3))
    with pytest.raises(ValueError, match="teacher_hidden"):
        history_token_losses(hidden, torch.zeros(5, dtype=torch.long), lambda h: h, ("divergence",))


def test_score_and_per_sequence_top_k():
    rel_norm = torch.tensor([0.0, 1.0, 0.5])
    attention = torch.tensor([1.0, 0.0, 0.5])
    assert torch.allclose(sstoken_score(rel_norm, attention, 0.25), torch.tensor([0.75, 0.25, 0.5]))
    assert torch.equal(sstoken_score(rel_norm, None, 1.0), rel_norm)
    assert torch.equal(sstoken_score(None, attention, 0.0), attention)
    with pytest.raises(ValueError, match="REL"):
        sstoken_score(None, attention, 0.5)

    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6])
    seq = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    keep = per_sequence_top_k(scores, seq, 0.6)
    # ssToken's ceil(rho * n): sequence 0: 5 tokens -> 3 kept (0.9, then the two 0.5s; 0.6 * 5 is 3.0000000000000004
    # in floating point, still 3); sequence 1: 4 tokens -> ceil(2.4) = 3 kept (0.8, 0.7, 0.6).
    assert keep.tolist() == [False, True, True, True, False, True, False, True, True]
    valid = torch.tensor([True, False, True, True, True, True, True, True, True])
    keep = per_sequence_top_k(scores, seq, 0.5, valid)
    # Sequence 0 has 4 valid tokens -> 2 kept; equal scores go to the lower index.
    assert keep.tolist() == [False, False, True, True, False, True, False, True, False]


def test_sstoken_selector_components_warmup_and_metrics():
    # Sequence 0: 4 tokens, sequence 1: 2 tokens. REL from NLL: history NLL - current NLL.
    signals = make_signals(
        student_log_prob=[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0], loss=[0.0] * 6, seq_idx=[0, 0, 0, 0, 1, 1]
    )
    extras = {
        "history_nll": torch.tensor([1.0, 3.0, 2.0, 1.5, 1.0, 0.0]),  # REL = [0, 2, 1, 0.5, 0, -1]
        "prompt_attention": torch.tensor([0.9, 0.1, 0.2, 0.8, 0.1, 0.9]),
    }
    quadrant = [3, 1, 3, 4, 3, 2]
    rel_only = SSToken(keep_ratio=0.5, gamma=1.0, loss="nll")
    assert rel_only.requires == {"history_nll"}
    keep = rel_only(signals, make_context(quadrant, extras))
    assert keep.tolist() == [False, True, True, False, True, False]
    attn_only = SSToken(keep_ratio=0.5, gamma=0.0)
    assert attn_only.requires == {"prompt_attention"}
    assert attn_only(signals, make_context(quadrant, extras)).tolist() == [True, False, False, True, False, True]
    # Combined, gamma = 0.5: REL_norm = [0, 1, .5, .25 | 1, 0]; score = [.45, .55, .35, .525 | .55, .45].
    both = SSToken(keep_ratio=0.5, gamma=0.5, loss="nll")
    assert both.requires == {"history_nll", "prompt_attention"}
    assert both(signals, make_context(quadrant, extras, step=5)).tolist() == [False, True, False, True, True, False]
    # The warm-up view: the attention alone decides, and only the attention is required.
    warmup = both.attention_only()
    assert warmup.requires == {"prompt_attention"} and warmup.keep_ratio == 0.5
    attention_extras = {"prompt_attention": extras["prompt_attention"]}
    assert warmup(signals, make_context(quadrant, attention_extras)).tolist() == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
    # Both share one metric accumulator (and one checkpoint state).
    assert warmup.state_dict()["sums"].equal(both.state_dict()["sums"])
    metrics = warmup.compute_metrics()
    assert metrics["sstoken/rel_mean"] == pytest.approx(2.5 / 6)
    assert metrics["sstoken/attn_mean"] == pytest.approx(3.0 / 6)
    # Kept tokens of the two calls: [1, 3, 4] then [0, 3, 5]; Q3 among them: 4 and 0.
    assert metrics["sstoken/overlap_q3"] == pytest.approx(2 / 6)
    assert both.compute_metrics() == {"sstoken/overlap_q3": 0.0}  # reset after compute
    both(signals, make_context(quadrant, extras, training=False))
    assert both.compute_metrics() == {"sstoken/overlap_q3": 0.0}  # evaluation does not accumulate
    with pytest.raises(ValueError, match="history_nll"):
        rel_only(signals, make_context(quadrant, {}))


def test_intersect_and_union_compose_selectors():
    signals = make_signals([0.0] * 4, [0.0] * 4, [0, 0, 0, 0])
    quadrant = [3, 3, 1, 4]
    extras = {"prompt_attention": torch.tensor([0.9, 0.1, 0.8, 0.2])}
    sstoken = SSToken(keep_ratio=0.5, gamma=0.0)
    q3 = QuadrantSubset(["Q3"])
    inter, union = Intersect(sstoken, q3), Union(sstoken, q3)
    assert inter.requires == {"prompt_attention"} and union.requires == {"prompt_attention"}
    assert inter(signals, make_context(quadrant, extras)).tolist() == [True, False, False, False]
    assert union(signals, make_context(quadrant, extras)).tolist() == [True, True, True, False]
    assert "sstoken/attn_mean" in union.compute_metrics()
    assert set(union.state_dict()) == {"first"}
    with pytest.raises(TypeError, match="callable"):
        Intersect(sstoken, 3)


# ----------------------------------------------------------------------------- attention score


@pytest.mark.parametrize("arch, layer", [("qwen2", -1), ("qwen3", -1), ("qwen2", 0), ("qwen3", -2)])
def test_prompt_attention_equals_eager_reference(arch, layer):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cls_config, cls_model = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    config = cls_config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    model = cls_model(config).eval()
    ids = torch.randint(1, 50, (3, 11))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, :1] = 0
    attention_mask[0, 9:] = 0  # right padding after an early EOS
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[:, :5] = True
    prompt_mask &= attention_mask.bool()
    seq_idx, query_pos = (attention_mask[:, 5:] == 1).nonzero(as_tuple=True)
    query_pos = query_pos + 5
    with torch.no_grad(), capture_attention_inputs(model, layer) as captured:
        model(input_ids=ids, attention_mask=attention_mask)
    mass = prompt_attention_mass(captured, attention_mask, prompt_mask, seq_idx, query_pos, chunk_size=2)

    # Same weights, eager attention that materialises the weights of every layer.
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=attention_mask, output_attentions=True).attentions[layer]
    reference = (attentions[seq_idx, :, query_pos, :] * prompt_mask[seq_idx][:, None, :]).sum(-1).mean(-1)
    assert torch.allclose(mass, reference, atol=1e-5)
    assert mass.min() > 0 and mass.max() <= 1


def test_attention_layer_option(tmp_path, toy):
    from trl_tip.sstoken.attention import self_attention_layer

    tokenizer, dataset = toy
    model = make_model(tokenizer, 32, 2, seed=0)
    assert self_attention_layer(model, -1) is model.model.layers[1].self_attn
    assert self_attention_layer(model, 0) is model.model.layers[0].self_attn
    with pytest.raises(ValueError, match=r"sstoken_attention_layer=2 is out of range.*allowed values: -2..1"):
        self_attention_layer(model, 2)
    with pytest.raises(ValueError, match=r"sstoken_attention_layer=-3 is out of range.*allowed values: -2..1"):
        TIPTrainer(
            model=model,
            teacher_model=make_model(tokenizer, 32, 1, seed=1),
            args=base_args(tmp_path, sstoken_attention_layer=-3),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    # The trainer captures the layer it is told: the first layer's prompt attention differs from the last's.
    records = {}
    for layer in (0, -1):
        trainer = RecordingTrainer(
            model=make_model(tokenizer, 32, 2, seed=0),
            teacher_model=make_model(tokenizer, 32, 1, seed=1),
            args=base_args(tmp_path / str(layer), max_steps=1, sstoken_gamma=0.0, sstoken_attention_layer=layer),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        records[layer] = trainer.records[0][2]["prompt_attention"]
    assert records[0].shape == records[-1].shape and not torch.allclose(records[0], records[-1])


def test_prompt_mass_from_qk_by_hand():
    # One head, two keys with scores 0 and ln 3 -> softmax [1/4, 3/4]; the prompt is the first key.
    query = torch.tensor([[[1.0]]])
    key = torch.tensor([[[0.0], [math.log(3)]]])
    allowed = torch.tensor([[True, True]])
    got = prompt_mass_from_qk(query, key, allowed, torch.tensor([True, False]), scaling=1.0)
    assert torch.allclose(got, torch.tensor([0.25]))
    # A masked key takes no mass.
    got = prompt_mass_from_qk(query, key, torch.tensor([[True, False]]), torch.tensor([True, False]), scaling=1.0)
    assert torch.allclose(got, torch.tensor([1.0]))


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_validation(tmp_path):
    args = base_args(tmp_path)
    assert args.keep_ratio == 0.6
    assert (args.sstoken_gamma, args.sstoken_loss, args.sstoken_history) == (0.5, "nll", "fixed")
    # The EMA options are not read by the fixed history: they stay unset.
    assert (args.sstoken_ema_decay, args.sstoken_ema_update_interval, args.sstoken_history_device) == (
        None,
        None,
        "same",
    )
    assert (args.sstoken_warmup_ratio, args.sstoken_warmup_steps, args.sstoken_attention_layer) == (0.2, None, -1)
    assert (args.budget_scope, args.score_order) == ("rollout", "highest")
    ema = base_args(tmp_path, sstoken_history="ema")
    assert (ema.sstoken_ema_decay, ema.sstoken_ema_update_interval) == (0.9, 1)
    steps = base_args(tmp_path, sstoken_warmup_steps=3)
    assert (steps.sstoken_warmup_ratio, steps.sstoken_warmup_steps) == (None, 3)
    assert base_args(tmp_path, token_selection="tip").keep_ratio == 0.5
    assert isinstance(build_selector(args), SSToken)
    with pytest.raises(ValueError, match="sstoken_gamma"):
        base_args(tmp_path, token_selection="tip", sstoken_gamma=0.5)
    with pytest.raises(ValueError, match="sstoken_loss.*allowed values: nll, divergence"):
        base_args(tmp_path, sstoken_loss="kl")
    with pytest.raises(ValueError, match="sstoken_history.*allowed values: fixed, ema"):
        base_args(tmp_path, sstoken_history="old")
    with pytest.raises(ValueError, match="sstoken_history_device.*allowed values: same, cpu"):
        base_args(tmp_path, sstoken_history_device="disk")
    with pytest.raises(ValueError, match="sstoken_gamma must be in"):
        base_args(tmp_path, sstoken_gamma=1.5)
    with pytest.raises(ValueError, match="sstoken_ema_decay"):
        base_args(tmp_path, sstoken_ema_decay=1.0)
    with pytest.raises(ValueError, match="sstoken_ema_update_interval"):
        base_args(tmp_path, sstoken_ema_update_interval=0)
    with pytest.raises(ValueError, match="sstoken_warmup_steps"):
        base_args(tmp_path, sstoken_warmup_steps=-1)
    with pytest.raises(ValueError, match="sstoken_ema_decay are not used with sstoken_history='fixed'"):
        base_args(tmp_path, sstoken_history="fixed", sstoken_ema_decay=0.5)
    with pytest.raises(ValueError, match="sstoken_loss are not used with sstoken_gamma=0"):
        base_args(tmp_path, sstoken_gamma=0.0, sstoken_loss="nll")
    with pytest.raises(ValueError, match="sstoken_warmup_ratio are not used with sstoken_gamma=0"):
        base_args(tmp_path, sstoken_gamma=0.0, sstoken_warmup_ratio=0.1)
    with pytest.raises(ValueError, match="Give sstoken_warmup_ratio or sstoken_warmup_steps, not both"):
        base_args(tmp_path, sstoken_warmup_ratio=0.1, sstoken_warmup_steps=2)
    with pytest.raises(ValueError, match=r"sstoken_warmup_ratio must be in \[0, 1\)"):
        base_args(tmp_path, sstoken_warmup_ratio=1.0)
    with pytest.raises(ValueError, match="sstoken_attention_layer must be an integer"):
        base_args(tmp_path, sstoken_attention_layer=1.5)
    with pytest.raises(ValueError, match="sstoken_attention_layer is not used with sstoken_gamma=1 and no warm-up"):
        base_args(tmp_path, sstoken_gamma=1.0, sstoken_warmup_steps=0, sstoken_attention_layer=0)
    with pytest.raises(ValueError, match="sstoken_attention_layer only applies to token_selection='sstoken'"):
        base_args(tmp_path, token_selection="tip", sstoken_attention_layer=0)
    with pytest.raises(ValueError, match="budget_scope='token' is unknown; allowed values: rollout, batch"):
        base_args(tmp_path, budget_scope="token")
    attention_only = base_args(tmp_path, sstoken_gamma=0.0)
    assert build_selector(attention_only).requires == {"prompt_attention"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_ratio": 0.0}, r"^keep_ratio must be in \(0, 1\], got 0.0\.$"),
        ({"keep_ratio": "0.5"}, r"^keep_ratio must be a number in \(0, 1\], got str '0.5'\.$"),
        ({"gamma": 1.5}, r"^sstoken_gamma must be in \[0, 1\], got 1.5\.$"),
        ({"budget_scope": "token"}, r"^budget_scope='token' is unknown; allowed values: rollout, batch\.$"),
        ({"score_order": "middle"}, r"^score_order='middle' is unknown; allowed values: highest, lowest\.$"),
    ],
)
def test_sstoken_constructor_runs_the_registry_checks(kwargs, message):
    # The selector built directly gives the same message as TIPConfig (the registry's one check per option).
    with pytest.raises(ValueError, match=message):
        SSToken(**kwargs)
    with pytest.raises(ValueError, match=r"^keep_ratio must be in \(0, 1\], got 1.5\.$"):
        per_sequence_top_k(torch.ones(2), torch.zeros(2), 1.5)


# ----------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def toy():
    tokenizer = make_tokenizer()
    return tokenizer, arithmetic_dataset(32, seed=0)


class RecordingTrainer(TIPTrainer):
    """Records the selection of every training micro-batch: (step, weights, extras)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []
        self.tip_engine.add_observer(self)

    def on_selection(self, record, engine):
        if record.training:
            extras = {k: v.clone() for k, v in record.extras.items()}
            self.records.append((record.global_step, record.weights.clone(), extras))


def test_end_to_end_train_logs_sstoken_and_tip_metrics(tmp_path, toy):
    """The EMA history with a one-step warm-up: no REL (and no history forward) during the warm-up."""
    tokenizer, dataset = toy
    args = base_args(
        tmp_path, max_steps=3, sstoken_warmup_steps=1, sstoken_loss="nll", sstoken_history="ema", learning_rate=1e-2
    )
    trainer = RecordingTrainer(
        model=make_model(tokenizer, 32, 1, seed=2),
        teacher_model=make_model(tokenizer, 64, 2, seed=1),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert any(isinstance(cb, HistoryEMACallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for i, log in enumerate(logs):
        keys = ["sstoken/attn_mean", "sstoken/overlap_q3", "tip/kept_frac", "tip/q3/frac"]
        for key in keys + (["sstoken/rel_mean"] if i > 0 else []):
            assert key in log and math.isfinite(log[key])
        assert 0 < log["sstoken/attn_mean"] <= 1 and 0 <= log["sstoken/overlap_q3"] <= 1
        assert 0.6 <= log["tip/kept_frac"] <= 0.8  # ceil(60%) of each sequence
    assert "sstoken/rel_mean" not in logs[0]  # the warm-up step scores by the attention alone
    assert [sorted(extras) for _, _, extras in trainer.records] == [
        ["prompt_attention"],
        ["history_nll", "prompt_attention"],
        ["history_nll", "prompt_attention"],
    ]
    assert history_model(trainer).num_updates == 3


def test_end_to_end_default_sstoken_fixed_history_and_warmup_ratio(tmp_path, toy):
    """The paper's defaults: fixed history (a frozen copy of this full-weight student), 20% attention-only warm-up."""
    tokenizer, dataset = toy
    student = make_model(tokenizer, 32, 1, seed=2)
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = RecordingTrainer(
        model=student,
        teacher_model=make_model(tokenizer, 64, 2, seed=1),
        args=base_args(tmp_path, max_steps=5, learning_rate=1e-2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    history = history_model(trainer)
    assert history.mode == "fixed" and not history.uses_base_model
    assert not any(isinstance(cb, HistoryEMACallback) for cb in trainer.callback_handler.callbacks)
    (warmup,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SSTokenWarmupCallback)]
    assert warmup.warmup_ratio == 0.2
    trainer.train()
    # 20% of 5 steps: step 0 only selects by the attention (no history forward), steps 1-4 by the full score.
    assert [(step, sorted(extras)) for step, _, extras in trainer.records] == [
        (0, ["prompt_attention"]),
        *[(step, ["history_nll", "prompt_attention"]) for step in range(1, 5)],
    ]
    assert trainer.tip_engine.selector is trainer.selector  # the full score after the warm-up
    # The fixed history is the initial student, never updated.
    assert history.num_updates == 0
    for name, value in history.shadow.items():
        assert torch.equal(value, initial[name]), name
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert "sstoken/rel_mean" not in logs[0] and all(math.isfinite(log["sstoken/rel_mean"]) for log in logs[1:])


def lora_trainer(tmp_path, toy, **kwargs):
    from peft import LoraConfig

    tokenizer, dataset = toy
    return TIPTrainer(
        model=make_model(tokenizer, 32, 1, seed=2),
        teacher_model=make_model(tokenizer, 32, 1, seed=1),
        args=base_args(tmp_path, **kwargs),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )


def test_trainer_with_lora_student_uses_the_base_model_as_fixed_history(tmp_path, toy):
    """The default history of a LoRA student is its base model with the adapter disabled: no weight is copied."""
    trainer = lora_trainer(tmp_path, toy, max_steps=2, learning_rate=5e-2)
    history = history_model(trainer)
    assert history.uses_base_model and history.shadow == {} and history.nbytes == 0
    assert not any(isinstance(cb, HistoryEMACallback) for cb in trainer.callback_handler.callbacks)
    recorder = RecordingTrainer.__new__(RecordingTrainer)  # only its on_selection
    recorder.records = []
    trainer.tip_engine.add_observer(recorder)
    trainer.train()
    assert "sstoken/rel_mean" in trainer.state.log_history[-2]
    # After training the adapter is not a no-op any more, and the history is still the base model: the history NLL
    # the trainer computed equals the NLL of the base model with the adapter disabled on the same tokens.
    model = trainer.model
    assert any(bool((p != 0).any()) for n, p in model.named_parameters() if "lora_B" in n)
    ids = torch.randint(4, 30, (2, 7))
    with torch.no_grad():
        current = model(input_ids=ids).logits
        with history.swapped_in(model):
            history_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.equal(history_logits, base) and not torch.allclose(history_logits, current)
    assert torch.equal(model(input_ids=ids).logits, current)  # the adapter is back on after the block


def test_lora_history_options(tmp_path, toy):
    with pytest.raises(ValueError, match="sstoken_history_device is not used.*base model with the adapter disabled"):
        lora_trainer(tmp_path, toy, sstoken_history_device="cpu")
    # The EMA of a LoRA student copies the adapter only, where asked.
    trainer = lora_trainer(
        tmp_path, toy, max_steps=1, sstoken_history="ema", sstoken_history_device="cpu", sstoken_warmup_steps=0
    )
    history = history_model(trainer)
    assert not history.uses_base_model and history.shadow and all("lora_" in name for name in history.shadow)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in history.shadow.values())
    assert any(isinstance(cb, HistoryEMACallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    assert "sstoken/rel_mean" in trainer.state.log_history[0]


def test_fixed_history_of_a_lora_student_whose_adapter_is_not_a_no_op_is_a_copy():
    """A trained (or PiSSA-initialised) adapter already changes the model: disabling it would not give the initial
    student, so the fixed history copies the adapter instead."""
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    model = get_peft_model(
        make_model(tokenizer, 32, 1, seed=0), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0)
    )
    assert adapter_is_noop(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    assert not adapter_is_noop(model)
    ids = torch.randint(4, len(tokenizer), (2, 5))
    with torch.no_grad():
        initial = model(input_ids=ids).logits
    history = ModelHistory(model)
    assert (
        history.mode == "fixed"
        and not history.uses_base_model
        and set(history.shadow) == {n for n, p in model.named_parameters() if p.requires_grad}
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
        with history.swapped_in(model):
            assert torch.allclose(model(input_ids=ids).logits, initial, atol=1e-6)
    # A full-weight student is never a no-op adapter; its fixed copy keeps the weights' own dtype.
    plain = make_model(tokenizer, 32, 1, seed=0).to(torch.bfloat16)
    assert not adapter_is_noop(plain)
    assert {t.dtype for t in ModelHistory(plain).shadow.values()} == {torch.bfloat16}


def test_trainer_runs_a_combined_custom_selector(tmp_path, toy):
    tokenizer, dataset = toy
    selector = Intersect(SSToken(keep_ratio=0.6, gamma=1.0, loss="nll"), QuadrantSubset(["Q1", "Q3"]))
    trainer = TIPTrainer(
        model=make_model(tokenizer, 32, 1, seed=2),
        teacher_model=make_model(tokenizer, 32, 1, seed=1),
        args=base_args(tmp_path, token_selection="all", max_steps=1),
        train_dataset=dataset,
        processing_class=tokenizer,
        selector=selector,
    )
    # The history model is built for any selector that requires it, with the documented defaults (a fixed copy).
    assert history_model(trainer) is not None and history_model(trainer).mode == "fixed"
    # A custom selector gets no automatic warm-up (that comes with token_selection="sstoken").
    assert not any(isinstance(cb, SSTokenWarmupCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["tip/q2/kept_frac"] == 0 and log["tip/q4/kept_frac"] == 0
    assert 0 < log["tip/kept_frac"] < 0.6
    assert "sstoken/rel_mean" in log and "sstoken/attn_mean" not in log


def test_trainer_rejects_unknown_requirement(tmp_path, toy):
    tokenizer, dataset = toy

    class Needy:
        requires = frozenset({"teacher_attention"})

        def __call__(self, signals, context):
            return signals.finite

    with pytest.raises(ValueError, match="teacher_attention"):
        TIPTrainer(
            model=make_model(tokenizer, 32, 1, seed=2),
            teacher_model=make_model(tokenizer, 32, 1, seed=1),
            args=base_args(tmp_path, token_selection="all"),
            train_dataset=dataset,
            processing_class=tokenizer,
            selector=Needy(),
        )


def test_resume_makes_the_same_selections(tmp_path, toy):
    tokenizer, dataset = toy

    def run(output_dir, resume=None):
        args = base_args(
            output_dir,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            learning_rate=2e-2,
            sstoken_history="ema",
            sstoken_ema_decay=0.5,
            sstoken_loss="divergence",
            full_determinism=True,
        )
        trainer = RecordingTrainer(
            model=make_model(tokenizer, 32, 1, seed=2),
            teacher_model=make_model(tokenizer, 32, 1, seed=1),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "sstoken_history.pt").is_file()
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    tail = [r for r in full.records if r[0] >= 2]
    assert [r[0] for r in resumed.records] == [r[0] for r in tail] == [2, 3]
    for (_, w_full, x_full), (_, w_res, x_res) in zip(tail, resumed.records):
        assert torch.equal(w_full, w_res)
        assert torch.allclose(x_full["history_divergence"], x_res["history_divergence"], rtol=0, atol=1e-6)
        assert torch.allclose(x_full["prompt_attention"], x_res["prompt_attention"], rtol=0, atol=1e-6)

    def tail_logs(trainer, key):
        return [(log["step"], log[key]) for log in trainer.state.log_history if key in log and log["step"] > 2]

    assert len(tail_logs(full, "loss")) == 2
    for key in ("loss", "sstoken/rel_mean", "sstoken/attn_mean", "sstoken/overlap_q3", "tip/q3/kept_frac"):
        assert tail_logs(resumed, key) == tail_logs(full, key)

    # Without the saved history the resumed run's history model differs: the check above can fail.
    broken = tmp_path / "broken-checkpoint"
    shutil.copytree(checkpoint, broken)
    os.remove(broken / "sstoken_history.pt")
    other = run(tmp_path / "other", resume=str(broken))
    assert not torch.allclose(other.records[0][2]["history_divergence"], tail[0][2]["history_divergence"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_inside_the_warmup_makes_the_same_selections(tmp_path, toy, lora):
    """Default ssToken (fixed history, warm-up as a share of max_steps), resumed inside the warm-up."""
    from peft import LoraConfig

    tokenizer, dataset = toy

    def run(output_dir, resume=None):
        trainer = RecordingTrainer(
            model=make_model(tokenizer, 32, 1, seed=2),
            teacher_model=make_model(tokenizer, 32, 1, seed=1),
            args=base_args(
                output_dir,
                max_steps=4,
                sstoken_warmup_ratio=0.4,
                save_strategy="steps",
                save_steps=1,
                learning_rate=2e-2,
                full_determinism=True,
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]) if lora else None,
        )
        assert history_model(trainer).uses_base_model == lora
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-1"))
    tail = [r for r in full.records if r[0] >= 1]
    # Steps 0 and 1 (progress 0 and 0.25 < 0.4) are the warm-up: attention only; the resumed run starts in it.
    assert [(r[0], sorted(r[2])) for r in resumed.records] == [(r[0], sorted(r[2])) for r in tail]
    assert [sorted(r[2]) for r in tail[:1]] == [["prompt_attention"]]
    assert all(sorted(r[2]) == ["history_nll", "prompt_attention"] for r in tail[1:])
    for (_, w_full, x_full), (_, w_res, x_res) in zip(tail, resumed.records):
        assert torch.equal(w_full, w_res)
        for name in x_full:
            assert torch.allclose(x_full[name], x_res[name], rtol=0, atol=1e-6), name


def test_per_sequence_top_k_properties():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 3), st.floats(-5, 5), st.booleans()), min_size=1, max_size=40),
        st.floats(0.05, 1.0),
    )
    def check(rows, keep_ratio):
        seq = torch.tensor([r[0] for r in rows])
        scores = torch.tensor([r[1] for r in rows])
        valid = torch.tensor([r[2] for r in rows])
        keep = per_sequence_top_k(scores, seq, keep_ratio, valid)
        assert not (keep & ~valid).any()
        for s in seq.unique().tolist():
            in_seq = (seq == s) & valid
            assert int((keep & in_seq).sum()) == math.ceil(keep_ratio * int(in_seq.sum()) - 1e-9)
            kept, dropped = scores[keep & in_seq], scores[~keep & in_seq]
            if kept.numel() and dropped.numel():
                assert kept.min() >= dropped.max()

    check()


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_history_divergence_is_taken_at_the_loss_temperature(tmp_path, temperature):
    """REL with `sstoken_loss="divergence"` compares the history model's per-token loss with the current one's, both at
    the trainer's temperature: at step 0 the fixed history model is the student, so REL is 0 on every token."""
    from conftest import dist_args, left_tokenizer, prompt_dataset, record_selections

    from trl_tip import TIPDistillationTrainer

    tokenizer = left_tokenizer()
    args = dist_args(
        tmp_path,
        token_selection="sstoken",
        sstoken_loss="divergence",
        sstoken_gamma=1.0,
        temperature=temperature,
        beta=0.5,
    )
    trainer = TIPDistillationTrainer(
        model=make_model(tokenizer, 32, 1, seed=1),
        teacher_model=make_model(tokenizer, 48, 1, seed=2),
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    recorder = record_selections(trainer)
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    completion_mask = torch.ones(3, 6, dtype=torch.long)
    completion_mask[1, 3:] = 0
    inputs = {
        "prompt_ids": torch.randint(4, vocab, (3, 5), generator=g),
        "prompt_mask": torch.ones(3, 5, dtype=torch.long),
        "completion_ids": torch.randint(4, vocab, (3, 6), generator=g),
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum(),
    }
    trainer.model.train()
    trainer.compute_loss(trainer.model, inputs)
    record = recorder.records[-1]
    rel = record.extras["history_divergence"] - record.signals.loss
    assert record.signals.loss.abs().max() > 1e-3  # the models disagree: a temperature mix-up would show
    torch.testing.assert_close(rel, torch.zeros_like(rel), rtol=0, atol=1e-6)
