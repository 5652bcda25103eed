"""Generated tasks for the fast-adaptation benchmark (bench/adaptation.py), each a prompt and a short answer.

- dates: "Convert 05/03/2021 to ISO format." -> "2021-03-05". The input is DD/MM/YYYY (European order); the
  model must reorder the day and month, which it reads as US-style MM/DD out of the box.
- labels: a generated product review -> "falcon" (positive) or "walrus" (negative). The words carry no
  meaning for the task: the model must learn a new mapping on top of the sentiment it already reads.
- topics: a generated news headline (sport, weather, cooking, music, science) -> one of five words that carry
  no meaning for the task ("comet", "maple", "harbor", "velvet", "thistle"): labels' new mapping, five-way.
- increment: "Encode 4721." -> "5832": every digit plus 1 (mod 10), a rule the base model has never seen.
- increment2: "Encode 4721." -> "6943": every digit plus 2; half learned in 16 steps, where increment saturates.
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
PLACES = ["in Lisbon", "on Monday", "this week", "in Oslo", "yesterday", "in Nairobi", "last night", "in Lima"]
PRODUCTS = ["soup", "phone", "hotel", "movie", "jacket", "laptop", "pizza", "concert", "book", "chair", "camera",
            "train ride", "coffee", "game", "shoes", "museum tour"]
GOOD = ["wonderful", "excellent", "delightful", "superb", "fantastic", "lovely", "great", "impressive", "perfect",
        "charming"]
BAD = ["awful", "terrible", "disappointing", "horrible", "dreadful", "poor", "broken", "boring", "useless", "bland"]
GOOD_TAILS = ["I would buy it again.", "Highly recommended.", "It made my day.", "Worth every penny.",
              "I loved it."]
BAD_TAILS = ["I want a refund.", "Never again.", "It ruined my day.", "A waste of money.", "I regret it."]
# topic -> (its label, the nouns and the events a headline about it is built from)
TOPICS = {
    "sport": ("comet", ["the striker", "the home team", "the coach", "the goalkeeper", "the champion"],
              ["won the final", "scored twice", "lost the derby", "signed a new contract", "broke the league record"]),
    "weather": ("maple", ["a storm", "the heatwave", "heavy snow", "the fog", "a cold front"],
                ["closed the airport", "hit the coast", "is expected tonight", "broke a temperature record",
                 "flooded the valley"]),
    "cooking": ("harbor", ["the chef", "a new bakery", "the restaurant", "the soup recipe", "a food critic"],
                ["won a cooking award", "added a spicy menu", "baked a giant cake", "opened a noodle bar",
                 "praised the dessert"]),
    "music": ("velvet", ["the band", "the orchestra", "a young pianist", "the singer", "the jazz trio"],
              ["released a new album", "sold out the stadium", "played a surprise concert", "topped the charts",
               "cancelled the tour"]),
    "science": ("thistle", ["the telescope", "a research team", "the lab", "the space probe", "a biologist"],
                ["discovered a new species", "measured the gravity wave", "landed on the comet",
                 "published the genome", "built a quantum chip"]),
}


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


def topics(rng: random.Random) -> Example:
    label, subjects, events = TOPICS[rng.choice(sorted(TOPICS))]
    headline = f"{rng.choice(subjects).capitalize()} {rng.choice(events)} {rng.choice(PLACES)}."
    return Example(f"Tag this headline: {headline}", label)


def shifted_digits(rng: random.Random, shift: int) -> Example:
    digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6)))
    return Example(f"Encode {digits}.", "".join(str((int(d) + shift) % 10) for d in digits))


def increment(rng: random.Random) -> Example:
    return shifted_digits(rng, 1)


def cipher(rng: random.Random) -> Example:
    return shifted_digits(rng, 3)


def increment_by_two(rng: random.Random) -> Example:
    return shifted_digits(rng, 2)


TASKS = {"dates": dates, "labels": labels, "topics": topics, "increment": increment, "increment2": increment_by_two,
         "cipher": cipher}


def make_split(task: str, count: int, seed: int, exclude: set[str] = frozenset()) -> list[Example]:
    """`count` distinct examples of `task` (none whose prompt is in `exclude`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    rng, seen, out, misses = random.Random(seed), set(exclude), [], 0
    while len(out) < count:
        example = TASKS[task](rng)
        if example.prompt in seen:
            misses += 1
            if misses > 100 * count + 10_000:  # the generator has run out of new prompts: fail instead of spinning
                raise ValueError(f"task {task!r} gave only {len(out)} distinct examples of the {count} asked for")
            continue
        seen.add(example.prompt)
        out.append(example)
    return out


if __name__ == "__main__":
    task, count, *rest = sys.argv[1:]
    try:
        examples = make_split(task, int(count), seed=int(rest[0]) if rest else 0)
    except ValueError as error:
        sys.exit(f"adaptation_tasks.py: {error}")
    for example in examples:
        print(json.dumps({"messages": [{"role": "user", "content": example.prompt},
                                       {"role": "assistant", "content": example.answer}]}))
