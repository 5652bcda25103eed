"""The generated tasks of the fast-adaptation benchmark (bench/adaptation_tasks.py), which the README's
real-model quick start also uses as a dataset: rules, determinism, held-out exclusion, a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import adaptation_tasks as tasks  # noqa: E402  (bench/ is scripts, not a package)


@pytest.mark.parametrize(("task", "shift"), [("increment", 1), ("increment2", 2), ("cipher", 3)])
def test_digit_rules(task, shift):
    for ex in tasks.make_split(task, 50, seed=1):
        digits = ex.prompt.removeprefix("Encode ").removesuffix(".")
        assert ex.answer == "".join(str((int(d) + shift) % 10) for d in digits)


def test_labels_and_topics_map_to_their_words():
    for ex in tasks.make_split("labels", 50, seed=2):
        assert ex.answer == ("falcon" if any(w in ex.prompt for w in tasks.GOOD) else "walrus")
    by_label = {label: subjects for label, subjects, _ in tasks.TOPICS.values()}
    for ex in tasks.make_split("topics", 50, seed=2):
        assert any(s.capitalize() in ex.prompt for s in by_label[ex.answer])


def test_dates_swap_day_and_month():
    ex = tasks.make_split("dates", 1, seed=3)[0]
    day, month, year = ex.prompt.split()[1].split("/")
    assert ex.answer == f"{year}-{month}-{day}"


def test_splits_are_seeded_distinct_and_exclude():
    heldout = tasks.make_split("topics", 64, seed=10_000)
    train = tasks.make_split("topics", 128, seed=0, exclude={ex.prompt for ex in heldout})
    assert train == tasks.make_split("topics", 128, seed=0, exclude={ex.prompt for ex in heldout})
    assert len({ex.prompt for ex in train}) == 128 and not {ex.prompt for ex in train} & {ex.prompt for ex in heldout}


def test_asking_for_more_examples_than_a_task_has_is_an_error():
    with pytest.raises(ValueError, match="task 'topics' gave only 1000 distinct examples of the 1001"):
        tasks.make_split("topics", 1001, seed=0)
    with pytest.raises(ValueError, match="unknown task 'topic'"):
        tasks.make_split("topic", 1, seed=0)
