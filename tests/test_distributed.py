"""More than one process: FSDP in bf16 and two nodes, each against the same run in one process; and a process
that dies.

The outside truth is the arithmetic of data parallelism: with the same global batch and the same data order,
N processes take the same optimizer steps as one, so the per-step training losses agree (bit for bit in fp32;
within bf16's rounding, where the gradient all-reduce sums in another order).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_user_error
from test_train import COMMON, finetune, tiny, weights  # noqa: F401  (tiny is a fixture)

pytestmark = pytest.mark.slow


def losses(out_dir: Path) -> list[float]:
    last = sorted((out_dir / "checkpoints").glob("step-*"))[-1]
    return [h["train_loss"] for h in json.loads((last / "meta.json").read_text())["history"] if "train_loss" in h]


@pytest.mark.parametrize("script,precision", [("finetune/lora.py", "bf16-mixed"), ("finetune/full.py", "bf16-true"),
                                              ("finetune/lora.py", "bf16-true")])
def test_fsdp_in_bf16_tracks_one_process(tiny, tmp_path, script, precision):
    """2 processes (gloo, FSDP2) vs 1, 6 steps in bf16: losses within 1 % (bf16 keeps 8 bits of mantissa), and
    LoRA's B (zero at the start) within 5 % of what training put there; the weights' 0.05 bound alone is about the
    size of B itself."""
    flags = ("--precision", precision, *(("--lora_dropout", "0") if "lora" in script else ()))
    finetune(tiny, tmp_path / "one", *flags, script=script)
    finetune(tiny, tmp_path / "two", *flags, "--devices", "2", "--strategy", "fsdp", script=script)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6 and one[-1] < one[0]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-2, atol=0)
    name = "lit_model_lora.pth" if "lora" in script else "lit_model.pth"
    a, b = weights(tmp_path / "one" / name), weights(tmp_path / "two" / name)
    assert sorted(a) == sorted(b)
    for key in a:  # a few bf16 steps apart at most (one bf16 step of a weight near 1 is 2^-7)
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=0, atol=0.05, msg=key)
    trained = [key for key in a if "lora_B" in key]  # zero at the start: all they hold, training put there
    if trained:  # measured 2e-8 (bf16-mixed: fp32 master weights) and 0.0095 (bf16-true) of the update apart
        apart = sum((b[k].float() - a[k].float()).norm() ** 2 for k in trained) ** 0.5
        assert apart <= 0.05 * sum(a[k].float().norm() ** 2 for k in trained) ** 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_the_same_losses_as_one_process(tiny, tmp_path):
    """`--num_nodes 2 --devices 1`, started as two nodes on 127.0.0.1 the way torchrun or srun start them (each
    process gets MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE, LOCAL_RANK), equals one process in fp32."""
    finetune(tiny, tmp_path / "one", "--lora_dropout", "0")
    nodes = two_nodes(tiny, tmp_path / "two", tmp_path / "two")
    assert [code for code, _ in nodes] == [0, 0], nodes[0][1][-2000:] + nodes[1][1][-2000:]
    assert losses(tmp_path / "two") == losses(tmp_path / "one")
    a, b = weights(tmp_path / "one" / "lit_model_lora.pth"), weights(tmp_path / "two" / "lit_model_lora.pth")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def two_nodes(tiny: dict, *out_dirs: Path) -> list[tuple[int, str]]:
    """A LoRA run of `--num_nodes 2 --devices 1` started as two nodes on 127.0.0.1, node r writing to out_dirs[r];
    each node's exit status and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    nodes = [subprocess.Popen([sys.executable, str(ROOT / "finetune/lora.py"), "--checkpoint_dir", str(tiny["ckpt"]),
                               "--data", str(tiny["data"]), "--out_dir", str(out), *COMMON, "--lora_dropout", "0",
                               "--num_nodes", "2", "--devices", "1", "--strategy", "ddp"],
                              cwd=ROOT, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for rank, out in enumerate(out_dirs)]
    try:
        errors = [node.communicate(timeout=300)[1] for node in nodes]
        return [(node.returncode, stderr) for node, stderr in zip(nodes, errors)]
    finally:
        for node in nodes:
            node.kill()


def test_nodes_without_a_shared_out_dir_stop_at_start_in_one_line(tiny, tmp_path):
    """Two nodes whose --out_dir is not one folder (as node-local disks are): every process writes its part of
    each checkpoint there, so the run stops before training, on both nodes, in one line. It had trained until its
    first save, where the second node found no checkpoint folder to write into."""
    nodes = two_nodes(tiny, tmp_path / "node0", tmp_path / "node1")
    for code, stderr in nodes:
        assert_user_error(subprocess.CompletedProcess([], code, "", stderr), "--out_dir", "same --out_dir on a shared")
        assert "step 1" not in stderr and "training" not in stderr, stderr[-2000:]
    assert not list((tmp_path / "node0").glob(".shared-*"))


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc): the ranks Fabric started beside rank 0."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_process_ends_the_others_in_one_line_and_the_run_resumes(tiny, tmp_path, strategy):
    """SIGKILL of rank 1 while the run writes a checkpoint after every step (so most likely in the middle of one,
    sharded under FSDP): rank 0 stops within a minute with one line naming the last complete checkpoint, and
    --resume true continues from exactly that step."""
    out = tmp_path / "run"
    flags = ("--devices", "2", "--strategy", strategy, "--save_interval", "1", "--eval_interval", "100000",
             "--lora_dropout", "0")
    args = [sys.executable, str(ROOT / "finetune/lora.py"), "--checkpoint_dir", str(tiny["ckpt"]), "--data",
            str(tiny["data"]), "--out_dir", str(out), *COMMON, *flags, "--max_steps", "100000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 180
        while not list((out / "checkpoints").glob("step-00000[6-9]*")) and time.time() < deadline:
            time.sleep(0.1)
        rank1 = children(proc.pid)
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "another process of this run stopped" in lines[0], stderr
    last = Path(re.search(r"the last complete checkpoint is (\S+): continue with --resume true", lines[0]).group(1))
    assert (last / "meta.json").is_file()
    step = int(last.name.removeprefix("step-"))
    resumed = finetune(tiny, out, *flags, "--resume", "true", "--max_steps", str(step + 2))
    assert f"resumed from step {step}" in resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


def test_a_checkpoint_damaged_for_one_process_stops_them_all_at_resume_in_one_line(tiny, tmp_path):
    """Rank 1's shards in the newest checkpoint truncated (as a disk that filled up leaves it): safetensors refuses
    it on rank 1 only, and every process stops with the line that names the damaged checkpoint, before the run's
    record is touched. Rank 0 had gone on alone and rewritten hyperparameters.yaml, then reported a lost process
    and advised the same --resume again. A failure that is no user error (rank 1's JSON without the key it needs:
    a KeyError there) stops the others too, each with a line naming that process, instead of leaving them waiting."""
    out = tmp_path / "run"
    flags = ("--devices", "2", "--strategy", "fsdp", "--lora_dropout", "0")
    finetune(tiny, out, *flags)
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    part, whole = newest / "state-rank1.safetensors", (newest / "state-rank1.safetensors").read_bytes()
    part.write_bytes(whole[:100])
    record = (out / "hyperparameters.yaml").read_bytes()
    resumed = finetune(tiny, out, *flags, "--resume", "true", "--max_steps", "8", check=False)
    assert_user_error(resumed, f"{newest} is damaged", "remove it to resume from the checkpoint before it")
    assert (out / "hyperparameters.yaml").read_bytes() == record
    part.write_bytes(whole)
    (newest / "state-rank1.json").write_text('{"rng": {}}')
    resumed = finetune(tiny, out, *flags, "--resume", "true", "--max_steps", "8", check=False)
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert resumed.returncode != 0 and lines == ["error: process 1 failed: KeyError: 'param_groups'"], \
        resumed.stderr[-3000:]
    assert (out / "hyperparameters.yaml").read_bytes() == record


GATHERED = """
import json, sys
from dataclasses import replace
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from litft.config import Config
from litft.model import Llama
from litft.train_setup import shard_blocks

dist.init_process_group("gloo")
model = Llama(Config(**json.loads(sys.argv[1]))).requires_grad_(True)
shard_blocks(model, init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",)))
shards = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
whole = [0]

def count(*_):  # the parameters FSDP has swapped in whole (gathered) at this moment
    held = sum(p.numel() * p.element_size() for p in model.parameters() if not isinstance(p, DTensor))
    whole[0] = max(whole[0], held)

for module in model.modules():
    module.register_forward_pre_hook(count), module.register_forward_hook(count)
    if module is not model:
        module.register_full_backward_pre_hook(count), module.register_full_backward_hook(count)
model(torch.randint(0, 64, (2, 16))).float().mean().backward()
if dist.get_rank() == 0:
    print(json.dumps({"shards": shards, "whole": whole[0]}))
dist.destroy_process_group()
"""


GRADIENTS = """
import json, sys
from pathlib import Path
import torch
from torch.distributed.tensor import DTensor
from litft.config import Config
from litft.fast import for_training
from litft.model import Llama
from litft.train import setup_loop
from litft.train_args import TrainArgs
from litft.train_setup import make_fabric
from litft.train_state import State

args = TrainArgs(devices=2, strategy=sys.argv[2], precision="32-true", out_dir=Path(sys.argv[1]))
fabric = make_fabric(args)
fabric.launch()
torch.manual_seed(0)
model = Llama(Config.from_name("tiny-gqa")).requires_grad_(True)
loop = setup_loop(fabric, model, args, None, for_training(model), tokenizer=None, style=None, val_data=[], run_id="")
held, loss = [], loop.loss

def record(*batch):  # as a micro batch starts: the gradients this process holds
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    held.append({"grads": len(grads), "shards": sum(isinstance(g, DTensor) for g in grads),
                 "shard_bytes": sum(t.numel() * t.element_size() for g, t in zip(grads, local) if g is not t),
                 "storages": len({t.untyped_storage().data_ptr() for t in local})})
    return loss(*batch)

loop.loss = record
x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(fabric.global_rank))
for _ in range(2):  # two optimizer steps of three micro batches, as Loop.steps takes them
    loop.accumulate([(x, x, None)] * 3)
    loop.update(State())
if fabric.global_rank == 0:
    print(json.dumps({"held": held, "whole": sum(p.numel() * 4 for p in model.parameters()),
                      "parameters": len(list(model.parameters()))}))
fabric.barrier()  # neither process leaves while the other still talks to it
torch.distributed.destroy_process_group()
"""


def gradients_held(tmp_path: Path, strategy: str) -> dict:
    """GRADIENTS run in 2 processes under `strategy`: what it found, from rank 0."""
    script = tmp_path / "gradients.py"
    script.write_text(GRADIENTS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(tmp_path / "run"), strategy], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ddp_keeps_the_gradients_in_its_all_reduce_buckets(tmp_path):
    """Truth: torch's DDP storages, as each of 3 micro batches of 2 optimizer steps starts. With
    gradient_as_bucket_view the gradients are views into the few flat buckets DDP all-reduces, not a second copy:
    the memory plan counts them once. They are there from the start (zeroed before DDP wraps the model) and zeroed
    in place after each step; freed instead, the micro batches before the synced last one (no_backward_sync) made
    new ones beside the buckets. Each gradient had had its own storage."""
    found = gradients_held(tmp_path, "ddp")
    assert len(found["held"]) == 6
    for held in found["held"]:
        assert held["grads"] == found["parameters"] and held["storages"] < found["parameters"] / 4, found


def test_fsdp_keeps_each_process_s_gradients_sharded_between_micro_batches(tmp_path):
    """Truth: torch's FSDP2, in 2 processes (gloo), through litft's own loop: 2 optimizer steps of 3 micro batches.
    After each backward every parameter's gradient is its DTensor shard, half of the whole: what the memory plan
    counts (litft/memory.py, Plan.sharded). Skipping the sync before the last micro batch (Fabric's
    no_backward_sync) had left no gradient in the shards and every gradient whole inside FSDP, until the last one."""
    from litft import memory
    from litft.config import Config
    from litft.fast import for_training

    found = gradients_held(tmp_path, "fsdp")
    shards = [(h["shards"], h["shard_bytes"]) for h in found["held"]]
    half = (found["parameters"], found["whole"] // 2)
    assert shards == [(0, 0), half, half] * 2  # each step starts with none: AdamW's zero_grad frees them
    plan = memory.plan(Config.from_name("tiny-gqa"), lambda model: model.requires_grad_(True), 16, dtype=torch.float32,
                       autocast=None, quantize=None, activation_checkpointing=False,
                       loss=lambda model: for_training(model, True), device=torch.device("cuda"))
    assert plan.sharded(2).gradients == half[1]


def test_the_fsdp_plan_counts_the_weights_each_process_gathers(tmp_path):
    """Truth: FSDP2's own parameters in 2 processes (gloo) through a forward and backward pass: each holds half of
    every weight as its shard and, at most, the root's weights (embedding, norm, lm_head: gathered from the forward
    pass to the end of the backward one) and one block's gathered whole. The plan adds one more block, the one
    FSDP gathers ahead of its use, which lives in FSDP's buffers and not in the parameters. The plan had divided
    every weight by the processes."""
    from dataclasses import replace

    from litft import memory
    from litft.config import Config
    from litft.fast import for_training
    from litft.model import Block

    config = replace(Config.from_name("tiny-gqa"), n_layer=4, vocab_size=4096, n_embd=128, intermediate_size=512,
                     tie_embeddings=False)
    fields = {k: getattr(config, k) for k in ("name", "vocab_size", "n_layer", "n_embd", "n_head", "n_query_groups",
                                              "intermediate_size", "block_size", "tie_embeddings")}
    script = tmp_path / "gathered.py"
    script.write_text(GATHERED)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), json.dumps(fields)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = json.loads(proc.stdout.strip().splitlines()[-1])
    plan = memory.plan(config, lambda model: model.requires_grad_(True), 16, dtype=torch.float32, autocast=None,
                       quantize=None, activation_checkpointing=False, loss=lambda model: for_training(model, True),
                       device=torch.device("cuda"))
    block = sum(p.numel() * p.element_size() for p in Block(config).parameters())  # the one gathered ahead
    assert held["shards"] == plan.weights / 2
    assert plan.sharded(2).weights == held["shards"] + held["whole"] + block
