"""DeepSpeed ZeRO stages 2 and 3 through ``transformers.Trainer(args=TrainingArguments(
deepspeed=...))``, 2 ranks on gloo (CPU), against the Trainer in one process on the union of the
ranks' batches (tests/distributed/common.py, as tests/test_distributed.py does for DDP).

The ranks are child processes (tests/distributed/launch.py: file rendezvous, gloo on the loopback
interface) running tests/distributed/deepspeed_worker.py. DS_ACCELERATOR=cpu makes DeepSpeed use
its CPU accelerator, whose communication backend is gloo when oneCCL's bindings are absent.

Skipped where deepspeed is not importable: the test extra leaves it out (it is large and
JIT-compiles an op at start); .ci/run installs deepspeed 0.19.8 into the venv after the main tests
and runs this file (README, "DeepSpeed ZeRO").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

import common  # noqa: E402
import launch  # noqa: E402
from truth import orth_error  # noqa: E402

import reft_ext  # noqa: E402

transformers = pytest.importorskip("transformers")
deepspeed = pytest.importorskip(
    "deepspeed", reason="deepspeed is not installed (the project's venv does not have it)"
)
from reft_ext.distributed import prepare_zero3, retract_zero_, zero_callback  # noqa: E402

pytestmark = pytest.mark.not_emulated  # CPU processes only: no kernel of the emulated suite

WORKER = Path(__file__).resolve().parent / "distributed" / "deepspeed_worker.py"


def launch_ds(mode: str, out: Path, monkeypatch) -> list[dict]:
    """Run ``mode`` of deepspeed_worker.py on 2 ranks with DeepSpeed's CPU accelerator; assert
    both succeeded; return each rank's saved results."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    return launch.successful_ranks(mode, out, worker=WORKER)


@pytest.fixture(scope="module")
def shm_op_built():
    """DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce op
    (deepspeed_shm_comm, under TORCH_EXTENSIONS_DIR) when it starts, on CPU too, even though
    training never uses it here (LOCAL_SIZE unset). The first build takes over a minute on 2
    cores: done once here, outside the ranks' time limit; later runs load the cached build."""
    build = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    env = os.environ | {"DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def single_process_trainer(tmp_path_factory):
    """transformers.Trainer in this process, no DeepSpeed, GLOBAL_BATCH rows per step (the
    automatic retraction retracts R after each step): interventions and logged losses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1)
    try:
        reft_model = common.make_reft_model()
        args = common.trainer_arguments(
            tmp_path_factory.mktemp("single"), common.GLOBAL_BATCH, save_steps=10 * common.STEPS
        )
        trainer = transformers.Trainer(
            model=reft_model, args=args, train_dataset=common.trainer_dataset()
        )
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return common.interventions(reft_model), losses
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("mode", "stage", "partitioned"),
    [("zero2", 2, False), ("zero3", 3, False), ("zero3-partitioned", 3, True)],
)
def test_zero_two_ranks_equal_one_process_trainer(
    tmp_path, monkeypatch, shm_op_built, single_process_trainer, mode, stage, partitioned
):
    """After 20 steps (Trainer's AdamW, weight decay 0.01) ZeRO-2 / ZeRO-3 on 2 ranks with 2 rows
    per rank and reft_ext.distributed.zero_callback() equal one process's Trainer with 4 rows
    per step (1e-5 relative, float32); the ranks agree bit for bit and R has orthonormal rows.
    zero3-partitioned also partitions the interventions themselves between the ranks."""
    results = launch_ds(mode, tmp_path, monkeypatch)
    want, want_losses = single_process_trainer
    first, second = (r["interventions"] for r in results)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    for rank in results:
        assert rank["stage"] == stage
        assert rank["R_partitioned"] == partitioned
        assert rank["R_class"] == "StiefelParameter"  # ZeRO kept the parameter's class
    assert common.max_rel_state(first, want) <= 1e-5
    assert results[0]["losses"] == pytest.approx(want_losses, rel=1e-5)
    for name, value in first.items():
        if name.endswith(".R"):
            assert orth_error(value) <= 1e-5, name


def test_zero2_without_the_callback_does_not_retract(tmp_path, monkeypatch, shm_op_built):
    """Without zero_callback() the automatic retraction does not reach R under ZeRO: DeepSpeed's
    optimizer steps flattened float32 partitions, which are not marked parameters. R leaves the
    Stiefel manifold (this is what the callback is for)."""
    results = launch_ds("zero2-no-callback", tmp_path, monkeypatch)
    errors = [orth_error(v) for k, v in results[0]["interventions"].items() if k.endswith(".R")]
    assert max(errors) > 1e-2  # seen: 0.42, 0.27, 0.004, 0.004


# ---- in one process ----------------------------------------------------------------------------


def test_helpers_without_a_zero_optimizer():
    reft_model = common.make_reft_model()
    with pytest.raises(TypeError, match="reft_model must be a reft_ext.ReftModel"):
        prepare_zero3(reft_model.model)
    prepare_zero3(reft_model)  # only records external parameters: the model is unchanged
    assert common.interventions(reft_model).keys() == reft_model.interventions.state_dict().keys()
    assert retract_zero_(reft_model) == []  # no ZeRO optimizer holds its parameters
    with pytest.raises(ValueError, match="method must be one of"):
        retract_zero_(reft_model, method="svd")
    with pytest.raises(ValueError, match="method must be one of"):
        zero_callback(method="svd")
    assert isinstance(zero_callback(), transformers.TrainerCallback)
    R = next(iter(reft_model.interventions.values())).R
    assert isinstance(R, reft_ext.retraction.StiefelParameter)
    assert isinstance(R, torch.nn.Parameter)
