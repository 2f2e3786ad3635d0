"""Shared pieces of the fuzz suite: the example budget, the outcome tally and the oracle rules.

Budget: ``REFT_EXT_FUZZ_EXAMPLES`` examples per property (default 400, about 2,500 cases in all,
about a minute and a half on 2 cores; e.g. 5000 for a long run).
Runs are derandomized (the same cases every run) unless ``REFT_EXT_FUZZ_SEED`` is set, which
draws fresh ones from that seed.

Every generated case must end in one of two outcomes, tallied per category and printed at the end
of the test run (and written as JSON to ``REFT_EXT_FUZZ_REPORT`` when set):

- ``clear error``: TypeError/ValueError (RuntimeError from a raw op's C++ check) whose message names
  the argument at fault;
- ``right result``: equal to an independent float64 truth within the low-precision rule of
  flash-attention (error at most twice that of torch's own composite in the same precision, plus a
  rounding floor).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch
from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("REFT_EXT_FUZZ_EXAMPLES", "400"))
_SEED = os.environ.get("REFT_EXT_FUZZ_SEED")

settings.register_profile(
    "reft_ext",
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=_SEED is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("reft_ext")

#: (category, outcome) -> cases.
TALLY: Counter = Counter()

CLEAR, RIGHT = "clear error", "right result"

# Relative rounding floor per result dtype (of the largest magnitude of the truth).
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def record(category: str, outcome: str) -> None:
    TALLY[category, outcome] += 1


def assert_clear_error(error: BaseException, names: tuple[str, ...], category: str) -> None:
    """``error`` is a TypeError/ValueError/RuntimeError whose message names one of ``names``."""
    assert isinstance(error, (TypeError, ValueError, RuntimeError)), repr(error)
    message = str(error)
    pattern = r"\b(" + "|".join(re.escape(n) for n in names) + r")\b"
    assert re.search(pattern, message), f"the error names none of {names}: {message!r}"
    record(category, CLEAR)


def assert_right(out: torch.Tensor, truth: torch.Tensor, ours_like: torch.Tensor | None) -> None:
    """``out`` matches the float64 ``truth``: non-finite exactly where the truth (rounded to out's
    dtype) is, and elsewhere within 2 × the error of ``ours_like`` (torch's composite in the same
    precision; None: no composite) plus the dtype's rounding floor."""
    assert out.shape == truth.shape, (out.shape, truth.shape)
    rounded = truth.to(out.dtype).double()
    finite = torch.isfinite(rounded)
    got = out.detach().double()
    assert torch.equal(torch.isfinite(got), finite), "non-finite entries differ from the truth's"
    if not finite.any():
        return
    scale = truth[finite].abs().max().item()
    err = (got - truth)[finite].abs().max().item()
    allowed = FLOOR[out.dtype] * max(scale, 1e-300)
    if ours_like is not None:
        like = ours_like.detach().double()
        both = finite & torch.isfinite(like)
        if both.any():
            allowed += 2 * (like - truth)[both].abs().max().item()
    assert err <= allowed, f"error {err:.3e} > allowed {allowed:.3e} (scale {scale:.3e})"


def write_report() -> str:
    """The tally as a Markdown table (and JSON at REFT_EXT_FUZZ_REPORT)."""
    categories = sorted({c for c, _ in TALLY})
    rows = [
        (c, TALLY[c, CLEAR] + TALLY[c, RIGHT], TALLY[c, CLEAR], TALLY[c, RIGHT]) for c in categories
    ]
    path = os.environ.get("REFT_EXT_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(
                [dict(zip(("category", "cases", CLEAR, RIGHT), r, strict=True)) for r in rows], f
            )
    lines = ["| category | cases | clear errors | right results |", "|---|---|---|---|"]
    lines += [f"| {c} | {n} | {e} | {r} |" for c, n, e, r in rows]
    total = sum(r[1] for r in rows)
    return "\n".join(lines + [f"total: {total} cases"])
