"""Attach LoReFT to a transformers model, train a few steps, generate, save and load.

Runs offline on a tiny random Llama; swap in ``AutoModelForCausalLM.from_pretrained(...)`` for a
real model. Run: ``python examples/hf_quickstart.py``.
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reft_ext

torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=128,
)
model = LlamaForCausalLM(config)

# LoReFT, rank 4, on the first and last real token of every sequence at blocks 1 and 2.
reft_model = reft_ext.get_reft_model(
    model, reft_ext.ReftConfig(layers=[1, 2], rank=4, positions="f1+l1")
)
reft_model.print_trainable_parameters()

input_ids = torch.randint(0, 128, (4, 12))
attention_mask = torch.ones_like(input_ids)
attention_mask[0, :3] = 0  # a left-padded prompt
optimizer = torch.optim.AdamW(
    [p for p in reft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01
)
reft_model.keep_orthonormal(optimizer)  # R stays orthonormal after every step
for step in range(5):
    loss = reft_model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")

reft_model.eval()
generated = reft_model.generate(
    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False
)
print("generated:", generated[:, -5:].tolist())

with tempfile.TemporaryDirectory() as directory:
    reft_model.save_pretrained(directory)  # reft_config.json + reft_model.safetensors
    base = reft_model.unload()  # hooks removed: the untouched base model
    loaded = reft_ext.ReftModel.from_pretrained(base, directory).eval()
    again = loaded.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False
    )
print("reloaded generates the same:", torch.equal(generated, again))
