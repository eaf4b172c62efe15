"""Generate text with a fully fine-tuned model (finetune/full.py).

    python generate/full.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --finetuned_path out/full/lit_model.pth --prompt "Name a primary color." --temperature 0

--checkpoint_dir gives the tokenizer and the model config; --finetuned_path the weights: the lit_model.pth
that finetune/full.py wrote, or its run directory (which is a lit checkpoint of its own, so generate/base.py
serves it too). The run's prompt_style.yaml is used. Other flags: litft.generate.generate_cli.
"""

from functools import partial
from pathlib import Path

from litft.cli import run
from litft.finetuned import load_finetuned
from litft.generate import generate_cli


def main(finetuned_path: Path, **flags) -> None:
    """Generate a completion for --prompt with the fully fine-tuned weights in --finetuned_path.

    Args:
        finetuned_path: a full fine-tune's lit_model.pth, or its run directory.
    """
    run_dir = Path(finetuned_path) if Path(finetuned_path).is_dir() else Path(finetuned_path).parent
    generate_cli(load_model=partial(load_finetuned, weights_path=finetuned_path, method="full"), run_dir=run_dir, **flags)


if __name__ == "__main__":
    run(main)
