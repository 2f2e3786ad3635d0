"""Public fused ops on hidden states of any leading shape.

Shapes: h (..., d); R, W, P, Q (r, d); b (r,). h is float64, float32, bfloat16 or float16; each
parameter has h's dtype or float32. Accumulation is float32 (float64 for float64 h), the output has
h's shape and dtype, and each gradient has its input's dtype.
"""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (registers the ops and their autograd formula)
from .dtypes import SUPPORTED_DTYPES, SUPPORTED_NAMES, accumulation_dtype


def _check_tensors(op: str, h: torch.Tensor, tensors: dict[str, object]) -> None:
    """Every entry of ``tensors`` (h's included) a dense torch.Tensor, and h rows of a supported
    dtype; else TypeError/ValueError naming the argument."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if h.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: h must be {SUPPORTED_NAMES}, got {h.dtype}")
    if h.dim() < 1:
        raise ValueError(f"{op}: h must have shape (..., d), got a 0-d tensor")
    for name, t in tensors.items():
        if t.layout != torch.strided:
            raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got {t.layout}")


def _check_parameter(op: str, name: str, t: torch.Tensor, h: torch.Tensor) -> None:
    """A parameter ``name`` of h's dtype or float32, on h's device; else ValueError naming it."""
    if t.dtype not in (h.dtype, torch.float32):
        raise ValueError(
            f"{op}: {name} must have h's dtype ({h.dtype}) or torch.float32, got {t.dtype}"
        )
    if t.device != h.device:
        raise ValueError(f"{op}: {name} must be on h's device ({h.device}), got {t.device}")


def _check_inputs(
    op: str, h: torch.Tensor, factors: dict[str, torch.Tensor], b: torch.Tensor
) -> None:
    """Raise TypeError/ValueError naming the argument when the inputs of ``op`` do not fit."""
    _check_tensors(op, h, {"h": h, **factors, "b": b})
    d = h.shape[-1]
    first = next(iter(factors.values()))
    rank = first.shape[0] if first.dim() == 2 else None
    for name, t in {**factors, "b": b}.items():
        expected = (rank, d) if name != "b" else (rank,)
        if rank is None or rank < 1 or tuple(t.shape) != expected:
            shown = "(r, d)" if name != "b" else "(r,)"
            raise ValueError(
                f"{op}: {name} must have shape {shown} = {expected if rank else shown} with r >= 1 "
                f"and d = h.shape[-1] = {d}, got {tuple(t.shape)}"
            )
        _check_parameter(op, name, t, h)


def _edit(h: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Run the fused op on h viewed as rows; P, Q, b already validated."""
    acc = accumulation_dtype(h.dtype)
    rows = h.reshape(h.shape[:-1].numel(), h.shape[-1]).contiguous()  # (-1, 0) would be ambiguous
    out, _ = torch.ops.reft_ext.lowrank_edit_forward(
        rows, P.to(acc).contiguous(), Q.to(acc).contiguous(), b.to(acc).contiguous()
    )
    return out.view(h.shape)


def lowrank_edit(
    h: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """Low-rank edit ``h + (h Pᵀ + b) Q``, fused: forward reads h and writes the output once.

    Backward reads the incoming gradient and h and writes ∂h (each gradient only if needed).

    Args:
        h: hidden states (..., d), any strides; float64, float32, bfloat16 or float16.
        P: (r, d) projection, h's dtype or float32.
        Q: (r, d) back-projection, h's dtype or float32.
        b: (r,) bias, h's dtype or float32.

    Returns:
        Tensor of h's shape and dtype. Differentiable in every input.
    """
    _check_inputs("lowrank_edit", h, {"P": P, "Q": Q}, b)
    return _edit(h, P, Q, b)


def loreft(h: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LoReFT edit ``h + Rᵀ(W h + b − R h)`` on rows: ``h + (h Wᵀ + b − h Rᵀ) R``.

    Args:
        h: hidden states (..., d); float64, float32, bfloat16 or float16.
        R: (r, d) subspace, orthonormal rows expected (not enforced here); h's dtype or float32.
        W: (r, d) learned source weight; h's dtype or float32.
        b: (r,) learned source bias; h's dtype or float32.

    Returns:
        Tensor of h's shape and dtype. Gradients: ∂W = ∂P, ∂R = ∂Q − ∂P for P = W − R, Q = R.
    """
    _check_inputs("loreft", h, {"R": R, "W": W}, b)
    acc = accumulation_dtype(h.dtype)
    return _edit(h, W.to(acc) - R.to(acc), R, b)


def direft(h: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """DiReFT edit ``h + (h Wᵀ + b) R`` (LoReFT without the −R h term and without orthogonality).

    Args and returns as for :func:`loreft`.
    """
    _check_inputs("direft", h, {"R": R, "W": W}, b)
    return _edit(h, W, R, b)


def _check_multi_inputs(
    h: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor, adapter: torch.Tensor
) -> None:
    """Raise TypeError/ValueError naming the argument when the inputs do not fit."""
    op = "lowrank_edit_multi"
    _check_tensors(op, h, {"h": h, "P": P, "Q": Q, "b": b, "adapter": adapter})
    d = h.shape[-1]
    if P.dim() != 3 or P.shape[1] < 1 or P.shape[2] != d:
        raise ValueError(
            f"{op}: P must have shape (A, r, d) with r >= 1 and d = h.shape[-1] = {d}, "
            f"got {tuple(P.shape)}"
        )
    A, r = P.shape[0], P.shape[1]
    for name, t, expected in (("Q", Q, (A, r, d)), ("b", b, (A, r))):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{op}: {name} must have shape {expected} (P's A, r), got {tuple(t.shape)}"
            )
    for name, t in {"P": P, "Q": Q, "b": b}.items():
        _check_parameter(op, name, t, h)
    if adapter.device != h.device:
        raise ValueError(f"{op}: adapter must be on h's device ({h.device}), got {adapter.device}")
    if adapter.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: adapter must be torch.int32 or torch.int64, got {adapter.dtype}")
    if tuple(adapter.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"{op}: adapter must have h's leading shape {tuple(h.shape[:-1])} (one index per row), "
            f"got {tuple(adapter.shape)}"
        )


def lowrank_edit_multi(
    h: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, b: torch.Tensor, adapter: torch.Tensor
) -> torch.Tensor:
    """A low-rank edit per row: ``out[i] = h[i] + (P[a] h[i] + b[a]) Q[a]``, ``a = adapter[i]``.

    One fused pass over h for a batch that mixes adapters (BGMV/SGMV-style serving, or training
    several adapters in one batch); rows with ``adapter[i] == -1`` are copied exactly. Adapters of
    lower rank are padded to r with zero rows of P, Q and b (a zero row adds nothing). With every
    row on one adapter the result is bit for bit that of :func:`lowrank_edit`.

    Args:
        h: hidden states (..., d); float64, float32, bfloat16 or float16.
        P: (A, r, d) projections of the A adapters, h's dtype or float32.
        Q: (A, r, d) back-projections, h's dtype or float32.
        b: (A, r) biases, h's dtype or float32.
        adapter: h.shape[:-1], int64 or int32: each row's adapter in [-1, A).

    Returns:
        Tensor of h's shape and dtype, differentiable in h, P, Q and b (each adapter's gradient
        sums over its rows; an adapter with no rows gets zeros). An index outside [-1, A) raises
        (on CUDA through a device-side assert, without a host synchronization).
    """
    _check_multi_inputs(h, P, Q, b, adapter)
    acc = accumulation_dtype(h.dtype)
    rows = h.reshape(h.shape[:-1].numel(), h.shape[-1]).contiguous()
    P, Q, b = (t.to(acc).contiguous() for t in (P, Q, b))
    out, _ = torch.ops.reft_ext.lowrank_edit_multi_forward(
        rows, P, Q, b, adapter.reshape(-1).contiguous()
    )
    return out.view(h.shape)


def lowrank_edit_act(
    h: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    Q: torch.Tensor,
    activation: str,
    S: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edit with an activated source ``h + (act(h Wᵀ + b) − (h Sᵀ + c)) Q``, fused: one pass over
    h computes the 2r projections per row (r without S), the activation and the edit; backward is
    fused too. pyreft's ``act_fn`` on LoReFT (S = Q = R), NoReFT (S = Q = P, c its bias), DiReFT
    and NodiReFT (no S).

    Args:
        h: hidden states (..., d); float64, float32, bfloat16 or float16.
        W: (r, d) learned source weight; h's dtype or float32.
        b: (r,) learned source bias; h's dtype or float32.
        Q: (r, d) back-projection; h's dtype or float32.
        activation: one of ``reft_ext.ops.ACTIVATIONS`` ("identity", "relu", "gelu" (erf),
            "gelu_tanh", "silu", "sigmoid", "tanh"), torch's formulas.
        S: optional (r, d) projection subtracted after the activation; h's dtype or float32.
        c: optional (r,) bias of S (needs S); h's dtype or float32.

    Returns:
        Tensor of h's shape and dtype, differentiable in h, W, b, Q, S and c (first order).
    """
    factors = {"W": W, "Q": Q} if S is None else {"W": W, "Q": Q, "S": S}
    _check_inputs("lowrank_edit_act", h, factors, b)
    if c is not None:
        if S is None:
            raise ValueError("lowrank_edit_act: c (S's bias) needs S")
        _check_tensors("lowrank_edit_act", h, {"c": c})
        if tuple(c.shape) != tuple(b.shape):
            raise ValueError(
                f"lowrank_edit_act: c must have b's shape {tuple(b.shape)}, got {tuple(c.shape)}"
            )
        _check_parameter("lowrank_edit_act", "c", c, h)
    if activation not in ops.ACTIVATIONS:
        raise ValueError(
            f"lowrank_edit_act: activation must be one of {ops.ACTIVATIONS}, got {activation!r}"
        )
    acc = accumulation_dtype(h.dtype)
    if S is None:
        P, bias = W.to(acc), b.to(acc)
    else:  # one (2r, d) projection: the kernels read each strip of h once for all 2r dots
        P = torch.cat([W.to(acc), S.to(acc)])
        bias = torch.cat([b.to(acc), (torch.zeros_like(b) if c is None else c).to(acc)])
    rows = h.reshape(h.shape[:-1].numel(), h.shape[-1]).contiguous()
    out, _, _ = torch.ops.reft_ext.lowrank_edit_act_forward(
        rows, P.contiguous(), Q.to(acc).contiguous(), bias.contiguous(), activation
    )
    return out.view(h.shape)
