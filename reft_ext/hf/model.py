"""ReftModel: a frozen transformers model with named ReFT adapters hooked onto its blocks."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..retraction import keep_orthonormal
from .adapters import DEFAULT_ADAPTER, AdapterSpec, check_new_name, decode_group
from .blocks import block_hidden, find_blocks, hidden_size
from .config import ReftConfig, intervention_key
from .edit import edit_rows_
from .locations import checked_mask, default_locations, explicit_locations
from .mixed import MixedEdits, check_adapter_names, decode_edits, edit_mixed_, prompt_edits
from .saving import load_interventions, read_adapter, write_adapter


@dataclass
class _Call:
    """Per-call state of one ``forward`` or ``generate``: it belongs to the call, not the model.

    adapter: the adapter of every row, or None in a mixed batch; locations: {layer: {group:
    (B, P)}} for one adapter, {layer: MixedEdits} for a mixed batch; decode: the same for the
    decode passes of ``generate(intervene_on="all")``; passes counts forward calls of the wrapped
    model.
    """

    adapter: str | None
    locations: dict
    decode: dict | None = None
    generating: bool = False
    passes: int = 0


# The calls in flight in this context ({id(ReftModel): _Call}) and the ReftModels whose adapters
# are disabled in it. Context variables, so that threads (a server's workers) sharing one ReftModel
# each see their own call.
_CALLS: contextvars.ContextVar[dict[int, _Call]] = contextvars.ContextVar("reft_ext_calls")
_DISABLED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "reft_ext_disabled", default=frozenset()
)


def _state_prefix(adapter_name: str) -> str:
    """The state-dict prefix of an adapter's tensors: ``interventions.`` for ``"default"`` (the
    single-adapter format, which Trainer checkpoints hold), ``adapters.<name>.`` for the others
    (where they live in the module tree)."""
    return "interventions." if adapter_name == DEFAULT_ADAPTER else f"adapters.{adapter_name}."


class ReftModel(nn.Module):
    """A transformers model with frozen weights and named adapters of interventions at its blocks.

    Build it with :func:`get_reft_model` (one adapter, ``"default"``); PEFT's verbs add, load,
    switch, delete and save more. ``forward`` takes every argument of the wrapped model plus
    ``intervention_locations`` or ``adapter_names``; each hooked block's output is edited in place
    at the selected rows only (a gather of P rows, the fused op, a scatter back: O(P·d), no copy of
    the hidden states). Threads may share one ReftModel: each call's locations belong to that call;
    add and delete adapters while no call runs (they add and remove block hooks).

    Attributes:
        model: the wrapped base model (frozen).
        adapters: {adapter name: {intervention_key: intervention}}, every adapter.
    """

    def __init__(self, model: nn.Module, config: ReftConfig, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self.model = model
        self._num_blocks = len(find_blocks(model)[1])
        self._hidden_size = hidden_size(model)
        self.adapters = nn.ModuleDict()
        self._specs: dict[str, AdapterSpec] = {}  # in the order the adapters were added
        self._active = adapter_name
        self._in_flight = 0  # calls running now, in any thread
        self._in_flight_lock = threading.Lock()
        self._layer_hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._pass_hook = model.register_forward_pre_hook(self._count_pass)
        try:
            self.add_adapter(adapter_name, config)
        except Exception:
            self.unload()  # a config that does not fit leaves the user's model as it was
            raise
        for p in model.parameters():
            p.requires_grad_(False)
        self.set_adapter(adapter_name)
        self._register_load_state_dict_pre_hook(self._rename_loaded_keys, with_module=False)
        self.register_load_state_dict_post_hook(self._report_public_keys)

    # ---- the active adapter ----------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        """The name of the adapter that calls without ``adapter_names`` use (PEFT's property)."""
        return self._active

    @property
    def interventions(self) -> nn.ModuleDict:
        """The active adapter's interventions, {intervention_key: module}."""
        return self.adapters[self._active]

    @property
    def reft_config(self) -> ReftConfig:
        """The active adapter's config."""
        return self._specs[self._active].config

    @property
    def reft_configs(self) -> dict[str, ReftConfig]:
        """Every adapter's config, {name: config}, in the order they were added."""
        return {name: spec.config for name, spec in self._specs.items()}

    @property
    def layers(self) -> list[int]:
        """The block indices the active adapter edits."""
        return list(self._specs[self._active].layers)

    @property
    def _groups(self) -> tuple[str, ...]:
        """The active adapter's position groups (``reft_ext.integrations.pyreft`` reads them)."""
        return self._specs[self._active].groups

    # ---- adapter management (PEFT's verbs) -------------------------------------------------
    def add_adapter(self, adapter_name: str, config: ReftConfig) -> None:
        """Add the adapter ``config`` describes under ``adapter_name``, frozen and not active (as
        PEFT's ``add_adapter``): :meth:`set_adapter` makes it the active, trainable one.

        Adapters may differ in layers, positions, rank and intervention type.

        Raises:
            TypeError, ValueError: naming ``adapter_name`` (not a str, reserved, taken) or the
                config field that does not fit the base model (layer range, rank above the
                hidden size, dtype).
        """
        self._check_not_unloaded()
        check_new_name(adapter_name, self.adapters)
        spec = AdapterSpec.of(config, self._num_blocks, self._hidden_size)
        interventions = spec.build(self._hidden_size, next(self.model.parameters()))
        interventions.requires_grad_(False)
        self.adapters[adapter_name] = interventions
        self._specs[adapter_name] = spec
        self._hook_used_blocks()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (used by calls without ``adapter_names``):
        its parameters become trainable and every other adapter's frozen, as in PEFT.

        Use :meth:`set_requires_grad` to train several adapters at once (in a mixed batch).
        """
        self._check_known(adapter_name, "adapter_name")
        for name, interventions in self.adapters.items():
            interventions.requires_grad_(name == adapter_name)
        self._active = adapter_name

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True):
        """Make the parameters of the named adapter(s) trainable or frozen (PEFT's verb); the
        active adapter does not change."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_known(name, "adapter_names")
        for name in names:
            self.adapters[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter ``adapter_name`` (its hooks too, where no other adapter edits).

        Deleting the active adapter makes the first remaining one (in the order they were added)
        active, as PEFT does. The last adapter cannot be deleted: a ReftModel always has an
        active adapter (``unload()`` returns the plain base model).
        """
        self._check_known(adapter_name, "adapter_name")
        if len(self._specs) == 1:
            raise ValueError(
                f"adapter_name {adapter_name!r} is the only adapter: a ReftModel keeps one; "
                "unload() returns the base model without any"
            )
        del self.adapters[adapter_name]
        del self._specs[adapter_name]
        if self._active == adapter_name:
            self.set_adapter(next(iter(self._specs)))
        self._hook_used_blocks()

    def load_adapter(
        self,
        path: str | Path,
        adapter_name: str,
        device: torch.device | str | None = None,
    ) -> None:
        """Add the adapter that :meth:`save_pretrained` wrote in the folder ``path`` (the save's top
        folder for ``"default"``, its subfolder ``<name>`` for another) as ``adapter_name``,
        frozen and not active (PEFT's ``load_adapter`` with ``is_trainable=False``).

        Args:
            path: the adapter's folder (``reft_config.json`` and ``reft_model.safetensors``).
            adapter_name: the name it gets here (any name: folders do not record theirs).
            device: where to put its interventions; default: the model's device.

        Raises:
            FileNotFoundError, ValueError: as :meth:`from_pretrained` (naming the file and key),
                or naming ``adapter_name``; nothing is added then.
        """
        self._check_not_unloaded()
        check_new_name(adapter_name, self.adapters)
        target = _device_for(self.model, device)
        config, state, weights_path = read_adapter(path, self.model, target)
        self.add_adapter(adapter_name, config)
        try:
            load_interventions(self.adapters[adapter_name], state, weights_path, target)
        except ValueError:
            self.delete_adapter(adapter_name)  # never the only one: add_adapter added it
            raise

    def _check_known(self, adapter_name, argument: str) -> None:
        if not isinstance(adapter_name, str) or adapter_name not in self._specs:
            raise ValueError(
                f"{argument}: adapter {adapter_name!r} was never added (adapters: "
                f"{list(self._specs)})"
            )

    def _hook_used_blocks(self) -> None:
        """Hook exactly the blocks that some adapter edits (one hook per block, whatever the
        number of adapters there)."""
        blocks = find_blocks(self.model)[1]
        used = {layer for spec in self._specs.values() for layer in spec.layers}
        for layer in sorted(used - set(self._layer_hooks)):
            self._layer_hooks[layer] = blocks[layer].register_forward_hook(self._make_hook(layer))
        for layer in set(self._layer_hooks) - used:
            self._layer_hooks.pop(layer).remove()

    # ---- state dict: the adapters only ---------------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Every adapter's tensors: ``interventions.<intervention_key>.<parameter>`` for the
        ``"default"`` adapter (the single-adapter keys), ``adapters.<name>.<intervention_key>.
        <parameter>`` for any other.

        The base model is frozen and not part of the adapters (``reft_model.model.state_dict()``
        has it): so ``transformers.Trainer`` checkpoints of a ReftModel hold the interventions,
        not a copy of the base model (which, with tied embeddings, safetensors refuses to save),
        and ``load_state_dict`` of such a dict restores them with ``strict=True``. A wrapper's
        state dict (DDP's ``module.``, torch.compile's ``_orig_mod.``) nests the same keys.
        """
        if args:
            raise TypeError("ReftModel.state_dict takes its arguments by keyword")
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()
        for name, interventions in self.adapters.items():
            interventions.state_dict(
                destination=destination, prefix=prefix + _state_prefix(name), keep_vars=keep_vars
            )
        return destination

    def _stored_prefix(self, prefix: str) -> tuple[str, str]:
        """(public, module-tree) key prefixes of the ``"default"`` adapter under ``prefix``."""
        return prefix + _state_prefix(DEFAULT_ADAPTER), f"{prefix}adapters.{DEFAULT_ADAPTER}."

    def _rename_loaded_keys(self, state_dict, prefix, *_args) -> None:
        # The "default" adapter's keys name it as state_dict() does; it lives at adapters.default.
        self._load_prefix = prefix
        public, stored = self._stored_prefix(prefix)
        for key in [key for key in state_dict if key.startswith(public)]:
            state_dict[stored + key.removeprefix(public)] = state_dict.pop(key)

    def _report_public_keys(self, _module, incompatible_keys) -> None:
        # Keys are reported as state_dict() names them. The base model's tensors are not in
        # state_dict() (above), so a load of it must not report them missing; a base-model key
        # that *is* given is still loaded as usual.
        prefix = getattr(self, "_load_prefix", "")
        public, stored = self._stored_prefix(prefix)
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if not key.startswith(prefix + "model.")]
        for keys in (missing, incompatible_keys.unexpected_keys):
            keys[:] = [
                public + key.removeprefix(stored) if key.startswith(stored) else key for key in keys
            ]

    # ---- per-call state ------------------------------------------------------------------
    @contextlib.contextmanager
    def _calling(self, call: _Call):
        """Make ``call`` this context's call of this model while the block runs."""
        token = _CALLS.set({**_CALLS.get({}), id(self): call})
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            yield call
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
            _CALLS.reset(token)

    def _current_call(self) -> _Call | None:
        """This context's call of this model; None when the adapter is disabled or no call runs.

        A hook that finds no call of its own while another thread's call is in flight ran in a
        thread that the call did not start from; editing nothing there would be silently wrong.
        """
        if id(self) in _DISABLED.get():
            return None
        call = _CALLS.get({}).get(id(self))
        if call is None and self._in_flight:
            raise RuntimeError(
                "a ReftModel hook ran outside the ReftModel call of its thread while another "
                "call is in flight: torch.nn.DataParallel runs replicas in threads of their own "
                "(use DistributedDataParallel), and calling the base model directly while the "
                "wrapper is in use needs `with reft_model.disable_adapter():`"
            )
        return call

    # ---- hooks ---------------------------------------------------------------------------
    def _count_pass(self, _module, _args):
        call = _CALLS.get({}).get(id(self))
        if call is not None:
            call.passes += 1

    def _make_hook(self, layer: int):
        def hook(_block, _args, output):
            call = self._current_call()
            locations = self._locations_for(call, layer) if call is not None else None
            if locations is None:
                return None
            hidden = block_hidden(output)
            if isinstance(locations, MixedEdits):
                if locations.index.shape[0] != hidden.shape[0]:
                    repeats = self._repeats(call, locations.index.shape[0], hidden.shape[0])
                    locations = locations.repeat_rows(repeats)
                modules = [self.adapters[adapter][key] for adapter, key in locations.keys]
                edit_mixed_(hidden, locations, modules)
                return None  # the output was edited in place
            interventions = self.adapters[call.adapter]
            for group, index in locations.items():
                if index.shape[0] != hidden.shape[0]:
                    repeats = self._repeats(call, index.shape[0], hidden.shape[0])
                    index = index.repeat_interleave(repeats, dim=0)
                edit_rows_(hidden, index, interventions[intervention_key(layer, group)])
            return None

        return hook

    @staticmethod
    def _repeats(call: _Call, rows: int, batch: int) -> int:
        """generate() repeats each prompt in a row (repeat_interleave: num_beams copies, or
        num_return_sequences when sampling): every copy gets its prompt's locations."""
        if not call.generating or batch % rows:
            raise ValueError(
                f"intervention locations are for a batch of {rows}, the block's hidden "
                f"states have {batch} rows"
            )
        return batch // rows

    @staticmethod
    def _locations_for(call: _Call, layer: int):
        if call.generating and call.passes > 1:
            return call.decode.get(layer) if call.decode else None
        return call.locations.get(layer)

    # ---- forward and generation ----------------------------------------------------------
    def _new_call(
        self, kwargs: dict, intervention_locations, adapter_names, intervene_on: str | None = None
    ) -> _Call:
        """The call's state: the locations of the prompt (or full) pass and, for
        ``intervene_on="all"``, of the decode passes."""
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs.get("inputs_embeds")
        if reference is None:
            raise ValueError("ReftModel needs input_ids or inputs_embeds to place interventions")
        batch, length, device = reference.shape[0], reference.shape[1], reference.device
        mask = kwargs.get("attention_mask")
        explicit = intervention_locations is not None
        if mask is not None:  # a mask that does not fit fails here, clearly
            checked_mask(mask, batch, length, explicit)
        if adapter_names is not None:
            if explicit:
                raise ValueError(
                    "pass adapter_names or intervention_locations, not both: a mixed batch edits "
                    "each row at its own adapter's positions"
                )
            names = check_adapter_names(adapter_names, self._specs, batch)
            locations = prompt_edits(names, self._specs, mask, length, device)
            decode = decode_edits(names, self._specs, device) if intervene_on == "all" else None
            return _Call(None, locations, decode)
        spec = self._specs[self._active]
        if explicit:
            locations = explicit_locations(
                intervention_locations, spec.groups, list(spec.layers), batch, length
            )
        else:
            shared = default_locations(spec.positions, spec.groups, mask, batch, length, device)
            locations = dict.fromkeys(spec.layers, shared)
        decode = None
        if intervene_on == "all":
            # With a KV cache each decode pass sees only the new token, at index 0.
            index = torch.zeros(batch, 1, dtype=torch.long, device=device)
            decode = {layer: {decode_group(spec.groups): index} for layer in spec.layers}
        return _Call(self._active, locations, decode)

    def forward(self, *args, intervention_locations=None, adapter_names=None, **kwargs):
        """Run the wrapped model with interventions.

        Args:
            *args, **kwargs: the wrapped model's arguments (``input_ids``, ``attention_mask``,
                ``labels``, ...); ``input_ids`` (or ``inputs_embeds``) must be passed by keyword.
            intervention_locations: optional LongTensor (B, P) (one position group), (G, B, P)
                (G groups, e.g. first and last without share_weights), or {layer: tensor};
                −1 = no edit; for the active adapter. Default: the config's positions on each
                sequence's real tokens.
            adapter_names: optional list of B adapter names, one per row (``"__base__"``: no
                adapter): a mixed batch, each row edited by its adapter at its adapter's
                positions, every block in one fused call. Default: the active adapter for all.
        """
        if args:
            raise TypeError("ReftModel.forward takes the model's inputs by keyword (input_ids=...)")
        self._check_not_unloaded()
        call = self._new_call(kwargs, intervention_locations, adapter_names)
        with self._calling(call):
            return self.model(**kwargs)

    @torch.no_grad()
    def generate(
        self,
        intervene_on: str = "prompt",
        intervention_locations=None,
        adapter_names=None,
        **kwargs,
    ):
        """``model.generate`` with interventions on the prompt (prefill) pass only, by default.

        Relies on the KV cache (transformers' default): the first forward pass is the prompt, each
        later pass one new token.

        Args:
            intervene_on: ``"prompt"`` (pyvene's intervene_on_prompt) or ``"all"``, which also edits
                each newly generated token, with the ``last`` (or only) group's intervention.
            intervention_locations: as in :meth:`forward`, for the prompt.
            adapter_names: as in :meth:`forward`, one per prompt; with beams or several return
                sequences every copy of a prompt keeps its adapter.
            **kwargs: ``model.generate`` arguments (``input_ids``, ``attention_mask``, ...).
        """
        if intervene_on not in ("prompt", "all"):
            raise ValueError(f"intervene_on must be 'prompt' or 'all', got {intervene_on!r}")
        generation_config = kwargs.get("generation_config") or getattr(
            self.model, "generation_config", None
        )
        if not kwargs.get("use_cache", getattr(generation_config, "use_cache", True)):
            # Without the cache every pass re-runs the whole sequence, and the prompt's edits
            # (placed on the first pass only) would be missing from the later ones.
            raise ValueError(
                "ReftModel.generate needs use_cache=True (the default): its edits are placed on "
                "the prompt pass and, with intervene_on='all', on each single-token pass"
            )
        self._check_not_unloaded()
        call = self._new_call(kwargs, intervention_locations, adapter_names, intervene_on)
        call.generating = True
        with self._calling(call):
            return self.model.generate(**kwargs)

    # ---- management ----------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager (PEFT's verb): calls inside it run the plain base model (the hooks
        stay, the edits are skipped). It holds for the current thread (context) only."""
        token = _DISABLED.set(_DISABLED.get() | {id(self)})
        try:
            yield self
        finally:
            _DISABLED.reset(token)

    def unload(self) -> nn.Module:
        """Remove every hook this wrapper added and return the untouched base model.

        The wrapper is unusable afterwards: calling it raises (it would silently run the plain
        model).
        """
        for handle in self._layer_hooks.values():
            handle.remove()
        self._layer_hooks = {}
        if self._pass_hook is not None:
            self._pass_hook.remove()
            self._pass_hook = None
        return self.model

    def _check_not_unloaded(self) -> None:
        if self._pass_hook is None:  # a live wrapper always holds its pass-counting hook
            raise RuntimeError(
                "this ReftModel was unloaded (its hooks are removed): call the model that "
                "unload() returned, or attach interventions again with get_reft_model"
            )

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, base model and every adapter included (PEFT's
        verb)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """Print the counts of :meth:`get_nb_trainable_parameters` as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def keep_orthonormal(self, optimizer: torch.optim.Optimizer, **kwargs):
        """Retract the interventions' R after every ``optimizer.step()``.

        Same as :func:`reft_ext.keep_orthonormal` (kwargs: params, method, project_grad).
        """
        return keep_orthonormal(optimizer, **kwargs)

    # ---- folders -------------------------------------------------------------------------
    def save_pretrained(
        self,
        directory: str | Path,
        selected_adapters: Sequence[str] | None = None,
        is_main_process: bool | None = None,
    ) -> list[Path]:
        """Write adapters into ``directory`` in PEFT's layout: ``"default"`` at the top, any
        other adapter in the subfolder named after it. Each folder holds ``reft_config.json``
        (the config and the base model's hidden size and block count) and
        ``reft_model.safetensors`` (the interventions, keys ``<intervention_key>.<parameter>``);
        never a base model's ``config.json``.

        Args:
            directory: the folder (created if needed).
            selected_adapters: the names of the adapters to write; default: all.
            is_main_process: whether this process writes (transformers' argument); default: rank
                0 when torch.distributed is initialized, else True. Every rank holds the same
                interventions, so one writer suffices, and other ranks calling this is harmless.

        Returns:
            The paths written (empty on a process that does not write).
        """
        from ..distributed import is_main_process as main_process

        names = list(self._specs) if selected_adapters is None else selected_adapters
        if isinstance(names, str):
            raise TypeError("selected_adapters must be a list of adapter names, not a str")
        for name in names:
            self._check_known(name, "selected_adapters")
        if not (main_process() if is_main_process is None else is_main_process):
            return []
        directory = Path(directory)
        paths = []
        for name in names:
            folder = directory if name == DEFAULT_ADAPTER else directory / name
            paths += write_adapter(
                folder, self._specs[name].config, self.adapters[name], self.model
            )
        return paths

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | Path,
        device: torch.device | str | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> ReftModel:
        """Attach the adapter :meth:`save_pretrained` wrote in ``directory`` to ``model``, as the
        active, trainable adapter ``adapter_name``; :meth:`load_adapter` adds more.

        Args:
            model: the base model it was trained on (hidden size and block count are checked).
            directory: the saved folder.
            device: where to put the interventions; default: the model's device. Dtypes are kept.
            adapter_name: the adapter's name here.

        Raises:
            FileNotFoundError: a file of the adapter is missing (named).
            ValueError: the folder does not fit ``model`` or is damaged; the message names the
                file and the key (missing or unknown tensors, wrong shapes, hidden size, blocks).
        """
        target = _device_for(model, device)
        config, state, weights_path = read_adapter(directory, model, target)
        reft_model = cls(model, config, adapter_name)
        try:
            load_interventions(reft_model.interventions, state, weights_path, target)
        except ValueError:
            reft_model.unload()  # a failed load leaves the user's model without our hooks
            raise
        return reft_model


def _device_for(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device``, or by default the device of ``model``'s parameters."""
    return torch.device(device) if device is not None else next(model.parameters()).device


def get_reft_model(
    model: nn.Module, config: ReftConfig, adapter_name: str = DEFAULT_ADAPTER
) -> ReftModel:
    """Freeze ``model`` and attach the interventions ``config`` describes as the active adapter
    ``adapter_name`` (a :class:`ReftModel`)."""
    return ReftModel(model, config, adapter_name)
