"""The ``tokenpacker-llava`` command line: a thin dispatcher over subcommands.

Each subcommand declares its arguments here and imports its implementation lazily, so
``--help`` stays fast and optional dependencies are only needed by the command that uses them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

DTYPES = ("float32", "float16", "bfloat16")


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a LLaVA/TokenPacker reference checkpoint folder into this project's format",
        description=(
            "Reads a reference folder (config.json with mm_* keys, model.mm_projector.* / model.* / lm_head.* "
            "weights, Llama tokenizer) and writes a TokenPackerLlavaForConditionalGeneration folder "
            "(safetensors, tokenizer with <image>, image processor), then checks that it loads strictly."
        ),
    )
    parser.add_argument("--src", required=True, help="reference checkpoint folder")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument(
        "--vision_tower", help="hub id or folder of the vision tower (default: mm_vision_tower)"
    )
    parser.add_argument("--text_model_type", help="LLM model_type if not inferable from `architectures`")
    parser.add_argument("--dtype", choices=DTYPES, help="cast floating-point weights (default: keep)")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="allow code from the checkpoint repos"
    )
    parser.add_argument("--no_verify", action="store_true", help="skip loading the result back")
    parser.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    import torch

    from tokenpacker_llava.conversion import convert_reference_checkpoint

    dst = convert_reference_checkpoint(
        args.src,
        args.dst,
        vision_tower=args.vision_tower,
        text_model_type_override=args.text_model_type,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_shard_size=args.max_shard_size,
        trust_remote_code=args.trust_remote_code,
        verify=not args.no_verify,
    )
    print(f"converted {args.src} -> {dst}")
    return 0


def _add_projectors(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("projectors", help="list the registered projectors")
    parser.set_defaults(func=_run_projectors)


def _run_projectors(args: argparse.Namespace) -> int:
    from tokenpacker_llava.models.projectors import PROJECTORS, TokenPreservingProjector

    for name in PROJECTORS.names():
        cls = PROJECTORS.get(name)
        scales = (1,) if issubclass(cls, TokenPreservingProjector) else (2, 3, 4)
        tokens = ", ".join(f"s={s}: {cls.output_tokens(24, s)}" for s in scales)
        print(f"{name:14s} {cls.__name__:24s} tokens from a 24x24 grid: {tokens}")
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_convert, _add_projectors)


def build_parser() -> argparse.ArgumentParser:
    from tokenpacker_llava import __version__

    parser = argparse.ArgumentParser(prog="tokenpacker-llava", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
