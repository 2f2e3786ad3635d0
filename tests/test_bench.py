"""The benchmark suite's own machinery: peak-memory measurement, the PNG plot and the CLI."""

import json
import sys

import pytest
import torch

from reft_ext.bench.__main__ import format_table
from reft_ext.bench.__main__ import main as bench_main
from reft_ext.bench.cases import op_providers, pyreft_module, pyreft_version
from reft_ext.bench.memory import peak_bytes
from reft_ext.bench.plot import main as plot_main
from reft_ext.bench.plot import save_plot

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


def _results(device: str) -> dict:
    rows = [
        {
            "mode": mode,
            "N": N,
            "d": 2048,
            "r": 4,
            "dtype": dtype,
            "speedup_vs_naive": 1.0 + N / 8192,
            "fused_over_copy": 1.5,
        }
        for mode in ("forward", "forward_backward")
        for dtype in ("float32", "bfloat16")
        for N in (256, 8192)
    ]
    machine = {"device": device, "gpu": "GPU" if device == "cuda" else None, "cpu": "CPU"}
    return {"machine": machine | {"threads": 1, "torch": "x", "date": "today"}, "ops": rows}


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_a_png_with_a_bandwidth_panel_on_cuda(tmp_path):
    pytest.importorskip("matplotlib")
    assert save_plot(_results("cpu"), tmp_path / "cpu.png")
    assert save_plot(_results("cuda"), tmp_path / "cuda.png")
    cpu_width, cpu_height = _png_size(tmp_path / "cpu.png")
    cuda_width, _ = _png_size(tmp_path / "cuda.png")
    assert cpu_width > cpu_height > 100
    assert cuda_width > cpu_width  # the third panel: fraction of copy_ bandwidth


def test_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert not save_plot(_results("cpu"), tmp_path / "bench.png")
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

    results = json.loads((out / "results.json").read_text())
    (op,) = results["ops"]
    assert set(op["peak_bytes"]) == {"fused", "naive", "copy"}
    assert op["peak_bytes"]["fused"] >= 256 * 2048 * 4  # the (N, d) float32 output
    assert op["peak_bytes"]["copy"] < 1024  # writes into a preallocated tensor
    (retraction,) = results["retraction"]
    assert set(retraction["peak_bytes"]) == {"fused", "torch_qr", "parametrization"}
    (hook,) = results["hook"]
    assert set(hook["peak_bytes"]) == {"none", "reft_ext", "clone"}
    assert results["train_step"] is None  # filtered out by --only
    assert "peak MiB (fused / naive / copy)" in (out / "table.md").read_text()
    assert _png_size(out / "bench.png")[0] > 0

    assert plot_main([str(out / "results.json"), str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes()[:8] == PNG_SIGNATURE


def test_pyreft_provider_is_absent_where_pyreft_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyreft", None)  # import pyreft raises ImportError
    pyreft_module.cache_clear()
    try:
        assert op_providers() == ("fused", "naive", "copy") == op_providers(optional=False)
        assert pyreft_version() is None
    finally:
        pyreft_module.cache_clear()


def _op_row(providers: tuple[str, ...]) -> dict:
    timing = {"median": 2e-3, "q1": 1e-3, "q3": 3e-3, "samples": 3}
    row = {"mode": "forward", "N": 256, "d": 2048, "r": 4, "dtype": "float32"}
    row |= {p: timing | {"median": 1e-3 * (i + 1)} for i, p in enumerate(providers)}
    row["peak_bytes"] = {p: MiB * (i + 1) for i, p in enumerate(providers)}
    row |= {f"speedup_vs_{p}": float(i + 1) for i, p in enumerate(providers)}
    return row | {"fused_over_copy": 1.5}


def test_op_table_has_a_column_per_measured_provider():
    base = format_table([_op_row(("fused", "naive", "copy"))]).splitlines()
    assert base[0] == (
        "| mode | N | d | r | dtype | fused ms | naive ms | copy ms | naive/fused | fused/copy "
        "| peak MiB (fused / naive / copy) |"
    )
    assert base[2].endswith("| 1.000 | 2.000 | 3.000 | 2.00x | 1.50 | 1.0 / 2.0 / 3.0 |")
    assert format_table([]).splitlines()[0] == base[0]

    extra = format_table([_op_row(("fused", "naive", "pyreft", "copy"))]).splitlines()
    assert extra[0] == (
        "| mode | N | d | r | dtype | fused ms | naive ms | pyreft ms | copy ms | naive/fused "
        "| pyreft/fused | fused/copy | peak MiB (fused / naive / pyreft / copy) |"
    )
    assert all(line.count("|") == extra[0].count("|") for line in extra)
    assert extra[2].endswith("| 3.000 | 4.000 | 2.00x | 3.00x | 1.50 | 1.0 / 2.0 / 3.0 / 4.0 |")
