"""`trl-tip report RUN_DIR`: the Q1–Q4 picture of a run, as PNG figures, a text table and an HTML page of tokens.

The figures come from the `tip/...` metrics in `trainer_state.json`; the TIP map and the HTML page come from the
per-token dump that [`TokenDumpCallback`] writes (`tip_tokens.jsonl`), when the run has one.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import METRIC_PREFIX, QUADRANT_NAMES, format_quadrant_table
from .token_dump import TOKEN_DUMP_NAME


__all__ = [
    "QUADRANT_COLORS",
    "NotATIPRunError",
    "TIPReport",
    "find_trainer_state",
    "load_tip_history",
    "load_token_dump",
    "main",
    "map_steps",
    "render_tokens_html",
    "write_report",
]

TRAINER_STATE_NAME = "trainer_state.json"
# One colour per quadrant, in the figures and the HTML page (colour-blind safe, Q3 stands out).
QUADRANT_COLORS = {1: "#7B3294", 2: "#0072B2", 3: "#D55E00", 4: "#8C8C8C"}
QUADRANT_TINTS = {1: "#E8D5EE", 2: "#CCE3F0", 3: "#F8D6BF", 4: "#E3E3E3"}
FIGURES = {
    "quadrant_share": "quadrant_share.png",
    "kept_share": "kept_share.png",
    "quadrant_signals": "quadrant_signals.png",
    "loss_share": "loss_share.png",
    "tip_map": "tip_map.png",
}
HTML_NAME = "tokens.html"


class NotATIPRunError(ValueError):
    """The run's `trainer_state.json` has no `tip/...` metrics: it was not written by `TIPTrainer`."""


@dataclass
class TIPReport:
    """What [`write_report`] wrote.

    Attributes:
        trainer_state: The `trainer_state.json` that was read.
        figures: Figure name (`quadrant_share`, `kept_share`, `quadrant_signals`, `loss_share`, `tip_map`) to path.
        table: Text table of the last logged `tip/...` values.
        html: The HTML page of tokens (`None` without a token dump).
        token_dump: The token dump that was read (`None` if the run has none).
    """

    trainer_state: Path
    figures: dict[str, Path] = field(default_factory=dict)
    table: str = ""
    html: Path | None = None
    token_dump: Path | None = None


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_trainer_state(path: str | Path) -> Path:
    """The `trainer_state.json` of a run: the file itself, `path/trainer_state.json`, or the latest checkpoint's.

    Args:
        path (`str` or `Path`): A run's output directory, a `checkpoint-N` folder, or a `trainer_state.json`.

    Raises:
        FileNotFoundError: if none is found.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; give a run's output directory or a checkpoint folder.")
    if (path / TRAINER_STATE_NAME).is_file():
        return path / TRAINER_STATE_NAME
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if (p / TRAINER_STATE_NAME).is_file()), key=_checkpoint_step
    )
    if checkpoints:
        return checkpoints[-1] / TRAINER_STATE_NAME
    raise FileNotFoundError(
        f"No {TRAINER_STATE_NAME} in {path} nor in a checkpoint-N folder inside it; give a run's output directory "
        "(written by TIPTrainer with a save step or `trainer.save_state()`) or a checkpoint folder."
    )


def load_tip_history(path: str | Path) -> tuple[list[dict[str, float]], Path]:
    """The logged entries of a run that carry `tip/...` metrics, in step order.

    Args:
        path (`str` or `Path`): See [`find_trainer_state`].

    Returns:
        `tuple`: The entries of `log_history` with `tip/kept_frac` and a `step`, and the path that was read.

    Raises:
        FileNotFoundError: if no `trainer_state.json` is found.
        NotATIPRunError: if it has no `tip/...` metrics.
    """
    state_path = find_trainer_state(path)
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{state_path} is not valid JSON: {error}") from error
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError(f"{state_path} is not a trainer_state.json: it has no `log_history` list.")
    history = [
        entry
        for entry in state["log_history"]
        if isinstance(entry, dict) and f"{METRIC_PREFIX}/kept_frac" in entry and "step" in entry
    ]
    if not history:
        logged = sorted({key for entry in state["log_history"] if isinstance(entry, dict) for key in entry})
        raise NotATIPRunError(
            f"{state_path} has no `{METRIC_PREFIX}/...` metrics, so it is not a trl-tip run (or it stopped before its "
            f"first logging step). It logged: {', '.join(logged) if logged else 'nothing'}. `trl-tip report` reads "
            "runs trained with TIPTrainer."
        )
    return sorted(history, key=lambda entry: entry["step"]), state_path


def load_token_dump(path: str | Path) -> list[dict[str, Any]]:
    """Reads the JSON lines a [`TokenDumpCallback`] wrote (one completion per line).

    Raises:
        ValueError: on a line that is not a completion record.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not JSON: {error}") from error
            missing = {"step", "prompt", "entropy_threshold", "divergence_threshold", "tokens"} - set(record)
            if missing:
                raise ValueError(f"{path}:{number} is not a token dump record: missing {', '.join(sorted(missing))}.")
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------- figures


def _new_figure(width: float = 7.0, height: float = 4.0, ncols: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, axes


def _series(history: list[dict[str, float]], key: str) -> list[float]:
    return [float(entry.get(key, math.nan)) for entry in history]


def _stacked(ax, steps: list[int], key: str, history: list[dict[str, float]]) -> None:
    values = [_series(history, f"{METRIC_PREFIX}/q{q}/{key}") for q in range(1, 5)]
    colors = [QUADRANT_COLORS[q] for q in range(1, 5)]
    labels = [QUADRANT_NAMES[q] for q in range(1, 5)]
    if len(steps) == 1:
        bottom = 0.0
        for value, color, label in zip(values, colors, labels):
            ax.bar(steps, value, bottom=bottom, color=color, label=label, width=0.6)
            bottom += value[0]
    else:
        ax.stackplot(steps, values, colors=colors, labels=labels, alpha=0.9)
        ax.set_xlim(steps[0], steps[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")


def _save(figure, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in figure.axes:
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.savefig(path)
    return path


def _readable_axis(axis) -> None:
    """At most 5 ticks with labels that fit, whatever the range: no offset (a newcomer reads the values as printed),
    scientific notation beyond 1e-3..1e4, and a degenerate range (one value) widened so the ticks differ."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    axis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
    formatter = ScalarFormatter(useOffset=False, useMathText=True)
    formatter.set_powerlimits((-3, 4))
    axis.set_major_formatter(formatter)


def _widen_degenerate(ax, xs: list[float], ys: list[float]) -> None:
    """Limits for data of (nearly) one value on an axis: ±5% of the value (±0.05 around 0), so ticks stay distinct."""
    for values, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            continue
        low, high = min(finite), max(finite)
        if high - low <= 1e-9 * max(1.0, abs(high)):
            pad = 0.05 * abs(high) or 0.05
            setter(low - pad, high + pad)


def _legend(ax, reverse: bool = False) -> None:
    """The legend outside the axes, on the right; `reverse` lists a stack from top to bottom."""
    handles, labels = ax.get_legend_handles_labels()
    if reverse:
        handles, labels = handles[::-1], labels[::-1]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def plot_quadrant_share(history: list[dict[str, float]], path: Path) -> Path:
    """(a) Share of the eligible tokens in each quadrant, stacked, over the logged steps."""
    steps = [entry["step"] for entry in history]
    figure, (ax,) = _new_figure()
    _stacked(ax, steps, "frac", history)
    ax.set_ylabel("share of eligible tokens")
    ax.set_title("Tokens per quadrant (tip/q*/frac)")
    _legend(ax, reverse=True)
    return _save(figure, path)


def _plot_per_quadrant(ax, steps: list[int], history: list[dict[str, float]], key: str) -> None:
    """One line per quadrant of the `tip/q{n}/{key}` metric over the logged steps."""
    for q in range(1, 5):
        ax.plot(
            steps,
            _series(history, f"{METRIC_PREFIX}/q{q}/{key}"),
            color=QUADRANT_COLORS[q],
            marker="o",
            markersize=3,
            label=QUADRANT_NAMES[q],
        )


def plot_kept_share(history: list[dict[str, float]], path: Path) -> Path:
    """(b) Share of each quadrant's tokens that the rule kept, and the overall kept share, over the logged steps."""
    steps = [entry["step"] for entry in history]
    figure, (ax,) = _new_figure()
    _plot_per_quadrant(ax, steps, history, "kept_frac")
    ax.plot(steps, _series(history, f"{METRIC_PREFIX}/kept_frac"), color="black", ls="--", label="all tokens")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("step")
    ax.set_ylabel("kept share of the quadrant")
    ax.set_title("Kept share per quadrant (tip/q*/kept_frac)")
    _legend(ax)
    return _save(figure, path)


def plot_quadrant_signals(history: list[dict[str, float]], path: Path) -> Path:
    """(c) Mean entropy and mean divergence of each quadrant, with the thresholds, over the logged steps."""
    steps = [entry["step"] for entry in history]
    figure, axes = _new_figure(width=10.0, height=4.0, ncols=2)
    for ax, key, label in zip(axes, ("entropy", "divergence"), ("student entropy H / ln V", "divergence D")):
        _plot_per_quadrant(ax, steps, history, key)
        ax.plot(steps, _series(history, f"{METRIC_PREFIX}/{key}_threshold"), color="black", ls="--", label="threshold")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"Mean {key} per quadrant (tip/q*/{key})")
        _readable_axis(ax.yaxis)
    _legend(axes[1])
    return _save(figure, path)


def plot_loss_share(history: list[dict[str, float]], path: Path) -> Path:
    """(d) Share of the all-token distillation loss that sits in each quadrant, stacked, over the logged steps."""
    steps = [entry["step"] for entry in history]
    figure, (ax,) = _new_figure()
    _stacked(ax, steps, "loss_share", history)
    ax.set_ylabel("share of the all-token loss")
    ax.set_title("Loss per quadrant (tip/q*/loss_share)")
    _legend(ax, reverse=True)
    return _save(figure, path)


def _spread(items: list, count: int) -> list:
    """Up to `count` items evenly spread over `items`, first and last included."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _by_step(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    steps: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        steps.setdefault(int(record["step"]), []).append(record)
    return dict(sorted(steps.items()))


def map_steps(records: list[dict[str, Any]], max_panels: int = 3) -> list[int]:
    """The dumped steps the TIP map draws: up to `max_panels`, spread from the first dumped step to the last."""
    return _spread(list(_by_step(records)), max_panels)


def plot_tip_map(records: list[dict[str, Any]], path: Path, max_panels: int = 3) -> Path:
    """The TIP map: entropy against divergence of the dumped tokens, coloured by quadrant, kept tokens filled.

    One panel per dumped step (the steps of [`map_steps`]), each with its own thresholds; the title names the steps
    drawn and those dumped.
    """
    from matplotlib.lines import Line2D

    steps = _by_step(records)
    chosen = map_steps(records, max_panels)
    figure, axes = _new_figure(width=4.2 * len(chosen) + 1.6, height=4.2, ncols=len(chosen))
    for ax, step in zip(axes, chosen):
        step_records = steps[step]
        tokens = [t for r in step_records for t in r["tokens"] if t["quadrant"] in (1, 2, 3, 4)]
        for q in range(1, 5):
            for kept in (False, True):
                points = [t for t in tokens if t["quadrant"] == q and bool(t["kept"]) == kept]
                if not points:
                    continue
                ax.scatter(
                    [t["entropy"] for t in points],
                    [t["divergence"] for t in points],
                    s=22,
                    facecolors=QUADRANT_COLORS[q] if kept else "none",
                    edgecolors=QUADRANT_COLORS[q],
                    linewidths=1.0,
                    alpha=0.85,
                )
        h_threshold = float(step_records[0]["entropy_threshold"])
        d_threshold = float(step_records[0]["divergence_threshold"])
        ax.margins(0.12)
        ax.axvline(h_threshold, color="black", ls="--", lw=1)
        ax.axhline(d_threshold, color="black", ls="--", lw=1)
        _widen_degenerate(
            ax, [t["entropy"] for t in tokens] + [h_threshold], [t["divergence"] for t in tokens] + [d_threshold]
        )
        _readable_axis(ax.xaxis)
        _readable_axis(ax.yaxis)
        for q, (x, y, ha, va) in {
            1: (0.98, 0.98, "right", "top"),
            2: (0.98, 0.02, "right", "bottom"),
            3: (0.02, 0.98, "left", "top"),
            4: (0.02, 0.02, "left", "bottom"),
        }.items():
            ax.text(
                x,
                y,
                f"Q{q}",
                transform=ax.transAxes,
                ha=ha,
                va=va,
                color=QUADRANT_COLORS[q],
                weight="bold",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5},
                zorder=5,
            )
        kept = sum(bool(t["kept"]) for t in tokens)
        ax.set_title(f"step {step}: {kept} of {len(tokens)} tokens kept", fontsize=10)
        ax.set_xlabel("student entropy H / ln V")
        ax.set_ylabel("teacher–student divergence D")
    handles = [
        Line2D([], [], ls="", marker="o", color=QUADRANT_COLORS[q], label=QUADRANT_NAMES[q]) for q in range(1, 5)
    ]
    handles += [
        Line2D([], [], ls="", marker="o", color="black", label="kept"),
        Line2D([], [], ls="", marker="o", markerfacecolor="none", color="black", label="dropped"),
        Line2D([], [], ls="--", color="black", label="thresholds"),
    ]
    axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    figure.suptitle(f"TIP map of the dumped completion tokens: {_steps_caption(chosen, list(steps))}")
    return _save(figure, path)


def _steps_caption(shown: list[int], dumped: list[int]) -> str:
    """`"steps 5, 10, 20 (3 of the 4 dumped: 5, 10, 15, 20)"`, or `"steps 5, 10 (every dumped step)"`."""
    named = f"step{'s' if len(shown) > 1 else ''} {', '.join(map(str, shown))}"
    if len(shown) == len(dumped):
        return f"{named} (every dumped step)"
    return f"{named} ({len(shown)} of the {len(dumped)} dumped: {', '.join(map(str, dumped))})"


# ------------------------------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 60rem;
       padding: 0 1rem; color: #222; line-height: 1.5; }
h1 { font-size: 1.5rem; margin-bottom: 0.3rem; }
h2 { font-size: 1.15rem; margin: 1.8rem 0 0.3rem; border-bottom: 1px solid #ddd; }
p.meta, p.thresholds { color: #555; margin: 0.2rem 0 0.6rem; font-size: 0.9rem; }
.legend { display: flex; flex-wrap: wrap; gap: 0.4rem 0.8rem; margin: 0.8rem 0 1rem; font-size: 0.9rem; }
.completion { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.95rem;
              white-space: pre-wrap; word-break: break-word; border: 1px solid #e2e2e2; border-radius: 6px;
              padding: 0.5rem 0.7rem; margin: 0.45rem 0; background: #fff; }
.prompt { color: #999; }
.tok { border-bottom: 3px solid transparent; padding: 0 1px; border-radius: 2px; }
.tok.dropped { color: #777; }
.tok.kept { color: #111; font-weight: 600; }
table.counts { border-collapse: collapse; font-size: 0.85rem; margin: 0.3rem 0 0.6rem; }
table.counts th, table.counts td { border: 1px solid #ddd; padding: 0.15rem 0.6rem; text-align: right; }
table.counts th:first-child, table.counts td:first-child { text-align: left; }
"""


def _quadrant_css() -> str:
    lines = []
    for q in range(1, 5):
        lines.append(f".tok.q{q} {{ border-bottom-color: {QUADRANT_COLORS[q]}; }}")
        lines.append(f".tok.q{q}.kept {{ background: {QUADRANT_TINTS[q]}; }}")
    lines.append(".tok.q0 { border-bottom: 3px dotted #000; }")
    return "\n".join(lines)


def _visible(text: str) -> str:
    """Token text as shown: escaped, with newlines and tabs made visible."""
    return html.escape(text).replace("\n", "↵\n").replace("\t", "→\t")


def _token_span(token: dict[str, Any]) -> str:
    q = int(token["quadrant"])
    kept = bool(token["kept"])
    label = f"Q{q}" if q else "non-finite"
    title = (
        f"{label}, {'kept' if kept else 'dropped'} (weight {token['weight']:.3g}); "
        f"H={token['entropy']:.4f} D={token['divergence']:.4f} loss={token['loss']:.4f} "
        f"p_student={token['student_prob']:.3g} p_teacher={token['teacher_prob']:.3g}"
    )
    css = f"tok q{q} {'kept' if kept else 'dropped'}"
    return f'<span class="{css}" title="{html.escape(title)}">{_visible(str(token["token"]))}</span>'


def _counts_table(records: list[dict[str, Any]]) -> str:
    rows = ["<tr><th>quadrant</th><th>tokens</th><th>kept</th></tr>"]
    for q in range(1, 5):
        tokens = [t for r in records for t in r["tokens"] if t["quadrant"] == q]
        kept = sum(bool(t["kept"]) for t in tokens)
        rows.append(
            f'<tr class="q{q}"><td style="border-left: 6px solid {QUADRANT_COLORS[q]}">'
            f"{html.escape(QUADRANT_NAMES[q])}</td><td>{len(tokens)}</td><td>{kept}</td></tr>"
        )
    return '<table class="counts">' + "".join(rows) + "</table>"


def render_tokens_html(
    records: list[dict[str, Any]],
    title: str = "trl-tip tokens",
    max_steps: int = 5,
    map_steps: list[int] | None = None,
) -> str:
    """An HTML page of the dumped completions: kept tokens highlighted, every token underlined in its quadrant colour.

    Hovering a token shows its quadrant, weight, entropy, divergence, loss and both models' probabilities.

    Args:
        records (`list[dict]`): Records of a token dump (see [`load_token_dump`]).
        title (`str`): Page title.
        max_steps (`int`): Dumped steps shown, spread from the first to the last.
        map_steps (`list[int]`, *optional*): The steps the TIP map draws, named on the page.

    Returns:
        `str`: A self-contained page (inline CSS, no script, nothing fetched).
    """
    steps = _by_step(records)
    shown = _spread(list(steps), max_steps)
    legend = (
        "".join(f'<span class="tok q{q} kept">{html.escape(QUADRANT_NAMES[q])}</span>' for q in range(1, 5))
        + '<span class="tok q3 dropped">dropped token (underline only)</span>'
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}{_quadrant_css()}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{len(records)} completions dumped at {len(steps)} steps; showing '
        f"{html.escape(_steps_caption(shown, list(steps)))}."
        + (
            f" The TIP map (tip_map.png) draws {html.escape(_steps_caption(map_steps, list(steps)))}."
            if map_steps
            else ""
        )
        + " Grey: prompt. Highlighted: kept tokens; underline: quadrant. Hover a token for its signals.</p>",
        f'<div class="legend">{legend}</div>',
    ]
    for step in shown:
        step_records = steps[step]
        first = step_records[0]
        tokens = [t for r in step_records for t in r["tokens"]]
        kept = sum(bool(t["kept"]) for t in tokens)
        parts.append(f'<section class="step" id="step-{step}" data-step="{step}">')
        parts.append(f"<h2>Step {step}</h2>")
        parts.append(
            f'<p class="thresholds">Thresholds H &ge; {first["entropy_threshold"]:.4f}, '
            f"D &ge; {first['divergence_threshold']:.4f}; {kept} of {len(tokens)} tokens kept in these "
            f"{len(step_records)} completions.</p>"
        )
        parts.append(_counts_table(step_records))
        for record in step_records:
            spans = "".join(_token_span(t) for t in record["tokens"])
            parts.append(
                f'<div class="completion" data-row="{int(record.get("row", 0))}">'
                f'<span class="prompt">{_visible(record["prompt"])}</span>{spans}</div>'
            )
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------- report


def _find_token_dump(run_path: Path, state_path: Path) -> Path | None:
    for folder in (run_path if run_path.is_dir() else run_path.parent, state_path.parent, state_path.parent.parent):
        candidate = folder / TOKEN_DUMP_NAME
        if candidate.is_file():
            return candidate
    return None


def _summary_table(history: list[dict[str, float]]) -> str:
    last = history[-1]
    p = METRIC_PREFIX
    extra = (
        f"student entropy {last.get(f'{p}/entropy', math.nan):.4f}, divergence "
        f"{last.get(f'{p}/divergence', math.nan):.4f}, teacher entropy {last.get(f'{p}/teacher_entropy', math.nan):.4f}, "
        f"teacher p(token) {last.get(f'{p}/teacher_token_prob', math.nan):.4f}, non-finite skipped "
        f"{last.get(f'{p}/skipped_nonfinite', math.nan):.1f}/step"
    )
    loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
    return f"step {last['step']} (last of {len(history)} logged){loss}\n{format_quadrant_table(last)}\n{extra}"


def write_report(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    token_dump: str | Path | None = None,
    html_steps: int = 5,
    map_panels: int = 3,
) -> TIPReport:
    """Writes the figures (and, with a token dump, the TIP map and the HTML page of tokens) of a trl-tip run.

    Args:
        run_dir (`str` or `Path`): The run's output directory, a `checkpoint-N` folder or a `trainer_state.json`.
        output_dir (`str` or `Path`, *optional*): Where to write; defaults to `run_dir/report` (for a
            `trainer_state.json` file, `report/` next to it).
        token_dump (`str` or `Path`, *optional*): A `tip_tokens.jsonl`; by default the run's own, if it has one.
        html_steps (`int`, *optional*, defaults to `5`): Dumped steps shown in the HTML page.
        map_panels (`int`, *optional*, defaults to `3`): Dumped steps drawn in the TIP map.

    Returns:
        [`TIPReport`]: The paths written and the text table of the last logged values.

    Raises:
        FileNotFoundError: if the run has no `trainer_state.json`, or `token_dump` does not exist.
        NotATIPRunError: if the run logged no `tip/...` metrics.
    """
    run_path = Path(run_dir)
    history, state_path = load_tip_history(run_path)
    if output_dir is not None:
        out = Path(output_dir)
    else:  # next to what the user named: a run's folder, not the checkpoint inside it whose state was read
        out = (run_path if run_path.is_dir() else state_path.parent) / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = TIPReport(trainer_state=state_path, table=_summary_table(history))
    report.figures["quadrant_share"] = plot_quadrant_share(history, out / FIGURES["quadrant_share"])
    report.figures["kept_share"] = plot_kept_share(history, out / FIGURES["kept_share"])
    report.figures["quadrant_signals"] = plot_quadrant_signals(history, out / FIGURES["quadrant_signals"])
    report.figures["loss_share"] = plot_loss_share(history, out / FIGURES["loss_share"])
    if token_dump is not None:
        dump_path = Path(token_dump)
        if not dump_path.is_file():
            raise FileNotFoundError(f"Token dump {dump_path} does not exist.")
    else:
        dump_path = _find_token_dump(run_path, state_path)
    if dump_path is not None:
        records = load_token_dump(dump_path)
        if records:
            report.token_dump = dump_path
            report.figures["tip_map"] = plot_tip_map(records, out / FIGURES["tip_map"], max_panels=map_panels)
            report.html = out / HTML_NAME
            title = f"trl-tip tokens of {state_path.parent.name}"
            page = render_tokens_html(records, title, max_steps=html_steps, map_steps=map_steps(records, map_panels))
            report.html.write_text(page, encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="trl-tip report",
        description="Draws the Q1-Q4 picture of a trl-tip run from its trainer_state.json (and its tip_tokens.jsonl "
        "token dump, if any) and prints the last logged values.",
    )
    parser.add_argument("run_dir", help="the run's output directory, a checkpoint-N folder or a trainer_state.json")
    parser.add_argument("--output_dir", default=None, help="where to write (default: RUN_DIR/report)")
    parser.add_argument("--tokens", default=None, help="a tip_tokens.jsonl token dump (default: the run's own)")
    parser.add_argument("--html_steps", type=int, default=5, help="dumped steps shown in tokens.html")
    parser.add_argument("--map_panels", type=int, default=3, help="dumped steps drawn in tip_map.png")
    ns = parser.parse_args(argv)
    if ns.html_steps < 1 or ns.map_panels < 1:
        parser.error("--html_steps and --map_panels must be >= 1")
    report = write_report(ns.run_dir, ns.output_dir, ns.tokens, ns.html_steps, ns.map_panels)
    print(f"trl-tip report of {report.trainer_state}")
    print(report.table)
    print("\nwrote:")
    for path in report.figures.values():
        print(f"  {path}")
    if report.html is not None:
        print(f"  {report.html}")
    else:
        print(
            "  (no token dump: add TokenDumpCallback to the trainer, or `trl-tip demo --dump_tokens_every N`, for "
            "the TIP map and tokens.html)"
        )


if __name__ == "__main__":
    import sys

    from trl_tip.cli import main as cli_main

    cli_main(["report", *sys.argv[1:]])
