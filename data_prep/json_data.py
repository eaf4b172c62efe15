"""Prepare your own instruction data from a JSON or JSONL file, with any key names.

    python data_prep/json_data.py --data_file my_data.jsonl --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python data_prep/json_data.py --data_file qa.json --instruction_key question --input_key "" --output_key answer \\
        --val_file qa_test.json --destination_path data/qa
    python data_prep/json_data.py --data_file tagged.jsonl --new_tokens "<q>,</q>"   # markers become new tokens

A .jsonl file holds one object per line; any other file holds one JSON array of objects. The input key may be
missing in a record (it is then empty); the instruction and output keys must be present in every record.
"""

import sys
from pathlib import Path

from litft.cli import run
from litft.errors import UserError
from litft.prepare import prepare, read_records, split_examples, split_tokens, take_fields, with_common_args
from litft.scoring import EXTRACT


@with_common_args
def main(data_file: Path, val_file: Path | None = None, instruction_key: str = "instruction", input_key: str = "input",
         output_key: str = "output", task: str = "text", destination_path: Path = Path("data/json"),
         checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), max_seq_length: int = 512,
         mask_inputs: bool = True, prompt_style: str = "alpaca", val_split_fraction: float = 0.1, seed: int = 42,
         new_tokens: str = "") -> None:
    """Prepare a JSON/JSONL file of instruction examples for fine-tuning.

    Args:
        data_file: the JSON, JSONL or CSV file of examples.
        val_file: a separate file for the test split (same keys); then data_file is all training data.
        instruction_key: the key holding the instruction.
        input_key: the key holding the optional input ("" if the data has none).
        output_key: the key holding the answer the model should learn.
        task: how scripts/evaluate.py compares answers: text, gsm8k, sql, viggo or games (see litft/scoring.py).
    """
    if task != "text" and task not in EXTRACT:
        raise UserError(f"--task {task!r} is unknown; choose text or one of {', '.join(EXTRACT)}")
    keys = dict(instruction=instruction_key, input=input_key or None, output=output_key)
    records = read_records(data_file)
    examples = take_fields(records, data_file, **keys)
    note_missing_input_key(records, data_file, keys)
    if val_file is not None:
        train, test = examples, take_fields(read_records(val_file, "--val_file"), val_file, **keys)
    else:
        train, test = split_examples(examples, val_split_fraction, seed)
    prepare(train, test, task=task, source=data_file, destination_path=destination_path, checkpoint_dir=checkpoint_dir,
            max_seq_length=max_seq_length, mask_inputs=mask_inputs, prompt_style=prompt_style, seed=seed,
            val_split_fraction=val_split_fraction, new_tokens=split_tokens(new_tokens))


def note_missing_input_key(records: list[tuple[str, dict]], path: Path, keys: dict) -> None:
    """An input key no record has, while the records hold keys nothing reads, is most likely misnamed: every
    input would be empty. Said on stderr; data with no inputs at all is fine."""
    if keys["input"] is None or any(keys["input"] in record for _, record in records):
        return
    unread = sorted({key for _, record in records for key in record} - set(keys.values()))
    if unread:
        print(f"note: no record of {path} has the key {keys['input']!r}, so every input is empty; they also hold "
              f"{', '.join(map(repr, unread))}: name the input's key with --input_key (--input_key \"\" if there "
              "is none)", file=sys.stderr)


if __name__ == "__main__":
    run(main)
