"""Full fine-tuning: every weight is trained. The out_dir becomes a complete lit checkpoint that
generate/base.py (or generate/full.py) serves directly.

    python finetune/full.py --data games    # SmolLM2-135M-Instruct, data/games prepared on first use, -> out/full
    python finetune/full.py --data alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --out_dir out/full \
        --devices 4 --strategy fsdp

Defaults: learning rate 2e-5 (the references advise 1e-5 … 3e-5 for full fine-tuning), weight decay 0.1.
Needs weights, gradients and AdamW's two moments for every parameter: ~16 bytes per parameter in fp32, so
a 7B model needs FSDP across several GPUs. Train in bf16-mixed (the GPU default: fp32 copies of the weights):
under bf16-true a step of 2e-5 rounds away on most weights, and the run warns how many.
"""

from functools import partial

from litft.checkpoint import WEIGHTS
from litft.cli import run_finetune
from litft.files import copy_files
from litft.train import fit
from litft.train_args import Method, TrainArgs


def main(train: TrainArgs) -> dict:
    """Fine-tune every weight of a lit checkpoint."""
    method = Method(name="full", weights_name=WEIGHTS, prepare=lambda model: model.requires_grad_(True),
                    save_config=partial(copy_files, train.checkpoint_dir))  # with the tokenizer, a lit checkpoint
    return fit(train, method)


if __name__ == "__main__":
    run_finetune(main, learning_rate=2e-5, weight_decay=0.1, warmup_steps=20, out_dir="out/full")
