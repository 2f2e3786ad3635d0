"""Benchmark cases and providers, shared by ``python -m reft_ext.bench`` and ``bench/*.py``.

Each case class is one suite (one table): its fields are a point's parameters, ``grid`` lists the
points, ``calls`` builds one zero-argument callable per provider, ``columns`` derives the table's
ratios from the providers' medians. :data:`SUITES` lists them in running order.

The op suite (:class:`OpCase`) is one shape, dtype and mode (``forward`` or ``forward_backward``)
of the LoReFT op. Providers (:func:`op_providers`, in table order): ``fused`` (reft_ext.loreft),
``naive`` (reft_ext.reference.loreft, pyreft's composite), ``pyreft`` (pyreft's own
``LoreftIntervention`` module; only where pyreft is importable) and ``copy`` (``out.copy_(h)``, the
memory roofline of a pass that reads h and writes an output).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch

from .. import reference
from ..functional import loreft
from .act import ActCase
from .models import RANDOM_LLAMAS, random_llama
from .multi import MultiGenerateCase, MultiOpCase
from .record import Case
from .table import Column, format_ms, ratio

MODES = ("forward", "forward_backward")
PROVIDERS: dict[str, Callable[..., torch.Tensor]] = {"fused": loreft, "naive": reference.loreft}
ROOFLINE = "copy"


@functools.cache
def pyreft_module() -> ModuleType | None:
    """The ``pyreft`` package, or None where it is not importable (imported once, on first use).

    pyvene prints a note about nnsight to stdout when imported; it is swallowed here.
    """
    if importlib.util.find_spec("pyreft") is None:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import pyreft
    except ImportError:
        return None
    return pyreft


def pyreft_version() -> str | None:
    """pyreft's version where the ``pyreft`` provider is available, else None."""
    if pyreft_module() is None:
        return None
    try:
        return importlib.metadata.version("pyreft")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on the path
        return "unknown"


# Providers that exist only where their package is importable: name -> its package, or None.
OPTIONAL_PROVIDERS: dict[str, Callable[[], ModuleType | None]] = {"pyreft": pyreft_module}


def op_providers(optional: bool = True) -> tuple[str, ...]:
    """The op cases' providers in table order: fused, naive, the importable optional ones, copy.

    ``optional=False`` gives the ones that always exist (and imports nothing).
    """
    available = [p for p, find in OPTIONAL_PROVIDERS.items() if optional and find() is not None]
    return (*PROVIDERS, *available, ROOFLINE)


@dataclass(frozen=True)
class OpCase(Case):
    """The LoReFT op in ``mode`` on h (N, d) of ``dtype``, rank r, float32 parameters."""

    suite: ClassVar[str] = "op"
    title: ClassVar[str] = "LoReFT op: fused vs naive composite (and pyreft), copy_ roofline"
    columns: ClassVar[tuple[Column, ...]] = (
        ratio("naive", "fused"),
        ratio("pyreft", "fused"),
        ratio("fused", ROOFLINE),
    )

    mode: str
    N: int
    d: int
    r: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def grid(cls, quick: bool) -> list[OpCase]:
        """quick: the headline shape (N=8192, d=2048, r=4) and one small-N shape; else
        N ∈ {256, 8192} × d ∈ {768, 2048, 4096} × r ∈ {4, 16}; float32 and bfloat16, both modes."""
        if quick:
            shapes = [(8192, 2048, 4), (256, 2048, 4)]
        else:
            shapes = list(itertools.product((256, 8192), (768, 2048, 4096), (4, 16)))
        return [
            cls(mode, N, d, r, dtype)
            for (N, d, r), dtype, mode in itertools.product(shapes, ("float32", "bfloat16"), MODES)
        ]

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        """One callable per provider of :func:`op_providers`, sharing the input sets."""
        inputs = make_inputs(self, device, input_sets_for(self))
        return {p: provider_call(self, p, inputs) for p in op_providers()}


@dataclass
class OpInputs:
    """Inputs of one case: hidden states, LoReFT parameters (float32) and an upstream gradient."""

    h: torch.Tensor
    R: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    grad_out: torch.Tensor
    copy_target: torch.Tensor


def make_inputs(case: OpCase, device: torch.device, sets: int = 1) -> list[OpInputs]:
    """``sets`` independent input sets (rotate through them when they fit in cache)."""
    result = []
    for _ in range(sets):
        h = torch.randn(case.N, case.d, device=device, dtype=case.torch_dtype)
        R = torch.linalg.qr(torch.randn(case.d, case.r, device=device))[0].T.contiguous()
        W = torch.randn(case.r, case.d, device=device) / case.d**0.5
        b = torch.randn(case.r, device=device)
        h.requires_grad_(case.mode == "forward_backward")
        for p in (R, W, b):
            p.requires_grad_(case.mode == "forward_backward")
        result.append(OpInputs(h, R, W, b, torch.randn_like(h), torch.empty_like(h)))
    return result


def input_sets_for(case: OpCase, cache_bytes: int = 64 << 20) -> int:
    """Rotate 4 input sets when one set's rows fit in ``cache_bytes``, else use one."""
    return 4 if case.N * case.d * torch.finfo(case.torch_dtype).bits // 8 * 3 <= cache_bytes else 1


def pyreft_intervention(
    R: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """pyreft's own ``LoreftIntervention`` holding R (r, d), W (r, d) and b (r,), on ``device``.

    Loaded the way pyreft loads a checkpoint (its ``load_state_dict``: W and b into the learned
    source ``Linear(d, r)``, R.T into the base of the orthogonally parametrized ``rotate_layer``
    (d, r)), so reading ``rotate_layer.weight`` recomputes the parametrization, as in pyreft.
    The learned source is in ``dtype`` (h's: pyreft's Linear does not cast its input), the rotate
    layer float32, as pyreft keeps it. pyreft's random initialisation draws from a forked RNG, so
    the benchmark's inputs are the same with or without pyreft installed.
    """
    pyreft = pyreft_module()
    if pyreft is None:
        raise ImportError("the pyreft provider needs pyreft (pip install pyreft)")
    r, d = R.shape
    state = {"weight": W.detach(), "bias": b.detach(), "rotate_layer": R.detach().T.contiguous()}
    with torch.random.fork_rng(devices=[]):
        module = pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=r, dtype=dtype)
        module.to(device).load_state_dict(state)
    return module


def provider_call(case: OpCase, provider: str, inputs: list[OpInputs]) -> Callable[[], object]:
    """A zero-argument callable running ``provider`` on the next input set each call.

    Forward cases return the output (computed under no_grad); forward+backward ones the gradients
    of h and of the parameters: R, W, b for the functional providers, the module's trainable
    parameters (``module.parameters()`` order) for ``pyreft``, one module per input set.
    """
    counter = itertools.count()

    if provider == ROOFLINE:

        def run_copy():
            x = inputs[next(counter) % len(inputs)]
            return x.copy_target.copy_(x.h.detach())

        return run_copy

    if provider == "pyreft":
        modules = [pyreft_intervention(x.R, x.W, x.b, case.torch_dtype, x.h.device) for x in inputs]
        trainable = [[p for p in m.parameters() if p.requires_grad] for m in modules]

        def run_pyreft():
            i = next(counter) % len(inputs)
            x, module = inputs[i], modules[i]
            if case.mode == "forward":
                with torch.no_grad():
                    return module(x.h)
            out = module(x.h)
            return torch.autograd.grad(out, (x.h, *trainable[i]), x.grad_out)

        return run_pyreft

    fn = PROVIDERS[provider]

    def run():
        x = inputs[next(counter) % len(inputs)]
        if case.mode == "forward":
            with torch.no_grad():
                return fn(x.h, x.R, x.W, x.b)
        out = fn(x.h, x.R, x.W, x.b)
        return torch.autograd.grad(out, (x.h, x.R, x.W, x.b), x.grad_out)

    return run


#: What needs a gradient in each GradSkipCase provider: (h, the parameters R, W, b).
GRAD_SKIP_PROVIDERS = {
    "all": (True, True),
    "frozen_h": (False, True),  # the lowest intervened block: h comes from frozen embeddings
    "frozen_params": (True, False),  # an adapter used as a fixed edit inside a larger graph
}


@dataclass(frozen=True)
class GradSkipCase(Case):
    """Fused LoReFT forward+backward on h (N, d) where not every input needs a gradient."""

    suite: ClassVar[str] = "grad-skip"
    title: ClassVar[str] = "Skipped gradients: fused forward+backward, frozen h or parameters"
    columns: ClassVar[tuple[Column, ...]] = tuple(
        ratio("all", p) for p in GRAD_SKIP_PROVIDERS if p != "all"
    )

    N: int = 8192
    d: int = 2048
    r: int = 4
    dtype: str = "float32"

    @classmethod
    def grid(cls, quick: bool) -> list[GradSkipCase]:
        """The one shape the issue asks for, quick or not: N=8192, d=2048, r=4, float32."""
        return [cls()]

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        return {p: grad_skip_call(self, p, device) for p in GRAD_SKIP_PROVIDERS}


def grad_skip_call(case: GradSkipCase, provider: str, device: torch.device):
    """A zero-argument callable: fused LoReFT forward, then backward into the inputs that need a
    gradient in ``provider`` (GRAD_SKIP_PROVIDERS); the op skips the others' work."""
    h_needs, params_need = GRAD_SKIP_PROVIDERS[provider]
    op_case = OpCase("forward_backward", case.N, case.d, case.r, case.dtype)
    (x,) = make_inputs(op_case, device)
    x.h.requires_grad_(h_needs)
    for p in (x.R, x.W, x.b):
        p.requires_grad_(params_need)
    wanted = [t for t in (x.h, x.R, x.W, x.b) if t.requires_grad]

    def run():
        return torch.autograd.grad(loreft(x.h, x.R, x.W, x.b), wanted, x.grad_out)

    return run


@dataclass(frozen=True)
class RetractionCase(Case):
    """Keeping k (r, d) float32 matrices orthonormal for one optimizer step."""

    suite: ClassVar[str] = "retraction"
    title: ClassVar[str] = (
        "Retraction: fused vs torch.linalg.qr loop (and pyreft's parametrization, also in its "
        "O(d·r²) householder form)"
    )
    columns: ClassVar[tuple[Column, ...]] = (
        ratio("torch_qr", "fused"),
        ratio("torch_qr", "keep_orthonormal"),
        Column(
            "torch_qr/post-step",
            ("torch_qr", "keep_orthonormal", "bare_step"),
            lambda m: _over_post_step(m, "torch_qr"),
            "{:.2f}x".format,
        ),
        ratio("parametrization", "fused"),
        ratio("parametrization", "householder"),
    )

    k: int
    d: int
    r: int

    @classmethod
    def grid(cls, quick: bool) -> list[RetractionCase]:
        """Single matrices against pyreft's parametrization, and the batched k = 32 case."""
        if quick:
            return [cls(1, 2048, 8), cls(32, 4096, 8)]
        singles = [cls(1, d, r) for d in (2048, 4096) for r in (4, 8, 32)]
        return singles + [cls(32, 4096, 8), cls(32, 4096, 32)]

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        """fused, keep_orthonormal, bare_step and torch_qr; for k = 1 also pyreft's
        parametrization (the slow baseline) and its O(d·r²) householder form."""
        providers = ["fused", "keep_orthonormal", "bare_step", "torch_qr"]
        providers += ["parametrization", "householder"] if self.k == 1 else []
        return {p: retraction_call(self, p, device) for p in providers}

    def timing(self, repeats: int) -> dict:
        """Half the samples (at least 5) and 2 warm-up calls: the parametrization is slow."""
        return {"repeats": max(5, repeats // 2), "warmup": 2}


def _over_post_step(m: dict[str, float], provider: str) -> float | None:
    """``provider``'s median ÷ keep_orthonormal's post-step cost (its step minus a bare step);
    undefined when the difference is not positive (noise larger than the retraction)."""
    post_step = m["keep_orthonormal"] - m["bare_step"]
    return m[provider] / post_step if post_step > 0 else None


def _sign_fixed_qr_(R: torch.Tensor) -> None:
    """R ← its orthonormal QR factor via torch.linalg.qr (LAPACK/cuSOLVER), one matrix."""
    Q, T = torch.linalg.qr(R.T)
    R.copy_((Q * torch.sign(torch.diagonal(T)).where(torch.diagonal(T) != 0, 1)).T)


def retraction_call(case: RetractionCase, provider: str, device: torch.device):
    """A zero-argument callable for ``provider``:

    - ``fused``: one reft_ext.retract_ call on the (k, r, d) batch (or the (r, d) matrix), default
      arguments;
    - ``keep_orthonormal``: an optimizer step without gradients on k separate (r, d) parameters
      under reft_ext.keep_orthonormal: torch's step machinery plus the post-step retraction;
    - ``bare_step``: the same step of an optimizer without it (plain parameters: nothing to
      retract), so ``keep_orthonormal − bare_step`` is the post-step cost;
    - ``torch_qr``: a loop of torch.linalg.qr retractions, one per matrix;
    - ``parametrization``: pyreft's way, torch's orthogonal parametrization of a (d, r) weight,
      forward and backward of one weight read, per matrix (k = 1 only: it is the slow baseline);
    - ``householder``: the same function in O(d·r²) (reft_ext.householder), forward and backward
      of one read of the (r, d) R (k = 1).
    """
    from ..retraction import retract_

    shape = (case.k, case.r, case.d) if case.k > 1 else (case.r, case.d)
    R = torch.randn(shape, device=device)
    if provider == "fused":
        return lambda: retract_(R)  # default arguments: the NaN/Inf check included
    if provider == "keep_orthonormal":
        from ..retraction import StiefelParameter, keep_orthonormal

        params = [StiefelParameter(m.clone()) for m in R.view(-1, case.r, case.d).unbind(0)]
        optimizer = torch.optim.SGD(params, lr=0.0)
        keep_orthonormal(optimizer)
        return optimizer.step  # no gradients: the step's machinery and the retraction
    if provider == "bare_step":
        params = [torch.nn.Parameter(m.clone()) for m in R.view(-1, case.r, case.d).unbind(0)]
        return torch.optim.SGD(params, lr=0.0).step
    if provider == "torch_qr":
        mats = list(R.view(-1, case.r, case.d).unbind(0))

        def loop():
            with torch.no_grad():
                for m in mats:
                    _sign_fixed_qr_(m)

        return loop
    if provider == "parametrization":
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.randn(case.d, case.r, device=device))
        torch.nn.utils.parametrizations.orthogonal(layer, "weight")

        def read():
            layer.weight.sum().backward()

        return read
    if provider == "householder":
        from ..householder import householder_orthogonal

        module = torch.nn.Module()
        module.R = torch.nn.Parameter(torch.linalg.qr(R.T)[0].T.contiguous())
        householder_orthogonal(module)

        def read_householder():
            module.R.sum().backward()

        return read_householder
    raise ValueError(f"unknown retraction provider {provider!r}")


def _added_ms(provider: str, base: str) -> Column:
    """What ``provider`` adds to ``base``, in ms."""
    return Column(f"+{provider} ms", (provider, base), lambda m: m[provider] - m[base], format_ms)


def _added_ratio(m: dict[str, float]) -> float | None:
    """The clone hook's added time ÷ reft_ext's (undefined when reft_ext adds nothing)."""
    ours, theirs = m["reft_ext"] - m["none"], m["clone"] - m["none"]
    return theirs / ours if ours > 0 else None


@dataclass(frozen=True)
class HookCase(Case):
    """Editing P of T positions of a block output (B, T, d) with LoReFT, forward+backward."""

    suite: ClassVar[str] = "hook"
    title: ClassVar[str] = "Hook: a block alone, + reft_ext's position-sparse hook, + a clone hook"
    columns: ClassVar[tuple[Column, ...]] = (
        _added_ms("reft_ext", "none"),
        _added_ms("clone", "none"),
        Column(
            "clone/reft_ext added", ("none", "reft_ext", "clone"), _added_ratio, "{:.1f}x".format
        ),
    )

    B: int
    T: int
    P: int
    d: int
    r: int = 4

    @classmethod
    def grid(cls, quick: bool) -> list[HookCase]:
        """T ∈ {512, 2048} (quick: 512), P = 2 (first and last token) and P = T, d = 2048."""
        lengths = (512,) if quick else (512, 2048)
        return [cls(2, T, P, 2048) for T in lengths for P in (2, T)]

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        return {p: hook_call(self, p, device) for p in ("none", "reft_ext", "clone")}


def hook_call(case: HookCase, provider: str, device: torch.device):
    """A zero-argument callable: the block's last op (x + bias) then the provider's hook.

    - ``none``: no intervention (the block alone);
    - ``reft_ext``: ReftModel's hook: gather the P rows, fused LoReFT, scatter back in place;
    - ``clone``: pyvene's way: clone the whole output, naive LoReFT on the P rows, write them in.
    Forward and backward (gradients of x and of the intervention parameters).
    """
    from ..hf.edit import edit_rows_
    from ..modules import LoReFT

    x = torch.randn(case.B, case.T, case.d, device=device, requires_grad=True)
    bias = torch.randn(case.d, device=device)
    grad = torch.randn_like(x)
    module = LoReFT(case.d, case.r, device=device)
    params = (x, module.R, module.W, module.b)
    if case.P == case.T:
        index = torch.arange(case.T, device=device).expand(case.B, -1)
    else:
        index = torch.tensor([0, case.T - 1], device=device).expand(case.B, -1)
    rows, cols = (index >= 0).nonzero(as_tuple=True)
    tokens = index[rows, cols]

    def run():
        hidden = x + bias
        if provider == "reft_ext":
            edit_rows_(hidden, index, module)
        elif provider == "clone":
            hidden = hidden.clone()
            hidden[rows, tokens] = reference.loreft(
                hidden[rows, tokens], module.R, module.W, module.b
            )
        elif provider != "none":
            raise ValueError(f"unknown hook provider {provider!r}")
        return torch.autograd.grad(hidden, params, grad, allow_unused=True)

    return run


def _overhead(provider: str, base: str) -> Column:
    """``provider``'s time over ``base``'s, as a percentage added."""
    return Column(
        f"{provider} overhead",
        (provider, base),
        lambda m: m[provider] / m[base] - 1,
        "{:+.1%}".format,
    )


@dataclass(frozen=True)
class TrainStepCase(Case):
    """One training step (forward+backward) of a tiny random Llama with LoReFT r = 4 at layers 1
    and 2, positions f1+l1."""

    suite: ClassVar[str] = "train-step"
    title: ClassVar[str] = "Training step of a tiny Llama: frozen, reft_ext, naive hooks"
    columns: ClassVar[tuple[Column, ...]] = (
        _overhead("reft_ext", "frozen"),
        _overhead("naive", "frozen"),
    )

    B: int = 2
    T: int = 256
    d: int = 512
    layers: int = 4

    @classmethod
    def grid(cls, quick: bool) -> list[TrainStepCase]:
        return [cls()]

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        """Raises ImportError where transformers (optional) is not installed."""
        return train_step_calls(self, device)


def train_step_calls(case: TrainStepCase, device: torch.device) -> dict:
    """Zero-argument callables per provider, all on one model with the same weights:

    - ``frozen``: the model's own forward+backward (gradient w.r.t. the input embeddings);
    - ``reft_ext``: ReftModel, LoReFT rank 4 at layers 1 and 2, positions f1+l1;
    - ``naive``: the same interventions as pyvene hooks: clone each block output, naive LoReFT on
      the selected rows, write them into the copy.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..hf import ReftConfig, get_reft_model, intervention_key
    from ..hf.blocks import block_hidden, find_blocks

    config = LlamaConfig(
        hidden_size=case.d,
        intermediate_size=2 * case.d,
        num_hidden_layers=case.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
    )
    model = LlamaForCausalLM(config).to(device)
    embeds = torch.randn(case.B, case.T, case.d, device=device, requires_grad=True)
    labels = torch.randint(0, 1000, (case.B, case.T), device=device)
    reft = get_reft_model(model, ReftConfig(layers=[1, 2], rank=4, positions="f1+l1"))
    trainable = [p for p in reft.parameters() if p.requires_grad]
    index = torch.tensor([0, case.T - 1], device=device).expand(case.B, -1)
    rows, cols = (index >= 0).nonzero(as_tuple=True)
    tokens = index[rows, cols]

    def clone_hook(module):
        def hook(_block, _args, output):
            hidden = block_hidden(output).clone()
            edited = reference.loreft(hidden[rows, tokens], module.R, module.W, module.b)
            hidden[rows, tokens] = edited
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def step(run):
        def call():
            loss = run().loss
            return torch.autograd.grad(loss, [embeds, *trainable], allow_unused=True)

        return call

    _, blocks = find_blocks(model)
    naive_handles = []

    def naive_run():
        with reft.disable_adapter():
            for layer in (1, 2):
                hook = clone_hook(reft.interventions[intervention_key(layer, "first")])
                naive_handles.append(blocks[layer].register_forward_hook(hook))
            try:
                return model(inputs_embeds=embeds, labels=labels)
            finally:
                while naive_handles:
                    naive_handles.pop().remove()

    def frozen_run():
        with reft.disable_adapter():
            return model(inputs_embeds=embeds, labels=labels)

    return {
        "frozen": step(frozen_run),
        "reft_ext": step(lambda: reft(inputs_embeds=embeds, labels=labels)),
        "naive": step(naive_run),
    }


def _overhead_ratio(m: dict[str, float]) -> float | None:
    """The swap's time above the frozen step over pyreft's (None when pyreft adds nothing)."""
    pyreft_added = m["pyreft"] - m["frozen"]
    return (m["swap"] - m["frozen"]) / pyreft_added if pyreft_added > 0 else None


@dataclass(frozen=True)
class PyreftStepCase(Case):
    """One pyreft training step (forward, backward, AdamW step) of a random Llama with LoReFT at
    its first 4 blocks, batch B × T tokens, editing ``positions`` (``f1+l1`` or ``all``)."""

    suite: ClassVar[str] = "pyreft-step"
    title: ClassVar[str] = (
        "pyreft training step: pyreft's LoreftIntervention vs after reft_ext's apply() swap"
    )
    columns: ClassVar[tuple[Column, ...]] = (
        _overhead("pyreft", "frozen"),
        _overhead("swap", "frozen"),
        Column("swap added / pyreft added", ("frozen", "pyreft", "swap"), _overhead_ratio,
               "{:.2f}".format),
    )  # fmt: skip

    model: str = "tiny"
    r: int = 4
    positions: str = "f1+l1"
    B: int = 2
    T: int = 64

    @classmethod
    def grid(cls, quick: bool) -> list[PyreftStepCase]:
        """Empty where pyreft is not importable."""
        if pyreft_module() is None:
            return []
        if quick:
            return [cls()]
        return [
            cls(model=m, r=r, positions=p)
            for m in RANDOM_LLAMAS
            for r in (4, 8)
            for p in ("f1+l1", "all")
        ]

    def calls(self, device: torch.device) -> dict[str, Callable[[], object]]:
        return pyreft_step_calls(self, device)


def pyreft_step_calls(case: PyreftStepCase, device: torch.device) -> dict:
    """Zero-argument callables per provider, on one model with the same weights and batch:

    - ``frozen``: the model's forward+backward down to block 0's output (the gradient of a zero
      added there: the interventions' backward depth, with nothing to update; a gradient of the
      input embeddings would also run block 0's backward, which the interventions do not need);
    - ``pyreft``: pyreft's ReftModel with its ``LoreftIntervention`` (float32) at blocks 0-3,
      forward with unit_locations, backward, AdamW step;
    - ``swap``: the same, built after ``reft_ext.integrations.pyreft.apply()`` (our drop-in).
    """
    from ..integrations.pyreft import apply

    pyreft = pyreft_module()
    model = random_llama(case.model, device)
    config = model.config
    d, layers = config.hidden_size, range(4)
    embeds = torch.randn(case.B, case.T, d, device=device)
    labels = torch.randint(0, config.vocab_size, (case.B, case.T), device=device)
    where = [0, case.T - 1] if case.positions == "f1+l1" else list(range(case.T))
    locations = {"sources->base": (None, [[where] * case.B] * len(layers))}

    def build():
        representations = [
            {
                "layer": layer,
                "component": "block_output",
                "low_rank_dimension": case.r,
                "intervention": pyreft.LoreftIntervention(
                    embed_dim=d, low_rank_dimension=case.r, dtype=torch.float32
                ),
            }
            for layer in layers
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=representations))
        reft.set_device(device)
        params = [p for p in reft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step():
            _, out = reft({"inputs_embeds": embeds}, unit_locations=locations, labels=labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step.reft_model = reft  # for inspection (tests)
        return step

    anchor = torch.zeros(d, device=device, requires_grad=True)

    def add_anchor(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + anchor, *output[1:])
        return output + anchor

    def frozen():
        handle = model.model.layers[0].register_forward_hook(add_anchor)
        try:
            loss = model(inputs_embeds=embeds, labels=labels).loss
        finally:
            handle.remove()
        return torch.autograd.grad(loss, anchor)

    theirs = build()
    with apply():
        ours = build()
    return {"frozen": frozen, "pyreft": theirs, "swap": ours}


#: Every suite, in running (and table) order.
SUITES: tuple[type[Case], ...] = (
    OpCase,
    GradSkipCase,
    RetractionCase,
    HookCase,
    TrainStepCase,
    PyreftStepCase,
    MultiOpCase,
    MultiGenerateCase,
    ActCase,
)
