"""ReftModel on a tiny Llama: exactness against independent references, generation, save/load,
hooks, training modes, gradients, configs, transformers.Trainer and torch.compile."""

from __future__ import annotations

import copy
import inspect
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import tiny_models  # noqa: E402
from truth import orth_error  # noqa: E402

import reft_ext  # noqa: E402
from reft_ext import ReftConfig, ReftModel, get_reft_model  # noqa: E402

VOCAB, HIDDEN, LAYERS = 96, 32, 2


def tiny_llama(seed=0, hidden=HIDDEN, layers=LAYERS, dtype=torch.float32):
    """The shared tiny Llama (tests/tiny_models.py) at this module's default size."""
    return tiny_models.tiny_llama(seed, hidden, layers, VOCAB, dtype=dtype)


def padded_batch(lengths, total, side="right", seed=1):
    """(input_ids, attention_mask): random real tokens, padding id 0 on ``side``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens = torch.randint(3, VOCAB, (n,), generator=gen)
        span = slice(0, n) if side == "right" else slice(total - n, total)
        ids[i, span], mask[i, span] = tokens, 1
    return ids, mask


def position_ids_from(mask):
    """Positions counted over real tokens only (what generate() derives from the mask)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def cache_kwarg(model):
    """The KV cache argument's name: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def block_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def capture(block, store):
    """Record a clone of ``block``'s output hidden states (as later hooks would see them)."""

    def hook(_module, _args, output):
        store.append(block_output(output).detach().clone())

    return block.register_forward_hook(hook)


def all_hook_dicts(model):
    return {
        (name, kind): dict(getattr(module, kind))
        for name, module in model.named_modules()
        for kind in ("_forward_hooks", "_forward_pre_hooks")
    }


def perturb(reft_model, scale=0.5, seed=3):
    """Give every intervention a clearly non-identity W and b (R stays orthonormal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for iv in reft_model.interventions.values():
            iv.W.add_(scale * torch.randn(iv.W.shape, generator=gen).to(iv.W.dtype))
            iv.b.add_(scale * torch.randn(iv.b.shape, generator=gen).to(iv.b.dtype))


def manual_loreft(h, iv):
    """h + Rᵀ(W h + b − R h) in float64, written out independently of the library."""
    R, W, b = (t.detach().double() for t in (iv.R, iv.W, iv.b))
    h64 = h.double()
    return (h64 + (h64 @ W.T + b - h64 @ R.T) @ R).to(h.dtype)


# ---- 1, 2: exactness of the in-place edit ------------------------------------------------------


def test_identity_interventions_give_base_logits_bitwise():
    model = tiny_llama()
    ids, mask = padded_batch([7, 4, 2], 7)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    reft_model = get_reft_model(model, ReftConfig(layers="all", rank=4, positions="f2+l2"))
    with torch.no_grad():
        edited = reft_model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(edited, base)  # the interventions do act at init
        for iv in reft_model.interventions.values():
            iv.W.copy_(iv.R)
            iv.b.zero_()
        identity = reft_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(identity, base)


def test_block_output_edited_only_at_locations():
    model = tiny_llama()
    ids, mask = padded_batch([6, 6, 6], 6)
    before = []
    capture(model.model.layers[0], before)  # registered first: sees the unedited output
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    base_run = before.pop()

    reft_model = get_reft_model(model, ReftConfig(layers=[0], rank=3, positions="f1+l1"))
    perturb(reft_model)
    after = []
    capture(model.model.layers[0], after)  # registered after the ReFT hook: sees the edit
    # (G=2, B=3, P=2) locations: first group, then last group; -1 = no edit.
    locations = torch.tensor([[[0, 2], [1, -1], [-1, -1]], [[5, -1], [3, 4], [-1, 5]]])
    with torch.no_grad():
        reft_model(input_ids=ids, attention_mask=mask, intervention_locations=locations)
    base, edited = before.pop(), after.pop()
    assert torch.equal(base, base_run)  # the block input is the same as in a plain base run

    touched = torch.zeros(base.shape[:2], dtype=torch.bool)
    for g, group in enumerate(("first", "last")):
        iv = reft_model.interventions[f"layer0_{group}"]
        rows, cols = (locations[g] >= 0).nonzero(as_tuple=True)
        tokens = locations[g][rows, cols]
        touched[rows, tokens] = True
        expected = reft_ext.loreft(base[rows, tokens], iv.R, iv.W, iv.b)
        torch.testing.assert_close(edited[rows, tokens], expected, rtol=0, atol=0)
        torch.testing.assert_close(
            edited[rows, tokens], manual_loreft(base[rows, tokens], iv), rtol=1e-5, atol=1e-5
        )
    assert touched.sum() == 7
    assert torch.equal(edited[~touched], base[~touched])
    assert not torch.allclose(edited[touched], base[touched])


# ---- 3: gradients against a clone-and-index reference ------------------------------------------


def test_gradients_match_clone_and_index_reference():
    model = tiny_llama(dtype=torch.float64)
    reference = copy.deepcopy(model)
    config = ReftConfig(layers="all", rank=3, positions="f2+l2", dtype="float64")
    reft_model = get_reft_model(model, config)
    perturb(reft_model)
    ids, mask = padded_batch([6, 3, 5], 6)
    locations = {
        layer: torch.tensor([[[0, 1], [0, 1], [0, -1]], [[4, 5], [-1, 2], [3, 4]]])
        for layer in (0, 1)
    }

    def make_reference_hook(layer):
        def hook(_module, _args, output):
            out = block_output(output)
            h = out.clone()
            for g, group in enumerate(("first", "last")):
                index = locations[layer][g]
                rows, cols = (index >= 0).nonzero(as_tuple=True)
                tokens = index[rows, cols]
                h[rows, tokens] = reft_model.interventions[f"layer{layer}_{group}"](
                    out[rows, tokens]
                )
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    for layer in (0, 1):
        reference.model.layers[layer].register_forward_hook(make_reference_hook(layer))
    weights = torch.randn(3, 6, VOCAB, dtype=torch.float64)
    embeds = model.get_input_embeddings()(ids).detach()
    params = list(reft_model.interventions.parameters())

    def grads(run):
        x = embeds.clone().requires_grad_()
        loss = (run(x).logits * weights).sum()
        return loss, torch.autograd.grad(loss, [x, *params])

    loss, got = grads(
        lambda x: reft_model(inputs_embeds=x, attention_mask=mask, intervention_locations=locations)
    )
    ref_loss, want = grads(lambda x: reference(inputs_embeds=x, attention_mask=mask))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in got)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# ---- 4, 5: padding and short sequences ---------------------------------------------------------


def test_left_and_right_padding_agree_with_unpadded_runs():
    model = tiny_llama()
    reft_model = get_reft_model(model, ReftConfig(layers="all", rank=4, positions="f2+l2"))
    perturb(reft_model)
    lengths, total = [7, 3, 5, 1], 7
    results = {}
    with torch.no_grad():
        for side in ("right", "left"):
            ids, mask = padded_batch(lengths, total, side)
            logits = reft_model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask)
            ).logits
            real = [logits[i][mask[i].bool()] for i in range(len(lengths))]
            results[side] = (real, ids, mask)
        for i, n in enumerate(lengths):
            right, left = results["right"][0][i], results["left"][0][i]
            assert right.shape == left.shape == (n, VOCAB)
            torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
            # The same sequence alone (no padding, no mask): per-example reference.
            ids = results["right"][1][i : i + 1, :n]
            alone = reft_model(input_ids=ids).logits[0]
            torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
            with reft_model.disable_adapter():
                base = reft_model(input_ids=ids).logits[0]
            assert not torch.allclose(alone[-1], base[-1], atol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_short_sequences_follow_documented_split(side):
    p, s = 3, 2
    model = tiny_llama()
    lengths, total = [1, 2, 3, 4, 5, 8], 8
    ids, mask = padded_batch(lengths, total, side)
    before, after = [], []
    capture(model.model.layers[0], before)
    reft_model = get_reft_model(model, ReftConfig(layers=[0], rank=4, positions=f"f{p}+l{s}"))
    perturb(reft_model)
    capture(model.model.layers[0], after)
    with torch.no_grad():
        reft_model(input_ids=ids, attention_mask=mask)
    base, edited = before.pop(), after.pop()
    first = reft_model.interventions["layer0_first"]
    last = reft_model.interventions["layer0_last"]

    expected = base.clone()
    for i, n in enumerate(lengths):
        start = 0 if side == "right" else total - n
        n_first = min(p, n)
        n_last = min(s, n - n_first)
        for t in range(start, start + n_first):
            expected[i, t] = manual_loreft(base[i, t], first)
        for t in range(start + n - n_last, start + n):
            expected[i, t] = manual_loreft(base[i, t], last)
        padding = mask[i] == 0
        assert torch.equal(edited[i][padding], base[i][padding])
    changed = (edited != base).any(-1)
    assert changed.sum() == sum(min(p + s, n) for n in lengths)
    assert torch.equal(changed, (expected != base).any(-1))
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)


# ---- 6: generation -----------------------------------------------------------------------------


def reference_greedy(reft_model, ids, mask, steps, decode_all=False):
    """Greedy decoding by hand: intervened prompt pass, then the KV cache without interventions
    (or, with ``decode_all``, each new token edited by the ``last`` interventions)."""
    model = reft_model.model
    positions = position_ids_from(mask)
    out = reft_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, step_logits = returned_cache(out), [out.logits[:, -1]]
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        kwargs = dict(
            input_ids=tokens[-1],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
        )
        kwargs[cache_kwarg(model)] = cache
        if decode_all:
            batch = ids.shape[0]
            locations = torch.stack([torch.full((batch, 1), -1), torch.zeros(batch, 1)]).long()
            out = reft_model(**kwargs, intervention_locations=locations)
        else:
            out = model(**kwargs)
        cache = returned_cache(out)
        step_logits.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([ids, *tokens], dim=1), torch.stack(step_logits, dim=1)


def generate(reft_model, ids, mask, steps, **kwargs):
    out = reft_model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def test_generate_matches_reference_greedy_decoding():
    model = tiny_llama()
    reft_model = get_reft_model(model, ReftConfig(layers="all", rank=4, positions="f1+l2"))
    perturb(reft_model, scale=1.0)
    steps = 5
    ids, mask = padded_batch([6, 3, 5], 6, side="left")
    with torch.no_grad():
        want_seq, want_logits = reference_greedy(reft_model, ids, mask, steps)
        all_seq, all_logits = reference_greedy(reft_model, ids, mask, steps, decode_all=True)
        with reft_model.disable_adapter():
            _, base_logits = generate(reft_model, ids, mask, steps)
    seq, logits = generate(reft_model, ids, mask, steps)
    assert torch.equal(seq, want_seq)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[:, 0], base_logits[:, 0], atol=1e-3)  # prompt is edited

    seq_all, logits_all = generate(reft_model, ids, mask, steps, intervene_on="all")
    assert torch.equal(seq_all, all_seq)
    torch.testing.assert_close(logits_all, all_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_all[:, 0], logits[:, 0])  # same prompt pass
    assert not torch.allclose(logits_all[:, 1:], logits[:, 1:], atol=1e-3)
    # The prompt as inputs_embeds: same decoding (generate returns only the new tokens then).
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    for intervene_on, want in (("prompt", seq), ("all", seq_all)):
        new = reft_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            intervene_on=intervene_on,
        )
        assert torch.equal(new[:, -steps:], want[:, -steps:]), intervene_on

    # Batched left-padded prompts give each prompt's own unpadded result.
    for i in range(ids.shape[0]):
        real = mask[i].bool()
        one_seq, one_logits = generate(
            reft_model, ids[i : i + 1, real], mask[i : i + 1, real], steps
        )
        assert torch.equal(one_seq[0, -steps:], seq[i, -steps:])
        torch.testing.assert_close(one_logits[0], logits[i], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="intervene_on"):
        reft_model.generate(input_ids=ids, attention_mask=mask, intervene_on="decode")


def test_generate_with_beams_edits_every_expanded_row():
    """num_beams / num_return_sequences expand the batch inside generate(): each copy of a prompt
    must get that prompt's locations (same result as the prompt generated alone)."""
    model = tiny_llama()
    reft_model = get_reft_model(model, ReftConfig(layers="all", rank=4, positions="f1+l1"))
    perturb(reft_model, scale=1.0)
    ids, mask = padded_batch([5, 3], 5, side="left")
    kwargs = dict(
        max_new_tokens=3,
        do_sample=False,
        num_beams=2,
        num_return_sequences=2,
        output_logits=True,
        return_dict_in_generate=True,
    )
    batched = reft_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert batched.sequences.shape == (4, 8)
    for i in range(2):
        real = mask[i].bool()
        alone = reft_model.generate(
            input_ids=ids[i : i + 1, real], attention_mask=mask[i : i + 1, real], **kwargs
        )
        assert torch.equal(batched.sequences[2 * i : 2 * i + 2, -3:], alone.sequences[:, -3:])
        for step_batched, step_alone in zip(batched.logits, alone.logits, strict=True):
            torch.testing.assert_close(
                step_batched[2 * i : 2 * i + 2], step_alone, rtol=1e-4, atol=1e-5
            )


# ---- 7: save / load ----------------------------------------------------------------------------


def test_save_and_load_reproduce_outputs(tmp_path):
    model = tiny_llama()
    fresh = copy.deepcopy(model)
    reft_model = get_reft_model(model, ReftConfig(layers=[1], rank=3, positions="f1+l1"))
    perturb(reft_model)
    ids, mask = padded_batch([6, 4], 6)
    with torch.no_grad():
        want = reft_model(input_ids=ids, attention_mask=mask).logits
    reft_model.save_pretrained(tmp_path / "reft")
    # Never the base model's file names: a base model saved into the same folder stays intact.
    assert sorted(p.name for p in (tmp_path / "reft").iterdir()) == [
        "reft_config.json",
        "reft_model.safetensors",
    ]
    loaded = ReftModel.from_pretrained(fresh, tmp_path / "reft", device="cpu")
    assert loaded.reft_config == reft_model.reft_config
    assert loaded.interventions.keys() == reft_model.interventions.keys()
    for (name, a), b in zip(
        loaded.interventions.state_dict().items(),
        reft_model.interventions.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert not any(p.requires_grad for p in fresh.parameters())
    # The loaded R is still kept orthonormal by keep_orthonormal's default selection.
    loaded.keep_orthonormal(torch.optim.SGD(loaded.interventions.parameters(), lr=0.1))


def test_from_pretrained_keeps_bfloat16_interventions(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    fresh = copy.deepcopy(model)
    config = ReftConfig(layers="all", rank=2, dtype="bfloat16")
    reft_model = get_reft_model(model, config)
    perturb(reft_model)
    ids, mask = padded_batch([5, 3], 5)
    with torch.no_grad():
        want = reft_model(input_ids=ids, attention_mask=mask).logits
    reft_model.save_pretrained(tmp_path)
    loaded = ReftModel.from_pretrained(fresh, tmp_path)
    for name, p in loaded.interventions.named_parameters():
        assert p.dtype == torch.bfloat16, name
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, want)


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(hidden=48), "reft_config.json: hidden_size is 32, this model's is 48"),
        (dict(layers=3), "reft_config.json: num_blocks is 2, this model's is 3"),
    ],
    ids=["hidden_size", "num_layers"],
)
def test_from_pretrained_rejects_a_different_base_model(tmp_path, other, message):
    reft_model = get_reft_model(tiny_llama(), ReftConfig(layers=[0], rank=2))
    reft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        ReftModel.from_pretrained(tiny_llama(**other), tmp_path)


def test_adapter_and_base_model_share_a_folder(tmp_path):
    """save_pretrained next to the base model's own save_pretrained overwrites neither: both load
    back from the one folder with the same outputs."""
    model = tiny_llama()
    reft_model = get_reft_model(model, ReftConfig(layers=[1], rank=2))
    perturb(reft_model)
    ids, mask = padded_batch([5, 3], 5)
    with torch.no_grad():
        want = reft_model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    reft_model.save_pretrained(tmp_path)
    base = type(model).from_pretrained(tmp_path)
    loaded = ReftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, want)


def _damage(directory, edit_state=None, edit_meta=None, remove=None, edit_bytes=None):
    from safetensors.torch import load_file, save_file

    if remove:
        (directory / remove).unlink()
        return
    if edit_bytes:
        name, edit = edit_bytes
        (directory / name).write_bytes(edit((directory / name).read_bytes()))
        return
    if edit_meta:
        meta = json.loads((directory / "reft_config.json").read_text())
        edit_meta(meta)
        (directory / "reft_config.json").write_text(json.dumps(meta))
    if edit_state:
        state = load_file(str(directory / "reft_model.safetensors"))
        edit_state(state)
        save_file(state, str(directory / "reft_model.safetensors"))


DAMAGED = {
    "no-config": (dict(remove="reft_config.json"), FileNotFoundError, "reft_config.json not found"),
    "no-weights": (
        dict(remove="reft_model.safetensors"),
        FileNotFoundError,
        "reft_model.safetensors not found",
    ),
    "missing-tensor": (
        dict(edit_state=lambda s: s.pop("layer0_last.b")),
        ValueError,
        "reft_model.safetensors: tensors do not match reft_config.json's config: missing "
        "['layer0_last.b'], unknown []",
    ),
    "unknown-tensor": (
        dict(edit_state=lambda s: s.update({"layer5_first.b": torch.zeros(2)})),
        ValueError,
        "missing [], unknown ['layer5_first.b']",
    ),
    "wrong-shape": (
        dict(edit_state=lambda s: s.update({"layer0_first.W": torch.zeros(3, 32)})),
        ValueError,
        "reft_model.safetensors: tensor 'layer0_first.W' has shape (3, 32), the config needs "
        "(2, 32)",
    ),
    "missing-key": (
        dict(edit_meta=lambda m: m.pop("num_blocks")),
        ValueError,
        "reft_config.json: key 'num_blocks' is missing",
    ),
    "bad-config": (
        dict(edit_meta=lambda m: m["reft_config"].update(rank=0)),
        ValueError,
        "reft_config.json: key 'reft_config': rank must be an int >= 1",
    ),
    "truncated-weights": (
        dict(edit_bytes=("reft_model.safetensors", lambda b: b[: len(b) // 2])),
        ValueError,
        "reft_model.safetensors: not a readable safetensors file",
    ),
    "empty-weights": (
        dict(edit_bytes=("reft_model.safetensors", lambda b: b"")),
        ValueError,
        "reft_model.safetensors: not a readable safetensors file",
    ),
    "corrupted-weights-header": (
        dict(edit_bytes=("reft_model.safetensors", lambda b: b[:8] + b"{garbage" + b[16:])),
        ValueError,
        "reft_model.safetensors: not a readable safetensors file",
    ),
    "config-not-json": (
        dict(edit_bytes=("reft_config.json", lambda b: b[:-10])),
        ValueError,
        "reft_config.json: not valid JSON",
    ),
    "config-not-an-object": (
        dict(edit_bytes=("reft_config.json", lambda b: b"[1, 2]")),
        ValueError,
        "reft_config.json: expected a JSON object, got list",
    ),
    "unknown-config-field": (
        dict(edit_meta=lambda m: m["reft_config"].update(alpha=1)),
        ValueError,
        "reft_config.json: key 'reft_config': ReftConfig: unknown field(s) ['alpha']",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_from_pretrained_names_the_file_and_key_of_a_damaged_folder(tmp_path, case):
    damage, error, message = DAMAGED[case]
    get_reft_model(tiny_llama(), ReftConfig(layers=[0], rank=2)).save_pretrained(tmp_path)
    _damage(tmp_path, **damage)
    model = tiny_llama()
    with pytest.raises(error, match=re.escape(message)):
        ReftModel.from_pretrained(model, tmp_path)
    # A failed load leaves no hook behind: the model still computes its own logits.
    ids = torch.randint(3, VOCAB, (1, 5))
    assert torch.equal(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)


def test_config_fields_carry_help_text():
    from dataclasses import fields

    helps = {f.name: f.metadata.get("help", "") for f in fields(ReftConfig)}
    assert all(len(text) > 10 for text in helps.values()), helps
    assert all(name in helps["intervention"] for name in reft_ext.modules.INTERVENTIONS)


def test_threads_sharing_a_reft_model_match_sequential_calls():
    """Two threads on one ReftModel (a server's workers), different inputs and positions, 50 calls
    each: every result equals the same call made alone (per-call state belongs to the call)."""
    import threading

    reft_model = get_reft_model(tiny_llama(), ReftConfig(layers=[0, 1], rank=2)).eval()
    perturb(reft_model)
    ids_a, mask_a = padded_batch([6, 4], 6)
    ids_b, mask_b = padded_batch([3, 5, 2], 5)
    calls = {
        "a": dict(input_ids=ids_a, attention_mask=mask_a),
        "b": dict(
            input_ids=ids_b,
            attention_mask=mask_b,
            intervention_locations=torch.tensor([[[0], [1], [0]], [[2], [4], [1]]]),
        ),
    }
    with torch.no_grad():
        want = {k: reft_model(**kwargs).logits for k, kwargs in calls.items()}
        with reft_model.disable_adapter():
            base = {k: reft_model(**kwargs).logits for k, kwargs in calls.items()}
    assert not torch.equal(want["a"], base["a"])
    results = {"a": [], "b": []}
    start = threading.Barrier(2)

    def worker(name):
        start.wait()
        for i in range(50):
            with torch.no_grad():
                # b disables its adapter on odd calls: that must not leak into a's calls
                if name == "b" and i % 2:
                    with reft_model.disable_adapter():
                        results[name].append(("base", reft_model(**calls[name]).logits))
                else:
                    results[name].append(("edited", reft_model(**calls[name]).logits))

    threads = [threading.Thread(target=worker, args=(name,)) for name in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    for name, got in results.items():
        assert len(got) == 50
        for kind, logits in got:
            assert torch.equal(logits, (want if kind == "edited" else base)[name]), (name, kind)


def test_hook_in_a_foreign_thread_during_a_call_raises():
    """A block run in a thread the call did not start (what torch.nn.DataParallel does) would
    silently skip the edits; it raises instead."""
    import threading

    reft_model = get_reft_model(tiny_llama(), ReftConfig(layers=[0], rank=2))
    ids, mask = padded_batch([4, 4], 4)
    errors = []
    block = reft_model.model.model.layers[0]

    def foreign(_module, _args, _output):
        def run():
            try:
                with torch.no_grad():
                    reft_model.model(input_ids=ids, attention_mask=mask)
            except RuntimeError as error:
                errors.append(str(error))

        if not errors:
            t = threading.Thread(target=run)
            t.start()
            t.join(timeout=60)

    handle = block.register_forward_hook(foreign)
    try:
        with torch.no_grad():
            reft_model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    assert errors and "DataParallel" in errors[0]


# ---- 8-11: hooks, modes, gradients, switches ---------------------------------------------------


def test_unload_removes_every_hook_and_restores_base_logits():
    model = tiny_llama()
    hooks_before = all_hook_dicts(model)
    ids, mask = padded_batch([6, 2], 6)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    reft_model = get_reft_model(model, ReftConfig(layers="all", rank=4))
    assert all_hook_dicts(model) != hooks_before
    with torch.no_grad():
        assert not torch.allclose(reft_model(input_ids=ids, attention_mask=mask).logits, base)
    unloaded = reft_model.unload()
    assert unloaded is model
    assert all_hook_dicts(unloaded) == hooks_before
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=ids, attention_mask=mask).logits, base)


def test_train_and_eval_reach_the_interventions_dropout():
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    ids, mask = padded_batch([6, 6], 6)
    noisy = get_reft_model(model, ReftConfig(layers="all", rank=4, positions="all", dropout=0.5))
    clean = get_reft_model(ref_model, ReftConfig(layers="all", rank=4, positions="all"))
    clean.interventions.load_state_dict(noisy.interventions.state_dict())
    with torch.no_grad():
        noisy.eval()
        assert not any(m.training for m in noisy.modules())
        a = noisy(input_ids=ids, attention_mask=mask).logits
        b = noisy(input_ids=ids, attention_mask=mask).logits
        want = clean.eval()(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(a, b)
        assert torch.equal(a, want)
        noisy.train()
        assert all(iv.training for iv in noisy.interventions.values())
        c = noisy(input_ids=ids, attention_mask=mask).logits
        d = noisy(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(c, d)
    assert not torch.allclose(c, want)


def test_only_intervention_parameters_get_gradients():
    model = tiny_llama()
    # l2: the last real token's logit has no label, the one before it does.
    config = ReftConfig(layers="all", rank=4, positions="f1+l2")
    reft_model = get_reft_model(model, config).train()
    ids, mask = padded_batch([6, 4], 6)
    labels = ids.masked_fill(mask == 0, -100)
    out = reft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    intervention_ids = {id(p) for p in reft_model.interventions.parameters()}
    for name, p in reft_model.named_parameters():
        if id(p) in intervention_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert {id(p) for p in reft_model.parameters() if p.requires_grad} == intervention_ids


def test_disable_adapter_and_trainable_parameter_counts(capsys):
    model = tiny_llama()
    base_total = sum(p.numel() for p in model.parameters())
    ids, mask = padded_batch([6, 4], 6)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    rank = 3
    reft_model = get_reft_model(model, ReftConfig(layers=[0, 1], rank=rank))
    with torch.no_grad():
        with reft_model.disable_adapter():
            assert torch.equal(reft_model(input_ids=ids, attention_mask=mask).logits, base)
        assert not torch.allclose(reft_model(input_ids=ids, attention_mask=mask).logits, base)
    # 2 layers x (first, last), each R, W (rank, d) and b (rank,).
    trainable = 2 * 2 * (2 * rank * HIDDEN + rank)
    assert reft_model.get_nb_trainable_parameters() == (trainable, base_total + trainable)
    reft_model.print_trainable_parameters()
    numbers = re.findall(r"\d[\d,]*(?:\.\d+)?", capsys.readouterr().out)
    assert int(numbers[0].replace(",", "")) == trainable
    assert int(numbers[1].replace(",", "")) == base_total + trainable
    assert float(numbers[2]) == pytest.approx(100 * trainable / (base_total + trainable), abs=1e-4)


def test_explicit_locations_formats_and_validation():
    model = tiny_llama()
    ids, mask = padded_batch([5, 5], 5)
    shared = get_reft_model(model, ReftConfig(layers=[0, 1], rank=2, share_weights=True))
    assert sorted(shared.interventions) == ["layer0_shared", "layer1_shared"]
    loc = torch.tensor([[0, 4], [1, -1]])
    with torch.no_grad():
        default = shared(input_ids=ids, attention_mask=mask).logits
        explicit = shared(input_ids=ids, attention_mask=mask, intervention_locations=loc).logits
        per_layer = shared(
            input_ids=ids, attention_mask=mask, intervention_locations={0: loc, 1: loc}
        ).logits
        only_0 = shared(input_ids=ids, attention_mask=mask, intervention_locations={0: loc}).logits
        none = torch.full((2, 1), -1)
        untouched = shared(input_ids=ids, attention_mask=mask, intervention_locations=none).logits
        with shared.disable_adapter():
            base = shared(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(explicit, per_layer)
    assert not torch.allclose(explicit, default)  # row 1 differs (f1+l1 = tokens 0 and 4)
    assert torch.equal(explicit[0], default[0])
    assert not torch.allclose(only_0, explicit)
    assert torch.equal(untouched, base)
    for bad, message in [
        (torch.tensor([[0, 5], [0, 0]]), r"\[-1, 5\)"),
        (torch.tensor([[0, -2], [0, 0]]), r"\[-1, 5\)"),
        (torch.zeros(3, 1, dtype=torch.long), "must be"),
        (torch.zeros(2, 2, 1, dtype=torch.long), "must be"),
        (torch.zeros(2, 1), "integer"),
        ({7: loc}, "layers without interventions"),
    ]:
        with pytest.raises(ValueError, match=message):
            shared(input_ids=ids, attention_mask=mask, intervention_locations=bad)
    shared.unload()
    with pytest.raises(TypeError, match="keyword"):
        shared(ids)


def test_explicit_locations_refuse_a_repeated_position():
    """[[1, 1]] used to give [[1]]'s logits but doubled parameter gradients."""
    model = tiny_llama()
    reft = get_reft_model(model, ReftConfig(layers=[0], rank=2, share_weights=True))
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=r"repeat a position in row 1 of group 'shared'"):
        reft(input_ids=ids, intervention_locations=torch.tensor([[0, 4], [1, 1]]))
    # -1 (no edit) may repeat, and equals the location list without it.
    padded = reft(input_ids=ids, intervention_locations=torch.tensor([[0, -1, -1], [1, -1, -1]]))
    plain = reft(input_ids=ids, intervention_locations=torch.tensor([[0], [1]]))
    assert torch.equal(padded.logits, plain.logits)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), r"attention_mask row 0 has padding between"),
        (torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1]]), r"attention_mask row 1 has padding between"),
        (torch.ones(2, 5, dtype=torch.long), r"shape \(batch, length\) = \(2, 4\)"),
        (torch.ones(3, 4, dtype=torch.long), r"shape \(batch, length\) = \(2, 4\)"),
        (torch.zeros(2, 1, 4, 4), r"shape \(batch, length\) = \(2, 4\).*got \(2, 1, 4, 4\)"),
        (torch.tensor([[1, 1, 2, 1], [1, 1, 1, 1]]), "only 0 \\(padding\\) and 1"),
        (torch.tensor([[1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]]), "only 0 \\(padding\\) and 1"),
    ],
    ids=["hole", "hole-second-row", "longer", "wrong-batch", "4d-additive", "a-two", "a-half"],
)
def test_masks_the_positions_cannot_use_are_refused(mask, message):
    reft = get_reft_model(tiny_llama(), ReftConfig(layers=[0], rank=2))
    ids = torch.randint(3, VOCAB, (2, 4))
    with pytest.raises(ValueError, match=message):
        reft(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=message):
        reft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


def test_mask_with_an_all_padding_row_and_bool_masks_are_accepted():
    """Left and right padding (bool or 0/1), and a row with no real token, stay valid."""
    reft = get_reft_model(tiny_llama(), ReftConfig(layers=[0], rank=2))
    ids = torch.randint(3, VOCAB, (3, 4))
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    as_ints = reft(input_ids=ids, attention_mask=mask).logits
    as_bools = reft(input_ids=ids, attention_mask=mask.bool()).logits
    assert torch.equal(as_ints, as_bools)


def test_generate_without_the_cache_is_refused():
    """use_cache=False used to generate other tokens than the cached run, silently."""
    model = tiny_llama()
    reft = get_reft_model(model, ReftConfig(layers=[0], rank=2))
    ids = torch.randint(3, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="needs use_cache=True"):
        reft.generate(input_ids=ids, max_new_tokens=3, use_cache=False)
    model.generation_config.use_cache = False
    with pytest.raises(ValueError, match="needs use_cache=True"):
        reft.generate(input_ids=ids, max_new_tokens=3)
    out = reft.generate(input_ids=ids, max_new_tokens=3, use_cache=True, do_sample=False)
    assert out.shape == (1, 7)


# ---- 12: configs -------------------------------------------------------------------------------


def test_config_json_round_trip(tmp_path):
    config = ReftConfig(
        layers=[0, 1],
        rank=3,
        intervention="direft",
        positions="f2+l3",
        share_weights=True,
        dropout=0.1,
        dtype="bfloat16",
        orthogonality=None,
    )
    assert ReftConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "c.json")
    assert ReftConfig.load(tmp_path / "c.json") == config
    assert ReftConfig.from_json(ReftConfig(layers="all").to_json()) == ReftConfig(layers="all")
    assert ReftConfig(layers=(0, 1)).layers == [0, 1]
    assert config.torch_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(positions="x1"), "positions"),
        (dict(positions="l1+f1"), "positions"),
        (dict(positions="f0+l0"), "no token"),
        (dict(positions=""), "positions"),
        (dict(positions="+l1"), "positions"),
        (dict(layers="first"), "layers"),
        (dict(layers=[0.5]), "layers"),
        (dict(layers=7), "layers"),
        (dict(layers=[0, 0]), "layers"),
        (dict(layers=[]), "layers"),
        (dict(intervention="lora"), "intervention"),
        (dict(component="attention"), "component"),
        (dict(dtype="float33"), "dtype"),
    ],
)
def test_bad_configs_raise(kwargs, message):
    values = dict(layers=[0]) | kwargs
    with pytest.raises(ValueError, match=message):
        ReftConfig(**values)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[2]), "layer 2 out of range: the model has 2 blocks"),
        (dict(layers=[-1]), "out of range"),
        (dict(layers=[0], rank=HIDDEN + 1), "rank"),
        (dict(layers=[0], dropout=1.0), "dropout"),
        (dict(layers=[0], orthogonality="cayley"), "orthogonality"),
    ],
)
def test_bad_configs_raise_at_get_reft_model(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_reft_model(tiny_llama(), ReftConfig(**kwargs))


# ---- 13: transformers.Trainer ------------------------------------------------------------------


def run_trainer(tmp_path, weight_decay, retract=True):
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    reft_model = get_reft_model(model, ReftConfig(layers="all", rank=4, positions="f1+l1"))
    start = {k: v.clone() for k, v in reft_model.interventions.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    data = []
    for n in (6, 4, 5, 6):
        ids = torch.randint(3, VOCAB, (6,), generator=gen)
        mask = (torch.arange(6) < n).long()
        data.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"wd{weight_decay}"),
        report_to=[],
        max_steps=3,
        per_device_train_batch_size=2,
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-2,
        weight_decay=weight_decay,
        # Trainer keeps only the columns named in forward's signature, and ReftModel.forward
        # takes **kwargs: with the default True it would drop input_ids and attention_mask.
        remove_unused_columns=False,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=reft_model, args=args, train_dataset=data)
    # No create_optimizer()/keep_orthonormal: the optimizer Trainer builds inside train() is
    # retracted after each step by the automatic retraction.
    with reft_ext.auto_retraction(retract):
        trainer.train()
    return reft_model, trainer, base_state, start


def test_trainer_trains_interventions_only(tmp_path):
    reft_model, trainer, base_state, start = run_trainer(tmp_path, weight_decay=0.1)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for key, value in reft_model.model.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    for key, value in reft_model.interventions.state_dict().items():
        assert not torch.equal(value, start[key]), key
    for iv in reft_model.interventions.values():
        assert orth_error(iv.R) <= 1e-5
    # The control: without the automatic retraction the same run leaves R off the manifold.
    drifted, *_ = run_trainer(tmp_path, weight_decay=0.1, retract=False)
    assert max(orth_error(iv.R) for iv in drifted.interventions.values()) > 1e-3
    decay_ids = {
        id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]
    }
    for name, iv in reft_model.interventions.items():
        assert id(iv.W) in decay_ids, name
    # Decay applies: the same run without weight decay ends with different (larger) W.
    undecayed, *_ = run_trainer(tmp_path, weight_decay=0.0)
    for name, iv in reft_model.interventions.items():
        other = undecayed.interventions[name]
        assert not torch.allclose(iv.W, other.W, atol=1e-7), name
        assert iv.W.norm() < other.W.norm(), name


# ---- 14: torch.compile -------------------------------------------------------------------------


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = tiny_llama()
    reft_model = get_reft_model(model, ReftConfig(layers="all", rank=4, positions="f2+l1"))
    perturb(reft_model)
    ids, mask = padded_batch([6, 3], 6)
    compiled = torch.compile(reft_model, backend="aot_eager")
    with torch.no_grad():
        want = reft_model(input_ids=ids, attention_mask=mask).logits
        got = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with reft_model.disable_adapter(), torch.no_grad():
        base = reft_model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(got, base, atol=1e-4)
    # Gradients through the compiled wrapper match eager ones too.
    labels = ids.masked_fill(mask == 0, -100)
    compiled(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    got_grads = [p.grad.clone() for p in reft_model.interventions.parameters()]
    reft_model.zero_grad()
    reft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for g, w in zip(
        got_grads, (p.grad for p in reft_model.interventions.parameters()), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text", ["f1+", "f1l1", "+l1", "f0+l0", "l", "first"])
def test_malformed_positions_strings_raise(text):
    """Only 'f<p>+l<s>', 'f<p>', 'l<s>' (selecting at least one token) and 'all' parse."""
    with pytest.raises(ValueError, match="positions"):
        ReftConfig(layers=[0], positions=text)


@pytest.mark.parametrize("text", ["f" + "9" * 30, "f1000000000", "f1+l2000000"])
def test_huge_positions_are_refused_by_the_config(text):
    """They overflowed or tried to allocate gigabytes at the first forward."""
    with pytest.raises(ValueError, match="at most"):
        ReftConfig(layers=[0], positions=text)


def test_unloaded_wrapper_refuses_calls():
    """After unload() the old wrapper used to run the plain model silently."""
    reft_model = get_reft_model(tiny_llama(), ReftConfig(layers=[0], rank=2))
    ids = torch.randint(0, 64, (1, 5))
    reft_model.unload()
    with pytest.raises(RuntimeError, match="unloaded"):
        reft_model(input_ids=ids)
    with pytest.raises(RuntimeError, match="unloaded"):
        reft_model.generate(input_ids=ids, max_new_tokens=1)


def test_boolean_layers_raise():
    with pytest.raises(ValueError, match="layers"):
        ReftConfig(layers=[True])


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("share_weights", "no", TypeError),  # was accepted and turned sharing on
        ("share_weights", 1, TypeError),
        ("rank", 0, ValueError),
        ("rank", 2.0, ValueError),
        ("rank", True, ValueError),
        ("dropout", 1.0, ValueError),
        ("dropout", -0.1, ValueError),
        ("dropout", "0.1", ValueError),
    ],
)
def test_config_fields_are_type_checked(field, value, error):
    with pytest.raises(error, match=field):
        ReftConfig(layers=[0], **{field: value})


def test_intervention_dtype_must_suit_the_model():
    """bfloat16 interventions on a float32 model fail when built, not at the first forward."""
    with pytest.raises(ValueError, match="dtype"):
        get_reft_model(tiny_llama(), ReftConfig(layers=[0], dtype="bfloat16"))


def test_saved_config_records_a_later_cast(tmp_path):
    """Interventions cast after construction reload in the dtype they were saved in."""
    model = tiny_llama(dtype=torch.bfloat16)
    reft_model = get_reft_model(model, ReftConfig(layers=[0], rank=2))
    reft_model.interventions.to(torch.bfloat16)
    reft_model.save_pretrained(tmp_path)
    loaded = ReftModel.from_pretrained(reft_model.unload(), tmp_path)
    assert {p.dtype for p in loaded.interventions.parameters()} == {torch.bfloat16}
