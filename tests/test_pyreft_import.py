"""Importing a real pyreft 0.1.0 checkpoint (tests/fixtures/pyreft_loreft_ckpt, see its README)."""

import json
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch
from truth import max_rel

from reft_ext.integrations.pyreft import (
    PYREFT_TYPES,
    load_pyreft_checkpoint,
    read_pyreft_checkpoint,
)
from reft_ext.modules import INTERVENTIONS

FIXTURE = Path(__file__).parent / "fixtures" / "pyreft_loreft_ckpt"


def tiny_llama(hidden=64):
    """A random Llama of the fixture's shape (its base weights were not saved by pyreft)."""
    return tiny_models.tiny_llama(hidden=hidden, layers=4, vocab=64)


def test_imported_interventions_reproduce_pyreft_outputs():
    """Each imported LoReFT maps the probe h to pyreft's own output (fp32, ≤ 1e-5 relative)."""
    probe = torch.load(FIXTURE / "probe.pt", weights_only=True)
    reft_model = load_pyreft_checkpoint(tiny_llama(), FIXTURE).eval()
    entries = read_pyreft_checkpoint(FIXTURE)
    assert [e.layer for e in entries] == [1, 2]
    assert reft_model.layers == [1, 2]
    for entry in entries:
        (module,) = [
            m for k, m in reft_model.interventions.items() if k.startswith(f"layer{entry.layer}_")
        ]
        expected = probe[entry.key]
        got = module(probe["h"])
        assert max_rel(got, expected) <= 1e-5
        state = torch.load(FIXTURE / f"intkey_{entry.key}.bin", weights_only=True)
        assert torch.equal(module.R.detach(), state["rotate_layer"].T)
        assert torch.equal(module.W.detach(), state["weight"])


def test_imported_model_runs_and_edits():
    """The imported ReftModel runs a forward pass that differs from the base model's."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 6))
    base = model(input_ids=ids).logits
    reft_model = load_pyreft_checkpoint(model, FIXTURE)
    assert not torch.allclose(reft_model(input_ids=ids).logits, base)


def _modified_copy(tmp_path, edit):
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_every_pyreft_type_maps_onto_a_registered_intervention():
    assert set(PYREFT_TYPES) >= {
        "LoreftIntervention", "NoreftIntervention", "ConsreftIntervention",
        "LobireftIntervention", "DireftIntervention", "NodireftIntervention",
    }  # fmt: skip
    assert {name for name, _ in PYREFT_TYPES.values()} <= set(INTERVENTIONS)


def _set_type(config, index, name):
    config["intervention_types"][index] = f"<class 'pyreft.interventions.{name}'>"


def test_unknown_intervention_type_is_rejected(tmp_path):
    target = _modified_copy(tmp_path, lambda config: _set_type(config, 0, "MadeUpIntervention"))
    with pytest.raises(ValueError, match="type 'MadeUpIntervention'; reft_ext imports"):
        load_pyreft_checkpoint(tiny_llama(), target)


def test_a_file_without_its_types_tensors_names_the_file_and_keys(tmp_path):
    target = _modified_copy(tmp_path, lambda config: _set_type(config, 0, "NodireftIntervention"))
    key = json.loads((target / "config.json").read_text())["sorted_keys"][0]
    with pytest.raises(
        ValueError,
        match=rf"intkey_{key}\.bin \(NodireftIntervention\) lacks \['proj_layer.weight'\]",
    ):
        load_pyreft_checkpoint(tiny_llama(), target)


def test_mixed_intervention_types_are_rejected(tmp_path):
    """A NoReFT file (pyreft's nn.Module keys) beside a LoReFT one: one ReftConfig cannot hold
    both, so the load names the two types."""
    target = _modified_copy(tmp_path, lambda config: _set_type(config, 0, "NoreftIntervention"))
    key = json.loads((target / "config.json").read_text())["sorted_keys"][0]
    path = target / f"intkey_{key}.bin"
    state = torch.load(path, weights_only=True)
    noreft = {
        "proj_layer.weight": state["rotate_layer"].T.contiguous(),
        "learned_source.weight": state["weight"],
        "learned_source.bias": state["bias"],
    }
    torch.save(noreft, path)
    assert read_pyreft_checkpoint(target)[0].intervention == "noreft"
    with pytest.raises(
        ValueError, match=r"different types \['LoreftIntervention', 'NoreftIntervention'\]"
    ):
        load_pyreft_checkpoint(tiny_llama(), target)


@pytest.mark.parametrize(
    ("tensor", "bad", "message"),
    [
        ("bias", lambda t: t[0], r"b has shape \(\), expected \(4,\)"),  # 0-d
        ("weight", lambda t: t[:3], r"W has shape \(3, 64\), expected \(4, 64\)"),
        ("weight", lambda t: t[:, :32], r"W has shape \(4, 32\), expected \(4, 64\)"),
    ],
)
def test_tensors_of_the_wrong_shape_are_rejected(tmp_path, tensor, bad, message):
    target = _modified_copy(tmp_path, lambda config: None)
    key = json.loads((target / "config.json").read_text())["sorted_keys"][0]
    path = target / f"intkey_{key}.bin"
    state = torch.load(path, weights_only=True)
    state[tensor] = bad(state[tensor]).contiguous()
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"intkey_{key}\.bin \(LoreftIntervention\): {message}"):
        load_pyreft_checkpoint(tiny_llama(), target)


def test_rank_other_than_the_tensors_is_rejected(tmp_path):
    def edit(config):
        config["representations"][0][4] = 3  # low_rank_dimension

    with pytest.raises(ValueError, match=r"R has shape \(4, 64\), expected \(3, 64\)"):
        load_pyreft_checkpoint(tiny_llama(), _modified_copy(tmp_path, edit))


def test_unknown_component_is_rejected(tmp_path):
    def edit(config):
        config["representations"][0][1] = "mlp_output"

    with pytest.raises(ValueError, match="mlp_output"):
        load_pyreft_checkpoint(tiny_llama(), _modified_copy(tmp_path, edit))


def test_hidden_size_mismatch_is_rejected():
    with pytest.raises(ValueError, match="hidden size 64"):
        load_pyreft_checkpoint(tiny_llama(hidden=32), FIXTURE)


def test_drop_in_without_pyvene_names_what_to_install():
    """Reading checkpoints needs no pyvene; the drop-in classes do, and say so."""
    import importlib.util

    if importlib.util.find_spec("pyvene") is not None:
        pytest.skip("pyvene is installed here: the drop-in imports (tests/test_pyreft_interop.py)")
    import reft_ext.integrations.pyreft as interop

    with pytest.raises(ImportError, match="install pyreft"):
        interop.LoreftIntervention  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'NotAClass'"):
        interop.NotAClass  # noqa: B018
