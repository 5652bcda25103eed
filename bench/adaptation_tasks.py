"""Generated tasks for the fast-adaptation benchmark (bench/adaptation.py), each a prompt and a short answer.

- dates: "Convert 05/03/2021 to ISO format." -> "2021-03-05". The input is DD/MM/YYYY (European order); the
  model must reorder the day and month, which it reads as US-style MM/DD out of the box.
- labels: a generated product review -> "falcon" (positive) or "walrus" (negative). The words carry no
  meaning for the task: the model must learn a new mapping on top of the sentiment it already reads.
- increment: "Encode 4721." -> "5832": every digit plus 1 (mod 10), a rule the base model has never seen.
- cipher: "Encode 4721." -> "7054": every digit shifted by 3 (mod 10); not learned within 16 steps by any method.

Each example is `Q: <prompt>\nA:` followed by ` <answer>` and the end-of-turn token; the loss counts only
the answer tokens. Examples are drawn from a seeded generator: the same seed gives the same data.

As a chat dataset for launch/train.py (one user turn, one assistant turn; only the answer is trained):

    python bench/adaptation_tasks.py labels 512 > labels.jsonl      # task, count[, seed]
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass

MONTHS = 12
PRODUCTS = ["soup", "phone", "hotel", "movie", "jacket", "laptop", "pizza", "concert", "book", "chair", "camera",
            "train ride", "coffee", "game", "shoes", "museum tour"]
GOOD = ["wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "great", "impressive", "perfect",
        "charming"]
BAD = ["awful", "terrible", "disappointing", "horrible", "dreadful", "poor", "broken", "boring", "useless", "bland"]
GOOD_TAILS = ["I would buy it again.", "Highly recommended.", "It made my day.", "Worth every penny.",
              "I loved it."]
BAD_TAILS = ["I want a refund.", "Never again.", "It ruined my day.", "A waste of money.", "I regret it."]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def dates(rng: random.Random) -> Example:
    year, month = rng.randint(1950, 2030), rng.randint(1, MONTHS)
    day = rng.randint(1, 28)
    return Example(f"Convert {day:02d}/{month:02d}/{year} to ISO format.", f"{year}-{month:02d}-{day:02d}")


def labels(rng: random.Random) -> Example:
    positive = rng.random() < 0.5
    adjective = rng.choice(GOOD if positive else BAD)
    tail = rng.choice(GOOD_TAILS if positive else BAD_TAILS)
    review = f"The {rng.choice(PRODUCTS)} was {adjective}. {tail}"
    return Example(f"Label this review: {review}", "falcon" if positive else "walrus")


def shifted_digits(rng: random.Random, shift: int) -> Example:
    digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6)))
    return Example(f"Encode {digits}.", "".join(str((int(d) + shift) % 10) for d in digits))


def increment(rng: random.Random) -> Example:
    return shifted_digits(rng, 1)


def cipher(rng: random.Random) -> Example:
    return shifted_digits(rng, 3)


TASKS = {"dates": dates, "labels": labels, "increment": increment, "cipher": cipher}


def make_split(task: str, count: int, seed: int, exclude: set[str] = frozenset()) -> list[Example]:
    """`count` distinct examples of `task` (none whose prompt is in `exclude`)."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < count:
        example = TASKS[task](rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
    return out


if __name__ == "__main__":
    task, count, *rest = sys.argv[1:]
    for example in make_split(task, int(count), seed=int(rest[0]) if rest else 0):
        print(json.dumps({"messages": [{"role": "user", "content": example.prompt},
                                       {"role": "assistant", "content": example.answer}]}))
