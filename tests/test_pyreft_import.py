"""Importing a real pyreft 0.1.0 checkpoint (tests/fixtures/pyreft_loreft_ckpt, see its README)."""

import json
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch

from reft_ext.integrations.pyreft import load_pyreft_checkpoint, read_pyreft_checkpoint

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
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        rotation = entry.state["rotate_layer"]
        assert torch.equal(module.R.detach(), rotation.T)


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


def test_unknown_intervention_type_is_rejected(tmp_path):
    def edit(config):
        config["intervention_types"][0] = "<class 'pyreft.interventions.NodireftIntervention'>"

    with pytest.raises(ValueError, match="NodireftIntervention"):
        load_pyreft_checkpoint(tiny_llama(), _modified_copy(tmp_path, edit))


def test_unknown_component_is_rejected(tmp_path):
    def edit(config):
        config["representations"][0][1] = "mlp_output"

    with pytest.raises(ValueError, match="mlp_output"):
        load_pyreft_checkpoint(tiny_llama(), _modified_copy(tmp_path, edit))


def test_hidden_size_mismatch_is_rejected():
    with pytest.raises(ValueError, match="hidden size 64"):
        load_pyreft_checkpoint(tiny_llama(hidden=32), FIXTURE)
