"""Data: record formats and prompt masking, line-numbered errors, truncation, packing, batch order."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lorafa_scale.training.data import (
    IGNORE_INDEX,
    BatchSchedule,
    DataError,
    Example,
    encode_record,
    load_dataset,
    pack,
    read_records,
)
from lorafa_scale.training.embedded import build_tokenizer, sample_dataset_path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_text_records_train_every_token(tokenizer):
    ids, labels = encode_record({"text": "héllo"}, tokenizer, "x")
    assert ids == labels
    assert tokenizer.decode(ids) == "<s>héllo</s>"


def test_alpaca_trains_only_the_output(tokenizer):
    record = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    ids, labels = encode_record(record, tokenizer, "x")
    assert trained_text(tokenizer, ids, labels) == "5</s>"
    assert "### Input:\n2 and 3" in tokenizer.decode(ids)


def test_chat_trains_only_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye!"}]
    ids, labels = encode_record({"messages": messages}, tokenizer, "x")
    assert ids == list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    assert trained_text(tokenizer, ids, labels) == "Hello.</s>\nBye!</s>\n"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', "invalid JSON"),
        ('["text"]', "expected a JSON object, got list"),
        ('{"prompt": "p", "completion": "c"}', "a record needs 'text', 'instruction' and 'output', or 'messages'"),
        ('{"text": 3}', "'text' must be a string"),
        ('{"instruction": "i"}', "'output' must be a string"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\] must be an object with string 'role' and 'content'"),
    ],
)
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "first"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: {message}"):
        load_dataset(path, tokenizer, seq_len=64)


def test_missing_and_empty_datasets(tmp_path, tokenizer):
    with pytest.raises(DataError, match="dataset not found"):
        read_records(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="no \\*.jsonl files"):
        read_records(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        read_records(tmp_path / "empty.jsonl")


def test_truncation_is_counted_and_prompt_only_examples_are_dropped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "x" * 100},  # 102 tokens: truncated
        {"text": "short"},
        {"instruction": "y" * 100, "output": "z"},  # the answer falls beyond seq_len: dropped
    ])
    data = load_dataset(path, tokenizer, seq_len=32)
    assert (data.truncated, data.dropped, len(data.train)) == (2, 1, 2)
    assert max(len(e.input_ids) for e in data.train) == 32


def test_packing_keeps_every_token_within_seq_len():
    examples = [Example(list(range(n)), list(range(n))) for n in (5, 7, 3, 9, 2, 10)]
    packs = pack(examples, seq_len=11)
    assert [len(p.input_ids) for p in packs] == [5, 10, 11, 10]
    assert sum((p.input_ids for p in packs), []) == sum((e.input_ids for e in examples), [])


def test_directory_of_jsonl_files_and_a_datasets_directory(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    jsonl_dir = tmp_path / "jsonl"
    jsonl_dir.mkdir()
    write_jsonl(jsonl_dir / "a.jsonl", [{"text": "one"}])
    write_jsonl(jsonl_dir / "b.jsonl", [{"text": "two"}, {"text": "three"}])
    assert len(load_dataset(jsonl_dir, tokenizer, 64).train) == 3

    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"text": f"train {i}"} for i in range(6)]),
        "validation": datasets.Dataset.from_list([{"text": "held out"}]),
    })
    splits.save_to_disk(str(tmp_path / "hf"))
    data = load_dataset(tmp_path / "hf", tokenizer, 64, val_fraction=0.5)
    assert len(data.train) == 6  # the dataset's own split is used, nothing is held out of train
    assert tokenizer.decode(data.validation[0].input_ids) == "<s>held out</s>"
    bad = datasets.Dataset.from_list([{"text": "fine"}, {"text": None}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[train\] row 1: 'text' must be a string"):
        load_dataset(tmp_path / "bad", tokenizer, 64)


def test_validation_split_is_held_out_of_training(tokenizer):
    data = load_dataset(sample_dataset_path(), tokenizer, 256, val_fraction=0.05, seed=3)
    everything = load_dataset(sample_dataset_path(), tokenizer, 256).train
    assert (len(data.train), len(data.validation), len(everything)) == (380, 20, 400)
    counts = Counter(tuple(e.input_ids) for e in data.train + data.validation)
    assert counts == Counter(tuple(e.input_ids) for e in everything)
    other_seed = load_dataset(sample_dataset_path(), tokenizer, 256, val_fraction=0.05, seed=4)
    assert [e.input_ids for e in other_seed.validation] != [e.input_ids for e in data.validation]


def test_a_step_sees_the_same_examples_whatever_the_split():
    examples = [Example([i, i + 1, i + 2][: 1 + i % 3], [i, i + 1, i + 2][: 1 + i % 3]) for i in range(37)]

    def rows(micro, world, step):
        schedule = BatchSchedule(examples, global_batch_size=8, micro_batch_size=micro, seed=5, pad_id=0)
        batches = [b for rank in range(world) for b in schedule.micro_batches(step, rank, world)]
        assert len(batches) == 8 // micro
        return sorted(tuple(r[m.bool()].tolist()) for b in batches for r, m in zip(b["input_ids"],
                                                                                   b["attention_mask"], strict=True))

    for step in (0, 3, 4, 9):  # 4 steps per epoch: 4 and 9 are in later epochs
        assert rows(1, 1, step) == rows(4, 2, step) == rows(8, 1, step) == rows(2, 2, step)
    epoch0 = [rows(8, 1, s) for s in range(4)]
    assert len({e for step in epoch0 for e in step}) == 32  # no example twice within an epoch
    assert rows(8, 1, 4) != rows(8, 1, 0)  # a new permutation each epoch


def test_padding_is_ignored_by_the_loss_labels():
    schedule = BatchSchedule([Example([1, 2, 3], [1, 2, 3]), Example([4], [4])], 2, 2, seed=0, pad_id=9)
    batch = schedule.micro_batches(0)[0]
    assert torch.equal(batch["attention_mask"].sum(1).sort().values, torch.tensor([1, 3]))
    assert int((batch["labels"] == IGNORE_INDEX).sum()) == 2
    assert set(batch["input_ids"][batch["attention_mask"] == 0].tolist()) == {9}


def test_fewer_examples_than_a_global_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchSchedule([Example([1], [1])] * 3, global_batch_size=4, micro_batch_size=4, seed=0, pad_id=0)
