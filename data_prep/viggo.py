"""Prepare ViGGO (video-game dialogue: sentence -> meaning representation, CC BY-SA 4.0) for fine-tuning.

    python data_prep/viggo.py                      # for SmolLM2-135M-Instruct (the default --checkpoint_dir)
    python data_prep/viggo.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
    python data_prep/viggo.py --data_file viggo_train.csv    # offline: a local copy (CSV, JSON or JSONL)

Each record has a sentence and its meaning representation ("ref" and "mr" in GEM's CSV files, "target" and
"meaning_representation" in the datasets library's features), e.g.
`inform(name[Some Game], release_year[2014], genres[puzzle, platformer])`. The model reads the
sentence and writes the meaning representation; evaluation compares it as a normalized string.
Downloaded, the official test split is used.
"""

from pathlib import Path

from litft.cli import run
from litft.prepare import download, prepare, read_records, split_examples, take_fields, with_common_args

URL = "https://huggingface.co/datasets/GEM/viggo/resolve/main/{split}.csv"
INSTRUCTION = (
    "Write the meaning representation of this sentence about video games: one dialogue act (inform, request, "
    "give_opinion, confirm, verify_attribute, suggest, request_explanation, recommend, request_attribute) "
    "with its attributes written as attribute[value]."
)


def load(path: Path) -> list[dict]:
    records = read_records(path)
    csv_names = bool(records) and "mr" in records[0][1]
    sentence, mr = ("ref", "mr") if csv_names else ("target", "meaning_representation")
    return take_fields(records, path, instruction=None, input=sentence, output=mr, fixed_instruction=INSTRUCTION,
                       input_required=True)


@with_common_args
def main(data_file: Path | None = None, destination_path: Path = Path("data/viggo"),
         checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), max_seq_length: int = 256,
         mask_inputs: bool = True, prompt_style: str = "alpaca", val_split_fraction: float = 0.1, seed: int = 42) -> None:
    """Prepare ViGGO for fine-tuning (sentence -> meaning representation)."""
    if data_file is not None:
        train, test = split_examples(load(data_file), val_split_fraction, seed)
    else:
        train, test = (load(download(URL.format(split=s), destination_path / f"viggo_{s}.csv")) for s in ("train", "test"))
    prepare(train, test, task="viggo", source=data_file or URL, destination_path=destination_path,
            checkpoint_dir=checkpoint_dir, max_seq_length=max_seq_length, mask_inputs=mask_inputs,
            prompt_style=prompt_style, seed=seed, val_split_fraction=val_split_fraction)


if __name__ == "__main__":
    run(main)
