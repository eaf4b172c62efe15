"""Named data sets, prepared on first use: `finetune/lora.py --data games` needs no data_prep step before it.

A name (alpaca, dolly, viggo, gsm8k, sql, games) means the directory data/<name>. When it holds no train.pt
yet, the matching data_prep/<name>.py runs in this process with its own defaults, the run's --checkpoint_dir
(whose tokenizer the samples must be encoded with) and data/<name> as destination — exactly what
`python data_prep/<name>.py --checkpoint_dir ...` does. Any other --data value is a prepared directory, as before.
Preparation moves a new set into place with its train.pt last, so a train.pt means a complete set: a
preparation cut short leaves the earlier set, or none, and then the next run prepares the data again.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from litft.data import NAMED, data_dir
from litft.errors import UserError
from litft.prepare import DownloadError

REPO = Path(__file__).resolve().parents[1]


def ensure_data(data: str | Path, checkpoint_dir: Path) -> None:
    """Prepare data/<name> with data_prep/<name>.py when `data` is a name and it is not prepared yet."""
    name, destination = str(data), data_dir(data)
    if name not in NAMED or (destination / "train.pt").is_file():
        return
    print(f"--data {name}: preparing {destination} with data_prep/{name}.py (first use)", file=sys.stderr, flush=True)
    try:
        data_prep_main(name)(checkpoint_dir=Path(checkpoint_dir), destination_path=destination)
    except DownloadError as e:
        raise UserError(f"--data {name}: could not download {e.url} ({e.reason}); offline, prepare a local copy "
                        f"first: python data_prep/{name}.py --data_file FILE --checkpoint_dir {checkpoint_dir}") from None


def data_prep_main(name: str):
    """The `main` function of data_prep/<name>.py (a script folder, not a package, so loaded by its path)."""
    path = REPO / "data_prep" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
