"""The tiny random Llama the Hugging Face tests build (no hub downloads)."""

import torch


def tiny_llama(seed=0, hidden=32, layers=2, vocab=96, kv_heads=2, dtype=torch.float32):
    """A random Llama (4 attention heads, ``kv_heads`` key/value heads) in eval mode, ``dtype``.

    Seeded by ``seed``; pad id 0, bos 1, and no eos in the generation config, so ``generate``
    never stops early.
    """
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
