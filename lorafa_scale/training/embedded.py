"""The embedded default job: a small Llama-style model, a byte-level tokenizer and a sample dataset, all local.

`python launch/train.py` with no --model and no --dataset trains on these, so the whole pipeline runs on a
laptop CPU with nothing downloaded. The tokenizer has one token per byte plus a few special tokens, so it
needs no training and encodes any text.
"""

from __future__ import annotations

from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Each message: its role token, a newline, the content, then </s>. Rendering a prefix of the messages
# with add_generation_prompt gives a prefix of the full rendering, which data.py uses to mask prompts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SAMPLE_DATASET = "sample.jsonl"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: the special tokens first, then the 256 byte symbols (no merges)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE,
    )


def model_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int, dtype: torch.dtype) -> LlamaForCausalLM:
    """A randomly initialised Llama-style model; the same seed gives the same weights on every rank."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(model_config(len(tokenizer))).to(dtype)


def sample_dataset_path() -> str:
    return str(resources.files("lorafa_scale.training") / SAMPLE_DATASET)
