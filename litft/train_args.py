"""What a fine-tuning run is told: the flags every recipe shares (TrainArgs) and what its method adds (Method).

Every flag value is checked before anything is converted, prepared or written (`TrainArgs.validate`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping

import torch

from litft import run_dir
from litft.base_checkpoint import DEFAULT_CHECKPOINT
from litft.errors import UserError
from litft.model import Llama
from litft.nf4 import check_scheme

PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "32-true")  # 16-true: refused in `validate`, with why
AT_LEAST_ONE = ("max_steps", "batch_size", "micro_batch_size", "devices", "num_nodes", "eval_interval", "eval_iters",
                "save_interval", "log_interval", "pad_to_multiple_of")
# what a launcher (torchrun, SLURM, LSF, MPI) sets in each process it starts, or a user in each node's one command
# that Fabric then starts its processes from (NODE_RANK, with MASTER_ADDR and MASTER_PORT): the nodes' ranks
LAUNCHERS = ("WORLD_SIZE", "NODE_RANK", "SLURM_NTASKS", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclass
class TrainArgs:
    """The flags every finetune/ recipe shares. A recipe changes their defaults, not their meaning."""

    data: str = "alpaca"  # alpaca, dolly, viggo, gsm8k, sql, games (prepared on first use) or a prepared directory
    checkpoint_dir: Path = DEFAULT_CHECKPOINT  # SmolLM2-135M-Instruct, converted from the offline GGUF on first use
    out_dir: Path = Path("out/finetune")
    precision: str | None = None  # bf16-mixed, bf16-true, 16-mixed, 32-true; default bf16-mixed on a GPU, else 32-true
    quantize: str | None = None  # nf4 or nf4-dq: the frozen base in 4 bits (QLoRA, litft/qlora.py); not full
    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # samples per optimizer step, across all processes
    micro_batch_size: int | Literal["auto"] = 4  # samples per forward/backward on one process; auto: the largest
    # that divides the batch and that the memory plan (litft/memory.py) fits in the free memory
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100  # counted in optimizer steps
    min_lr: float = 0.0  # the cosine schedule decays to this
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    max_seq_length: int | None = None  # truncate batches to this many tokens
    pad_to_multiple_of: int | None = None  # pad each micro batch to a multiple of this many tokens (at most
    # max_seq_length), so that a run sees a few batch shapes (litft/data.py batch_length); default 16 in 16 bits, else 1
    packing: bool = False  # samples packed into rows of max_seq_length tokens; batch sizes then count rows
    preview: int = 0  # print this many training samples as the model sees them, and the data's checks, first
    eval_interval: int = 100
    eval_iters: int = 20  # validation micro batches per evaluation
    save_interval: int = 100
    log_interval: int = 1
    sample_tokens: int = 32  # tokens generated for the sample shown at each evaluation; 0 turns the sample off
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block: fused kernels on a GPU; the first steps compile
    fast: bool = True  # litft/fast's measures (chunked loss, fused LoRA, shared dropout masks); false: the textbook path
    seed: int = 1337
    resume: bool = False  # continue the run in out_dir (it must be the same run: see litft/run_dir.py)
    overwrite: bool = False  # replace the run in out_dir; without it a used out_dir is refused

    def validate(self) -> None:
        """Refuse, in one line naming the value and what is allowed, a flag value that cannot work — before
        anything is converted, prepared or written."""
        for name in AT_LEAST_ONE:
            if getattr(self, name) not in ("auto", None) and getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)}: must be at least 1")
        for name in ("warmup_steps", "sample_tokens", "weight_decay", "grad_clip", "min_lr"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name} {getattr(self, name)}: must be 0 or more")
        if not 0 < self.learning_rate < math.inf:
            raise UserError(f"--learning_rate {self.learning_rate}: must be a positive number (e.g. 3e-4)")
        if self.learning_rate > 1e36:  # AdamW's first step, lr / (1 - β₁) = 10 lr, must be a float32 (< 3.4e38)
            raise UserError(f"--learning_rate {self.learning_rate}: too large for AdamW, whose step size overflows "
                            "float32 past about 3e37 (e.g. 3e-4)")
        if self.min_lr > self.learning_rate:
            raise UserError(f"--min_lr {self.min_lr}: must not exceed --learning_rate {self.learning_rate}")
        processes = self.devices * self.num_nodes
        if not 0 <= self.seed <= 2**32 - processes:  # each process seeds itself with --seed + its rank (< 2³²)
            raise UserError(f"--seed {self.seed}: must be between 0 and {2**32 - processes}")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise UserError(f"--max_seq_length {self.max_seq_length}: must be at least 2 (a token and EOS)")
        check_scheme(self.quantize)
        if self.precision == "16-true":
            raise UserError("--precision 16-true: AdamW's eps (1e-8) is 0 in float16, so a weight whose gradient is 0 "
                            "(LoRA's A at the first step, an unused token's embedding row) becomes NaN; train in "
                            "bf16-true, bf16-mixed, 32-true or, on a GPU, 16-mixed")
        if self.precision == "16-mixed" and not torch.cuda.is_available():  # Lightning would run bf16, saying 16
            raise UserError("--precision 16-mixed: fp16 autocast needs a GPU; on a CPU use bf16-mixed or 32-true")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if torch.cuda.is_available() and self.devices > torch.cuda.device_count():
            raise UserError(f"--devices {self.devices}: this machine has {torch.cuda.device_count()} GPUs")
        self.check_launcher(os.environ)
        if self.micro_batch_size != "auto":  # auto is resolved once the model's shape and the data are known
            self.micro_batches(self.devices * self.num_nodes)
        run_dir.check_out_dir(self)

    def fill_defaults(self, on_gpu: bool) -> None:
        """The defaults that depend on the machine, made explicit (hyperparameters.yaml records them): bf16-mixed
        on a GPU, fp32 on a CPU; micro batches padded to multiples of 16 in 16 bits, where on a CPU it saved memory
        (litft/data.py batch_length), and to their longest sample in fp32, where it would only add work."""
        self.precision = self.precision or ("bf16-mixed" if on_gpu else "32-true")
        if self.pad_to_multiple_of is None:
            self.pad_to_multiple_of = 1 if self.precision == "32-true" else 16

    def batch_multiple(self) -> int:
        """What a micro batch's length is rounded up to: --pad_to_multiple_of, or 1 for packed rows, which are padded
        to their longest row only (litft/packing.py)."""
        return 1 if self.packing else self.pad_to_multiple_of

    def check_launcher(self, env: Mapping[str, str]) -> None:
        """Under a launcher (torchrun, srun with torchrun's variables, Fabric's own child processes) WORLD_SIZE
        processes run; --devices × --num_nodes must say the same, or they would wait for each other forever."""
        world, per_node = env.get("WORLD_SIZE"), env.get("LOCAL_WORLD_SIZE")
        if self.num_nodes > 1 and not any(name in env for name in LAUNCHERS):  # node 0 would wait for the others
            raise UserError(f"--num_nodes {self.num_nodes} needs a launcher on each node (torchrun, srun) or "
                            "NODE_RANK, MASTER_ADDR and MASTER_PORT set by hand; see howto/train.md section 5")
        if world is None or int(world) == self.devices * self.num_nodes:
            return
        hint = f"; pass --devices {per_node} --num_nodes {int(world) // int(per_node)}" if per_node else ""
        raise UserError(f"--devices {self.devices} × --num_nodes {self.num_nodes} is {self.devices * self.num_nodes} "
                        f"processes, but the launcher started {world} (WORLD_SIZE){hint}")

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
    quantizable: bool = False  # its frozen base may be stored in NF4 (--quantize): LoRA, adapters (they only read W)

    def check_quantize(self, quantize: str | None) -> None:
        if quantize is not None and not self.quantizable:
            raise UserError(f"--quantize {quantize}: the {self.name} method cannot train on a 4-bit base; LoRA and the "
                            "adapters can (finetune/lora.py, adapter.py, adapter_v2.py); drop --quantize here")
