"""Prepare GSM8K (8.5K grade-school math word problems, MIT license) for fine-tuning.

    python data_prep/gsm8k.py                      # for SmolLM2-135M-Instruct (the default --checkpoint_dir)
    python data_prep/gsm8k.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
    python data_prep/gsm8k.py --data_file train.jsonl     # offline: a local copy, split with --seed

Each JSONL record is {"question", "answer"}; the answer is a worked solution that ends with "#### <number>",
and evaluation compares that number (scripts/evaluate.py). Downloaded, the official test split is used.
"""

from pathlib import Path

from litft.cli import run
from litft.prepare import download, prepare, read_records, split_examples, take_fields, with_common_args

URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"


def load(path: Path) -> list[dict]:
    return take_fields(read_records(path), path, instruction="question", input=None, output="answer")


@with_common_args
def main(data_file: Path | None = None, destination_path: Path = Path("data/gsm8k"),
         checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), max_seq_length: int = 512,
         mask_inputs: bool = True, prompt_style: str = "alpaca", val_split_fraction: float = 0.1, seed: int = 42) -> None:
    """Prepare GSM8K for fine-tuning (question -> worked answer ending in "#### <number>")."""
    if data_file is not None:
        train, test = split_examples(load(data_file), val_split_fraction, seed)
    else:
        train, test = (load(download(URL.format(split=s), destination_path / f"gsm8k_{s}.jsonl")) for s in ("train", "test"))
    prepare(train, test, task="gsm8k", source=data_file or URL, destination_path=destination_path,
            checkpoint_dir=checkpoint_dir, max_seq_length=max_seq_length, mask_inputs=mask_inputs,
            prompt_style=prompt_style, seed=seed, val_split_fraction=val_split_fraction)


if __name__ == "__main__":
    run(main)
