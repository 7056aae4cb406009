"""The model card a trl-tip trainer writes (`Trainer.create_model_card`, also on `push_to_hub`).

TRL's card credits the trainer's own paper under "Cite {trainer} as"; for a trl-tip trainer that would credit GKD's
paper as the method. This card credits each paper for what it contributed: TIP (arXiv 2604.14084) for the token
selection, ssToken (arXiv 2510.18250) when its rule is used, and the base TRL trainer's paper (GKD's, for both
`GKDTrainer` and `DistillationTrainer`) as that trainer's method, with TRL's own citation. Otherwise it is TRL's
`lm_model_card.md`: the same front matter, quick start, tracker badges and framework versions.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


__all__ = ["SSTOKEN_PAPER", "TIP_PAPER", "selector_parts", "tip_model_card"]

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

SSTOKEN_PAPER = {
    "title": "ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning",
    "id": "2510.18250",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @misc{qin2025sstoken,
            title        = {{ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning}},
            author       = {Xiaohan Qin and Xiaoxing Wang and Ning Liao and Cancheng Zhang and Xiangdong Zhang and Mingquan Feng and Jingzhi Wang and Junchi Yan},
            year         = 2025,
            eprint       = {2510.18250},
            archivePrefix = {arXiv},
            primaryClass = {cs.AI},
            url          = {https://arxiv.org/abs/2510.18250},
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

This model was trained with {{ trainer_name }}: TRL's {{ base_trainer }}{% if base_paper_id %} ({{ base_method }}, a method introduced in [{{ base_paper_title }}](https://huggingface.co/papers/{{ base_paper_id }})){% endif %}, with the distillation loss computed only on the completion tokens selected by `{{ selection }}` (trl-tip), following [{{ tip_title }}](https://huggingface.co/papers/{{ tip_id }}){% if sstoken_id %} and, for the ssToken rule, [{{ sstoken_title }}](https://huggingface.co/papers/{{ sstoken_id }}){% endif %}.

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
    """The selector and every selector inside it (`Intersect` / `Union` parts, `SSToken.attention_only()`'s base)."""
    yield selector
    for part in (getattr(selector, name, None) for name in ("first", "second", "base")):
        if part is not None:
            yield from selector_parts(part)


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
    uses_sstoken: bool,
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
        uses_sstoken (`bool`): Whether the selection uses ssToken's rule (credits its paper).
    """
    base_method = "GKD" if base_paper.get("id") == GKD_PAPER_ID else f"TRL's {base_trainer}"
    from . import __version__

    citations = [("TIP", TIP_PAPER["citation"])]
    if uses_sstoken:
        citations.append(("ssToken", SSTOKEN_PAPER["citation"]))
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
        sstoken_title=SSTOKEN_PAPER["title"] if uses_sstoken else None,
        sstoken_id=SSTOKEN_PAPER["id"] if uses_sstoken else None,
        citations=citations,
        trl_tip_version=__version__,
        trl_version=_version("trl"),
        transformers_version=_version("transformers"),
        pytorch_version=_version("torch"),
        datasets_version=_version("datasets"),
        tokenizers_version=_version("tokenizers"),
    )
