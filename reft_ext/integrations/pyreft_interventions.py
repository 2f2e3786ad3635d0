"""Drop-ins for pyreft's intervention classes, on pyvene's base classes (needs pyreft/pyvene).

Module-level classes with plain qualified names: pyvene writes ``str(type(intervention))`` into a
saved ``config.json`` and imports that name again in ``ReftModel.load``, so the classes must be
importable as ``reft_ext.integrations.pyreft_interventions.<Name>`` (a class built inside a
function is not).
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from pyvene import (
        DistributedRepresentationIntervention,
        SourcelessIntervention,
        TrainableIntervention,
    )
    from transformers.activations import ACT2FN
except ImportError as error:
    raise ImportError(
        "reft_ext.integrations.pyreft's drop-in interventions subclass pyvene's: install pyreft "
        "(see the README) to use them"
    ) from error

from ..functional import loreft
from ..retraction import StiefelParameter


class LoreftIntervention(
    SourcelessIntervention, TrainableIntervention, DistributedRepresentationIntervention
):
    """Drop-in for ``pyreft.LoreftIntervention`` in a ``pyreft.ReftConfig``.

    Same constructor keywords (``embed_dim``, ``low_rank_dimension``, ``dtype`` of the learned
    source, default bfloat16 as in pyreft; ``dropout``; ``act_fn``) and the same state-dict keys
    (``weight``, ``bias``, ``rotate_layer`` (d, r)), so pyreft's training, save and
    ``ReftModel.load`` keep working. The forward runs reft_ext's fused op (``act_fn``
    None/"linear"; other activations use the composite). R (``self.R``, (r, d)) is a plain
    parameter kept orthonormal by the automatic retraction after each step of the optimizer
    that trains it (pyreft's trainers' included), not by torch's parametrization. Dropout applies
    to the edit only.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs, keep_last_dim=True)
        embed_dim, rank = int(self.embed_dim), int(kwargs["low_rank_dimension"])
        q = torch.linalg.qr(torch.randn(embed_dim, rank, dtype=torch.float64))[0]
        self.R = StiefelParameter(q.T.to(torch.float32).contiguous())
        self.learned_source = nn.Linear(embed_dim, rank).to(kwargs.get("dtype", torch.bfloat16))
        self.dropout = nn.Dropout(kwargs.get("dropout", 0.0))
        act_fn = kwargs.get("act_fn")
        self.linear_source = act_fn in (None, "linear")
        self.act_fn = ACT2FN["linear" if act_fn is None else act_fn]

    def forward(self, base, source=None, subspaces=None):
        W = self.learned_source.weight.float()
        b = self.learned_source.bias.float()
        if self.linear_source:
            edited = loreft(base, self.R, W, b)
        else:  # act(W h + b) − R h: the merged fused edit does not apply
            h = base.float()
            edited = h + (self.act_fn(h @ W.T + b) - h @ self.R.T) @ self.R
        return base + self.dropout(edited.to(base.dtype) - base)

    def state_dict(self, *args, **kwargs):
        """pyreft's keys: the learned source's ``weight``, ``bias``; ``rotate_layer`` = Rᵀ."""
        return {
            "weight": self.learned_source.weight.data,
            "bias": self.learned_source.bias.data,
            "rotate_layer": self.R.data.T,
        }

    def load_state_dict(self, state_dict, *args, **kwargs):
        with torch.no_grad():
            self.learned_source.weight.copy_(state_dict["weight"])
            self.learned_source.bias.copy_(state_dict["bias"])
            self.R.copy_(state_dict["rotate_layer"].T)
