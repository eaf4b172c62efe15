"""The one training loop. Every fine-tuning recipe (LoRA, adapter, adapter v2, full) runs through `fit`.

A recipe only says what makes its method different — a `Method`: how to turn the loaded base model into the
model to train (inject LoRA, add adapter prompts, or nothing) and which config file describes it. Then
litft/fast's `for_training` applies the speed measures (or, with --fast false, none) and names the loss.
Everything else lives here, once:

    for each optimizer step:                              batch_size samples = accumulation × micro batches
        for each micro batch:                             (micro_batch_size, T) tokens per process
            loss = next_token_loss(model(x), y) · n_k / N      (litft/loss.py; n_k of the step's N trained tokens)
            backward (DDP syncs gradients on the last micro batch only; FSDP on each, to keep them sharded)
        clip gradients (a non-finite norm stops the run), AdamW step, learning rate: linear warmup then cosine decay
        every eval_interval: validation loss, perplexity and one generated sample
        every save_interval: the method's weights file, then a resumable checkpoint

Only trainable parameters (`requires_grad`) reach the optimizer and the weights file, so a LoRA run saves the
LoRA tensors and a full fine-tune saves the whole model, with no method-specific saving code. What happens before
the first step (the processes, the memory plan, the model, the run directory) is litft/train_setup.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from litft import data as data_lib
from litft import fast, packing, qlora, run_dir, train_state
from litft.errors import UserError
from litft.files import atomic_write_text, save_state_dict
from litft.generate import greedy_without_cache, stop_token_ids
from litft.loss import IGNORE_INDEX, LossFn, trained_tokens
from litft.memory import peak_memory_gb
from litft.model import Llama
from litft.prompts import PromptStyle
from litft.schedule import batch_indices, lr_factor
from litft.tokenizer import Tokenizer
from litft.train_args import Method, TrainArgs
from litft.train_data import check_lengths, check_token_ids, read_data, tokenizer_of
from litft.train_setup import (
    build_model,
    check_can_compile,
    failing_anywhere,
    make_fabric,
    plan_memory,
    start_run,
    uses_ddp,
    write_run_files,
)

if TYPE_CHECKING:
    from lightning.fabric import Fabric

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # inputs, labels (B, T), packed_pos (B, T) or None


def fit(args: TrainArgs, method: Method) -> dict:
    """Fine-tune `args.checkpoint_dir` on `args.data` with `method`; returns the final metrics.

    Everything is read and checked first (flags, data, base, out_dir); only then is out_dir written to."""
    args.validate()
    args.fill_defaults(on_gpu=torch.cuda.is_available())
    method.check_quantize(args.quantize)
    run_dir.check(args, method)  # a used out_dir or a resume of another run: refused before anything loads
    fabric = make_fabric(args)
    fabric.launch()
    if args.compile:
        check_can_compile(fabric.device)
    fabric.seed_everything(args.seed, verbose=False)  # the same initial weights (e.g. LoRA's A) on every process

    train_data, val_data = read_data(fabric, args, method)
    tokenizer, style = Tokenizer(tokenizer_of(args, method)), data_lib.prompt_style_of(args.data)
    plan_memory(fabric, args, method, train_data)
    model = build_model(args, method, fabric)
    check_token_ids(args, model.config.vocab_size + len(method.new_tokens), train=train_data, test=val_data)
    check_lengths(args, model.config.block_size, train=train_data, test=val_data)
    loss_fn = fast.for_training(model, args.fast, args.compile)  # before sharding: it may swap layers
    run_id = start_run(fabric, args, method)
    if not val_data:
        fabric.print(f"note: {data_lib.data_dir(args.data)}/test.pt holds no samples, so validation is skipped",
                     file=sys.stderr)
    if args.warmup_steps >= args.max_steps:
        fabric.print(f"warning: --warmup_steps {args.warmup_steps} is not below --max_steps {args.max_steps}: the "
                     f"learning rate rises all run, never reaching --learning_rate {args.learning_rate:g} nor "
                     "decaying; lower --warmup_steps", file=sys.stderr)

    loop = setup_loop(fabric, model, args, method, loss_fn, tokenizer=tokenizer, style=style, val_data=val_data,
                      run_id=run_id)
    state = restore(loop)
    if fabric.global_rank == 0:  # only now: a resume refused or failing to load leaves the run's record as it was
        write_run_files(args, method, model, style, run_id)
    batches = batch_indices(len(train_data), args.micro_batch_size, fabric.world_size, fabric.global_rank,
                            args.seed, start=state.position)
    try:
        loop.run(state, train_data, batches, args.micro_batches(fabric.world_size))
    except RuntimeError as e:
        if fabric.world_size == 1 or not lost_a_process(e):
            raise
        reason = re.sub(r"^\[[^\]]*\] ", "", str(e).splitlines()[0]).split(". ")[0]  # gloo's source path dropped
        last = train_state.latest(args.out_dir, run_id) or "none yet"
        raise UserError(f"another process of this run stopped ({reason}); the last complete checkpoint is {last}: "
                        "continue with --resume true") from None
    return state.metrics


def restore(loop: Loop) -> train_state.State:
    """A fresh State, or with --resume the one of this run's newest checkpoint, restored into the model, AdamW and
    the schedule (run_dir.check_resume checked that it is this run's and that --max_steps lies beyond it)."""
    if not loop.args.resume:
        return train_state.State()
    state = failing_anywhere(loop.fabric, lambda: train_state.load(loop.fabric, loop.raw, loop.optimizer,
                                                                   loop.scheduler, loop.args.out_dir, loop.run_id))
    loop.fabric.print(f"resumed from step {state.step}", file=sys.stderr)
    if state.step == loop.args.max_steps:  # killed after its last checkpoint: only the summary is left to write
        loop.fabric.print(f"step {state.step} is --max_steps: nothing left to train; writing the run's summary",
                          file=sys.stderr)
    return state


def lost_a_process(error: RuntimeError) -> bool:
    """Whether a collective failed because another process is gone (gloo's and NCCL's words for it). A process that
    dies is noticed at the next collective, within seconds; one that hangs alive, after the process group's timeout
    (torch's default: 30 minutes)."""
    signs = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out", "timed out",
             "NCCL communicator was aborted", "Watchdog caught collective operation timeout")
    return isinstance(error, torch.distributed.DistError) or any(sign in str(error) for sign in signs)


def setup_loop(fabric: Fabric, model: Llama, args: TrainArgs, method: Method, loss_fn: LossFn, *,
               tokenizer: Tokenizer, style: PromptStyle, val_data: list, run_id: str) -> "Loop":
    """Hand the model to Fabric (device, precision, DDP/FSDP), build the optimizer and the schedule."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fabric.print(f"trainable parameters: {trainable:,} of {qlora.weight_count(model):,}", file=sys.stderr)
    if uses_ddp(args):  # gradients there before DDP wraps the model become views into its buckets at once
        model.to(fabric.device)  # made where they stay, not in host memory first
        for p in filter(lambda p: p.requires_grad, model.parameters()):
            p.grad = torch.zeros_like(p)
    wrapped = fabric.setup_module(model)
    wrapped.mark_forward_method("hidden_states")  # the fast loss calls it: under DDP it must pass DDP's forward too
    fabric.seed_everything(args.seed + fabric.global_rank, verbose=False)  # different dropout masks per process
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args))
    return Loop(fabric=fabric, model=wrapped, raw=model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                args=args, method=method, tokenizer=tokenizer, style=style, val_data=val_data, run_id=run_id)


def param_groups(model: Llama, weight_decay: float) -> list[dict]:
    """AdamW's groups: weight decay on the matrices only. A vector (a norm's weight, a bias, adapter v2's scales,
    adapter v1's gates) starts where it should stay unless its gradient says otherwise, and decay would pull it
    to zero instead (at adapter v2's lr 9e-3 and decay 0.02, a norm weight of 1.0 fell to 0.91 in 500 steps)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


@dataclass
class Loop:
    """The optimizer-step loop; holds what every step needs so each method below stays short."""

    fabric: Fabric
    model: torch.nn.Module  # as Fabric set it up: call it (or its hidden_states) to run through DDP/FSDP
    raw: Llama  # the model itself: its parameters and state dict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: LossFn  # (model, x, y) -> mean loss: litft/loss.py, or litft/fast's chunked loss
    args: TrainArgs
    method: Method
    tokenizer: Tokenizer
    style: PromptStyle
    val_data: list
    run_id: str  # goes into every checkpoint: rotation deletes only this run's
    tokens_seen: Counter = field(default_factory=Counter)  # padded, real, trained: all processes, since (re)start
    step_seconds: float = 0.0  # the optimizer steps' own time since (re)start, without evaluating and saving

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
                   "train_seconds": self.step_seconds, "wall_seconds": seconds,
                   **throughput(self.tokens_seen, self.step_seconds),
                   "peak_memory_gb": peak_memory_gb(self.fabric.device),
                   "weights_file_bytes": (self.args.out_dir / self.method.weights_name).stat().st_size}
        summary = {k: v if not isinstance(v, float) or math.isfinite(v) else None  # JSON has no NaN
                   for k, v in summary.items()}
        atomic_write_text(self.args.out_dir / "summary.json", json.dumps(summary, indent=2))

    def steps(self, state: train_state.State, train_data: list, batches, accumulation: int, bar: tqdm) -> None:
        args = self.args
        while state.step < args.max_steps:
            t0 = time.perf_counter()
            samples = [[train_data[i] for i in next(batches)] for _ in range(accumulation)]
            loss, trained = self.accumulate([self.collate(micro) for micro in samples])
            state.position += accumulation
            if not torch.isfinite(loss):
                self.stop(f"loss became {loss.item()}", state.step + 1)
            grad_norm, lr = self.update(state)
            state.step += 1
            self.step_seconds += time.perf_counter() - t0
            self.log(state, loss.item(), lr, grad_norm, self.tokens(samples, trained), time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            self.evaluate_and_save(state)

    def update(self, state: train_state.State) -> tuple[float, float]:
        """Clip the gradients, step AdamW and the schedule; returns the norm before clipping and the learning rate
        this step used. DDP's gradients are views into its all-reduce buckets: they are zeroed, not freed, or the
        next step's micro batches before the synced last one would make new ones beside the buckets."""
        grad_norm = self.clip_gradients(state)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not uses_ddp(self.args))
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used; the next one's is set below
        self.scheduler.step()
        return grad_norm, lr

    def clip_gradients(self, state: train_state.State) -> float:
        """Clip the gradients' norm to --grad_clip (0: leave them as they are), and stop before AdamW steps on a
        non-finite one: its update would make the weights NaN, and the next checkpoint would hold them. Under
        16-mixed the GradScaler skips such a step itself, and lowers its scale. Returns the norm before clipping."""
        norm = self.fabric.clip_gradients(self.model, self.optimizer, max_norm=self.args.grad_clip or math.inf,
                                          error_if_nonfinite=False)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: the norm over every shard
        if not torch.isfinite(norm) and getattr(self.fabric.strategy.precision, "scaler", None) is None:
            self.stop(f"the gradient norm became {norm.item()}", state.step + 1)
        return norm.item()

    def stop(self, what: str, step: int) -> NoReturn:
        """One line for a step gone non-finite, naming this run's last checkpoint: every one was checked finite."""
        last = train_state.latest(self.args.out_dir, self.run_id)
        then = "--resume true" if last else "start again with --overwrite true"
        raise UserError(f"{what} at step {step}; last good checkpoint: {last or 'none'} — lower --learning_rate (or "
                        f"choose another --precision) and {then}")

    def accumulate(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, int]:
        """Forward and backward through one optimizer step's micro batches. Returns the step's loss, the mean over
        all of its trained tokens on all processes however they fall into micro batches, and their number N.

        A micro batch's mean loss is weighted by its share n_k / N of the trained tokens, times the number of
        processes, which DDP's and FSDP's gradient average divides out again: the gradient is that of
        Σ (token losses) / N. Weighing each micro batch's mean alike would let 3 tokens count as much as 300.

        DDP holds whole gradients anyway, so it all-reduces once, after the last micro batch. FSDP reduce-scatters
        after every one, so each process keeps only its shard of the gradients: skipping that sync would hold them
        whole until the last micro batch (torch's FSDP2 `set_requires_gradient_sync`), more than the memory plan."""
        fabric = self.fabric
        hold = self.args.strategy != "fsdp"  # keep the gradients local until the last micro batch
        counts = [trained_tokens(y) for _, y, _ in micro_batches]
        total = fabric.all_reduce(sum(counts), reduce_op="sum")  # N
        loss = torch.zeros((), device=fabric.device)
        for k, (x, y, packed_pos) in enumerate(micro_batches):
            with fabric.no_backward_sync(self.model, enabled=hold and k < len(micro_batches) - 1):
                micro_loss = self.loss(x, y, packed_pos)  # the mean over its n_k trained tokens
                fabric.backward(micro_loss * (counts[k] * fabric.world_size / total))
            loss += micro_loss.detach() * counts[k] / total
        return fabric.all_reduce(loss, reduce_op="sum"), int(total)

    def tokens(self, samples: list[list[dict]], trained: int) -> dict[str, int]:
        """One step's tokens on all processes: in the padded batches, in the samples themselves, with a loss."""
        cap, multiple_of = self.args.max_seq_length, self.args.batch_multiple()
        lengths = [[min(len(s["input_ids"]), cap or math.inf) for s in micro] for micro in samples]
        padded = sum(data_lib.batch_length(max(n), multiple_of, cap) * len(n) for n in lengths)
        real = sum(map(sum, lengths))
        both = torch.tensor([padded, real], device=self.fabric.device)
        padded, real = self.fabric.all_reduce(both, reduce_op="sum").tolist()
        step = Counter(padded=padded, real=real, trained=trained)
        self.tokens_seen.update(step)
        return step

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

    def collate(self, samples: list[dict]) -> Batch:
        """(inputs, labels, packed_pos or None) on the device: packed_pos for packed rows (litft/packing.py)."""
        if "packed_pos" in samples[0]:
            return tuple(t.to(self.fabric.device) for t in packing.collate(samples, self.tokenizer.pad_id))
        x, y = data_lib.collate(samples, self.tokenizer.pad_id, IGNORE_INDEX, self.args.max_seq_length,
                                self.args.pad_to_multiple_of)
        return x.to(self.fabric.device), y.to(self.fabric.device), None

    def loss(self, x: torch.Tensor, y: torch.Tensor, packed_pos: torch.Tensor | None = None) -> torch.Tensor:
        with self.fabric.autocast():  # precision for the fast loss: its lm_head, and hidden_states when Fabric
            # calls it directly (one device, FSDP) rather than through its forward wrapper (DDP)
            return self.loss_fn(self.model, x, y, packed_pos=packed_pos)

    def log(self, state: train_state.State, loss: float, lr: float, grad_norm: float, tokens: Counter,
            seconds: float) -> None:
        state.history.append({"step": state.step, "train_loss": loss})
        if state.step % self.args.log_interval == 0:
            self.fabric.log_dict({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                  **throughput(tokens, seconds, "train/"),
                                  "train/memory_gb": peak_memory_gb(self.fabric.device)}, step=state.step)

    @torch.no_grad()
    def evaluate(self, state: train_state.State) -> None:
        fabric = self.fabric
        if not self.val_data:  # an empty test split (--val_split_fraction 0): said once when the run started
            return
        self.model.eval()
        val_loss = self.val_loss()
        sample = f", sample: {self.sample()!r}" if self.args.sample_tokens else ""  # 0: no sample
        self.model.train()
        state.history.append({"step": state.step, "val_loss": val_loss})
        state.metrics = {"step": state.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                         "peak_memory_gb": peak_memory_gb(fabric.device)}
        fabric.log_dict({"val/loss": val_loss, "val/ppl": state.metrics["val_ppl"]}, step=state.step)
        if fabric.global_rank == 0:
            tqdm.write(f"step {state.step}: val loss {val_loss:.4f}, val ppl {state.metrics['val_ppl']:.2f}{sample}",
                       file=sys.stderr)

    def val_loss(self) -> float:
        """The mean loss over the trained tokens of the first eval_iters batches of the test split (all of it when
        shorter, even when it holds fewer samples than there are processes). Every process runs as many batches,
        since under FSDP each forward gathers weights from all: one past the split's end runs its first sample and
        counts none of its tokens."""
        fabric, args = self.fabric, self.args
        micro = max(1, min(args.micro_batch_size, len(self.val_data) // fabric.world_size))  # a small split too
        n = min(args.eval_iters, math.ceil(len(self.val_data) / (micro * fabric.world_size)))  # batches per process
        sums = torch.zeros(2, device=fabric.device)  # Σ token losses, trained tokens: the mean weighs every token alike
        for k in range(n):
            start = (k * fabric.world_size + fabric.global_rank) * micro
            batch = self.val_data[start:start + micro]
            x, y, packed_pos = self.collate(batch or self.val_data[:1])
            count = trained_tokens(y) if batch else torch.zeros_like(trained_tokens(y))  # past the end: not counted
            sums += torch.stack((self.loss(x, y, packed_pos).float() * count, count.float()))
        total, count = fabric.all_reduce(sums, reduce_op="sum").tolist()
        return total / count if count else math.nan  # no trained token at all: null in summary.json

    def sample(self) -> str:
        """Greedy completion of the first validation prompt, through the training model (all ranks take part)."""
        first = self.val_data[0]
        prompt = self.style.apply(first["instruction"], first.get("input", ""))
        ids = self.tokenizer.encode(prompt, bos=self.style.add_bos).to(self.fabric.device)
        stops = stop_token_ids(self.tokenizer, self.style)
        # Eager even under --compile: one row whose length grows each token would cost compiles of its own,
        # more time than its few small forward passes could save
        with torch.compiler.set_stance("force_eager") if self.args.compile else contextlib.nullcontext():
            new = greedy_without_cache(self.model, ids, self.args.sample_tokens, stop_ids=stops)
        return self.tokenizer.decode(new)

    def save(self, state: train_state.State) -> None:
        """The weights file first, then the checkpoint: the newest checkpoint is never of a later step than the
        weights file, so a run killed in between resumes from the checkpoint before and writes both again. Weights
        gone non-finite are written as neither: the checkpoint the error names stays a good one."""
        nonfinite = torch.tensor(train_state.nonfinite_weights(self.raw), device=self.fabric.device)
        if self.fabric.all_reduce(nonfinite, reduce_op="sum") > 0:
            self.stop("the weights became non-finite", state.step)
        weights = train_state.gather_trainable(self.raw, to_rank0=self.fabric.global_rank == 0)
        if self.fabric.global_rank == 0:
            save_state_dict(weights, self.args.out_dir / self.method.weights_name)
        self.fabric.barrier()
        train_state.save(self.fabric, self.raw, self.optimizer, self.scheduler, state, self.args.out_dir, self.run_id)


def throughput(tokens: Counter, seconds: float, prefix: str = "") -> dict[str, float | None]:
    """Tokens/s of the samples themselves (padding not counted) and of the tokens with a loss, and padding's share
    of the batches; None before any step."""
    done = seconds > 0 and tokens["padded"] > 0
    return {f"{prefix}tokens_per_s": tokens["real"] / seconds if done else None,
            f"{prefix}trained_tokens_per_s": tokens["trained"] / seconds if done else None,
            f"{prefix}padding_share": 1 - tokens["real"] / tokens["padded"] if done else None}


