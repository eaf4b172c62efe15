"""Resumable training state: save it atomically, find the last complete one, restore it exactly.

A checkpoint is a directory `out_dir/checkpoints/step-000100/` holding
    the trainable parameters and the optimizer state   (torch.distributed.checkpoint: each process writes its
                                                        own shards under FSDP, one file otherwise)
    meta.pt     step, data position, scheduler state, loss history
    rng-<rank>.pt  every process's random number generator state
It is written under a `.tmp` name and renamed into place only when complete, so a run killed mid-write leaves a
`.tmp` directory that is never loaded (and is removed by the next save). Resuming restores all of it, so on a CPU
a run resumed at step 5 reaches step 10 with bit-identical weights to a run that never stopped.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from litft.errors import UserError


@dataclass
class State:
    step: int = 0  # optimizer steps taken
    position: int = 0  # micro batches consumed (per process), where the data stream resumes
    history: list = field(default_factory=list)  # [{"step", "train_loss" | "val_loss"}]
    metrics: dict = field(default_factory=dict)  # the last evaluation


def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    done = [d for d in checkpoints_dir(out_dir).glob("step-*") if not d.name.endswith(".tmp") and (d / "meta.pt").is_file()]
    return max(done, key=lambda d: d.name, default=None)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def save(fabric, model, optimizer, scheduler, state: State, out_dir: Path, keep: int = 2) -> Path:
    """Write a checkpoint for `state.step`; every process takes part."""
    final = checkpoints_dir(out_dir) / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    model_sd, optim_sd = get_state_dict(model, _raw(optimizer))
    names = trainable_names(model)
    with warnings.catch_warnings():  # a single process is a supported use, not something to warn about
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": {k: v for k, v in model_sd.items() if k in names}, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng-{fabric.global_rank}.pt")
    if fabric.global_rank == 0:
        meta = {"step": state.step, "position": state.position, "scheduler": scheduler.state_dict(),
                "history": state.history, "metrics": state.metrics}
        torch.save(meta, tmp / "meta.pt")
    fabric.barrier()
    if fabric.global_rank == 0:
        os.replace(tmp, final)
        complete = sorted(d for d in checkpoints_dir(out_dir).glob("step-*") if not d.name.endswith(".tmp"))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    fabric.barrier()
    return final


def load(fabric, model, optimizer, scheduler, out_dir: Path) -> State:
    """Restore the newest complete checkpoint into model, optimizer and scheduler; return its State."""
    path = latest(out_dir)
    if path is None:
        raise UserError(f"--resume: no complete checkpoint in {checkpoints_dir(out_dir)}; run without --resume to start")
    model_sd, optim_sd = get_state_dict(model, _raw(optimizer))
    names = trainable_names(model)
    model_sd = {k: v for k, v in model_sd.items() if k in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(model, _raw(optimizer), model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(strict=False))
    meta = torch.load(path / "meta.pt", weights_only=True)
    scheduler.load_state_dict(meta["scheduler"])
    rng = path / f"rng-{fabric.global_rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return State(meta["step"], meta["position"], meta["history"], meta["metrics"])


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


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # unwrap Fabric's optimizer wrapper


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def plot_loss(history: list[dict], path: Path) -> None:
    """The loss curve as a PNG: training loss per step, validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from litft.checkpoint import atomic_path

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
