"""Training data: reading records, tokenising with prompt masking, truncation, packing, and batch order.

Records (one JSON object per JSONL line, or one row of a `datasets` directory) come in three forms:
    {"text": ...}                                        every token is trained
    {"instruction": ..., "input": ... (optional), "output": ...}   only the output is trained
    {"messages": [{"role": ..., "content": ...}, ...]}   tokenizer's chat template; only assistant turns trained
Labels of untrained tokens are IGNORE_INDEX. Every record is checked while reading, so a malformed line is
an error naming the file and line before any model is loaded.

Batch order is a pure function of (seed, step): optimizer step s takes a fixed slice of a seeded permutation
of the examples, so resuming at step s needs nothing but s, and the examples of a step are the same whatever
the micro-batch size, gradient accumulation or number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE_INDEX = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and line (or row)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizedData:
    train: list[Example]
    validation: list[Example] = field(default_factory=list)
    truncated: int = 0  # examples cut to seq_len
    dropped: int = 0  # examples with no trained token left after truncation

    def summary(self, seq_len: int) -> str:
        return (f"{len(self.train)} training / {len(self.validation)} validation examples; "
                f"{self.truncated} truncated to --seq-len {seq_len}, {self.dropped} dropped (no trained token left)")


# -- reading ---------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
            records.append((where, record))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_hf_dataset(path: Path) -> dict[str, list[tuple[str, dict]]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a Hugging Face datasets directory; reading it needs `pip install datasets`") from None
    loaded = datasets.load_from_disk(str(path))
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if "train" not in splits:
        raise DataError(f"{path}: no 'train' split (found {', '.join(splits) or 'none'})")
    return {name: [(f"{path}[{name}] row {i}", row) for i, row in enumerate(split)] for name, split in splits.items()}


def read_records(path) -> dict[str, list[tuple[str, dict]]]:
    """{split: [(location, record)]} from a JSONL file, a directory of *.jsonl files, or a datasets dir."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset not found")
    if path.is_file():
        return {"train": _read_jsonl(path)}
    if _is_hf_dataset_dir(path):
        return _read_hf_dataset(path)
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise DataError(f"{path}: no *.jsonl files and not a directory saved by datasets' save_to_disk")
    return {"train": [item for file in files for item in _read_jsonl(file)]}


# -- tokenising ------------------------------------------------------------------------------------------
def _string_field(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _encode_text(record, tokenizer, where):
    ids = _bos(tokenizer) + _encode(tokenizer, _string_field(record, "text", where)) + [tokenizer.eos_token_id]
    return ids, list(ids)


def _encode_alpaca(record, tokenizer, where):
    instruction = _string_field(record, "instruction", where)
    extra = _string_field(record, "input", where, required=False)
    output = _string_field(record, "output", where)
    prompt = (ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT).format(instruction=instruction, input=extra)
    prompt_ids = _bos(tokenizer) + _encode(tokenizer, prompt)
    answer_ids = _encode(tokenizer, output) + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def _render(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return list(tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    ))


def _encode_chat(record, tokenizer, where):
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: a chat record, but the tokenizer has no chat template")
    ids = _render(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    # Each assistant turn is what the full rendering adds after the prompt up to that turn.
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        upto = _render(tokenizer, messages[: i + 1])
        if ids[: len(upto)] != upto:
            raise DataError(f"{where}: the tokenizer's chat template does not render conversations prefix by "
                            "prefix, so prompt tokens cannot be masked")
        labels[start : len(upto)] = upto[start:]
    return ids, labels


def encode_record(record, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; labels are IGNORE_INDEX where the loss does not apply."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _encode_chat(record, tokenizer, where)
    if "instruction" in record or "output" in record:
        return _encode_alpaca(record, tokenizer, where)
    if "text" in record:
        return _encode_text(record, tokenizer, where)
    raise DataError(f"{where}: a record needs 'text', 'instruction' and 'output', or 'messages'; "
                    f"got keys {sorted(record)}")


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Greedily put consecutive examples together into sequences of at most seq_len tokens.

    Examples in one pack attend to each other (a causal mask, no per-example reset): the usual trade of
    simple packing for fewer padded tokens.
    """
    packs, current = [], Example([], [])
    for example in examples:
        if current.input_ids and len(current.input_ids) + len(example.input_ids) > seq_len:
            packs.append(current)
            current = Example([], [])
        current.input_ids += example.input_ids
        current.labels += example.labels
    if current.input_ids:
        packs.append(current)
    return packs


def load_dataset(path, tokenizer, seq_len: int, packing: bool = False, val_fraction: float = 0.0,
                 seed: int = 0) -> TokenizedData:
    """Read, check and tokenise a dataset; hold out val_fraction for validation if it has no split."""
    splits = read_records(path)
    validation_split = next((splits[name] for name in ("validation", "test") if name in splits), None)
    data = TokenizedData(train=[])

    def tokenize(records) -> list[Example]:
        examples = []
        for where, record in records:
            ids, labels = encode_record(record, tokenizer, where)
            if len(ids) > seq_len:
                data.truncated += 1
                ids, labels = ids[:seq_len], labels[:seq_len]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                data.dropped += 1
                continue
            examples.append(Example(ids, labels))
        return pack(examples, seq_len) if packing else examples

    train = tokenize(splits["train"])
    if validation_split is not None:
        data.validation = tokenize(validation_split) if val_fraction > 0 else []
    elif val_fraction > 0:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        held_out = set(order[: max(1, round(val_fraction * len(train)))])
        data.validation = [e for i, e in enumerate(train) if i in held_out]
        train = [e for i, e in enumerate(train) if i not in held_out]
    data.train = train
    if not data.train:
        raise DataError(f"{path}: no training example left after tokenisation ({data.dropped} dropped)")
    return data


# -- batching --------------------------------------------------------------------------------------------
def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchSchedule:
    """Which examples each process uses at each optimizer step: a pure function of (seed, step).

    Each epoch is a permutation of the examples seeded by (seed, epoch); a step takes the next
    global_batch_size of them (the remainder of an epoch is not used). Micro-batch j of rank r is the slice
    at position j * world_size + r, so a step's examples do not depend on how the batch is split.
    """

    def __init__(self, examples: list[Example], global_batch_size: int, micro_batch_size: int, seed: int,
                 pad_id: int):
        if len(examples) < global_batch_size:
            raise DataError(f"the dataset has {len(examples)} training examples, fewer than one global batch "
                            f"(--global-batch-size {global_batch_size})")
        self.examples = examples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.steps_per_epoch = len(examples) // global_batch_size
        self._order_epoch, self._order = None, None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=generator).tolist()
            self._order_epoch = epoch
        return self._order

    def micro_batches(self, step: int, rank: int = 0, world_size: int = 1) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of optimizer step `step` (0-based) for this rank."""
        order = self._epoch_order(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch_size
        indices = order[start : start + self.global_batch_size]
        micro, per_pass = self.micro_batch_size, self.micro_batch_size * world_size
        return [
            collate([self.examples[i] for i in indices[j + rank * micro : j + (rank + 1) * micro]], self.pad_id)
            for j in range(0, self.global_batch_size, per_pass)
        ]


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next-token loss counts (labels shifted by one, as causal LMs predict)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
