"""Fine-tune with LLaMA-Adapter v1: learned prompts in the top layers behind zero-init gates (litft/adapter.py).

    python finetune/adapter.py --data games    # SmolLM2-135M-Instruct, data/games prepared on first use, -> out/adapter
    python finetune/adapter.py --data alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --out_dir out/adapter

Defaults follow lit-llama's published run (Raschka, "Parameter-Efficient LLM Finetuning With LoRA"):
learning rate 9e-3, weight decay 0.02, prompt length 10. Everything else is litft.train.
With --quantize nf4 (or nf4-dq) the frozen base is stored in 4 bits (litft/qlora.py, howto/adapter.md section 4).
"""

from dataclasses import asdict
from functools import partial

from litft.adapter import WEIGHTS, AdapterConfig, add_adapter
from litft.cli import run_finetune
from litft.train import fit
from litft.train_args import Method, TrainArgs


def main(train: TrainArgs, prompt_length: int = 10, start_layer: int = 2) -> dict:
    """Fine-tune a lit checkpoint with LLaMA-Adapter v1.

    Args:
        prompt_length: L, the learned prompt rows per adapted layer.
        start_layer: the first layer (0-based) that gets a prompt; the layers above it do too.
    """
    config = AdapterConfig(prompt_length=prompt_length, start_layer=start_layer, quantize=train.quantize)
    method = Method(name="adapter", weights_name=WEIGHTS, prepare=partial(add_adapter, config=config),
                    save_config=config.save, config=asdict(config), quantizable=True)
    return fit(train, method)


if __name__ == "__main__":
    run_finetune(main, learning_rate=9e-3, weight_decay=0.02, out_dir="out/adapter")
