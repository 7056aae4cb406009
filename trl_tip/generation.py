"""On-policy generation once per optimizer step, batched, with sampling that does not depend on the batching.

`TIPTrainer` generates the completions of all micro-batches of an optimizer step together (GKD generates them one
micro-batch at a time). Three pieces make that fast and reproducible:

* **Batch-invariant sampling** ([`GumbelSampler`]): `generate` runs greedy decoding, and a logits processor adds
  Gumbel noise to the (temperature-scaled, top-k/top-p-filtered) scores first, so the argmax is an exact sample of
  `softmax(scores)` (the Gumbel-max trick). The noise is a counter-based hash of `(seed, step, process, row, position,
  token)` — no global RNG is consumed — so a row's completion is the same whether it is generated alone, with its
  micro-batch, or with the whole step, and whether by one `generate` call or several.
* **Shape buckets** ([`StepGenerator`]): prompts are left-padded to a multiple of `pad_to_multiple_of`, computed over
  the whole step, so every chunk of rows sees the same padding; results are cut back to each micro-batch's own prompt
  width and completion length, exactly the tensors GKD's `generate_on_policy_outputs` returns.
* **A fast decode path** (`static_cache=True` with a `CompileConfig`): a persistent static KV cache of fixed length
  and a fixed number of rows per call (short chunks are filled with rows that stop at once), so transformers' compiled
  decode step (`torch.compile`, CUDA graphs) is built once per run and reused, whatever the prompt lengths within the
  cache.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from transformers import GenerationConfig, StaticCache
from transformers.generation import (
    CompileConfig,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.utils import logging

from ._compat import forward_hooks, is_input_require_grads_hook, static_kv_cache, unwrap_model_for_generation


__all__ = [
    "GumbelSampler",
    "Rollout",
    "StepGenerator",
    "fast_generation_problem",
    "parse_fast_generation",
    "gumbel_from_hash",
    "is_compile_failure",
    "mix32",
    "no_duplicate_embedding_hooks",
    "no_input_require_grads_hooks",
    "rollout_tensors",
    "row_keys",
    "sampling_warpers",
    "unwrap_for_generation",
]

logger = logging.get_logger(__name__)

MASK32 = 0xFFFFFFFF
# Odd constants below 2**31 (hash-prospector's 32-bit "lowbias" family): a 32-bit value times one stays below 2**63,
# so the integer arithmetic never overflows int64, on every device.
_M1, _M2 = 0x21F0AAAD, 0x735A2D97


def mix32(x):
    """A 32-bit integer hash (xor-shift-multiply, full avalanche), on a Python int or an int64 tensor in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 15)


def row_keys(seed: int, step: int, process: int, rows: torch.Tensor) -> torch.Tensor:
    """32-bit keys `(N,)` (int64) of the rows `rows` (indices within the step) of optimizer step `step`."""
    base = mix32(mix32(mix32(mix32(seed & MASK32) ^ ((seed >> 32) & MASK32)) ^ (step & MASK32)) ^ (process & MASK32))
    return mix32(rows.to(torch.int64) ^ base)


def gumbel_from_hash(hashed: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from 32-bit hashes: `-log(-log(u))`, `u` on the 2**-23 grid strictly inside (0, 1).

    23 bits: `(k + 0.5) / 2**23` is exact in float32 up to `1 - 2**-24` (a 24-bit grid would round its top to 1).
    """
    u = ((hashed >> 9).to(torch.float32) + 0.5) * (2.0**-23)
    return -torch.log(-torch.log(u))


def _add_gumbel(scores: torch.Tensor, vocab_hash: torch.Tensor, step_keys: torch.Tensor) -> torch.Tensor:
    """`scores + G` with `G[r, v] = gumbel(mix32(vocab_hash[v] ^ step_keys[r]))` (filtered `-inf` scores stay)."""
    return scores + gumbel_from_hash(mix32(vocab_hash[None, :] ^ step_keys[:, None]))


def sampling_warpers(config: GenerationConfig) -> list[LogitsProcessor]:
    """The logits warpers `generate` applies before sampling with `config` (transformers' order and conditions)."""
    warpers: list[LogitsProcessor] = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if getattr(config, "top_h", None) is not None:
        warpers.append(TopHLogitsWarper(top_h=config.top_h))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=1))
    return warpers


class GumbelSampler(LogitsProcessor):
    """Makes greedy decoding sample exactly from `softmax(warped scores)`, with batch-independent randomness.

    Appended to `generate`'s logits processors with `do_sample=False`: it applies the sampling warpers (temperature,
    top-k, top-p, ...) and adds Gumbel noise; the argmax `generate` then takes is a sample (the Gumbel-max trick). The
    noise of row `r` at completion position `t` and token `v` is a hash of `(keys[r], t, v)` only.

    Args:
        keys (`torch.Tensor`): `(N,)` int64 row keys (see [`row_keys`]), on the device of the scores.
        prompt_width (`int`): Columns of the prompt in `input_ids` (the completion position is counted from there).
        max_new_tokens (`int`): Completion positions the keys are prepared for.
        warpers (sequence of `LogitsProcessor`): Applied to the scores before the noise, in order.
        noise_fn (`Callable`, *optional*): `(scores, vocab_hash, step_keys) -> scores + noise`; defaults to the eager
            function, [`StepGenerator`] passes a compiled one on its fast path.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        prompt_width: int,
        max_new_tokens: int,
        warpers: Sequence[LogitsProcessor] = (),
        noise_fn: Callable | None = None,
    ):
        positions = torch.arange(max_new_tokens, dtype=torch.int64, device=keys.device)
        # (N, max_new_tokens): one key per row and completion position, so a step needs no host-to-device copy.
        self.step_keys = mix32(keys[:, None] ^ mix32(positions)[None, :])
        self.prompt_width = prompt_width
        self.warpers = list(warpers)
        self.noise_fn = noise_fn or _add_gumbel
        self._vocab_hash: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        position = input_ids.shape[1] - self.prompt_width
        if not 0 <= position < self.step_keys.shape[1]:
            raise RuntimeError(
                f"GumbelSampler was asked for completion position {position}; it was built for "
                f"{self.step_keys.shape[1]} (prompt width {self.prompt_width})."
            )
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        vocab = scores.shape[-1]
        if self._vocab_hash is None or self._vocab_hash.numel() != vocab:
            self._vocab_hash = mix32(torch.arange(vocab, dtype=torch.int64, device=scores.device))
        return self.noise_fn(scores, self._vocab_hash, self.step_keys[:, position].contiguous())


class _FinishedRows(StoppingCriteria):
    """Marks the filler rows of a chunk finished from the first step, so they never prolong the generation."""

    def __init__(self, done: torch.Tensor):
        self.done = done

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return self.done


@dataclass
class Rollout:
    """The generated micro-batch, in GKD's format: prompt + completion, with the prompt and padding labelled -100."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def _eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, device=device) if ids else None


def completion_lengths(completions: torch.Tensor, eos_token_id) -> torch.Tensor:
    """Tokens up to and including the first EOS of each row (the row's width without EOS), `(B,)`."""
    eos = _eos_tensor(eos_token_id, completions.device)
    width = completions.size(1)
    if eos is None:
        return torch.full((completions.size(0),), width, dtype=torch.long, device=completions.device)
    is_eos = torch.isin(completions, eos)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], width, dtype=torch.long))
    return torch.clamp(first + 1, max=width)


def rollout_tensors(
    prompts: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor, eos_token_id
) -> Rollout:
    """GKD's `generate_on_policy_outputs` post-processing of `prompts` followed by the sampled `completions`.

    Everything after a row's first EOS is masked (`eos_token_id` may be a list); prompt positions keep the prompt mask
    and are labelled -100, so only the completion is trained on.
    """
    generated = torch.cat([prompts, completions], dim=1)
    prompt_length = prompts.size(1)
    lengths = completion_lengths(completions, eos_token_id)
    positions = torch.arange(completions.size(1), device=completions.device)
    completion_mask = (positions[None, :] < lengths[:, None]).to(prompt_mask.dtype)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = generated.clone()
    labels[attention_mask == 0] = -100
    labels[:, :prompt_length] = -100
    return Rollout(generated, attention_mask, labels)


def parse_fast_generation(value: Any) -> bool | str:
    """`fast_generation` as `True`, `False` or `"auto"` (also from the strings a command line gives)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.strip().lower()]
    raise ValueError(f"fast_generation must be one of 'auto', True or False, got {value!r}.")


def fast_generation_problem(model: nn.Module, device: torch.device) -> str | None:
    """Why the fast path (static cache + compiled decode step) cannot run `model` safely here, or `None`.

    transformers compiles the decode step only on an accelerator and not for some quantized or offloaded models; it
    then falls back to eager decoding with a static cache silently. trl-tip refuses those set-ups instead.
    """
    if device.type != "cuda":
        return f"it needs a CUDA device (torch.compile with CUDA graphs); this run is on {device.type}"
    modules = list(model.modules())
    quantized = [type(m).__name__ for m in modules if type(m).__module__.startswith("bitsandbytes")]
    if quantized or any(getattr(m, "hf_quantizer", None) is not None for m in modules):
        kind = quantized[0] if quantized else "a quantized model"
        return (
            f"the model is quantized ({kind}): its kernels are not captured safely in the compiled, CUDA-graphed "
            "decode step"
        )
    for m in modules:
        device_map = getattr(m, "hf_device_map", None)
        if device_map and ({"cpu", "disk"} & {str(d) for d in device_map.values()}):
            return "the model is offloaded to CPU or disk (device_map), which transformers does not compile"
    return None


# Where torch.compile's failures come from: dynamo (tracing, guards, `BackendCompilerFailed`), inductor (code
# generation, CUDA graphs) and Triton (kernel compilation).
COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "triton")
COMPILER_PATHS = ("/torch/_dynamo/", "/torch/_inductor/", "/triton/")


def is_compile_failure(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) comes from torch.compile's stack rather than the model.

    Out-of-memory errors are never counted (falling back would hide them). An error raised inside compiled code also
    passes through dynamo's frames; retrying it on the default path then raises it again, unmasked.
    """
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.OutOfMemoryError):
            return False
        if type(current).__module__.startswith(COMPILER_MODULES):
            return True
        tb = current.__traceback__
        while tb is not None:
            if any(part in tb.tb_frame.f_code.co_filename.replace("\\", "/") for part in COMPILER_PATHS):
                return True
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    return False


def _hook_names(hooks) -> list[str]:
    return [getattr(hook, "__qualname__", repr(hook)) for hook in hooks.values()]


@contextmanager
def no_duplicate_embedding_hooks(model: nn.Module) -> Iterator[None]:
    """Removes, on exit, the input-embedding forward hooks added inside that duplicate one registered before.

    Re-enabling gradient checkpointing (TRL's `unwrap_model_for_generation` does it after every generation) makes
    transformers register another `enable_input_require_grads` hook on the input embeddings, which disabling it does
    not remove for a model without transformers-integrated PEFT: one more hook per generation, all doing the same
    thing, each called by every later forward (a run of `n` steps calls `n` of them per forward, decode forwards
    included), and a compiled decode step guards on the hook count, so it would recompile at every step. Only a new
    hook with the same name as one still registered from before goes; every hook present before stays, and a model
    whose disabling did remove its hook keeps the new one.
    """
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    before = [(m, set(forward_hooks(m))) for m in embeddings]
    try:
        yield
    finally:
        for module, keys in before:
            hooks = forward_hooks(module)
            kept = set(_hook_names({k: h for k, h in hooks.items() if k in keys}))
            for key in [k for k in hooks if k not in keys]:
                if _hook_names({key: hooks[key]})[0] in kept:
                    del hooks[key]


@contextmanager
def no_input_require_grads_hooks(model: nn.Module) -> Iterator[None]:
    """Takes the input embeddings' `requires_grad_` hooks (`_compat.INPUT_REQUIRE_GRADS_HOOKS`, registered for
    gradient checkpointing) off for the duration, and puts them back in their places after.

    Sampling runs without autograd, where they do nothing, but `torch.compile` cannot trace `requires_grad_()`: in a
    compiled decode step each call is a graph break that splits the step into several graphs (measured: 4 breaks per
    step on an H100 with TRL's gradient-checkpointed student).
    """
    saved = []
    for module in model.modules():
        if not isinstance(module, nn.Embedding):
            continue
        hooks = forward_hooks(module)
        removed = [k for k, h in hooks.items() if is_input_require_grads_hook(h)]
        if removed:
            saved.append((module, dict(hooks)))
            for key in removed:
                del hooks[key]
    try:
        yield
    finally:
        for module, before in saved:
            hooks = forward_hooks(module)
            added = {k: h for k, h in hooks.items() if k not in before}
            hooks.clear()
            hooks.update(before)
            hooks.update(added)


@contextmanager
def unwrap_for_generation(model: nn.Module, accelerator, **kwargs) -> Iterator[nn.Module]:
    """TRL's `unwrap_model_for_generation` (gradient checkpointing off inside), without its hook leak (see
    [`no_duplicate_embedding_hooks`])."""
    with (
        no_duplicate_embedding_hooks(accelerator.unwrap_model(model)),
        unwrap_model_for_generation(model, accelerator, **kwargs) as unwrapped,
    ):
        yield unwrapped


class StepGenerator:
    """Generates the completions of several micro-batches in as few `generate` calls as `batch_size` allows.

    Args:
        generation_config (`GenerationConfig`):
            The sampling configuration (GKD's: `max_new_tokens`, `temperature`, `top_k=0`, `top_p=1.0`, `pad_token_id`,
            `eos_token_id`). Values it leaves unset are taken from the model's own generation config at each call,
            as `generate` does. Beam search is not supported (on-policy sampling is one sample per prompt).
        seed (`int`): Seed of the sampling noise (the run's seed).
        process_index (`int`, *optional*, defaults to `0`): This process; processes sample different noise.
        batch_size (`int`, *optional*): Rows per `generate` call; `None` generates all rows at once.
        pad_to_multiple_of (`int`, *optional*, defaults to `64`): Prompts are left-padded to a multiple of this.
        static_cache (`bool`, *optional*, defaults to `False`):
            Use a persistent static KV cache (one per model), `batch_size` rows per call (short chunks filled with
            rows that stop at once). Its length is the longest padded prompt seen plus `max_new_tokens`; a longer
            prompt grows it (a new cache, and a recompilation of a compiled decode step, logged).
        compile_config (`CompileConfig`, *optional*):
            With `static_cache`, transformers compiles the decode step with it; the sampling noise is then compiled
            with the same backend. `None` decodes eagerly.
        autocast_dtype (`torch.dtype`, *optional*):
            With `static_cache`, every `generate` call runs under `torch.autocast` with this dtype (`None`: autocast
            off), whatever autocast the caller had: the static cache takes its dtype from the first keys it stores,
            so every call must produce keys of the same dtype. Use the training's mixed-precision dtype.
    """

    def __init__(
        self,
        generation_config: GenerationConfig,
        seed: int,
        process_index: int = 0,
        batch_size: int | None = None,
        pad_to_multiple_of: int = 64,
        static_cache: bool = False,
        compile_config: CompileConfig | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}.")
        if static_cache and batch_size is None:
            raise ValueError("static_cache needs a fixed batch_size (rows per generate call).")
        if compile_config is not None and not static_cache:
            raise ValueError("compile_config needs static_cache=True (transformers compiles only static caches).")
        if generation_config.max_new_tokens is None or generation_config.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {generation_config.max_new_tokens}.")
        if (generation_config.num_beams or 1) > 1:
            raise ValueError("StepGenerator samples one completion per prompt; num_beams must be 1.")
        self.sampling_config = copy.deepcopy(generation_config)
        self.max_new_tokens = generation_config.max_new_tokens
        self.pad_token_id = generation_config.pad_token_id
        self.eos_token_id = generation_config.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("The generation config needs a pad_token_id (the prompts are left-padded with it).")
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.batch_size = batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.static_cache = static_cache
        self.compile_config = compile_config
        self.autocast_dtype = autocast_dtype
        self._caches: dict[int, tuple[StaticCache, int]] = {}
        self._noise_fn = None
        if compile_config is not None:
            self._noise_fn = torch.compile(_add_gumbel, backend=compile_config.backend, dynamic=False, fullgraph=True)
        self.num_calls = 0
        self.num_cache_builds = 0
        self.num_compile_failures = 0
        self.decode_steps = 0

    # ------------------------------------------------------------------ configs

    def _decode_config(self) -> GenerationConfig:
        """The config handed to `generate`: greedy (the sampler makes it a sample), no sampling flags of its own."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            # The sampler applies the sampling flags itself. Greedy decoding ignores them, but values left unset would
            # be filled in from the model's generation config and reported as "not valid" at every call; these are
            # the values transformers does not report (its defaults).
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
        if self.compile_config is not None:
            kwargs["compile_config"] = self.compile_config
        else:
            kwargs["disable_compile"] = True
        return GenerationConfig(**kwargs)

    def _merged_sampling_config(self, model: nn.Module) -> GenerationConfig:
        """The sampling config with the values it leaves unset taken from `model`'s generation config."""
        merged = copy.deepcopy(self.sampling_config)
        model_config = getattr(model, "generation_config", None)
        if model_config is not None:
            merged.update(**model_config.to_dict(), defaults_only=True)
        return merged

    # ------------------------------------------------------------------ shapes

    def prompt_width(self, prompts: Sequence[torch.Tensor]) -> int:
        """The padded prompt width of a set of micro-batches: their widest prompt, rounded up to the bucket."""
        widest = max(p.size(1) for p in prompts)
        return int(math.ceil(widest / self.pad_to_multiple_of) * self.pad_to_multiple_of)

    def _cache(self, model: nn.Module, length: int) -> StaticCache:
        key = id(model)
        cache, cache_length = self._caches.get(key, (None, 0))
        if cache is None or cache_length < length:
            if cache is not None:
                logger.warning(
                    f"A prompt needs a longer static KV cache ({cache_length} -> {length} positions): a new cache is "
                    "allocated and the compiled decode step is compiled again for it (once). Raise "
                    "generation_pad_to_multiple_of to bucket prompt lengths more coarsely."
                )
            config = model.config.get_text_config(decoder=True)
            cache, cache_length = static_kv_cache(config, length), length
            self._caches[key] = (cache, cache_length)
            self.num_cache_builds += 1
        else:
            cache.reset()
        return cache

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        model: nn.Module,
        prompts: Sequence[torch.Tensor],
        prompt_masks: Sequence[torch.Tensor],
        row_ids: Sequence[torch.Tensor],
        step: int,
    ) -> list[Rollout]:
        """Completions for micro-batches `prompts[i]` (left-padded `(B_i, P_i)`, masks `prompt_masks[i]`).

        Args:
            model: The model to sample from (unwrapped, gradient checkpointing off).
            prompts, prompt_masks: One left-padded prompt tensor and its attention mask per micro-batch.
            row_ids: `(B_i,)` index of each row within the optimizer step (seeds its noise).
            step: The optimizer step (seeds the noise).

        Returns:
            One [`Rollout`] per micro-batch, equal to what GKD's `generate_on_policy_outputs` returns for that
            micro-batch alone with these samples.

        A compilation failure of the fast path (dynamo, inductor, Triton) is not fatal: it is logged as a warning and
        this generator continues without the static cache and the compilation (the samples are the same).
        """
        try:
            return self._generate(model, prompts, prompt_masks, row_ids, step)
        except Exception as exc:
            if self.compile_config is None or not is_compile_failure(exc):
                raise
            first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            logger.warning(
                f"The compiled decode step failed ({type(exc).__name__}: {first_line}); generating without the "
                "static KV cache and the compilation from now on (the default path, same samples, slower)."
            )
            self.static_cache, self.compile_config, self._noise_fn = False, None, None
            self._caches.clear()
            self.num_compile_failures += 1
            return self._generate(model, prompts, prompt_masks, row_ids, step)

    @torch.no_grad()
    def _generate(
        self,
        model: nn.Module,
        prompts: Sequence[torch.Tensor],
        prompt_masks: Sequence[torch.Tensor],
        row_ids: Sequence[torch.Tensor],
        step: int,
    ) -> list[Rollout]:
        if not prompts:
            return []
        device = prompts[0].device
        width = self.prompt_width(prompts)
        padded, masks = [], []
        for p, m in zip(prompts, prompt_masks, strict=True):
            extra = width - p.size(1)
            padded.append(nn.functional.pad(p, (extra, 0), value=self.pad_token_id))
            masks.append(nn.functional.pad(m, (extra, 0), value=0))
        all_prompts, all_masks = torch.cat(padded), torch.cat(masks)
        all_rows = torch.cat([r.to(device) for r in row_ids])
        total = all_prompts.size(0)
        chunk = self.batch_size or total
        keys = row_keys(self.seed, step, self.process_index, all_rows)
        merged = self._merged_sampling_config(model)
        warpers = sampling_warpers(merged)
        config = self._decode_config()
        rows: list[torch.Tensor] = []
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            ids, mask, chunk_keys = all_prompts[start:stop], all_masks[start:stop], keys[start:stop]
            real = stop - start
            kwargs = {}
            if self.static_cache:
                fill = chunk - real
                if fill:
                    # Filler rows (a copy of the first prompt, noise keys past the real rows') keep the shapes fixed.
                    ids = torch.cat([ids, ids[:1].expand(fill, -1)])
                    mask = torch.cat([mask, mask[:1].expand(fill, -1)])
                    filler_rows = torch.arange(fill, device=device) + (int(all_rows.max()) + 1)
                    chunk_keys = torch.cat([chunk_keys, row_keys(self.seed, step, self.process_index, filler_rows)])
                    done = torch.arange(chunk, device=device) >= real
                    kwargs["stopping_criteria"] = StoppingCriteriaList([_FinishedRows(done)])
                kwargs["past_key_values"] = self._cache(model, width + self.max_new_tokens)
            sampler = GumbelSampler(chunk_keys, width, self.max_new_tokens, warpers, self._noise_fn)
            with self._autocast(device), no_input_require_grads_hooks(model):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([sampler]),
                    **kwargs,
                )
            sequences = out.sequences if hasattr(out, "sequences") else out
            completions = sequences[:real, width:]
            self.num_calls += 1
            self.decode_steps += completions.size(1)
            rows.extend(completions.unbind(0))
        return self._split(prompts, prompt_masks, rows)

    def _autocast(self, device: torch.device):
        """The static cache's one autocast state (see `autocast_dtype`); the dynamic path keeps the caller's."""
        if not self.static_cache:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _split(self, prompts, prompt_masks, rows: list[torch.Tensor]) -> list[Rollout]:
        """Per micro-batch: its rows' completions cut to the length its own `generate` call would have produced."""
        rollouts, start = [], 0
        for p, m in zip(prompts, prompt_masks, strict=True):
            own = rows[start : start + p.size(0)]
            start += p.size(0)
            longest = max(r.size(0) for r in own)
            completions = torch.stack(
                [nn.functional.pad(r, (0, longest - r.size(0)), value=self.pad_token_id) for r in own]
            )
            # `generate` stops when every row has ended (or at max_new_tokens): the micro-batch's completion width is
            # its longest row up to the first EOS; the columns after are padding another row's length added.
            if completions.size(1):
                completions = completions[:, : int(completion_lengths(completions, self.eos_token_id).max())]
            rollouts.append(rollout_tensors(p, m, completions, self.eos_token_id))
        return rollouts
