"""`TIPDistillationTrainer`: TRL's `DistillationTrainer` with token selection.

Checked against TRL's own trainer on the same batches: `all` gives its loss and gradients (also with a tool mask, a
temperature, a soft-capped or scaled head); the inputs our `_compute_loss` receives are exactly those TRL's receives
(on CPU `fast_generation='auto'` leaves generation to TRL); every rule family trains end to end; gradient accumulation
and resume behave.
"""

import copy
import math

import pytest
import torch
from conftest import RecordSelections, dist_args, left_tokenizer, prompt_dataset

from trl_tip import TIPDistillationConfig, TIPDistillationTrainer, metric_names
from trl_tip._compat import DistillationConfig, DistillationTrainer, forward_hooks
from trl_tip.toy import make_model


def make(tmp_path, cls=TIPDistillationTrainer, config_cls=TIPDistillationConfig, student=None, teacher=None, **kw):
    tokenizer = left_tokenizer()
    student = student if student is not None else make_model(tokenizer, 32, 1, seed=1)
    teacher = teacher if teacher is not None else make_model(tokenizer, 48, 1, seed=2)
    args = dist_args(tmp_path, config_cls, **kw)
    return cls(
        model=student, teacher_model=teacher, args=args, train_dataset=prompt_dataset(), processing_class=tokenizer
    )


def batch_inputs(vocab, seed=0, rows=3, prompt=5, completion=7, tool_mask=False):
    """Inputs in the form DistillationTrainer's `_prepare_inputs` yields: left-padded prompts, right-padded
    completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, vocab, (rows, prompt), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(4, vocab, (rows, completion), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = 0  # a shorter completion (right padding)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
    if tool_mask:
        mask = torch.ones_like(completion_ids)
        mask[2, 1:3] = 0  # tool output inside the third completion
        inputs["tool_mask"] = mask
    loss_mask = completion_mask * inputs.get("tool_mask", 1)
    inputs["num_items_in_batch"] = loss_mask.sum()
    return inputs


def loss_and_grads(trainer, inputs):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(loss_a, grads_a, loss_b, grads_b):
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)  # fp32 cancellation in a small KL
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"beta": 0.5},
        {"beta": 0.0},
        {"temperature": 0.7},
    ],
)
@pytest.mark.parametrize("tool_mask", [False, True])
def test_all_equals_distillation_trainer_loss_and_gradients(tmp_path, options, tool_mask):
    student = make_model(left_tokenizer(), 32, 1, seed=1)
    ref = make(tmp_path / "ref", DistillationTrainer, DistillationConfig, copy.deepcopy(student), **options)
    tip = make(tmp_path / "tip", student=student, teacher=ref.teacher_model, token_selection="all", **options)
    inputs = batch_inputs(len(left_tokenizer()), tool_mask=tool_mask)
    assert_same(*loss_and_grads(tip, inputs), *loss_and_grads(ref, inputs))
    stats = tip.tip_statistics.compute(None, num_steps=1)
    assert stats["tip/kept_frac"] == 1.0
    assert stats["tip/tokens_eligible"] == int(inputs["num_items_in_batch"])  # tool tokens are never eligible


@pytest.mark.parametrize(
    "config, scale_name",
    [("gemma2", "final_logit_softcapping"), ("cohere", "logit_scale"), ("qwen2_bias", "lm_head bias")],
)
def test_all_honours_head_transforms_like_trl(tmp_path, config, scale_name):
    """A soft-capped (Gemma 2), scaled (Cohere) or biased head: `all` still equals TRL's loss and gradients."""
    tokenizer = left_tokenizer()
    vocab = len(tokenizer)
    if config == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        def build(seed, width):
            torch.manual_seed(seed)
            cfg = Gemma2Config(
                vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
            )  # fmt: skip
            return Gemma2ForCausalLM(cfg)
    elif config == "cohere":
        from transformers import CohereConfig, CohereForCausalLM

        def build(seed, width):
            torch.manual_seed(seed)
            cfg = CohereConfig(
                vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, logit_scale=0.5,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
            )  # fmt: skip
            return CohereForCausalLM(cfg)
    else:

        def build(seed, width):
            model = make_model(tokenizer, width, 1, seed=seed)
            model.config.tie_word_embeddings = False
            head = torch.nn.Linear(width, vocab, bias=True)
            torch.nn.init.normal_(head.bias, std=0.5)
            model.lm_head = head
            return model

    student = build(1, 32)
    teacher = build(2, 32)
    ref = make(tmp_path / "ref", DistillationTrainer, DistillationConfig, copy.deepcopy(student), teacher)
    tip = make(tmp_path / "tip", student=student, teacher=teacher, token_selection="all")
    inputs = batch_inputs(vocab, seed=3)
    assert_same(*loss_and_grads(tip, inputs), *loss_and_grads(ref, inputs))


def test_budgeted_rule_is_the_mean_over_kept_tokens_of_trl_loss(tmp_path):
    """A budgeted rule's loss is TRL's per-token loss averaged over the kept tokens (one micro-batch per step)."""
    student = make_model(left_tokenizer(), 32, 1, seed=1)
    tip = make(tmp_path, student=student, token_selection="entropy_topk", keep_ratio=0.5, beta=1.0)
    recorder = RecordSelections()
    tip.tip_engine.add_observer(recorder)
    inputs = batch_inputs(len(left_tokenizer()), seed=4)
    loss, _ = loss_and_grads(tip, inputs)
    record = recorder.records[-1]
    kept = record.kept
    assert 0 < int(kept.sum()) < len(kept)
    expected = record.signals.loss[kept].sum() / kept.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_two_halves_equal_one_batch_for_all(tmp_path):
    student = make_model(left_tokenizer(), 32, 1, seed=1)
    tip = make(tmp_path, student=student, token_selection="all")
    inputs = batch_inputs(len(left_tokenizer()), seed=5, rows=4)
    full_loss, full_grads = loss_and_grads(tip, inputs)
    total = inputs["num_items_in_batch"]
    model = tip.model
    model.zero_grad()
    summed = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        half = {k: (v[rows] if k != "num_items_in_batch" else total) for k, v in inputs.items()}
        loss = tip.compute_loss(model, half)
        loss.backward()
        summed = summed + loss.detach()
    torch.testing.assert_close(summed, full_loss, rtol=1e-5, atol=1e-7)
    for name, grad in full_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-7)


class Recording:
    """Mixin recording the inputs `_compute_loss` receives (before anything of ours runs)."""

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        self.seen.append(({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}, num_items_in_batch))
        return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)


class RecordingTRL(Recording, DistillationTrainer):
    pass


class RecordingTIP(Recording, TIPDistillationTrainer):
    pass


def test_compute_loss_receives_exactly_what_trl_compute_loss_receives(tmp_path):
    """Same seed, same models: TRL's generation, buffering and counting feed our override the same tensors."""
    student = make_model(left_tokenizer(), 32, 1, seed=1)
    runs = []
    for cls, config_cls, extra in (
        (RecordingTRL, DistillationConfig, {}),
        (RecordingTIP, TIPDistillationConfig, {"token_selection": "entropy_sample"}),
    ):
        trainer = make(
            tmp_path / cls.__name__, cls, config_cls, copy.deepcopy(student), max_steps=2, learning_rate=0.0, **extra
        )
        trainer.seen = []
        trainer.train()
        runs.append(trainer.seen)
    assert len(runs[0]) == len(runs[1]) == 2
    for (ref_inputs, ref_n), (tip_inputs, tip_n) in zip(*runs):
        assert ref_inputs.keys() == tip_inputs.keys()
        for key in ref_inputs:
            assert torch.equal(ref_inputs[key], tip_inputs[key]), key
        assert torch.equal(torch.as_tensor(ref_n), torch.as_tensor(tip_n))


def test_only_the_loss_bookkeeping_and_one_generation_turn_are_overridden():
    """vLLM generation, tool calling, data loading, buffering and `compute_loss` itself stay TRL's
    (`_generate_and_score_completions` is TRL's, only followed by counting the step's rollouts); the fast path
    replaces only TRL's transformers `generate` turn (`_generate_single_turn`, see tests/test_fast_generation.py)."""
    ours = {
        name
        for klass in TIPDistillationTrainer.__mro__
        if klass.__module__.startswith("trl_tip")
        for name in vars(klass)
        if callable(vars(klass)[name]) and name in dir(DistillationTrainer)
    }
    assert ours == {
        "__init__",
        "_compute_loss",
        "_generate_and_score_completions",
        "_generate_single_turn",
        "log",
        "evaluate",
        "train",
        "add_callback",
        "_save_checkpoint",
        "create_model_card",  # credits TIP, ssToken and GKD's paper each for its part (test_model_card.py)
    }


def test_default_path_generation_leaves_no_extra_hooks_on_the_student(tmp_path):
    """TRL's transformers generation turn re-enables gradient checkpointing after each `generate`, which registers one
    more input-embedding hook (transformers' `enable_input_require_grads`) that disabling it never removes: with TRL's
    `DistillationTrainer` every forward of step `n`, decode forwards included, calls `n` identical hooks. On the
    default path (`fast_generation=False`) TIPDistillationTrainer runs TRL's turn without that leak: every generation
    and every step sees the one hook the student needs."""
    counts = {}
    for name, cls, config_cls in (
        ("trl", DistillationTrainer, DistillationConfig),
        ("tip", TIPDistillationTrainer, TIPDistillationConfig),
    ):
        tip = {"fast_generation": False} if name == "tip" else {}
        trainer = make(tmp_path / name, cls, config_cls, gradient_checkpointing=True, max_steps=4, **tip)
        student = trainer.model
        hooks = forward_hooks(student.get_input_embeddings())
        seen, generate = [], student.generate

        def recording(*args, _seen=seen, _hooks=hooks, _generate=generate, **kwargs):
            _seen.append(len(_hooks))
            return _generate(*args, **kwargs)

        student.generate = recording
        before = len(hooks)
        trainer.train()
        counts[name] = (before, seen, len(hooks))
    # `Trainer.train` enables gradient checkpointing, which registers the one hook the student needs.
    before, seen, after = counts["tip"]
    assert before == 0 and seen == [1] * 4 and after == 1
    # TRL's own trainer leaks one hook per generation (if transformers or TRL stop doing so, the workaround in
    # `DistillationFastGeneration._generate_single_turn` can go).
    trl_before, trl_seen, trl_after = counts["trl"]
    assert trl_before == 0 and trl_seen == [1, 2, 3, 4] and trl_after == 5


@pytest.mark.parametrize(
    "rule, options",
    [
        ("all", {}),
        ("random", {"keep_ratio": 0.5}),
        ("entropy_topk", {"keep_ratio": 0.5}),
        ("entropy_sample", {"keep_ratio": 0.3}),
        ("quadrants", {"quadrants": ["Q1", "Q3"]}),
        ("sstoken", {"sstoken_history": "fixed"}),
    ],
)
def test_each_rule_family_trains_and_logs(tmp_path, rule, options):
    trainer = make(tmp_path, token_selection=rule, max_steps=2, **options)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert set(metric_names()) <= set(log)
        assert math.isfinite(log["loss"]) and "entropy" in log  # TRL's own metrics are still there
        fracs = sum(log[f"tip/q{q}/frac"] for q in range(1, 5))
        assert fracs == pytest.approx(1.0, abs=1e-6)
    if rule == "sstoken":
        assert "sstoken/attn_mean" in logs[-1]


def test_resume_continues_with_the_same_selection_state(tmp_path):
    """A run stopped at a checkpoint and resumed logs what the uninterrupted run logs."""
    student = make_model(left_tokenizer(), 32, 1, seed=1)
    teacher = make_model(left_tokenizer(), 48, 1, seed=2)
    common = dict(token_selection="entropy_sample", max_steps=4, logging_steps=2, save_strategy="steps", save_steps=2)
    full = make(tmp_path / "full", student=copy.deepcopy(student), teacher=teacher, **common)
    full.train()
    first = make(tmp_path / "part", student=copy.deepcopy(student), teacher=teacher, **common)
    first.train()
    resumed = make(tmp_path / "part", student=copy.deepcopy(student), teacher=teacher, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))

    def tip_logs(trainer):
        return [
            {k: v for k, v in log.items() if k.startswith("tip/")}
            for log in trainer.state.log_history
            if "loss" in log
        ]

    assert tip_logs(resumed)[-1] == pytest.approx(tip_logs(full)[-1])
    assert (tmp_path / "part" / "checkpoint-2" / "tip_state_rank0.pt").is_file()


def test_rejects_a_plain_distillation_config(tmp_path):
    with pytest.raises(TypeError, match="TIPDistillationConfig"):
        TIPDistillationTrainer(
            model=make_model(left_tokenizer(), 32, 1),
            teacher_model=make_model(left_tokenizer(), 32, 1),
            args=dist_args(tmp_path, DistillationConfig),
            train_dataset=prompt_dataset(),
            processing_class=left_tokenizer(),
        )


def test_config_carries_distillation_and_selection_options(tmp_path):
    config = dist_args(tmp_path, token_selection="quadrants", quadrants=["q3"], beta=0.2, max_completion_length=9)
    assert isinstance(config, DistillationConfig)
    assert (config.quadrants, config.beta, config.max_completion_length) == (["Q3"], 0.2, 9)
    with pytest.raises(ValueError, match="keep_ratio is not used by token_selection='all'"):
        dist_args(tmp_path, token_selection="all", keep_ratio=0.5)
    with pytest.raises(ValueError, match="beta must be in"):
        dist_args(tmp_path, beta=1.5)


def test_rejects_an_empty_dataset_at_construction(tmp_path):
    with pytest.raises(ValueError, match="train_dataset"):
        TIPDistillationTrainer(
            model=make_model(left_tokenizer(), 32, 1),
            teacher_model=make_model(left_tokenizer(), 32, 1),
            args=dist_args(tmp_path),
            train_dataset=prompt_dataset().select([]),
            processing_class=left_tokenizer(),
        )


def test_evaluation_loss_divides_by_num_items_in_batch_like_trl(tmp_path):
    """In evaluation TRL's `_compute_loss` divides by the `num_items_in_batch` it is given (the local mean without
    one); with `all`, TIPDistillationTrainer's evaluation loss is TRL's in both cases, through the same denominator
    code as training and as TIPTrainer."""
    student = make_model(left_tokenizer(), 32, 1, seed=1)
    ref = make(tmp_path / "ref", DistillationTrainer, DistillationConfig, copy.deepcopy(student), beta=0.5)
    tip = make(tmp_path / "tip", student=student, teacher=ref.teacher_model, token_selection="all", beta=0.5)
    inputs = batch_inputs(len(left_tokenizer()), seed=6)
    count = inputs.pop("num_items_in_batch")
    losses = []
    for trainer in (ref, tip):
        trainer.model.eval()
        with torch.no_grad():
            losses.append(
                [
                    trainer.compute_loss(trainer.model, dict(inputs)),
                    trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=count),
                    trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=count * 2),
                ]
            )
    for ours, theirs in zip(losses[1], losses[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses[1][2], losses[1][0] / 2, rtol=1e-5, atol=1e-7)


def test_evaluate_all_equals_distillation_trainer(tmp_path):
    student = make_model(left_tokenizer(), 32, 1, seed=1)
    metrics = []
    for cls, config_cls, extra in (
        (DistillationTrainer, DistillationConfig, {}),
        (TIPDistillationTrainer, TIPDistillationConfig, {"token_selection": "all"}),
    ):
        tokenizer = left_tokenizer()
        trainer = cls(
            model=copy.deepcopy(student),
            teacher_model=make_model(tokenizer, 48, 1, seed=2),
            args=dist_args(tmp_path / cls.__name__, config_cls, per_device_eval_batch_size=3, **extra),
            train_dataset=prompt_dataset(),
            eval_dataset=prompt_dataset(7, seed=3),
            processing_class=tokenizer,
        )
        metrics.append(trainer.evaluate())
    assert metrics[1]["eval_loss"] == pytest.approx(metrics[0]["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("trainer_name", ["distillation", "gkd"])
def test_args_none_builds_the_default_config_like_trl(tmp_path, monkeypatch, trainer_name):
    """`args=None` raised; TRL's trainers build their config with every default and `output_dir` named after the
    model (`DistillationTrainer`: "{model}-Distillation"). Ours build theirs: every TRL default unchanged."""
    from trl_tip import TIPConfig, TIPTrainer
    from trl_tip._compat import GKDConfig
    from trl_tip.toy import arithmetic_dataset, make_tokenizer

    # TRL's configs default to bf16, which TrainingArguments refuses on a CPU without use_cpu: validate as on a GPU.
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    tokenizer = left_tokenizer() if trainer_name == "distillation" else make_tokenizer()

    def student():
        model = make_model(tokenizer, 32, 1, seed=1)
        model.config.name_or_path = "org/tiny-student"
        return model

    teacher = make_model(tokenizer, 48, 1, seed=2)
    if trainer_name == "distillation":
        data = prompt_dataset()
        ours = TIPDistillationTrainer(
            model=student(), teacher_model=teacher, train_dataset=data, processing_class=tokenizer
        )
        trl = DistillationTrainer(
            model=student(), teacher_model=teacher, train_dataset=data, processing_class=tokenizer
        )
        assert type(ours.args) is TIPDistillationConfig and ours.args.output_dir == "tiny-student-TIPDistillation"
        assert trl.args.output_dir == "tiny-student-Distillation"
        reference = trl.args.to_dict()
    else:  # GKDTrainer itself fails on args=None (TRL 1.16 sets args.remove_unused_columns first): GKDConfig's defaults
        ours = TIPTrainer(
            model=student(), teacher_model=teacher, train_dataset=arithmetic_dataset(8), processing_class=tokenizer
        )
        assert type(ours.args) is TIPConfig and ours.args.output_dir == "tiny-student-TIP"
        reference = GKDConfig(output_dir="tiny-student-TIP", remove_unused_columns=False).to_dict()
        reference["dataset_kwargs"] = {"skip_prepare_dataset": True}  # what GKDTrainer sets on any config
    ours_dict = ours.args.to_dict()
    differing = {k for k in reference if k != "output_dir" and reference[k] != ours_dict[k]}
    assert differing == set()
    assert ours.args.token_selection == "entropy_sample"  # TIPArguments' own default
