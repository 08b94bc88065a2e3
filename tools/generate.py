"""Generate from a model folder: raw prompts, a batch of conversations, or an interactive chat.

    python tools/generate.py runs/default/final --chat
    python tools/generate.py runs/default/final --chat --system "You are a helpful agent."
    python tools/generate.py runs/default/final --prompt "The capital of France is" --max-new-tokens 20
    python tools/generate.py /models/Llama-2-7b-chat-hf --template llama2-chat --messages convs.jsonl > replies.jsonl
    python tools/generate.py /models/Llama-2-7b-chat-hf --adapter runs/lora/final --chat

MODEL_DIR is one of our runs' final/ folders or any Hugging Face Llama-2 folder
(config.json, safetensors weights, tokenizer.model). The chat template defaults to the
one the folder records (agentflan.json in our final/ folders), else agentflan.
--adapter adds a LoRA adapter in PEFT's format (a LoRA run's final/): it is merged into the
weights as they load, and its tokenizer and template record win over MODEL_DIR's.

--prompt continues raw text with no template (so --template does not apply to it); every
mode stops at the tokenizer's EOS and the folder's generation_config.json EOS ids (our
runs list the template's end of turn there), as transformers does.

--messages reads one conversation a line: a list of {"role", "content"} messages, or an
object holding it under "messages" or "conversation" (Agent-FLAN records work as they
are), with an optional "id". A conversation that ends with an assistant turn, as dataset
records do, has that turn regenerated: it is dropped, the model replies to the turns
before it, and the dropped text is written as "reference" beside the reply (stderr counts
them). It writes one JSON object a line: {"id", "reply", "finish_reason", "stop",
"new_tokens"}, plus "reference" for a regenerated turn.

In --chat, type a message and press Enter; /reset starts a new conversation (keeping
--system), /exit or end of input quits. Any other single /word is refused as an unknown
command; a message that starts with "/" is typed with "//" (one slash is sent).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from agentflan.adapter import other_base_warning
from agentflan.cli import ArgumentParser
from agentflan.data.templates import TEMPLATES
from agentflan.generate import (
    Generator,
    SamplingParams,
    check_kernels,
    check_model_folder,
    resolve_device,
    resolve_dtype,
    to_conversation,
)
from agentflan.kernels import KERNEL_BACKENDS


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder (config.json, weights, tokenizer.model)")
    parser.add_argument("--adapter", metavar="FOLDER",
                        help="LoRA adapter folder (adapter_config.json, adapter_model.safetensors) for MODEL_DIR")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", action="append", metavar="TEXT",
                      help="raw text to continue, no template (repeat for a batch)")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat with the template, streamed")
    mode.add_argument("--messages", metavar="FILE.jsonl", help="a batch of conversations; replies go to stdout as JSONL")
    parser.add_argument("--system", help="system prompt for --chat")
    parser.add_argument("--template", choices=list(TEMPLATES),
                        help="chat template (default: the one the run trained with, else agentflan)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most per reply (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all, default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: all)")
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible samples (default: fresh)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string: a reply ends before it (repeatable)")
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help="run at most N prompts or conversations at once (default: all in one batch)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, default), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights and compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--kernels", default="auto", choices=list(KERNEL_BACKENDS),
                        help="kernels for the prompt pass (auto: Triton on CUDA, PyTorch elsewhere)")
    return parser


def read_messages(path: str) -> list[tuple[str, object, str | None]]:
    """(id, conversation, reference) for every non-blank line; reference is the text of a final
    assistant turn, dropped from the conversation so that the reply regenerates it (else None).
    Raises ValueError naming file and line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: {'a folder, not a file' if file.is_dir() else 'no such file'}")
    conversations = []
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            rid = str(line_no)
            if isinstance(record, dict):
                rid = str(record.get("id", rid))
                record = record.get("messages", record.get("conversation"))
                if record is None:
                    raise ValueError(f"{where}: expected a list of messages or an object with 'messages' or 'conversation'")
            if not isinstance(record, list):
                raise ValueError(f"{where}: the messages are {type(record).__name__}, expected a list")
            conv = to_conversation(record, where)
            reference = None
            if conv.messages[-1].role == "assistant":  # a dataset record: regenerate its last answer
                reference = conv.messages[-1].content
                conv = replace(conv, messages=conv.messages[:-1])
                if not conv.messages or conv.messages[-1].role == "assistant":
                    raise ValueError(f"{where}: the conversation ends with two assistant turns or holds only one; "
                                     f"nothing to reply to once the last is dropped")
            conversations.append((rid, conv, reference))
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def run_prompts(gen: Generator, prompts: list[str], params: SamplingParams, max_batch: int | None) -> None:
    if len(prompts) == 1:  # stream the one continuation as it comes
        echoed = False

        def show(_: int, text: str) -> None:  # the prompt is echoed once generation runs, so an
            nonlocal echoed  # error raised before it never lands on the prompt's line
            if not echoed:
                print(prompts[0], end="", flush=True)
                echoed = True
            print(text, end="", flush=True)

        gen.complete(prompts, params, on_text=show)
        print("" if echoed else prompts[0])
    else:
        done = gen.complete(prompts, params, max_batch=max_batch)
        for i, (prompt, completion) in enumerate(zip(prompts, done)):
            print(f"=== prompt {i + 1} ({completion.finish_reason}, {len(completion.token_ids)} new tokens)")
            print(prompt + completion.text)


def run_messages(
    gen: Generator, conversations: list[tuple[str, object, str | None]], params: SamplingParams,
    max_batch: int | None
) -> None:
    done = gen.chat([conv for _, conv, _ in conversations], params, max_batch=max_batch)
    for (rid, _, reference), reply in zip(conversations, done):
        line = {"id": rid, "reply": reply.text, "finish_reason": reply.finish_reason,
                "stop": reply.stop, "new_tokens": len(reply.token_ids)}
        if reference is not None:
            line["reference"] = reference
        print(json.dumps(line, ensure_ascii=False))


def run_chat(gen: Generator, system: str | None, params: SamplingParams) -> None:
    def fresh() -> list[dict[str, str]]:
        return [{"role": "system", "content": system}] if system else []

    history = fresh()
    print(f"chat with {gen.template} template; /reset starts over, /exit quits", flush=True)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print()
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            history = fresh()
            print("(new conversation)", flush=True)
            continue
        if not command:
            continue
        if command.startswith("//"):  # a message that starts with "/"
            line = line.replace("/", "", 1)
        elif command.startswith("/") and len(command.split()) == 1:
            print(f"(unknown command {command}: /reset starts over, /exit quits; type //text to send /text)",
                  flush=True)
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        started = False

        def show(_: int, text: str) -> None:
            nonlocal started
            if not started:  # the reply's leading space belongs to the template, not the answer
                text = text.lstrip()
                started = bool(text)
            print(text, end="", flush=True)

        try:
            reply = gen.chat([history], params, on_text=show)[0]
        except ValueError as err:  # the conversation outgrew the model's context
            history.pop()
            print(f"\nerror: {err}; /reset starts a new conversation", flush=True)
            continue
        print(flush=True)
        if reply.finish_reason == "length":
            print(f"(reply cut at {params.max_new_tokens} tokens or the model's context)", flush=True)
        history.append({"role": "assistant", "content": reply.text})


# SamplingParams field -> the flag that sets it, for error messages.
FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
         "top_p": "--top-p", "stop_strings": "--stop"}


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, stop_strings=tuple(args.stop),
        )
    except ValueError as err:
        field, _, rest = str(err).partition(" ")
        raise ValueError(f"{FLAGS.get(field, field)} {rest}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.max_batch is not None and args.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
        if args.max_batch is not None and args.chat:
            raise ValueError("--max-batch applies to --prompt and --messages (--chat runs one conversation)")
        if args.system is not None and not args.chat:
            raise ValueError("--system applies to --chat only (put a system turn in --messages conversations)")
        if args.template is not None and args.prompt is not None:
            raise ValueError("--template applies to --chat and --messages (--prompt continues raw text, no template)")
        params = sampling_params(args)
        if args.temperature == 0 and (args.top_k or args.top_p < 1 or args.seed is not None):
            raise ValueError("--top-k, --top-p and --seed shape sampling; add --temperature > 0 (0 is greedy)")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        check_kernels(args.kernels, device)
        info = check_model_folder(args.model_dir, args.adapter)
        conversations = read_messages(args.messages) if args.messages else None
        if args.prompt is not None and any(not p for p in args.prompt):
            raise ValueError("--prompt needs a non-empty text")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.adapter:
        warning = other_base_warning(args.model_dir, args.adapter)
        if warning:
            print(warning, file=sys.stderr)
    context = info.config.max_seq_len
    if args.max_new_tokens >= context:
        print(f"warning: --max-new-tokens {args.max_new_tokens} is more than the model's context of {context} "
              f"tokens leaves after a prompt; each reply ends at the latest when prompt and reply fill it",
              file=sys.stderr)
    regenerated = sum(reference is not None for _, _, reference in conversations or ())
    if regenerated:
        print(f"note: {regenerated} of {len(conversations)} conversations end with an assistant turn: it is "
              f"dropped and regenerated (its text is written as \"reference\")", file=sys.stderr)
    try:
        gen = Generator.from_folder(args.model_dir, device=device, dtype=dtype, template=args.template,
                                    kernels=args.kernels, adapter=args.adapter)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.prompt:
            run_prompts(gen, args.prompt, params, args.max_batch)
        elif conversations is not None:
            run_messages(gen, conversations, params, args.max_batch)
        else:
            run_chat(gen, args.system, params)
    except ValueError as err:  # a prompt longer than the model's context
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
