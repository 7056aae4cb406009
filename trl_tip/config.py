"""`TIPConfig`: `GKDConfig` plus the options of token selection."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._compat import GKDConfig
from .history import HISTORY_DEVICES, HISTORY_MODES
from .selection import QUADRANTS, TOKEN_SELECTIONS, parse_quadrants
from .selection.sstoken import DEFAULT_SSTOKEN_LOSS, SSTOKEN_LOSSES
from .signals import DIVERGENCES


# Rules that keep a share of the tokens and therefore read `keep_ratio`.
BUDGETED_SELECTIONS = ("random", "entropy_topk", "entropy_sample", "entropy_divergence_sample", "tip", "sstoken")
DEFAULT_KEEP_RATIO = 0.5
# Rules whose default keep ratio differs from DEFAULT_KEEP_RATIO (ssToken's reference default is 0.6).
DEFAULT_KEEP_RATIOS = {"sstoken": 0.6}
# Defaults of the `sstoken_*` options, applied when token_selection="sstoken" (they must stay unset otherwise).
SSTOKEN_DEFAULTS = {
    "sstoken_gamma": 0.5,
    "sstoken_loss": DEFAULT_SSTOKEN_LOSS,
    "sstoken_history": "ema",
    "sstoken_ema_decay": 0.9,
    "sstoken_ema_update_interval": 1,
    "sstoken_history_device": "same",
    "sstoken_warmup_steps": 0,
}


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
            `"entropy_sample"`, `"entropy_divergence_sample"`, `"quadrants"`, `"tip"` or `"sstoken"`.
        keep_ratio (`float`, *optional*):
            Share of the eligible tokens kept by the budgeted rules (`random`, `entropy_topk`, `entropy_sample`,
            `entropy_divergence_sample`, `tip`, `sstoken`), in `(0, 1]`. Defaults to `0.5` for those rules (`0.6`
            for `sstoken`, which keeps it per sequence); must stay unset for `all` and `quadrants`.
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
        sstoken_gamma (`float`, *optional*):
            `sstoken` only (default `0.5`): weight of the retrospective excess loss in
            `gamma * REL_norm + (1 - gamma) * attention`; `1` is REL only, `0` attention only (no history model).
        sstoken_loss (`str`, *optional*):
            `sstoken` only (default `"nll"`): per-token loss of REL, `"nll"` (of the sampled token, the paper's
            definition) or `"divergence"` (the token's distillation loss to the teacher).
        sstoken_history (`str`, *optional*):
            `sstoken` only (default `"ema"`): history model, `"ema"` of the student's trainable weights or `"fixed"`
            (the initial student).
        sstoken_ema_decay (`float`, *optional*):
            `sstoken` with `ema` history (default `0.9`): decay `alpha` of `θ_his ← alpha θ_his + (1 − alpha) θ`.
        sstoken_ema_update_interval (`int`, *optional*):
            `sstoken` with `ema` history (default `1`): optimizer steps between EMA updates.
        sstoken_history_device (`str`, *optional*):
            `sstoken` (default `"same"`): where the history copy lives, `"same"` (the student's device) or `"cpu"`.
        sstoken_warmup_steps (`int`, *optional*):
            `sstoken` (default `0`): first optimizer steps that select by the attention score alone.
    """

    token_selection: str = field(
        default="entropy_sample",
        metadata={
            "help": "Selection rule: `all` (every token, exactly GKD's loss), `random`, `entropy_topk`, "
            "`entropy_sample`, `entropy_divergence_sample`, `quadrants`, `tip` or `sstoken`.",
            "choices": list(TOKEN_SELECTIONS),
        },
    )
    keep_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Share of the eligible tokens kept by the budgeted rules (random, entropy_topk, entropy_sample, "
            "entropy_divergence_sample, tip, sstoken), in (0, 1]. Defaults to 0.5 for those rules (0.6 for sstoken, "
            "per sequence); leave unset for `all` and `quadrants`."
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

    sstoken_gamma: float | None = field(
        default=None,
        metadata={
            "help": "sstoken only (default 0.5): weight of the retrospective excess loss in gamma * REL_norm + "
            "(1 - gamma) * prompt attention, in [0, 1]; 1 = REL only, 0 = attention only (no history model)."
        },
    )
    sstoken_loss: str | None = field(
        default=None,
        metadata={
            "help": "sstoken only (default `nll`): per-token loss of REL, `nll` (of the sampled token, the paper's "
            "definition) or `divergence` (the token's distillation loss to the teacher).",
            "choices": list(SSTOKEN_LOSSES),
        },
    )
    sstoken_history: str | None = field(
        default=None,
        metadata={
            "help": "sstoken only (default `ema`): history model, `ema` (EMA of the student's trainable weights) or "
            "`fixed` (the initial student).",
            "choices": list(HISTORY_MODES),
        },
    )
    sstoken_ema_decay: float | None = field(
        default=None,
        metadata={"help": "sstoken with ema history (default 0.9): EMA decay alpha in [0, 1)."},
    )
    sstoken_ema_update_interval: int | None = field(
        default=None,
        metadata={"help": "sstoken with ema history (default 1): optimizer steps between EMA updates (>= 1)."},
    )
    sstoken_history_device: str | None = field(
        default=None,
        metadata={
            "help": "sstoken (default `same`): where the history weights live, `same` (student's device) or `cpu`.",
            "choices": list(HISTORY_DEVICES),
        },
    )
    sstoken_warmup_steps: int | None = field(
        default=None,
        metadata={"help": "sstoken (default 0): first optimizer steps that select by the attention score alone."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_selection_options()
        self._validate_sstoken_options()

    def _validate_sstoken_options(self) -> None:
        given = [name for name in SSTOKEN_DEFAULTS if getattr(self, name) is not None]
        if self.token_selection != "sstoken":
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply to token_selection='sstoken', got token_selection="
                    f"{self.token_selection!r}. Leave them unset or use token_selection='sstoken'."
                )
            return
        gamma = SSTOKEN_DEFAULTS["sstoken_gamma"] if self.sstoken_gamma is None else self.sstoken_gamma
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"sstoken_gamma must be in [0, 1], got {gamma}.")
        self.sstoken_gamma = float(gamma)
        if gamma == 0.0:
            # Attention only: no history model, so its options would be silently ignored.
            unused = [name for name in given if name != "sstoken_gamma"]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} are not used with sstoken_gamma=0 (attention only, no history model); "
                    "leave them unset or set sstoken_gamma > 0."
                )
            return
        for name, default in SSTOKEN_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.sstoken_loss not in SSTOKEN_LOSSES:
            raise ValueError(
                f"sstoken_loss={self.sstoken_loss!r} is unknown; allowed values: {', '.join(SSTOKEN_LOSSES)}."
            )
        if self.sstoken_history not in HISTORY_MODES:
            raise ValueError(
                f"sstoken_history={self.sstoken_history!r} is unknown; allowed values: {', '.join(HISTORY_MODES)}."
            )
        if self.sstoken_history_device not in HISTORY_DEVICES:
            raise ValueError(
                f"sstoken_history_device={self.sstoken_history_device!r} is unknown; allowed values: "
                f"{', '.join(HISTORY_DEVICES)}."
            )
        if self.sstoken_history == "fixed":
            unused = [name for name in ("sstoken_ema_decay", "sstoken_ema_update_interval") if name in given]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} are not used with sstoken_history='fixed'; leave them unset or use "
                    "sstoken_history='ema'."
                )
            self.sstoken_ema_decay = self.sstoken_ema_update_interval = None
        else:
            if not 0.0 <= self.sstoken_ema_decay < 1.0:
                raise ValueError(f"sstoken_ema_decay must be in [0, 1), got {self.sstoken_ema_decay}.")
            if int(self.sstoken_ema_update_interval) != self.sstoken_ema_update_interval or (
                self.sstoken_ema_update_interval < 1
            ):
                raise ValueError(
                    f"sstoken_ema_update_interval must be an integer >= 1, got {self.sstoken_ema_update_interval}."
                )
        if int(self.sstoken_warmup_steps) != self.sstoken_warmup_steps or self.sstoken_warmup_steps < 0:
            raise ValueError(f"sstoken_warmup_steps must be an integer >= 0, got {self.sstoken_warmup_steps}.")

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
            self.keep_ratio = DEFAULT_KEEP_RATIOS.get(self.token_selection, DEFAULT_KEEP_RATIO)
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
