"""Drop-ins for pyreft's six intervention classes, on pyvene's base classes (needs pyreft/pyvene).

Each class takes pyreft's constructor keywords and computes pyreft's output, with the edit on
reft_ext's fused ops (one pass over h, accumulated in float32): :func:`reft_ext.lowrank_edit`
when ``act_fn`` is the identity (pyreft's default), :func:`reft_ext.lowrank_edit_act` when it is
one of the activations the kernels compute (``FUSED_ACTIVATIONS``), and the float32 composite for
any other callable:

| class                  | pyreft's output                        | orthonormal R | dropout    |
|------------------------|----------------------------------------|---------------|------------|
| LoreftIntervention     | h + (act(W h + b) − R h) R             | yes           | the output |
| NoreftIntervention     | h + (act(W h + b) − (P h + b_P)) P     | no (P free)   | the output |
| DireftIntervention     | h + act(W h + b) R                     | yes           | the output |
| NodireftIntervention   | h + act(W h + b) P                     | no (P free)   | the output |
| ConsreftIntervention   | h + (b − R h) R                        | yes           | none       |
| LobireftIntervention   | h + b R                                | yes           | the output |

As in pyreft, dropout applies to the whole output (h included), and W, b (``learned_source``, an
``nn.Linear(embed_dim, rank)``) and P (``proj_layer``) are in ``dtype`` (default bfloat16), R and a
constant source b in float32. pyreft keeps R orthonormal with torch's orthogonal
parametrization (a d×d buffer per intervention, O(d²·r) per read); by default the drop-ins compute
the same function of the same trained parameter in O(d·r²), so a pyreft recipe trains the same.

How R stays orthonormal is the keyword ``orthogonality`` (reft_ext's own; the default is the one
:func:`reft_ext.integrations.pyreft.apply` sets, else ``"householder"``):

- ``"householder"`` (default): pyreft's own function of its trained parameter, R = (base ·
  HH(X))ᵀ, in O(d·r²) per read (:mod:`reft_ext.householder`: the base kept as r reflectors, not
  d×d), so pyreft's training dynamics carry over (Adam sees the same parameter X). Through
  pyreft's own trainer it tracks pyreft's class within seed noise, and exactly given pyreft's
  base (README, "Does a pyreft recipe train the same?");
- ``"retraction"``: R is a plain (rank, embed_dim) parameter that the automatic retraction
  (:mod:`reft_ext.retraction`) maps back onto orthonormal rows after each step of the optimizer
  that trains it, pyreft's trainers' included (reft_ext's own default; through pyreft's trainer
  it trains a little slower than pyreft's class at the same learning rate);
- ``"parametrization"``: torch's orthogonal parametrization itself, exactly pyreft's (O(d²·r)
  per read and a d×d buffer; for comparison).

State dicts have pyreft's keys, except that the rotation is stored as pyreft's LoReFT stores it,
``rotate_layer`` (embed_dim, rank) = Rᵀ (the evaluated R, whatever ``orthogonality``; loading it
into a parametrized R restarts the parametrization there, as pyreft's own load does), instead of
the parametrization's ``original`` and d×d ``base``; ``load_state_dict`` reads both forms, so a
pyreft module's state loads into ours. The
renaming is done by torch's state-dict hooks, so a drop-in nested in another module saves and
loads (strictly) under its prefix.

The classes are module-level with plain qualified names: pyvene writes ``str(type(intervention))``
into a saved ``config.json`` and imports that name again in ``ReftModel.load``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

try:
    from pyvene import (
        DistributedRepresentationIntervention,
        RepresentationConfig,
        SourcelessIntervention,
        TrainableIntervention,
    )
    from transformers.activations import ACT2FN
except ImportError as error:
    raise ImportError(
        "reft_ext.integrations.pyreft's drop-in interventions subclass pyvene's: install pyreft "
        "(see the README) to use them"
    ) from error

from ..dtypes import accumulation_dtype
from ..functional import lowrank_edit, lowrank_edit_act
from ..modules import ORTHOGONALITY, orthonormal_parameter, parametrize_orthonormal
from .pyreft import DROP_IN_ORTHOGONALITY_DEFAULT, rotation_from_state

#: Keywords pyvene passes when it builds an intervention itself (its ``IntervenableModel`` and
#: ``load``: a RepresentationConfig's fields, the component's width and ``use_fast``).
_PYVENE_KEYWORDS = frozenset(RepresentationConfig._fields) | {"embed_dim", "use_fast"}
#: Keywords of pyreft's classes (``device``: pyreft's examples pass it; here it places the tensors).
_PYREFT_KEYWORDS = frozenset({"dtype", "dropout", "act_fn", "add_bias", "device"})
#: What a keyword a class does not read may be without meaning anything.
_NEUTRAL = {"dropout": (0.0, 0), "act_fn": (None, "linear"), "add_bias": (False,)}
#: The drop-ins' choices of ``orthogonality`` (a free R would not be pyreft's class).
DROP_IN_ORTHOGONALITY = tuple(o for o in ORTHOGONALITY if o is not None)
#: ``orthogonality`` where the keyword is not given: set (and restored) by
#: :func:`reft_ext.integrations.pyreft.apply`.
DEFAULTS = {"orthogonality": DROP_IN_ORTHOGONALITY_DEFAULT}


def check_orthogonality(owner: str, orthogonality) -> str:
    """``orthogonality`` itself, or a ValueError naming ``owner`` and the choices."""
    if orthogonality not in DROP_IN_ORTHOGONALITY:
        raise ValueError(
            f"{owner}: orthogonality must be one of {DROP_IN_ORTHOGONALITY}, got {orthogonality!r}"
        )
    return orthogonality


#: ``act_fn`` values (transformers' ACT2FN names and torch's functions) the fused kernels compute,
#: by the kernels' name for them (reft_ext.ops.ACTIVATIONS): the same formulas as torch's.
FUSED_ACTIVATIONS: dict[object, str] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    torch.relu: "relu",
    nn.functional.relu: "relu",
    nn.functional.gelu: "gelu",
    nn.functional.silu: "silu",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
}


def _activation(act_fn) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``act_fn`` as a callable, or None for the identity (the fused path)."""
    if act_fn is None or act_fn == "linear":
        return None
    if isinstance(act_fn, str):
        if act_fn not in ACT2FN:
            raise ValueError(
                f"act_fn must be None, a callable or one of transformers' ACT2FN names "
                f"{sorted(ACT2FN)}, got {act_fn!r}"
            )
        return ACT2FN[act_fn]
    if callable(act_fn):
        return act_fn
    raise ValueError(
        f"act_fn must be None, a callable or an ACT2FN name, got {type(act_fn).__name__}"
    )


class _OrthonormalRows(nn.Module):
    """Holds a drop-in's R (rank, embed_dim) as ``orthogonality`` trains it, parametrized here
    rather than on the drop-in: registering a parametrization swaps its module's class for a
    generated subclass (``torch.nn.utils.parametrize.Parametrized...``), while pyvene saves a
    checkpoint under the intervention's class name, which must stay importable (pyreft likewise
    parametrizes its child ``rotate_layer``)."""

    def __init__(self, R: torch.Tensor, orthogonality: str):
        super().__init__()
        self.R = orthonormal_parameter(R, orthogonality)
        parametrize_orthonormal(self, "R", orthogonality)


class _DropIn(SourcelessIntervention, TrainableIntervention, DistributedRepresentationIntervention):
    """Shared construction, forward and state-dict plumbing of the drop-ins.

    Each subclass declares which of pyreft's parts it has — ``orthonormal`` (R, pyreft's
    ``rotate_layer``), ``projection`` (P, pyreft's ``proj_layer``), ``linear_source`` (W and b, an
    ``nn.Linear``; else b alone, a float32 (rank,) parameter ``learned_source``) — which keywords
    its pyreft class reads, whether it subtracts the projected h, and whether it has dropout.
    """

    orthonormal: ClassVar[bool] = True
    projection: ClassVar[bool] = False
    linear_source: ClassVar[bool] = True
    subtracts_projection: ClassVar[bool] = True
    has_dropout: ClassVar[bool] = True
    reads: ClassVar[frozenset[str]] = frozenset({"dtype", "dropout", "act_fn"})

    def __init__(self, **kwargs):
        name = type(self).__name__
        unknown = sorted(set(kwargs) - _PYVENE_KEYWORDS - _PYREFT_KEYWORDS - {"orthogonality"})
        if unknown:
            raise TypeError(
                f"{name}: unknown keyword(s) {unknown}; it takes "
                f"{sorted(_PYVENE_KEYWORDS | _PYREFT_KEYWORDS | {'orthogonality'})}"
            )
        if "orthogonality" in kwargs and not self.orthonormal:
            raise ValueError(
                f"{name}: orthogonality does not apply: its projection (proj_layer) is free, as "
                f"in pyreft; got orthogonality={kwargs['orthogonality']!r}"
            )
        # reft_ext's keyword, not pyvene's: kept out of the config pyvene saves.
        orthogonality = kwargs.pop("orthogonality", DEFAULTS["orthogonality"])
        for keyword, neutral in _NEUTRAL.items():
            if keyword in kwargs and keyword not in self.reads and kwargs[keyword] not in neutral:
                warnings.warn(
                    f"{name}: pyreft's {name} ignores {keyword}={kwargs[keyword]!r}, and so does "
                    "this drop-in",
                    stacklevel=2,
                )
        for required in ("embed_dim", "low_rank_dimension"):
            if kwargs.get(required) is None:
                raise TypeError(f"{name}: the keyword {required} (an int) is required")
        super().__init__(**kwargs, keep_last_dim=True)
        embed_dim, rank = int(kwargs["embed_dim"]), int(kwargs["low_rank_dimension"])
        if not 1 <= rank <= embed_dim:
            raise ValueError(
                f"{name}: need 1 <= low_rank_dimension <= embed_dim, got "
                f"low_rank_dimension={rank}, embed_dim={embed_dim}"
            )
        dtype = kwargs.get("dtype") or torch.bfloat16
        device = kwargs.get("device")
        self.orthogonality = check_orthogonality(name, orthogonality) if self.orthonormal else None
        if self.orthonormal:
            q = torch.linalg.qr(torch.randn(embed_dim, rank, dtype=torch.float64))[0]
            R = q.T.to(device=device, dtype=torch.float32).contiguous()
            self.rotation = _OrthonormalRows(R, self.orthogonality)
        if self.projection:
            bias = bool(kwargs.get("add_bias", False))
            self.proj_layer = nn.Linear(embed_dim, rank, bias=bias, device=device, dtype=dtype)
        if self.linear_source:
            self.learned_source = nn.Linear(embed_dim, rank, device=device, dtype=dtype)
        else:
            self.learned_source = nn.Parameter(torch.rand(rank, device=device))
        dropout = float(kwargs.get("dropout", 0.0)) if self.has_dropout else 0.0
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        self.dropout = nn.Dropout(dropout)
        act_fn = kwargs.get("act_fn") if "act_fn" in self.reads else None
        self.act_fn = _activation(act_fn)
        # The kernels' name for act_fn, or None (the identity, or a callable they do not know).
        self.fused_act = FUSED_ACTIVATIONS.get(act_fn) if self.act_fn is not None else None
        # Through the class (the hook is given the module): torch marks each hook object, which a
        # bound method does not allow.
        self.register_state_dict_post_hook(type(self)._to_pyreft_form)
        self.register_load_state_dict_pre_hook(type(self)._from_pyreft_form)

    @property
    def R(self) -> torch.Tensor:
        """The orthonormal rows (rank, embed_dim), float32: the parameter itself (retraction) or
        its parametrization's value."""
        return self.rotation.R

    # -- the edit ---------------------------------------------------------------------------------

    def _terms(self, dtype: torch.dtype):
        """(W, b, S, c, Q) in ``dtype``: out = h + (act(W h + b) − (S h + c)) Q; W is None for a
        constant source (then z = b − S h), S and c None where nothing is subtracted."""
        if self.linear_source:
            W, b = self.learned_source.weight.to(dtype), self.learned_source.bias.to(dtype)
        else:
            W, b = None, self.learned_source.to(dtype)
        Q = self.R.to(dtype) if self.orthonormal else self.proj_layer.weight.to(dtype)
        S = c = None
        if self.subtracts_projection:
            S = Q
            if self.projection and self.proj_layer.bias is not None:
                c = self.proj_layer.bias.to(dtype)
        return W, b, S, c, Q

    def forward(self, base, source=None, subspaces=None):
        """pyreft's output for ``base`` (..., embed_dim), in base's dtype (source and subspaces
        are pyvene's arguments, unused as in pyreft)."""
        acc = accumulation_dtype(base.dtype)
        W, b, S, c, Q = self._terms(acc)
        if W is None and S is None:  # h + b Q: no projection of h at all
            edited = (base.to(acc) + b @ Q).to(base.dtype)
        elif self.act_fn is None:  # one fused pass: P = W − S, bias b − c
            P = (W if W is not None else 0) - (S if S is not None else 0)
            edited = lowrank_edit(base, P, Q, b - c if c is not None else b)
        elif self.fused_act is not None:  # one fused pass: act(W h + b) − (S h + c), then the edit
            edited = lowrank_edit_act(base, W, b, Q, self.fused_act, S, c)
        else:  # act(W h + b) − (S h + c): the activation keeps W and S apart (composite)
            h = base.to(acc)
            z = self.act_fn(nn.functional.linear(h, W, b))
            if S is not None:
                z = z - nn.functional.linear(h, S, c)
            edited = (h + z @ Q).to(base.dtype)
        return self.dropout(edited)

    # -- state dicts: pyreft's keys through torch's own hooks, so nesting and strictness work ----

    #: Entries renamed between the module's attributes and pyreft's keys (LoReFT's own form).
    renamed: ClassVar[dict[str, str]] = {}

    def _to_pyreft_form(self, state_dict, prefix, local_metadata) -> None:
        """State-dict post-hook: R as ``rotate_layer`` (embed_dim, rank), pyreft's names."""
        if self.orthonormal:
            # A parametrized R saves as its value (pyreft's own save does the same).
            R = state_dict.pop(prefix + "rotation.R", None)
            for key in [k for k in state_dict if k.startswith(prefix + "rotation.")]:
                del state_dict[key]
            state_dict[prefix + "rotate_layer"] = (self.R.detach() if R is None else R).T
        for ours, theirs in self.renamed.items():
            value = state_dict.pop(prefix + ours)
            if theirs is not None:
                state_dict[prefix + theirs] = value

    def _from_pyreft_form(self, state_dict, prefix, *args) -> None:
        """Load pre-hook: the inverse of :meth:`_to_pyreft_form`, and pyreft's parametrized
        rotation (torch's ``original`` and ``base``) evaluated into R."""
        if self.orthonormal:
            keys = [k for k in state_dict if k.startswith(prefix + "rotate_layer")]
            if keys:
                local = {k[len(prefix) :]: state_dict.pop(k) for k in keys}
                try:
                    R = rotation_from_state(local)
                except KeyError as error:
                    raise KeyError(f"{type(self).__name__}: the rotation {error.args[0]}") from None
                rotation = self.rotation
                if self.orthogonality == "retraction":
                    state_dict[prefix + "rotation.R"] = R
                else:  # the parametrization restarts at R: its base becomes R, X = −I
                    with torch.no_grad():
                        rotation.R = R.to(rotation.parametrizations.R.original)
                    for key, value in rotation.parametrizations.R.state_dict().items():
                        state_dict[prefix + "rotation.parametrizations.R." + key] = value
        for ours, theirs in self.renamed.items():
            if theirs is None:  # not in pyreft's form: this module's own value
                state_dict.setdefault(prefix + ours, getattr(self, ours))
            elif prefix + theirs in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)


class LoreftIntervention(_DropIn):
    """Drop-in for ``pyreft.LoreftIntervention``: h + (act(W h + b) − R h) R, R orthonormal.

    State dict: pyreft's own form, ``weight`` and ``bias`` (the learned source) and
    ``rotate_layer`` (embed_dim, rank) = Rᵀ.
    """

    renamed = {
        "learned_source.weight": "weight",
        "learned_source.bias": "bias",
        "embed_dim": None,  # pyvene's buffers, which pyreft's LoReFT state dict leaves out
        "interchange_dim": None,
    }


class NoreftIntervention(_DropIn):
    """Drop-in for ``pyreft.NoreftIntervention``: h + (act(W h + b) − (P h + b_P)) P, P free
    (``proj_layer``, with a bias when ``add_bias=True``)."""

    orthonormal = False
    projection = True
    reads = frozenset({"dtype", "dropout", "act_fn", "add_bias"})


class DireftIntervention(_DropIn):
    """Drop-in for ``pyreft.DireftIntervention``: h + act(W h + b) R, R orthonormal."""

    subtracts_projection = False


class NodireftIntervention(_DropIn):
    """Drop-in for ``pyreft.NodireftIntervention``: h + act(W h + b) P, P free (``proj_layer``;
    its bias, with ``add_bias=True``, is held but not used, as in pyreft)."""

    orthonormal = False
    projection = True
    subtracts_projection = False
    reads = frozenset({"dtype", "dropout", "act_fn", "add_bias"})


class ConsreftIntervention(_DropIn):
    """Drop-in for ``pyreft.ConsreftIntervention``: h + (b − R h) R, b a float32 (rank,)
    parameter, R orthonormal; no dropout and no activation (pyreft's class has neither)."""

    linear_source = False
    has_dropout = False
    reads = frozenset()


class LobireftIntervention(_DropIn):
    """Drop-in for ``pyreft.LobireftIntervention``: h + b R, b a float32 (rank,) parameter, R
    orthonormal."""

    linear_source = False
    subtracts_projection = False
    reads = frozenset({"dropout"})


#: pyreft's class name -> its drop-in.
DROP_INS: dict[str, type[_DropIn]] = {
    cls.__name__: cls
    for cls in (
        LoreftIntervention,
        NoreftIntervention,
        DireftIntervention,
        NodireftIntervention,
        ConsreftIntervention,
        LobireftIntervention,
    )
}
