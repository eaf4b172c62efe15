"""Speed, behind one seam: what litft does beyond the textbook code, and the one call that applies it.

litft/model.py, lora.py, adapter.py and adapter_v2.py are written as their equations. Training and generation
call one function here, `for_training` or `for_generation`, which swaps in faster layers and a faster loss with
the same value (to float rounding) at LoRA dropout 0; with dropout, each element is still dropped with the same
probability, but q/k/v and gate/up share one mask and, on a CPU, p is rounded to a multiple of 2⁻¹⁵ (lora_dropout.py). With `--fast false` (every finetune/ and generate/ script, and
scripts/evaluate.py) the textbook path runs instead; tests/ run the parity tests on both.

Training (`for_training`), SmolLM2-135M, micro batch 4, seq 256, 2 CPU cores (bench/RESULTS.md, "what each
change bought"):

- chunked loss with gradients in the forward pass (chunked_loss.py): the (B·T, vocab) logits never exist at
  once; the LoRA step's memory over the built model 2271 -> 1844 MB (715 -> 289 MB with activation
  checkpointing) at no cost in time (5.49 -> 5.46 s); with bf16 casts done once, bf16 3.44 -> 3.30 s.
- fused LoRA (fused_lora.py): the frozen GEMM adds B·A·x on its way out; one layer 668 -> 519 ms, fp32 step
  at dropout 0 4.90 -> 4.55 s (at dropout 0.05 and in bf16, within noise).
- shared and cheap dropout masks (lora_dropout.py): q/k/v and gate/up share one mask (fp32 step 5.58 ->
  5.25 s), cast before dropping under bf16 (bf16 4.18 -> 3.73 s), and a mask costs one 64-bit draw per four
  elements (bf16 3.73 -> 3.26 s, fp32 ~5.3 -> 4.76 s).
- torch.compile of each block (`--compile true`, also on the plain path): on an H200 the Llama-2-7B LoRA
  step 537 -> 468 ms (GPU run 3); on 2 CPU cores no gain, so off by default.

Together, on that machine (bench/RESULTS.md, run 11), the plain path takes 1.42× (fp32) and 1.57× (bf16) the
fast path's step time and 1.46× / 1.35× its peak memory.

Generation (`for_generation`):

- an fp32 LoRA is merged into its weights (W + (α/r)·B·A, exact to rounding): it decodes at the base
  model's speed, 25–27 tokens/s instead of 15.6 unmerged on SmolLM2-135M.
- the CPU decoding layout (cpu_decoding.py): fp32 weights reordered once for oneDNN's kernels; one sequence
  decodes 1.8× faster than with nn.Linear, and 32-row products run 1.6–3.6× faster (bench/cpu_linear.py).
  Such weights are read into memory rather than memory-mapped, so each original is freed as soon as its copy
  exists.
"""

from __future__ import annotations

from typing import Callable

import torch

from litft.fast.chunked_loss import chunked_lm_loss
from litft.fast.cpu_decoding import prepare_for_cpu_decoding, uses_cpu_layout
from litft.fast.fused_lora import fuse_lora
from litft.lora import LoRAEmbedding, LoRALinear, merge_lora
from litft.loss import LossFn, causal_lm_loss
from litft.model import Llama


def for_training(model: Llama, fast: bool = True, compile: bool = False) -> LossFn:
    """Prepare a model that is about to be trained (its method applied, not yet sharded), in place, and return
    the loss to train it with: `compile` on either path, then (fast) the fused LoRA layers and the chunked loss.

    The chunked loss calls `model.hidden_states`; wrapped for DDP or FSDP, that method must be registered as a
    forward method, and called under the run's autocast (litft/train.py does both)."""
    if compile:
        for block in model.blocks:  # in place: the state dict's names stay the same
            block.compile()
    if not fast:
        return causal_lm_loss
    fuse_lora(model)
    return chunked_lm_loss


def for_generation(load: Callable[..., Llama], device: torch.device | str, dtype: torch.dtype | None,
                   fast: bool = True) -> Llama:
    """`load(device=, dtype=, mmap=)` a model for inference and apply the decoding measures; returns it in eval
    mode. It takes the loader rather than a model because the CPU layout decides how the weights are read (in
    memory, not memory-mapped). With fast=False the model is used as loaded."""
    cpu_layout = fast and uses_cpu_layout(device, dtype or torch.float32)
    model = load(device=device, dtype=dtype, mmap=not cpu_layout).eval()
    if not fast:
        return model
    has_lora = any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules())
    if has_lora and model.embed.weight.dtype == torch.float32:  # in 16 bits W + (α/r)·B·A would round away updates
        merge_lora(model)
    return prepare_for_cpu_decoding(model)
