"""Convert a lit checkpoint back to Hugging Face format, for transformers, vLLM or the Hub.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/merged --output_dir out/merged-hf

writes config.json, model.safetensors (sharded with an index above --max_shard_gb), generation_config.json
and the tokenizer files, so that `transformers.AutoModelForCausalLM.from_pretrained(output_dir)` loads it.

Prompting and stopping travel with the model (litft/hf_prompting.py), so transformers' `generate` answers as
generate/ does: generation_config.json lists every id litft stops at as `eos_token_id` (EOS and the end-of-turn
token of the prompt style, e.g. <|eot_id|> or <|im_end|>), and tokenizer_config.json holds the chat template of
the style generate/ prompts with (a merged run's prompt_style.yaml wins over the base's template).
Everything is checked (config, readable tensors, shapes) before the first file is written, and the files are
written into a scratch directory inside --output_dir (so the disk needs room for the old export and the new
one), moved into place only once verified: a failed verification leaves an earlier export as it was. An existing
--output_dir is replaced only when an earlier run of this script wrote it (its litft_export.yaml says so) or with
`--overwrite true`; any other directory with files in it is refused, so a mistyped path cannot replace a model.

Verification (`--verify true`, the default): transformers loads the written directory — model and tokenizer — and
must compute what litft computes from the checkpoint (litft/verify.py); one `verified: ...` line, or it stops.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from litft.checkpoint import WEIGHTS, check_shapes
from litft.config import Config
from litft.convert_hf import lit_to_hf_state_dict, save_hf_safetensors
from litft.errors import UserError
from litft.files import (
    TOKENIZER_FILES,
    WRITTEN_BY,
    atomic_write_text,
    check_output_dir,
    check_replaceable,
    copy_tokenizer,
    load_state_dict,
    staged_output,
    write_written_by,
)
from litft.hf_prompting import generation_config, read_json, write_tokenizer_config
from litft.kinds import check_checkpoint
from litft.model import Llama
from litft.readers import hf_directory, require_readers
from litft.tokenizer import Tokenizer
from litft.verify import check, litft_reference, prompting

SCRIPT = "scripts/convert_lit_checkpoint.py"
# What an earlier export into --output_dir may have left that this one does not write: transformers would read it.
STALE = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
         *TOKENIZER_FILES)


def main(checkpoint_dir: Path, output_dir: Path, max_shard_gb: float = 5.0, verify: bool = True,
         overwrite: bool = False) -> None:
    """Write a Hugging Face LlamaForCausalLM directory from a lit checkpoint.

    Args:
        checkpoint_dir: a lit checkpoint directory (lit_model.pth, model_config.yaml, tokenizer files).
        output_dir: where to write the Hugging Face files.
        max_shard_gb: largest safetensors file to write; bigger models are split with an index.
        verify: load the output with transformers and compare it with litft's model.
        overwrite: replace the files of a directory that this script did not write.
    """
    checkpoint_dir, output_dir = check_checkpoint(checkpoint_dir), Path(output_dir)
    if not max_shard_gb > 0:
        raise UserError(f"--max_shard_gb must be above 0, got {max_shard_gb}")
    if verify:
        require_readers()  # before anything is written
    check_output_dir("--output_dir", output_dir, "a checkpoint", checkpoint=checkpoint_dir)
    check_replaceable("--output_dir", output_dir, SCRIPT, overwrite)
    config = Config.from_checkpoint(checkpoint_dir)
    path = checkpoint_dir / WEIGHTS
    if not path.is_file():
        raise UserError(f"{checkpoint_dir} has no {WEIGHTS}; convert or merge a model into it first")
    state_dict = load_state_dict(path)  # weights only, memory-mapped
    with torch.device("meta"):
        check_shapes(Llama(config), state_dict, path)
    hf_state_dict = lit_to_hf_state_dict(state_dict)
    with staged_output(output_dir, STALE) as scratch:  # written beside the old export, put in its place once verified
        files = write_hf_directory(scratch, checkpoint_dir, config, hf_state_dict, max_shard_gb)
        del state_dict, hf_state_dict
        verified = check(litft_reference(checkpoint_dir), hf_directory(scratch),
                         f"the Hugging Face directory {output_dir}") if verify else None
        write_written_by(scratch, SCRIPT, checkpoint_dir=checkpoint_dir)
    print(f"wrote {output_dir}: {', '.join([*files, WRITTEN_BY])}")
    if verified:
        print(verified)


def write_hf_directory(directory: Path, checkpoint_dir: Path, config: Config, hf_state_dict: dict,
                       max_shard_gb: float) -> list[str]:
    """The export's files in `directory`; returns what was written, for the summary line."""
    special = special_token_ids(checkpoint_dir)
    tokenizer, style, stops = prompting(checkpoint_dir)  # what generate/ prompts and stops with
    files = save_hf_safetensors(hf_state_dict, directory, int(max_shard_gb * 2**30))
    dtype = str(next(iter(hf_state_dict.values())).dtype).removeprefix("torch.")
    hf_config = {**config.to_hf_config(), "torch_dtype": dtype, **special}
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2))
    files += ["config.json"] + copy_tokenizer(checkpoint_dir, directory)
    generation = generation_config(read_json(checkpoint_dir / "generation_config.json"), special, stops)
    if generation:
        atomic_write_text(directory / "generation_config.json", json.dumps(generation, indent=2))
        files += [] if "generation_config.json" in files else ["generation_config.json"]
    if tokenizer is not None:
        changed = write_tokenizer_config(directory, tokenizer, style)  # ["tokenizer_config.json (keys changed)"]
        files = [f for f in files if not (changed and f == "tokenizer_config.json")] + changed
    return files


def special_token_ids(checkpoint_dir: Path) -> dict[str, int]:
    """bos/eos ids as the checkpoint's tokenizer files (or its generation_config.json) say; empty if unknown."""
    d = Path(checkpoint_dir)
    if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file():
        tok = Tokenizer(d)
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    elif (d / "generation_config.json").is_file():
        ids = json.loads((d / "generation_config.json").read_text())
    else:
        ids = {}
    return {k: ids[k] for k in ("bos_token_id", "eos_token_id") if isinstance(ids.get(k), int)}


if __name__ == "__main__":
    from litft.cli import run

    run(main)
