"""Importing a real pyreft 0.1.0 checkpoint (tests/fixtures/pyreft_loreft_ckpt, see its README)."""

import json
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch
from truth import max_rel

from reft_ext import ReftConfig, get_reft_model, retract_list_
from reft_ext.integrations.pyreft import (
    EXPORT_TYPES,
    PYREFT_TYPES,
    load_pyreft_checkpoint,
    read_pyreft_checkpoint,
    save_pyreft_checkpoint,
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


def test_the_key_format_before_pyvene_0_1_7_imports_the_same(tmp_path):
    """pyvene before 0.1.7 named interventions ``layer.{l}.comp.{c}.unit.{u}.nunit.{n}#i``; a
    checkpoint in that form imports to the same interventions as the fixture's current form."""
    config = json.loads((FIXTURE / "config.json").read_text())
    old_keys = [
        f"layer.{rep[0]}.comp.{rep[1]}.unit.{rep[2]}.nunit.{rep[3]}#{key.rsplit('#', 1)[1]}"
        for rep, key in zip(config["representations"], config["sorted_keys"], strict=True)
    ]
    assert old_keys[0] == "layer.1.comp.block_output.unit.pos.nunit.1#0"
    target = tmp_path / "old"
    target.mkdir()
    for new, old in zip(config["sorted_keys"], old_keys, strict=True):
        shutil.copy(FIXTURE / f"intkey_{new}.bin", target / f"intkey_{old}.bin")
    (target / "config.json").write_text(json.dumps({**config, "sorted_keys": old_keys}))
    assert [e.key for e in read_pyreft_checkpoint(target)] == old_keys
    ids = torch.randint(0, 64, (2, 6))
    expected = load_pyreft_checkpoint(tiny_llama(), FIXTURE)(input_ids=ids).logits
    assert torch.equal(load_pyreft_checkpoint(tiny_llama(), target)(input_ids=ids).logits, expected)


@pytest.mark.parametrize("intervention", sorted(INTERVENTIONS))
@pytest.mark.parametrize("share_weights", [False, True])
def test_export_to_pyreft_and_import_back(tmp_path, intervention, share_weights):
    """save_pyreft_checkpoint writes pyvene's layout (the fixture's config fields, one file per
    intervention) and load_pyreft_checkpoint reads it back to the same interventions: tensors
    within 1e-6 (the parametrized rotation is re-evaluated) and the same logits."""
    torch.manual_seed(0)
    config = ReftConfig(
        layers=[0, 2], rank=3, intervention=intervention, share_weights=share_weights
    )
    ours = get_reft_model(tiny_llama(), config)
    with torch.no_grad():
        for p in ours.interventions.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from their initial values
    if INTERVENTIONS[intervention].orthonormal:
        Rs = [m.R for m in ours.interventions.values()]
        if intervention in ("consreft", "lobireft"):  # held as a parametrization: refused
            with pytest.raises(ValueError, match=r"layer0_\w+: R's rows are not orthonormal"):
                save_pyreft_checkpoint(ours, tmp_path / "refused")
        retract_list_([R.data for R in Rs])
    written = save_pyreft_checkpoint(ours, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved) == set(json.loads((FIXTURE / "config.json").read_text()))
    groups = 1 if share_weights else 2
    assert len(written) == 1 + 2 * groups and len(saved["sorted_keys"]) == 2 * groups
    assert saved["sorted_keys"][0] == "layer_0_comp_block_output_unit_pos_nunit_1#0"
    assert {e.type_name for e in read_pyreft_checkpoint(tmp_path)} == {
        EXPORT_TYPES[intervention][0]
    }
    back = load_pyreft_checkpoint(tiny_llama(), tmp_path, positions="f1+l1")
    assert back.reft_config.intervention == intervention
    assert back.reft_config.share_weights == share_weights
    for key, module in ours.interventions.items():
        again = back.interventions[key]
        for name, p in module.named_parameters():
            assert max_rel(getattr(again, name), p) <= 1e-6, (key, name)
    ids = torch.randint(0, 64, (2, 6))
    assert max_rel(back(input_ids=ids).logits, ours(input_ids=ids).logits) <= 1e-5


def test_export_types_are_the_importers_inverse():
    """Each reft_ext type exports as a pyreft class that the importer maps back onto it."""
    assert set(EXPORT_TYPES) == set(INTERVENTIONS)
    for name, (pyreft_name, _) in EXPORT_TYPES.items():
        assert PYREFT_TYPES[pyreft_name][0] == name
