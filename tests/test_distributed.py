"""Distributed training with real processes: DDP, FSDP2 (fp32 and bf16 compute), the Hugging Face
Trainer and accelerate, 2 ranks on gloo (CPU), each against one process training on the union of
the ranks' batches (tests/distributed/common.py). The ranks are child processes with a file
rendezvous and loopback-only gloo connections (tests/distributed/launch.py), bounded in time."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

import common  # noqa: E402
from launch import run_ranks, successful_ranks  # noqa: E402
from truth import orth_error  # noqa: E402

import reft_ext  # noqa: E402
from reft_ext.distributed import average_gradients, is_main_process, shard_base_model  # noqa: E402

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.not_emulated  # CPU processes only: no kernel of the emulated suite


def assert_ranks_identical(results: list[dict]) -> None:
    first, second = (r["interventions"] for r in results)
    for key in first:
        assert torch.equal(first[key], second[key]), key  # bit for bit


@pytest.fixture(scope="module")
def single_process():
    """One process, GLOBAL_BATCH rows per step: the interventions and generated tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1)
    try:
        reft_model = common.make_reft_model()
        common.train(reft_model, reft_model, common.make_optimizer(reft_model))
        tokens = reft_model.generate(
            input_ids=torch.tensor(common.PROMPT), max_new_tokens=6, do_sample=False
        )
        return common.interventions(reft_model), tokens
    finally:
        torch.set_num_threads(threads)


def check_adapter_and_generation(out: Path, results: list[dict]) -> None:
    """Only rank 0 wrote the adapter; loaded in this process it holds rank 0's interventions and
    generates what the ranks generated after training."""
    assert [len(r["written"]) for r in results] == [2, 0]
    loaded = reft_ext.ReftModel.from_pretrained(common.make_reft_model().unload(), out / "adapter")
    trained = results[0]["interventions"]
    for key, value in common.interventions(loaded).items():
        assert torch.equal(value, trained[key]), key
    tokens = loaded.generate(
        input_ids=torch.tensor(common.PROMPT), max_new_tokens=6, do_sample=False
    )
    for rank in results:
        if "tokens" in rank:
            assert torch.equal(rank["tokens"], tokens)
    for name, value in trained.items():
        if name.endswith(".R"):
            assert orth_error(value) <= 1e-5, name


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "accelerate"])
def test_two_ranks_equal_one_process_on_both_batches(tmp_path, single_process, mode):
    """After 20 AdamW steps (weight decay, automatic retraction) the 2-rank run with 2 rows per
    rank equals one process with 4 rows per step (1e-5 relative, float32), the ranks agree bit
    for bit, and only rank 0 writes the adapter."""
    results = successful_ranks(mode, tmp_path)
    assert_ranks_identical(results)
    want, tokens = single_process
    assert common.max_rel_state(results[0]["interventions"], want) <= 1e-5
    check_adapter_and_generation(tmp_path, results)
    if "tokens" in results[0]:
        assert torch.equal(results[0]["tokens"], tokens)


def test_fsdp2_bf16_compute_float32_interventions(tmp_path, single_process):
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bfloat16): the blocks compute in bfloat16, the
    float32 interventions edit their outputs; the ranks agree bit for bit and the result is
    float32 training's to bfloat16 accuracy."""
    results = successful_ranks("fsdp2-bf16", tmp_path)
    assert_ranks_identical(results)
    want, _ = single_process
    assert common.max_rel_state(results[0]["interventions"], want) <= 5e-2
    assert common.max_rel_state(results[0]["interventions"], want) > 0  # it did compute in bf16
    assert [len(r["written"]) for r in results] == [2, 0]
    for name, value in results[0]["interventions"].items():
        if name.endswith(".R"):
            assert orth_error(value) <= 1e-5, name


def test_trainer_ddp_equals_one_process_trainer_and_resumes_exactly(tmp_path):
    """transformers.Trainer on 2 ranks (ddp_backend="gloo"; Trainer wraps the ReftModel in DDP)
    equals Trainer in one process with twice the per-device batch; its checkpoints hold the
    interventions only; resuming from the step-10 checkpoint on 2 ranks ends bit for bit where
    the uninterrupted run ended (interventions and optimizer state restored)."""
    first = tmp_path / "first"
    results = successful_ranks("trainer", first)
    assert_ranks_identical(results)
    assert [len(r["written"]) for r in results] == [2, 0]
    for name, value in results[0]["interventions"].items():
        if name.endswith(".R"):
            assert orth_error(value) <= 1e-5, name

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reft_model = common.make_reft_model()
        args = common.trainer_arguments(tmp_path / "single", common.GLOBAL_BATCH)
        transformers.Trainer(
            model=reft_model, args=args, train_dataset=common.trainer_dataset()
        ).train()
    finally:
        torch.set_num_threads(threads)
    want = common.interventions(reft_model)
    assert common.max_rel_state(results[0]["interventions"], want) <= 1e-5

    checkpoint = first / "trainer" / f"checkpoint-{common.STEPS // 2}"
    saved = safetensors_torch.load_file(str(checkpoint / "model.safetensors"))
    assert set(saved) == {f"interventions.{k}" for k in reft_model.interventions.state_dict()}
    assert (checkpoint / "optimizer.pt").is_file()
    second = tmp_path / "second"
    shutil.copytree(checkpoint, second / "trainer" / checkpoint.name)
    resumed = successful_ranks("trainer-resume", second)
    assert_ranks_identical(resumed)
    for key, value in results[0]["interventions"].items():
        assert torch.equal(resumed[0]["interventions"][key], value), key
    assert results[0]["steps"] == common.STEPS
    assert resumed[0]["steps"] == common.STEPS // 2  # it did resume at step 10
    assert resumed[0]["losses"] == results[0]["losses"]  # (the first 10 from the checkpoint)


def test_a_failing_rank_fails_the_run_with_its_error(tmp_path):
    """Rank 1 raises at step 3: both ranks exit non-zero, quickly (rank 0's next collective
    fails on the closed connection instead of waiting), and rank 1's error is in its output."""
    start = time.monotonic()
    ranks = run_ranks("fail", tmp_path, timeout=90)
    elapsed = time.monotonic() - start
    assert ranks[1].returncode not in (None, 0)
    assert "rank 1 fails on purpose at step 3" in ranks[1].output
    assert ranks[0].returncode not in (None, 0), "rank 0 hung or did not fail"
    assert "Connection closed by peer" in ranks[0].output
    assert elapsed < 60


# ---- in one process ----------------------------------------------------------------------------


def test_helpers_outside_a_distributed_run():
    assert is_main_process()  # no process group: this process is the one that writes
    reft_model = common.make_reft_model()
    with pytest.raises(RuntimeError, match="not initialized"):
        average_gradients(reft_model.interventions)
    with pytest.raises(TypeError, match="reft_model must be a reft_ext.ReftModel"):
        shard_base_model(reft_model.model)
    assert reft_model.save_pretrained(Path("/nonexistent/never"), is_main_process=False) == []


def test_state_dict_is_the_adapter_and_loads_strictly():
    reft_model = common.make_reft_model()
    state = reft_model.state_dict()
    assert set(state) == {f"interventions.{k}" for k in reft_model.interventions.state_dict()}
    other = common.make_reft_model()
    with torch.no_grad():
        for p in other.interventions.parameters():
            p.zero_()
    assert not other.load_state_dict(state).missing_keys  # strict=True, base keys not required
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    broken = dict(state)
    broken.pop("interventions.layer0_first.W")
    with pytest.raises(RuntimeError, match="layer0_first.W"):
        other.load_state_dict(broken)
    # Nested in a wrapper (DDP's "module.", torch.compile's "_orig_mod."): the same keys, nested.
    holder = torch.nn.ModuleDict({"module": other})
    assert set(holder.state_dict()) == {f"module.{k}" for k in state}
    assert not holder.load_state_dict(holder.state_dict()).missing_keys


def test_trainer_checkpoint_of_a_tied_embedding_model(tmp_path):
    """A Trainer checkpoint of a ReftModel on a model with tied embeddings (SmolLM2's) used to
    fail in safetensors ("Some tensors share memory"): the state dict held the base model."""
    reft_model = common.make_reft_model()
    base = reft_model.model
    base.lm_head.weight = base.model.embed_tokens.weight
    args = common.trainer_arguments(tmp_path, common.GLOBAL_BATCH, max_steps=2, save_steps=1)
    trainer = transformers.Trainer(
        model=reft_model, args=args, train_dataset=common.trainer_dataset()
    )
    trainer.train()
    saved = safetensors_torch.load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    for key, value in reft_model.state_dict().items():
        assert torch.equal(saved[key], value), key
