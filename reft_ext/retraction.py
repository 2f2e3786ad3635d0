"""Keeping R's rows orthonormal by retraction after each optimizer step.

Instead of pyreft's orthogonal parametrization (a d×d buffer and a d×d·r product per weight read),
the optimizer updates R freely and :func:`retract_` maps it back onto the Stiefel manifold in
O(d·r²) per step.

Two ways to attach it, both after ``optimizer.step()``:

- automatic (default): once a marked parameter exists (:class:`StiefelParameter`, the R of the
  modules), one global optimizer step post-hook (``torch.optim.optimizer.
  register_optimizer_step_post_hook``) retracts the marked parameters of whichever optimizer just
  stepped. This covers optimizers the user never sees (``transformers.Trainer``'s, pyreft's
  trainers', accelerate's wrapped ones) and hand-written loops, with no extra line.
  :class:`auto_retraction` switches it off or picks its method.
- explicit: :func:`keep_orthonormal` on one optimizer (choice of parameters, ``project_grad``); an
  optimizer it manages is skipped by the automatic hook, so nothing is retracted twice.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import ops  # noqa: F401  (registers the ops)
from .dtypes import SUPPORTED_DTYPES, SUPPORTED_NAMES, accumulation_dtype

#: Retraction methods, by the names the op takes (checked again in C++: csrc/retraction_checks.h).
METHODS = ("cholqr2", "qr", "polar")


def _shares_memory(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` are one memory location (expanded or overlapping strides)."""
    status = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: too hard to tell cheaply
    if status != 2:
        return status == 1
    span = (
        t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    )
    where = torch.arange(span, device=t.device).as_strided(t.shape, t.stride(), t.storage_offset())
    return where.unique().numel() < t.numel()


def retract_(R: torch.Tensor, method: str = "cholqr2", check_finite: bool = True) -> torch.Tensor:
    """Orthonormalize the rows of R in place and return R.

    Args:
        R: (r, d) or a batch (k, r, d) with 1 <= r <= d; float64, float32, bfloat16 or float16 (low
            precision is retracted in float32 and written back). Any strides.
        method: ``"cholqr2"`` (default; CholeskyQR2, same row space), ``"qr"`` (Householder QR, same
            row space, signs fixed so that the result is unique; equal to cholqr2's result) or
            ``"polar"`` ((R Rᵀ)^-1/2 R, the closest matrix with orthonormal rows).
            Rank-deficient input falls back to Householder QR, which still returns orthonormal
            rows (polar then returns that QR factor: the closest matrix is not unique).
        check_finite: refuse a matrix holding NaN or Inf, leaving it as it was: ValueError on CPU
            (raised after the batch: its other matrices may be retracted), a device-side assert on
            CUDA (no host synchronization; it ends the process's CUDA context, as any device
            assert). Found by the kernels' first pass over R, at no extra cost. With
            ``check_finite=False`` such a matrix comes back all NaN (never an unrelated
            orthonormal matrix).

    Returns:
        R, modified in place. Not differentiable (an update applied outside autograd).
    """
    _check_retractable("retract_", "R", R, method)
    _retract_in_place([R], lambda t: torch.ops.reft_ext.retract_(t[0], method, check_finite))
    return R


def retract_list_(
    Rs: list[torch.Tensor], method: str = "cholqr2", check_finite: bool = True
) -> list[torch.Tensor]:
    """:func:`retract_` on every tensor of ``Rs`` in one call per dtype and device (the
    multi-tensor form of ``torch._foreach_*`` ops): on CPU one parallel loop over all their
    matrices, with no stacking and no copying back.

    Args:
        Rs: a list of tensors as :func:`retract_`'s R; shapes, dtypes and devices may differ.
        method, check_finite: as for :func:`retract_`.

    Returns:
        Rs, each modified in place.
    """
    if not isinstance(Rs, (list, tuple)):
        raise TypeError(f"retract_list_: Rs must be a list of tensors, got {type(Rs).__name__}")
    for i, R in enumerate(Rs):
        _check_retractable("retract_list_", f"Rs[{i}]", R, method)
    if not Rs and method not in METHODS:
        raise ValueError(f"retract_list_: method must be one of {list(METHODS)}, got {method!r}")
    groups: dict[tuple, list[torch.Tensor]] = {}
    for R in Rs:
        groups.setdefault((R.dtype, R.device), []).append(R)
    for members in groups.values():
        _retract_in_place(
            members, lambda t: torch.ops.reft_ext.retract_list_(t, method, check_finite)
        )
    return Rs


def _check_retractable(op: str, name: str, R, method: str) -> None:
    """TypeError/ValueError naming ``name`` (or method) unless R can be retracted in place."""
    if not isinstance(R, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(R).__name__}")
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {list(METHODS)}, got {method!r}")
    if R.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {name} must be {SUPPORTED_NAMES}, got {R.dtype}")
    if R.dim() not in (2, 3) or not 1 <= R.shape[-2] <= R.shape[-1]:
        raise ValueError(
            f"{op}: {name} must have shape (r, d) or (k, r, d) with 1 <= r <= d, "
            f"got {tuple(R.shape)}"
        )
    if _shares_memory(R):
        raise ValueError(
            f"{op}: {name} has elements that share memory (expanded or overlapping as_strided), "
            f"so its matrices cannot be orthonormalized in place; pass {name}.clone()"
        )


def _retract_in_place(Rs: list[torch.Tensor], run) -> None:
    """``run(targets)`` (a raw op call) on contiguous targets for Rs, then make the results R's:
    copied back where R is not contiguous, else R's version bumped."""
    with torch.no_grad():
        targets = [R if R.is_contiguous() else R.contiguous() for R in Rs]
        run(targets)  # the kernels find NaN/Inf in the pass they start with (no extra pass)
        for R, target in zip(Rs, targets, strict=True):
            if target is not R:
                R.copy_(target)  # (bumps R's version itself)
            else:
                # The raw op writes through the data pointer: mark R modified, so that autograd
                # refuses a backward through a graph that saved R's old values.
                torch.autograd.graph.increment_version(R)


def project_tangent(R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Riemannian gradient on the Stiefel manifold: G − sym(G Rᵀ) R, sym(A) = (A + Aᵀ)/2.

    Args:
        R: (r, d) or (k, r, d) with orthonormal rows.
        G: gradient of R's shape and device.

    Returns:
        The projection of G onto the tangent space at R, G's shape and dtype (computed in float32 or
        float64).
    """
    for name, t in (("R", R), ("G", G)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"project_tangent: {name} must be a floating-point tensor, got {kind}")
    if R.shape != G.shape:
        raise ValueError(
            f"project_tangent: G must have R's shape {tuple(R.shape)}, got {tuple(G.shape)}"
        )
    acc = accumulation_dtype(G.dtype)
    Ra, Ga = R.to(acc), G.to(acc)
    A = Ga @ Ra.transpose(-1, -2)
    return (Ga - 0.5 * (A + A.transpose(-1, -2)) @ Ra).to(G.dtype)


_STIEFEL_FLAG = "reft_stiefel"


class StiefelParameter(torch.nn.Parameter):
    """A parameter (r, d) whose rows :func:`keep_orthonormal` keeps orthonormal by default.

    The mark survives ``copy.deepcopy`` (which keeps the class) and pickling (which keeps the
    attribute set here); the modules create their R as one.
    """

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = True):
        param = super().__new__(cls, data, requires_grad)
        setattr(param, _STIEFEL_FLAG, True)
        _install_auto_hook()
        return param


def mark_stiefel(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Mark an existing ``param`` (r, d) for :func:`keep_orthonormal`'s default selection and for
    the automatic retraction after each optimizer step (:class:`auto_retraction`).

    The mark is an attribute: pickling keeps it, ``copy.deepcopy`` does not (use
    :class:`StiefelParameter` for parameters that get copied).
    """
    setattr(param, _STIEFEL_FLAG, True)
    _install_auto_hook()
    return param


def is_stiefel(param: torch.Tensor) -> bool:
    """Whether ``param`` was marked with :func:`mark_stiefel` (the modules mark their R)."""
    return bool(getattr(param, _STIEFEL_FLAG, False))


class OrthonormalityHandle:
    """Returned by :func:`keep_orthonormal`; ``remove()`` detaches its optimizer hooks.

    ``params``: the parameters retracted at the next step (with the default selection, the marked
    parameters the optimizer holds at that moment, groups added later included).
    """

    def __init__(self, handles: list, params, optimizer: torch.optim.Optimizer):
        self._handles = handles
        self._params = params
        self._optimizer = weakref.ref(optimizer)
        _EXPLICIT[optimizer] = _EXPLICIT.get(optimizer, 0) + 1

    @property
    def params(self) -> list[torch.Tensor]:
        return self._params()

    def remove(self) -> None:
        """Detach the hooks; the optimizer is then retracted automatically again (if enabled)."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        optimizer = self._optimizer()
        if optimizer is not None:
            _EXPLICIT[optimizer] -= 1
            if not _EXPLICIT[optimizer]:
                del _EXPLICIT[optimizer]


def keep_orthonormal(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor] | None = None,
    method: str = "cholqr2",
    project_grad: bool = False,
) -> OrthonormalityHandle:
    """Retract ``params`` onto orthonormal rows after every ``optimizer.step()``.

    Args:
        optimizer: any torch optimizer (weight decay, GradScaler and gradient accumulation work: the
            hooks run inside ``step()``, which GradScaler skips on overflow).
        params: (r, d) parameters managed by ``optimizer``; default: every parameter of its groups
            marked by :func:`mark_stiefel` (the R of :class:`reft_ext.LoReFT` and friends).
        method: retraction method of :func:`retract_`.
        project_grad: first replace each gradient G by the Riemannian gradient
            :func:`project_tangent` (R, G), before the step.

    Returns:
        A handle whose ``remove()`` detaches the hooks. All parameters are retracted in one
        :func:`retract_list_` call per dtype and device. While the handle is attached the
        automatic retraction (:class:`auto_retraction`) skips this optimizer.
    """
    if method not in METHODS:
        raise ValueError(f"keep_orthonormal: method must be one of {list(METHODS)}, got {method!r}")
    if params is not None and (
        isinstance(params, torch.Tensor) or not all(isinstance(p, torch.Tensor) for p in params)
    ):
        raise TypeError(
            "keep_orthonormal: params must be a list of parameters, got "
            f"{type(params).__name__} (wrap a single parameter in a list)"
        )

    def marked() -> list[torch.Tensor]:
        # Read at every step, so that groups added later (add_param_group) and parameters swapped
        # into a group are retracted too.
        return [p for group in optimizer.param_groups for p in group["params"] if is_stiefel(p)]

    managed = [p for group in optimizer.param_groups for p in group["params"]]
    if params is None:
        current = marked
        if not marked():
            raise ValueError(
                "keep_orthonormal: the optimizer has no parameter marked by mark_stiefel "
                "(pass params=[...] explicitly)"
            )
    else:
        params = list(params)

        def current() -> list[torch.Tensor]:
            return params

    managed_ids = {id(p) for p in managed}
    for p in current():
        if id(p) not in managed_ids:
            raise ValueError(
                f"keep_orthonormal: a parameter of shape {tuple(p.shape)} is not in the optimizer"
            )
        if p.dim() != 2 or not 1 <= p.shape[0] <= p.shape[1]:
            raise ValueError(
                f"keep_orthonormal: params must be (r, d) with 1 <= r <= d, got {tuple(p.shape)}"
            )
    retract_list_([p.data for p in current()], method)  # start on the manifold

    def after_step(_optimizer, _args, _kwargs):
        retract_list_([p.data for p in current()], method)

    handles = [optimizer.register_step_post_hook(after_step)]
    if project_grad:

        def before_step(_optimizer, _args, _kwargs):
            with torch.no_grad():
                for p in current():
                    if p.grad is not None:
                        p.grad.copy_(project_tangent(p, p.grad))

        handles.insert(0, optimizer.register_step_pre_hook(before_step))
    return OrthonormalityHandle(handles, current, optimizer)


# ---- automatic retraction after any optimizer's step ------------------------------------------
_EXPLICIT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> handles attached
_MARKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> (groups, params)
_AUTO = {"enabled": True, "method": "cholqr2"}
_AUTO_HOOK: list = []  # the one global hook's handle, once a marked parameter exists


class auto_retraction:
    """Switch the automatic retraction of marked parameters after every optimizer step.

    Usable as a call (``reft_ext.auto_retraction(False)``, which holds until changed) or as a
    context manager, which restores the previous setting on exit (like
    ``torch.set_grad_enabled``). The process-wide default is on, method ``"cholqr2"``.

    Args:
        enabled: retract after each ``step()`` of any optimizer that holds parameters marked by
            :class:`StiefelParameter` / :func:`mark_stiefel` (and is not managed by
            :func:`keep_orthonormal`).
        method: the retraction method (:data:`METHODS`).

    Covers every ``torch.optim.Optimizer`` subclass, including the ones built inside
    ``transformers.Trainer``, pyreft's trainers and accelerate (whose wrapper calls the torch
    optimizer's ``step``); a GradScaler step skipped on overflow retracts nothing (it updated
    nothing). Not covered: updates outside an optimizer (``p.data -= ...``: call
    :func:`retract_list_` yourself) and optimizers that step flattened copies of the parameters
    (DeepSpeed ZeRO, whose float32 masters would overwrite a retracted R at the next step: use
    :func:`reft_ext.distributed.zero_callback` or :func:`reft_ext.distributed.retract_zero_`).
    """

    def __init__(self, enabled: bool = True, method: str = "cholqr2"):
        if not isinstance(enabled, bool):
            raise TypeError(f"auto_retraction: enabled must be a bool, got {enabled!r}")
        if method not in METHODS:
            raise ValueError(
                f"auto_retraction: method must be one of {list(METHODS)}, got {method!r}"
            )
        self._previous = dict(_AUTO)
        _AUTO.update(enabled=enabled, method=method)

    def __enter__(self) -> auto_retraction:
        return self

    def __exit__(self, *exc) -> None:
        _AUTO.update(self._previous)

    @staticmethod
    def is_enabled() -> bool:
        """Whether the automatic retraction is on now."""
        return _AUTO["enabled"]


def _install_auto_hook() -> None:
    # Installed when the first marked parameter is made: a process that never builds one gets no
    # global hook at all.
    if not _AUTO_HOOK:
        _AUTO_HOOK.append(register_optimizer_step_post_hook(_retract_after_step))


def _marked_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The marked parameters of ``optimizer``, cached per optimizer until its groups change
    (``add_param_group``, a group's list replaced or resized), so a large optimizer pays one
    scan, not one per step."""
    groups = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
    cached = _MARKED.get(optimizer)
    if cached is None or cached[0] != groups:
        marked = [p for g in optimizer.param_groups for p in g["params"] if is_stiefel(p)]
        for p in marked:
            if type(p.data).__name__ == "DTensor":
                raise ValueError(
                    "automatic retraction: a marked parameter (R, shape "
                    f"{tuple(p.shape)}) is sharded (a DTensor), and retracting a shard of R "
                    "is not a retraction of R: keep the interventions replicated (shard only the "
                    "base model: reft_ext.distributed.shard_base_model)"
                )
        cached = (groups, marked)
        _MARKED[optimizer] = cached
    return cached[1]


def _retract_after_step(optimizer, _args, _kwargs) -> None:
    if not _AUTO["enabled"] or optimizer in _EXPLICIT:
        return
    marked = _marked_params(optimizer)
    if marked:
        retract_list_([p.data for p in marked], _AUTO["method"])
