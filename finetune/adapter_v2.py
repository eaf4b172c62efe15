"""Fine-tune with LLaMA-Adapter v2: v1's gated prompts plus a scale and bias on every linear layer and
trainable norms (litft/adapter_v2.py).

    python finetune/adapter_v2.py --data games  # SmolLM2-135M-Instruct, data/games prepared on first use, -> out/adapter_v2
    python finetune/adapter_v2.py --data alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --out_dir out/adapter_v2

Same published defaults as v1: learning rate 9e-3, weight decay 0.02, prompt length 10.
With --quantize nf4 (or nf4-dq) the frozen base is stored in 4 bits (litft/qlora.py, howto/adapter.md section 4).
"""

from dataclasses import asdict
from functools import partial

from litft.adapter_v2 import WEIGHTS, AdapterV2Config, add_adapter_v2
from litft.cli import run_finetune
from litft.train import fit
from litft.train_args import Method, TrainArgs


def main(train: TrainArgs, prompt_length: int = 10, start_layer: int = 2) -> dict:
    """Fine-tune a lit checkpoint with LLaMA-Adapter v2.

    Args:
        prompt_length: L, the learned prompt rows per adapted layer.
        start_layer: the first layer (0-based) that gets a prompt.
    """
    config = AdapterV2Config(prompt_length=prompt_length, start_layer=start_layer, quantize=train.quantize)
    method = Method(name="adapter_v2", weights_name=WEIGHTS, prepare=partial(add_adapter_v2, config=config),
                    save_config=config.save, config=asdict(config), quantizable=True)
    return fit(train, method)


if __name__ == "__main__":
    run_finetune(main, learning_rate=9e-3, weight_decay=0.02, out_dir="out/adapter_v2")
