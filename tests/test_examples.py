"""The README's examples run and do what they say: the Hugging Face quickstart
(examples/hf_quickstart.py) and the pyreft parity study (examples/pyreft_parity/run.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_quickstart.py"


def test_hf_quickstart_trains_generates_and_reloads():
    """Losses fall over the 5 steps and the reloaded interventions generate the same tokens."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, check=True
    )
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 5
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert "reloaded generates the same: True" in result.stdout


PARITY = EXAMPLE.parent / "pyreft_parity" / "run.py"


def test_pyreft_parity_study_runs_every_variant(tmp_path):
    """A short run of the parity study: every variant trains (the loss falls from its start), keeps
    R orthonormal, and the results, table and plot are written."""
    subprocess.run(
        [sys.executable, str(PARITY), "--seeds", "1", "--steps", "12", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted(r["variant"] for r in runs) == sorted(
        ["parametrization", "householder", "retraction", "riemannian"]
    )
    for run in runs:
        assert sum(run["losses"][-3:]) < sum(run["losses"][:3]), run["variant"]
        assert run["orth_error"] < 1e-5
    assert (tmp_path / "table.md").read_text().count("\n") == 6
