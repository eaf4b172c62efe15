"""The one training loop. Every fine-tuning recipe (LoRA, adapter, adapter v2, full) runs through `fit`.

A recipe only says what makes its method different — a `Method`: how to turn the loaded base model into the
model to train (inject LoRA, add adapter prompts, or nothing) and which config file describes it. Everything
else lives here, once:

    for each optimizer step:                              batch_size samples = accumulation × micro batches
        for each micro batch:                             (micro_batch_size, T) tokens per process
            loss = cross_entropy(model(x)[:, :-1], y[:, 1:]) / accumulation
            backward (gradients sync across processes only on the last micro batch)
        clip gradients, AdamW step, learning rate: linear warmup then cosine decay
        every eval_interval: validation loss, perplexity and one generated sample
        every save_interval: a resumable checkpoint and the method's weights file

Only trainable parameters (`requires_grad`) reach the optimizer and the weights file, so a LoRA run saves the
LoRA tensors and a full fine-tune saves the whole model, with no method-specific saving code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import yaml
from lightning.fabric import Fabric
from tqdm import tqdm

from litft import data as data_lib
from litft import run_dir, train_state
from litft.base_checkpoint import DEFAULT_CHECKPOINT, record_base, tokenizer_fingerprint
from litft.checkpoint import load_lit_model
from litft.errors import UserError
from litft.files import atomic_write_text, copy_tokenizer, save_state_dict
from litft.model import Llama
from litft.tokenizer import Tokenizer

IGNORE_INDEX = -100
PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true", "32-true")
AT_LEAST_ONE = ("max_steps", "batch_size", "micro_batch_size", "devices", "num_nodes", "eval_interval", "eval_iters",
                "save_interval", "log_interval")


@dataclass
class TrainArgs:
    """The flags every finetune/ recipe shares. A recipe changes their defaults, not their meaning."""

    data: str = "alpaca"  # alpaca, dolly, viggo, gsm8k, sql, games (prepared on first use) or a prepared directory
    checkpoint_dir: Path = DEFAULT_CHECKPOINT  # SmolLM2-135M-Instruct, converted from the offline GGUF on first use
    out_dir: Path = Path("out/finetune")
    precision: str | None = None  # bf16-mixed, bf16-true, 16-mixed, 32-true; default bf16-mixed on a GPU, else 32-true
    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # samples per optimizer step, across all processes
    micro_batch_size: int = 4  # samples per forward/backward on one process
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100  # counted in optimizer steps
    min_lr: float = 0.0  # the cosine schedule decays to this
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    max_seq_length: int | None = None  # truncate batches to this many tokens
    eval_interval: int = 100
    eval_iters: int = 20  # validation micro batches per evaluation
    save_interval: int = 100
    log_interval: int = 1
    sample_tokens: int = 32  # tokens generated for the sample shown at each evaluation
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block: fused kernels on a GPU; the first steps compile
    seed: int = 1337
    resume: bool = False  # continue the run in out_dir (it must be the same run: see litft/run_dir.py)
    overwrite: bool = False  # replace the run in out_dir; without it a used out_dir is refused

    def validate(self) -> None:
        """Refuse, in one line naming the value and what is allowed, a flag value that cannot work — before
        anything is converted, prepared or written."""
        for name in AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)}: must be at least 1")
        for name in ("warmup_steps", "sample_tokens", "weight_decay", "grad_clip", "min_lr"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name} {getattr(self, name)}: must be 0 or more")
        if not 0 < self.learning_rate < math.inf:
            raise UserError(f"--learning_rate {self.learning_rate}: must be a positive number (e.g. 3e-4)")
        if self.min_lr > self.learning_rate:
            raise UserError(f"--min_lr {self.min_lr}: must not exceed --learning_rate {self.learning_rate}")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise UserError(f"--max_seq_length {self.max_seq_length}: must be at least 2 (a token and EOS)")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if torch.cuda.is_available() and self.devices > torch.cuda.device_count():
            raise UserError(f"--devices {self.devices}: this machine has {torch.cuda.device_count()} GPUs")
        self.micro_batches(self.devices * self.num_nodes)
        run_dir.check_out_dir(self)

    def micro_batches(self, world_size: int) -> int:
        """The number of micro batches accumulated per optimizer step."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise UserError(f"--batch_size {self.batch_size} is not a multiple of --micro_batch_size "
                            f"{self.micro_batch_size} × {world_size} processes; pick values that divide")
        return self.batch_size // per_step


@dataclass
class Method:
    """What a fine-tuning method contributes: its name, how it prepares the model, what it saves."""

    name: str  # "lora", "adapter", "adapter_v2", "full"
    weights_name: str  # the file in out_dir with the trained weights, e.g. "lit_model_lora.pth"
    prepare: Callable[[Llama], None]  # adds the method's modules and leaves only its parameters trainable
    save_config: Callable[[Path], None] = lambda out_dir: None  # writes e.g. lora.yaml into out_dir
    config: dict = field(default_factory=dict)  # recorded in hyperparameters.yaml
    new_tokens: list[str] = field(default_factory=list)  # tokens the prepared model has new rows for (LoRA only)


def fit(args: TrainArgs, method: Method) -> dict:
    """Fine-tune `args.checkpoint_dir` on `args.data` with `method`; returns the final metrics.

    Everything is read and checked first (flags, data, base, out_dir); only then is out_dir written to."""
    args.validate()
    fabric = make_fabric(args)
    fabric.launch()
    accumulation = args.micro_batches(fabric.world_size)
    if args.compile:
        check_can_compile(fabric.device)
    fabric.seed_everything(args.seed, verbose=False)  # the same initial weights (e.g. LoRA's A) on every process

    check_data_tokenizer(args)
    train_data, val_data = data_lib.load_split(args.data, "train"), data_lib.load_split(args.data, "test")
    tokenizer = Tokenizer(tokenizer_of(args, method))
    style = data_lib.prompt_style_of(args.data)
    model = build_model(args, method, fabric)
    check_token_ids(args, model.config.vocab_size + len(method.new_tokens), train=train_data, test=val_data)
    run_id = start_run(fabric, args, method)
    if fabric.global_rank == 0:
        write_run_files(args, method, model, style, run_id)
    if not val_data:
        fabric.print(f"note: {data_lib.data_dir(args.data)}/test.pt holds no samples, so validation is skipped",
                     file=sys.stderr)

    trainable = [p for p in model.parameters() if p.requires_grad]
    model = fabric.setup_module(model)
    fabric.seed_everything(args.seed + fabric.global_rank, verbose=False)  # different dropout masks per process
    raw = model.module if hasattr(model, "module") else model
    if args.compile:
        for block in raw.blocks:  # in place: the state dict's names stay the same
            block.compile()
    optimizer = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    fabric.print(f"trainable parameters: {sum(p.numel() for p in trainable):,} "
                 f"of {sum(p.numel() for p in raw.parameters()):,}", file=sys.stderr)

    state = train_state.State()
    if args.resume:
        state = train_state.load(fabric, raw, optimizer, scheduler, args.out_dir)
        fabric.print(f"resumed from step {state.step}", file=sys.stderr)
    batches = batch_indices(len(train_data), args.micro_batch_size, fabric.world_size, fabric.global_rank,
                            args.seed, start=state.position)
    loop = Loop(fabric, model, raw, optimizer, scheduler, args, tokenizer, style, val_data, method, run_id)
    loop.run(state, train_data, batches, accumulation)
    return state.metrics


class Loop:
    """The optimizer-step loop; holds what every step needs so each method below stays short."""

    def __init__(self, fabric, model, raw, optimizer, scheduler, args, tokenizer, style, val_data, method, run_id):
        self.fabric, self.model, self.raw, self.optimizer, self.scheduler = fabric, model, raw, optimizer, scheduler
        self.args, self.tokenizer, self.style, self.val_data, self.method = args, tokenizer, style, val_data, method
        self.run_id = run_id  # goes into every checkpoint: rotation deletes only this run's
        self.tokens_seen = 0  # input tokens processed by all processes since this run (or resume) started

    def run(self, state: train_state.State, train_data: list, batches, accumulation: int) -> None:
        fabric, args = self.fabric, self.args
        bar = tqdm(total=args.max_steps, initial=state.step, desc="training", disable=fabric.global_rank != 0,
                   file=sys.stderr, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            self.steps(state, train_data, batches, accumulation, bar)
        finally:
            bar.close()
        if fabric.global_rank == 0:
            train_state.plot_loss(state.history, args.out_dir / "loss.png")
            self.write_summary(state, time.perf_counter() - start)

    def write_summary(self, state: train_state.State, seconds: float) -> None:
        """summary.json: what a comparison between runs needs, without reading TensorBoard."""
        train_losses = [h["train_loss"] for h in state.history if "train_loss" in h]
        summary = {"method": self.method.name, "steps": state.step, **state.metrics,
                   "final_train_loss": train_losses[-1] if train_losses else None,
                   "trainable_parameters": sum(p.numel() for p in self.raw.parameters() if p.requires_grad),
                   "train_seconds": seconds, "tokens_per_s": self.tokens_seen / seconds if seconds else None,
                   "peak_memory_gb": peak_memory_gb(self.fabric),
                   "weights_file_bytes": (self.args.out_dir / self.method.weights_name).stat().st_size}
        atomic_write_text(self.args.out_dir / "summary.json", json.dumps(summary, indent=2))

    def steps(self, state: train_state.State, train_data: list, batches, accumulation: int, bar: tqdm) -> None:
        fabric, args = self.fabric, self.args
        while state.step < args.max_steps:
            t0, tokens, loss = time.perf_counter(), 0, torch.zeros((), device=fabric.device)
            for micro in range(accumulation):
                x, y = self.collate([train_data[i] for i in next(batches)])
                with fabric.no_backward_sync(self.model, enabled=micro < accumulation - 1):
                    micro_loss = self.loss(x, y)
                    fabric.backward(micro_loss / accumulation)
                loss += micro_loss.detach() / accumulation
                tokens += x.numel()
            self.tokens_seen += tokens * fabric.world_size
            state.position += accumulation
            loss = fabric.all_reduce(loss, reduce_op="mean")
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at step {state.step + 1}; last good checkpoint: "
                                f"{train_state.latest(args.out_dir) or 'none'} — lower --learning_rate and --resume")
            if args.grad_clip > 0:
                fabric.clip_gradients(self.model, self.optimizer, max_norm=args.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            state.step += 1
            self.log(state, loss.item(), tokens * fabric.world_size / (time.perf_counter() - t0))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            self.evaluate_and_save(state)

    def evaluate_and_save(self, state: train_state.State) -> None:
        """Evaluate and save when due. A failing evaluation (or sample) still lets the weights be saved first."""
        last = state.step == self.args.max_steps
        save = state.step % self.args.save_interval == 0 or last
        if state.step % self.args.eval_interval == 0 or last:
            try:
                self.evaluate(state)
            except Exception:
                if save:
                    self.save(state)
                raise
        if save:
            self.save(state)

    def collate(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data_lib.collate(samples, self.tokenizer.pad_id, IGNORE_INDEX, self.args.max_seq_length)
        return x.to(self.fabric.device), y.to(self.fabric.device)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model, x, y)

    def log(self, state: train_state.State, loss: float, tokens_per_s: float) -> None:
        state.history.append({"step": state.step, "train_loss": loss})
        if state.step % self.args.log_interval == 0:
            self.fabric.log_dict({"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                                  "train/tokens_per_s": tokens_per_s, "train/memory_gb": peak_memory_gb(self.fabric)},
                                 step=state.step)

    @torch.no_grad()
    def evaluate(self, state: train_state.State) -> None:
        fabric, args = self.fabric, self.args
        if not self.val_data:  # an empty test split (--val_split_fraction 0): said once when the run started
            return
        self.model.eval()
        n = min(args.eval_iters, len(self.val_data) // (args.micro_batch_size * fabric.world_size))
        losses = torch.zeros(max(n, 1), device=fabric.device)
        for k in range(n):
            start = (k * fabric.world_size + fabric.global_rank) * args.micro_batch_size
            x, y = self.collate(self.val_data[start:start + args.micro_batch_size])
            losses[k] = self.loss(x, y)
        val_loss = fabric.all_reduce(losses[:n].mean(), reduce_op="mean").item() if n else float("nan")
        sample = self.sample()
        self.model.train()
        state.history.append({"step": state.step, "val_loss": val_loss})
        state.metrics = {"step": state.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                         "peak_memory_gb": peak_memory_gb(fabric)}
        fabric.log_dict({"val/loss": val_loss, "val/ppl": state.metrics["val_ppl"]}, step=state.step)
        if fabric.global_rank == 0:
            tqdm.write(f"step {state.step}: val loss {val_loss:.4f}, val ppl {state.metrics['val_ppl']:.2f}, "
                       f"sample: {sample!r}", file=sys.stderr)

    def sample(self) -> str:
        """Greedy completion of the first validation prompt, through the training model (all ranks take part)."""
        from litft.generate import greedy_without_cache, stop_token_ids

        first = self.val_data[0]
        prompt = self.style.apply(first["instruction"], first.get("input", ""))
        ids = self.tokenizer.encode(prompt, bos=self.style.add_bos).to(self.fabric.device)
        stops = stop_token_ids(self.tokenizer, self.style)
        new = greedy_without_cache(self.model, ids, self.args.sample_tokens, stop_ids=stops)
        return self.tokenizer.decode(new)

    def save(self, state: train_state.State) -> None:
        train_state.save(self.fabric, self.raw, self.optimizer, self.scheduler, state, self.args.out_dir, self.run_id)
        weights = train_state.gather_trainable(self.raw, to_rank0=self.fabric.global_rank == 0)
        if self.fabric.global_rank == 0:
            save_state_dict(weights, self.args.out_dir / self.method.weights_name)
        self.fabric.barrier()


def causal_lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose target is not IGNORE_INDEX (-100).

    The model computes it from its final hidden states a slice at a time (litft/loss.py), never holding the
    whole (B, T, vocab) logits; going through forward() keeps DDP's and FSDP's hooks in the path."""
    return model(x, labels=y)


def batch_indices(n: int, micro_batch_size: int, world_size: int, rank: int, seed: int, start: int = 0):
    """Yield this process's sample indices, one micro batch at a time, forever; resumable at `start`.

    Each epoch is a fresh permutation seeded by (seed, epoch). Micro batch i of the whole job covers
    permutation slots [i·m·W, (i+1)·m·W); process `rank` takes its m of them. So one process with micro batch m
    sees the same samples in the same order as W processes together.
    """
    per_iter = micro_batch_size * world_size
    per_epoch = n // per_iter
    if per_epoch == 0:
        raise UserError(f"the training split has {n} samples, fewer than one micro batch across all processes "
                        f"({per_iter}); lower --micro_batch_size or prepare more data")
    position, epoch, perm = start, -1, None
    while True:
        e, i = divmod(position, per_epoch)
        if e != epoch:
            epoch, perm = e, torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))
        first = i * per_iter + rank * micro_batch_size
        yield perm[first:first + micro_batch_size].tolist()
        position += 1


def make_fabric(args: TrainArgs) -> Fabric:
    from lightning.fabric.loggers import TensorBoardLogger

    on_gpu = torch.cuda.is_available()
    precision = args.precision or ("bf16-mixed" if on_gpu else "32-true")
    strategy = args.strategy
    if strategy == "fsdp":
        from lightning.fabric.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(parallelize_fn=shard_blocks, data_parallel_size=args.devices * args.num_nodes,
                                         tensor_parallel_size=1)
    elif strategy == "ddp" and not on_gpu:
        strategy = "ddp"
    logger = TensorBoardLogger(root_dir=str(args.out_dir), name="logs", version="")
    return Fabric(accelerator="cuda" if on_gpu else "cpu", devices=args.devices, num_nodes=args.num_nodes,
                  strategy=strategy, precision=precision, loggers=logger)


def check_can_compile(device: torch.device) -> None:
    """torch.compile writes C++ for a CPU (a GPU's kernels come from Triton); fail now, not at the first step."""
    compilers = (os.environ.get("CXX"), "g++", "clang++")  # where inductor looks: $CXX, then the platform's
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in compilers if cxx):
        raise UserError("--compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop "
                        "--compile (on a CPU it is no faster)")


def shard_blocks(model: Llama, device_mesh) -> Llama:
    """FSDP2: shard each transformer Block, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build_model(args: TrainArgs, method: Method, fabric: Fabric) -> Llama:
    dtype = torch.bfloat16 if fabric.strategy.precision.precision == "bf16-true" else None
    model = load_lit_model(args.checkpoint_dir, dtype=dtype)
    model.requires_grad_(False)
    method.prepare(model)
    model.activation_checkpointing = args.activation_checkpointing
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"the {method.name} method left no trainable parameters")
    return model


def start_run(fabric: Fabric, args: TrainArgs, method: Method) -> str:
    """Rank 0 checks out_dir for a fresh, resumed or overwritten run and clears what must go (litft/run_dir.py);
    every process learns the outcome, so a refusal ends them all. Returns the run's id."""
    outcome = ("", None)
    if fabric.global_rank == 0:
        try:
            outcome = (run_dir.start(args, method), None)
        except UserError as e:
            outcome = ("", str(e))
    run_id, error = fabric.broadcast(outcome, src=0)
    if error:
        raise UserError(error)
    return run_id


def check_data_tokenizer(args: TrainArgs) -> None:
    """Data encoded by another tokenizer is refused: its ids would mean other words to this model."""
    meta = data_lib.meta_of(args.data)
    if meta.get("tokenizer") and meta["tokenizer"] != (ours := tokenizer_fingerprint(args.checkpoint_dir)):
        raise UserError(f"--data {args.data} was encoded by the tokenizer of {meta.get('checkpoint_dir')} "
                        f"(fingerprint {meta['tokenizer']}), not by --checkpoint_dir {args.checkpoint_dir}'s ({ours}); "
                        f"prepare the data again with --checkpoint_dir {args.checkpoint_dir}")


def check_token_ids(args: TrainArgs, vocab_size: int, **splits: list[dict]) -> None:
    """Every token id must be a row of the model's embedding (data prepared for a larger vocabulary is not)."""
    for split, samples in splits.items():
        for s in samples:
            ids = s["input_ids"]
            if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
                bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
                raise UserError(f"{data_lib.data_dir(args.data)}/{split}.pt holds token id {bad}, outside the "
                                f"{vocab_size} ids of {args.checkpoint_dir}; prepare the data again with "
                                f"--checkpoint_dir {args.checkpoint_dir}")


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


def tokenizer_of(args: TrainArgs, method: Method) -> Path:
    """The base tokenizer, or the data's grown one when the data was prepared with --new_tokens."""
    new_tokens = data_lib.meta_of(args.data).get("new_tokens", [])
    if new_tokens and new_tokens != method.new_tokens:
        raise UserError(f"{data_lib.data_dir(args.data)} was prepared with new tokens {new_tokens}, which "
                        f"{method.name} cannot train; use finetune/lora.py, or prepare the data without --new_tokens")
    return data_lib.data_dir(args.data) if new_tokens else args.checkpoint_dir


def lr_factor(step: int, args: TrainArgs) -> float:
    """Multiplier on learning_rate after `step` optimizer steps: linear warmup, then cosine to min_lr."""
    if step < args.warmup_steps:
        return (step + 1) / (args.warmup_steps + 1)
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    floor = args.min_lr / args.learning_rate
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def peak_memory_gb(fabric: Fabric) -> float:
    if fabric.device.type == "cuda":
        return torch.cuda.max_memory_allocated(fabric.device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB
