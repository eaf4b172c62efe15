"""Generate text with a base model plus a LoRA run's weights (finetune/lora.py).

    python generate/lora.py --prompt "Name a primary color."          # the run in out/lora, on its recorded base
    python generate/lora.py --lora_path out/lora/alpaca/lit_model_lora.pth --prompt "..." --temperature 0

r, alpha, the targets and the prompt style are read from the run directory (the folder of --lora_path: lora.yaml,
prompt_style.yaml), never repeated on the command line; so is the base model (base.yaml, checked against the
fingerprint the base had when the run was trained) and the tokenizer when the run added new tokens.
In fp32 (the CPU default) the LoRA is merged into the weights after loading, W' = W + (α/r)·B·A, so decoding
costs what the base model's does; in 16-bit, or with --fast false, it stays a separate branch (litft/fast).
Other flags: litft.generate_cli.generate_cli.
"""

from functools import partial
from pathlib import Path

from litft.base_checkpoint import resolve_run
from litft.cli import run
from litft.generate_cli import generate_cli
from litft.load_finetuned import load_finetuned


def main(lora_path: Path = Path("out/lora/lit_model_lora.pth"), checkpoint_dir: Path | None = None, **flags) -> None:
    """Generate a completion for --prompt with a LoRA run: its weights in --lora_path on its base model.

    Args:
        lora_path: a LoRA run's lit_model_lora.pth, or its run directory (the default is where finetune/lora.py
            writes it); its folder holds lora.yaml, prompt_style.yaml and base.yaml.
        checkpoint_dir: the base model; by default the one the run was trained on (recorded in base.yaml).
    """
    lora_path, checkpoint_dir = resolve_run("lora", lora_path, checkpoint_dir, flag="lora_path")
    load = partial(load_finetuned, weights_path=lora_path, method="lora")
    generate_cli(checkpoint_dir=checkpoint_dir, load_model=load, run_dir=lora_path.parent, **flags)


if __name__ == "__main__":
    run(main)
