# ruff: noqa: E402
"""Single-seed diagnostic for docs/quality.md (run from the repo root after run.py has cached runs/quality_cache)."""

import json
import sys

import torch


sys.argv = ["x"]
sys.path.insert(0, "benchmarks/quality")
import run


torch.set_num_threads(1)
cfg = run.parse(
    [
        "--n_test",
        "200",
        "--teacher_hidden",
        "192",
        "--teacher_layers",
        "3",
        "--student_hidden",
        "64",
        "--student_layers",
        "2",
        "--steps",
        "150",
        "--lr",
        "2e-5",
        "--batch",
        "32",
        "--logging_steps",
        "5",
    ]
)
from pathlib import Path


tok = run.make_tokenizer()
train, test = run.make_splits(cfg.n_train, cfg.n_test, seed=1234)
teacher = run.make_model(tok, 192, 3, seed=1)
student = run.make_model(tok, 64, 2, seed=2)
saved = torch.load("runs/quality_cache/pair.pt")
teacher.load_state_dict(saved["teacher"])
student.load_state_dict(saved["student"])
teacher.eval()
student.eval()
[p.requires_grad_(False) for p in teacher.parameters()]
out = []
for rule in [
    ("quadrants Q3 lr 2e-5", "tip", "quadrants", {"quadrants": ["Q3"]}),
    ("sstoken 0.6 lr 2e-5", "tip", "sstoken", {"keep_ratio": 0.6}),
    ("GKD lr 2e-5", "gkd", None, {}),
]:
    r = run.distil(rule, student, teacher, tok, train, test, cfg, 0, Path("/tmp/sstdiag"), True)
    print(r, flush=True)
    out.append(r)
json.dump(out, open("runs/lowlr_diag.json", "w"), indent=1)
