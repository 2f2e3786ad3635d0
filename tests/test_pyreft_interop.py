"""reft_ext inside pyreft: runs only where pyreft is installed (README: "pyreft interop tests").

pyreft 0.1.0 pins transformers 4.45.1, so these tests live in their own environment; elsewhere the
module is skipped as a whole.
"""

import pytest
import torch

pyreft = pytest.importorskip("pyreft")
transformers = pytest.importorskip("transformers")

from tiny_models import tiny_llama  # noqa: E402
from truth import max_rel, orth_error  # noqa: E402

from reft_ext.integrations.pyreft import (  # noqa: E402
    PYREFT_TYPES,
    LoreftIntervention,
    load_pyreft_checkpoint,
)

EMBED, RANK = 64, 4


def test_same_outputs_and_keys_as_pyreft_loreft():
    """On pyreft's own weights our class computes pyreft's output (fp32, ≤ 1e-5 relative)."""
    torch.manual_seed(0)
    theirs = pyreft.LoreftIntervention(
        embed_dim=EMBED, low_rank_dimension=RANK, dtype=torch.float32
    ).eval()
    ours = LoreftIntervention(embed_dim=EMBED, low_rank_dimension=RANK, dtype=torch.float32).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    h = torch.randn(7, EMBED)
    expected = theirs(h)
    assert max_rel(ours(h), expected) <= 1e-5


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
        lambda: LoreftIntervention(embed_dim=EMBED, low_rank_dimension=RANK, dtype=torch.float32),
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
        # tensors, rounded to that dtype.
        for name, value in module.state_dict().items():
            loaded = again.state_dict()[name]
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


def _pyreft_intervention(type_name: str) -> torch.nn.Module:
    """One of pyreft's own classes, float32, with every trainable tensor random (biases too)."""
    kwargs = dict(embed_dim=EMBED, low_rank_dimension=RANK, dtype=torch.float32, add_bias=True)
    module = getattr(pyreft, type_name)(**kwargs)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rotate_layer" not in name:  # the rotation stays pyreft's random orthogonal one
                p.copy_(torch.randn_like(p) / EMBED**0.5)
    return module


@pytest.mark.parametrize(
    "type_name",
    [
        "LoreftIntervention",
        "NoreftIntervention",
        "DireftIntervention",
        "NodireftIntervention",
        "ConsreftIntervention",
        "LobireftIntervention",
    ],
)
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
