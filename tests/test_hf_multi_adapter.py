"""Several named adapters on one ReftModel: PEFT's verbs, mixed-adapter batches (forward, greedy
and beam generation, training), the one fused edit per block, save/load and bad input.

References are independent of the mixed path: each row run alone (a batch of one, the active
adapter set with ``set_adapter``, the single-adapter edit) and the base model without hooks.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import tiny_models  # noqa: E402

from reft_ext import ReftConfig, ReftModel, get_reft_model  # noqa: E402
from reft_ext.hf import mixed  # noqa: E402

VOCAB, HIDDEN, LAYERS = 96, 32, 3
BASE = "__base__"

#: Adapters that differ in layers, positions, rank, weight sharing and intervention type.
CONFIGS = {
    "default": ReftConfig(layers=[0, 2], rank=4, positions="f1+l1"),
    "steer": ReftConfig(layers=[1], rank=2, intervention="direft", positions="l2"),
    "shared": ReftConfig(
        layers="all", rank=3, intervention="consreft", positions="f2+l1", share_weights=True
    ),
    "every": ReftConfig(layers=[2], rank=1, intervention="noreft", positions="all"),
}
#: The rows of the mixed batches: every adapter, the base model, and repeats.
NAMES = ["default", "steer", BASE, "shared", "every", "steer"]
LENGTHS = [6, 3, 5, 6, 4, 2]


def tiny_llama(hidden=HIDDEN, layers=LAYERS):
    return tiny_models.tiny_llama(0, hidden, layers, VOCAB)


def batch(lengths=LENGTHS, total=6, side="right", seed=1):
    """(input_ids, attention_mask): random real tokens, padding id 0 on ``side``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(total - n, total)
        ids[i, span], mask[i, span] = torch.randint(3, VOCAB, (n,), generator=gen), 1
    return ids, mask


def perturb(interventions, seed):
    """Clearly non-identity, distinct parameters: W and b random, and a free R moved off its
    initialization (an orthonormal R stays orthonormal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for iv in interventions.values():
            for name, p in iv.named_parameters():
                if name != "R" or not iv.orthonormal:
                    p.add_(0.5 * torch.randn(p.shape, generator=gen))


def make_reft(configs=CONFIGS):
    """A tiny Llama with the adapters of ``configs`` (the first built by get_reft_model, the rest
    added), each perturbed differently; "default" active. Also returns an untouched base copy."""
    model = tiny_llama()
    base = copy.deepcopy(model)
    (first, config), *rest = configs.items()
    reft = get_reft_model(model, config, adapter_name=first)
    for name, config in rest:
        reft.add_adapter(name, config)
    for seed, interventions in enumerate(reft.adapters.values()):
        perturb(interventions, seed)
    return reft.eval(), base


def logits_alone(reft, base, name, **inputs):
    """The logits of a batch run with one adapter through the single-adapter path, or through
    the base model without hooks for "__base__"."""
    if name == BASE:
        return base(**inputs).logits
    reft.set_adapter(name)
    return reft(**inputs).logits


def rows(inputs, i):
    return {k: v[i : i + 1] for k, v in inputs.items()}


# ---- mixed forward -----------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_mixed_forward_equals_each_row_alone(side):
    reft, base = make_reft()
    ids, mask = batch(side=side)
    with torch.no_grad():
        got = reft(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            want = logits_alone(
                reft, base, name, **rows(dict(input_ids=ids, attention_mask=mask), i)
            )
            torch.testing.assert_close(got[i : i + 1], want, rtol=1e-4, atol=1e-5, msg=name)
        # Each adapter really edits: its row differs from the base model's.
        plain = base(input_ids=ids, attention_mask=mask).logits
    for i, name in enumerate(NAMES):
        assert torch.equal(got[i], plain[i]) == (name == BASE), name


def test_mixed_batch_of_one_adapter_equals_the_active_adapter_call():
    """adapter_names naming one adapter for every row is the ordinary call with it active."""
    reft, _ = make_reft()
    ids, mask = batch()
    with torch.no_grad():
        for name in CONFIGS:
            reft.set_adapter(name)
            want = reft(input_ids=ids, attention_mask=mask).logits
            names = [name] * len(ids)
            got = reft(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_base_rows_run_the_base_model():
    reft, base = make_reft()
    ids, mask = batch()
    with torch.no_grad():
        got = reft(input_ids=ids, attention_mask=mask, adapter_names=[BASE] * len(ids)).logits
        assert torch.equal(got, base(input_ids=ids, attention_mask=mask).logits)


def test_one_fused_call_per_block(monkeypatch):
    """Every block edits all its rows in one lowrank_edit_multi call, with one stacked
    intervention per adapter present at the block and position group, padded to the largest
    rank; a block no present adapter edits makes no call."""
    calls = []

    def counting(h, P, Q, b, adapter):
        calls.append((tuple(P.shape), sorted(set(adapter.tolist()))))
        return original(h, P, Q, b, adapter)

    original = mixed.lowrank_edit_multi
    monkeypatch.setattr(mixed, "lowrank_edit_multi", counting)
    reft, _ = make_reft()
    ids, mask = batch()
    with torch.no_grad():
        reft(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    # Block 0: default (first, last) + shared (shared); block 1: steer (last) + shared;
    # block 2: default (first, last) + shared + every (all). Ranks 4, 2, 3, 1.
    assert calls == [
        ((3, 4, HIDDEN), [0, 1, 2]),
        ((2, 3, HIDDEN), [0, 1]),
        ((4, 4, HIDDEN), [0, 1, 2, 3]),
    ]
    calls.clear()
    with torch.no_grad():
        reft(input_ids=ids[:2], attention_mask=mask[:2], adapter_names=["steer", BASE])
    assert calls == [((1, 2, HIDDEN), [0])]  # block 1 only
    calls.clear()
    with torch.no_grad():
        reft(input_ids=ids, attention_mask=mask)  # no adapter_names: the single-adapter edit
    assert calls == []


def test_threads_with_different_mixed_batches_match_sequential_calls():
    """Two threads sharing the model, each with its own mixed batch, get the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    reft, _ = make_reft()
    ids, mask = batch()
    batches = [NAMES, list(reversed(NAMES))]

    def run(names):
        with torch.no_grad():
            return reft(input_ids=ids, attention_mask=mask, adapter_names=names).logits

    want = [run(names) for names in batches]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            for got, expected in zip(pool.map(run, batches), want, strict=True):
                assert torch.equal(got, expected)


# ---- mixed generation --------------------------------------------------------------------------


def generate_alone(reft, base, name, **kwargs):
    if name == BASE:
        return base.generate(**kwargs)
    reft.set_adapter(name)
    return reft.generate(**kwargs)


@pytest.mark.parametrize("intervene_on", ["prompt", "all"])
def test_mixed_greedy_generation_equals_each_row_alone(intervene_on):
    reft, base = make_reft()
    ids, mask = batch(side="left")
    options = dict(max_new_tokens=6, do_sample=False)
    got = reft.generate(
        input_ids=ids,
        attention_mask=mask,
        adapter_names=NAMES,
        intervene_on=intervene_on,
        **options,
    )
    kwargs = {} if intervene_on == "prompt" else {"intervene_on": "all"}
    for i, name in enumerate(NAMES):
        inputs = rows(dict(input_ids=ids, attention_mask=mask), i)
        if name != BASE:
            inputs |= kwargs
        want = generate_alone(reft, base, name, **inputs, **options)
        assert got[i].tolist() == want[0].tolist(), name
    # The adapters change the continuations (the test would pass vacuously otherwise).
    plain = base.generate(input_ids=ids, attention_mask=mask, **options)
    assert not torch.equal(got, plain)


@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=1, num_return_sequences=3),  # top_k=1: sampling is greedy
    ],
    ids=["beams", "return-sequences"],
)
def test_every_expanded_copy_keeps_its_rows_adapter(options):
    reft, base = make_reft()
    ids, mask = batch(side="left")
    copies = options["num_return_sequences"]
    got = reft.generate(
        input_ids=ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=4, **options
    )
    assert got.shape[0] == len(NAMES) * copies
    for i, name in enumerate(NAMES):
        inputs = rows(dict(input_ids=ids, attention_mask=mask), i)
        want = generate_alone(reft, base, name, **inputs, max_new_tokens=4, **options)
        assert got[i * copies : (i + 1) * copies].tolist() == want.tolist(), name


# ---- training several adapters in one batch ----------------------------------------------------


def test_mixed_batch_gradients_equal_the_separate_batches():
    """Two adapters trained in one mixed batch (with a base row) get, each, the gradient of
    their own rows: the sum over rows of a separate single-adapter batch's gradients."""
    reft, _ = make_reft()
    reft.train()
    ids, mask = batch()
    names = ["default", "steer", "default", BASE, "steer", "default"]
    weights = torch.randn(
        len(names), ids.shape[1], VOCAB, generator=torch.Generator().manual_seed(5)
    )

    def loss(logits, which):
        return (logits * weights[which]).sum()

    reft.set_requires_grad(["default", "steer"])
    everything = list(reft.adapters["default"].parameters()) + list(
        reft.adapters["steer"].parameters()
    )
    logits = reft(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    got = torch.autograd.grad(loss(logits, slice(None)), everything)
    want = []
    for name in ("default", "steer"):
        reft.set_adapter(name)
        which = [i for i, n in enumerate(names) if n == name]
        logits = reft(input_ids=ids[which], attention_mask=mask[which]).logits
        want += torch.autograd.grad(loss(logits, which), list(reft.adapters[name].parameters()))
    assert all(g.abs().sum() > 0 for g in got)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_mixed_batch_refuses_dropout_in_training():
    configs = {"default": ReftConfig(layers=[0], rank=2, dropout=0.1)}
    reft, _ = make_reft(configs)
    ids, mask = batch(LENGTHS[:2])
    reft.train()
    with pytest.raises(ValueError, match="adapter 'default' .*dropout 0.1"):
        reft(input_ids=ids, attention_mask=mask, adapter_names=["default", BASE])
    reft.eval()  # dropout is off in eval: the mixed batch runs
    reft(input_ids=ids, attention_mask=mask, adapter_names=["default", BASE])


# ---- PEFT's verbs ------------------------------------------------------------------------------


def trainable(reft):
    return {
        name
        for name, interventions in reft.adapters.items()
        if any(p.requires_grad for p in interventions.parameters())
    }


def hooked_blocks(reft):
    blocks = reft.model.model.layers
    return [i for i, block in enumerate(blocks) if block._forward_hooks]


def test_add_set_and_the_active_adapter():
    reft, _ = make_reft()
    assert reft.active_adapter == "default"
    assert list(reft.reft_configs) == list(CONFIGS)
    assert trainable(reft) == {"default"}  # added adapters are frozen, as in PEFT
    assert not any(p.requires_grad for p in reft.model.parameters())
    reft.set_adapter("steer")
    assert reft.active_adapter == "steer"
    assert trainable(reft) == {"steer"}
    assert reft.reft_config == CONFIGS["steer"]
    assert reft.layers == [1]
    assert reft.interventions is reft.adapters["steer"]
    assert list(reft.interventions) == ["layer1_last"]
    ids, mask = batch()
    with torch.no_grad():  # calls without adapter_names use the active adapter
        want = reft(input_ids=ids, attention_mask=mask, adapter_names=["steer"] * len(ids))
        got = reft(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    reft.set_requires_grad(["default", "every"])
    assert trainable(reft) == {"default", "steer", "every"}
    reft.set_requires_grad("steer", False)
    assert trainable(reft) == {"default", "every"}
    assert hooked_blocks(reft) == [0, 1, 2]


def test_delete_adapter():
    configs = {name: CONFIGS[name] for name in ("default", "steer", "every")}
    reft, _ = make_reft(configs)
    reft.delete_adapter("steer")  # the only adapter at block 1: its hook goes too
    assert list(reft.reft_configs) == ["default", "every"]
    assert "steer" not in reft.adapters
    assert hooked_blocks(reft) == [0, 2]
    reft.set_adapter("every")
    reft.delete_adapter("every")  # the active one: the first remaining becomes active
    assert reft.active_adapter == "default"
    assert trainable(reft) == {"default"}
    assert hooked_blocks(reft) == [0, 2]
    with pytest.raises(ValueError, match="adapter_name 'default' is the only adapter"):
        reft.delete_adapter("default")
    reft.add_adapter("steer", CONFIGS["steer"])  # a deleted name can be added again
    assert hooked_blocks(reft) == [0, 1, 2]
    base = reft.unload()
    assert not any(block._forward_hooks for block in base.model.layers)


def test_a_failing_first_adapter_leaves_no_hook():
    model = tiny_llama()
    with pytest.raises(ValueError, match="layer 3 out of range"):
        get_reft_model(model, ReftConfig(layers=[3]))
    assert not model._forward_pre_hooks
    assert not any(block._forward_hooks for block in model.model.layers)
    assert all(p.requires_grad for p in model.parameters())  # not frozen either


# ---- state dict, save and load -----------------------------------------------------------------


def test_state_dict_keys_and_strict_round_trip():
    """ "default" keeps the single-adapter keys; another adapter's are adapters.<name>.*."""
    reft, _ = make_reft()
    state = reft.state_dict()
    want = {f"interventions.{k}" for k in reft.adapters["default"].state_dict()}
    for name in ("steer", "shared", "every"):
        want |= {f"adapters.{name}.{k}" for k in reft.adapters[name].state_dict()}
    assert set(state) == want
    other, _ = make_reft()
    for interventions in other.adapters.values():
        perturb(interventions, seed=9)
    assert not other.load_state_dict(state).missing_keys  # strict
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    # A single-adapter state dict (older Trainer checkpoints) loads into "default".
    single = {k: v for k, v in state.items() if k.startswith("interventions.")}
    result = other.load_state_dict(single, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == [k for k in state if k.startswith("adapters.")]
    broken = dict(state)
    broken.pop("interventions.layer0_first.W")
    broken["adapters.nope.layer0_first.b"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as error:
        other.load_state_dict(broken)
    assert '"interventions.layer0_first.W"' in str(error.value)  # named as state_dict() names it
    assert '"adapters.nope.layer0_first.b"' in str(error.value)


def test_save_and_load_every_adapter(tmp_path):
    reft, base = make_reft()
    ids, mask = batch()
    with torch.no_grad():
        want = reft(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    written = reft.save_pretrained(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in written) == sorted(
        [
            "reft_config.json",
            "reft_model.safetensors",
            *(
                f"{name}/{file}"
                for name in ("steer", "shared", "every")
                for file in ("reft_config.json", "reft_model.safetensors")
            ),
        ]
    )
    # The top folder is the single-adapter format: from_pretrained reads "default" from it.
    loaded = ReftModel.from_pretrained(base, tmp_path)
    for name in ("steer", "shared", "every"):
        loaded.load_adapter(tmp_path / name, name)
    assert loaded.reft_configs == reft.reft_configs
    assert trainable(loaded) == {"default"}  # loaded adapters are frozen until set_adapter
    for key, value in reft.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        got = loaded.eval()(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    assert torch.equal(got, want)


def test_save_selected_adapters_and_load_under_another_name(tmp_path):
    reft, base = make_reft()
    assert reft.save_pretrained(tmp_path, selected_adapters=["steer"]) == [
        tmp_path / "steer" / "reft_config.json",
        tmp_path / "steer" / "reft_model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steer"]
    # A non-default adapter's folder also loads by itself, as any name.
    loaded = ReftModel.from_pretrained(base, tmp_path / "steer", adapter_name="tone")
    loaded.load_adapter(tmp_path / "steer", "again")
    ids, mask = batch()
    with torch.no_grad():
        reft.set_adapter("steer")
        want = reft(input_ids=ids, attention_mask=mask).logits
        for name in ("tone", "again"):
            names = [name] * len(ids)
            got = loaded(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            assert torch.equal(got, want), name


def test_load_adapter_checks_the_folder_and_adds_nothing_on_failure(tmp_path):
    reft, _ = make_reft()
    reft.save_pretrained(tmp_path, selected_adapters=["default", "steer"])
    other = get_reft_model(tiny_llama(hidden=48), ReftConfig(layers=[0]))
    with pytest.raises(ValueError, match="reft_config.json: hidden_size is 32, this model's is 48"):
        other.load_adapter(tmp_path / "steer", "steer")
    meta = json.loads((tmp_path / "steer" / "reft_config.json").read_text())
    meta["reft_config"]["rank"] = 3  # the tensors no longer fit the config
    (tmp_path / "steer" / "reft_config.json").write_text(json.dumps(meta))
    fresh, _ = make_reft({"default": CONFIGS["default"]})
    with pytest.raises(ValueError, match=r"tensor 'layer1_last\.R' has shape \(2, 32\)"):
        fresh.load_adapter(tmp_path / "steer", "steer")
    assert list(fresh.reft_configs) == ["default"]
    assert hooked_blocks(fresh) == [0, 2]  # the failed adapter's hook at block 1 is gone
    with pytest.raises(FileNotFoundError, match="reft_config.json not found"):
        fresh.load_adapter(tmp_path / "missing", "missing")
    with pytest.raises(ValueError, match="adapter_name 'default' exists already"):
        fresh.load_adapter(tmp_path, "default")


# ---- bad input ---------------------------------------------------------------------------------

BAD_CALLS = {
    "set-unknown": (lambda r: r.set_adapter("nope"), ValueError, "adapter_name: adapter 'nope'"),
    "delete-unknown": (lambda r: r.delete_adapter("nope"), ValueError, "adapter 'nope' was never"),
    "grad-unknown": (
        lambda r: r.set_requires_grad(["default", "nope"]),
        ValueError,
        "adapter_names: adapter 'nope'",
    ),
    "save-unknown": (
        lambda r: r.save_pretrained("unused", selected_adapters=["nope"]),
        ValueError,
        "selected_adapters: adapter 'nope'",
    ),
    "add-existing": (
        lambda r: r.add_adapter("steer", CONFIGS["steer"]),
        ValueError,
        "adapter_name 'steer' exists already",
    ),
    "add-base": (lambda r: r.add_adapter(BASE, CONFIGS["steer"]), ValueError, "'__base__'"),
    "add-dotted": (lambda r: r.add_adapter("a.b", CONFIGS["steer"]), ValueError, "'a.b'"),
    "add-moduledict-attribute": (
        lambda r: r.add_adapter("keys", CONFIGS["steer"]),
        ValueError,
        "adapter_name 'keys' is an attribute",
    ),
    "add-not-a-str": (lambda r: r.add_adapter(3, CONFIGS["steer"]), TypeError, "adapter_name"),
    "add-not-a-config": (lambda r: r.add_adapter("x", {"layers": [0]}), TypeError, "ReftConfig"),
    "layer-range": (
        lambda r: r.add_adapter("x", ReftConfig(layers=[1, 3])),
        ValueError,
        "layer 3 out of range: the model has 3 blocks",
    ),
    "rank-above-hidden": (
        lambda r: r.add_adapter("x", ReftConfig(layers=[0], rank=HIDDEN + 1)),
        ValueError,
        "ReftConfig.rank 33 exceeds the model's hidden size 32",
    ),
    "dtype": (
        lambda r: r.add_adapter("x", ReftConfig(layers=[0], dtype="bfloat16")),
        ValueError,
        "ReftConfig.dtype",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_adapter_verbs_name_the_offender(case):
    call, error, message = BAD_CALLS[case]
    reft, _ = make_reft()
    before = (list(reft.reft_configs), reft.active_adapter, hooked_blocks(reft))
    with pytest.raises(error, match=re.escape(message)):
        call(reft)
    assert (list(reft.reft_configs), reft.active_adapter, hooked_blocks(reft)) == before


BAD_NAMES = {
    "unknown": (["default", "nope"], ValueError, "adapter_names[1] = 'nope' was never added"),
    "too-short": (["default"], ValueError, "adapter_names has 1 names, the batch has 2 rows"),
    "too-long": (["default"] * 3, ValueError, "adapter_names has 3 names, the batch has 2 rows"),
    "a-str": ("default", TypeError, "adapter_names must be a list of str"),
    "not-a-name": (["default", None], ValueError, "adapter_names[1] = None"),
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
@pytest.mark.parametrize("verb", ["forward", "generate"])
def test_bad_adapter_names_are_named(case, verb):
    names, error, message = BAD_NAMES[case]
    reft, _ = make_reft()
    ids, mask = batch(LENGTHS[:2])
    run = reft if verb == "forward" else lambda **kw: reft.generate(**kw, max_new_tokens=1)
    with pytest.raises(error, match=re.escape(message)):
        run(input_ids=ids, attention_mask=mask, adapter_names=names)


def test_adapter_names_and_explicit_locations_exclude_each_other():
    reft, _ = make_reft()
    ids, mask = batch(LENGTHS[:2])
    with pytest.raises(ValueError, match="adapter_names or intervention_locations"):
        reft(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=["default", BASE],
            intervention_locations=torch.zeros(2, 2, 1, dtype=torch.long),
        )
