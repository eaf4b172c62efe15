"""Export a LoRA run as a PEFT adapter: adapter_config.json + adapter_model.safetensors.

    python scripts/export_peft.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --lora_path out/lora/lit_model_lora.pth --output_dir out/lora/peft

The result loads with peft onto transformers' model of the same base (tests/test_merge_export.py,
tests/test_verify.py; transformers' own `model.load_adapter("out/lora/peft")` reads it too):

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")
    model = PeftModel.from_pretrained(model, "out/lora/peft")

On a base with tied embeddings (SmolLM2, Llama 3.2 1B/3B), a LoRA on embed or lm_head works in peft unmerged, but
peft's `merge_and_unload` adds its update to the one matrix both layers share (tests/test_merge_export.py shows
the merged model computing something else); the script says so, and scripts/merge_lora.py merges such a run.

No other reader of PEFT adapters (vLLM's LoRA support, ...) is tested here; for those, merge the run
(scripts/merge_lora.py) and export the merged model (convert_lit_checkpoint.py, export_gguf.py).

Only names change: litft's blocks.{i}.attn.q_proj.lora_A becomes PEFT's
base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight (embeddings: lora_embedding_A / _B, which PEFT
stores without `.weight`). r, α, rsLoRA and the targets come from the run's lora.yaml. Writing does not read
the base weights (the model is built on the meta device only to check that the file fits the base's shapes);
the verification below does.

A run with new tokens exports their rows as PEFT's trainable tokens (`trainable_token_indices`: ids V, V + 1,
...; PEFT ≥ 0.15, tested with 0.21) together with the grown tokenizer (and, for a bare tokenizer.model, the BOS
rule and chat template in tokenizer_config.json: litft/hf_prompting.py); grow the base model to the tokenizer's
size before loading the adapter:

    tokenizer = AutoTokenizer.from_pretrained("out/lora/peft")
    model.resize_token_embeddings(len(tokenizer))

A QLoRA run (lora.yaml's quantize: nf4 or nf4-dq) exports the same way; its A and B learnt to correct the NF4
base, which transformers builds with bitsandbytes (the line printed at the end names the settings), from the
weights in the dtype it loads them in, which must be the checkpoint's own, as litft quantized them:

    dtype=torch.float32, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                bnb_4bit_use_double_quant=False)

Verification (`--verify true`, the default): peft loads the written adapter onto transformers' copy of the base
(for a QLoRA run, the base's NF4 weights dequantized, Ŵ) and must compute what litft's LoRA model computes
(litft/verify.py); one `verified: ...` line, or it stops.

Everything is checked (shapes, targets, that the base's tokenizer can take the new tokens) before the first file is
written; the files are written into a scratch directory inside --output_dir and moved into place only once
verified, so a failed or interrupted export leaves an earlier one as it was. An existing --output_dir is replaced
only when an earlier run of this script wrote it (its litft_export.yaml says so) or with `--overwrite true`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from litft.base_checkpoint import base_of, warn_if_trained_on_another
from litft.checkpoint import WEIGHTS
from litft.cli import run
from litft.config import CONFIGS, Config
from litft.convert_hf import lit_to_hf_name
from litft.errors import UserError
from litft.files import (
    TOKENIZER_FILES,
    atomic_path,
    atomic_write_text,
    check_output_dir,
    check_replaceable,
    load_state_dict,
    run_dir_of,
    staged_output,
    write_written_by,
)
from litft.hf_prompting import write_tokenizer_config
from litft.kinds import check_checkpoint
from litft.load_finetuned import (
    check_lora_state_dict,
    check_same_base,
    load_finetuned,
    lora_settings,
    weights_in,
)
from litft.lora import LoRAConfig, add_lora
from litft.model import Llama
from litft.new_tokens import grown_tokenizer_files, write_tokenizer
from litft.nf4 import SCHEMES, check_scheme
from litft.prompts import resolve_style
from litft.readers import peft_adapter, require_readers
from litft.tokenizer import Tokenizer
from litft.verify import check, prompting, reference

SCRIPT = "scripts/export_peft.py"
HF_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
              "down": "down_proj", "embed": "embed_tokens", "lm_head": "lm_head"}


def peft_name(lit_name: str) -> str:
    """blocks.3.attn.q_proj.lora_A -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"""
    module, _, tensor = lit_name.rpartition(".")
    hf_module = lit_to_hf_name(f"{module}.weight").removesuffix(".weight")
    if tensor == "new_rows":  # new-token rows: PEFT's trainable tokens, which replace rows V, V + 1, ...
        return f"base_model.model.{hf_module}.token_adapter.trainable_tokens_delta"
    if module == "embed":
        return f"base_model.model.{hf_module}.{tensor.replace('lora_', 'lora_embedding_')}"
    return f"base_model.model.{hf_module}.{tensor}.weight"


def adapter_config(lora: LoRAConfig, base: Config, base_path: str) -> dict:
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    new_ids = list(range(base.vocab_size, base.vocab_size + len(lora.new_tokens)))
    # tied embeddings: PEFT ties lm_head's rows to embed_tokens' by itself; otherwise name both layers
    trainable_tokens = new_ids if base.tie_embeddings else {"embed_tokens": new_ids, "lm_head": new_ids}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
        "r": lora.r, "lora_alpha": alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": sorted(HF_MODULES[t] for t in lora.targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "trainable_token_indices": trainable_tokens if new_ids else None,
    }


def main(lora_path: Path, output_dir: Path, checkpoint_dir: Optional[Path] = None, verify: bool = True,
         overwrite: bool = False) -> None:
    """Write --lora_path as a PEFT adapter (adapter_config.json, adapter_model.safetensors) in --output_dir.

    Args:
        lora_path: the run's lit_model_lora.pth (its folder holds lora.yaml), or that run directory.
        output_dir: where to write the adapter (created if needed).
        checkpoint_dir: the base lit checkpoint the LoRA run was trained on (model_config.yaml; with new tokens,
            its tokenizer files too); default: the one the run's base.yaml records.
        verify: load the adapter with peft onto transformers' base and compare it with litft's LoRA model.
        overwrite: replace the files of a directory that this script did not write.
    """
    lora_path = weights_in(Path(lora_path))  # a run directory: its lit_model_lora.pth
    checkpoint_dir = check_checkpoint(checkpoint_dir or base_of(run_dir_of(lora_path)))
    output_dir = Path(output_dir)
    if verify:
        require_readers(peft=True)  # before anything is written
    check_output_dir("--output_dir", output_dir, "a PEFT adapter", base=checkpoint_dir, run=lora_path.parent)
    check_replaceable("--output_dir", output_dir, SCRIPT, overwrite)
    base, lora, state_dict = check_inputs(checkpoint_dir, lora_path)
    with staged_output(output_dir, TOKENIZER_FILES) as scratch:  # moved into output_dir only once verified
        config, tensors = write_adapter(scratch, checkpoint_dir, lora_path, base, lora, state_dict)
        line = verified(checkpoint_dir, lora_path, scratch, output_dir, len(lora.new_tokens)) if verify else None
        write_written_by(scratch, SCRIPT, checkpoint_dir=checkpoint_dir, lora_path=lora_path)
    rows = f" and {len(lora.new_tokens)} new-token rows (+ tokenizer)" if lora.new_tokens else ""
    print(f"wrote {sum('lora_' in k for k in tensors)} LoRA tensors for {config['target_modules']}{rows} to "
          f"{output_dir}", file=sys.stderr)
    if lora.quantize:
        dtype = stored_dtype(checkpoint_dir)  # bitsandbytes quantizes the weights as transformers loads them
        print(f"this LoRA was trained on an {lora.quantize} base quantized from the checkpoint's {dtype} weights: load "
              f"the base with dtype={dtype} and BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
              f"bnb_4bit_use_double_quant={SCHEMES[lora.quantize]})", file=sys.stderr)
    if tied := base.tie_embeddings and sorted({"embed", "lm_head"} & set(lora.targets)):
        print(f"the base ties embed and lm_head (one matrix) and this LoRA adapts {' and '.join(tied)}: load the "
              "adapter unmerged, as PeftModel.from_pretrained does; peft's merge_and_unload would add the update to both "
              "layers. To merge, run scripts/merge_lora.py, which unties them", file=sys.stderr)
    if line:
        print(line)


def stored_dtype(checkpoint_dir: Path) -> torch.dtype:
    """The dtype the base checkpoint stores its weights in (the file is mapped, not read)."""
    weights = load_state_dict(Path(checkpoint_dir) / WEIGHTS)
    return next(t.dtype for t in weights.values() if t.is_floating_point())


def check_inputs(checkpoint_dir: Path, lora_path: Path) -> tuple[Config, LoRAConfig, dict]:
    """The base's config, the run's LoRA settings and its tensors, once all of them are checked."""
    base = Config.from_checkpoint(checkpoint_dir)
    lora = lora_settings(lora_path)
    check_scheme(lora.quantize, flag=f"{lora_path.parent}/lora.yaml has quantize:")
    check_same_base(lora_path.parent, base, lora_path)  # the run's model_config.yaml names its base
    warn_if_trained_on_another(lora_path.parent, checkpoint_dir, lora_path)  # same shape, another model
    if lora.new_tokens and {"embed", "lm_head"} & set(lora.targets):
        raise UserError(f"{lora_path} has both new tokens and LoRA on embed/lm_head, which PEFT cannot hold in one "
                        "layer; merge it with scripts/merge_lora.py and convert the merged checkpoint instead")
    if lora.new_tokens:  # the adapter is unusable without a tokenizer that knows the new ids
        grown_tokenizer_files(checkpoint_dir, lora.new_tokens, base.vocab_size)
    state_dict = load_state_dict(lora_path, mmap=False)
    with torch.device("meta"):
        model = add_lora(Llama(base), lora)
    check_lora_state_dict(model, state_dict, lora_path)
    return base, lora, state_dict


def write_adapter(directory: Path, checkpoint_dir: Path, lora_path: Path, base: Config, lora: LoRAConfig,
                  state_dict: dict) -> tuple[dict, dict]:
    """The adapter's files in `directory`; returns its adapter_config.json and its tensors under PEFT's names."""
    from safetensors.torch import save_file

    tensors = {peft_name(k): v.contiguous() for k, v in state_dict.items()}
    with atomic_path(directory / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # save_file re-creates the file with owner-only permissions
    named = CONFIGS.get(base.name)  # a checkpoint converted from GGUF may not record its hub repo
    hub_repo = base.hf_repo or (named.hf_repo if named else "")
    config = adapter_config(lora, base, hub_repo or str(checkpoint_dir.resolve()))
    atomic_write_text(directory / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    if lora.new_tokens:  # the grown tokenizer travels with the adapter; otherwise the base's own serves
        write_tokenizer(checkpoint_dir, directory, lora.new_tokens, base.vocab_size)
        write_tokenizer_config(directory, Tokenizer(directory), resolve_style(None, lora_path.parent, checkpoint_dir))
    return config, tensors


def verified(checkpoint_dir: Path, lora_path: Path, written: Path, output_dir: Path, n_new_tokens: int) -> str:
    """peft's reading of the adapter written in `written` (for `output_dir`), on transformers' copy of the base the
    run was trained on (a QLoRA run's base dequantized, Ŵ), against litft's LoRA model."""
    model = load_finetuned(checkpoint_dir, lora_path, dtype=torch.float32)
    tokens = written if n_new_tokens else checkpoint_dir  # the exported tokenizer knows the new tokens
    tokenizer, style, stops = prompting(checkpoint_dir, lora_path.parent, tokens)
    expected = reference(model, tokenizer, style, stops)
    return check(expected, peft_adapter(model, written, n_new_tokens), f"the adapter in {output_dir}")


if __name__ == "__main__":
    run(main)
