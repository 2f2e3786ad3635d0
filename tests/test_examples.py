"""The README's Hugging Face quickstart (examples/hf_quickstart.py) runs and does what it says."""

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
