"""Merge a LoRA adapter into its base model: a full Hugging Face folder that needs no peft.

    python tools/merge_lora.py /models/Llama-2-7b-chat-hf runs/llama2-7b-agentflan-lora/final merged-7b
    python tools/merge_lora.py BASE ADAPTER OUT --dtype bf16

BASE is a Hugging Face Llama folder, ADAPTER a LoRA adapter in PEFT's format (a LoRA run's
final/, or one PEFT saved), OUT the folder to write: a new one, or with --overwrite an earlier
model folder (one holding config.json), replaced atomically; never a file, another folder,
BASE or ADAPTER. Each weight is read, merged in fp32 and written one at a time, so memory
stays at one tensor plus the adapter. OUT gets the adapter's tokenizer files when it has them (the
tokenizer and chat template it was trained with), else the base's.
"""

from __future__ import annotations

import argparse
import sys

import torch

from agentflan.cli import ArgumentParser
from agentflan.adapter import merge_folders, other_base_warning

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", metavar="BASE", help="the base model's Hugging Face folder")
    parser.add_argument("adapter", metavar="ADAPTER", help="the LoRA adapter folder (PEFT format)")
    parser.add_argument("out", metavar="OUT", help="the merged model's folder")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto",
                        help="stored dtype of the merged weights (auto: the base's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT when it is an earlier model folder (never another folder or a file)")
    args = parser.parse_args(argv)
    try:
        warning = other_base_warning(args.base, args.adapter)
        if warning:
            print(warning, file=sys.stderr)
        merge_folders(args.base, args.adapter, args.out, DTYPES[args.dtype], overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as err:  # agentflan.checkpoint.CheckpointError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {args.base} with {args.adapter} merged in")
    return 0


if __name__ == "__main__":
    sys.exit(main())
