"""Prepare Databricks Dolly 15k (15,000 human-written instructions, CC BY-SA 3.0) for fine-tuning.

    python data_prep/dolly.py                      # for SmolLM2-135M-Instruct (the default --checkpoint_dir)
    python data_prep/dolly.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
    python data_prep/dolly.py --data_file databricks-dolly-15k.jsonl   # offline: a local copy

Each JSONL record is {"instruction", "context", "response", "category"}: the context (a passage to read, often
empty) becomes the input, the response the output.
"""

from pathlib import Path

from litft.cli import run
from litft.prepare import download, prepare, read_records, split_examples, take_fields, with_common_args

URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"


@with_common_args
def main(data_file: Path | None = None, destination_path: Path = Path("data/dolly"),
         checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), max_seq_length: int = 512,
         mask_inputs: bool = True, prompt_style: str = "alpaca", val_split_fraction: float = 0.1, seed: int = 42) -> None:
    """Prepare Dolly 15k for fine-tuning (context -> input, response -> output)."""
    path = data_file or download(URL, destination_path / URL.rsplit("/", 1)[1])
    examples = take_fields(read_records(path), path, input="context", output="response")
    train, test = split_examples(examples, val_split_fraction, seed)
    prepare(train, test, task="dolly", source=path, destination_path=destination_path, checkpoint_dir=checkpoint_dir,
            max_seq_length=max_seq_length, mask_inputs=mask_inputs, prompt_style=prompt_style, seed=seed,
            val_split_fraction=val_split_fraction)


if __name__ == "__main__":
    run(main)
