"""Resumable training state: save it atomically, find the last complete one, restore it exactly.

A checkpoint is a directory `out_dir/checkpoints/step-000100/` holding
    state-rank<r>.safetensors   each process's trainable parameters and AdamW moments (its own shards under
                                FSDP: DTensor local pieces), named `param:<name>` and `optim:<name>:<key>`;
                                with whole tensors (DDP) rank 0's alone, which every process holds alike
    state-rank<r>.json          that process's random number generator state, and its optimizer's settings
    meta.json                   step, data position, scheduler state, loss history, the number of processes,
                                and under 16-mixed the GradScaler's loss scale
Nothing in it is unpickled when it is loaded: tensors come from safetensors, everything else from JSON, so a
checkpoint directory someone else wrote cannot run code (torch's distributed checkpoint format, which this
replaced, reads its `.metadata` with pickle).
It is written under a `.tmp` name and renamed into place only when complete, so a run killed mid-write leaves a
`.tmp` directory that is never loaded (and is removed when the next run starts, litft/run_dir.py). meta.json
names the run that wrote it (run.yaml's run_id): keeping the newest two deletes only that run's older ones, and
--resume continues from that run's newest only. Resuming restores all of it, so on a CPU a run resumed at step 5
reaches step 10 with bit-identical weights to a run that never stopped. Shards are per process: a checkpoint
resumes with the number of processes and the strategy (FSDP's shards or whole tensors) that wrote it
(litft/run_dir.py checks both before anything loads).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from litft.errors import UserError
from litft.files import atomic_path, sync_directory


@dataclass
class State:
    step: int = 0  # optimizer steps taken
    position: int = 0  # micro batches consumed (per process), where the data stream resumes
    history: list = field(default_factory=list)  # [{"step", "train_loss" | "val_loss"}]
    metrics: dict = field(default_factory=dict)  # the last evaluation


META = "meta.json"  # step, schedule, history; a step-* directory (renamed from .tmp once written) that holds it is complete


def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest(out_dir: Path, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint directory that run `run_id` wrote (any run's, without one), or None. A
    checkpoint of another run left in checkpoints/ is never this run's to resume from, whatever its step."""
    if run_id is not None:
        return (own_checkpoints(out_dir, run_id) or [None])[-1]
    done = [d for d in checkpoints_dir(out_dir).glob("step-*") if not d.name.endswith(".tmp") and (d / META).is_file()]
    return max(done, key=step_of, default=None)


def resumable(out_dir: Path, run_id: str | None = None) -> Path:
    """The checkpoint --resume continues from (run `run_id`'s newest), or one line saying why there is none."""
    path = latest(out_dir, run_id)
    if path is None:
        old = [d for d in checkpoints_dir(out_dir).glob("step-*") if (d / ".metadata").exists()]
        whose = f" of run {run_id} (the run_id in run.yaml)" if run_id is not None else ""
        raise UserError(f"--resume: {old[-1]} is in torch's distributed checkpoint format, which is not loaded "
                        "because reading it unpickles; start the run again with --overwrite true" if old else
                        f"--resume: no complete checkpoint{whose} in {checkpoints_dir(out_dir)}; " +
                        ("start the run again with --overwrite true"
                         if (Path(out_dir) / "run.yaml").is_file() else "run without --resume to start"))
    return path


def save(fabric, model, optimizer, scheduler, state: State, out_dir: Path, run_id: str, keep: int = 2) -> Path:
    """Write a checkpoint for `state.step`; every process takes part. Then delete this run's checkpoints older
    than the newest `keep` — never one that another run (another run_id) or a later step wrote."""
    final = checkpoints_dir(out_dir) / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    rank = fabric.global_rank
    if rank == 0:
        for stale in checkpoints_dir(out_dir).glob("*.tmp"):  # this one, or one a killed save left behind
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    writes = sharded or rank == 0  # DDP's processes hold the same replica (its all-reduce keeps them so): one copy
    tensors, groups = _local_state(model, _raw(optimizer), with_tensors=writes)
    if writes:
        save_file(tensors, tmp / f"state-rank{rank}.safetensors")
        _on_disk(tmp / f"state-rank{rank}.safetensors")
    (tmp / f"state-rank{rank}.json").write_text(json.dumps({"rng": _rng_state(), "param_groups": groups}))
    _on_disk(tmp / f"state-rank{rank}.json")
    if rank == 0:
        meta = {"step": state.step, "position": state.position, "scheduler": scheduler.state_dict(),
                "history": state.history, "metrics": state.metrics, "world_size": fabric.world_size, "run_id": run_id,
                "grad_scaler": fabric.strategy.precision.state_dict(),  # {} but under 16-mixed
                "sharded": sharded}
        (tmp / META).write_text(json.dumps(meta))
        _on_disk(tmp / META)
    fabric.barrier()
    if rank == 0:
        if final.exists() and _read_meta(final) is None:  # left damaged (a power loss): resumed from before it
            shutil.rmtree(final)
        sync_directory(tmp)  # its files' names, then the rename that makes it complete
        os.replace(tmp, final)
        sync_directory(final.parent)
        for old in own_checkpoints(out_dir, run_id, up_to=final)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    fabric.barrier()
    return final


def own_checkpoints(out_dir: Path, run_id: str, up_to: Path | None = None) -> list[Path]:
    """Complete checkpoints (up to `up_to`, when given) that run `run_id` wrote, oldest first. One whose meta.json
    is unreadable is not known to be ours, so it is kept, and never resumed from."""
    return [d for d in sorted(checkpoints_dir(out_dir).glob("step-*"), key=step_of)
            if not d.name.endswith(".tmp") and (up_to is None or step_of(d) <= step_of(up_to))
            and (_read_meta(d) or {}).get("run_id") == run_id]


def step_of(checkpoint: Path) -> int:
    """step-000100 -> 100: by number, as names sort wrongly past six digits (step-1000000 < step-999999)."""
    digits = checkpoint.name.removeprefix("step-").removesuffix(".tmp")
    return int(digits) if digits.isdigit() else -1


def _read_meta(checkpoint: Path) -> dict | None:
    """A checkpoint's meta.json, or None when it is missing or unreadable."""
    try:
        meta = json.loads((checkpoint / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _on_disk(*paths: Path) -> None:
    """Flush written files to the disk before the checkpoint's folder is renamed complete: after a power loss the
    rename may otherwise survive and the files not."""
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def check_continues(path: Path, max_steps: int, sharded: bool) -> None:
    """Refuse, in one line, to resume from `path` a run that is past --max_steps, or with the other kind of tensors:
    FSDP's per-process shards (`sharded`) or whole ones (DDP, one process). A run at --max_steps exactly may resume:
    killed after its last checkpoint, it still writes its summary."""
    meta = _read_json(path / META)
    if max_steps < meta["step"]:
        raise UserError(f"--resume: {path.parent.parent} is at step {meta['step']} already ({path.name}), past "
                        f"--max_steps {max_steps}; pass a larger --max_steps to train on")
    if meta.get("sharded", sharded) != sharded:  # checkpoints written before it was recorded are not checked
        held, asked = ("FSDP's shards", "auto or ddp") if meta["sharded"] else ("whole tensors", "fsdp")
        raise UserError(f"--resume: {path} holds {held}, which --strategy {asked} cannot load; resume with the "
                        "--strategy the run started with (hyperparameters.yaml records it)")


FROM_FLAGS = ("params", "lr", "initial_lr", "weight_decay")  # not restored: a resume may change the flags


def load(fabric, model, optimizer, scheduler, out_dir: Path, run_id: str) -> State:
    """Restore run `run_id`'s newest complete checkpoint into model, optimizer and scheduler; return its State. The
    learning rate and weight decay stay those of this run's flags (a resume may lower --learning_rate): the schedule
    goes on from the checkpoint's step with them. So may the precision: AdamW's moments take the parameters' dtype."""
    path = resumable(out_dir, run_id)
    meta, rank = _read_json(path / META), fabric.global_rank
    if meta.get("world_size", 1) != fabric.world_size:
        raise UserError(f"--resume: {path} was written by {meta['world_size']} processes, this run has "
                        f"{fabric.world_size}; resume with the same --devices × --num_nodes")
    try:
        tensors = load_file(path / f"state-rank{rank if meta.get('sharded', True) else 0}.safetensors")
    except (SafetensorError, OSError) as e:
        raise UserError(f"--resume: {path} is damaged ({str(e).splitlines()[0]}); remove it to resume from the "
                        "checkpoint before it") from None
    rank_meta = _read_json(path / f"state-rank{rank}.json")
    _restore_local_state(model, _raw(optimizer), tensors, rank_meta["param_groups"], path)
    scheduler.load_state_dict(meta["scheduler"])  # its step count; the learning rate is this run's --learning_rate
    groups = _raw(optimizer).param_groups
    scheduler.base_lrs = [group["initial_lr"] for group in groups]
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    _set_rng_state(rank_meta["rng"])
    if meta.get("grad_scaler") and getattr(fabric.strategy.precision, "scaler", None) is not None:
        fabric.strategy.precision.load_state_dict(meta["grad_scaler"])  # a fresh one would skip steps again
    return State(meta["step"], meta["position"], meta["history"], meta["metrics"])


# ---- what each process holds, as plain tensors and JSON --------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's piece of a (possibly FSDP-sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def _resharded(model):
    """FSDP2 leaves the root's gathered (unsharded) parameters registered after a forward without backward (an
    evaluation); reshard so the module holds the sharded parameters the optimizer steps."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _local_state(model, optimizer, with_tensors: bool = True) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Trainable parameters and their AdamW state by parameter name (none without `with_tensors`); param_groups
    with names for ids."""
    _resharded(model)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    if not with_tensors:
        return {}, groups
    tensors = {f"param:{n}": _local(p).detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for p, s in optimizer.state.items():
        for key, value in s.items():
            tensors[f"optim:{names[id(p)]}:{key}"] = _local(value).detach().contiguous()
    return {k: v.cpu() for k, v in tensors.items()}, groups


def _restore_local_state(model, optimizer, tensors: dict[str, torch.Tensor], groups: list[dict], path: Path) -> None:
    _resharded(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("param:") for k in tensors if k.startswith("param:")}
    if saved != set(params):
        differ = sorted(saved ^ set(params))
        raise UserError(f"--resume: {path} holds other trainable parameters than this run ({differ[0]}, ...); "
                        "resume with the method and settings the run was started with")
    with torch.no_grad():
        for name, p in params.items():
            _local(p).copy_(tensors[f"param:{name}"])
    for name, p in params.items():
        state = {}
        for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if (t := tensors.get(f"optim:{name}:{key}")) is not None:
                state[key] = t if key == "step" else _like(p, t)
        if state:
            optimizer.state[p] = state
    for group, saved_group in zip(optimizer.param_groups, groups):  # what flags set comes from this run's flags
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved_group.items() if k not in FROM_FLAGS})


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` on the parameter's device and in its dtype (a run resumed in another --precision), as a DTensor
    sharded like it when it is one."""
    local = local.to(device=_local(param).device, dtype=_local(param).dtype)
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return local


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {path} is unreadable ({str(e).splitlines()[0]}); remove its checkpoint "
                        "directory to resume from the one before") from None


def gather_trainable(model: torch.nn.Module, to_rank0: bool) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of the trainable parameters, on the CPU; collective under FSDP.

    Gathered one parameter at a time, so even a full fine-tune holds one copy of the model on rank 0.
    """
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if to_rank0:
                out[name] = full.detach().to("cpu", copy=True)
    return out


def nonfinite_weights(model: torch.nn.Module) -> int:
    """How many of this process's trainable weights (its shards under FSDP) are NaN or infinite."""
    return sum(int((~torch.isfinite(_local(p))).sum()) for p in model.parameters() if p.requires_grad)


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # unwrap Fabric's optimizer wrapper


def _rng_state() -> dict:
    """Every generator a step draws from, as JSON: torch's byte states as lists, Python's as its tuple."""
    cuda = [t.tolist() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state().tolist(), "python": random.getstate(), "cuda": cuda}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    if s["cuda"]:
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s["cuda"]])


def plot_loss(history: list[dict], path: Path) -> None:
    """The loss curve as a PNG: training loss per step, validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
