"""Random-weight Llama models for the benchmarks that run a whole model (no download)."""

from __future__ import annotations

import torch

#: Base models of the pyreft-step and multi-generate suites: name -> LlamaConfig keywords. Random
#: weights (no download); "smollm2" has SmolLM2-135M's shape.
RANDOM_LLAMAS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "d2048": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=16, vocab_size=1000),
}  # fmt: skip


def random_llama(name: str, device: torch.device) -> torch.nn.Module:
    """A float32 ``LlamaForCausalLM`` of ``RANDOM_LLAMAS[name]``'s shape with random weights, in
    eval mode and frozen, on ``device``. Raises ImportError without transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**RANDOM_LLAMAS[name])).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
