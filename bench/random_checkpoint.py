"""A lit checkpoint with a real one's shapes and tokenizer but seeded random weights.

    python bench/random_checkpoint.py --source checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \
        --out_dir /tmp/smollm2-random

For benchmarks on a machine that cannot be given the real weights: the GPU machine receives at most 64 MiB of
files, and SmolLM2-135M's weights are 538 MB, while its tokenizer and model_config.yaml are 3.5 MB. Speed and
memory depend on the shapes only; a text generated from random weights means nothing, but whether two ways of
generating it agree still does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from litft.checkpoint import save_lit_checkpoint  # noqa: E402
from litft.cli import run  # noqa: E402
from litft.config import Config  # noqa: E402
from litft.files import copy_tokenizer  # noqa: E402
from litft.model import Llama  # noqa: E402


def main(source: Path, out_dir: Path, seed: int = 0) -> None:
    """Write out_dir: source's model_config.yaml and tokenizer files, and weights drawn with `seed`.

    Args:
        source: a lit checkpoint directory; its lit_model.pth need not be there.
        out_dir: the new checkpoint directory (created).
        seed: torch's seed for the weights.
    """
    config = Config.from_checkpoint(source)
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_lit_checkpoint(Llama(config), out_dir)
    copied = copy_tokenizer(source, out_dir)
    print(f"{out_dir}: {config.name} shapes, random weights (seed {seed}), tokenizer {', '.join(copied)}")


if __name__ == "__main__":
    run(main)
