"""The model card a trl-tip trainer writes credits each paper for its part: TIP (arXiv 2604.14084) for the token
selection, ssToken (arXiv 2510.18250) when its rule is used, GKD's paper as the base trainer's method. TRL's card
said "trained with TIP, a method introduced in [On-Policy Distillation of Language Models ...]" (GKD's paper) and gave
GKD's BibTeX under "Cite TIP as"."""

import re

from conftest import dist_args, left_tokenizer, prompt_dataset, tiny_args

from trl_tip import Intersect, QuadrantSubset, SSToken, TIPDistillationTrainer, TIPTrainer
from trl_tip.toy import make_model


GKD_TITLE = "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"


def citations(card: str) -> dict[str, str]:
    """`Cite NAME as:` -> the BibTeX block that follows."""
    return dict(re.findall(r"Cite (.+?) as:\s+```bibtex\n(.*?)```", card, flags=re.S))


def test_gkd_based_card_credits_tip_for_selection_and_gkd_for_the_base(tmp_path, student, teacher, tokenizer, dataset):
    student.config.name_or_path = "Qwen/Qwen3-0.6B"
    trainer = TIPTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(tmp_path, token_selection="tip", keep_ratio=0.5),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.create_model_card(model_name="student-tip")
    card = (tmp_path / "README.md").read_text()
    assert "a method introduced in [On-Policy" not in card.split("GKDTrainer (GKD,")[0]  # TIP is not GKD's method
    assert (
        "trained with TIPTrainer: TRL's GKDTrainer (GKD, a method introduced in "
        f"[{GKD_TITLE}](https://huggingface.co/papers/2306.13649))" in card
    )
    assert '`token_selection="tip", keep_ratio=0.5` (trl-tip), following [TIP: Token Importance in On-Policy ' in card
    assert "https://huggingface.co/papers/2604.14084" in card and "ssToken" not in card
    cited = citations(card)
    assert list(cited) == ["TIP", "GKD", "TRL"]
    assert "title        = {{TIP: Token Importance in On-Policy Distillation}}" in cited["TIP"]
    assert (
        "Yuanda Xu and Hejian Sang and Zhengze Zhou and Ran He and Zhipeng Wang and Alborz Geramifard" in cited["TIP"]
    )
    assert "eprint       = {2604.14084}" in cited["TIP"] and GKD_TITLE not in cited["TIP"]
    assert GKD_TITLE in cited["GKD"] and "Agarwal" in cited["GKD"]
    assert "base_model: Qwen/Qwen3-0.6B" in card and "- trl-tip" in card and "- gkd" in card


def test_sstoken_rule_is_credited_on_the_distillation_trainer_card_written_at_checkpoint(tmp_path):
    tokenizer = left_tokenizer()
    trainer = TIPDistillationTrainer(
        model=make_model(tokenizer, 32, 1, seed=1),
        teacher_model=make_model(tokenizer, 48, 1, seed=2),
        args=dist_args(tmp_path, token_selection="sstoken", max_steps=1, save_strategy="steps", save_steps=1),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()  # DistillationTrainer writes the card with each checkpoint
    card = (tmp_path / "README.md").read_text()
    assert "trained with TIPDistillationTrainer: TRL's DistillationTrainer (GKD, a method introduced in" in card
    assert "[ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning]" in card
    assert "https://huggingface.co/papers/2510.18250" in card
    cited = citations(card)
    assert list(cited) == ["TIP", "ssToken", "GKD", "TRL"]
    assert "Xiaohan Qin and Xiaoxing Wang" in cited["ssToken"] and "eprint       = {2510.18250}" in cited["ssToken"]


def test_custom_selector_is_named_and_sstoken_inside_a_composition_is_credited(tmp_path):
    tokenizer = left_tokenizer()
    trainer = TIPDistillationTrainer(
        model=make_model(tokenizer, 32, 1, seed=1),
        teacher_model=make_model(tokenizer, 48, 1, seed=2),
        args=dist_args(tmp_path),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
        selector=Intersect(QuadrantSubset(["Q3"]), SSToken(gamma=0.0)),
    )
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "selected by `a custom selector (Intersect)`" in card
    assert list(citations(card)) == ["TIP", "ssToken", "GKD", "TRL"]
