"""Build a demo for the serving example offline: a tiny random Llama with a byte-level BPE
tokenizer, and three ReFT adapters with random, clearly non-trivial weights.

Nothing is downloaded and nothing is trained: the model and the adapters are random, so every
answer is gibberish, but each adapter's gibberish is its own (they differ in intervention type,
rank, layers and positions, as the adapters of a real deployment may). Run (a few seconds):

    python examples/serve/make_demo.py --out demo

It writes ``OUT/model`` (``config.json``, weights and tokenizer files, loadable with
``AutoModelForCausalLM`` and ``AutoTokenizer``) and ``OUT/adapters/<name>`` (one
``ReftModel.save_pretrained`` adapter folder each), and prints the server's command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import reft_ext

#: Text the tokenizer's merges are learned from.
CORPUS = [
    "hello there, how are you today?",
    "what is the weather like in the harbour?",
    "tell me a story about the sea",
    "please summarise the report",
    "can you help me with my code?",
    "why is the sky blue?",
    "write a short poem about rain",
    "the quick brown fox jumps over the lazy dog",
]

#: The demo's adapters, by name.
ADAPTERS = {
    "pirate": reft_ext.ReftConfig(layers=[1, 2], rank=4, intervention="loreft", positions="f1+l1"),
    "robot": reft_ext.ReftConfig(layers=[2], rank=2, intervention="direft", positions="l3"),
    "poet": reft_ext.ReftConfig(layers="all", rank=8, intervention="noreft", positions="l1"),
}


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer learned from ``CORPUS``: any text encodes and decodes back.

    Specials ``<pad>`` (id 0), ``<s>`` (1, prepended to every text) and ``</s>`` (2); it pads on
    the left, as batched generation needs.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )


def build_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A tiny random Llama (4 blocks of width 64) in eval mode; ``<pad>`` pads, ``</s>`` ends.

    Its weights are drawn 10× wider than transformers' default (initializer_range 0.2), so its
    next-token distributions are peaked: greedy answers then do not hinge on float rounding.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def randomize(interventions, seed: int, scale: float = 0.5) -> None:
    """Give an adapter clearly non-trivial weights of its own: ``scale``·N(0, 1) added to W and
    b, and to R where R is free. A freshly built adapter's W and b are drawn like a small
    ``nn.Linear``'s (entries below 1/√d), so without this every adapter would answer much like
    the base model; an orthonormal R keeps its random orthonormal initialization."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in interventions.values():
            for name, param in module.named_parameters():
                if name != "R" or not module.orthonormal:
                    param.add_(scale * torch.randn(param.shape, generator=gen))


def main(argv: list[str] | None = None) -> None:
    """Write ``--out``/model and ``--out``/adapters/<name>; print the server's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and adapters")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), args.seed)
    model.save_pretrained(args.out / "model")
    tokenizer.save_pretrained(args.out / "model")

    (first, config), *rest = ADAPTERS.items()
    reft_model = reft_ext.get_reft_model(model, config, adapter_name=first)
    for name, config in rest:
        reft_model.add_adapter(name, config)
    for offset, interventions in enumerate(reft_model.adapters.values()):
        randomize(interventions, args.seed + 1 + offset)
    # None is named "default", so each adapter gets its own subfolder: OUT/adapters/<name>.
    reft_model.save_pretrained(args.out / "adapters")
    flags = " ".join(f"--adapter {name}={args.out / 'adapters' / name}" for name in ADAPTERS)
    print(f"python examples/serve/server.py --model {args.out / 'model'} {flags}")


if __name__ == "__main__":
    main()
