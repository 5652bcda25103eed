"""`lorafa-scale generate`: what an adapter learned, streamed to the terminal, without writing code.

    lorafa-scale generate --adapter runs/lorafa-20250101-120000 --chat "Tell me a story"
    lorafa-scale generate --model path/to/llama --adapter out/adapter --prompt "The capital of France is"
    lorafa-scale generate --adapter runs/lorafa-... --chat "Hi" --no-adapter      # the base alone, to compare
    lorafa-scale generate ... --do-sample --temperature 0.7 --top-p 0.9 --seed 1  # sampled, not greedy

--adapter takes an adapter directory (PEFT format) or a training run's output dir (its adapter/). The base
model is --model, else the run's base_model/ (the built-in job's), else the adapter's
base_model_name_or_path. --prompt continues a text (echoed first); --chat sends one user message through
the tokenizer's chat template and prints the reply.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .cli_args import Parser, RawDescriptionHelpFormatter, quiet_third_party
from .config import ConfigError
from .peft_format import AdapterFormatError

ADAPTER_CONFIG = "adapter_config.json"


def build_parser() -> Parser:
    p = Parser(prog="lorafa-scale generate", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--adapter", help="adapter directory, or a training run's output dir holding adapter/")
    add("--model", help="base model (Hugging Face name or local directory; default: the run's base_model/, "
        "else the adapter's base_model_name_or_path)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="text to continue")
    text.add_argument("--chat", help="one user message, sent through the tokenizer's chat template")
    add("--system", help="with --chat: a system message before the user's")
    add("--no-adapter", action="store_true", help="generate with the base model alone, to compare")
    add("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    add("--do-sample", action="store_true", help="sample instead of greedy decoding")
    add("--temperature", type=float, default=1.0, help="with --do-sample: softmax temperature")
    add("--top-p", type=float, default=1.0, help="with --do-sample: nucleus sampling mass")
    add("--top-k", type=int, default=0, help="with --do-sample: keep the k likeliest tokens (0 = all)")
    add("--seed", type=int, default=0, help="with --do-sample: seed of the sampling")
    add("--quantization", default="none", choices=("none", "int8", "nf4", "fp4"),
        help="load the base quantized, as in training")
    add("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="base model dtype (auto: bfloat16 on a GPU that supports it, else float32)")
    add("--trust-remote-code", action="store_true", help="allow the model's own Python code from the Hub")
    return p


def adapter_dir(path: str) -> Path:
    """The adapter directory: `path` itself, or `path`/adapter for a training run's output dir."""
    directory = Path(path)
    for candidate in (directory, directory / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ConfigError(f"--adapter {path}: no {ADAPTER_CONFIG} there or in {directory / 'adapter'}")


def base_model_path(args, adapter: Path | None) -> str:
    if args.model:
        return args.model
    if adapter is None:
        raise ConfigError("--model is required without --adapter")
    for run in (adapter.parent, adapter):  # the built-in job writes <output-dir>/base_model
        if (run / "base_model" / "config.json").is_file():
            return str(run / "base_model")
    base = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter / ADAPTER_CONFIG} names no base model; pass --model")
    return base


def load(args):
    """(model, tokenizer) on the best device: the base, with the adapter unless --no-adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = adapter_dir(args.adapter) if args.adapter else None
    if adapter is None and not args.no_adapter:
        raise ConfigError("--adapter is required (or --no-adapter with --model)")
    base_path = base_model_path(args, adapter)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if args.quantization != "none":
        from .quantization import load_model

        model = load_model(base_path, args.quantization, dtype, trust_remote_code=args.trust_remote_code)
    else:
        if Path(base_path).exists() and not (Path(base_path) / "config.json").is_file():
            raise ConfigError(f"--model {base_path}: no config.json; not a Hugging Face model directory")
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype),
                                                     trust_remote_code=args.trust_remote_code)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=args.trust_remote_code)
    if not args.no_adapter:
        from .model import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval(), tokenizer


def prompt_ids(args, tokenizer) -> torch.Tensor:
    if args.chat is not None:
        if tokenizer.chat_template is None:
            raise ConfigError("--chat: the tokenizer has no chat template; use --prompt")
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.chat}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        return torch.tensor([list(ids)])
    return tokenizer(args.prompt, return_tensors="pt").input_ids


def generate(args, out=None) -> str:
    """Stream the completion to `out` (stdout) as it is generated; return it."""
    from transformers import TextStreamer

    out = out or sys.stdout
    model, tokenizer = load(args)
    ids = prompt_ids(args, tokenizer).to(next(model.parameters()).device)
    if args.prompt is not None:
        out.write(args.prompt)  # the completion continues it
        out.flush()

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if args.do_sample:
        torch.manual_seed(args.seed)
        options.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    else:  # greedy: no sampling settings, whatever the model's generation_config says
        options.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                streamer=Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **options)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def _check(args) -> None:
    if args.prompt is None and args.chat is None:
        raise ConfigError("give --prompt TEXT or --chat MESSAGE")
    if args.system is not None and args.chat is None:
        raise ConfigError("--system goes with --chat")
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.do_sample and (args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0):
        raise ConfigError("--temperature must be positive, --top-p in (0, 1] and --top-k not negative")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _check(args)
        from transformers.utils import logging

        quiet_third_party(deepspeed=False, quantized=args.quantization != "none")
        logging.disable_progress_bar()  # the terminal shows the answer, not "Loading weights"
        generate(args)
    except (ConfigError, AdapterFormatError, FileNotFoundError, OSError) as err:
        print(f"lorafa-scale generate: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
