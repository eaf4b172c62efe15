"""Fine-tune with LoRA: the base model stays frozen, low-rank updates B·A are trained (see litft/lora.py).

    python finetune/lora.py --data games    # SmolLM2-135M-Instruct, data/games prepared on first use, -> out/lora
    python finetune/lora.py --data alpaca --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --out_dir out/lora

Defaults follow the reference articles: r 8, α 16, dropout 0.05, every linear layer of the blocks, learning
rate 2e-4 with 100 warmup steps. Everything not LoRA-specific (the loop, logging, saving, resume) is litft.train.
Data prepared with --new_tokens gets one trainable embedding and output row per new token, saved with A and B.
With --quantize nf4 (or nf4-dq) the frozen base is stored in 4 bits: QLoRA (litft/qlora.py, howto/qlora.md).
"""

from dataclasses import asdict
from functools import partial

from litft.cli import run_finetune
from litft.data import meta_of
from litft.lora import WEIGHTS, LoRAConfig, add_lora
from litft.train import fit
from litft.train_args import Method, TrainArgs


def main(train: TrainArgs, lora_r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.05,
         lora_targets: str = "q,k,v,o,gate,up,down", lora_rslora: bool = False) -> dict:
    """Fine-tune a lit checkpoint with LoRA.

    Args:
        lora_r: rank r of the update B·A.
        lora_alpha: the update is scaled by alpha / r (alpha / √r with lora_rslora).
        lora_dropout: dropout on the LoRA branch's input.
        lora_targets: comma-separated layers to adapt, among q,k,v,o,gate,up,down,embed,lm_head.
        lora_rslora: rank-stabilised scaling alpha / √r.
    """
    config = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, rslora=lora_rslora,
                        targets=[t.strip() for t in lora_targets.split(",") if t.strip()],
                        new_tokens=meta_of(train.data).get("new_tokens", []), quantize=train.quantize)
    method = Method(name="lora", weights_name=WEIGHTS, prepare=partial(add_lora, config=config),
                    save_config=config.save, config=asdict(config), new_tokens=config.new_tokens, quantizable=True)
    return fit(train, method)


if __name__ == "__main__":
    run_finetune(main, learning_rate=2e-4, out_dir="out/lora")
