"""LoReFT on every layer of tiny random models of common architectures: the blocks are found, the
edit trains (loss goes down) and the base weights stay frozen; unsupported models are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from truth import orth_error  # noqa: E402

from reft_ext import ReftConfig, get_reft_model  # noqa: E402

VOCAB, HIDDEN, HEADS, LAYERS, INTERMEDIATE = 100, 32, 4, 2, 64
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS)
LLAMA_LIKE = dict(
    COMMON,
    num_hidden_layers=LAYERS,
    intermediate_size=INTERMEDIATE,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
BERT_LIKE = dict(
    COMMON,
    num_hidden_layers=LAYERS,
    intermediate_size=INTERMEDIATE,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

# name -> (config class, config kwargs, head: "causal" or "masked", block list path)
ARCHITECTURES = {
    "llama": ("LlamaConfig", LLAMA_LIKE, "causal", "model.layers"),
    "mistral": ("MistralConfig", dict(LLAMA_LIKE, sliding_window=16), "causal", "model.layers"),
    "qwen2": ("Qwen2Config", LLAMA_LIKE, "causal", "model.layers"),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=8), "causal", "model.layers"),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, pad_token_id=0), "causal", "model.layers"),
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        "causal",
        "transformer.h",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            COMMON,
            num_hidden_layers=LAYERS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=64,
        ),
        "causal",
        "gpt_neox.layers",
    ),
    "opt": (
        "OPTConfig",
        dict(
            COMMON,
            num_hidden_layers=LAYERS,
            ffn_dim=INTERMEDIATE,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=64,
            dropout=0.0,
            pad_token_id=1,
        ),
        "causal",
        "model.decoder.layers",
    ),
    "bert": ("BertConfig", BERT_LIKE, "masked", "bert.encoder.layer"),
    "roberta": (
        "RobertaConfig",
        dict(BERT_LIKE, pad_token_id=1),
        "masked",
        "roberta.encoder.layer",
    ),
}


def tiny_model(name):
    config_cls, kwargs, head, _ = ARCHITECTURES[name]
    config = getattr(transformers, config_cls)(**kwargs)
    auto = (
        transformers.AutoModelForCausalLM if head == "causal" else transformers.AutoModelForMaskedLM
    )
    return auto.from_config(config)


def fixed_batch(head):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in the second sequence
    labels = ids.masked_fill(mask == 0, -100)
    if head == "masked":  # predict the original token at a few masked-out positions
        inputs = ids.clone()
        inputs[:, [2, 5]] = 4  # a fixed stand-in for [MASK]
        labels = torch.full_like(ids, -100)
        labels[:, [2, 5]] = ids[:, [2, 5]]
        ids = inputs
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_loreft_trains_on_architecture(name):
    model = tiny_model(name)
    _, _, head, block_path = ARCHITECTURES[name]
    blocks = model.get_submodule(block_path)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    reft_model = get_reft_model(model, ReftConfig(layers="all", rank=2, positions="f2+l2"))
    assert reft_model.layers == list(range(LAYERS))
    # One forward hook per block, on exactly the block list.
    hooked = [m for m in model.modules() if m._forward_hooks]
    assert hooked == list(blocks)
    assert sorted(reft_model.interventions) == [
        f"layer{i}_{g}" for i in range(LAYERS) for g in ("first", "last")
    ]
    batch = fixed_batch(head)
    reft_model.train()
    with torch.no_grad(), reft_model.disable_adapter():
        base_loss = reft_model(**batch).loss
    optimizer = torch.optim.AdamW(reft_model.interventions.parameters(), lr=1e-2)
    reft_model.keep_orthonormal(optimizer)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = reft_model(**batch).loss
        loss.backward()
        for n, p in reft_model.interventions.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] != pytest.approx(base_loss.item(), abs=1e-7)  # the interventions act
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)), losses
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    for iv in reft_model.interventions.values():
        assert orth_error(iv.R) <= 1e-5


class _NoBlocks(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids=None, **_):
        return self.proj(torch.zeros(*input_ids.shape, 8))


class _NoHiddenSize(_NoBlocks):
    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))


@pytest.mark.parametrize(
    "model, message",
    [
        (
            _NoBlocks(SimpleNamespace(hidden_size=8, num_hidden_layers=2)),
            "no block list.*ModuleList",
        ),
        (_NoBlocks(SimpleNamespace(hidden_size=8)), "no block list.*ModuleList"),
        (nn.Sequential(nn.Linear(8, 8)), "no block list.*ModuleList"),
        (_NoHiddenSize(SimpleNamespace(num_hidden_layers=2)), "hidden_size"),
        # a ModuleList exists but not of config.num_hidden_layers blocks
        (_NoHiddenSize(SimpleNamespace(hidden_size=8, num_hidden_layers=3)), "3 identical blocks"),
    ],
)
def test_unsupported_model_is_refused(model, message):
    with pytest.raises(ValueError, match=message):
        get_reft_model(model, ReftConfig(layers="all", rank=2))
