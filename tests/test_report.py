"""`trl-tip report`, the token dump callback and the HTML page of tokens."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest

from trl_tip.cli import main as cli_main
from trl_tip.report import (
    FIGURES,
    NotATIPRunError,
    find_trainer_state,
    load_tip_history,
    load_token_dump,
    render_tokens_html,
    write_report,
)
from trl_tip.stats import metric_names
from trl_tip.token_dump import TOKEN_DUMP_NAME, TokenDumpCallback


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

VOID_ELEMENTS = {"meta", "br", "img", "link", "hr", "input"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKEN_FIELDS = {
    "position",
    "token_id",
    "token",
    "entropy",
    "divergence",
    "loss",
    "student_prob",
    "teacher_prob",
    "weight",
    "kept",
    "quadrant",
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A 4-step demo run (tip rule, keep 0.5) that dumps 3 completions at steps 2 and 4."""
    from trl_tip.demo import run_demo

    output_dir = tmp_path_factory.mktemp("demo")
    trainer = run_demo(
        output_dir=str(output_dir), max_steps=4, teacher_steps=20, dump_tokens_every=2, dump_completions=3
    )
    return output_dir, trainer


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


class _PageParser(HTMLParser):
    """Collects the structure of the tokens page: sections, completions, token spans and their text."""

    def __init__(self):
        super().__init__()
        self.title = ""
        self.steps: list[int] = []
        self.completions: list[dict] = []
        self.stack: list[str] = []
        self._in_title = False
        self._token: dict | None = None
        self._prompt: dict | None = None
        self.legend_tokens = 0
        self._in_legend = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)
        if tag == "title":
            self._in_title = True
        if tag == "section" and "step" in classes:
            self.steps.append(int(attrs["data-step"]))
        if tag == "div" and "legend" in classes:
            self._in_legend = True
        if tag == "div" and "completion" in classes:
            self.completions.append({"step": self.steps[-1], "prompt": "", "tokens": []})
        if tag == "span" and "prompt" in classes:
            self._prompt = self.completions[-1]
        if tag == "span" and "tok" in classes:
            if self._in_legend:
                self.legend_tokens += 1
            else:
                self._token = {"classes": set(classes), "title": attrs.get("title", ""), "text": ""}
                self.completions[-1]["tokens"].append(self._token)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "title":
            self._in_title = False
        if tag == "span":
            self._token = None
            self._prompt = None
        if tag == "div":
            self._in_legend = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._token is not None:
            self._token["text"] += data
        elif self._prompt is not None:
            self._prompt["prompt"] += data


def _parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    return parser


def test_token_dump_writes_jsonl_with_expected_fields(demo_run):
    output_dir, trainer = demo_run
    dump = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TokenDumpCallback))
    assert dump.pending is None  # nothing held after the run
    records = load_token_dump(output_dir / TOKEN_DUMP_NAME)
    assert [r["step"] for r in records] == [2, 2, 2, 4, 4, 4]
    tokenizer = trainer.processing_class
    for record in records:
        assert {"step", "row", "prompt", "entropy_threshold", "divergence_threshold", "tokens"} <= set(record)
        assert record["prompt"].startswith("<|user|>") and record["prompt"].endswith("<|assistant|>")
        assert record["tokens"], "a completion has at least one token"
        positions = [t["position"] for t in record["tokens"]]
        assert positions == list(range(positions[0], positions[0] + len(positions))), "contiguous completion"
        for token in record["tokens"]:
            assert set(token) == TOKEN_FIELDS
            assert token["token"] == tokenizer.decode([token["token_id"]])
            assert 0.0 <= token["entropy"] <= 1.0 and 0.0 <= token["divergence"] <= 1.0
            assert 0.0 <= token["student_prob"] <= 1.0 and 0.0 <= token["teacher_prob"] <= 1.0
            assert token["kept"] == (token["weight"] > 0)
            # The quadrant follows from the thresholds of the micro-batch (high means >= threshold).
            high_h = token["entropy"] >= record["entropy_threshold"]
            high_d = token["divergence"] >= record["divergence_threshold"]
            assert (
                token["quadrant"]
                == {(True, True): 1, (True, False): 2, (False, True): 3, (False, False): 4}[(high_h, high_d)]
            )
            # The type-aware rule never keeps a confident-and-right (Q4) token.
            if token["quadrant"] == 4:
                assert not token["kept"]
    assert any(t["kept"] for r in records for t in r["tokens"])
    assert any(not t["kept"] for r in records for t in r["tokens"])


def test_token_dump_callback_validates_and_needs_a_tip_trainer():
    with pytest.raises(ValueError, match="every_n_steps"):
        TokenDumpCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="max_completions"):
        TokenDumpCallback(max_completions=0)
    with pytest.raises(RuntimeError, match="not bound to a trl-tip trainer"):
        TokenDumpCallback().on_train_begin(None, None, None)


def test_report_writes_figures_and_table(demo_run, capsys):
    output_dir, trainer = demo_run
    out = output_dir / "figures"
    cli_main(["report", str(output_dir), "--output_dir", str(out)])
    printed = capsys.readouterr().out
    last = [log for log in trainer.state.log_history if "tip/kept_frac" in log][-1]
    assert "step 4 (last of 4 logged)" in printed
    for q, name in enumerate(("Q1 high H, high D", "Q2 high H, low D", "Q3 low H, high D", "Q4 low H, low D"), 1):
        line = next(line for line in printed.splitlines() if line.startswith(name))
        assert f"{last[f'tip/q{q}/frac']:.3f}" in line and f"{last[f'tip/q{q}/loss_share']:.3f}" in line
        count = last[f"tip/q{q}/frac"] * last["tip/tokens_eligible"]
        assert line.split()[len(name.split())] == f"{count:.1f}"  # tokens/step: a count, in its own column
    for name in FIGURES.values():
        width, height = _png_size(out / name)
        assert width > 300 and height > 200
        assert str(out / name) in printed
    assert (out / "tokens.html").is_file()


def test_report_reads_a_checkpoint_folder(demo_run, tmp_path):
    output_dir, _ = demo_run
    checkpoint = output_dir / "checkpoint-4"
    assert find_trainer_state(checkpoint) == checkpoint / "trainer_state.json"
    history, _ = load_tip_history(checkpoint)
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    assert set(metric_names()) <= set(history[-1])
    report = write_report(checkpoint, tmp_path)
    # The token dump lives in the run directory, one level above the checkpoint.
    assert report.token_dump == output_dir / TOKEN_DUMP_NAME
    assert set(report.figures) == set(FIGURES)


def test_report_of_a_run_with_only_checkpoints_writes_into_the_run(demo_run, tmp_path):
    """A run whose logs are only in its checkpoints (stopped before the end, or saved by a script without
    `save_state`): the report reads the newest checkpoint's state but goes to RUN/report, with the run's token dump."""
    output_dir, _ = demo_run
    run = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4"):
        (run / name).mkdir(parents=True)
        (run / name / "trainer_state.json").write_bytes(
            (output_dir / "checkpoint-4" / "trainer_state.json").read_bytes()
        )
    (run / TOKEN_DUMP_NAME).write_bytes((output_dir / TOKEN_DUMP_NAME).read_bytes())
    report = write_report(run)
    assert report.trainer_state == run / "checkpoint-4" / "trainer_state.json"
    assert report.html == run / "report" / "tokens.html" and report.token_dump == run / TOKEN_DUMP_NAME
    assert all(path.parent == run / "report" for path in report.figures.values())
    assert not (run / "checkpoint-4" / "report").exists()


def test_report_without_token_dump_draws_only_the_metrics(demo_run, tmp_path):
    output_dir, _ = demo_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_bytes((output_dir / "trainer_state.json").read_bytes())
    report = write_report(run)
    assert set(report.figures) == {"quadrant_share", "kept_share", "quadrant_signals", "loss_share"}
    assert report.html is None and report.token_dump is None
    assert all(path.parent == run / "report" for path in report.figures.values())


def test_report_rejects_a_run_without_tip_metrics(tmp_path, capsys):
    state = {"log_history": [{"loss": 1.0, "step": 1, "learning_rate": 1e-3}, {"train_loss": 1.0, "step": 1}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(NotATIPRunError, match="not a trl-tip run.*learning_rate, loss, step, train_loss"):
        write_report(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("trl-tip report: error: ") and "no `tip/...` metrics" in err
    assert not (tmp_path / "report").exists()


def test_report_errors_on_missing_state(tmp_path):
    with pytest.raises(FileNotFoundError, match="No trainer_state.json"):
        find_trainer_state(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_trainer_state(tmp_path / "nope")
    (tmp_path / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="no `log_history`"):
        load_tip_history(tmp_path)


def _token(text, quadrant, kept, entropy=0.5, divergence=0.5):
    return {
        "position": 0,
        "token_id": 0,
        "token": text,
        "entropy": entropy,
        "divergence": divergence,
        "loss": 0.25,
        "student_prob": 0.5,
        "teacher_prob": 0.25,
        "weight": 1.0 if kept else 0.0,
        "kept": kept,
        "quadrant": quadrant,
    }


def test_tokens_html_structure():
    records = [
        {
            "step": 10,
            "row": 0,
            "prompt": "<|user|>1+1<|end|><|assistant|>",
            "entropy_threshold": 0.4,
            "divergence_threshold": 0.3,
            "tokens": [_token("2", 3, True), _token("<x>", 4, False), _token("\n", 1, True), _token("&", 2, False)],
        },
        {
            "step": 20,
            "row": 1,
            "prompt": "p",
            "entropy_threshold": 0.5,
            "divergence_threshold": 0.2,
            "tokens": [_token("a", 1, False), _token("b", 0, False)],
        },
    ]
    page = render_tokens_html(records, title="run <1>")
    parsed = _parse(page)
    assert parsed.title == "run <1>"
    assert parsed.steps == [10, 20]
    assert parsed.legend_tokens == 5
    assert [c["step"] for c in parsed.completions] == [10, 20]
    first, second = parsed.completions
    assert first["prompt"] == "<|user|>1+1<|end|><|assistant|>"
    assert [t["text"] for t in first["tokens"]] == ["2", "<x>", "↵\n", "&"]
    assert [sorted(t["classes"]) for t in first["tokens"]] == [
        ["kept", "q3", "tok"],
        ["dropped", "q4", "tok"],
        ["kept", "q1", "tok"],
        ["dropped", "q2", "tok"],
    ]
    assert first["tokens"][0]["title"].startswith("Q3, kept (weight 1); H=0.5000 D=0.5000")
    assert [sorted(t["classes"]) for t in second["tokens"]] == [["dropped", "q1", "tok"], ["dropped", "q0", "tok"]]
    assert second["tokens"][1]["title"].startswith("non-finite, dropped")
    assert "Thresholds H &ge; 0.4000, D &ge; 0.3000; 2 of 4 tokens kept" in page
    # Nothing is fetched: no script, no external stylesheet, no image.
    assert "<script" not in page and "<link" not in page and "http" not in page


def test_tokens_html_of_a_real_run_matches_the_dump(demo_run):
    output_dir, _ = demo_run
    records = load_token_dump(output_dir / TOKEN_DUMP_NAME)
    parsed = _parse(render_tokens_html(records, max_steps=1))
    assert parsed.steps == [4]
    shown = [r for r in records if r["step"] == 4]
    assert len(parsed.completions) == len(shown)
    for record, completion in zip(shown, parsed.completions):
        assert completion["prompt"] == record["prompt"]
        assert [t["text"] for t in completion["tokens"]] == [t["token"] for t in record["tokens"]]
        kept = ["kept" in t["classes"] for t in completion["tokens"]]
        assert kept == [t["kept"] for t in record["tokens"]]
        assert all(f"q{t['quadrant']}" in c["classes"] for t, c in zip(record["tokens"], completion["tokens"]))


def test_load_token_dump_rejects_other_json(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="missing divergence_threshold, entropy_threshold, prompt, tokens"):
        load_token_dump(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="is not JSON"):
        load_token_dump(path)


def test_token_dump_added_later_with_gradient_accumulation(tmp_path):
    """`add_callback` binds the callback too; under accumulation the last micro-batch of each dumped step is kept."""
    from conftest import tiny_args

    from trl_tip import TIPTrainer
    from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer

    tokenizer = make_tokenizer()
    args = tiny_args(
        tmp_path, max_steps=2, gradient_accumulation_steps=2, max_new_tokens=4, token_selection="entropy_sample"
    )
    trainer = TIPTrainer(
        model=make_model(tokenizer, 32, 1, seed=1),
        teacher_model=make_model(tokenizer, 32, 1, seed=2),
        args=args,
        train_dataset=arithmetic_dataset(16),
        processing_class=tokenizer,
    )
    callback = TokenDumpCallback(every_n_steps=1, max_completions=2, filename="dump.jsonl")
    trainer.add_callback(callback)
    assert callback.engine is trainer.tip_engine
    trainer.train()
    records = load_token_dump(tmp_path / "dump.jsonl")
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    assert [r["row"] for r in records] == [0, 1, 0, 1]
    assert callback.pending is None


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e6], ids=["one_value", "tiny_range", "huge_range"])
def test_tip_map_tick_labels_are_readable(tmp_path, scale):
    """A short run's entropies 0.9974..0.9978 printed as '0.99740.99760.9978...' (overlapping labels); a range of
    one value, a tiny and a huge one must give distinct tick labels that do not overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    import trl_tip.report as report

    figures = []
    original = report._save
    report._save = lambda figure, path: figures.append(figure) or original(figure, path)
    try:
        if scale == 1.0:
            tokens = [_token("a", 3, True, entropy=0.9976, divergence=0.5), _token("b", 3, False, 0.9976, 0.5)]
        else:
            tokens = [_token(str(i), 1 + i % 4, i % 2 == 0, 0.9974 + i * 1e-5 * scale, i * scale) for i in range(9)]
        record = {"step": 3, "prompt": "p", "entropy_threshold": 0.9976, "divergence_threshold": 0.5, "tokens": tokens}
        report.plot_tip_map([record], tmp_path / "map.png")
    finally:
        report._save = original
    (figure,) = figures
    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    ax = figure.axes[0]
    for axis in (ax.xaxis, ax.yaxis):
        low, high = sorted(axis.get_view_interval())
        labels = [
            t for t in axis.get_ticklabels() if t.get_text() and low <= t.get_position()[axis is ax.yaxis] <= high
        ]
        texts = [t.get_text() for t in labels]
        assert len(labels) >= 2 and len(set(texts)) == len(texts), texts
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]), texts


def test_map_and_page_name_the_same_steps():
    records = [
        {
            "step": s,
            "prompt": "p",
            "entropy_threshold": 0.5,
            "divergence_threshold": 0.5,
            "tokens": [_token("a", 3, True)],
        }
        for s in (5, 10, 15, 20)
    ]
    from trl_tip.report import map_steps

    assert map_steps(records, 3) == [5, 15, 20]
    page = render_tokens_html(records, max_steps=5, map_steps=map_steps(records, 3))
    steps = ", ".join(map(str, map_steps(records, 3)))
    assert "showing steps 5, 10, 15, 20 (every dumped step)" in page
    assert f"The TIP map (tip_map.png) draws steps {steps} (3 of the 4 dumped: 5, 10, 15, 20)" in page
