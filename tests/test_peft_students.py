"""LoRA and 4-bit (QLoRA) students: training with on-policy generation, errors, and exact loss gradients."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, PeftModel


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from conftest import tiny_args  # noqa: E402

from trl_tip import TIPConfig, TIPTrainer  # noqa: E402
from trl_tip._compat import GKDTrainer  # noqa: E402
from trl_tip.models import is_quantized  # noqa: E402
from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer  # noqa: E402


bnb = pytest.importorskip("bitsandbytes")

NF4 = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "float32",
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("student")
    make_model(tokenizer, 32, 1, seed=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _args(tmp_path, **overrides) -> TIPConfig:
    defaults = dict(max_steps=2, learning_rate=1e-2, beta=0.5, temperature=1.0, max_new_tokens=4)
    return tiny_args(tmp_path, **{**defaults, "token_selection": "entropy_sample", "keep_ratio": 0.5, **overrides})


def _lora(**overrides) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _CountGenerations:
    """Wraps the trainer's step generator to count the student's on-policy generations (one per optimizer step)."""

    def __init__(self, trainer):
        self.calls = 0
        original = trainer.tip_generator.generate

        def wrapped(model, **kwargs):
            self.calls += 1
            return original(model, **kwargs)

        trainer.tip_generator.generate = wrapped


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lora_student_trains_with_generation(tmp_path, tokenizer, gradient_checkpointing):
    teacher = make_model(tokenizer, 32, 1, seed=1)
    student = make_model(tokenizer, 32, 1, seed=2)
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, gradient_checkpointing=gradient_checkpointing),
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
        peft_config=_lora(),
    )
    assert isinstance(trainer.model, PeftModel)
    before = _lora_state(trainer.model)
    assert before and all("lora_" in name for name in before)
    counter = _CountGenerations(trainer)
    trainer.train()
    assert counter.calls == 2
    assert trainer.model.get_base_model().is_gradient_checkpointing == gradient_checkpointing
    after = _lora_state(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logs = [log for log in trainer.state.log_history if "tip/kept_frac" in log]
    assert len(logs) == 2 and all(0.0 < log["tip/kept_frac"] < 1.0 for log in logs)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_qlora_student_trains_with_generation(tmp_path, tokenizer, student_dir, gradient_checkpointing):
    teacher = make_model(tokenizer, 32, 1, seed=1)
    args = _args(
        tmp_path,
        gradient_checkpointing=gradient_checkpointing,
        model_init_kwargs={"quantization_config": dict(NF4), "dtype": "float32"},
    )
    trainer = TIPTrainer(
        model=student_dir,
        teacher_model=teacher,
        args=args,
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
        peft_config=_lora(),
    )
    base = trainer.model.get_base_model()
    assert isinstance(trainer.model, PeftModel) and base.is_loaded_in_4bit
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert base.is_gradient_checkpointing == gradient_checkpointing
    assert args.model_init_kwargs["quantization_config"] == NF4  # the user's kwargs are left as given
    before = _lora_state(trainer.model)
    # An eval-mode forward first (as evaluation does): bitsandbytes must not repack the weights for CPU inference,
    # which would break the training forwards that follow on AVX512-BF16 CPUs.
    trainer.model.eval()
    with torch.no_grad():
        trainer.model(**tokenizer(["<|user|>1+2<|end|><|assistant|>"], return_tensors="pt"))
    counter = _CountGenerations(trainer)
    trainer.train()
    assert counter.calls == 2
    after = _lora_state(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(after[n]).all() for n in after)
    assert base.is_gradient_checkpointing == gradient_checkpointing  # restored after generation


def test_quantized_student_without_peft_config_raises(tmp_path, tokenizer, student_dir):
    teacher = make_model(tokenizer, 32, 1, seed=1)
    args = _args(tmp_path, model_init_kwargs={"quantization_config": dict(NF4)})
    with pytest.raises(ValueError, match="cannot be fully fine-tuned.*peft_config"):
        TIPTrainer(model=student_dir, teacher_model=teacher, args=args, train_dataset=arithmetic_dataset(4))
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    loaded = AutoModelForCausalLM.from_pretrained(
        student_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    with pytest.raises(ValueError, match="loaded in 8 bits.*cannot be fully fine-tuned"):
        TIPTrainer(model=loaded, teacher_model=teacher, args=_args(tmp_path), train_dataset=arithmetic_dataset(4))


def test_quantized_teacher_from_path(tmp_path, tokenizer, student_dir):
    args = _args(tmp_path, teacher_model_init_kwargs={"quantization_config": {"load_in_8bit": True}})
    trainer = TIPTrainer(
        model=make_model(tokenizer, 32, 1, seed=3),
        teacher_model=student_dir,
        args=args,
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )
    assert is_quantized(trainer.teacher_model) and trainer.teacher_model.is_loaded_in_8bit
    trainer.train()
    assert trainer.state.global_step == 2


def _grads(loss, params, retain_graph: bool = False) -> list[torch.Tensor]:
    """Gradients by `backward` (reentrant gradient checkpointing does not support `autograd.grad`)."""
    for p in params:
        p.grad = None
    loss.backward(retain_graph=retain_graph)
    return [p.grad.clone() for p in params]


def _reference_and_trainer_grads(trainer, inputs):
    """Gradients of TIPTrainer's loss (rule `all`) and of GKD's loss on full logits, for the trainable params."""
    model = trainer.model
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    labels = inputs["labels"]
    eligible = int((labels[:, 1:] != -100).sum())

    loss = trainer.compute_loss(model, inputs, num_items_in_batch=eligible)
    grads = _grads(loss, [p for _, p in params])

    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    with torch.no_grad():
        teacher_logits = trainer.teacher_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
    reference = GKDTrainer.generalized_jsd_loss(
        logits[:, :-1], teacher_logits[:, :-1], labels=labels[:, 1:], beta=trainer.beta
    )
    reference_grads = _grads(reference, [p for _, p in params])
    return loss, reference, params, grads, reference_grads


@pytest.mark.parametrize(
    "case",
    ["lora_frozen_tied_embeddings", "lora_modules_to_save_head", "qlora_4bit", "full_weights"],
)
def test_loss_gradients_match_full_logits_reference(tmp_path, tokenizer, student_dir, case):
    """The chunked kept-token loss equals GKD's full-logit loss (rule `all`), in value and gradients."""
    teacher = make_model(tokenizer, 32, 1, seed=1)
    extra, peft_config, model = {}, None, make_model(tokenizer, 32, 1, seed=2)
    if case == "lora_frozen_tied_embeddings":
        peft_config = _lora()
    elif case == "lora_modules_to_save_head":
        peft_config = _lora(target_modules=["q_proj"], modules_to_save=["lm_head"])
    elif case == "qlora_4bit":
        peft_config, model = _lora(), student_dir
        extra = {"model_init_kwargs": {"quantization_config": dict(NF4)}}
    args = _args(tmp_path, token_selection="all", keep_ratio=None, tip_chunk_size=7, **extra)
    dataset = arithmetic_dataset(6, seed=3)
    trainer = TIPTrainer(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if case == "qlora_4bit":
        # SFTTrainer casts a quantized student's adapters to bf16 (QLoRA paper); fp32 keeps the comparison tight.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    loss, reference, params, grads, reference_grads = _reference_and_trainer_grads(trainer, inputs)
    torch.testing.assert_close(loss, reference.float(), rtol=1e-5, atol=1e-6)
    assert params
    if case == "lora_frozen_tied_embeddings":
        assert not trainer.model.get_output_embeddings().weight.requires_grad
    if case == "lora_modules_to_save_head":
        assert any("lm_head.modules_to_save" in n for n, _ in params)
    for (name, _), grad, ref in zip(params, grads, reference_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_lora_lm_head_fallback_gradients(tokenizer):
    """A LoRA-wrapped lm_head takes the checkpointed path of `kept_token_jsd`; its gradients equal autograd's.

    TRL's SFTTrainer (GKDTrainer's base) refuses an adapter on `lm_head`, so this path is reached by custom trainers
    and by heads that are not plain `nn.Linear`; it is checked directly on the loss function.
    """
    from peft import get_peft_model

    from trl_tip.loss import OutputHead, kept_token_jsd

    teacher = make_model(tokenizer, 32, 1, seed=1)
    model = get_peft_model(make_model(tokenizer, 32, 1, seed=2), _lora(target_modules=["q_proj", "lm_head"]))
    for name, p in model.named_parameters():  # a non-zero lora_B so the adapter changes the head's output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = tokenizer(["<|user|>12+7<|end|><|assistant|>19<|end|>", "<|user|>3-9<|end|><|assistant|>-6"], padding=True)
    input_ids, attention_mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    keep = attention_mask[:, 1:].bool()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    head = OutputHead.from_model(model.get_base_model())
    assert not head.is_plain_linear

    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden, t_hidden = out.hidden_states[-1][:, :-1][keep], t_out.hidden_states[-1][:, :-1][keep]
    loss = kept_token_jsd(hidden, t_hidden, head, teacher.lm_head, torch.ones(len(hidden)), 0.5, 5) / len(hidden)
    grads = _grads(loss, params, retain_graph=True)

    labels = torch.where(keep, input_ids[:, 1:], -100)
    reference = GKDTrainer.generalized_jsd_loss(out.logits[:, :-1], t_out.logits[:, :-1], labels=labels, beta=0.5)
    reference_grads = _grads(reference, params)
    torch.testing.assert_close(loss, reference.float(), rtol=1e-5, atol=1e-6)
    for grad, ref in zip(grads, reference_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)


def _prompt_learning(kind: str):
    from peft import PrefixTuningConfig, PromptTuningConfig

    config_class = PromptTuningConfig if kind == "prompt_tuning" else PrefixTuningConfig
    return config_class(task_type="CAUSAL_LM", num_virtual_tokens=4)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("how", ["peft_config", "peft_model"])
def test_prompt_learning_students_are_refused(tmp_path, tokenizer, kind, how):
    """Prompt tuning prepends virtual tokens (the loss would read shifted positions); prefix tuning adds key/values
    the decoder call does not get (a shape error deep in attention). Both are refused before training."""
    from peft import get_peft_model

    student = make_model(tokenizer, 32, 1, seed=2)
    peft_config = _prompt_learning(kind)
    kwargs = {"peft_config": peft_config} if how == "peft_config" else {}
    if how == "peft_model":
        student = get_peft_model(student, peft_config)
    name = "PromptTuningConfig" if kind == "prompt_tuning" else "PrefixTuningConfig"
    with pytest.raises(ValueError, match=rf"Prompt-learning PEFT methods are not supported \(got {name}\).*LoRA"):
        TIPTrainer(
            model=student,
            teacher_model=make_model(tokenizer, 32, 1, seed=1),
            args=_args(tmp_path),
            train_dataset=arithmetic_dataset(8),
            processing_class=tokenizer,
            **kwargs,
        )


@pytest.mark.parametrize("saved_dtype", [torch.bfloat16, torch.float16])
def test_teacher_by_path_loads_in_its_checkpoint_dtype_like_gkd(tmp_path, tokenizer, saved_dtype):
    """A teacher given by id or path loads like GKDTrainer loads it: `from_pretrained`'s default dtype ("auto", the
    checkpoint's), unless `teacher_model_init_kwargs` sets one; the student still defaults to float32 (as in TRL)."""
    from trl_tip._compat import GKDConfig

    path = tmp_path / "teacher"
    make_model(tokenizer, 32, 1, seed=1, dtype=saved_dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    common = dict(max_steps=1, lmbda=0.0, max_new_tokens=4, report_to="none", use_cpu=True, bf16=False)
    gkd = GKDTrainer(
        model=make_model(tokenizer, 32, 1, seed=2),
        teacher_model=str(path),
        args=GKDConfig(output_dir=str(tmp_path / "gkd"), **common),
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    tip = TIPTrainer(
        model=make_model(tokenizer, 32, 1, seed=2),
        teacher_model=str(path),
        args=tiny_args(tmp_path / "tip", **common),
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    assert gkd.teacher_model.dtype == saved_dtype
    assert tip.teacher_model.dtype == gkd.teacher_model.dtype
    tip.train()  # a float32 student learns from a half-precision teacher
    assert tip.state.global_step == 1
    explicit = TIPTrainer(
        model=make_model(tokenizer, 32, 1, seed=2),
        teacher_model=str(path),
        args=tiny_args(tmp_path / "explicit", teacher_model_init_kwargs={"dtype": "float32"}, **common),
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    assert explicit.teacher_model.dtype == torch.float32
    student = TIPTrainer(
        model=str(path),
        teacher_model=make_model(tokenizer, 32, 1, seed=1),
        args=tiny_args(tmp_path / "student", **common),
        train_dataset=arithmetic_dataset(8),
        processing_class=tokenizer,
    )
    assert student.model.dtype == torch.float32
