"""Start the ranks of a distributed test as child processes and wait for them, with a time limit.

A ``file://`` rendezvous replaces torchrun's TCP store (which listens on every interface), and
GLOO_SOCKET_IFNAME=lo keeps gloo's connections on the loopback interface: nothing binds beyond
127.0.0.1. As torchrun does, the first rank that fails ends the run: the others get a grace
period to fail by themselves (a collective with a dead peer raises in gloo) and are then killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "worker.py"
ROOT = WORKER.parents[2]


@dataclass
class Rank:
    rank: int
    returncode: int | None  # None: killed after the time limit
    output: str


def run_ranks(
    mode: str, out_dir: Path, world: int = 2, timeout: float = 110.0, worker: Path = WORKER
) -> list[Rank]:
    """Run ``worker mode out_dir`` (default worker.py) on ``world`` ranks; returns each rank's
    exit and output."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rendezvous = out_dir / f"rendezvous-{mode}-{time.monotonic_ns()}"
    env_common = {
        **os.environ,
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "REFT_TEST_INIT": f"file://{rendezvous}",
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": "127.0.0.1",  # read by nothing that binds: the group is initialized first
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    logs = [open(out_dir / f"{mode}-rank{r}.log", "w+") for r in range(world)]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), mode, str(out_dir)],
            env=env_common | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + timeout
    grace_end = None
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if grace_end is None and any(p.poll() not in (None, 0) for p in procs):
            grace_end = time.monotonic() + 20.0  # a rank failed: the others must follow soon
        if grace_end is not None and time.monotonic() > grace_end:
            break
        time.sleep(0.1)
    killed = set()
    for r, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
            p.wait()
            killed.add(r)
    ranks = []
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        log.seek(0)
        ranks.append(Rank(r, None if r in killed else p.returncode, log.read()))
        log.close()
    return ranks


def successful_ranks(mode: str, out_dir: Path, worker: Path = WORKER) -> list[dict]:
    """Run ``mode`` on 2 ranks, assert both succeeded (else fail with the rank's output) and
    return each rank's saved results (``rank{r}.pt`` in ``out_dir``)."""
    import torch

    ranks = run_ranks(mode, out_dir, worker=worker)
    for rank in ranks:
        assert rank.returncode == 0, f"rank {rank.rank} of {mode}:\n{rank.output[-4000:]}"
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(len(ranks))]
