"""`TIPConfig`: `GKDConfig` plus the options of token selection."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._compat import GKDConfig
from .selection import QUADRANTS, TOKEN_SELECTIONS, parse_quadrants
from .signals import DIVERGENCES


# Rules that keep a share of the tokens and therefore read `keep_ratio`.
BUDGETED_SELECTIONS = ("random", "entropy_topk", "entropy_sample", "entropy_divergence_sample", "tip")
DEFAULT_KEEP_RATIO = 0.5


@dataclass
class TIPConfig(GKDConfig):
    r"""
    Configuration class for [`TIPTrainer`]: every option of TRL's `GKDConfig` plus the token-selection options.

    Each completion token gets two signals, the student entropy `H` (divided by `ln V`) and the teacher–student
    divergence `D`. Thresholds on both split tokens into quadrants Q1 (high H, high D), Q2 (high H, low D), Q3 (low H,
    high D: confident and wrong) and Q4 (low H, low D). A selection rule keeps a subset, and the distillation loss is
    computed on the kept tokens only.

    Args:
        token_selection (`str`, *optional*, defaults to `"entropy_sample"`):
            Selection rule: `"all"` (every token, exactly GKD's loss), `"random"`, `"entropy_topk"`,
            `"entropy_sample"`, `"entropy_divergence_sample"`, `"quadrants"` or `"tip"`.
        keep_ratio (`float`, *optional*):
            Share of the eligible tokens kept by the budgeted rules (`random`, `entropy_topk`, `entropy_sample`,
            `entropy_divergence_sample`, `tip`), in `(0, 1]`. Defaults to `0.5` for those rules; must stay unset for
            `all` and `quadrants`.
        entropy_alpha (`float`, *optional*, defaults to `1.0`):
            Exponent `alpha` on the entropy in the sampling weight `H^alpha * D^gamma`.
        divergence_gamma (`float`, *optional*, defaults to `1.0`):
            Exponent `gamma` on the divergence in the sampling weight of `entropy_divergence_sample`.
        quadrants (`list[str]`, *optional*):
            Quadrants kept by the `quadrants` rule, e.g. `["Q3"]` or `["Q1", "Q3"]`.
        tip_q3_share (`float`, *optional*, defaults to `0.5`):
            Share of the `tip` rule's budget reserved for Q3 tokens.
        divergence (`str`, *optional*, defaults to `"jsd"`):
            Divergence of the second axis: `"jsd"` (symmetric, divided by `ln 2`, in `[0, 1]`), `"reverse_kl"`
            (`KL(student || teacher)`) or `"forward_kl"` (`KL(teacher || student)`).
        divergence_top_k (`int`, *optional*):
            Restrict the divergence to the teacher's top-k tokens, renormalised.
        entropy_threshold (`float`, *optional*):
            Fixed entropy split of the quadrants, in `[0, 1]`. Give both fixed thresholds or neither.
        divergence_threshold (`float`, *optional*):
            Fixed divergence split of the quadrants (in `[0, 1]` for `jsd`, `>= 0` for the KLs).
        entropy_threshold_quantile (`float`, *optional*, defaults to `0.5`):
            Without fixed thresholds, the entropy split is this quantile of the step's eligible tokens over all
            processes (`0.5`: the median).
        divergence_threshold_quantile (`float`, *optional*, defaults to `0.5`):
            Likewise for the divergence split.
        tip_chunk_size (`int`, *optional*, defaults to `1024`):
            Positions whose full-vocabulary logits are materialised at once, in the signals and in the loss.
    """

    token_selection: str = field(
        default="entropy_sample",
        metadata={
            "help": "Selection rule: `all` (every token, exactly GKD's loss), `random`, `entropy_topk`, "
            "`entropy_sample`, `entropy_divergence_sample`, `quadrants` or `tip`.",
            "choices": list(TOKEN_SELECTIONS),
        },
    )
    keep_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Share of the eligible tokens kept by the budgeted rules (random, entropy_topk, entropy_sample, "
            "entropy_divergence_sample, tip), in (0, 1]. Defaults to 0.5 for those rules; leave unset for `all` and "
            "`quadrants`."
        },
    )
    entropy_alpha: float = field(
        default=1.0,
        metadata={"help": "Exponent alpha on the entropy in the sampling weight H^alpha * D^gamma (>= 0)."},
    )
    divergence_gamma: float = field(
        default=1.0,
        metadata={
            "help": "Exponent gamma on the divergence in the sampling weight of `entropy_divergence_sample` (>= 0)."
        },
    )
    quadrants: list[str] | None = field(
        default=None,
        metadata={"help": "Quadrants kept by the `quadrants` rule, e.g. `Q3` or `Q1 Q3`."},
    )
    tip_q3_share: float = field(
        default=0.5,
        metadata={"help": "Share of the `tip` rule's budget reserved for Q3 (low entropy, high divergence) tokens."},
    )
    divergence: str = field(
        default="jsd",
        metadata={
            "help": "Divergence of the second axis: `jsd` (symmetric, divided by ln 2), `reverse_kl` or `forward_kl`.",
            "choices": list(DIVERGENCES),
        },
    )
    divergence_top_k: int | None = field(
        default=None,
        metadata={"help": "Restrict the divergence to the teacher's top-k tokens, renormalised (>= 1)."},
    )
    entropy_threshold: float | None = field(
        default=None,
        metadata={"help": "Fixed entropy split of the quadrants, in [0, 1]. Give both fixed thresholds or neither."},
    )
    divergence_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Fixed divergence split of the quadrants ([0, 1] for jsd, >= 0 for the KLs). Give both fixed "
            "thresholds or neither."
        },
    )
    entropy_threshold_quantile: float = field(
        default=0.5,
        metadata={
            "help": "Without fixed thresholds, the entropy split is this quantile of the step's eligible tokens over "
            "all processes (0.5 = median)."
        },
    )
    divergence_threshold_quantile: float = field(
        default=0.5,
        metadata={"help": "Without fixed thresholds, the divergence split is this quantile (0.5 = median)."},
    )
    tip_chunk_size: int = field(
        default=1024,
        metadata={"help": "Positions whose full-vocabulary logits are materialised at once (signals and loss)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_selection_options()

    def _validate_selection_options(self) -> None:
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ValueError(
                f"token_selection={self.token_selection!r} is not a selection rule; allowed values: "
                f"{', '.join(TOKEN_SELECTIONS)}."
            )
        if self.keep_ratio is not None:
            if self.token_selection not in BUDGETED_SELECTIONS:
                raise ValueError(
                    f"keep_ratio is not used by token_selection={self.token_selection!r}; it applies to "
                    f"{', '.join(BUDGETED_SELECTIONS)}. Leave keep_ratio unset."
                )
            if not 0.0 < self.keep_ratio <= 1.0:
                raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}.")
        elif self.token_selection in BUDGETED_SELECTIONS:
            self.keep_ratio = DEFAULT_KEEP_RATIO
        if self.entropy_alpha < 0:
            raise ValueError(f"entropy_alpha must be >= 0, got {self.entropy_alpha}.")
        if self.divergence_gamma < 0:
            raise ValueError(f"divergence_gamma must be >= 0, got {self.divergence_gamma}.")
        if self.token_selection == "quadrants":
            if not self.quadrants:
                raise ValueError(
                    "token_selection='quadrants' needs `quadrants`, a non-empty subset of "
                    f"{', '.join(QUADRANTS)} (e.g. quadrants=['Q3'])."
                )
            self.quadrants = [QUADRANTS[i - 1] for i in parse_quadrants(self.quadrants)]
        elif self.quadrants:
            raise ValueError(
                f"quadrants is only used with token_selection='quadrants', got token_selection="
                f"{self.token_selection!r}. Leave quadrants unset or use token_selection='quadrants'."
            )
        if not 0.0 <= self.tip_q3_share <= 1.0:
            raise ValueError(f"tip_q3_share must be in [0, 1], got {self.tip_q3_share}.")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r} is unknown; allowed values: {', '.join(DIVERGENCES)}.")
        if self.divergence_top_k is not None and self.divergence_top_k < 1:
            raise ValueError(f"divergence_top_k must be a positive integer or None, got {self.divergence_top_k}.")
        fixed = (self.entropy_threshold is not None, self.divergence_threshold is not None)
        if fixed[0] != fixed[1]:
            raise ValueError(
                "Give both entropy_threshold and divergence_threshold (fixed quadrant split) or neither (quantile "
                f"split); got entropy_threshold={self.entropy_threshold}, "
                f"divergence_threshold={self.divergence_threshold}."
            )
        if self.entropy_threshold is not None and not 0.0 <= self.entropy_threshold <= 1.0:
            raise ValueError(f"entropy_threshold must be in [0, 1] (entropy / ln V), got {self.entropy_threshold}.")
        if self.divergence_threshold is not None:
            upper = 1.0 if self.divergence == "jsd" else float("inf")
            if not 0.0 <= self.divergence_threshold <= upper:
                allowed = "[0, 1]" if self.divergence == "jsd" else ">= 0"
                raise ValueError(
                    f"divergence_threshold must be {allowed} for divergence={self.divergence!r}, got "
                    f"{self.divergence_threshold}."
                )
        for name in ("entropy_threshold_quantile", "divergence_threshold_quantile"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if self.tip_chunk_size < 1:
            raise ValueError(f"tip_chunk_size must be >= 1, got {self.tip_chunk_size}.")
