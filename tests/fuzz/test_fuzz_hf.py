"""Fuzzing the Hugging Face drop-in: configs, positions, masks, locations, generation, adapter
folders and threads, on a tiny random Llama.

The reference for a right result is written here, from the README's rules: the positions of each
row (first p and last s real tokens, or all, or the explicit locations), and each intervention's
formula in float64 applied by a plain forward hook that clones the block output.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from fuzzing import EXAMPLES, RIGHT, assert_clear_error, record
from hypothesis import given, settings
from hypothesis import strategies as st
from truth import max_rel, truth_direft, truth_loreft, truth_lowrank_edit

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import tiny_models  # noqa: E402

from reft_ext import ReftConfig, ReftModel, get_reft_model  # noqa: E402
from reft_ext.hf.blocks import find_blocks  # noqa: E402

VOCAB, HIDDEN, LAYERS = 40, 16, 2
BASE = tiny_models.tiny_llama(0, HIDDEN, LAYERS, VOCAB)
CONFIG_FIELDS = ("positions", "layers", "layer", "rank", "share_weights", "intervention")

# Each intervention's formula (README, API), on float64 rows.
FORMULAS = {
    "loreft": lambda h, m: truth_loreft(h, m.R.double(), m.W.double(), m.b.double()),
    "noreft": lambda h, m: truth_loreft(h, m.R.double(), m.W.double(), m.b.double()),
    "direft": lambda h, m: truth_direft(h, m.R.double(), m.W.double(), m.b.double()),
    "consreft": lambda h, m: truth_lowrank_edit(h, -m.R.double(), m.R.double(), m.b.double()),
    "lobireft": lambda h, m: h + m.b.double() @ m.R.double(),
}


def expected_positions(positions: str, share: bool, mask: torch.Tensor) -> dict[str, list]:
    """Per group, per row, the token indices the README's rule selects."""
    result: dict[str, list] = {}
    for row in mask.tolist():
        real = [t for t, m in enumerate(row) if m]
        if positions == "all":
            groups = {"all": real}
        else:
            match = re.fullmatch(r"(?:f(\d+))?\+?(?:l(\d+))?", positions)
            p, s = int(match.group(1) or 0), int(match.group(2) or 0)
            first = real[: min(p, len(real))]
            rest = real[len(first) :]
            last = rest[len(rest) - min(s, len(rest)) :]
            # A group exists where the string asks for tokens; two share one intervention
            # with share_weights.
            groups = {name: t for name, t, n in (("first", first, p), ("last", last, s)) if n}
            if share and len(groups) == 2:
                groups = {"shared": first + last}
        for group, tokens in groups.items():
            result.setdefault(group, []).append(tokens)
    return result


def reference_logits(reft: ReftModel, ids, mask, locations: dict[str, list]) -> torch.Tensor:
    """The base model with plain hooks that clone each block output and apply the formulas."""
    _, blocks = find_blocks(reft.model)
    formula = FORMULAS[reft.reft_config.intervention]

    def hook_for(layer):
        def hook(_block, _args, output):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            for group, rows in locations.items():
                module = reft.interventions[f"layer{layer}_{group}"]
                for b, tokens in enumerate(rows):
                    for t in tokens:
                        hidden[b, t] = formula(hidden[b, t].double(), module).to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in reft.layers]
    try:
        with reft.disable_adapter(), torch.no_grad():
            return reft.model(input_ids=ids, attention_mask=mask).logits
    finally:
        for handle in handles:
            handle.remove()


MASKS = ["none", "right", "left", "hole", "empty-row", "wrong-shape", "not-binary", "bool"]


BAD_CONFIG = {
    "positions": ["x1", "f-1", "", "f1+", "f1 l1", "f0"],
    "layers": [[2], [-1], [0, 0], "one", []],
    "rank": [0, -1, True, 2.5],
    "share": ["no", 1],
    "intervention": ["foo", "LoReFT"],
}


@st.composite
def hf_cases(draw):
    """About half the configs are valid; the others have one field wrong."""
    bad = draw(st.sampled_from(["none"] * 5 + sorted(BAD_CONFIG)))

    def field(name, good):
        return draw(st.sampled_from(BAD_CONFIG[name] if bad == name else good))

    return {
        "bad": bad,
        "positions": field("positions", ["f1", "l1", "f1+l1", "f2+l1", "f3+l3", "l2", "all"]),
        "layers": field("layers", [[0], [1], [0, 1], "all"]),
        "rank": field("rank", [1, 2, 3]),
        "share": field("share", [True, False]),
        "intervention": field("intervention", sorted(FORMULAS)),
        "batch": draw(st.integers(1, 3)),
        "length": draw(st.integers(1, 6)),
        "mask": draw(st.sampled_from(MASKS)),
        "explicit": draw(st.integers(0, 3)) == 0,
        "explicit_values": draw(st.lists(st.integers(-2, 6), min_size=1, max_size=4)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _mask(kind, batch, length, gen):
    counts = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < counts[:, None]).long()  # right padding
    if kind == "left":
        mask = mask.flip(1)
    elif kind == "hole" and length >= 3:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, 1] = 0
    elif kind == "empty-row":
        mask[-1] = 0
    elif kind == "wrong-shape":
        mask = torch.ones(batch, length + 1, dtype=torch.long)
    elif kind == "not-binary":
        mask = mask * 2
    elif kind == "bool":
        mask = mask.bool()
    return None if kind == "none" else mask


def _build(case):
    kwargs = dict(
        layers=case["layers"],
        rank=case["rank"],
        positions=case["positions"],
        share_weights=case["share"],
        intervention=case["intervention"],
    )
    return get_reft_model(BASE, ReftConfig(**kwargs))


@given(hf_cases())
def test_forward(case):
    gen = torch.Generator().manual_seed(case["seed"])
    try:
        reft = _build(case)
    except (TypeError, ValueError) as error:
        assert case["bad"] != "none", f"a valid config raised: {error!r}"
        assert_clear_error(error, CONFIG_FIELDS, "hf configs")
        return
    assert case["bad"] == "none", "an invalid config was accepted"
    try:
        torch.manual_seed(case["seed"])
        for module in reft.interventions.values():  # edits large enough to change the logits
            with torch.no_grad():
                module.b.normal_()
        B, T = case["batch"], case["length"]
        ids = torch.randint(3, VOCAB, (B, T), generator=gen)
        mask = _mask(case["mask"], B, T, gen)
        single = len(reft._groups) == 1
        explicit = None
        if case["explicit"] and single:
            explicit = torch.tensor([case["explicit_values"]] * B)
        # The positions rules need a (B, T) 0/1 mask without holes; explicit locations do not
        # read the mask (a longer one, as with a cache, fits them).
        bad_mask = explicit is None and (
            case["mask"] in ("wrong-shape", "not-binary") or (case["mask"] == "hole" and T >= 3)
        )
        values = case["explicit_values"]
        real = [v for v in values if v != -1]
        bad_explicit = explicit is not None and (
            not all(-1 <= v < T for v in values) or len(real) != len(set(real))
        )
        try:
            with torch.no_grad():
                got = reft(input_ids=ids, attention_mask=mask, intervention_locations=explicit)
        except (TypeError, ValueError) as error:
            assert bad_mask or bad_explicit, f"a valid call raised: {error!r}"
            assert_clear_error(error, ("attention_mask", "intervention_locations"), "hf forward")
            return
        assert not (bad_mask or bad_explicit), "an invalid call ran"
        full = torch.ones(B, T, dtype=torch.long) if mask is None else mask.long()
        if explicit is not None:
            group = reft._groups[0]
            locations = {group: [[v for v in row if v >= 0] for row in explicit.tolist()]}
        else:
            share = reft.reft_config.share_weights
            locations = expected_positions(reft.reft_config.positions, share, full)
        want = reference_logits(reft, ids, mask, locations)
        assert max_rel(got.logits, want) <= 1e-4
        record("hf forward", RIGHT)
    finally:
        reft.unload()


@settings(max_examples=max(10, EXAMPLES // 4))
@given(
    st.sampled_from(["f1+l1", "l2", "all"]),
    st.sampled_from(["prompt", "all", "none"]),
    st.sampled_from([True, False, None]),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
)
def test_generate_first_token(positions, intervene_on, use_cache, num_beams, seed):
    """The first generated token is the argmax of the reference logits at the prompt's end."""
    reft = get_reft_model(BASE, ReftConfig(layers=[0, 1], rank=2, positions=positions))
    try:
        torch.manual_seed(seed)
        for module in reft.interventions.values():
            with torch.no_grad():
                module.b.normal_()
        ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(seed))
        kwargs = dict(input_ids=ids, max_new_tokens=2, do_sample=False, num_beams=num_beams)
        if use_cache is not None:
            kwargs["use_cache"] = use_cache
        try:
            out = reft.generate(intervene_on=intervene_on, **kwargs)
        except (TypeError, ValueError) as error:
            assert intervene_on == "none" or use_cache is False, repr(error)
            assert_clear_error(error, ("intervene_on", "use_cache"), "hf generate")
            return
        assert intervene_on != "none" and use_cache is not False
        full = torch.ones_like(ids)
        share = reft.reft_config.share_weights
        want = reference_logits(reft, ids, None, expected_positions(positions, share, full))
        if num_beams == 1:  # beams rank sequences by their total score, not the first token
            assert torch.equal(out[:, 5], want[:, -1].argmax(-1))
        assert out.shape == (2, 7)
        record("hf generate", RIGHT)
    finally:
        reft.unload()


DAMAGE = ["truncate", "flip-header", "drop-key", "wrong-type", "remove", "bad-json", "none"]


@settings(max_examples=max(10, EXAMPLES // 3))
@given(st.sampled_from(DAMAGE), st.sampled_from(["reft_config.json", "reft_model.safetensors"]),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_adapter_folders(damage, name, seed):
    """A damaged folder gives an error naming the file, or (harmless damage) the saved outputs."""
    gen = torch.Generator().manual_seed(seed)
    reft = get_reft_model(BASE, ReftConfig(layers=[0, 1], rank=2))
    ids = torch.randint(3, VOCAB, (1, 4), generator=gen)
    with torch.no_grad():
        for module in reft.interventions.values():
            module.b.normal_(generator=gen)
        saved = reft(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as folder:
        reft.save_pretrained(folder)
        reft.unload()
        path = Path(folder) / name
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: int(torch.randint(len(data), (1,), generator=gen))])
        elif damage == "flip-header":
            header = 8 + int.from_bytes(data[:8], "little") if name.endswith("safetensors") else 0
            where = int(torch.randint(max(1, min(header, len(data))), (1,), generator=gen))
            flipped = bytes([data[where] ^ (1 << int(torch.randint(8, (1,), generator=gen)))])
            path.write_bytes(data[:where] + flipped + data[where + 1 :])
        elif damage in ("drop-key", "wrong-type") and name == "reft_config.json":
            meta = json.loads(data)
            key = sorted(meta)[int(torch.randint(len(meta), (1,), generator=gen))]
            if damage == "drop-key":
                del meta[key]
            else:
                meta[key] = [meta[key]]
            path.write_text(json.dumps(meta))
        elif damage == "remove":
            path.unlink()
        elif damage == "bad-json" and name == "reft_config.json":
            path.write_text("{" + data.decode()[: len(data) // 2])
        try:
            loaded = ReftModel.from_pretrained(BASE, folder)
        except (FileNotFoundError, ValueError) as error:
            assert damage != "none"
            assert name in str(error), f"the error does not name {name}: {error}"
            record("adapter folders", "clear error")
            return
        try:
            with torch.no_grad():
                assert torch.equal(loaded(input_ids=ids).logits, saved), f"{damage} loaded wrong"
            record("adapter folders", RIGHT)
        finally:
            loaded.unload()


@settings(max_examples=max(5, EXAMPLES // 30))
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(2, 6)), min_size=2, max_size=2),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_two_threads_share_one_model(shapes, seed):
    """Two threads calling one ReftModel (different inputs and positions) match sequential calls."""
    reft = get_reft_model(BASE, ReftConfig(layers=[0, 1], rank=2, positions="f1+l1"))
    try:
        gen = torch.Generator().manual_seed(seed)
        inputs = [torch.randint(3, VOCAB, shape, generator=gen) for shape in shapes]
        with torch.no_grad():
            sequential = [reft(input_ids=ids).logits for ids in inputs]
        results: dict[int, list] = {0: [], 1: []}

        def work(i):
            with torch.no_grad():
                for _ in range(10):
                    results[i].append(reft(input_ids=inputs[i]).logits)

        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        for i in (0, 1):
            assert len(results[i]) == 10
            assert all(torch.equal(r, sequential[i]) for r in results[i])
            record("hf threads", RIGHT)
    finally:
        reft.unload()
