"""Run one of TRL's own test modules against trl-tip's trainers, offline, as a drop-in check.

TRL's `tests/test_distillation_trainer.py` (or `tests/experimental/test_gkd_trainer.py`) is run with
`DistillationTrainer` replaced by `TIPDistillationTrainer` (`GKDTrainer` by `TIPTrainer`) and the config by ours with
`token_selection="all"` as its default, so every test exercises our trainer where it claims TRL's behaviour. The
module loads tiny models and the `zen` data set from the Hub (`trl-internal-testing/...`); this script builds offline
stand-ins from configs (same architectures, random weights, trl-tip's character tokenizer; a 32k-token tokenizer
with Phi-3.5's special-token ids for the Phi-3.5 model) in a private Hub cache, serves `zen` from code, and runs
pytest on a copy of the module in a work directory. TRL's test code is never copied into this repository: pass the
path of a TRL checkout's test file.

    python tools/trl_test_modules.py /path/to/trl/tests/test_distillation_trainer.py
    python tools/trl_test_modules.py /path/to/trl/tests/experimental/test_gkd_trainer.py
    python tools/trl_test_modules.py FILE --baseline        # TRL's own trainer on the same stand-ins
    python tools/trl_test_modules.py FILE -- -k train -x    # arguments after `--` go to pytest

Models with no stand-in here (vision-language models, custom-code models, anything not in `STAND_INS`) are reported
and their tests deselected by name (`--keep-unbuilt` runs them anyway, to see them fail). TRL's configs default to
bf16, which `TrainingArguments` refuses on a CPU; the run validates configs as on a bf16-capable accelerator (the
computation is CPU autocast), for TRL's trainer and ours alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = re.compile(r"trl-internal-testing/([A-Za-z0-9_.-]+)")
DATASETS = {"zen", "zen-image"}

# Stand-in name -> (architecture, size, tokenizer kind). Sizes are tiny; `small-` teachers are wider than `tiny-`.
STAND_INS = {
    "tiny-Qwen3ForCausalLM": ("qwen3", 16, "toy"),
    "small-Qwen3ForCausalLM": ("qwen3", 32, "toy"),
    "tiny-Qwen3MoeForCausalLM": ("qwen3_moe", 16, "toy"),
    "tiny-Qwen2ForCausalLM-2.5": ("qwen2", 16, "toy"),
    "tiny-LlamaForCausalLM-3.2": ("llama", 16, "toy-wide"),  # another vocabulary size, as the real pair has
    "tiny-MistralForCausalLM-0.2": ("mistral", 16, "toy-no-pad"),  # its tokenizer has no pad token
    "tiny-Phi3ForCausalLM-3.5": ("phi3", 16, "phi3"),
}

ZEN = [
    "Beautiful is better than ugly.",
    "Explicit is better than implicit.",
    "Simple is better than complex.",
    "Complex is better than complicated.",
    "Flat is better than nested.",
    "Sparse is better than dense.",
    "Readability counts.",
    "Special cases aren't special enough to break the rules.",
    "Although practicality beats purity.",
    "Errors should never pass silently.",
    "Unless explicitly silenced.",
    "In the face of ambiguity, refuse the temptation to guess.",
    "There should be one obvious way to do it.",
    "Although that way may not be obvious at first.",
    "Now is better than never.",
    "Although never is often better than right now.",
    "If the implementation is hard to explain, it's a bad idea.",
    "If the implementation is easy to explain, it may be a good idea.",
    "Namespaces are one honking great idea.",
]

# The harness's conftest: loaded by pytest before the test module, so the patches are in place for its imports.
CONFTEST = """
import os

import datasets
import transformers.training_args

# TRL's configs default to bf16: validate them as on a bf16-capable accelerator (the CPU computes under autocast).
transformers.training_args.is_torch_bf16_gpu_available = lambda: True

ZEN = {zen!r}
_load_dataset = datasets.load_dataset


def _zen(name):
    def rows(lines):
        if name == "standard_prompt_only":
            return [{{"prompt": " ".join(line.split()[:3])}} for line in lines]
        if name == "conversational_prompt_only":
            return [{{"prompt": [{{"role": "user", "content": " ".join(line.split()[:3])}}]}} for line in lines]
        if name == "standard_language_modeling":
            return [{{"text": line}} for line in lines]
        if name == "conversational_language_modeling":
            return [
                {{"messages": [{{"role": "user", "content": " ".join(line.split()[:3])}},
                              {{"role": "assistant", "content": " ".join(line.split()[3:]) or line}}]}}
                for line in lines
            ]
        raise ValueError(f"no offline stand-in for zen config {{name!r}}")

    return datasets.DatasetDict(
        {{"train": datasets.Dataset.from_list(rows(ZEN[:17])), "test": datasets.Dataset.from_list(rows(ZEN[17:]))}}
    )


def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
    if path != "trl-internal-testing/zen":
        return _load_dataset(path, name, *args, split=split, streaming=streaming, **kwargs)
    data = _zen(name)
    if streaming:
        data = datasets.IterableDatasetDict({{k: v.to_iterable_dataset() for k, v in data.items()}})
    return data if split is None else data[split]


datasets.load_dataset = load_dataset

if os.environ["TRL_TEST_MODULES_UNDER_TEST"] != "baseline":
    import dataclasses

    import trl
    import trl.experimental.gkd as gkd

    from trl_tip import TIPConfig, TIPDistillationConfig, TIPDistillationTrainer, TIPTrainer

    @dataclasses.dataclass
    class AllTokensDistillationConfig(TIPDistillationConfig):
        token_selection: str = "all"

    @dataclasses.dataclass
    class AllTokensConfig(TIPConfig):
        token_selection: str = "all"

    trl.DistillationConfig, trl.DistillationTrainer = AllTokensDistillationConfig, TIPDistillationTrainer
    gkd.GKDConfig, gkd.GKDTrainer = AllTokensConfig, TIPTrainer
"""

# The helpers TRL's test modules import from `tests/testing_utils.py`, for a CPU machine.
TESTING_UTILS = """
import pytest
import torch
from transformers import is_bitsandbytes_available
from transformers.utils import is_peft_available, is_vision_available

from trl.import_utils import is_liger_kernel_available, is_vllm_available


class TrlTestCase:
    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)


def _skip(reason):
    return pytest.mark.skipif(True, reason=reason)


require_bitsandbytes = pytest.mark.skipif(not is_bitsandbytes_available(), reason="test requires bitsandbytes")
require_peft = pytest.mark.skipif(not is_peft_available(), reason="test requires peft")
require_vision = pytest.mark.skipif(not is_vision_available(), reason="test requires vision")
require_vllm = pytest.mark.skipif(not is_vllm_available(), reason="test requires vllm")
require_liger_kernel = pytest.mark.skipif(not is_liger_kernel_available(), reason="test requires liger-kernel")
require_torch_accelerator = pytest.mark.skipif(not torch.cuda.is_available(), reason="test requires accelerator")
# Tool-call parsing needs the real Qwen3 tokenizer (its response schema and token ids): no offline stand-in.
require_response_parsing = _skip("needs the real Qwen3 tokenizer's response schema: no offline stand-in")
"""


def toy_tokenizer(kind: str):
    """trl-tip's character tokenizer (`toy`), with extra tokens (`toy-wide`) or without a pad token (`toy-no-pad`)."""
    from trl_tip.toy import make_tokenizer

    tokenizer = make_tokenizer()
    if kind == "toy-wide":
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(16)])
    if kind == "toy-no-pad":
        tokenizer.pad_token = None
    return tokenizer


def phi3_tokenizer():
    """A word-level tokenizer of Phi-3.5's size whose special tokens have Phi-3.5's ids (`<|endoftext|>` 32000,
    `<|assistant|>` 32001, `<|end|>` 32007, `<|user|>` 32010) and no pad token, as Phi-3.5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trl_tip.toy import CHAT_TEMPLATE

    specials = {32000: "<|endoftext|>", 32001: "<|assistant|>", 32007: "<|end|>", 32010: "<|user|>"}
    words = sorted({word.strip(".,'").lower() for line in ZEN for word in line.split()} | {"?"})
    vocab = {token: i for i, token in enumerate(words)}
    vocab.update({f"<w{i}>": i for i in range(len(words), 32000)})
    vocab.update({specials.get(i, f"<|placeholder{i}|>"): i for i in range(32000, 32064)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        unk_token="?",
        additional_special_tokens=list(specials.values()),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_stand_in(name: str, hub: Path) -> None:
    """Writes `trl-internal-testing/{name}` into the Hub cache `hub`, as `from_pretrained` offline reads it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    architecture, width, tokenizer_kind = STAND_INS[name]
    tokenizer = phi3_tokenizer() if tokenizer_kind == "phi3" else toy_tokenizer(tokenizer_kind)
    options = dict(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    if architecture in ("qwen3", "qwen3_moe"):
        options["head_dim"] = width // 4
    if architecture == "qwen3_moe":
        options.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=width)
    if architecture == "phi3":
        options.update(vocab_size=32064, pad_token_id=None, eos_token_id=32000, bos_token_id=1)
    config = AutoConfig.for_model(architecture, **options)
    torch.manual_seed(int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2**31)
    model = AutoModelForCausalLM.from_config(config)
    if architecture == "phi3":  # Phi-3.5 ends a turn with `<|end|>`, declared as eos by its generation config only
        model.generation_config = GenerationConfig(eos_token_id=[32007, 32001, 32000], bos_token_id=1)
    commit = hashlib.sha1(name.encode()).hexdigest()
    repo = hub / f"models--trl-internal-testing--{name}"
    snapshot = repo / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def tests_of_models(test_file: Path, names: set[str]) -> list[str]:
    """Test functions of `test_file` whose source names one of the model `names` (for `-k` deselection)."""
    source = test_file.read_text()
    chunks = re.split(r"\n    def (test_\w+)\(", source)
    return sorted({chunks[i] for i in range(1, len(chunks), 2) if any(n in chunks[i + 1] for n in names)})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_file", type=Path, help="a TRL test module, e.g. trl/tests/test_distillation_trainer.py")
    parser.add_argument("--baseline", action="store_true", help="run TRL's own trainer instead of trl-tip's")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trl-test-modules"), help="where to work")
    parser.add_argument("--keep-unbuilt", action="store_true", help="also run tests of models with no stand-in")
    args = parser.parse_args(argv)

    source = args.test_file.read_text()
    depth = len(re.search(r"from (\.+)testing_utils import", source).group(1)) if "testing_utils" in source else 1
    package = args.workdir / "tests"
    if package.exists():
        shutil.rmtree(package)
    module_dir = package if depth == 1 else package / "experimental"  # `from ..testing_utils`: one level down
    module_dir.mkdir(parents=True)
    for folder in {package, module_dir}:
        (folder / "__init__.py").touch()
    (package / "testing_utils.py").write_text(TESTING_UTILS)
    shutil.copy(args.test_file, module_dir / args.test_file.name)
    (args.workdir / "conftest.py").write_text(CONFTEST.format(zen=ZEN))

    hub = args.workdir / "hub"
    ids = set(MODEL_ID.findall(source)) - DATASETS
    built, unbuilt = sorted(ids & set(STAND_INS)), sorted(ids - set(STAND_INS))
    for name in built:
        build_stand_in(name, hub)
    print(f"stand-ins built: {', '.join(built)}")
    deselected = [] if args.keep_unbuilt else tests_of_models(args.test_file, set(unbuilt))
    if unbuilt:
        print(f"no stand-in for: {', '.join(unbuilt)}; deselected: {', '.join(deselected) or 'none'}")
    if deselected:
        pytest_args = ["-k", " and ".join(f"not {name}" for name in deselected), *pytest_args]

    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    env["TRL_TEST_MODULES_UNDER_TEST"] = "baseline" if args.baseline else "trl-tip"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(args.workdir), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(args.workdir)]
    command += [str(module_dir / args.test_file.name), *pytest_args]
    print(f"under test: {'TRL (baseline)' if args.baseline else 'trl-tip, token_selection=all'}")
    print(json.dumps(command))
    return subprocess.call(command, cwd=args.workdir, env=env)


if __name__ == "__main__":
    sys.exit(main())
