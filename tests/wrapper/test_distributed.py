"""Data-parallel training of a PARA model: DDP and FSDP2 with 2 CPU processes on gloo.

Two processes each take half of a global batch and step a PARA-wrapped tiny Llama; both must
end with identical parameters and global losses, equal (up to fp32 rounding) to one process
stepping on the whole batch (loss = mean over the global batch: every row supervises the
same number of tokens, so the mean of the two ranks' means is the global mean). Variants:
DDP, DDP with gradient checkpointing, FSDP2 (``fully_shard`` on each decoder layer, then the
root). All variants run in one spawn of the two processes (docs/training.md).
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from para_kernels import PARAConfig, get_para_model

from kit.models import randomize_adapter, tiny_llama

WORLD = 2
ROWS, LENGTH, PROMPT, STEPS = 4, 8, 3, 3
VARIANTS = ("ddp", "ddp_checkpointing", "ddp_find_unused", "fsdp2", "trainer")

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def global_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (ROWS, LENGTH), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100  # the prompt; every row supervises LENGTH - PROMPT - 1 tokens after the shift
    return ids, labels


def make_model(checkpointing: bool):
    pm = get_para_model(tiny_llama(seed=0), PARAConfig(r=4))
    randomize_adapter(pm, std=0.1)
    if checkpointing:
        pm.gradient_checkpointing_enable()
    return pm.train()


def trainable(module) -> list:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def step_loop(net, params, ids, labels, world: int = 1, weight_decay: float = 0.01) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = net(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        seen = loss.detach().clone()
        if world > 1:
            dist.all_reduce(seen)
            seen /= world
        losses.append(seen.item())
    return losses


def run_variant(kind: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    pm = make_model(checkpointing=kind in ("ddp_checkpointing", "ddp_find_unused", "trainer"))
    ids, labels = global_batch()
    if kind == "trainer":
        return run_trainer(pm, ids, labels)
    rows = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in pm.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(pm.get_base_model())
        net = pm
    else:
        # find_unused_parameters=True: what Trainer passes for a model that is not a PreTrainedModel
        net = DistributedDataParallel(pm, find_unused_parameters=kind == "ddp_find_unused")
    params = [p for _, p in trainable(pm)]
    sharded = [n for n, p in trainable(pm) if hasattr(p, "full_tensor")]  # FSDP2: DTensor shards
    losses = step_loop(net, params, ids[rows], labels[rows], WORLD)
    return {"losses": losses, "params": {n: full(p) for n, p in trainable(pm)}, "sharded": len(sharded),
            "trainable": len(params)}


def run_trainer(pm, ids, labels) -> dict:
    """PARATrainer under the environment torchrun sets: the same 3 full-batch steps (AdamW, constant
    lr, no weight decay, no clipping), each rank fed half of the 4-row dataset by the Trainer."""
    import tempfile

    from transformers import TrainingArguments

    from para_kernels.transformers.trainer import PARATrainer

    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=ROWS // WORLD, max_steps=STEPS, learning_rate=1e-2,
                                 lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                                 optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0, disable_tqdm=True)
        trainer = PARATrainer(model=pm, args=args, train_dataset=rows)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "params": {n: full(p) for n, p in trainable(pm)}, "sharded": 0,
            "trainable": len(trainable(pm))}


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))  # as torchrun sets them
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for kind in VARIANTS:
            try:
                results[kind] = run_variant(kind, rank)
            except Exception as e:  # reported by the test of that variant
                results[kind] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of every variant (one spawn of two processes for the module)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """One process stepping on the whole batch, per checkpointing setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for key, checkpointing, decay in (("plain", False, 0.01), ("checkpointing", True, 0.01), ("trainer", True, 0.0)):
        pm = make_model(checkpointing)
        ids, labels = global_batch()
        losses = step_loop(pm, [p for _, p in trainable(pm)], ids, labels, weight_decay=decay)
        out[key] = {"losses": losses, "params": {n: full(p) for n, p in trainable(pm)}}
    torch.set_num_threads(threads)
    return out


def check_variant(kind: str, ranks, single) -> None:
    errors = [r[kind] for r in ranks if "error" in r[kind]]
    if errors:
        pytest.fail(f"{kind}: {errors[0]['error']}\n{errors[0]['traceback']}")
    a, b = ranks[0][kind], ranks[1][kind]
    assert a["sharded"] == (a["trainable"] if kind == "fsdp2" else 0) and a["trainable"] > 0
    assert a["losses"] == b["losses"]
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
    ref = single[{"ddp_checkpointing": "checkpointing", "ddp_find_unused": "checkpointing",
                  "trainer": "trainer"}.get(kind, "plain")]
    # PARAModel's own names vs the wrapped model's (DDP / FSDP2 do not rename parameters)
    assert sorted(a["params"]) == sorted(ref["params"])
    rtol = 1e-3 if kind == "trainer" else 1e-5  # Trainer logs losses rounded to 4 digits
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=1e-6)
    assert ref["losses"][-1] < ref["losses"][0]  # it trained
    for n, p in ref["params"].items():
        torch.testing.assert_close(a["params"][n], p, rtol=1e-4, atol=1e-6, msg=n)


def test_ddp_matches_single_process(ranks, single):
    check_variant("ddp", ranks, single)


def test_ddp_gradient_checkpointing_matches_single_process(ranks, single):
    check_variant("ddp_checkpointing", ranks, single)


def test_ddp_find_unused_parameters_with_checkpointing(ranks, single):
    check_variant("ddp_find_unused", ranks, single)


def test_para_trainer_ddp_matches_single_process(ranks, single):
    check_variant("trainer", ranks, single)


def test_fsdp2_matches_single_process(ranks, single):
    check_variant("fsdp2", ranks, single)
