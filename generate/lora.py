"""Generate text with a base model plus a LoRA run's weights (finetune/lora.py).

    python generate/lora.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --lora_path out/lora/lit_model_lora.pth --prompt "Name a primary color." --temperature 0

r, alpha, the targets and the prompt style are read from the run directory (the folder of --lora_path: lora.yaml,
prompt_style.yaml), never repeated on the command line; so is the tokenizer when the run added new tokens.
In fp32 (the CPU default) the LoRA is merged into the weights after loading, W' = W + (α/r)·B·A, so decoding
costs what the base model's does; in 16-bit it stays a separate branch (see litft/finetuned.py).
Other flags: litft.generate.generate_cli.
"""

from functools import partial
from pathlib import Path

from litft.cli import run
from litft.finetuned import load_finetuned
from litft.generate import generate_cli


def main(lora_path: Path, **flags) -> None:
    """Generate a completion for --prompt with the base model in --checkpoint_dir and the LoRA in --lora_path.

    Args:
        lora_path: a LoRA run's lit_model_lora.pth; its folder holds lora.yaml (and prompt_style.yaml).
    """
    load = partial(load_finetuned, weights_path=lora_path, method="lora", merge=True)
    generate_cli(load_model=load, run_dir=Path(lora_path).parent, **flags)


if __name__ == "__main__":
    run(main)
