"""The dtypes the kernels take and the accumulation rule, the Python side's one copy of each
(the C++ side's is ``csrc/lowrank_edit.h`` and ``csrc/lowrank_edit_checks.h``)."""

from __future__ import annotations

import torch

#: Row dtypes of the fused edit and of the retraction, most precise first.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
)

#: How SUPPORTED_DTYPES reads in an error message.
SUPPORTED_NAMES = "float64, float32, bfloat16 or float16"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in for rows of ``dtype``: float64 or else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
