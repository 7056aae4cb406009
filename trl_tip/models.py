"""Loading students and teachers: model ids or paths, bitsandbytes 4-bit / 8-bit quantization, k-bit preparation.

Follows TRL's conventions: [`TIPModelConfig`] is TRL's `ModelConfig` (student options: `load_in_4bit`,
`bnb_4bit_quant_type`, `use_bnb_nested_quant`, LoRA options) plus the teacher's quantization options, and
[`get_quantization_config`] turns either side's options into a `transformers.BitsAndBytesConfig`, as
`trl.get_quantization_config` does for the student.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from accelerate import PartialState
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from transformers.utils import is_peft_available
from trl import ModelConfig


__all__ = [
    "TIPModelConfig",
    "load_student_and_teacher",
    "get_quantization_config",
    "init_kwargs_are_quantized",
    "is_quantized",
    "kbit_device_map",
    "load_causal_lm",
    "prepare_quantized_student",
]

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class TIPModelConfig(ModelConfig):
    r"""
    TRL's `ModelConfig` (the student: `model_name_or_path`, `dtype`, LoRA and 4-bit / 8-bit options) plus the
    options of the teacher's quantization and the 4-bit compute dtype.

    Args:
        bnb_4bit_compute_dtype (`str`, *optional*):
            Compute dtype of the 4-bit layers (`"bfloat16"`, `"float16"` or `"float32"`). Defaults to `dtype` (TRL's
            convention), or `"float32"` when `dtype` is `"auto"`.
        teacher_load_in_4bit (`bool`, *optional*, defaults to `False`):
            Load the teacher in 4 bits (bitsandbytes; `bnb_4bit_quant_type`, `use_bnb_nested_quant` and
            `bnb_4bit_compute_dtype` apply as for the student).
        teacher_load_in_8bit (`bool`, *optional*, defaults to `False`):
            Load the teacher in 8 bits (bitsandbytes LLM.int8()).
        teacher_dtype (`str`, *optional*):
            dtype of the teacher's weights; defaults to `dtype`.
    """

    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Compute dtype of the 4-bit layers. Defaults to `dtype` (`float32` when `dtype` is `auto`).",
            "choices": ["bfloat16", "float16", "float32"],
        },
    )
    teacher_load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the teacher in 4 bits (bitsandbytes, same quant type / nested quant as the student)."},
    )
    teacher_load_in_8bit: bool = field(
        default=False,
        metadata={"help": "Load the teacher in 8 bits (bitsandbytes LLM.int8())."},
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the teacher's weights; defaults to `dtype`.", "choices": list(DTYPES)},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_load_in_4bit and self.teacher_load_in_8bit:
            raise ValueError("teacher_load_in_4bit and teacher_load_in_8bit are exclusive; set at most one of them.")
        if self.bnb_4bit_compute_dtype is not None and self.bnb_4bit_compute_dtype not in DTYPES[1:]:
            raise ValueError(
                f"bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype!r} is not allowed; use one of "
                f"{', '.join(DTYPES[1:])}."
            )
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r} is not allowed; use one of {', '.join(DTYPES)}.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not allowed; use nf4 or fp4.")


def get_quantization_config(model_args: ModelConfig, teacher: bool = False) -> BitsAndBytesConfig | None:
    """The `BitsAndBytesConfig` of the student (or of the teacher with `teacher=True`), or `None` if unquantized.

    Args:
        model_args (`ModelConfig`): A TRL `ModelConfig` or a [`TIPModelConfig`] (needed for the teacher).
        teacher (`bool`, *optional*, defaults to `False`): Read the teacher's `teacher_load_in_{4,8}bit` options.

    Returns:
        `BitsAndBytesConfig` or `None`.
    """
    prefix = "teacher_" if teacher else ""
    load_in_4bit = getattr(model_args, f"{prefix}load_in_4bit", False)
    load_in_8bit = getattr(model_args, f"{prefix}load_in_8bit", False)
    if load_in_4bit:
        dtype = (getattr(model_args, "teacher_dtype", None) if teacher else None) or model_args.dtype
        compute_dtype = getattr(model_args, "bnb_4bit_compute_dtype", None) or (
            dtype if dtype in DTYPES[1:] else "float32"
        )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        )
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def kbit_device_map() -> dict[str, Any] | None:
    """Device map that puts a quantized model whole on this process's device (one copy per DDP rank).

    TRL dropped `get_kbit_device_map` in 1.x; this is its behaviour: `{"": local_process_index}` on CUDA/XPU, `None`
    (load on CPU) otherwise.
    """
    state = PartialState()
    if state.device.type in ("cuda", "xpu"):
        return {"": state.local_process_index}
    return None


def _normalise_quantization(value: Any) -> BitsAndBytesConfig | None:
    if value is None or isinstance(value, BitsAndBytesConfig):
        return value
    if isinstance(value, dict):
        return BitsAndBytesConfig(**value)
    raise TypeError(
        f"quantization_config must be a transformers.BitsAndBytesConfig or a dict of its arguments, got "
        f"{type(value).__name__}."
    )


def init_kwargs_are_quantized(init_kwargs: dict[str, Any] | None) -> bool:
    """Whether `from_pretrained` keyword arguments ask for a 4-bit or 8-bit model."""
    quantization = (init_kwargs or {}).get("quantization_config")
    if quantization is None:
        return False
    if isinstance(quantization, dict):
        return bool(quantization.get("load_in_4bit") or quantization.get("load_in_8bit"))
    return bool(getattr(quantization, "load_in_4bit", False) or getattr(quantization, "load_in_8bit", False))


def load_causal_lm(
    name_or_path: str,
    init_kwargs: dict[str, Any] | None = None,
    quantization_config: BitsAndBytesConfig | dict | None = None,
    trust_remote_code: bool = False,
    role: str = "model",
    default_dtype: str | None = "float32",
) -> PreTrainedModel:
    """Loads a causal LM from a hub id or a local directory with `from_pretrained` keyword arguments.

    `dtype` may be a string (`"bfloat16"`, `"float16"`, `"float32"`, `"auto"`) or a `torch.dtype`; without one,
    `default_dtype` applies: `"float32"` for a student (as TRL's `SFTTrainer` loads it), `"auto"` (the checkpoint's
    dtype) for a teacher (as `GKDTrainer` loads it, with `from_pretrained`'s default).
    `quantization_config` may be a `BitsAndBytesConfig` or a dict of its arguments (from a YAML recipe). A quantized
    model is placed whole on this process's device (see [`kbit_device_map`]) unless `device_map` is given.

    Args:
        name_or_path (`str`): Hub model id or local directory.
        init_kwargs (`dict`, *optional*): `from_pretrained` keyword arguments (`TIPConfig.model_init_kwargs` or
            `teacher_model_init_kwargs`).
        quantization_config (`BitsAndBytesConfig` or `dict`, *optional*): Quantization; must not also be in
            `init_kwargs`.
        trust_remote_code (`bool`): Default of `trust_remote_code` when `init_kwargs` does not set it.
        role (`str`): `"student"` or `"teacher"`, for error messages.
        default_dtype (`str`, *optional*, defaults to `"float32"`): dtype when `init_kwargs` sets none (`None` or
            `"auto"`: the checkpoint's dtype).

    Returns:
        `PreTrainedModel`
    """
    kwargs = dict(init_kwargs or {})
    if quantization_config is not None:
        if kwargs.get("quantization_config") is not None:
            raise ValueError(
                f"The {role}'s quantization is set twice, as the trainer's quantization_config argument and in its "
                "init kwargs; set it in one place."
            )
        kwargs["quantization_config"] = quantization_config
    kwargs["quantization_config"] = _normalise_quantization(kwargs.get("quantization_config"))
    if kwargs["quantization_config"] is None:
        kwargs.pop("quantization_config")
    dtype = kwargs.get("dtype", default_dtype)
    if dtype is None:
        kwargs["dtype"] = "auto"
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"The {role}'s dtype={dtype!r} is not allowed; use one of {', '.join(DTYPES)}.")
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    elif not isinstance(dtype, torch.dtype):
        raise TypeError(f"The {role}'s dtype must be a torch.dtype or a string, got {type(dtype).__name__}.")
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    if "device_map" not in kwargs:
        state = PartialState()
        if "quantization_config" in kwargs:
            kwargs["device_map"] = kbit_device_map()
        elif state.distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP") or state.device.type in ("cpu", "mps"):
            kwargs["device_map"] = None
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` was loaded with bitsandbytes in 4 or 8 bits."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized_student(
    model: PreTrainedModel,
    peft_config: Any,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict | None = None,
) -> PreTrainedModel:
    """Checks and prepares a 4-bit / 8-bit student for adapter training (QLoRA).

    A quantized model cannot be fully fine-tuned: its quantized weights have no gradients. So a quantized student
    needs a `peft_config` (or to already be a `PeftModel`). The base model is then prepared with PEFT's
    `prepare_model_for_kbit_training` (frozen base, non-quantized weights in float32, input gradients for gradient
    checkpointing). Unquantized models are returned unchanged.

    Args:
        model (`PreTrainedModel`): The student.
        peft_config (`peft.PeftConfig`, *optional*): The adapter the trainer will add.
        gradient_checkpointing (`bool`): `args.gradient_checkpointing`.
        gradient_checkpointing_kwargs (`dict`, *optional*): `args.gradient_checkpointing_kwargs`.

    Returns:
        `PreTrainedModel`: The same model, prepared.
    """
    is_peft_model = False
    if is_peft_available():
        from peft import PeftModel

        is_peft_model = isinstance(model, PeftModel)
    if not is_quantized(model):
        return model
    _disable_cpu_inference_repacking(model)
    if is_peft_model:
        return model
    bits = 4 if getattr(model, "is_loaded_in_4bit", False) else 8
    if peft_config is None:
        raise ValueError(
            f"The student is loaded in {bits} bits, and a quantized model cannot be fully fine-tuned (its quantized "
            "weights get no gradients). Pass a peft_config (e.g. peft.LoraConfig(target_modules='all-linear'), or "
            "--use_peft in the CLI) to train adapters on top of it, or load the student unquantized."
        )
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
    )
    return model


def _disable_cpu_inference_repacking(model: nn.Module) -> None:
    """Keeps bitsandbytes from repacking a CPU student's 4-bit weights for inference.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a `Linear4bit` weight to a CPU-inference layout at the first
    forward in eval mode without grad, one way; later training forwards then fail in `matmul_4bit` ("a view of a leaf
    Variable that requires grad is being used in an in-place operation"). A student goes through eval mode (evaluation,
    a callback's generation), so the repacking is turned off for its layers. GPU layers never take that path.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_student_and_teacher(
    model,
    teacher_model,
    args,
    peft_config,
    quantization_config,
    teacher_quantization_config,
    trainer_name="TIPTrainer",
):
    """Loads a student / teacher given as id or path, checks and prepares a quantized student (QLoRA)."""
    if isinstance(model, str):
        init_kwargs = dict(args.model_init_kwargs or {})
        if peft_config is None and (
            init_kwargs_are_quantized(init_kwargs)
            or init_kwargs_are_quantized({"quantization_config": quantization_config})
        ):
            raise ValueError(
                f"The student {model!r} is to be loaded in 4 or 8 bits, and a quantized model cannot be fully "
                "fine-tuned (its quantized weights get no gradients). Pass a peft_config (e.g. "
                "peft.LoraConfig(target_modules='all-linear'), or --use_peft in the CLI), or load it unquantized."
            )
        model = load_causal_lm(model, init_kwargs, quantization_config, args.trust_remote_code, role="student")
    elif quantization_config is not None or args.model_init_kwargs is not None:
        raise ValueError(
            "quantization_config and args.model_init_kwargs apply to a student given as a model id or path; the "
            "student is already instantiated. Load it with the options you want, or pass its id or path."
        )
    if model is not None:
        model = prepare_quantized_student(
            model, peft_config, args.gradient_checkpointing, args.gradient_checkpointing_kwargs
        )
    if teacher_model is None:
        teacher_model = args.teacher_model_name_or_path
    if isinstance(teacher_model, str):
        teacher_model = load_causal_lm(
            teacher_model,
            args.teacher_model_init_kwargs,
            teacher_quantization_config,
            args.trust_remote_code,
            role="teacher",
            default_dtype="auto",  # GKDTrainer loads a teacher given by id with `from_pretrained`'s default dtype
        )
    elif teacher_quantization_config is not None or args.teacher_model_init_kwargs is not None:
        raise ValueError(
            "teacher_quantization_config and args.teacher_model_init_kwargs apply to a teacher given as a model id "
            "or path; the teacher is already instantiated."
        )
    if teacher_model is None:
        raise ValueError(f"{trainer_name} needs a teacher: pass teacher_model or set args.teacher_model_name_or_path.")
    return model, teacher_model
