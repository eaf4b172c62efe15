"""Everything a run does before its first step: the processes (Fabric), the memory plan, the model, the run dir.

`fit` (litft/train.py) calls these in order; each is one decision:

    make_fabric      devices, precision, DDP or FSDP (each transformer block sharded on its own), TensorBoard
    plan_memory      the run's peak estimated before a weight is read (litft/memory.py); `--micro_batch_size auto`
    build_model      the base loaded (on the meta device first: no random weights), the method applied, NF4
    start_run        out_dir checked and cleared for a fresh, resumed or overwritten run (litft/run_dir.py), and
                     seen by every process: each writes its part of every checkpoint there
    write_run_files  what later commands need to use the weights without repeating flags

Some decisions are rank 0's alone (the plan, the run directory), and every process must follow them, a refusal
included, or the others would wait forever at the next collective: `decided_by_rank0` runs the decision on rank 0
and broadcasts its value or its one-line error; `failing_anywhere` runs one on every process (loading each one's
part of a checkpoint) and stops them all when any fails.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import yaml

from litft import data as data_lib
from litft import memory, qlora, run_dir
from litft.base_checkpoint import record_base
from litft.checkpoint import load_lit_model
from litft.errors import UserError
from litft.files import atomic_write_text, copy_tokenizer
from litft.model import Llama
from litft.precision import TRUE_DTYPES, train_in_fp32
from litft.train_args import Method, TrainArgs
from litft.train_data import longest

if TYPE_CHECKING:
    from lightning.fabric import Fabric


def decided_by_rank0(fabric: Fabric, decide: Callable[[], Any]) -> Any:
    """`decide()` on rank 0, its value on every process; a UserError there is raised on every process."""
    outcome = (None, None)
    if fabric.global_rank == 0:
        try:
            outcome = (decide(), None)
        except UserError as e:
            outcome = (None, str(e))
    value, error = fabric.broadcast(outcome, src=0)
    if error:
        raise UserError(error)
    return value


def failing_anywhere(fabric: Fabric, act: Callable[[], Any]) -> Any:
    """`act()` on every process. When it fails on any (the lowest rank's failure, when several do), every process
    stops rather than go on alone to wait at the next collective: a UserError with its line everywhere; any other
    error as itself where it happened, and elsewhere as a line naming that process."""
    value, error = None, None
    try:
        value = act()
    except Exception as e:  # told to the other processes first, then raised
        error = e
    if fabric.world_size > 1:
        mine = torch.tensor(fabric.world_size if error is None else fabric.global_rank, device=fabric.device)
        first = int(fabric.all_reduce(mine, reduce_op=torch.distributed.ReduceOp.MIN))
        if first < fabric.world_size:
            said = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            user, message = fabric.broadcast((isinstance(error, UserError), said), src=first)  # first's own
            if error is None or isinstance(error, UserError):
                raise UserError(message if user else f"process {first} failed: {message}")
    if error is not None:
        raise error
    return value


def make_fabric(args: TrainArgs) -> Fabric:
    # Lightning is imported when a run starts, not with this module: it takes seconds (it loads torchmetrics, and
    # transformers where that is installed), and a command whose flags are wrong should say so at once.
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import TensorBoardLogger
    from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

    on_gpu = torch.cuda.is_available()
    strategy = args.strategy
    if strategy == "fsdp":
        strategy = ModelParallelStrategy(parallelize_fn=shard_blocks, data_parallel_size=args.devices * args.num_nodes,
                                         tensor_parallel_size=1)
    elif uses_ddp(args):
        # gradients as views into DDP's all-reduce buckets: without it each process holds them twice (PyTorch's
        # DDP docs: the saving "will be equal to the total gradients size")
        strategy = DDPStrategy(gradient_as_bucket_view=True)
    logger = TensorBoardLogger(root_dir=str(args.out_dir), name="logs", version="")
    return Fabric(accelerator="cuda" if on_gpu else "cpu", devices=args.devices, num_nodes=args.num_nodes,
                  strategy=strategy, precision=args.precision, loggers=logger)


def uses_ddp(args: TrainArgs) -> bool:
    """--strategy ddp, or auto (Fabric's choice) with more than one process."""
    return args.strategy == "ddp" or (args.strategy == "auto" and args.devices * args.num_nodes > 1)


def check_can_compile(device: torch.device) -> None:
    """torch.compile writes C++ for a CPU (a GPU's kernels come from Triton); fail now, not at the first step."""
    compilers = (os.environ.get("CXX"), "g++", "clang++")  # where inductor looks: $CXX, then the platform's
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in compilers if cxx):
        raise UserError("--compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop "
                        "--compile (on a CPU it is no faster)")


def shard_blocks(model: Llama, device_mesh) -> Llama:
    """FSDP2: shard each transformer Block, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # torch ≥ 2.6

    mesh = device_mesh["data_parallel"]
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # lm_head stays gathered for the fast loss
    register_fsdp_forward_method(model, "hidden_states")  # the fast loss calls it: gather the root's weights
    return model


def plan_memory(fabric: Fabric, args: TrainArgs, method: Method, train_data: list[dict]) -> None:
    """Print the run's memory plan before any weight is read; resolve --micro_batch_size auto (rank 0 decides,
    the others follow; a resumed run kept the size it started with, run_dir.check); refuse a run that would not
    fit."""
    seq = data_lib.batch_length(longest(train_data), args.batch_multiple(), args.max_seq_length)
    micro, line = decided_by_rank0(fabric, lambda: memory.plan_run(args, method, seq, fabric.world_size, fabric.device,
                                                                   rows=len(train_data)))
    fabric.print(line, file=sys.stderr)
    args.micro_batch_size = micro
    args.micro_batches(fabric.world_size)  # checks that the batch splits into micro batches on every process


def build_model(args: TrainArgs, method: Method, fabric: Fabric) -> Llama:
    """The base in --precision's dtype under *-true; under *-mixed, its frozen weights as the checkpoint stores
    them and the weights it trains in fp32 (litft/precision.py)."""
    dtype = TRUE_DTYPES.get(fabric.strategy.precision.precision)
    # a 4-bit base is quantized from the checkpoint's own values, as generate/ and merge_lora.py quantize it,
    # then cast; each layer's W is freed once stored in NF4 (a mapped file would stay resident)
    model = load_lit_model(args.checkpoint_dir, dtype=None if args.quantize else dtype, mmap=args.quantize is None)
    model.requires_grad_(False)
    method.prepare(model)
    if args.quantize:
        qlora.quantize(model, args.quantize).to(dtype)
    if dtype is None:
        train_in_fp32(model)
    model.activation_checkpointing = args.activation_checkpointing
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"the {method.name} method left no trainable parameters")
    if dtype == torch.bfloat16 and fabric.global_rank == 0:
        warn_if_steps_round_away(fabric, model, args.learning_rate)
    return model


def warn_if_steps_round_away(fabric: Fabric, model: Llama, lr: float) -> None:
    """bf16-true trains the weights themselves in bf16, with no fp32 copy. bf16 keeps 8 significant bits, so a
    weight w moves only by steps above ~|w|/256, and AdamW's steps are about --learning_rate: most of a full
    fine-tune's weights, at its usual lr (2e-5), would never change. Warn when a step of lr leaves over a tenth of
    the trained weights as they are (computed as AdamW's in-place update rounds: in bf16), on up to 65,536 evenly
    spread weights of each tensor, so a 7B model's check takes a moment."""
    samples = [p.detach().flatten()[:: max(1, p.numel() // 65536)] for p in model.parameters() if p.requires_grad]
    stuck = sum(int((s + lr == s).sum()) for s in samples) / sum(s.numel() for s in samples)
    if stuck > 0.1:
        fabric.print(f"warning: under --precision bf16-true a step of --learning_rate {lr:g} leaves {stuck:.1%} of "
                     "the trained weights unchanged (bf16 rounds away a step below ~1/256 of a weight); train in "
                     "--precision bf16-mixed, which keeps fp32 copies of them", file=sys.stderr)


def start_run(fabric: Fabric, args: TrainArgs, method: Method) -> str:
    """Rank 0 checks out_dir for a fresh, resumed or overwritten run and clears what must go (litft/run_dir.py);
    every process learns the outcome, so a refusal ends them all. Returns the run's id."""
    run_id = decided_by_rank0(fabric, lambda: run_dir.start(args, method))
    check_out_dir_is_shared(fabric, Path(args.out_dir), run_id)
    return run_id


def check_out_dir_is_shared(fabric: Fabric, out: Path, run_id: str) -> None:
    """Every process writes its part of each checkpoint into out_dir and reads it back on --resume, so the nodes
    of a multi-node run need one out_dir on a filesystem they share. Rank 0 leaves a mark there; a process that
    does not see it within seconds (a node-local disk) ends the run now rather than at its first save."""
    if fabric.world_size == 1:
        return
    mark = out / f".shared-{run_id}"  # not a run file: one a killed run leaves refuses nothing (litft/run_dir.py)
    out.mkdir(parents=True, exist_ok=True)  # by every process: one that looked for it before may have cached "none"
    fabric.barrier()
    if fabric.global_rank == 0:
        mark.touch()
    fabric.barrier()
    for _ in range(10):  # a network filesystem may show a new file to other nodes a moment later
        if mark.exists():
            break
        time.sleep(0.5)
    blind = int(fabric.all_reduce(torch.tensor(0 if mark.exists() else 1, device=fabric.device), reduce_op="sum"))
    if fabric.global_rank == 0:
        mark.unlink(missing_ok=True)
    if blind:
        raise UserError(f"--out_dir {out}: {blind} of the {fabric.world_size} processes cannot see the files process 0 "
                        "writes there (a disk local to each node?); every process writes its part of each "
                        "checkpoint into it: give every node the same --out_dir on a shared filesystem")


def write_run_files(args: TrainArgs, method: Method, model: Llama, style, run_id: str) -> None:
    """Everything needed to use the weights later without repeating flags, and run.yaml for --resume."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_dir.record(args, method, run_id)
    hyper = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()}
    atomic_write_text(out / "hyperparameters.yaml", yaml.safe_dump({"method": method.name, **hyper,
                                                                   method.name: method.config}, sort_keys=False))
    model.config.save(out)
    record_base(out, args.checkpoint_dir)  # base.yaml: generate/*.py finds the base again, and notices a changed one
    style.save(out)
    method.save_config(out)
    if method.new_tokens:  # the data's grown tokenizer goes with the run, for generate/ and evaluate
        copy_tokenizer(data_lib.data_dir(args.data), out)
