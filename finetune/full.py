"""Full fine-tuning: every weight is trained. The out_dir becomes a complete lit checkpoint that
generate/base.py (or generate/full.py) serves directly.

    python finetune/full.py --data games    # SmolLM2-135M-Instruct, data/games prepared on first use, -> out/full
    python finetune/full.py --data alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --out_dir out/full \
        --devices 4 --strategy fsdp

Defaults: learning rate 2e-5 (the references advise 1e-5 … 3e-5 for full fine-tuning), weight decay 0.1.
Needs weights, gradients and AdamW's two moments for every parameter: ~16 bytes per parameter in fp32, so
a 7B model needs FSDP across several GPUs.
"""

from pathlib import Path

from litft.cli import run_finetune
from litft.files import copy_files
from litft.train import Method, TrainArgs, fit


def main(train: TrainArgs) -> dict:
    """Fine-tune every weight of a lit checkpoint."""
    unfreeze = lambda model: model.requires_grad_(True)  # noqa: E731
    copy_tokenizer = lambda out_dir: copy_files(Path(train.checkpoint_dir), Path(out_dir))  # noqa: E731
    return fit(train, Method("full", "lit_model.pth", unfreeze, copy_tokenizer))


if __name__ == "__main__":
    run_finetune(main, learning_rate=2e-5, weight_decay=0.1, warmup_steps=20, out_dir="out/full")
