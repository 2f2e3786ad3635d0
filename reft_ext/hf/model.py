"""ReftModel: a frozen transformers model with ReFT interventions hooked onto its blocks."""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..modules import INTERVENTIONS
from ..retraction import keep_orthonormal
from .blocks import block_hidden, find_blocks, hidden_size
from .config import Positions, ReftConfig, intervention_key
from .edit import edit_rows_
from .locations import checked_mask, default_locations, explicit_locations

#: File names of a saved adapter, distinct from the base model's (``config.json``,
#: ``model.safetensors``) so that both can live in one folder.
CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "reft_model.safetensors"


@dataclass
class _Call:
    """Per-call state of one ``forward`` or ``generate``: it belongs to the call, not the model.

    locations: {layer: {group: (B, P)}}; decode: the same for the decode passes of
    ``generate(intervene_on="all")``; passes counts forward calls of the wrapped model.
    """

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


class ReftModel(nn.Module):
    """A transformers model with frozen weights and trainable interventions at chosen blocks.

    Build it with :func:`get_reft_model`. ``forward`` takes every argument of the wrapped model plus
    ``intervention_locations``; each hooked block's output is edited in place at the selected rows
    only (a gather of P rows, the fused op, a scatter back: O(P·d), no copy of the hidden states).
    Threads may share one ReftModel: each call's locations belong to that call.
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
        cls = INTERVENTIONS[config.intervention]
        kwargs = {"dropout": config.dropout, "dtype": config.torch_dtype, "device": device}
        if cls.orthonormal:
            kwargs["orthogonality"] = config.orthogonality
        self.interventions = nn.ModuleDict(
            {
                intervention_key(layer, group): cls(self._hidden_size, config.rank, **kwargs)
                for layer in layers
                for group in self._groups
            }
        )
        self._in_flight = 0  # calls running now, in any thread
        self._in_flight_lock = threading.Lock()
        self._handles = [
            blocks[layer].register_forward_hook(self._make_hook(layer)) for layer in layers
        ]
        self._handles.append(model.register_forward_pre_hook(self._count_pass))
        self._register_load_state_dict_pre_hook(self._remember_load_prefix, with_module=False)
        self.register_load_state_dict_post_hook(self._base_keys_are_not_missing)

    # ---- state dict: the adapter only ----------------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The adapter's tensors only, keys ``interventions.<intervention_key>.<parameter>``.

        The base model is frozen and not part of the adapter (``reft_model.model.state_dict()``
        has it): so ``transformers.Trainer`` checkpoints of a ReftModel hold the interventions,
        not a copy of the base model (which, with tied embeddings, safetensors refuses to save),
        and ``load_state_dict`` of such a dict restores them with ``strict=True``. A wrapper's
        state dict (DDP's ``module.``, torch.compile's ``_orig_mod.``) nests the same keys.
        """
        if args:
            raise TypeError("ReftModel.state_dict takes its arguments by keyword")
        return self.interventions.state_dict(
            destination=destination, prefix=prefix + "interventions.", keep_vars=keep_vars
        )

    def _remember_load_prefix(self, state_dict, prefix, *_args) -> None:
        self._load_prefix = prefix

    def _base_keys_are_not_missing(self, _module, incompatible_keys) -> None:
        # The base model's tensors are not in state_dict() (above), so a load of it must not
        # report them missing; a base-model key that *is* given is still loaded as usual.
        base = getattr(self, "_load_prefix", "") + "model."
        missing = incompatible_keys.missing_keys
        missing[:] = [key for key in missing if not key.startswith(base)]

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
            for group, index in locations.items():
                if index.shape[0] != hidden.shape[0]:
                    index = self._expand_batch(call, index, hidden.shape[0])
                edit_rows_(hidden, index, self.interventions[intervention_key(layer, group)])
            return None  # the output was edited in place

        return hook

    @staticmethod
    def _expand_batch(call: _Call, index: torch.Tensor, batch: int) -> torch.Tensor:
        """generate() repeats each prompt in a row (repeat_interleave: num_beams copies, or
        num_return_sequences when sampling): give every copy its prompt's locations."""
        if not call.generating or batch % index.shape[0]:
            raise ValueError(
                f"intervention locations are for a batch of {index.shape[0]}, the block's hidden "
                f"states have {batch} rows"
            )
        return index.repeat_interleave(batch // index.shape[0], dim=0)

    @staticmethod
    def _locations_for(call: _Call, layer: int) -> dict[str, torch.Tensor] | None:
        if call.generating and call.passes > 1:
            return call.decode.get(layer) if call.decode else None
        return call.locations.get(layer)

    # ---- forward and generation ----------------------------------------------------------
    def _compute_locations(self, kwargs: dict, intervention_locations) -> dict:
        reference = kwargs.get("input_ids")
        if reference is None:
            reference = kwargs.get("inputs_embeds")
        if reference is None:
            raise ValueError("ReftModel needs input_ids or inputs_embeds to place interventions")
        batch, length = reference.shape[0], reference.shape[1]
        explicit = intervention_locations is not None
        if kwargs.get("attention_mask") is not None:  # a mask that does not fit fails here, clearly
            checked_mask(kwargs["attention_mask"], batch, length, explicit)
        if explicit:
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
        with self._calling(_Call(locations)):
            return self.model(**kwargs)

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
        with self._calling(_Call(locations, decode, generating=True)):
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

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, base model included (PEFT's verb)."""
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

    def save_pretrained(
        self, directory: str | Path, is_main_process: bool | None = None
    ) -> list[Path]:
        """Write the adapter into ``directory``: ``reft_config.json`` (the config and the base
        model's hidden size and block count) and ``reft_model.safetensors`` (the interventions,
        keys ``<intervention_key>.<parameter>``). Never touches a base model's ``config.json``.

        Args:
            directory: the folder (created if needed).
            is_main_process: whether this process writes (transformers' argument); default: rank
                0 when torch.distributed is initialized, else True. Every rank holds the same
                interventions, so one writer suffices, and other ranks calling this is harmless.

        Returns:
            The paths written (empty on a process that does not write).
        """
        from safetensors.torch import save_file

        from ..distributed import is_main_process as main_process

        if not (main_process() if is_main_process is None else is_main_process):
            return []
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
        return [directory / CONFIG_NAME, directory / WEIGHTS_NAME]

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | Path, device: torch.device | str | None = None
    ) -> ReftModel:
        """Attach the adapter :meth:`save_pretrained` wrote in ``directory`` to ``model``.

        Args:
            model: the base model it was trained on (hidden size and block count are checked).
            directory: the saved folder.
            device: where to put the interventions; default: the model's device. Dtypes are kept.

        Raises:
            FileNotFoundError: a file of the adapter is missing (named).
            ValueError: the folder does not fit ``model`` or is damaged; the message names the
                file and the key (missing or unknown tensors, wrong shapes, hidden size, blocks).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: from_pretrained reads the {CONFIG_NAME} and "
                    f"{WEIGHTS_NAME} that ReftModel.save_pretrained writes"
                )
        try:
            meta = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path}: not valid JSON ({error})") from error
        if not isinstance(meta, dict):
            raise ValueError(f"{config_path}: expected a JSON object, got {type(meta).__name__}")
        for key in ("reft_config", "hidden_size", "num_blocks"):
            if key not in meta:
                raise ValueError(f"{config_path}: key {key!r} is missing")
        try:
            config = ReftConfig.from_dict(meta["reft_config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{config_path}: key 'reft_config': {error}") from error
        _, blocks = find_blocks(model)
        for key, saved, actual in (
            ("hidden_size", meta["hidden_size"], hidden_size(model)),
            ("num_blocks", meta["num_blocks"], len(blocks)),
        ):
            if saved != actual:
                raise ValueError(
                    f"{config_path}: {key} is {saved}, this model's is {actual} (the adapter was "
                    "saved for another model)"
                )
        target = torch.device(device) if device is not None else next(model.parameters()).device
        try:
            state = load_file(str(weights_path), device=str(target))
        except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
            raise ValueError(
                f"{weights_path}: not a readable safetensors file ({type(error).__name__}: {error})"
            ) from error
        reft_model = cls(model, config)
        try:
            reft_model._load_interventions(state, weights_path, target)
        except ValueError:
            reft_model.unload()  # a failed load leaves the user's model without our hooks
            raise
        return reft_model

    def _load_interventions(self, state: dict, weights_path: Path, target: torch.device) -> None:
        """Check ``state`` (read from ``weights_path``) against the interventions and load it."""
        expected = self.interventions.state_dict()
        missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unknown:
            raise ValueError(
                f"{weights_path}: tensors do not match {CONFIG_NAME}'s config: missing {missing}, "
                f"unknown {unknown}"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(
                    f"{weights_path}: tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                    f"needs {tuple(expected[key].shape)}"
                )
        self.interventions.to(target)
        self.interventions.load_state_dict(state)


def get_reft_model(model: nn.Module, config: ReftConfig) -> ReftModel:
    """Freeze ``model`` and attach the interventions ``config`` describes (a :class:`ReftModel`)."""
    return ReftModel(model, config)
