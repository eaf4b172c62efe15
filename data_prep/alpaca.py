"""Prepare Stanford Alpaca (52K instruction-following examples) for fine-tuning.

    python data_prep/alpaca.py                      # for SmolLM2-135M-Instruct (the default --checkpoint_dir)
    python data_prep/alpaca.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
    python data_prep/alpaca.py --variant cleaned             # the community-cleaned release
    python data_prep/alpaca.py --data_file alpaca_data.json  # offline: a local copy

Each record is {"instruction", "input", "output"}; "input" is often empty, and the alpaca prompt style then
uses its no-input template.
"""

from pathlib import Path

from litft.cli import run
from litft.errors import UserError
from litft.prepare import download, prepare, read_records, split_examples, take_fields, with_common_args

URLS = {
    "original": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
    "cleaned": "https://raw.githubusercontent.com/gururise/AlpacaDataCleaned/main/alpaca_data_cleaned.json",
}


@with_common_args
def main(variant: str = "original", data_file: Path | None = None, destination_path: Path = Path("data/alpaca"),
         checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), max_seq_length: int = 512,
         mask_inputs: bool = True, prompt_style: str = "alpaca", val_split_fraction: float = 0.04, seed: int = 42) -> None:
    """Prepare Stanford Alpaca for fine-tuning.

    Args:
        variant: "original" (Stanford's release) or "cleaned" (with many wrong or empty answers fixed).
    """
    if variant not in URLS:
        raise UserError(f"--variant {variant!r} is unknown; choose one of {', '.join(URLS)}")
    path = data_file or download(URLS[variant], destination_path / URLS[variant].rsplit("/", 1)[1])
    train, test = split_examples(take_fields(read_records(path), path), val_split_fraction, seed)
    prepare(train, test, task="alpaca", source=path, destination_path=destination_path, checkpoint_dir=checkpoint_dir,
            max_seq_length=max_seq_length, mask_inputs=mask_inputs, prompt_style=prompt_style, seed=seed,
            val_split_fraction=val_split_fraction)


if __name__ == "__main__":
    run(main)
