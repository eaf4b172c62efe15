"""The memory plan: a run's peak memory, estimated before a weight is read, and the micro batch that fits.

    weights      every parameter at its stored size (an NF4 weight: half a byte, plus its scales)
    gradients    one per trainable parameter, in its dtype
    optimizer    AdamW's two moments per trainable parameter, in its dtype
    activations  what autograd keeps from the forward pass for the backward pass, for one micro batch
    backward     the backward pass's own working memory: one block's activations, recomputed (activation
                 checkpointing) or flowing back as gradients
    loss         the logits the loss holds at once: one chunk of positions (the fast, chunked loss) or the
                 whole micro batch's (B, T, vocab)
    process      what the process holds before the model exists: Python, torch (on a GPU: not counted)
    step         AdamW's temporaries while it updates the weights: on a GPU, where it updates all tensors of
                 a dtype together (foreach), one more copy of the trained parameters; on a CPU, one tensor at a
                 time, two copies of the largest. The activations are freed by then, so the peak counts the
                 larger of the two

The activations are not derived by hand: the forward pass of the run's own model (its method, precision,
quantization, loss and --packing) runs on fake tensors (torch's FakeTensorMode: shapes and dtypes only, no
memory and no arithmetic), for 1 and for 2 samples, and the tensors autograd saves are summed. It sees what the
code saves, so it follows the code when the code changes; tests/test_memory.py compares it with a real step.
Packed rows, for instance, attend under a per-sample float mask (B, 1, T, T) that every layer keeps a reference
to for the backward pass, and their rotary tables are gathered per token, (B, 1, T, head_size) instead of a view
of the shared table.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from litft import fast, nf4, qlora
from litft.config import Config
from litft.errors import UserError
from litft.fast.chunked_loss import CHUNK_TOKENS
from litft.model import Llama
from litft.precision import AUTOCAST, base_dtype, train_in_fp32
from litft.train_args import Method, TrainArgs

GB = 1e9
MARGIN = 0.9  # plan to use at most this share of the free memory


PARTS = ("weights", "gradients", "optimizer", "activations", "backward", "loss", "process")


@dataclass
class Plan:
    weights: float
    gradients: float
    optimizer: float
    activations: float  # what autograd saves for the backward pass
    backward: float
    loss: float
    process: float
    step: float = 0.0  # AdamW's temporaries, held when the activations, backward and loss are not
    gathered: float = 0.0  # the weights FSDP holds whole on each process: the root's and two blocks' (`sharded`)
    workspace: float = 0.0  # a 4-bit model's (among the weights): each process holds its own
    samples: int = 1  # the micro batch this plan is for
    per_sample: tuple[float, float, float] = (0.0, 0.0, 0.0)  # what one more sample adds to activations, backward,
    # loss

    @property
    def total(self) -> float:
        held = self.weights + self.gradients + self.optimizer + self.process  # through the whole step
        return held + max(self.activations + self.backward + self.loss, self.step)

    def with_micro_batch(self, samples: int) -> "Plan":
        """This plan for a micro batch of `samples`: only the activations, the backward pass and the loss grow."""
        extra = samples - self.samples
        return replace(self, activations=self.activations + extra * self.per_sample[0],
                       backward=self.backward + extra * self.per_sample[1],
                       loss=self.loss + extra * self.per_sample[2], samples=samples)

    def sharded(self, shards: int) -> "Plan":
        """This plan for one of `shards` FSDP processes (litft/train_setup.py shard_blocks): 1/N of every weight,
        gradient, AdamW moment and step temporary, plus the weights it gathers whole: the root's (embedding, final
        norm, lm_head), which stay gathered from the forward pass to the end of the backward one, and two blocks'
        at a time (the one computing, the next gathered ahead)."""
        if shards == 1:
            return self
        weights = (self.weights - self.workspace) / shards + self.gathered + self.workspace
        return replace(self, weights=weights, gradients=self.gradients / shards, optimizer=self.optimizer / shards,
                       step=self.step / shards)

    def describe(self, seq: int) -> str:
        parts = ", ".join(f"{part} {getattr(self, part) / GB:.2f}" for part in PARTS) + \
            f", optimizer step {self.step / GB:.2f}"
        return f"estimated peak {self.total / GB:.2f} GB ({parts}; micro batch {self.samples} × {seq} tokens)"


def plan(config: Config, prepare: Callable[[Llama], None], seq: int, *, dtype: torch.dtype,
         autocast: torch.dtype | None, quantize: str | None, activation_checkpointing: bool,
         loss: Callable[[Llama], Callable], device: torch.device, loss_chunk: int | None = CHUNK_TOKENS,
         packing: bool = False) -> Plan:
    """The plan for one sample of `seq` tokens (`with_micro_batch` scales it) of a run whose model is
    Llama(config) in `dtype`, prepared by `prepare` (its method), quantized by `quantize`, trained with the loss
    `loss(model)` returns, under autocast to `autocast` (mixed precision); `loss_chunk`: the positions whose
    logits exist at once (the fast loss's chunk; None for the plain loss, which holds the whole micro batch's).
    `packing`: rows of packed samples (a sample is then a row), whose per-sample attention mask (B, 1, T, T)
    and rotary tables gathered per token the forward pass makes and autograd keeps.

    The probe runs 1 and 2 samples: some saved buffers are per batch (the chunked loss's gradient of a trained
    lm_head), the rest grows with each sample."""
    def probe_with(samples: int, checkpointing: bool) -> dict:
        return probe(config, prepare, seq, samples, dtype, autocast, quantize, checkpointing, loss, packing)

    one, two = probe_with(1, activation_checkpointing), probe_with(2, activation_checkpointing)
    per_sample = two["saved"] - one["saved"]
    if activation_checkpointing:  # the backward pass recomputes one block at a time: a block's activations
        block = (probe_with(2, False)["saved"] - probe_with(1, False)["saved"]) / config.n_layer
    else:  # the backward pass's gradients flowing through one block take about what the block saved
        block = per_sample / config.n_layer
    logits = config.vocab_size * 4  # bytes of one position's fp32 logits
    if loss_chunk:  # one chunk of positions at a time, however large the micro batch: logits, softmax, gradient
        loss_bytes, loss_per_sample = min(loss_chunk, seq) * 3 * logits, 0
    else:  # the whole micro batch's: the log-softmax autograd saves is among the activations; two gradients more
        loss_bytes = loss_per_sample = seq * 2 * logits
    return Plan(weights=one["weights"], gradients=one["trainable"], optimizer=2 * one["trainable"],
                activations=one["saved"], backward=block, loss=loss_bytes,
                process=0.0 if device.type == "cuda" else resident_bytes(),
                step=one["trainable"] if device.type == "cuda" else 2 * one["largest"],
                gathered=one["root"] + 2 * one["block"], workspace=one["workspace"],
                per_sample=(per_sample, block, loss_per_sample))


def probe(config: Config, prepare, seq: int, samples: int, dtype, autocast, quantize, activation_checkpointing,
          loss, packing: bool = False) -> dict:
    """`samples` samples (packed rows, with `packing`) of `seq` tokens through a fake copy of the model: bytes of
    its weights, of its trainable parameters, and of what autograd saves for the backward pass (parameters
    excluded, each storage once)."""
    default = torch.get_default_dtype()
    nf4.byte_levels(torch.device("cpu")), nf4.dynamic_code()  # cached tables: build them real, not fake
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_default_dtype(dtype)  # built in dtype: .to() cannot convert fake parameters in place
        try:  # RoPE scaling changes the tables' values, not their size; dynamic scaling would read the positions
            model = Llama(replace(config, rope_scaling=None))
        finally:
            torch.set_default_dtype(default)
        model.requires_grad_(False)
        prepare(model)
        if quantize:
            qlora.quantize(model, quantize)
        model.activation_checkpointing = activation_checkpointing
        loss_fn = loss(model)
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        saved: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in params:
                saved[storage._cdata] = storage.nbytes()
            return t

        x = torch.zeros(samples, seq, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss_fn(model.train(), x, x, packed_pos=two_per_row(samples, seq) if packing else None)
        size = lambda params: sum(p.numel() * p.element_size() for p in unique(params))  # noqa: E731
        in_blocks = {p.untyped_storage()._cdata for p in model.blocks.parameters()}
        return {"weights": size(model.parameters()) + workspace_bytes(model), "workspace": workspace_bytes(model),
                "root": size(p for p in model.parameters() if p.untyped_storage()._cdata not in in_blocks),
                "block": size(model.blocks[0].parameters()),
                "trainable": sum(p.numel() * p.element_size() for p in unique(model.parameters()) if p.requires_grad),
                "largest": max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                               default=0),
                "saved": sum(saved.values())}


def workspace_bytes(model: torch.nn.Module) -> int:
    """What a 4-bit model keeps for rebuilding its weights (litft/nf4.py Workspace): the largest layer's Ŵ, in
    fp32 and in the compute dtype, and its byte indices; held for the whole run, beside the NF4 weights."""
    spaces = {id(m.workspace): m.workspace for m in model.modules() if isinstance(m, qlora.NF4Linear)}
    return sum(t.numel() * t.element_size() for space in spaces.values() for t in space.slots.values())


def two_per_row(rows: int, seq: int) -> torch.Tensor:
    """packed_pos (rows, seq) of rows that each hold two samples. What the forward pass saves depends on the
    shapes only (the mask is (B, 1, T, T) however the samples fall), so any layout stands for all."""
    half = seq // 2
    return torch.cat([torch.arange(half), torch.arange(seq - half)]).expand(rows, seq)


def unique(params) -> list[torch.Tensor]:
    return list({p.untyped_storage()._cdata: p for p in params}.values())


def peak_memory_gb(device: torch.device) -> float:
    """The process's peak so far: on a GPU what torch allocated there, on a CPU the resident set (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def resident_bytes() -> float:
    """This process's resident memory now (Linux), 0 where unknown."""
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.is_file() else 0.0


def allocator() -> str | None:
    """The C allocator under torch's CPU tensors: tcmalloc or jemalloc when preloaded (LD_PRELOAD puts their own
    entry points, tc_malloc and mallctl, among the process's global symbols), else glibc's malloc; None for
    another C library."""
    if os.name != "posix":
        return None
    symbols = ctypes.CDLL(None)  # the global scope: the program, its libraries and what was preloaded
    if hasattr(symbols, "tc_malloc"):
        return "tcmalloc"
    if hasattr(symbols, "mallctl"):
        return "jemalloc"
    return "glibc" if platform.libc_ver()[0] == "glibc" else None


def free_bytes(device: torch.device) -> float:
    """Memory a run may still take: free GPU memory, or the RAM the kernel reports available (plus what this
    process already holds, which the plan counts as `process`)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return float("inf")
    available = int(meminfo.read_text().split("MemAvailable:")[1].split()[0]) * 1024
    return available + resident_bytes()


# ---- a training run's plan: printed before the weights are read; --micro_batch_size auto ---------------------


def plan_run(args: TrainArgs, method: Method, seq: int, world_size: int, device: torch.device,
             rows: int | None = None) -> tuple[int, str]:
    """(the micro batch size to use, the line to print). With --micro_batch_size auto: the largest that divides
    the batch, fits, and that the `rows` of training data fill on every process; otherwise the one asked for,
    refused in one line when its estimate does not fit."""
    config = Config.from_checkpoint(args.checkpoint_dir)
    per_step = args.batch_size // world_size
    local = 1 if device.type == "cuda" else args.devices  # a CPU's processes share its memory
    free = free_bytes(device)

    one = plan(config, prepared_as_trained(method, args.precision), seq,
               dtype=base_dtype(args.precision, args.checkpoint_dir), autocast=AUTOCAST.get(args.precision),
               quantize=args.quantize, activation_checkpointing=args.activation_checkpointing,
               loss=lambda model: fast.for_training(model, args.fast), device=device,
               loss_chunk=CHUNK_TOKENS if args.fast else None, packing=args.packing)
    estimate = one.sharded(world_size if args.strategy == "fsdp" else 1).with_micro_batch

    if args.micro_batch_size == "auto":
        most = min(per_step, (rows or per_step * world_size) // world_size)
        fitting = [m for m in range(most, 0, -1) if per_step % m == 0 and local * estimate(m).total <= MARGIN * free]
        if not fitting:
            raise UserError(f"--micro_batch_size auto: not even 1 sample of {seq} tokens fits the {free / GB:.1f} GB "
                            f"free ({estimate(1).describe(seq)}); {ADVICE}")
        micro = fitting[0]
    else:
        micro = args.micro_batch_size
    chosen = estimate(micro)
    line = f"memory plan: {chosen.describe(seq)} of {free / GB:.1f} GB free" + \
        (f" ({local} processes share it)" if local > 1 else "")
    if local * chosen.total > free:
        raise UserError(f"{line}: it does not fit; {ADVICE}")
    if device.type == "cpu" and allocator() == "glibc":
        line += f"\n{GLIBC_NOTE}"
    return micro, line


def prepared_as_trained(method: Method, precision: str) -> Callable[[Llama], None]:
    """The method's `prepare`, then what litft/train_setup.py does next: under *-mixed, the trained weights in fp32
    (litft/precision.py)."""
    def prepare(model: Llama) -> None:
        method.prepare(model)
        if precision in AUTOCAST:
            train_in_fp32(model)
    return prepare


ADVICE = ("lower --micro_batch_size (auto picks the largest that fits), or use --activation_checkpointing true, "
          "--quantize nf4 (LoRA, adapters), a shorter --max_seq_length or more --devices with --strategy fsdp")
GLIBC_NOTE = ("memory plan: glibc's malloc keeps freed memory resident, so the peak may reach 2× the plan; "
              "LD_PRELOAD=libtcmalloc_minimal.so.4 keeps it near the plan (howto/train.md section 8)")
