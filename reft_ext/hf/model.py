"""ReftModel: a frozen transformers model with ReFT interventions hooked onto its blocks."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .. import modules
from ..retraction import keep_orthonormal
from .blocks import block_hidden, find_blocks, hidden_size
from .config import Positions, ReftConfig
from .edit import edit_rows_
from .locations import default_locations, explicit_locations

_MODULES = {
    "loreft": modules.LoReFT,
    "noreft": modules.NoReFT,
    "direft": modules.DiReFT,
    "consreft": modules.ConsReFT,
    "lobireft": modules.LoBiReFT,
}
_ORTHOGONAL = {"loreft", "consreft", "lobireft"}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "interventions.safetensors"


def _key(layer: int, group: str) -> str:
    return f"layer{layer}_{group}"


class ReftModel(nn.Module):
    """A transformers model with frozen weights and trainable interventions at chosen blocks.

    Build it with :func:`get_reft_model`. ``forward`` takes every argument of the wrapped model plus
    ``intervention_locations``; each hooked block's output is edited in place at the selected rows
    only (a gather of P rows, the fused op, a scatter back: O(P·d), no copy of the hidden states).
    """

    def __init__(self, model: nn.Module, config: ReftConfig):
        super().__init__()
        self.model = model
        self.reft_config = config
        self._positions = Positions.parse(config.positions)
        self._groups = self._positions.groups(config.share_weights)
        block_path, blocks = find_blocks(model)
        self._block_path = block_path
        layers = list(range(len(blocks))) if config.layers == "all" else list(config.layers)
        for layer in layers:
            if not 0 <= layer < len(blocks):
                raise ValueError(f"layer {layer} out of range: the model has {len(blocks)} blocks")
        self.layers = layers
        self._num_blocks = len(blocks)
        self._hidden_size = hidden_size(model)
        for p in model.parameters():
            p.requires_grad_(False)
        first_param = next(model.parameters())
        device, model_dtype = first_param.device, first_param.dtype
        if config.torch_dtype not in (torch.float32, model_dtype):
            raise ValueError(
                f"ReftConfig.dtype must be float32 or the model's dtype ({model_dtype}), got "
                f"{config.dtype!r}: the fused ops take parameters in the hidden states' dtype or "
                "float32"
            )
        cls = _MODULES[config.intervention]
        kwargs = {"dropout": config.dropout, "dtype": config.torch_dtype, "device": device}
        if config.intervention in _ORTHOGONAL:
            kwargs["orthogonality"] = config.orthogonality
        self.interventions = nn.ModuleDict(
            {
                _key(layer, group): cls(self._hidden_size, config.rank, **kwargs)
                for layer in layers
                for group in self._groups
            }
        )
        # locations: {layer: {group: (B, P)}} for the current call; decode: the same for decode
        # passes of generate(intervene_on="all"); pass counts forward calls of the wrapped model.
        self._state: dict = {
            "enabled": True,
            "locations": None,
            "decode": None,
            "generating": False,
            "pass": 0,
        }
        self._handles = [
            blocks[layer].register_forward_hook(self._make_hook(layer)) for layer in layers
        ]
        self._handles.append(model.register_forward_pre_hook(self._count_pass))

    # ---- hooks ---------------------------------------------------------------------------
    def _count_pass(self, _module, _args):
        self._state["pass"] += 1

    def _make_hook(self, layer: int):
        def hook(_block, _args, output):
            locations = self._locations_for(layer)
            if locations is None:
                return None
            hidden = block_hidden(output)
            for group, index in locations.items():
                if index.shape[0] != hidden.shape[0]:
                    index = self._expand_batch(index, hidden.shape[0])
                edit_rows_(hidden, index, self.interventions[_key(layer, group)])
            return None  # the output was edited in place

        return hook

    def _expand_batch(self, index: torch.Tensor, batch: int) -> torch.Tensor:
        """generate() repeats each prompt in a row (repeat_interleave: num_beams copies, or
        num_return_sequences when sampling): give every copy its prompt's locations."""
        if not self._state["generating"] or batch % index.shape[0]:
            raise ValueError(
                f"intervention locations are for a batch of {index.shape[0]}, the block's hidden "
                f"states have {batch} rows"
            )
        return index.repeat_interleave(batch // index.shape[0], dim=0)

    def _locations_for(self, layer: int) -> dict[str, torch.Tensor] | None:
        state = self._state
        if not state["enabled"] or state["locations"] is None:
            return None
        if state["generating"] and state["pass"] > 1:
            return state["decode"].get(layer) if state["decode"] else None
        return state["locations"].get(layer)

    # ---- forward and generation ----------------------------------------------------------
    def _compute_locations(self, kwargs: dict, intervention_locations) -> dict:
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs.get("inputs_embeds")
        if reference is None:
            raise ValueError("ReftModel needs input_ids or inputs_embeds to place interventions")
        batch, length = reference.shape[0], reference.shape[1]
        if intervention_locations is not None:
            return explicit_locations(
                intervention_locations, self._groups, self.layers, batch, length
            )
        shared = default_locations(
            self._positions,
            self._groups,
            kwargs.get("attention_mask"),
            batch,
            length,
            reference.device,
        )
        return dict.fromkeys(self.layers, shared)

    def forward(self, *args, intervention_locations=None, **kwargs):
        """Run the wrapped model with interventions.

        Args:
            *args, **kwargs: the wrapped model's arguments (``input_ids``, ``attention_mask``,
                ``labels``, ...); ``input_ids`` (or ``inputs_embeds``) must be passed by keyword.
            intervention_locations: optional LongTensor (B, P) (one position group), (G, B, P)
                (G groups, e.g. first and last without share_weights), or {layer: tensor};
                −1 = no edit. Default: the config's positions on each sequence's real tokens.
        """
        if args:
            raise TypeError("ReftModel.forward takes the model's inputs by keyword (input_ids=...)")
        self._check_not_unloaded()
        locations = self._compute_locations(kwargs, intervention_locations)
        self._state.update(locations=locations, generating=False)
        try:
            return self.model(**kwargs)
        finally:
            self._state["locations"] = None

    @torch.no_grad()
    def generate(self, intervene_on: str = "prompt", intervention_locations=None, **kwargs):
        """``model.generate`` with interventions on the prompt (prefill) pass only, by default.

        Relies on the KV cache (transformers' default): the first forward pass is the prompt, each
        later pass one new token.

        Args:
            intervene_on: ``"prompt"`` (pyvene's intervene_on_prompt) or ``"all"``, which also edits
                each newly generated token, with the ``last`` (or only) group's intervention.
            intervention_locations: as in :meth:`forward`, for the prompt.
            **kwargs: ``model.generate`` arguments (``input_ids``, ``attention_mask``, ...).
        """
        if intervene_on not in ("prompt", "all"):
            raise ValueError(f"intervene_on must be 'prompt' or 'all', got {intervene_on!r}")
        self._check_not_unloaded()
        locations = self._compute_locations(kwargs, intervention_locations)
        decode = None
        if intervene_on == "all":
            group = "last" if "last" in self._groups else self._groups[-1]
            prompt = kwargs.get("input_ids")
            if prompt is None:
                prompt = kwargs["inputs_embeds"]
            # With a KV cache each decode pass sees only the new token, at index 0.
            index = torch.zeros(prompt.shape[0], 1, dtype=torch.long, device=prompt.device)
            decode = {layer: {group: index} for layer in self.layers}
        self._state.update(locations=locations, decode=decode, generating=True, **{"pass": 0})
        try:
            return self.model.generate(**kwargs)
        finally:
            self._state.update(locations=None, decode=None, generating=False)

    # ---- management ----------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_interventions(self):
        """Context manager: run the plain base model (hooks stay, edits are skipped)."""
        previous = self._state["enabled"]
        self._state["enabled"] = False
        try:
            yield self
        finally:
            self._state["enabled"] = previous

    def unload(self) -> nn.Module:
        """Remove every hook this wrapper added and return the untouched base model.

        The wrapper is unusable afterwards: calling it raises (it would silently run the plain
        model).
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.model

    def _check_not_unloaded(self) -> None:
        if not self._handles:  # a live wrapper always holds at least its pass-counting hook
            raise RuntimeError(
                "this ReftModel was unloaded (its hooks are removed): call the model that "
                "unload() returned, or attach interventions again with get_reft_model"
            )

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(
            f"trainable intervention params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def keep_orthonormal(self, optimizer: torch.optim.Optimizer, **kwargs):
        """Retract the interventions' R after every ``optimizer.step()``.

        Same as :func:`reft_ext.keep_orthonormal` (kwargs: params, method, project_grad).
        """
        return keep_orthonormal(optimizer, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (config, base model shape) and ``interventions.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.reft_config
        current = next(self.interventions.parameters()).dtype
        if current != config.torch_dtype:  # the interventions were cast after construction
            config = ReftConfig.from_dict(
                config.to_dict() | {"dtype": str(current).removeprefix("torch.")}
            )
        meta = {
            "reft_config": config.to_dict(),
            "hidden_size": self._hidden_size,
            "num_blocks": self._num_blocks,
            "model_type": getattr(getattr(self.model, "config", None), "model_type", None),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().contiguous() for k, v in self.interventions.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | Path, device: torch.device | str | None = None
    ) -> ReftModel:
        """Attach interventions saved by :meth:`save_pretrained` to ``model``.

        Args:
            model: the same base model (hidden size and block count are checked).
            directory: the saved folder.
            device: where to put the interventions; default: the model's device. Dtypes are kept.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / CONFIG_NAME).read_text())
        _, blocks = find_blocks(model)
        if hidden_size(model) != meta["hidden_size"] or len(blocks) != meta["num_blocks"]:
            raise ValueError(
                f"interventions in {directory} were saved for a model with hidden size "
                f"{meta['hidden_size']} and {meta['num_blocks']} blocks; this model has "
                f"{hidden_size(model)} and {len(blocks)}"
            )
        reft_model = cls(model, ReftConfig.from_dict(meta["reft_config"]))
        target = torch.device(device) if device is not None else next(model.parameters()).device
        state = load_file(str(directory / WEIGHTS_NAME), device=str(target))
        reft_model.interventions.to(target)
        reft_model.interventions.load_state_dict(state)
        return reft_model


def get_reft_model(model: nn.Module, config: ReftConfig) -> ReftModel:
    """Freeze ``model`` and attach the interventions ``config`` describes (a :class:`ReftModel`)."""
    return ReftModel(model, config)
