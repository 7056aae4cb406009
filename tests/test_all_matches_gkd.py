"""A budgeted rule takes the two-pass path (signals, selection, loss on the kept tokens): its loss equals the reference
computed by hand (the kept tokens' loss over the rule's planned count), and a data-dependent rule's loss and gradients
equal GKD's on a batch labelled only at the kept tokens, divided by every eligible token. (`all`, the fused path, is
checked against GKD in test_trainer.py.)"""

import torch
from conftest import record_selections

from trl_tip import TIPConfig, TIPTrainer
from trl_tip._compat import GKDConfig, GKDTrainer
from trl_tip.signals import generalized_jsd
from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (3, 12), generator=g)
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[1, 10:] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _trainer(cls, config_cls, tmp_path, **extra):
    tokenizer = make_tokenizer()
    student = make_model(tokenizer, 32, 1, seed=1)
    teacher = make_model(tokenizer, 48, 1, seed=2)
    args = config_cls(
        output_dir=str(tmp_path / cls.__name__),
        use_cpu=True,
        bf16=False,
        report_to="none",
        lmbda=0.0,
        beta=0.3,
        per_device_train_batch_size=3,
        **extra,
    )
    data = arithmetic_dataset(4)
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tokenizer)


def _loss_and_grads(trainer, batch, count=None):
    model = trainer.model
    model.train()
    model.zero_grad()
    if count is None:
        count = (batch["labels"][:, 1:] != -100).sum()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_budgeted_rule_loss_is_the_kept_jsd_over_the_planned_count(tmp_path):
    tip = _trainer(TIPTrainer, TIPConfig, tmp_path, token_selection="entropy_topk", keep_ratio=0.5)
    batch = _batch(len(make_tokenizer()), seed=1)
    recorder = record_selections(tip)
    loss, _ = _loss_and_grads(tip, batch)
    signals, weights = recorder.records[0].signals, recorder.records[0].weights
    assert 0 < int((weights > 0).sum()) < len(signals)
    with torch.no_grad():
        s = tip.model(input_ids=batch["input_ids"]).logits[:, :-1]
        t = tip.teacher_model(input_ids=batch["input_ids"]).logits[:, :-1]
        jsd = generalized_jsd(s[signals.seq_idx, signals.pos_idx], t[signals.seq_idx, signals.pos_idx], 0.3)
    torch.testing.assert_close(signals.loss, jsd, rtol=1e-5, atol=1e-6)
    # entropy_topk per batch plans keep_ratio · N tokens (its quantile cut keeps about that many).
    expected = (jsd * weights).sum() / (0.5 * len(signals))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_budgeted_rule_gradients_equal_gkd_on_the_kept_labels(tmp_path):
    """A rule whose kept share depends on the data trains exactly like GKD on a batch whose labels are only the kept
    tokens, divided by the eligible tokens (the only count known before the forward)."""
    tip = _trainer(TIPTrainer, TIPConfig, tmp_path, token_selection="quadrants", quadrants=["Q3", "Q1"])
    recorder = record_selections(tip)
    batch = _batch(len(make_tokenizer()), seed=2)
    loss_tip, grads_tip = _loss_and_grads(tip, batch)
    signals, weights = recorder.records[-1].signals, recorder.records[-1].weights
    assert 0 < int((weights > 0).sum()) < len(signals)
    masked = dict(batch)
    labels = torch.full_like(batch["labels"], -100)
    kept = weights > 0
    rows, cols = signals.seq_idx[kept], signals.pos_idx[kept] + 1  # shifted position p predicts label p + 1
    labels[rows, cols] = batch["labels"][rows, cols]
    masked["labels"] = labels
    gkd = _trainer(GKDTrainer, GKDConfig, tmp_path)
    gkd.model.load_state_dict(tip.model.state_dict())
    loss_gkd, grads_gkd = _loss_and_grads(gkd, masked, count=(batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_tip, loss_gkd, rtol=1e-5, atol=1e-6)
    assert grads_gkd.keys() == grads_tip.keys()
    for name in grads_gkd:
        torch.testing.assert_close(grads_tip[name], grads_gkd[name], rtol=1e-4, atol=1e-6, msg=name)
