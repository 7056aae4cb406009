"""The quality study of issue 16 (benchmarks/quality/study.py): the branching word-problem task, its tokenizer and
checker, the rule table, and the whole flow (prepare, sweep, run with the chosen lr, merge, doc tables) on CPU."""

import importlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch


QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
DOC = QUALITY.parents[1] / "docs" / "quality.md"


@pytest.fixture(scope="module")
def study():
    # The spawned workers import the script by name, so it is imported as `study` from a path they inherit.
    sys.path.insert(0, str(QUALITY))
    try:
        yield importlib.import_module("study")
    finally:
        sys.path.remove(str(QUALITY))


@pytest.fixture(scope="module")
def words(study):
    return importlib.import_module("task_words")


@pytest.fixture(scope="module")
def tokenizer(words):
    return words.train_tokenizer()


def test_tokenizer_is_a_subword_bpe_of_1k_tokens_that_round_trips(words, tokenizer):
    assert len(tokenizer) >= 1000
    assert words.train_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic
    train, test = words.make_splits(200, 50, seed=3)
    for row in list(train) + list(test):
        for message in row["messages"]:
            ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == message["content"]
    pieces = tokenizer.convert_ids_to_tokens(
        tokenizer("Olivia buys 128 pencils.", add_special_tokens=False)["input_ids"]
    )
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == ["1", "2", "8"]  # one token per digit
    assert any(len(p.strip("Ġ")) > 3 for p in pieces)  # words are subwords, not characters
    text = tokenizer.apply_chat_template(train[0]["messages"], tokenize=False)
    assert text.startswith("<|user|>") and text.endswith("<|end|>")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.convert_ids_to_tokens(ids[0]) == "<|user|>"


def test_checker_accepts_every_valid_order_and_rejects_wrong_answers(words):
    problem = ((3, 8), (1, 17), (2, 5))  # 3 boxes of 8, 17, 2 bags of 5: 24 + 17 + 10 = 51
    solutions = words.valid_solutions(problem)
    assert len(solutions) == 2 * 2 * 2 * 6  # notation (* or x) × separator × 2 group orders × 3! sum orders
    assert "3*8=24. 2*5=10. 24+17=41. 41+10=51. Answer: 51" in solutions
    assert "2x5=10, 3x8=24, 10+24=34, 34+17=51, Answer: 51" in solutions
    for text in solutions:
        assert words.is_correct(text, "51") and words.steps_are_valid(text, problem), text
    rng = random.Random(0)
    assert {words.render_solution(problem, rng) for _ in range(400)} == set(solutions)  # all drawn, nothing else
    wrong = [
        "3*8=24. 2*5=10. 24+17=41. 41+10=52. Answer: 52",  # wrong sum
        "3*8=24. 2*5=10. 24+17=41. 41+10=51. Answer: 5",  # wrong answer
        "3*8=24. 2*5=10. 24+17=41. 41+10=51.",  # no answer
        "",
    ]
    for text in wrong:
        assert not words.is_correct(text, "51") and not words.steps_are_valid(text, problem), text
    # The score reads the final answer only; the step checker also catches a right answer reached by wrong steps.
    lucky = "3*8=25. 2*5=10. 25+17=41. 41+10=51. Answer: 51"
    assert words.is_correct(lucky, "51") and not words.steps_are_valid(lucky, problem)
    skipped = "3*8=24. 24+17=41. 41+10=51. Answer: 51"  # the group 2*5 never worked out
    assert not words.steps_are_valid(skipped, problem)
    assert words.answer_of("... Answer: 51<|end|>") == "51" and words.answer_of("Answer: x") is None


def test_splits_are_disjoint_and_their_answers_right(words):
    train, test, dev = words.make_splits(500, 100, seed=1234, n_dev=50)
    key = lambda row: tuple(map(tuple, row["terms"]))  # noqa: E731
    train_keys = {key(r) for r in train}
    assert not train_keys & {key(r) for r in test} and not train_keys & {key(r) for r in dev}
    assert not {key(r) for r in test} & {key(r) for r in dev}
    for row in list(train) + list(test):
        problem = key(row)
        assert row["answer"] == str(sum(k * m for k, m in problem))
        assert words.steps_are_valid(row["messages"][1]["content"], problem)
    assert words.make_splits(500, 100, seed=1234, n_dev=50)[1]["messages"] == test["messages"]


@pytest.mark.parametrize("name", ["addition", "words"])
def test_reference_completions_decode_to_their_answer(study, name):
    """What `evaluate` does to generated ids (cut at the end token, decode, check) scores the training data's own
    completions as correct, and a changed answer as wrong. (The addition task once joined the byte-level tokens, so
    ` =632` came out as `Ġ=632` and every model scored 0.0.)"""
    task = study.TASKS[name]
    tokenizer = task.new_tokenizer()
    train, _, _ = task.splits(20, 4, 4)
    prompts = study.prompts_of(tokenizer, train)
    for row, prompt in zip(train, prompts, strict=True):
        full = tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False)
        ids = full["input_ids"][len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) :]
        text = task.decode(tokenizer, ids + [tokenizer.pad_token_id] * 3)  # generation pads after the end token
        assert text == row["messages"][1]["content"]
        assert task.is_correct(text, row["answer"])
        assert not task.is_correct(text, str(int(row["answer"]) + 1))


def test_token_classes(study, tokenizer):
    words_task, addition = study.TASKS["words"], study.TASKS["addition"]
    text = "3*8=24, 24+17=41. Answer: 41"
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]) + ["<|end|>"]
    classes = words_task.token_classes(pieces)
    assert classes[:6] == ["operand", "operator", "operand", "operator", "result", "result"]
    assert classes[-3:] == ["answer", "answer", "end"] and "word" in classes and "separator" in classes
    chars = list("7+5+0=12 =632") + ["<|end|>"]
    assert addition.token_classes(chars) == [
        "operand", "operator", "operand", "operator", "operand", "operator", "result", "result", "separator",
        "operator", "answer", "answer", "answer", "end",
    ]  # fmt: skip


def _rule_names():
    sys.path.insert(0, str(QUALITY))
    try:
        return [r.name for r in importlib.import_module("study").RULES]
    finally:
        sys.path.remove(str(QUALITY))


@pytest.mark.parametrize("name", _rule_names())
def test_every_rule_of_the_table_selects_or_is_skipped_with_its_reason(study, name):
    """Each row builds its selector from its TIPConfig and selects on a batch of signals; a row whose rule is not in
    this trl-tip yet (the paper's rules land on another branch) is skipped, saying why, never run as something else."""
    rule = next(r for r in study.RULES if r.name == name)
    reason = rule.unavailable()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    if rule.trainer == "gkd":
        return  # TRL's GKDTrainer: no selector; it runs end to end in the smoke test
    from trl_tip import RandomTokens, TIPConfig, TokenSelectionEngine, TokenSignals, Union, build_selector

    args = TIPConfig(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to="none",
                     token_selection=rule.selection, divergence="reverse_kl", **rule.config_fields(10))  # fmt: skip
    selector = build_selector(args)
    if rule.mix_random:
        selector = Union(selector, RandomTokens(rule.mix_random))
    g = torch.Generator().manual_seed(0)
    n, rows = 60, 4
    signals = TokenSignals(
        entropy=torch.rand(n, generator=g),
        divergence=torch.rand(n, generator=g),
        loss=torch.rand(n, generator=g),
        student_log_prob=-torch.rand(n, generator=g),
        teacher_log_prob=-torch.rand(n, generator=g),
        teacher_entropy=torch.rand(n, generator=g),
        finite=torch.ones(n, dtype=torch.bool),
        seq_idx=torch.arange(n) // (n // rows),
        pos_idx=torch.arange(n) % (n // rows),
    )
    extras = {key: torch.rand(n, generator=g) for key in getattr(selector, "requires", ())}
    engine = TokenSelectionEngine(selector, args, beta=1.0, seed=0)
    weights, _, _ = engine.select(signals, extras, global_step=5)
    kept = int((weights > 0).sum())
    assert 0 < kept <= n
    if "keep_ratio" in rule.fields and not rule.mix_random and rule.selection != "sstoken":
        assert abs(kept / n - rule.fields["keep_ratio"]) <= 2 / n + 1e-9


@pytest.mark.slow
def test_smoke_prepare_sweep_run_merge(study, tmp_path):
    """The whole flow with tiny models on CPU: an archive of both tasks, a sweep, runs at the sweep's best lr with a
    rule mixed with random tokens, the merged tables, the plots, resuming, and refusals."""
    rules = ["GKD (all tokens)", "TIP all", "entropy 0.5", "quadrants Q3", "ssToken (paper)",
             "quadrants Q3 + random 0.1"]  # fmt: skip
    merged = study.main(["smoke", "--out", str(tmp_path), "--rules", *rules])
    archive = tmp_path / "archive"
    assert (archive / study.ARCHIVE_NAME).stat().st_size > 0
    bounds = json.loads((archive / "bounds.json").read_text())["bounds"]
    assert set(bounds) == {"addition", "words"}
    assert set(bounds["words"]) == {"teacher", "weak", "strong"} and bounds["words"]["weak"]["k"] == 2
    sweep = json.loads((tmp_path / "sweep" / "quality.json").read_text())
    main_run = json.loads((tmp_path / "main" / "quality.json").read_text())
    assert {r["lr"] for r in sweep["results"]} == {1e-4, 1e-3}
    chosen = main_run["lr_choice"]["words/weak/1"]
    best = max(sweep["results"], key=lambda r: (r["accuracy"], -r["lr"]))["lr"]
    assert chosen == best and {r["lr"] for r in main_run["results"]} == {chosen}
    assert main_run["bounds"] == bounds and not main_run["errors"]
    by_rule = {r["rule"]: r for r in main_run["results"]}
    assert set(by_rule) == set(rules)
    for r in main_run["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["mean_at_k"] <= 1.0 and r["k"] == 2
        assert r["tokens_kept"] > 0 and len(r["samples"]) == study.SAMPLES and r["loss_curve"]
    assert by_rule["GKD (all tokens)"]["kept_share"] == 1.0 and "kept_by_class" not in by_rule["GKD (all tokens)"]
    tip = by_rule["TIP all"]
    assert tip["kept_share"] == 1.0 and set(tip["kept_by_class"].values()) == {1.0}
    assert abs(sum(tip["start_quadrants"][q] for q in ("Q1", "Q2", "Q3", "Q4")) - 1.0) < 1e-9
    assert abs(sum(tip["class_share"].values()) - 1.0) < 1e-3  # rounded to 4 decimals
    window = tip["window_curve"][0]
    assert 0.0 < window["teacher_p_kept"] <= 1.0 and window["teacher_p_dropped"] is None  # nothing dropped
    assert 0.0 < by_rule["entropy 0.5"]["kept_share"] < 1.0
    assert by_rule["entropy 0.5"]["window_curve"][0]["teacher_p_dropped"] is not None
    mixed, q3 = by_rule["quadrants Q3 + random 0.1"], by_rule["quadrants Q3"]
    assert main_run["rules"]["quadrants Q3 + random 0.1"]["mix_random"] == 0.1 and mixed["kept_share"] > 0
    table = (tmp_path / "merged" / "quality.md").read_text()
    assert "| quadrants Q3 + random 0.1 |" in table and "Paper: Q4 40–47%" in table and "| TIP all |" in table
    assert q3["kept_share"] < 1.0 and (tmp_path / "merged" / "quality_words_weak.png").stat().st_size > 0
    assert len(merged["results"]) == len(sweep["results"]) + len(main_run["results"])

    # Resuming: nothing left to run when every run is already done.
    again = study.main(["run", "--archive", str(archive / study.ARCHIVE_NAME), "--out", str(tmp_path / "again"),
                        "--tasks", "words", "--n_test", "8", "--eval_k", "2", "--steps", "2", "--batch", "4",
                        "--logging_steps", "1", "--cpu", "--students", "weak", "--seeds", "0", "--rules", *rules,
                        "--lr_from", str(tmp_path / "sweep"), "--done", str(tmp_path / "main"), "--json_only"])  # fmt: skip
    assert again["results"] == [] and again["errors"] == []
    with pytest.raises(ValueError, match="already in an earlier folder"):
        study.main(["merge", str(tmp_path / "main"), str(tmp_path / "main"), "--out", str(tmp_path / "m2")])

    # The doc mechanism: a doc quoting the merged tables under a marker passes; a changed number fails.
    rel = tmp_path.relative_to(tmp_path.parent)
    marker = f"<!-- study-tables: {rel}/main --bounds {rel}/archive/bounds.json -->"
    record = study.main(["merge", str(tmp_path / "main"), "--out", str(tmp_path / "m3"), "--bounds",
                         str(archive / "bounds.json"), "--no_plots", "--quiet"])  # fmt: skip
    tables = "\n\n".join(study.group_tables(record["results"], record["bounds"]).values())
    doc = tmp_path / "docs" / "doc.md"
    doc.parent.mkdir()
    doc.write_text(f"# Results\n\n{marker}\n\n{tables}\n")
    assert study.check_doc(doc, root=tmp_path.parent) == (1, [])
    row = next(line for line in tables.splitlines() if line.startswith("| TIP all |"))
    doc.write_text(doc.read_text().replace(row, row.replace("| 1.00", "| 0.99")))
    markers, missing = study.check_doc(doc, root=tmp_path.parent)
    assert markers == 1 and missing == [row]


@pytest.mark.slow
def test_parallel_jobs_run_and_record_like_one_process(study, tmp_path):
    common = ["--archive", "", "--tasks", "words", "--n_test", "4", "--eval_k", "0", "--steps", "1", "--batch", "2",
              "--logging_steps", "1", "--cpu", "--students", "weak", "--seeds", "0", "--json_only", "--rules",
              "TIP all", "random 0.5"]  # fmt: skip
    study.main(["prepare", "--out", str(tmp_path / "a"), "--tasks", "words", "--n_train", "50", "--n_test", "4",
                "--n_dev", "4", "--teacher_steps", "1", "--student_steps", "1", "--teacher_size", "words=32x1",
                "--student_size", "words=32x1", "--sft_batch", "4", "--eval_k", "0", "--weak_target", "0",
                "--strong_target", "0.5", "--cpu"])  # fmt: skip
    common[1] = str(tmp_path / "a" / study.ARCHIVE_NAME)
    serial = study.main(["run", *common, "--out", str(tmp_path / "serial")])
    # A run that fails (here: a mix share out of range) is recorded as an error; the others go on.
    broken = ["--add_rule", "broken", "random", '{"keep_ratio": 0.5, "mix_random": 2.0}']
    parallel = study.main(["run", *common, "broken", *broken, "--out", str(tmp_path / "parallel"), "--jobs", "2"])
    assert (
        [r["rule"] for r in parallel["results"]] == [r["rule"] for r in serial["results"]] == ["TIP all", "random 0.5"]
    )
    for a, b in zip(serial["results"], parallel["results"], strict=True):
        assert a["tokens_kept"] == b["tokens_kept"] and a["samples"] == b["samples"]
    (error,) = parallel["errors"]
    assert error["rule"] == "broken" and "keep_ratio" in error["error"]
    saved = json.loads((tmp_path / "parallel" / "quality.json").read_text())
    assert len(saved["results"]) == 2 and saved["errors"][0]["rule"] == "broken"


def test_bad_options_are_refused(study, capsys):
    for argv, message in [
        (["run", "--archive", "x", "--out", "y", "--rules", "nope"], "unknown"),
        (["run", "--archive", "x", "--out", "y", "--jobs", "0"], "--jobs must be at least 1"),
        (["run", "--archive", "x", "--out", "y", "--steps", "7"], "multiple of --logging_steps"),
        (["run", "--archive", "x", "--out", "y", "--add_rule", "TIP all", "random", "{}"], "must differ"),
        (["run", "--archive", "x", "--out", "y", "--add_rule", "z", "random", "[1]"], "JSON must be an object"),
        (["prepare", "--out", "y", "--teacher_size", "nope=1x1"], "task must be one of"),
        (["prepare", "--out", "y", "--weak_target", "0.9"], "must be below --strong_target"),
    ]:
        with pytest.raises(SystemExit):
            study.parse(argv)
        assert message in capsys.readouterr().err, argv


def test_docs_quote_the_tables_their_markers_name(study):
    """docs/quality.md: every table under a `study-tables` marker is what `merge` rebuilds from the committed JSON."""
    markers, missing = study.check_doc(DOC)
    assert markers >= 4  # beta 1 (weak and strong student), beta 0.5 and the learning-rate sweep
    assert missing == []


def test_diagnostics_on_a_hand_made_batch(study, tokenizer):
    """Teacher probability of kept and dropped tokens, broken rollouts, kept share by class and the first batch's
    quadrant shares, against values worked out by hand."""
    from trl_tip import SelectionRecord, TokenSignals

    text = tokenizer("<|assistant|>3*8=24", add_special_tokens=False)["input_ids"]  # 1 prompt token + 6 completion
    ids = torch.tensor([text, text])
    labels = ids.clone()
    labels[:, 0] = -100
    n = 12  # 6 positions per row; position p of the shifted sequence predicts token p + 1
    teacher_p = torch.tensor([0.9, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.01, 0.9, 0.9, 0.9, 0.5])  # row 1 is broken
    kept = torch.tensor([1, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 0], dtype=torch.float)
    quadrant = torch.tensor([1, 2, 3, 4, 4, 4, 1, 3, 3, 4, 2, 2])
    signals = TokenSignals(
        entropy=torch.linspace(0, 1, n), divergence=torch.linspace(1, 0, n), loss=torch.ones(n),
        student_log_prob=torch.zeros(n), teacher_log_prob=teacher_p.log(), teacher_entropy=torch.zeros(n),
        finite=torch.ones(n, dtype=torch.bool), seq_idx=torch.arange(n) // 6, pos_idx=torch.arange(n) % 6,
    )  # fmt: skip
    record = SelectionRecord(global_step=0, micro_step=0, training=True, signals=signals, quadrant=quadrant,
                             weights=kept, entropy_threshold=0.5, divergence_threshold=0.25, loss=torch.tensor(0.0),
                             input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)  # fmt: skip
    diagnostics = study.Diagnostics(study.TASKS["words"], tokenizer, window=1, broken_prob=0.05)
    diagnostics.on_selection(record, engine=None)
    result = diagnostics.result()
    (window,) = result["window_curve"]
    # (values are stored to 4 decimals)
    assert window["teacher_p_kept"] == pytest.approx((0.9 + 0.9 + 0.9 + 0.9 + 0.01) / 5, abs=5e-5)
    assert window["teacher_p_dropped"] == pytest.approx((0.8 + 0.9 + 0.9 + 0.9 + 0.9 + 0.9 + 0.5) / 7, abs=5e-5)
    # Row 1 breaks at its position 1: its positions 2-5 (none of them kept) come after the break.
    assert window["broken_rollouts"] == 0.5 and window["after_break_share_all"] == pytest.approx(4 / 12, abs=5e-5)
    assert window["after_break_share_kept"] == 0.0
    assert result["start_quadrants"]["Q1"] == 2 / 12 and result["start_quadrants"]["Q4"] == 4 / 12
    assert result["kept_by_position"] == {0: 1.0, 1: 0.5, 2: 0.5, 3: 0.0, 4: 0.5, 5: 0.0}  # exact in 4 decimals
    # Completion tokens `3 * 8 = 2 4`: operand, operator, operand, operator, result, result.
    assert result["kept_by_class"] == {"operand": 0.75, "operator": 0.25, "result": 0.25}
