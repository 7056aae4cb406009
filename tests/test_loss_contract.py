"""The loss contract: one denominator per optimizer step, fixed before any forward, so that the same rows split into
1×4, 2×2 or 4×1 micro-batches give the same gradient (fp32, tight tolerance), on both trainers, for every rule family
whose selection does not depend on the split; rollouts of different lengths, some of which keep no token.

Rules whose selection does depend on the split are left out on purpose: quantile quadrant splits, min–max
normalisation over the micro-batch (`tip`, `q3_score`), per-batch budgets and seeded sampling (`random`,
`entropy_sample`, also importance-weighted) decide per micro-batch; their denominator is still split-free.
"""

import copy

import pytest
import torch
from conftest import dist_args, left_tokenizer, prompt_dataset, record_selections, tiny_args

from trl_tip import TIPDistillationTrainer, TIPTrainer
from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer


# Completion lengths of the four rows: with keep_ratio 0.5 per rollout, the two 1-token rollouts keep nothing.
LENGTHS = (1, 8, 1, 5)
SPLITS = ((4,), (2, 2), (1, 1, 1, 1))
FIXED_SPLIT = {"entropy_threshold": 0.5, "divergence_threshold": 0.005}
RULES = [
    ("all", {}),
    ("divergence_topk", {"keep_ratio": 0.5}),
    ("entropy_topk", {"keep_ratio": 0.5, "budget_scope": "rollout"}),
    ("entropy_topk", {"keep_ratio": 0.3, "budget_scope": "rollout", "score_order": "lowest"}),
    ("quadrant_budget", {"keep_ratio": 0.5, "budget_scope": "rollout", **FIXED_SPLIT}),
    ("quadrants", {"quadrants": ["Q1", "Q3"], **FIXED_SPLIT}),
    ("sstoken", {"sstoken_gamma": 0.0, "keep_ratio": 0.4}),
]
RULE_IDS = [f"{rule}-{i}" for i, (rule, _) in enumerate(RULES)]


def _rows(vocab: int, prompt: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    prompt_ids = torch.randint(4, vocab, (len(LENGTHS), prompt), generator=g)
    completion_ids = torch.randint(4, vocab, (len(LENGTHS), width), generator=g)
    completion_mask = torch.zeros_like(completion_ids)
    for row, n in enumerate(LENGTHS):
        completion_mask[row, :n] = 1
    return prompt_ids, completion_ids, completion_mask


def _split(rows: int, sizes) -> list[slice]:
    out, start = [], 0
    for size in sizes:
        out.append(slice(start, start + size))
        start += size
    assert start == rows
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(reference: dict, other: dict, label: str) -> None:
    assert reference.keys() == other.keys() and reference
    for name in reference:
        torch.testing.assert_close(other[name], reference[name], rtol=1e-5, atol=1e-8, msg=f"{label}: {name}")


# ---------------------------------------------------------------------------------------------------- GKD


def _gkd_trainer(tmp_path, rule, options):
    tokenizer = make_tokenizer()
    student = make_model(tokenizer, 32, 1, seed=1)
    teacher = make_model(tokenizer, 48, 1, seed=2)
    args = tiny_args(tmp_path, lmbda=0.0, token_selection=rule, **options)
    return TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=arithmetic_dataset(4),
        processing_class=tokenizer,
    )


def _gkd_micro_batches(vocab: int, sizes) -> list[dict]:
    """GKD's collated rows (prompt + completion, right-padded, `-100` outside the completion), split by `sizes`."""
    prompt_ids, completion_ids, completion_mask = _rows(vocab)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -100))
    labels[:, : prompt_ids.size(1)] = -100
    return [
        {
            "input_ids": input_ids[s],
            "attention_mask": attention_mask[s],
            "labels": labels[s],
            "prompts": prompt_ids[s],
            "prompt_attention_mask": torch.ones_like(prompt_ids[s]),
        }
        for s in _split(len(LENGTHS), sizes)
    ]


def _gkd_step(trainer, sizes):
    """One optimizer step's backward, as `Trainer` runs it: `get_batch_samples` counts, then each micro-batch."""
    model = trainer.model
    model.train()
    model.zero_grad()
    batches, count = trainer.get_batch_samples(iter(_gkd_micro_batches(len(make_tokenizer()), sizes)), 4, "cpu")
    assert int(count) == sum(LENGTHS)
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=count)
        loss.backward()
        total += float(loss.detach())
    return total, _grads(model)


@pytest.mark.parametrize("rule, options", RULES, ids=RULE_IDS)
def test_gkd_gradient_does_not_depend_on_the_micro_batch_split(tmp_path, rule, options):
    trainer = _gkd_trainer(tmp_path, rule, options)
    recorder = record_selections(trainer)
    loss, reference = _gkd_step(trainer, SPLITS[0])
    # One micro-batch: the loss is Σ_kept weight · loss over the rule's planned tokens of the step.
    record = recorder.records[-1]
    lengths = torch.tensor(LENGTHS)
    expected = (record.signals.loss.double() * record.weights.double()).sum() / trainer.tip_engine.loss_denominator(
        lengths
    )
    assert loss == pytest.approx(float(expected), rel=1e-5)
    if rule in ("divergence_topk", "entropy_topk"):
        kept = [int(record.weights[record.signals.seq_idx == row].gt(0).sum()) for row in range(len(LENGTHS))]
        assert kept[0] == kept[2] == 0 and kept[1] > 0  # rollouts of one token keep none
    for sizes in SPLITS[1:]:
        split_loss, grads = _gkd_step(trainer, sizes)
        assert split_loss == pytest.approx(loss, rel=1e-5)
        _assert_same_grads(reference, grads, f"{rule} {sizes}")


# ---------------------------------------------------------------------------------------------------- Distillation


def _dist_trainer(tmp_path, rule, options):
    tokenizer = left_tokenizer()
    student = make_model(tokenizer, 32, 1, seed=1)
    teacher = make_model(tokenizer, 48, 1, seed=2)
    args = dist_args(tmp_path, token_selection=rule, temperature=0.8, **options)
    return TIPDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=prompt_dataset(), processing_class=tokenizer
    )


def _dist_step(trainer, sizes, order):
    """One optimizer step as `DistillationTrainer` runs it: the generated rows (shuffled, in `order`) are counted once,
    then split into micro-batches that each get TRL's `num_items_in_batch`."""
    model = trainer.model
    model.train()
    model.zero_grad()
    prompt_ids, completion_ids, completion_mask = _rows(len(left_tokenizer()))
    prompt_ids, completion_ids, completion_mask = prompt_ids[order], completion_ids[order], completion_mask[order]
    # What our `_generate_and_score_completions` does after TRL's: the step's rows, and its micro-batches.
    trainer._tip_count_step([completion_mask], micro_batches=len(sizes))
    total = 0.0
    for s in _split(len(LENGTHS), sizes):
        inputs = {
            "prompt_ids": prompt_ids[s],
            "prompt_mask": torch.ones_like(prompt_ids[s]),
            "completion_ids": completion_ids[s],
            "completion_mask": completion_mask[s],
            "num_items_in_batch": completion_mask.sum(),
        }
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        total += float(loss.detach())
    return total, _grads(model)


@pytest.mark.parametrize("rule, options", RULES, ids=RULE_IDS)
def test_distillation_gradient_does_not_depend_on_the_micro_batch_split(tmp_path, rule, options):
    trainer = _dist_trainer(tmp_path, rule, options)
    loss, reference = _dist_step(trainer, SPLITS[0], [0, 1, 2, 3])
    for sizes, order in zip(SPLITS[1:], ([2, 0, 3, 1], [3, 2, 1, 0]), strict=True):
        split_loss, grads = _dist_step(trainer, sizes, order)
        assert split_loss == pytest.approx(loss, rel=1e-5)
        _assert_same_grads(reference, grads, f"{rule} {sizes}")


def test_distillation_train_step_records_trl_count_of_the_step(tmp_path):
    """In `train()`, the rollouts recorded after TRL's generation are the ones TRL counts in `num_items_in_batch`."""
    trainer = _dist_trainer(tmp_path, "divergence_topk", {"gradient_accumulation_steps": 2, "max_steps": 1})
    seen = []
    compute_loss = trainer._compute_loss

    def spy(unwrapped, inputs, num_items_in_batch):
        seen.append((float(num_items_in_batch), trainer._tip_step_lengths))
        return compute_loss(unwrapped, inputs, num_items_in_batch)

    trainer._compute_loss = spy
    trainer.train()
    assert len(seen) == 2 and seen[0][1] is seen[1][1]  # counted once for the step's two micro-batches
    step, lengths, micro_batches = seen[0][1]
    assert step == 0 and float(lengths.sum()) == seen[0][0] and micro_batches == 2
    assert len(lengths) == 2 * trainer.args.per_device_train_batch_size


def test_gkd_train_step_gradient_accumulation_equals_one_batch(tmp_path):
    """End to end with `Trainer`'s loop and plain SGD: 1×4 and 2×2 micro-batches make the same parameter update."""
    params = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = _gkd_trainer(
            tmp_path / f"{batch}x{accumulation}",
            "divergence_topk",
            {
                "keep_ratio": 0.3,
                "per_device_train_batch_size": batch,
                "gradient_accumulation_steps": accumulation,
                "max_steps": 1,
                "optim": "sgd",
                "learning_rate": 1.0,
                "max_grad_norm": 0.0,
                "lr_scheduler_type": "constant",
            },
        )
        before = copy.deepcopy(trainer.model.state_dict())
        trainer.train()
        params.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters()})
    assert any(delta.abs().max() > 0 for delta in params[0].values())
    _assert_same_grads(params[0], params[1], "SGD update 4x1 vs 2x2")


@pytest.mark.slow
def test_two_processes_give_the_one_process_gradient(tmp_path):
    """The same rows on 2 gloo processes (two micro-batches of one row each) give the one-process, one-micro-batch
    gradient once DDP averages the processes' gradients: both trainers, every rule above."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).resolve().parent / "split_worker.py"
    root = worker.parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"

    def run(args):
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)

    reference = run([sys.executable, str(worker), "--reference", "--out", str(tmp_path)])
    assert reference.returncode == 0, reference.stdout + reference.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    result = run([*launch, "--master_port", str(port), str(worker), "--out", str(tmp_path)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count(" PASS ") == 2 * 2 * len(RULES) and " FAIL " not in output, output
