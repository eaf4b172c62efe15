"""Generate text with a base checkpoint plus the weights of a LLaMA-Adapter V2 run (finetune/adapter_v2.py).

    python generate/adapter_v2.py --prompt "Name a primary color."    # the run in out/adapter_v2, on its recorded base
    python generate/adapter_v2.py --adapter_path out/adapter-v2-games/lit_model_adapter_v2.pth --prompt "..."

adapter_v2.yaml, prompt_style.yaml and the base model (base.yaml, checked against the base's fingerprint at
training time) are read from the run directory. V2's scales and biases cannot be folded into a plain
checkpoint exactly (see litft/adapter_v2.py), so this script applies them at inference.
"""

from functools import partial
from pathlib import Path

from litft.base_checkpoint import resolve_run
from litft.cli import run
from litft.generate_cli import generate_cli
from litft.load_finetuned import load_finetuned


def main(adapter_path: Path = Path("out/adapter_v2/lit_model_adapter_v2.pth"), checkpoint_dir: Path | None = None,
         **flags) -> None:
    """Complete --prompt with the base model plus a V2 run's prompts, gates, scales, biases and norms.

    Args:
        adapter_path: the V2 run's weights file, or its run directory (the default is where finetune/adapter_v2.py
            writes it).
        checkpoint_dir: the base model; by default the one the run was trained on (recorded in base.yaml).
    """
    adapter_path, checkpoint_dir = resolve_run("adapter_v2", adapter_path, checkpoint_dir, flag="adapter_path")
    load_model = partial(load_finetuned, weights_path=adapter_path, method="adapter_v2")
    generate_cli(checkpoint_dir=checkpoint_dir, load_model=load_model, run_dir=adapter_path.parent, **flags)


if __name__ == "__main__":
    run(main)
