"""Generate text with a lit checkpoint: a base model, a merged LoRA model or a fully fine-tuned one.

    python generate/base.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --prompt "What is the capital of France?" --prompt_style chatml --temperature 0

stdout carries the completion only, streamed as it is produced; load time, time to first token, tokens/s
and peak memory go to stderr. The flags are those of litft.generate_cli.generate_cli.
"""

from litft.cli import run
from litft.generate_cli import generate_cli
from litft.load_finetuned import load_finetuned


def main(**flags) -> None:
    """Generate a completion for --prompt from the model in --checkpoint_dir (flags: litft.generate_cli.generate_cli)."""
    generate_cli(load_model=load_finetuned, run_dir=None, **flags)


if __name__ == "__main__":
    run(main)
