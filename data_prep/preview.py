"""Print prepared samples as the model sees them, then check them for mistakes that train silently.

    python data_prep/preview.py --data data/games --n 3
    python data_prep/preview.py --data alpaca --split test --max_seq_length 256

Trained tokens appear inside «…», masked ones (the prompt) as plain text, control tokens by name, so a missing
EOS shows; the checks are described in litft/preview.py.
"""

from pathlib import Path
from typing import Literal, Optional

from litft.cli import run
from litft.errors import UserError
from litft.preview import preview


def main(data: str, n: int = 3, split: Literal["train", "test"] = "train", max_seq_length: Optional[int] = None,
         checkpoint_dir: Optional[Path] = None) -> None:
    """Render the first --n samples of a prepared --data directory and warn about what would train badly.

    Args:
        data: a prepared data name (games -> data/games) or directory.
        n: how many samples to render.
        split: train or test.
        max_seq_length: the --max_seq_length you will train with: samples longer than it count as truncated.
        checkpoint_dir: the model the data was prepared with, when its path in meta.json (as data prep was given
            it) is not found from here.
    """
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    print(preview(data, n, split, max_seq_length, checkpoint_dir))


if __name__ == "__main__":
    run(main)
