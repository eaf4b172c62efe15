"""Decode speed: litft's KV-cache loop against transformers' and litgpt's `generate`, same weights, same task.

    python bench/decode.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Each round times every library producing `new_tokens` greedy tokens after a `prompt_tokens`-long prompt
(prefill included), alternating litft, transformers, litgpt, litft, … so that a machine that speeds up or
slows down during the run affects all alike. litft runs as generate/ scripts run it, with the CPU decoding
layout (litft/fast/cpu_decoding.py). It prints each round, the medians and their ratios to litft.
Without --checkpoint_dir it uses SmolLM2-135M's shapes with random weights (speed does not depend on the
values, but then the two token sequences may differ where random logits nearly tie).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from litft.checkpoint import load_lit_model
from litft.cli import run
from litft.config import Config
from litft.fast.cpu_decoding import prepare_for_cpu_decoding
from litft.generate import generate
from litft.model import Llama


def litft_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """litft names -> transformers' LlamaForCausalLM names."""
    out = {}
    for name, tensor in state_dict.items():
        hf = name.replace("blocks.", "layers.").replace("attn.", "self_attn.").replace("embed.", "embed_tokens.")
        hf = hf.replace("attn_norm", "input_layernorm").replace("mlp_norm", "post_attention_layernorm")
        out[hf if hf.startswith("lm_head") else f"model.{hf}"] = tensor
    return out


def build_models(checkpoint_dir: Optional[Path]) -> tuple[Llama, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if checkpoint_dir is not None:
        ours = load_lit_model(checkpoint_dir, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        ours = Llama(Config.from_name("SmolLM2-135M-Instruct"))
        for p in ours.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else None
    hf = LlamaForCausalLM(LlamaConfig(**ours.config.to_hf_config()))
    hf.load_state_dict(litft_to_hf(ours.state_dict()), strict=True)
    return ours.eval(), hf.eval()


def build_litgpt(ours: Llama) -> torch.nn.Module:
    """litgpt's GPT holding the same weights (fused qkv), with its KV cache for one sequence."""
    from frameworks import litgpt_shapes, to_litgpt_state_dict
    from litgpt.model import GPT
    from litgpt.model import Config as LitGPTConfig

    c = ours.config
    model = GPT(LitGPTConfig(**litgpt_shapes(c)))
    model.load_state_dict(to_litgpt_state_dict(ours.state_dict(), c))
    return model.eval()


def timed(fn: Callable[[], list[int]]) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = fn()
    return time.perf_counter() - start, ids


def main(checkpoint_dir: Optional[Path] = None, prompt_tokens: int = 128, new_tokens: int = 128, rounds: int = 3,
         threads: Optional[int] = None) -> None:
    """Compare greedy decode tokens/s of litft, transformers and litgpt (skipped if it cannot be imported) on one
    model in fp32 on the CPU.

    Args:
        checkpoint_dir: a lit checkpoint (default: SmolLM2-135M's shapes with random weights).
        prompt_tokens: prompt length (random token ids).
        new_tokens: tokens generated per run.
        rounds: timed rounds per library (after one warm-up each).
        threads: torch CPU threads (default: torch's choice).
    """
    if threads:
        torch.set_num_threads(threads)
    ours, hf = build_models(checkpoint_dir)
    prompt = torch.randint(0, ours.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))

    def run_litft() -> list[int]:
        return list(generate(ours, prompt, new_tokens, temperature=0))

    try:
        litgpt = build_litgpt(ours)
    except Exception as e:  # not installed, or does not fit this torch: skipped, as bench/gpu.py does
        litgpt = None
        print(f"litgpt: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); skipped",
              file=sys.stderr)
    prepare_for_cpu_decoding(ours)  # as generate_cli does after loading (last: the others copy its weights)

    def run_litgpt() -> list[int]:
        from litgpt.generate.base import generate as litgpt_generate

        litgpt.max_seq_length = prompt_tokens + new_tokens
        litgpt.set_kv_cache(batch_size=1)
        with torch.inference_mode():
            out = litgpt_generate(litgpt, prompt, prompt_tokens + new_tokens, temperature=0.0, include_prompt=False)
        litgpt.clear_kv_cache()
        return out.tolist()

    def run_hf() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(prompt[None], attention_mask=torch.ones(1, prompt_tokens, dtype=torch.long),
                              do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)
        return out[0, prompt_tokens:].tolist()

    print(f"{ours.config.name or 'model'}: prompt {prompt_tokens}, {new_tokens} new tokens, greedy, fp32, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    libraries = {"litft": run_litft, "transformers": run_hf}
    if litgpt is not None:
        libraries["litgpt"] = run_litgpt
    compare(libraries, rounds, new_tokens)


def compare(libraries: dict, rounds: int, new_tokens: int) -> None:
    """Warm each library up, time `rounds` alternating rounds, and print median tokens/s against litft's."""
    ids = {name: fn() for name, fn in libraries.items()}  # warm-up, and the tokens to compare
    speeds: dict[str, list[float]] = {name: [] for name in libraries}
    for r in range(rounds):
        for name, fn in libraries.items():
            seconds, new = timed(fn)
            speeds[name].append(len(new) / seconds)
            print(f"round {r + 1} {name:>12}: {speeds[name][-1]:6.1f} tokens/s ({seconds:.2f} s)")
    lit = statistics.median(speeds["litft"])
    for name in [n for n in libraries if n != "litft"]:
        same = sum(a == b for a, b in zip(ids["litft"], ids[name]))
        other = statistics.median(speeds[name])
        print(f"median litft {lit:.1f} tokens/s, {name} {other:.1f} tokens/s: litft is {lit / other:.2f}x "
              f"(greedy ids identical at {same}/{new_tokens} positions)")


if __name__ == "__main__":
    run(main)
