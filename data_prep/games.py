"""A generated task for offline use: sentences about video games -> meaning representations (ViGGO-style).

Every example comes from templates written here and a seeded random generator, so the task is identical on
every machine and needs no download. A sentence about a made-up game maps to one dialogue act whose
attributes follow a fixed order:

    "Hollow Circuit is an amazing RPG game from 2011, available on Windows and PS."
    -> inform(name[Hollow Circuit], release_year[2011], genres[role-playing], platforms[PC, PlayStation], rating[excellent])

What a model has to learn, and cannot guess before training:
- the act from the sentence's shape: a statement (inform), a question naming no game (request),
  "Did you mean X ...?" (confirm), an opinion such as "I think X is ..." (give_opinion);
- the attribute order name, release_year, genres, platforms, rating, multiplayer, whatever order the sentence
  mentions them in;
- one canonical value per synonym: "RPG" -> role-playing, "Windows" -> PC, "brilliant" -> excellent, ...

The answer is a function of the sentence (a repeated sentence is skipped), so exact match is a fair score.

    python data_prep/games.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

also writes the examples in Alpaca format (data/games/games_train.json, games_test.json).
"""

import json
import random
from pathlib import Path

from litft.cli import run
from litft.errors import UserError
from litft.files import atomic_write_text
from litft.prepare import prepare, split_examples, with_common_args

INSTRUCTION = "Convert the sentence to a meaning representation."
SLOTS = ("name", "release_year", "genres", "platforms", "rating", "multiplayer")  # the order in every answer
NAMES = (["Crimson", "Silent", "Iron", "Lost", "Hollow", "Neon", "Frozen", "Golden", "Shadow", "Broken", "Wild",
          "Solar", "Hidden", "Rusty", "Velvet", "Distant"],
         ["Harbor", "Lantern", "Kingdom", "Circuit", "Orchard", "Frontier", "Signal", "Tides", "Summit", "Garden",
          "Engine", "Voyage", "Quarry", "Meadow", "Citadel", "Echo"])
# canonical value -> the ways a sentence may say it (dict order is the order values are listed in)
GENRES = {"action": ["action"], "platformer": ["platformer", "platforming"], "puzzle": ["puzzle"],
          "racing": ["racing"], "role-playing": ["role-playing", "RPG"], "shooter": ["shooter", "shooting"],
          "simulation": ["simulation", "sim"], "strategy": ["strategy"]}
PLATFORMS = {"PC": ["PC", "Windows"], "PlayStation": ["PlayStation", "PS"], "Xbox": ["Xbox"],
             "Switch": ["Switch", "Nintendo Switch"]}
RATINGS = {"poor": ["poor", "terrible", "bad"], "average": ["average", "mediocre", "okay"],
           "good": ["good", "solid", "decent"], "excellent": ["excellent", "amazing", "brilliant"]}
MULTIPLAYER = {"yes": ["with online multiplayer", "that you can play with friends"],
               "no": ["for a single player", "with no multiplayer"]}


def draw_game(rng: random.Random) -> dict:
    """A made-up game: every attribute as (canonical value, the words a sentence uses for it)."""
    genres = sorted(rng.sample(list(GENRES), rng.choice([1, 1, 1, 2])), key=list(GENRES).index)
    platforms = sorted(rng.sample(list(PLATFORMS), rng.randint(1, 3)), key=list(PLATFORMS).index)
    year, rating, multiplayer = str(rng.randint(1995, 2023)), rng.choice(list(RATINGS)), rng.choice(list(MULTIPLAYER))
    said_platforms = [rng.choice(PLATFORMS[p]) for p in platforms]
    return {
        "name": (f"{rng.choice(NAMES[0])} {rng.choice(NAMES[1])}",) * 2,
        "release_year": (year, year),
        "genres": (", ".join(genres), " ".join(rng.choice(GENRES[g]) for g in genres)),
        "platforms": (", ".join(platforms), join_words(said_platforms)),
        "rating": (rating, rng.choice(RATINGS[rating])),
        "multiplayer": (multiplayer, rng.choice(MULTIPLAYER[multiplayer])),
    }


def join_words(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiouAEIOU" or word.startswith("RPG") else f"a {word}"


def clause(slot: str, said: str, rng: random.Random) -> str:
    """A phrase that mentions one attribute after "... game"."""
    if slot == "release_year":
        return rng.choice(["from {}", "released in {}", "that came out in {}"]).format(said)
    if slot == "platforms":
        return rng.choice(["for {}", "on {}", "available on {}"]).format(said)
    return said  # multiplayer phrases are complete already


def sentence(act: str, game: dict, slots: list[str], rng: random.Random) -> str:
    """The sentence for `act` that mentions exactly `slots` of `game`."""
    said = {slot: game[slot][1] for slot in slots}
    noun = " ".join(w for w in (said.get("rating"), said.get("genres"), "game") if w)
    clauses = [clause(s, said[s], rng) for s in ("release_year", "platforms", "multiplayer") if s in said]
    rng.shuffle(clauses)
    tail = "".join(f" {c}," for c in clauses).rstrip(",")
    if act == "inform":
        return f"{said['name']} is {article(noun)}{tail}."
    if act == "request":
        opener, end = rng.choice([("Can you recommend {}", "?"), ("Is there {}", "?"), ("I'm looking for {}", ".")])
        return opener.format(article(noun)) + tail + end
    if act == "confirm":
        opener = rng.choice(["Did you mean {}", "Are you talking about {}", "So you mean {}"])
        return opener.format(said["name"]) + f", the {said['genres']} game{tail}?"
    opener = rng.choice(["I think {} is {}", "In my opinion, {} is {}", "Honestly, {} is {}"])  # give_opinion
    return opener.format(said["name"], article(noun) if "genres" in said else said["rating"]) + "."


def draw_example(rng: random.Random) -> dict:
    game, act = draw_game(rng), rng.choice(["inform", "request", "confirm", "give_opinion"])
    optional = {"inform": ["release_year", "platforms", "rating", "multiplayer"], "request": ["release_year",
                "platforms", "rating", "multiplayer"], "confirm": ["release_year", "platforms"], "give_opinion": ["genres"]}[act]
    chosen = rng.sample(optional, rng.randint(1 if act != "give_opinion" else 0, min(3, len(optional))))
    required = {"inform": ["name", "genres"], "request": ["genres"], "confirm": ["name", "genres"],
                "give_opinion": ["name", "rating"]}[act]
    slots = [s for s in SLOTS if s in required + chosen]
    meaning = ", ".join(f"{s}[{game[s][0]}]" for s in slots)
    return {"instruction": INSTRUCTION, "input": sentence(act, game, slots, rng), "output": f"{act}({meaning})"}


def generate_examples(num_examples: int, seed: int) -> list[dict]:
    rng, examples, seen = random.Random(seed), [], set()
    while len(examples) < num_examples:
        example = draw_example(rng)
        if example["input"] not in seen:
            seen.add(example["input"])
            examples.append(example)
    return examples


@with_common_args
def main(num_examples: int = 3000, destination_path: Path = Path("data/games"),
         checkpoint_dir: Path = Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"), max_seq_length: int = 256,
         mask_inputs: bool = True, prompt_style: str = "chatml", val_split_fraction: float = 0.1, seed: int = 42) -> None:
    """Generate the video-game meaning-representation task and prepare it for fine-tuning.

    Args:
        num_examples: how many distinct examples to generate (train and test together).
    """
    if not 10 <= num_examples <= 100_000:
        raise UserError(f"--num_examples must be between 10 and 100000, got {num_examples}")
    examples = generate_examples(num_examples, seed)
    train, test = split_examples(examples, val_split_fraction, seed)
    prepare(train, test, task="games", source="data_prep/games.py", destination_path=destination_path,
            checkpoint_dir=checkpoint_dir, max_seq_length=max_seq_length, mask_inputs=mask_inputs,
            prompt_style=prompt_style, seed=seed, val_split_fraction=val_split_fraction)
    for name, split in (("train", train), ("test", test)):  # the same examples in Alpaca format, for data_prep/json_data.py
        atomic_write_text(destination_path / f"games_{name}.json", json.dumps(split, indent=1) + "\n")


if __name__ == "__main__":
    run(main)
