"""reft_ext inside pyreft: runs only where pyreft is installed (README: "pyreft interop tests").

pyreft 0.1.0 pins transformers 4.45.1, so these tests live in their own environment; elsewhere the
module is skipped as a whole.
"""

import contextlib
import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pyreft = pytest.importorskip("pyreft")
transformers = pytest.importorskip("transformers")

from tiny_models import tiny_llama  # noqa: E402
from torch.nn.utils.parametrize import is_parametrized  # noqa: E402
from truth import max_rel, orth_error  # noqa: E402

from reft_ext.integrations.pyreft import (  # noqa: E402
    PYREFT_TYPES,
    LoreftIntervention,
    load_pyreft_checkpoint,
)
from reft_ext.integrations.pyreft_interventions import DROP_INS  # noqa: E402
from reft_ext.modules import INTERVENTIONS  # noqa: E402
from reft_ext.retraction import is_stiefel  # noqa: E402

EMBED, RANK = 64, 4


TYPES = [
    "LoreftIntervention",
    "NoreftIntervention",
    "DireftIntervention",
    "NodireftIntervention",
    "ConsreftIntervention",
    "LobireftIntervention",
]
# The types whose pyreft class reads act_fn (the others ignore it, as ours do).
WITH_SOURCE = TYPES[:4]


def _pair(type_name, dtype=torch.float32, **kwargs):
    """(pyreft's module with random trainable tensors, our drop-in holding the same state)."""
    kwargs = dict(embed_dim=EMBED, low_rank_dimension=RANK, dtype=dtype, add_bias=True, **kwargs)
    theirs = _pyreft_intervention(type_name, **kwargs)
    with warnings.catch_warnings():  # add_bias=True on a type that ignores it: a warning, tested
        warnings.simplefilter("ignore")
        ours = DROP_INS[type_name](**kwargs)
    ours.load_state_dict(theirs.state_dict())  # pyreft's form, its parametrization included
    return theirs, ours


def _trainable_grads(module, h, out, g):
    """∂(out·g) for h and for every trainable tensor except the rotation (pyreft differentiates
    its parametrization's ``original``, reft_ext R itself)."""
    named = {
        n.replace("learned_source", "source").replace("proj_layer", "proj"): p
        for n, p in module.named_parameters()
        if "rotate_layer" not in n and not n.startswith("rotation.")
    }
    grads = torch.autograd.grad(out, [h, *named.values()], g, allow_unused=True)
    return dict(zip(["h", *named], grads, strict=True))


# act_fn -> the fused kernels' activation (None: the composite, for a name they do not compute).
ACT_FNS = {"silu": "silu", "gelu_new": "gelu_tanh", "relu": "relu", "mish": None}


@pytest.mark.parametrize(
    ("type_name", "act_fn"),
    [(t, None) for t in TYPES] + [(t, a) for t in WITH_SOURCE for a in ACT_FNS],
)
def test_drop_in_computes_pyrefts_output_and_gradients(type_name, act_fn):
    """On pyreft's own weights (its state dict loaded into ours) each drop-in gives pyreft's
    output and the gradients of h and of every non-rotation tensor (fp32, ≤ 1e-5 relative), with
    the same state-dict keys except the rotation, stored as LoReFT stores it; an act_fn the
    kernels compute takes the fused activated edit, another one the composite."""
    torch.manual_seed(0)
    theirs, ours = _pair(type_name, act_fn=act_fn)
    assert ours.fused_act == (ACT_FNS[act_fn] if act_fn else None)
    theirs.eval(), ours.eval()
    rotation = {k for k in theirs.state_dict() if k.startswith("rotate_layer")}
    expected_keys = set(theirs.state_dict()) - rotation | ({"rotate_layer"} if rotation else set())
    assert set(ours.state_dict()) == expected_keys
    h = torch.randn(2, 7, EMBED, requires_grad=True)
    g = torch.randn(2, 7, EMBED)
    expected, got = theirs(h), ours(h)
    assert got.dtype == expected.dtype == torch.float32
    assert max_rel(got, expected) <= 1e-5
    assert max_rel(got - h, expected - h) <= 1e-5  # the edit itself, not only h
    want, have = _trainable_grads(theirs, h, expected, g), _trainable_grads(ours, h, got, g)
    assert set(have) == set(want)
    for name in want:
        if want[name] is None:  # NodiReFT's proj_layer bias: held, not used, by both
            assert have[name] is None, name
            continue
        assert max_rel(have[name], want[name]) <= 1e-5, name


@pytest.mark.parametrize(
    ("type_name", "act_fn"), [(t, None) for t in TYPES] + [(t, "gelu") for t in WITH_SOURCE]
)
def test_drop_in_bfloat16_error_at_most_twice_pyrefts(type_name, act_fn):
    """bfloat16 h and learned source (pyreft's default dtype): error against the float64
    evaluation of pyreft's module on the same (bf16) weights ≤ 2× pyreft's own bf16 error (with
    act_fn: the fused activated edit)."""
    torch.manual_seed(1)
    theirs, ours = _pair(type_name, dtype=torch.bfloat16, act_fn=act_fn)
    truth = copy.deepcopy(theirs).double().eval()
    h = torch.randn(64, EMBED).bfloat16()
    expected = truth(h.double())
    got, pyreft_result = ours.eval()(h), theirs.eval()(h)
    assert got.dtype == pyreft_result.dtype == torch.bfloat16
    ours_error = (got.double() - expected).abs().max().item()
    pyreft_error = (pyreft_result.double() - expected).abs().max().item()
    assert ours_error <= 2 * pyreft_error + 1e-6, (ours_error, pyreft_error)


@pytest.mark.parametrize("type_name", TYPES)
def test_drop_in_dropout_is_pyrefts_on_the_whole_output(type_name):
    """In training mode with dropout 0.5 and the same seed, ours zeroes and scales the same
    elements of the whole output (h included) as pyreft's; ConsReFT has no dropout in either."""
    theirs, ours = _pair(type_name, dropout=0.5)
    theirs.train(), ours.train()
    h = torch.randn(4, EMBED)
    torch.manual_seed(7)
    expected = theirs(h)
    torch.manual_seed(7)
    got = ours(h)
    assert max_rel(got, expected) <= 1e-5
    zeros = (got == 0).sum().item()
    if type_name == "ConsreftIntervention":
        assert zeros == 0
    else:
        assert 0.3 * h.numel() < zeros < 0.7 * h.numel()  # the mask hits h's part too


def test_drop_in_bad_keywords_are_named():
    """An unknown keyword, an act_fn that is neither a callable nor a known name, a missing
    width: errors naming them; a keyword pyreft's class ignores: a warning naming it."""
    ok = dict(embed_dim=EMBED, low_rank_dimension=RANK)
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['rank'\]"):
        DROP_INS["LoreftIntervention"](**ok, rank=4)
    with pytest.raises(ValueError, match=r"act_fn must be .* got 'no_such_act'"):
        DROP_INS["DireftIntervention"](**ok, act_fn="no_such_act")
    with pytest.raises(ValueError, match=r"act_fn must be .* got int"):
        DROP_INS["LoreftIntervention"](**ok, act_fn=3)
    with pytest.raises(TypeError, match="the keyword low_rank_dimension"):
        DROP_INS["NoreftIntervention"](embed_dim=EMBED)
    with pytest.raises(ValueError, match="low_rank_dimension=65, embed_dim=64"):
        DROP_INS["LoreftIntervention"](embed_dim=EMBED, low_rank_dimension=65)
    with pytest.warns(UserWarning, match="ConsreftIntervention ignores dropout=0.1"):
        DROP_INS["ConsreftIntervention"](**ok, dropout=0.1)
    relu = DROP_INS["LoreftIntervention"](**ok, act_fn=torch.relu, dtype=torch.float32)
    assert relu.act_fn is torch.relu  # a callable is taken as it is


@pytest.mark.parametrize("orthogonality", ["householder", "retraction"])
def test_drop_in_nested_state_dict_round_trip(orthogonality):
    """Inside another module, a drop-in saves pyreft's keys under its prefix and a strict load of
    that state restores it (exactly for a plain R; a parametrized R restarts its parametrization
    at the loaded value, which it then computes to rounding); a missing tensor is an error naming
    it."""
    kw = _kw(orthogonality=orthogonality)
    holder = torch.nn.ModuleDict({"a": DROP_INS["ConsreftIntervention"](**kw)})
    state = holder.state_dict()
    assert set(state) == {"a.embed_dim", "a.interchange_dim", "a.learned_source", "a.rotate_layer"}
    other = torch.nn.ModuleDict({"a": DROP_INS["ConsreftIntervention"](**kw)})
    other.load_state_dict(state)
    if orthogonality == "retraction":
        assert torch.equal(other["a"].R, holder["a"].R)
    else:
        assert max_rel(other["a"].R, holder["a"].R) <= 1e-6
    assert torch.equal(other["a"].learned_source, holder["a"].learned_source)
    del state["a.learned_source"]
    with pytest.raises(RuntimeError, match="a.learned_source"):
        other.load_state_dict(state)


def _kw(**extra):
    return dict(embed_dim=EMBED, low_rank_dimension=RANK, dtype=torch.float32, **extra)


LAYERS = [1, 2]
# First and last token of every row, at each intervened layer (pyvene's unit_locations).
LOCATIONS = {"sources->base": (None, [[[0, 5], [0, 5]]] * len(LAYERS))}


def _pyreft_model(model, make_intervention):
    """pyreft's ReftModel around ``model``: one intervention per layer of LAYERS, block output."""
    representations = [
        {
            "layer": layer,
            "component": "block_output",
            "low_rank_dimension": RANK,
            "intervention": make_intervention(),
        }
        for layer in LAYERS
    ]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=representations))
    reft_model.set_device("cpu")
    return reft_model


def test_pyreft_training_save_and_load_with_our_class(tmp_path):
    """pyreft's ReftModel trains with our class, saves, reloads, and reft_ext imports the save."""
    model = tiny_llama(hidden=EMBED, layers=4, vocab=64)
    reft_model = _pyreft_model(
        model,
        lambda: LoreftIntervention(
            embed_dim=EMBED,
            low_rank_dimension=RANK,
            dtype=torch.float32,
            orthogonality="retraction",
        ),
    )
    ids = torch.randint(0, 64, (2, 6))
    params = [p for p in reft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        _, out = reft_model({"input_ids": ids}, unit_locations=LOCATIONS, labels=ids)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    # No keep_orthonormal call: the automatic retraction kept R orthonormal through the steps
    # (pyreft's trainers build their optimizer inside train(), out of the user's reach).
    for intervention in reft_model.interventions.values():
        module = intervention[0] if isinstance(intervention, (tuple, list)) else intervention
        assert orth_error(module.R) <= 1e-5
    reft_model.save(str(tmp_path))
    # pyreft/pyvene load the save by our class's qualified name (it used to be a factory's
    # <locals> name, which pyvene could not import).
    reloaded = pyreft.ReftModel.load(str(tmp_path), tiny_llama(hidden=EMBED, layers=4, vocab=64))
    for key, intervention in reft_model.interventions.items():
        module = intervention[0] if isinstance(intervention, (tuple, list)) else intervention
        again = reloaded.interventions[key]
        again = again[0] if isinstance(again, (tuple, list)) else again
        assert type(again) is LoreftIntervention
        # pyvene rebuilds each intervention with its default keywords, so the learned source
        # comes back in pyreft's default bfloat16 (as pyreft's own class does): the saved
        # tensors, rounded to that dtype; and with the default orthogonality ("householder"),
        # whose parametrization restarts at the saved R and computes it to rounding.
        for name, value in module.state_dict().items():
            loaded = again.state_dict()[name]
            if name == "rotate_layer":
                assert max_rel(loaded, value) <= 1e-6
            else:
                assert torch.equal(loaded, value.to(loaded.dtype)), name
        h = torch.randn(3, EMBED)
        assert max_rel(again.eval()(h), module.eval()(h)) <= 1e-2
    imported = load_pyreft_checkpoint(
        tiny_llama(hidden=EMBED, layers=4, vocab=64), tmp_path, positions="f1+l1"
    ).eval()
    for key, intervention in reft_model.interventions.items():
        layer = int(key.split("_")[1])
        (ours,) = [m for k, m in imported.interventions.items() if k.startswith(f"layer{layer}_")]
        h = torch.randn(3, EMBED)
        theirs = intervention[0] if isinstance(intervention, (tuple, list)) else intervention
        assert torch.allclose(ours(h), theirs.eval()(h), atol=1e-5)


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_bench_pyreft_provider_runs_pyrefts_module_with_the_cases_weights(mode):
    """The benchmark's ``pyreft`` provider: pyreft's own module, loaded with the case's R, W, b,
    computes reft_ext.reference.loreft (fp32, ≤ 1e-5 relative), and forward+backward returns the
    gradients of h and of the module's trainable parameters (W and b match the reference's)."""
    from reft_ext import reference
    from reft_ext.bench.cases import (
        OpCase,
        make_inputs,
        op_providers,
        provider_call,
        pyreft_intervention,
    )

    assert op_providers() == ("fused", "naive", "pyreft", "copy")
    case = OpCase(N=33, d=EMBED, r=RANK, dtype="float32", mode=mode)
    inputs = make_inputs(case, torch.device("cpu"), sets=2)
    call = provider_call(case, "pyreft", inputs)
    for x in inputs * 2:  # the call rotates through the input sets
        result = call()
        h, R, W, b = (t.detach().clone().requires_grad_() for t in (x.h, x.R, x.W, x.b))
        expected = reference.loreft(h, R, W, b)
        if mode == "forward":
            assert not result.requires_grad
            assert max_rel(result, expected) <= 1e-5
            continue
        module = pyreft_intervention(x.R, x.W, x.b, torch.float32, torch.device("cpu"))
        assert isinstance(module, pyreft.LoreftIntervention)
        assert torch.allclose(module.rotate_layer.weight.T, x.R.detach(), atol=1e-6)
        names = [name for name, p in module.named_parameters() if p.requires_grad]
        grads = dict(zip(["h", *names], result, strict=True))
        want = dict(zip("hWb", torch.autograd.grad(expected, (h, W, b), x.grad_out), strict=True))
        assert max_rel(grads["h"], want["h"]) <= 1e-5
        assert max_rel(grads["learned_source.weight"], want["W"]) <= 1e-5
        assert max_rel(grads["learned_source.bias"], want["b"]) <= 1e-5
        rotate = grads["rotate_layer.parametrizations.weight.original"]
        assert rotate.shape == (EMBED, RANK) and torch.isfinite(rotate).all()


def test_bench_table_shows_the_pyreft_column(tmp_path):
    """A run of the benchmark CLI in pyreft's environment has the pyreft column and its JSON."""
    from reft_ext.bench.__main__ import main as bench_main
    from reft_ext.bench.record import load_results

    threads = torch.get_num_threads()
    try:
        args = ["--quick", "--repeats", "3", "--threads", "1", "--out", str(tmp_path)]
        assert bench_main(args + ["--only", "forward-N256-d2048-r4-float32"]) == 0
    finally:
        torch.set_num_threads(threads)
    machine, measurements = load_results(tmp_path / "results.json")
    assert machine["pyreft"] == "0.1.0"
    assert [m.provider for m in measurements] == ["fused", "naive", "pyreft", "copy"]
    medians = {m.provider: m.value for m in measurements}
    lines = (tmp_path / "table.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| mode |")).split(" | ")
    (row,) = [line.split(" | ") for line in lines if line.startswith("| forward |")]
    assert row[header.index("pyreft/fused")] == f"{medians['pyreft'] / medians['fused']:.2f}x"


def _pyreft_intervention(type_name: str, **kwargs) -> torch.nn.Module:
    """One of pyreft's own classes (float32 and add_bias=True unless ``kwargs`` say otherwise),
    with every trainable tensor random (biases too)."""
    kwargs = {**_kw(add_bias=True), **kwargs}
    module = getattr(pyreft, type_name)(**kwargs)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rotate_layer" not in name:  # the rotation stays pyreft's random orthogonal one
                p.copy_(torch.randn_like(p) / EMBED**0.5)
    return module


@pytest.mark.parametrize("type_name", TYPES)
def test_every_pyreft_type_saved_by_pyreft_imports_with_pyrefts_outputs(tmp_path, type_name):
    """pyreft saves a model with its own class at two layers; reft_ext's import computes the same
    edit as each of pyreft's modules (fp32, ≤ 1e-5 relative) and the same logits."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=EMBED, layers=4, vocab=64)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    theirs = _pyreft_model(model, lambda: _pyreft_intervention(type_name))
    theirs.save(str(tmp_path))

    fresh = tiny_llama(hidden=EMBED, layers=4, vocab=64)
    fresh.load_state_dict(base_state)
    ours = load_pyreft_checkpoint(fresh, tmp_path, positions="f1+l1").eval()
    assert ours.reft_config.intervention == PYREFT_TYPES[type_name][0]
    h = torch.randn(5, EMBED)
    for key, intervention in theirs.interventions.items():
        layer = int(key.split("_")[1])
        (module,) = [m for k, m in ours.interventions.items() if k.startswith(f"layer{layer}_")]
        pyreft_module = intervention[0] if isinstance(intervention, (tuple, list)) else intervention
        expected = pyreft_module.eval()(h)
        assert max_rel(module(h), expected) <= 1e-5
        assert max_rel(module(h) - h, expected - h) <= 1e-5  # the edit itself, not only h

    ids = torch.randint(0, 64, (2, 6))
    _, expected_logits = theirs({"input_ids": ids}, unit_locations=LOCATIONS)
    got = ours(input_ids=ids).logits
    assert max_rel(got, expected_logits.logits) <= 1e-5


def test_apply_swaps_every_binding_and_remove_restores():
    """apply() rebinds pyreft's six classes wherever a loaded module holds them (pyreft's package,
    pyreft.interventions, a user's alias), as a handle and as a context manager; remove() and the
    block's end put pyreft's back, and leave a name rebound since alone."""
    import sys
    import types

    import pyreft.interventions as pyreft_classes

    from reft_ext.integrations.pyreft import apply

    originals = {name: getattr(pyreft_classes, name) for name in DROP_INS}
    user = types.ModuleType("a_users_module")
    user.Alias = pyreft.NoreftIntervention
    sys.modules[user.__name__] = user
    try:
        with apply() as swap:
            for name, ours in DROP_INS.items():
                assert getattr(pyreft, name) is ours
                assert getattr(pyreft_classes, name) is ours
            assert user.Alias is DROP_INS["NoreftIntervention"]
            assert "a_users_module.Alias" in swap.replaced
            assert "pyreft.LoreftIntervention" in swap.replaced
        for name, original in originals.items():
            assert getattr(pyreft, name) is original
            assert getattr(pyreft_classes, name) is original
        assert user.Alias is originals["NoreftIntervention"]

        handle = apply()
        user.Alias = "rebound by the user"
        handle.remove()
        handle.remove()  # idempotent
        assert pyreft.LoreftIntervention is originals["LoreftIntervention"]
        assert user.Alias == "rebound by the user"
    finally:
        del sys.modules[user.__name__]


class _StackCollator:
    """Stacks equal-length examples (pyreft's own collator needs a tokenizer)."""

    def __call__(self, examples):
        return {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in examples[0]}


@pytest.mark.parametrize("orthogonality", ["householder", "retraction"])
@pytest.mark.parametrize("type_name", TYPES)
def test_pyreft_trainer_after_apply_trains_ours_and_saves(tmp_path, type_name, orthogonality):
    """pyreft's own flow after the one-line swap: its class names build our drop-ins, pyreft's
    ReftTrainerForCausalLM (its optimizer made inside train(), AdamW with weight decay) lowers the
    loss and R stays orthonormal with no extra call; the save reloads through pyreft's
    ReftModel.load into our class with the same outputs."""
    from reft_ext.integrations.pyreft import apply

    torch.manual_seed(0)
    model = tiny_llama(hidden=EMBED, layers=4, vocab=64)
    with apply(orthogonality=orthogonality):
        reft_model = _pyreft_model(
            model,
            lambda: getattr(pyreft, type_name)(
                embed_dim=EMBED, low_rank_dimension=RANK, dtype=torch.float32, add_bias=False
            ),
        )
    modules = [
        v[0] if isinstance(v, (tuple, list)) else v for v in reft_model.interventions.values()
    ]
    assert all(type(m) is DROP_INS[type_name] for m in modules)
    ids = torch.randint(3, 64, (8, 6))
    data = [
        {
            "input_ids": row,
            "attention_mask": torch.ones(6, dtype=torch.long),
            "labels": row,
            "intervention_locations": torch.tensor([[0, 5]] * len(LAYERS)),
        }
        for row in ids
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=2e-2,
        weight_decay=0.01,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
    )
    trainer = pyreft.ReftTrainerForCausalLM(
        model=reft_model, args=args, train_dataset=data, data_collator=_StackCollator()
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0]
    for module in modules:
        if hasattr(module, "R"):
            assert orth_error(module.R) <= 1e-5
    reft_model.save(str(tmp_path / "adapter"))
    loaded = pyreft.ReftModel.load(
        str(tmp_path / "adapter"), tiny_llama(hidden=EMBED, layers=4, vocab=64)
    )
    h = torch.randn(3, EMBED)
    for key, module in zip(reft_model.interventions, modules, strict=True):
        again = loaded.interventions[key]
        again = again[0] if isinstance(again, (tuple, list)) else again
        assert type(again) is DROP_INS[type_name]
        # pyvene rebuilds with the default keywords: the learned source comes back in pyreft's
        # default bfloat16, the saved tensors rounded to it (as for pyreft's own classes).
        assert max_rel(again.eval()(h), module.eval()(h)) <= 2e-2


@pytest.mark.parametrize("type_name", TYPES)
def test_apply_loads_checkpoints_saved_by_pyrefts_classes(tmp_path, type_name):
    """A checkpoint pyreft saved with its own classes loads through pyreft's ReftModel.load as our
    drop-ins after apply(), with pyreft's outputs (learned sources bf16-representable, since
    pyvene rebuilds them in bfloat16). pyreft's own NoReFT/NodiReFT cannot be rebuilt by that
    load (their class requires add_bias, which pyvene does not pass); ours can."""
    from reft_ext.integrations.pyreft import apply

    torch.manual_seed(0)
    model = tiny_llama(hidden=EMBED, layers=4, vocab=64)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    def make():
        module = _pyreft_intervention(type_name, add_bias=False)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "rotate_layer" not in name:
                    p.copy_(p.bfloat16().float())
        return module

    theirs = _pyreft_model(model, make)
    theirs.save(str(tmp_path))
    fresh = tiny_llama(hidden=EMBED, layers=4, vocab=64)
    fresh.load_state_dict(base_state)
    if type_name in ("NoreftIntervention", "NodireftIntervention"):
        with pytest.raises(KeyError, match="add_bias"):
            pyreft.ReftModel.load(str(tmp_path), fresh)
    with apply():
        loaded = pyreft.ReftModel.load(str(tmp_path), fresh)
    h = torch.randn(5, EMBED)
    for key, intervention in theirs.interventions.items():
        pyreft_module = intervention[0] if isinstance(intervention, (tuple, list)) else intervention
        ours = loaded.interventions[key]
        ours = ours[0] if isinstance(ours, (tuple, list)) else ours
        assert type(ours) is DROP_INS[type_name]
        expected = pyreft_module.eval()(h)
        assert max_rel(ours.eval()(h), expected) <= 1e-5


@pytest.mark.parametrize("intervention", ["loreft", "noreft", "direft", "consreft", "lobireft"])
def test_export_loads_in_pyreft_with_our_outputs(tmp_path, intervention):
    """A reft_ext ReftModel exported with save_pyreft_checkpoint loads through pyreft's
    ReftModel.load — with pyreft's own classes where pyreft can rebuild them, and after apply()
    for all — and computes ours: every intervention's output and the logits at the first and last
    token (fp32, learned sources bf16-representable since pyvene rebuilds them in bfloat16)."""
    from reft_ext import ReftConfig, get_reft_model
    from reft_ext.integrations.pyreft import EXPORT_TYPES, apply, save_pyreft_checkpoint

    torch.manual_seed(0)
    model = tiny_llama(hidden=EMBED, layers=4, vocab=64)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    config = ReftConfig(layers=LAYERS, rank=RANK, intervention=intervention, share_weights=True)
    ours = get_reft_model(model, config).eval()
    orthonormal = INTERVENTIONS[intervention].orthonormal
    with torch.no_grad():  # pyreft holds an orthonormal R in float32, all else in bfloat16
        for name, p in ours.interventions.named_parameters():
            if not (orthonormal and name.endswith(".R")):
                p.copy_((p + torch.randn_like(p) * 0.1).bfloat16().float())
    save_pyreft_checkpoint(ours, tmp_path)

    def fresh():
        again = tiny_llama(hidden=EMBED, layers=4, vocab=64)
        again.load_state_dict(base_state)
        return again

    loads = [apply]
    if intervention in ("loreft", "consreft", "lobireft"):
        loads.append(contextlib.nullcontext)  # pyreft's own classes
    ids = torch.randint(3, 64, (2, 6))
    expected_logits = ours(input_ids=ids).logits
    for swap in loads:
        with swap():
            theirs = pyreft.ReftModel.load(str(tmp_path), fresh())
        pyreft_name = EXPORT_TYPES[intervention][0]
        for layer, (_, intervention_module) in zip(
            LAYERS, theirs.interventions.items(), strict=True
        ):
            module = (
                intervention_module[0]
                if isinstance(intervention_module, (tuple, list))
                else intervention_module
            )
            assert type(module).__name__ == pyreft_name
            assert (type(module) is DROP_INS[pyreft_name]) == (swap is apply)
            h = torch.randn(5, EMBED)
            expected = ours.interventions[f"layer{layer}_shared"](h)
            assert max_rel(module.eval()(h.to(torch.bfloat16)).float(), expected) <= 2e-2
            assert max_rel(module.float()(h), expected) <= 1e-5
        _, got = theirs({"input_ids": ids}, unit_locations=LOCATIONS)
        assert max_rel(got.logits, expected_logits) <= 1e-5


def test_bench_pyreft_step_providers_train_pyrefts_class_and_ours():
    """The pyreft-step benchmark's providers run: ``pyreft`` steps pyreft's own class, ``swap``
    our drop-in (built under apply(), which is undone afterwards), and each call updates R."""
    from reft_ext.bench.cases import PyreftStepCase, pyreft_step_calls

    original = pyreft.LoreftIntervention
    calls = pyreft_step_calls(PyreftStepCase(T=8), torch.device("cpu"))
    assert list(calls) == ["frozen", "pyreft", "swap"]
    assert pyreft.LoreftIntervention is original
    (grad,) = calls["frozen"]()  # of the zero added to block 0's output: its backward depth
    assert grad.shape == (64,) and grad.abs().sum() > 0
    for provider, kind in (("pyreft", original), ("swap", DROP_INS["LoreftIntervention"])):
        step = calls[provider]
        reft = step.reft_model
        modules = list(reft.interventions.values())
        assert all(type(m) is kind for m in modules)
        before = [
            m.rotate_layer.weight.detach().clone() if provider == "pyreft" else m.R.detach().clone()
            for m in modules
        ]
        step()
        after = [
            m.rotate_layer.weight.detach() if provider == "pyreft" else m.R.detach()
            for m in modules
        ]
        assert all(
            not torch.equal(b.reshape(a.shape), a) for b, a in zip(before, after, strict=True)
        )


def _give_pyrefts_base(theirs, ours) -> None:
    """Set pyreft's d×d ``base`` (its columns beyond r are random) to our parametrization's base,
    expanded to d×d, so that both compute the same function of the trained X."""
    p = ours.rotation.parametrizations.R[0]
    if hasattr(p, "reflectors"):  # "householder": the base as r reflectors and their signs
        identity = torch.eye(EMBED, dtype=p.reflectors.dtype)
        flipped = torch.cat([identity[:RANK] * p.signs.unsqueeze(-1), identity[RANK:]])
        base = torch.ormqr(p.reflectors, p.tau, flipped)
    else:  # "parametrization": torch's own d×d base
        base = p.base
    with torch.no_grad():
        theirs.rotate_layer.parametrizations.weight[0].base.copy_(base)


@pytest.mark.parametrize("orthogonality", ["householder", "parametrization"])
def test_parametrized_drop_in_trains_as_pyrefts_class(orthogonality):
    """With orthogonality="householder" (or torch's "parametrization"), the drop-in trains
    pyreft's parameter X through pyreft's function R(X): from the same state and base, Adam steps
    on the same loss keep both modules' outputs equal (float32 rounding), and R orthonormal with
    no retraction."""
    torch.manual_seed(0)
    theirs = _pyreft_intervention("LoreftIntervention")
    ours = DROP_INS["LoreftIntervention"](**_kw(), orthogonality=orthogonality)
    ours.load_state_dict(theirs.state_dict())  # pyreft's R; our parametrization restarts there
    assert ours.orthogonality == orthogonality and not is_stiefel(
        ours.rotation.parametrizations.R.original
    )
    _give_pyrefts_base(theirs, ours)
    R0 = ours.R.detach().clone()
    h = torch.randn(16, EMBED)
    target = torch.randn(16, EMBED)
    assert max_rel(ours(h), theirs(h)) <= 1e-5
    optimizers = [torch.optim.Adam(m.parameters(), lr=5e-2) for m in (theirs, ours)]
    for _ in range(10):
        for module, optimizer in zip((theirs, ours), optimizers, strict=True):
            optimizer.zero_grad()
            ((module(h) - target) ** 2).mean().backward()
            optimizer.step()
    assert max_rel(ours.R.T.detach(), theirs.rotate_layer.weight.detach()) <= 1e-4
    assert max_rel(ours(h), theirs(h)) <= 1e-4
    assert orth_error(ours.R) <= 1e-5
    assert max_rel(ours.R.detach(), R0) > 1e-2  # R did move


def test_apply_orthogonality_sets_the_drop_ins_default_until_remove():
    """The drop-ins' default is "householder" (pyreft's function of its parameter);
    apply(orthogonality=...) is how pyreft's own code (which never passes the keyword) gets
    another; remove() restores the default; bad values and a keyword on a class without R are
    errors naming them."""
    from reft_ext.integrations.pyreft import apply

    default = pyreft.LoreftIntervention  # pyreft's own: the swap is not active here
    assert default is not DROP_INS["LoreftIntervention"]
    module = DROP_INS["LoreftIntervention"](**_kw())
    assert module.orthogonality == "householder" and is_parametrized(module.rotation)
    # Parametrized on a child, so the drop-in keeps its importable class (pyvene saves by name).
    assert type(module) is DROP_INS["LoreftIntervention"]
    with apply(orthogonality="retraction"):
        plain_swapped = pyreft.LoreftIntervention(**_kw())
        free = pyreft.NoreftIntervention(**_kw())  # no R: the default does not apply to it
    assert plain_swapped.orthogonality == "retraction"
    assert not is_parametrized(plain_swapped.rotation) and is_stiefel(plain_swapped.R)
    assert free.orthogonality is None
    assert DROP_INS["LoreftIntervention"](**_kw()).orthogonality == "householder"
    state = module.state_dict()  # pyreft's form: R's value, no parametrization tensors
    assert "rotate_layer" in state and not any("parametrizations" in k for k in state)
    plain = DROP_INS["LoreftIntervention"](**_kw(), orthogonality="retraction")
    plain.load_state_dict(state)
    assert torch.equal(plain.R, module.R.detach())
    with pytest.raises(ValueError, match=r"apply: orthogonality must be one of .* got 'qr'"):
        apply(orthogonality="qr")
    with pytest.raises(ValueError, match=r"orthogonality must be one of .* got None"):
        DROP_INS["DireftIntervention"](**_kw(), orthogonality=None)
    with pytest.raises(ValueError, match="NoreftIntervention: orthogonality does not apply"):
        DROP_INS["NoreftIntervention"](**_kw(), orthogonality="householder")


def test_pyreft_trainer_parity_study_runs_and_the_diagnostic_tracks_pyreft(tmp_path):
    """examples/pyreft_parity/pyreft_trainer.py (3 steps, 1 seed): every variant starts from
    pyreft's weights and data order (the script asserts both), and the drop-in given pyreft's own
    parametrization state ends where pyreft's class ends (the same function of the same X)."""
    script = Path(__file__).parent.parent / "examples" / "pyreft_parity" / "pyreft_trainer.py"
    argv = [sys.executable, script, "--steps", "3", "--seeds", "1", "--out", tmp_path]
    subprocess.run(argv, check=True, timeout=300, capture_output=True)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    by_variant = {run["variant"]: run for run in runs}
    assert set(by_variant) == {"pyreft", "parametrization", "householder", "retraction",
                               "parametrization, pyreft's base"}  # fmt: skip
    assert by_variant["parametrization, pyreft's base"]["weights_vs_pyreft"] <= 1e-5
    assert by_variant["parametrization, pyreft's base"]["losses"] == by_variant["pyreft"]["losses"]
    for run in runs:
        assert len(run["losses"]) == 3 and run["orth_error"] <= 1e-5
    assert (tmp_path / "table.md").exists()
