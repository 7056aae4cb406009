"""The model card a trl-tip trainer writes (`Trainer.create_model_card`, also on `push_to_hub`).

TRL's card credits the trainer's own paper under "Cite {trainer} as"; for a trl-tip trainer that would credit GKD's
paper as the method. This card credits each paper for what it contributed: TIP (arXiv 2604.14084) for the token
selection, ssToken (arXiv 2510.18250) when its rule is used, and the base TRL trainer's paper (GKD's, for both
`GKDTrainer` and `DistillationTrainer`) as that trainer's method, with TRL's own citation. A selector credits its own
paper through a `paper` attribute (`name`, `title`, `id`, `citation`; e.g. ssToken's selector). Otherwise it is TRL's
`lm_model_card.md`: the same front matter, quick start, tracker badges and framework versions.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from transformers import is_wandb_available

from ._compat import get_comet_experiment_url, get_trackio_space_url


__all__ = ["TIP_PAPER", "rule_papers", "selector_parts", "tip_model_card", "write_model_card"]

TIP_PAPER = {
    "title": "TIP: Token Importance in On-Policy Distillation",
    "id": "2604.14084",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @misc{xu2026tip,
            title        = {{TIP: Token Importance in On-Policy Distillation}},
            author       = {Yuanda Xu and Hejian Sang and Zhengze Zhou and Ran He and Zhipeng Wang and Alborz Geramifard},
            year         = 2026,
            eprint       = {2604.14084},
            archivePrefix = {arXiv},
            primaryClass = {cs.LG},
            url          = {https://arxiv.org/abs/2604.14084},
        }"""),
}

# The arXiv id of GKD's paper, which TRL's GKDTrainer and DistillationTrainer both cite as their method.
GKD_PAPER_ID = "2306.13649"

# docstyle-ignore
TRL_CITATION = """\
@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}"""

# docstyle-ignore
TEMPLATE = """\
---
{{ card_data }}
---

# Model Card for {{ model_name }}

This model is a fine-tuned version of [{{ base_model }}](https://huggingface.co/{{ base_model }}){% if dataset_name %} on the [{{ dataset_name }}](https://huggingface.co/datasets/{{ dataset_name }}) dataset{% endif %}.
It has been trained using [TRL](https://github.com/huggingface/trl) and trl-tip.

## Quick start

```python
from transformers import pipeline

question = "If you had a time machine, but could only go to the past or the future once and never return, which would you choose and why?"
generator = pipeline("text-generation", model="{{ hub_model_id }}", device_map="auto")
output = generator([{"role": "user", "content": question}], max_new_tokens=128, return_full_text=False)[0]
print(output["generated_text"])
```

## Training procedure

{% if wandb_url %}[<img src="https://raw.githubusercontent.com/wandb/assets/main/wandb-github-badge-28.svg" alt="Visualize in Weights & Biases" width="150" height="24"/>]({{ wandb_url }}){% endif %}
{% if trackio_url %}[<img src="https://raw.githubusercontent.com/gradio-app/trackio/refs/heads/main/trackio/assets/badge.png" alt="Visualize in Trackio" title="Visualize in Trackio" width="150" height="24"/>]({{ trackio_url }}){% endif %}
{% if comet_url %}[<img src="https://raw.githubusercontent.com/comet-ml/comet-examples/master/logo/comet_badge.png" alt="Visualize in Comet" width="150" height="24"/>]({{ comet_url }}){% endif %}

This model was trained with {{ trainer_name }}: TRL's {{ base_trainer }}{% if base_paper_id %} ({{ base_method }}, a method introduced in [{{ base_paper_title }}](https://huggingface.co/papers/{{ base_paper_id }})){% endif %}, with the distillation loss computed only on the completion tokens selected by `{{ selection }}` (trl-tip), following [{{ tip_title }}](https://huggingface.co/papers/{{ tip_id }}){% for paper in rule_papers %} and, for the {{ paper.name }} rule, [{{ paper.title }}](https://huggingface.co/papers/{{ paper.id }}){% endfor %}.

### Framework versions

- trl-tip: {{ trl_tip_version }}
- TRL: {{ trl_version }}
- Transformers: {{ transformers_version }}
- Pytorch: {{ pytorch_version }}
- Datasets: {{ datasets_version }}
- Tokenizers: {{ tokenizers_version }}

## Citations

{% for name, citation in citations %}Cite {{ name }} as:

```bibtex
{{ citation }}
```

{% endfor %}"""


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def selector_parts(selector: Any) -> Iterator[Any]:
    """The selector and every selector inside it (`Intersect` / `Union` parts, a schedule view's `base`)."""
    yield selector
    for part in (getattr(selector, name, None) for name in ("first", "second", "base")):
        if part is not None:
            yield from selector_parts(part)


def rule_papers(selector: Any) -> list[dict[str, str]]:
    """The `paper` of every part of `selector` that has one, once each, in order."""
    papers = []
    for part in selector_parts(selector):
        paper = getattr(part, "paper", None)
        if paper is not None and paper not in papers:
            papers.append(paper)
    return papers


def tip_model_card(
    *,
    base_model: str | None,
    model_name: str | None,
    hub_model_id: str | None,
    dataset_name: str | None,
    tags: list[str],
    trainer_name: str,
    base_trainer: str,
    base_paper: dict[str, str],
    selection: str,
    rule_papers: list[dict[str, str]] = (),
    wandb_url: str | None = None,
    trackio_url: str | None = None,
    comet_url: str | None = None,
) -> ModelCard:
    """The card of a model trained by a trl-tip trainer.

    Args:
        base_model, model_name, hub_model_id, dataset_name, tags, wandb_url, trackio_url, comet_url:
            As in TRL's `generate_model_card`.
        trainer_name (`str`): The trl-tip trainer (`TIPTrainer`, `TIPDistillationTrainer`).
        base_trainer (`str`): The TRL trainer it extends (`GKDTrainer`, `DistillationTrainer`).
        base_paper (`dict`): That trainer's `_paper` (`title`, `id`, `citation`), credited as its method.
        selection (`str`): What selected the tokens, e.g. `token_selection="tip", keep_ratio=0.5`.
        rule_papers (`list[dict]`): Papers of the selection rules used besides TIP ([`rule_papers`]), credited.
    """
    base_method = "GKD" if base_paper.get("id") == GKD_PAPER_ID else f"TRL's {base_trainer}"
    from . import __version__

    citations = [("TIP", TIP_PAPER["citation"])]
    citations += [(paper["name"], paper["citation"]) for paper in rule_papers]
    if base_paper.get("citation"):
        citations.append((base_method, base_paper["citation"]))
    citations.append(("TRL", TRL_CITATION))
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_name,
        library_name="transformers",
        licence="license",
        model_name=model_name,
        tags=["generated_from_trainer", *tags],
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        base_model=base_model,
        model_name=model_name,
        hub_model_id=hub_model_id,
        dataset_name=dataset_name,
        wandb_url=wandb_url,
        trackio_url=trackio_url,
        comet_url=comet_url,
        trainer_name=trainer_name,
        base_trainer=base_trainer,
        base_method=base_method,
        base_paper_title=base_paper.get("title"),
        base_paper_id=base_paper.get("id"),
        selection=selection,
        tip_title=TIP_PAPER["title"],
        tip_id=TIP_PAPER["id"],
        rule_papers=list(rule_papers),
        citations=citations,
        trl_tip_version=__version__,
        trl_version=_version("trl"),
        transformers_version=_version("transformers"),
        pytorch_version=_version("torch"),
        datasets_version=_version("datasets"),
        tokenizers_version=_version("tokenizers"),
    )


def write_model_card(
    trainer: Any, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
) -> None:
    """Writes `README.md` in `trainer.args.output_dir` as TRL's trainers do (`Trainer.create_model_card`), crediting
    TIP for the token selection, the papers of the selector's rules and the base trainer's paper as its method."""
    if not trainer.is_world_process_zero():
        return
    model_id = getattr(trainer.model.config, "name_or_path", None)
    base_model = model_id if model_id and not os.path.isdir(model_id) else None
    tags = set() if tags is None else {tags} if isinstance(tags, str) else set(tags)
    if hasattr(trainer.model.config, "unsloth_version"):
        tags.add("unsloth")
    if "JOB_ID" in os.environ:
        tags.add("hf_jobs")
    tags.update(trainer._tag_names)
    trackio_url = get_trackio_space_url()
    if trackio_url is not None:
        tags = {tag for tag in tags if not tag.startswith("trackio:")} | {f"trackio:{trackio_url}"}
    wandb_url = None
    if is_wandb_available():
        import wandb

        wandb_url = wandb.run.url if wandb.run is not None else None
    args = trainer.args
    if trainer._tip_custom_selector:
        selection = f"a custom selector ({type(trainer.selector).__name__})"
    else:
        selection = f'token_selection="{args.token_selection}"'
        if getattr(args, "keep_ratio", None) is not None:
            selection += f", keep_ratio={args.keep_ratio}"
    card = tip_model_card(
        base_model=base_model,
        model_name=model_name,
        hub_model_id=trainer.hub_model_id,
        dataset_name=dataset_name,
        tags=sorted(tags),
        trainer_name=type(trainer).__name__,
        base_trainer=trainer._tip_base_trainer.__name__,
        base_paper=trainer._tip_base_trainer._paper,
        selection=selection,
        rule_papers=rule_papers(trainer.selector),
        wandb_url=wandb_url,
        trackio_url=trackio_url,
        comet_url=get_comet_experiment_url(),
    )
    card.save(os.path.join(args.output_dir, "README.md"))
