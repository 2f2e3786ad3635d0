"""pytest-benchmark view of the op cases: ``pytest bench/ --benchmark-only``.

Same cases and providers as ``python -m reft_ext.bench`` (reft_ext.bench.cases); groups are one
case each, so pytest-benchmark's table compares fused, naive, pyreft (where pyreft is importable)
and copy side by side. Each benchmark's ``extra_info`` carries the provider's peak memory
(``peak_bytes``, one untimed call).
"""

import pytest
import torch

from reft_ext.bench.cases import (
    ROOFLINE,
    OpCase,
    input_sets_for,
    make_inputs,
    op_providers,
    provider_call,
)
from reft_ext.bench.memory import peak_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = OpCase.grid(quick=False)


@pytest.mark.parametrize("provider", op_providers())
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_loreft(benchmark, case, provider):
    if provider == ROOFLINE and case.mode != "forward":
        pytest.skip("the copy_ roofline is reported with the forward cases")
    inputs = make_inputs(case, DEVICE, input_sets_for(case))
    call = provider_call(case, provider, inputs)
    benchmark.group = case.name
    benchmark.extra_info.update(case.params)
    benchmark.extra_info["device"] = str(DEVICE)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["peak_bytes"] = peak_bytes(call, DEVICE)  # one untimed call
    if DEVICE.type == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name(DEVICE)

        def synchronized():
            call()
            torch.cuda.synchronize(DEVICE)

        benchmark(synchronized)
    else:
        benchmark(call)
