"""Prepare text-to-SQL data (sql-create-context: 78K questions over WikiSQL/Spider tables, CC BY 4.0).

    python data_prep/sql.py                      # for SmolLM2-135M-Instruct (the default --checkpoint_dir)
    python data_prep/sql.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
    python data_prep/sql.py --data_file sql_create_context_v4.json    # offline: a local copy

Each record is {"question", "context", "answer"}: the question is the instruction, the context (the table
schema as CREATE TABLE statements) the input, and the SQL query the output to learn.
"""

from pathlib import Path

from litft.cli import run
from litft.prepare import download, prepare, read_records, split_examples, take_fields, with_common_args

URL = "https://huggingface.co/datasets/b-mc2/sql-create-context/resolve/main/sql_create_context_v4.json"


@with_common_args
def main(data_file: Path | None = None, destination_path: Path = Path("data/sql"),
         checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), max_seq_length: int = 512,
         mask_inputs: bool = True, prompt_style: str = "alpaca", val_split_fraction: float = 0.05, seed: int = 42) -> None:
    """Prepare text-to-SQL data for fine-tuning (question + table schema -> SQL query)."""
    path = data_file or download(URL, destination_path / URL.rsplit("/", 1)[1])
    examples = take_fields(read_records(path), path, instruction="question", input="context", output="answer",
                           input_required=True)
    train, test = split_examples(examples, val_split_fraction, seed)
    prepare(train, test, task="sql", source=path, destination_path=destination_path, checkpoint_dir=checkpoint_dir,
            max_seq_length=max_seq_length, mask_inputs=mask_inputs, prompt_style=prompt_style, seed=seed,
            val_split_fraction=val_split_fraction)


if __name__ == "__main__":
    run(main)
