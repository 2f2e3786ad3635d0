"""reft_ext: fused CPU/CUDA kernels for Representation Finetuning (ReFT).

Public API:
    lowrank_edit(h, P, Q, b)  h + (h Pᵀ + b) Q        the primitive every variant uses
    lowrank_edit_multi(h, P, Q, b, adapter)         the same with a per-row adapter (A, r, d)
    lowrank_edit_act(h, W, b, Q, act, S, c)  h + (act(h Wᵀ + b) − (h Sᵀ + c)) Q   activated source
    loreft(h, R, W, b)        h + (h Wᵀ + b − h Rᵀ) R  LoReFT
    direft(h, R, W, b)        h + (h Wᵀ + b) R         DiReFT
    retract_(R, method)       orthonormalize R's rows in place (cholqr2, qr, polar)
    retract_list_(Rs, method) the same for a list of tensors, in one call
    project_tangent(R, G)     Riemannian gradient G − sym(G Rᵀ) R
    keep_orthonormal(opt)     retract marked parameters after every step of one optimizer
    auto_retraction(on)       the automatic retraction after any optimizer's step (default on)
    LoReFT, NoReFT, DiReFT, ConsReFT, LoBiReFT   intervention modules
    ReftConfig, get_reft_model, ReftModel         Hugging Face drop-in (reft_ext.hf)
    cuda_available()          whether the CUDA kernels were compiled in
"""

from . import ops  # noqa: F401  (loads the compiled library and registers fake kernels)
from .functional import direft, loreft, lowrank_edit, lowrank_edit_act, lowrank_edit_multi
from .hf import ReftConfig, ReftModel, get_reft_model
from .modules import ConsReFT, DiReFT, LoBiReFT, LoReFT, NoReFT
from .ops import cpu_kernels, cuda_available
from .retraction import (
    StiefelParameter,
    auto_retraction,
    keep_orthonormal,
    mark_stiefel,
    project_tangent,
    retract_,
    retract_list_,
)

__version__ = "0.1.0"

__all__ = [
    "ConsReFT",
    "DiReFT",
    "LoBiReFT",
    "LoReFT",
    "NoReFT",
    "ReftConfig",
    "ReftModel",
    "StiefelParameter",
    "auto_retraction",
    "keep_orthonormal",
    "mark_stiefel",
    "__version__",
    "cpu_kernels",
    "cuda_available",
    "direft",
    "get_reft_model",
    "loreft",
    "lowrank_edit",
    "lowrank_edit_act",
    "lowrank_edit_multi",
    "project_tangent",
    "retract_",
    "retract_list_",
]
