"""`lorafa-scale generate` on a tiny model saved locally: greedy, chat, sampled, --no-adapter, streamed."""

from __future__ import annotations

import io

import pytest
import torch

from lorafa_scale import LoraConfig, PeftModel, get_peft_model
from lorafa_scale import generate as gen
from lorafa_scale.training.embedded import build_model, build_tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's layout: base_model/ (the built-in model and tokenizer) and adapter/ (B far from 0)."""
    run = tmp_path_factory.mktemp("run")
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=0, dtype=torch.float32).save_pretrained(run / "base_model")
    tokenizer.save_pretrained(run / "base_model")
    model = get_peft_model(build_model(tokenizer, seed=0, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    model.save_pretrained(run / "adapter")
    return run


class Terminal(io.StringIO):
    """Records each write, to see that the answer arrives piece by piece."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def complete(*argv) -> tuple[str, Terminal]:
    args = gen.build_parser().parse_args(list(map(str, argv)))
    gen._check(args)
    terminal = Terminal()
    return gen.generate(args, terminal), terminal


def reference(run, ids: torch.Tensor, adapter: bool, max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "base_model")
    if adapter:
        model = PeftModel.from_pretrained(model, str(run / "adapter"))
    out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_prompt_streams_the_adapted_models_answer_and_no_adapter_the_bases(run_dir):
    tokenizer = build_tokenizer()
    ids = tokenizer("Once upon", return_tensors="pt").input_ids
    text, terminal = complete("--adapter", run_dir, "--prompt", "Once upon", "--max-new-tokens", 12)
    assert text == tokenizer.decode(reference(run_dir, ids, True, 12), skip_special_tokens=True)
    assert terminal.getvalue() == "Once upon" + text + "\n" and terminal.writes > 3  # streamed, token by token
    base, _ = complete("--adapter", run_dir, "--prompt", "Once upon", "--max-new-tokens", 12, "--no-adapter")
    assert base == tokenizer.decode(reference(run_dir, ids, False, 12), skip_special_tokens=True)
    assert base != text
    # an adapter dir and an explicit base give the same as the run dir
    same, _ = complete("--adapter", run_dir / "adapter", "--model", run_dir / "base_model", "--prompt", "Once upon",
                       "--max-new-tokens", 12)
    assert same == text


def test_chat_goes_through_the_chat_template_and_sampling_follows_the_seed(run_dir):
    tokenizer = build_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = torch.tensor([list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))])
    text, terminal = complete("--adapter", run_dir, "--chat", "Hi!", "--system", "Be brief.", "--max-new-tokens", 8)
    assert text == tokenizer.decode(reference(run_dir, ids, True, 8), skip_special_tokens=True)
    assert terminal.getvalue() == text + "\n"  # the reply only, not the template
    sampled = [complete("--adapter", run_dir, "--chat", "Hi!", "--max-new-tokens", 8, "--do-sample",
                        "--temperature", 1.5, "--seed", seed)[0] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "{run}"], "give --prompt TEXT or --chat MESSAGE"),
    (["--adapter", "{run}/nothing", "--prompt", "x"], "no adapter_config.json there or in"),
    (["--adapter", "{run}", "--prompt", "x", "--system", "s"], "--system goes with --chat"),
    (["--adapter", "{run}", "--prompt", "x", "--do-sample", "--temperature", "0"], "--temperature must be positive"),
])
def test_bad_input_is_one_line(run_dir, capsys, argv, message):
    assert gen.main([a.format(run=run_dir) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorafa-scale generate: error: ") and message in err
