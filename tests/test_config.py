import pytest

from trl_tip import TIPConfig
from trl_tip._compat import GKDConfig


def cfg(tmp_path, **kw):
    return TIPConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **kw)


def test_is_a_gkd_config_with_gkd_options(tmp_path):
    c = cfg(tmp_path, lmbda=0.7, beta=0.2, temperature=0.8, seq_kd=True, max_new_tokens=17)
    assert isinstance(c, GKDConfig)
    assert (c.lmbda, c.beta, c.temperature, c.seq_kd, c.max_new_tokens) == (0.7, 0.2, 0.8, True, 17)
    assert c.token_selection == "entropy_sample" and c.keep_ratio == 0.5


@pytest.mark.parametrize("kind", ["gkd", "distillation"])
def test_base_config_fields_come_first(tmp_path, kind):
    # TrainingArguments' positional order is kept (`TIPConfig("out")` sets output_dir, as `GKDConfig("out")` does);
    # the trl-tip and plug-in options follow the base config's fields.
    import dataclasses

    from trl_tip import TIPDistillationConfig
    from trl_tip._compat import DistillationConfig

    config_class, base = (TIPConfig, GKDConfig) if kind == "gkd" else (TIPDistillationConfig, DistillationConfig)
    ours = [f.name for f in dataclasses.fields(config_class)]
    theirs = [f.name for f in dataclasses.fields(base)]
    assert ours[: len(theirs)] == theirs
    assert {"token_selection", "fast_generation", "sstoken_gamma"} <= set(ours[len(theirs) :])
    c = config_class(str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none")
    assert c.output_dir == str(tmp_path / "out") and c.fast_generation == "auto"


def test_gkd_validation_still_applies(tmp_path):
    with pytest.raises(ValueError, match="lmbda"):
        cfg(tmp_path, lmbda=1.5)


def test_keep_ratio_defaults_per_rule(tmp_path):
    assert cfg(tmp_path, token_selection="tip").keep_ratio == 0.5
    assert cfg(tmp_path, token_selection="all").keep_ratio is None
    assert cfg(tmp_path, token_selection="quadrants", quadrants=["q3"]).quadrants == ["Q3"]


@pytest.mark.parametrize(
    "rule, expected",
    [
        (
            "tip",
            {"keep_ratio": 0.5, "budget_scope": "rollout", "score_order": "highest", "entropy_clip_quantile": 0.98},
        ),
        ("q3_score", {"keep_ratio": 0.1, "budget_scope": "rollout", "score_order": "highest"}),
        ("divergence_topk", {"keep_ratio": 0.1, "budget_scope": "rollout", "score_order": "highest"}),
        ("entropy_sample", {"keep_ratio": 0.5, "budget_scope": "batch", "sampling_estimator": "fixed_budget"}),
        ("entropy_topk", {"keep_ratio": 0.5, "budget_scope": "batch", "score_order": "highest"}),
        ("random", {"keep_ratio": 0.5, "budget_scope": "batch", "score_order": None}),
        ("quadrant_budget", {"keep_ratio": 0.5, "budget_scope": "batch", "q3_share": 0.5}),
        ("sstoken", {"keep_ratio": 0.6, "budget_scope": "rollout", "score_order": "highest"}),
        ("all", {"keep_ratio": None, "budget_scope": None, "entropy_clip_quantile": None}),
    ],
)
def test_rule_defaults(tmp_path, rule, expected):
    c = cfg(tmp_path, token_selection=rule)
    assert {name: getattr(c, name) for name in expected} == expected


def test_divergence_defaults_to_the_training_loss(tmp_path):
    assert cfg(tmp_path).divergence == "loss"
    # The loss axis may exceed 1 (a KL with beta=1); a fixed split is bounded by the axis.
    c = cfg(tmp_path, beta=1.0, entropy_threshold=0.3, divergence_threshold=2.5)
    assert c.divergence_threshold == 2.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"token_selection": "top"}, "allowed values: all, random, entropy_topk"),
        ({"token_selection": "random", "keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"),
        ({"token_selection": "random", "keep_ratio": 1.2}, r"keep_ratio must be in \(0, 1\]"),
        ({"token_selection": "all", "keep_ratio": 0.5}, "keep_ratio is not used by token_selection='all'"),
        ({"entropy_alpha": -1.0}, "entropy_alpha must be >= 0"),
        ({"token_selection": "entropy_divergence_sample", "divergence_gamma": -0.5}, "divergence_gamma must be >= 0"),
        ({"divergence_gamma": 2.0}, "divergence_gamma only applies to token_selection='entropy_divergence_sample'"),
        ({"token_selection": "all", "entropy_alpha": 2.0}, "entropy_alpha only applies to"),
        ({"token_selection": "quadrants"}, "needs `quadrants`"),
        ({"token_selection": "quadrants", "quadrants": ["Q7"]}, "allowed values: Q1, Q2, Q3, Q4"),
        ({"token_selection": "tip", "quadrants": ["Q3"]}, "quadrants is only used with token_selection='quadrants'"),
        ({"token_selection": "quadrant_budget", "q3_share": 1.5}, r"q3_share must be in \[0, 1\]"),
        ({"token_selection": "tip", "q3_share": 0.5}, "q3_share only applies to token_selection='quadrant_budget'"),
        ({"divergence": "tv"}, "allowed values: loss, reverse_kl, forward_kl, jsd"),
        ({"divergence_top_k": 0}, "divergence_top_k"),
        (
            {"divergence_top_k": 20},
            "divergence_top_k does not apply to divergence='loss'.*reverse_kl, forward_kl, jsd",
        ),
        ({"entropy_threshold": 0.5}, "Give both entropy_threshold and divergence_threshold"),
        ({"divergence_threshold": 0.5}, "Give both entropy_threshold and divergence_threshold"),
        ({"entropy_threshold": 1.5, "divergence_threshold": 0.5}, r"entropy_threshold must be in \[0, 1\]"),
        (
            {"divergence": "jsd", "entropy_threshold": 0.5, "divergence_threshold": 2.0},
            r"divergence_threshold must be \[0, 1\] for divergence='jsd'",
        ),
        (
            {"entropy_threshold": 0.5, "divergence_threshold": -0.1},
            "divergence_threshold must be >= 0 for divergence='loss'",
        ),
        (
            {"token_selection": "tip", "budget_scope": "step"},
            "budget_scope='step' is unknown; allowed values: rollout, batch",
        ),
        (
            {"token_selection": "all", "budget_scope": "batch"},
            "budget_scope only applies to token_selection='random' or",
        ),
        (
            {"token_selection": "quadrants", "quadrants": ["Q3"], "budget_scope": "rollout"},
            "budget_scope only applies",
        ),
        (
            {"token_selection": "tip", "score_order": "top"},
            "score_order='top' is unknown; allowed values: highest, lowest",
        ),
        (
            {"token_selection": "entropy_sample", "score_order": "lowest"},
            "score_order only applies to token_selection='entropy_topk' or 'tip' or 'q3_score' or 'divergence_topk' or 'sstoken'",
        ),
        ({"token_selection": "tip", "entropy_clip_quantile": 0.0}, r"entropy_clip_quantile must be in \(0, 1\]"),
        ({"token_selection": "q3_score", "entropy_clip_quantile": 1.5}, r"entropy_clip_quantile must be in \(0, 1\]"),
        (
            {"token_selection": "divergence_topk", "entropy_clip_quantile": 0.9},
            "entropy_clip_quantile only applies to token_selection='tip' or 'q3_score'",
        ),
        (
            {"token_selection": "entropy_sample", "sampling_estimator": "unbiased"},
            "sampling_estimator='unbiased' is unknown; allowed values: fixed_budget, importance_weighted",
        ),
        (
            {"token_selection": "tip", "sampling_estimator": "importance_weighted"},
            "sampling_estimator only applies to token_selection='entropy_sample' or 'entropy_divergence_sample'",
        ),
        ({"entropy_threshold_quantile": 1.1}, "entropy_threshold_quantile"),
        ({"divergence_threshold_quantile": -0.1}, "divergence_threshold_quantile"),
        ({"tip_chunk_size": 0}, "tip_chunk_size"),
    ],
)
def test_bad_options_raise_naming_the_option(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **kwargs)


def test_kl_divergence_threshold_may_exceed_one(tmp_path):
    c = cfg(tmp_path, divergence="reverse_kl", entropy_threshold=0.3, divergence_threshold=2.5)
    assert c.divergence_threshold == 2.5


def test_cli_parser_builds_every_option(tmp_path):
    from transformers import HfArgumentParser

    (c,) = HfArgumentParser(TIPConfig).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--report_to", "none",
            "--token_selection", "quadrants", "--quadrants", "Q1", "Q3", "--divergence", "forward_kl",
        ]
    )  # fmt: skip
    assert c.quadrants == ["Q1", "Q3"] and c.divergence == "forward_kl"


@pytest.mark.parametrize(
    "option, value, kind",
    [
        ("keep_ratio", "0.5", "a number"),
        ("entropy_threshold_quantile", "0.5", "a number"),
        ("tip_chunk_size", "8", "an integer"),
    ],
)
def test_numeric_options_of_another_type_are_refused_at_config_time(tmp_path, option, value, kind):
    """E.g. `keep_ratio="0.5"` from an untyped YAML or CLI path: a TypeError naming the option, not a failed comparison."""
    extra = {"token_selection": "tip"} if option == "keep_ratio" else {}
    with pytest.raises(TypeError, match=rf"{option} must be {kind}, got \w+ {value!r}"):
        cfg(tmp_path, **extra, **{option: value})
    with pytest.raises(TypeError, match="keep_ratio must be a number"):
        cfg(tmp_path, token_selection="tip", keep_ratio=True)


def test_quadrant_quantile_help_says_per_micro_batch():
    """The quadrant split is the quantile of each micro-batch's tokens (over all processes), as the code computes it."""
    from dataclasses import fields

    helps = {f.name: f.metadata["help"] for f in fields(TIPConfig) if f.name.endswith("threshold_quantile")}
    assert "quantile of the micro-batch's eligible tokens" in helps["entropy_threshold_quantile"]
    from trl_tip.config import TIPArguments

    doc = TIPArguments.__doc__.split("entropy_threshold_quantile (")[1].split("divergence_threshold_quantile (")[0]
    assert "quantile of the micro-batch's eligible tokens" in " ".join(doc.split())
