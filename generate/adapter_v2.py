"""Generate text with a base checkpoint plus the weights of a LLaMA-Adapter V2 run (finetune/adapter_v2.py).

    python generate/adapter_v2.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --adapter_path out/adapter_v2/lit_model_adapter_v2.pth --prompt "Name a primary color." --temperature 0

adapter_v2.yaml and prompt_style.yaml are read from the run directory. V2's scales and biases cannot be folded
into a plain checkpoint exactly (see litft/adapter_v2.py), so this script applies them at inference.
"""

from functools import partial
from pathlib import Path

from litft.cli import run
from litft.finetuned import load_finetuned
from litft.generate import generate_cli


def main(adapter_path: Path, **flags) -> None:
    """Complete --prompt with the base model plus a V2 run's prompts, gates, scales, biases and norms.

    Args:
        adapter_path: the V2 run's weights file (lit_model_adapter_v2.pth), in the run directory.
    """
    load_model = partial(load_finetuned, weights_path=adapter_path, method="adapter_v2")
    generate_cli(load_model=load_model, run_dir=Path(adapter_path).parent, **flags)


if __name__ == "__main__":
    run(main)
