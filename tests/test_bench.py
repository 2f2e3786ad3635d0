"""The benchmark suite's own machinery: peak-memory measurement, the PNG plot and the CLI."""

import json
import sys

import pytest
import torch

from reft_ext.bench.__main__ import format_tables
from reft_ext.bench.__main__ import main as bench_main
from reft_ext.bench.cases import (
    HookCase,
    OpCase,
    PyreftStepCase,
    TrainStepCase,
    op_providers,
    pyreft_module,
    pyreft_version,
)
from reft_ext.bench.memory import peak_bytes
from reft_ext.bench.plot import main as plot_main
from reft_ext.bench.plot import save_plot
from reft_ext.bench.record import Measurement, load_results
from reft_ext.bench.table import markdown_table, suite_table

MiB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_peak_bytes_of_a_known_allocation(device):
    assert peak_bytes(lambda: torch.empty(1 << 20, device=device), device) >= 4 * MiB


def test_peak_bytes_of_a_call_that_allocates_nothing(device):
    assert peak_bytes(lambda: None, device) == 0


def test_peak_bytes_sees_a_freed_temporary(device):
    def temporary_then_small():
        big = torch.ones(1 << 20, device=device)
        del big
        return torch.empty(16, device=device)

    assert 4 * MiB <= peak_bytes(temporary_then_small, device) < 5 * MiB


def test_peak_bytes_names_a_bad_device():
    with pytest.raises(ValueError, match="device"):
        peak_bytes(lambda: None, torch.device("meta"))


def _measurement(suite: str, params: dict, provider: str, median: float, peak: int = 0):
    name = "-".join([suite, *(v if isinstance(v, str) else f"{k}{v}" for k, v in params.items())])
    return Measurement(
        suite, name, params, provider, "time", "s", median, 0.9 * median, 1.1 * median, 3, peak
    )


def _op_run(device: str) -> tuple[dict, list[Measurement]]:
    """A made-up op run: fused, naive and copy for 8 cases (speedup 1 + N / 8192)."""
    measurements = []
    for mode in ("forward", "forward_backward"):
        for dtype in ("float32", "bfloat16"):
            for N in (256, 8192):
                params = {"mode": mode, "N": N, "d": 2048, "r": 4, "dtype": dtype}
                for provider, median in (("fused", 1e-3), ("naive", 1e-3 * (1 + N / 8192))):
                    measurements.append(_measurement("op", params, provider, median))
                measurements.append(_measurement("op", params, "copy", 0.7e-3))
    machine = {"device": device, "gpu": "GPU" if device == "cuda" else None, "cpu": "CPU"}
    return machine | {"threads": 1, "torch": "x", "date": "today"}, measurements


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_a_png_with_a_bandwidth_panel_on_cuda(tmp_path):
    pytest.importorskip("matplotlib")
    assert save_plot(*_op_run("cpu"), tmp_path / "cpu.png")
    assert save_plot(*_op_run("cuda"), tmp_path / "cuda.png")
    cpu_width, cpu_height = _png_size(tmp_path / "cpu.png")
    cuda_width, _ = _png_size(tmp_path / "cuda.png")
    assert cpu_width > cpu_height > 100
    assert cuda_width > cpu_width  # the third panel: fraction of copy_ bandwidth


def test_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert not save_plot(*_op_run("cpu"), tmp_path / "bench.png")
    assert not (tmp_path / "bench.png").exists()
    assert "pip install matplotlib" in capsys.readouterr().out


@pytest.fixture
def _restore_threads():
    """The CLI sets torch's thread count for the whole process; later tests get it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_writes_memory_fields_table_and_plot(tmp_path, _restore_threads):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    only = ["forward-N256-d2048-r4-float32", "retraction-k1-", "hook-B2-T512-P2-"]
    # One thread, as the benchmark runs by default: a second one fighting a busy core makes the
    # parametrization baseline ten times slower.
    args = ["--quick", "--repeats", "3", "--threads", "1", "--out", str(out)]
    assert bench_main(args + [a for text in only for a in ("--only", text)]) == 0

    machine, measurements = load_results(out / "results.json")
    assert machine["threads"] == 1
    providers = {}
    for m in measurements:
        providers.setdefault(m.case, []).append(m.provider)
        assert m.metric == "time" and m.unit == "s" and m.samples >= 3
        assert 0 < m.q1 <= m.value <= m.q3
    assert providers == {
        "op-forward-N256-d2048-r4-float32": ["fused", "naive", "copy"],
        "retraction-k1-d2048-r8": [
            "fused",
            "keep_orthonormal",
            "bare_step",
            "torch_qr",
            "parametrization",
            "householder",
        ],
        "hook-B2-T512-P2-d2048-r4": ["none", "reft_ext", "clone"],
    }  # the train step was filtered out by --only
    peaks = {(m.case, m.provider): m.peak_bytes for m in measurements}
    assert peaks["op-forward-N256-d2048-r4-float32", "fused"] >= 256 * 2048 * 4  # the output
    assert peaks["op-forward-N256-d2048-r4-float32", "copy"] < 1024  # a preallocated target
    table = (out / "table.md").read_text()
    assert table == format_tables(measurements) + "\n"
    assert "peak MiB (fused / naive / copy)" in table
    assert "| torch_qr/fused | torch_qr/keep_orthonormal | torch_qr/post-step |" in table
    assert _png_size(out / "bench.png")[0] > 0

    assert plot_main([str(out / "results.json"), str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG_SIGNATURE


def test_post_step_column_divides_by_the_step_minus_a_bare_step():
    from reft_ext.bench.cases import RetractionCase

    (column,) = [c for c in RetractionCase.columns if c.label == "torch_qr/post-step"]
    ratio = column.value({"torch_qr": 2e-3, "keep_orthonormal": 1.5e-3, "bare_step": 1e-3})
    assert ratio == pytest.approx(4.0)
    # A bare step no cheaper than the managed one (noise): no ratio rather than a negative one.
    assert column.value({"torch_qr": 2e-3, "keep_orthonormal": 1e-3, "bare_step": 1e-3}) is None


def test_load_results_names_a_file_in_another_format(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine": {}, "ops": []}))
    with pytest.raises(ValueError, match=r"results\.json.*'measurements'"):
        load_results(path)


def test_pyreft_provider_is_absent_where_pyreft_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyreft", None)  # import pyreft raises ImportError
    pyreft_module.cache_clear()
    try:
        assert op_providers() == ("fused", "naive", "copy") == op_providers(optional=False)
        assert pyreft_version() is None
    finally:
        pyreft_module.cache_clear()


def test_markdown_table_rejects_a_row_of_the_wrong_length():
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    with pytest.raises(ValueError, match=r"rows\[1\] has 1 cells, expected 2"):
        markdown_table(["a", "b"], [[1, 2], [3]])


def test_op_table_has_a_column_per_measured_provider():
    params = {"mode": "forward", "N": 256, "d": 2048, "r": 4, "dtype": "float32"}
    base = [
        _measurement("op", params, provider, 1e-3 * (i + 1), MiB * (i + 1))
        for i, provider in enumerate(("fused", "naive", "copy"))
    ]
    assert suite_table(base, "op", OpCase.columns).splitlines() == [
        "| mode | N | d | r | dtype | fused ms | naive ms | copy ms | naive/fused | fused/copy "
        "| peak MiB (fused / naive / copy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| forward | 256 | 2048 | 4 | float32 | 1.000 | 2.000 | 3.000 | 2.00x | 0.33x "
        "| 1.0 / 2.0 / 3.0 |",
    ]
    assert suite_table([], "op", OpCase.columns) == ""

    # pyreft measured in the second case only: its columns appear, "-" where it is missing.
    second = params | {"N": 8192}
    extra = [
        _measurement("op", second, provider, 1e-3 * (i + 1), MiB * (i + 1))
        for i, provider in enumerate(("fused", "naive", "pyreft", "copy"))
    ]
    lines = suite_table(base + extra, "op", OpCase.columns).splitlines()
    assert lines[0] == (
        "| mode | N | d | r | dtype | fused ms | naive ms | copy ms | pyreft ms | naive/fused "
        "| pyreft/fused | fused/copy | peak MiB (fused / naive / copy / pyreft) |"
    )
    assert lines[2] == (
        "| forward | 256 | 2048 | 4 | float32 | 1.000 | 2.000 | 3.000 | - | 2.00x | - | 0.33x "
        "| 1.0 / 2.0 / 3.0 / - |"
    )
    assert lines[3] == (
        "| forward | 8192 | 2048 | 4 | float32 | 1.000 | 2.000 | 4.000 | 3.000 | 2.00x | 3.00x "
        "| 0.25x | 1.0 / 2.0 / 4.0 / 3.0 |"
    )


def test_hook_and_train_step_tables_derive_added_time_and_overhead():
    hook = {"B": 2, "T": 512, "P": 2, "d": 2048, "r": 4}
    medians = {"none": 10e-3, "reft_ext": 12e-3, "clone": 18e-3}
    rows = [_measurement("hook", hook, p, v) for p, v in medians.items()]
    assert suite_table(rows, "hook", HookCase.columns).splitlines()[2] == (
        "| 2 | 512 | 2 | 2048 | 4 | 10.00 | 12.00 | 18.00 | 2.000 | 8.000 | 4.0x "
        "| 0.0 / 0.0 / 0.0 |"
    )
    # reft_ext adding nothing (noise) leaves the ratio undefined, not infinite.
    rows = [_measurement("hook", hook, p, v) for p, v in (medians | {"reft_ext": 9e-3}).items()]
    assert suite_table(rows, "hook", HookCase.columns).splitlines()[2].split(" | ")[-2] == "-"

    step = {"B": 2, "T": 256, "d": 512, "layers": 4}
    medians = {"frozen": 0.2, "reft_ext": 0.21, "naive": 0.3}
    rows = [_measurement("train-step", step, p, v) for p, v in medians.items()]
    assert suite_table(rows, "train-step", TrainStepCase.columns).splitlines()[2] == (
        "| 2 | 256 | 512 | 4 | 200.0 | 210.0 | 300.0 | +5.0% | +50.0% | 0.0 / 0.0 / 0.0 |"
    )


def test_pyreft_step_table_derives_the_overhead_ratio():
    """The pyreft-step table: each provider's overhead above the frozen step and the swap's added
    time over pyreft's ("-" where pyreft adds nothing, noise)."""
    case = {"model": "d2048", "r": 8, "positions": "all", "B": 2, "T": 64}
    medians = {"frozen": 0.2, "pyreft": 0.28, "swap": 0.22}
    rows = [_measurement("pyreft-step", case, p, v) for p, v in medians.items()]
    assert suite_table(rows, "pyreft-step", PyreftStepCase.columns).splitlines()[2] == (
        "| d2048 | 8 | all | 2 | 64 | 200.0 | 280.0 | 220.0 | +40.0% | +10.0% | 0.25 "
        "| 0.0 / 0.0 / 0.0 |"
    )
    rows = [
        _measurement("pyreft-step", case, p, v) for p, v in (medians | {"pyreft": 0.19}).items()
    ]
    assert (
        suite_table(rows, "pyreft-step", PyreftStepCase.columns).splitlines()[2].split(" | ")[-2]
        == "-"
    )


def test_pyreft_step_suite_is_empty_without_pyreft(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyreft", None)
    pyreft_module.cache_clear()
    try:
        assert PyreftStepCase.grid(quick=True) == PyreftStepCase.grid(quick=False) == []
    finally:
        pyreft_module.cache_clear()


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_act_suite_providers_compute_the_same_edit(mode):
    """The act suite's fused and naive providers compute LoReFT with the activation (the same
    values and gradients in float32), and plain the edit without it."""
    from reft_ext.bench.act import ActCase

    calls = ActCase(mode, 64, 48, 3, "float32", "gelu").calls(torch.device("cpu"))
    # Each provider returns the output (forward) or the gradients of h, R, W, b: as a list.
    fused, naive, plain = (
        list(result) if mode == "forward_backward" else [result]
        for result in (calls[p]() for p in ("fused", "naive", "plain"))
    )
    for a, b in zip(fused, naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (fused[0] - plain[0]).abs().max() > 1e-3  # the activation changes the edit
