"""Generate text with a fully fine-tuned model (finetune/full.py).

    python generate/full.py --prompt "Name a primary color."          # the run in out/full, on its recorded base
    python generate/full.py --finetuned_path out/full-games --prompt "Name a primary color." --temperature 0

--finetuned_path is the lit_model.pth that finetune/full.py wrote, or its run directory (which is a lit
checkpoint of its own, so generate/base.py serves it too). The base model (--checkpoint_dir, by default the one
recorded in the run's base.yaml) gives the tokenizer and the model config; the run's prompt_style.yaml is used.
Other flags: litft.generate_cli.generate_cli.
"""

from functools import partial
from pathlib import Path

from litft.base_checkpoint import resolve_run
from litft.cli import run
from litft.files import run_dir_of
from litft.generate_cli import generate_cli
from litft.load_finetuned import load_finetuned


def main(finetuned_path: Path = Path("out/full/lit_model.pth"), checkpoint_dir: Path | None = None, **flags) -> None:
    """Generate a completion for --prompt with the fully fine-tuned weights in --finetuned_path.

    Args:
        finetuned_path: a full fine-tune's lit_model.pth, or its run directory (the default is where
            finetune/full.py writes it).
        checkpoint_dir: the base model; by default the one the run was trained on (recorded in base.yaml).
    """
    finetuned_path, checkpoint_dir = resolve_run("full", finetuned_path, checkpoint_dir, flag="finetuned_path")
    run_dir = run_dir_of(finetuned_path)
    load_model = partial(load_finetuned, weights_path=finetuned_path, method="full")
    generate_cli(checkpoint_dir=checkpoint_dir, load_model=load_model, run_dir=run_dir, **flags)


if __name__ == "__main__":
    run(main)
