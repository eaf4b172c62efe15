"""Generate text with a base checkpoint plus the weights of a LLaMA-Adapter run (finetune/adapter.py).

    python generate/adapter.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --adapter_path out/adapter/lit_model_adapter.pth --prompt "Name a primary color." --temperature 0

The prompt length and start layer come from adapter.yaml next to the weights, the prompt style from the run's
prompt_style.yaml; nothing needs repeating. The other flags are those of litft.generate.generate_cli.
"""

from functools import partial
from pathlib import Path

from litft.cli import run
from litft.finetuned import load_finetuned
from litft.generate import generate_cli


def main(adapter_path: Path, **flags) -> None:
    """Generate a completion for --prompt from --checkpoint_dir with the adapter in --adapter_path.

    Args:
        adapter_path: a run's lit_model_adapter.pth; adapter.yaml and prompt_style.yaml sit next to it.
    """
    load_model = partial(load_finetuned, weights_path=adapter_path, method="adapter")
    generate_cli(load_model=load_model, run_dir=Path(adapter_path).parent, **flags)


if __name__ == "__main__":
    run(main)
