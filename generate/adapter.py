"""Generate text with a base checkpoint plus the weights of a LLaMA-Adapter run (finetune/adapter.py).

    python generate/adapter.py --prompt "Name a primary color."       # the run in out/adapter, on its recorded base
    python generate/adapter.py --adapter_path out/adapter-games/lit_model_adapter.pth --prompt "..." --temperature 0

The prompt length and start layer come from adapter.yaml next to the weights, the prompt style from the run's
prompt_style.yaml, the base model from its base.yaml (checked against the base's fingerprint at training time);
nothing needs repeating. The other flags are those of litft.generate_cli.generate_cli.
"""

from functools import partial
from pathlib import Path

from litft.base_checkpoint import resolve_run
from litft.cli import run
from litft.generate_cli import generate_cli
from litft.load_finetuned import load_finetuned


def main(adapter_path: Path = Path("out/adapter/lit_model_adapter.pth"), checkpoint_dir: Path | None = None,
         **flags) -> None:
    """Generate a completion for --prompt with an adapter run: its weights in --adapter_path on its base model.

    Args:
        adapter_path: a run's lit_model_adapter.pth, or its run directory (the default is where
            finetune/adapter.py writes it); adapter.yaml, prompt_style.yaml and base.yaml sit next to it.
        checkpoint_dir: the base model; by default the one the run was trained on (recorded in base.yaml).
    """
    adapter_path, checkpoint_dir = resolve_run("adapter", adapter_path, checkpoint_dir, flag="adapter_path")
    load_model = partial(load_finetuned, weights_path=adapter_path, method="adapter")
    generate_cli(checkpoint_dir=checkpoint_dir, load_model=load_model, run_dir=adapter_path.parent, **flags)


if __name__ == "__main__":
    run(main)
