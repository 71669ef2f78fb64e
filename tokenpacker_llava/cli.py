"""The ``tokenpacker-llava`` command line: a thin dispatcher over subcommands.

Each subcommand declares its arguments here and imports its implementation lazily, so
``--help`` stays fast and optional dependencies are only needed by the command that uses them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from tokenpacker_llava.inference.commands import add_answer, add_chat, add_eval, add_merge_answers, add_score
from tokenpacker_llava.models.configuration import IMAGE_ASPECT_RATIOS, SLICE_PATCH_NUMS

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
    parser.add_argument(
        "--patch_num",
        type=int,
        choices=(9, 16, 25),
        help="slice-mode (HD) checkpoints: the tile budget, if the config lacks or misstates it (default: "
        "the config's, else 9)",
    )
    parser.add_argument(
        "--projector_type",
        help="the checkpoint's projector (default: read from the mm_projector weights' keys; the config's "
        "mm_projector_type is not trusted, as the reference code ignores it and always builds TokenPacker)",
    )
    parser.add_argument(
        "--scale_factor",
        type=int,
        help="TokenPacker's scale factor (2/3/4: 144/64/36 tokens at 336 px) if the config lacks or "
        "misstates it; the weights do not depend on it (default: the config's, else 2, with a warning)",
    )
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
        patch_num=args.patch_num,
        projector_type=args.projector_type,
        scale_factor=args.scale_factor,
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


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data_path", required=True, nargs="+", help="LLaVA .json/.jsonl files or dataset ids"
    )
    parser.add_argument("--image_folder", help="folder the records' image paths are relative to")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (enables exact token lengths)")
    parser.add_argument("--template", default="vicuna_v1", help="conversation template (default: vicuna_v1)")
    parser.add_argument(
        "--num_image_tokens", type=int, default=144, help="visual tokens per image (default 144)"
    )
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument(
        "--image_aspect_ratio",
        choices=IMAGE_ASPECT_RATIOS,
        default="pad",
        help="slice: TokenPacker-HD (--num_image_tokens per view, tiles planned from each image's size)",
    )
    parser.add_argument(
        "--patch_num", type=int, choices=SLICE_PATCH_NUMS, default=9, help="slice mode: most tiles"
    )
    parser.add_argument("--image_processor", help="image processor folder or hub id (default: CLIP-L/336's)")
    parser.add_argument("--trust_remote_code", action="store_true")


def _slice_patch_num(args: argparse.Namespace) -> int | None:
    return args.patch_num if args.image_aspect_ratio == "slice" else None


def _image_processor(args: argparse.Namespace):
    if not args.image_processor:
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(args.image_processor, trust_remote_code=args.trust_remote_code)


def _add_data(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="validate and inspect training data")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    check = commands.add_parser(
        "check",
        help="validate every row in parallel; exit 1 if any row is invalid",
        description="Parses every row, decodes every image, tokenizes every conversation (with --tokenizer) "
        "and prints counts by problem kind, the first rows of each, and token-length statistics.",
    )
    _add_data_arguments(check)
    check.add_argument("--num_workers", type=int, default=None, help="worker processes (default: all cores)")
    check.add_argument("--max_examples", type=int, default=5, help="rows listed per problem kind")
    check.set_defaults(func=_run_data_check)
    show = commands.add_parser("show", help="print one tokenized sample with its supervised spans marked")
    _add_data_arguments(show)
    show.add_argument("--index", type=int, default=0, help="sample index (after mixing)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_run_data_show)


def _data_tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from tokenpacker_llava.data.templates import get_template
    from tokenpacker_llava.tokenization import ensure_image_token

    if args.tokenizer is None:
        return None, None, None
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code)
    image_token_id = ensure_image_token(tokenizer)
    template = get_template(args.template)
    template.required_tokens(tokenizer)
    return tokenizer, template, image_token_id


def _run_data_check(args: argparse.Namespace) -> int:
    from tokenpacker_llava.data.check import check_dataset
    from tokenpacker_llava.data.sources import parse_data_path

    tokenizer, template, image_token_id = _data_tokenizer(args)
    patch_num = _slice_patch_num(args)
    report = check_dataset(
        parse_data_path(args.data_path, args.image_folder),
        tokenizer=tokenizer,
        template=template,
        image_token_id=image_token_id,
        tokens_per_image=args.num_image_tokens,
        max_length=args.model_max_length,
        image_processor=_image_processor(args),
        num_workers=args.num_workers,
        max_examples=args.max_examples,
        patch_num=patch_num,
    )
    print(
        report.format(
            args.model_max_length,
            args.num_image_tokens,
            exact_lengths=tokenizer is not None,
            patch_num=patch_num,
        )
    )
    return 1 if report.invalid else 0


def _run_data_show(args: argparse.Namespace) -> int:
    from tokenpacker_llava.data.show import show_sample

    tokenizer, template, image_token_id = _data_tokenizer(args)
    if tokenizer is None:
        raise SystemExit("data show needs --tokenizer")
    return show_sample(
        args.data_path,
        args.image_folder,
        index=args.index,
        tokenizer=tokenizer,
        template=template,
        image_token_id=image_token_id,
        tokens_per_image=args.num_image_tokens,
        max_length=args.model_max_length,
        as_json=args.json,
        patch_num=_slice_patch_num(args),
        image_processor=_image_processor(args),
    )


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    # Listed for --help only: main() hands `train ...` to the trainer's own parser directly.
    subparsers.add_parser(
        "train",
        help="train (stage 1 with --tune_mm_mlp_adapter, else stage 2); `train --help` lists every option",
        add_help=False,
    )


def _add_merge_lora(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge-lora", help="merge a LoRA run's adapters into a standalone model folder"
    )
    parser.add_argument("--run_dir", required=True, help="output_dir of the LoRA training run")
    parser.add_argument("--output_dir", required=True, help="where to write the merged model")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the merged weights")
    parser.set_defaults(func=_run_merge_lora)


def _run_merge_lora(args: argparse.Namespace) -> int:
    import torch

    from tokenpacker_llava.training.merge import merge_lora

    dst = merge_lora(args.run_dir, args.output_dir, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"merged {args.run_dir} -> {dst}")
    return 0


def _add_push(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push", help="upload a saved model folder to the Hugging Face Hub (with remote code and a model card)"
    )
    parser.add_argument("--folder", required=True)
    parser.add_argument("--repo_id", required=True, help="e.g. your-name/tokenpacker-7b-144")
    parser.add_argument("--private", action="store_true")
    parser.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from tokenpacker_llava.export import push_folder

    print(push_folder(args.folder, args.repo_id, private=args.private))
    return 0


def _add_plot(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw training curves (loss, eval loss, lr, grad norm, tokens/s) of one or more runs as a PNG",
        description="Reads each run's trainer_state.json (the run folder's, else its newest checkpoint's, so "
        "a run in progress works too) and draws the runs overlaid.",
    )
    parser.add_argument("runs", nargs="+", help="run folders, checkpoint folders or trainer_state.json files")
    parser.add_argument(
        "--output", help="PNG path (default: training_curves.png in the only run, else in the current folder)"
    )
    parser.add_argument(
        "--smoothing",
        type=float,
        help="EMA weight for the training loss, in [0, 1) (0: off; default: about 1/30 of the points)",
    )
    parser.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenpacker_llava.training.curves import CURVES_FILE, find_log_history, plot_training_curves

    if args.smoothing is not None and not 0 <= args.smoothing < 1:
        raise SystemExit(f"--smoothing {args.smoothing}: must be in [0, 1)")
    runs = {}
    for run in args.runs:
        history, source = find_log_history(run)
        label = Path(run).resolve().name
        runs[label if label not in runs else str(run)] = history
        print(f"{run}: {len(history)} log entries from {source}")
    default = (
        Path(args.runs[0]) / CURVES_FILE
        if len(args.runs) == 1 and Path(args.runs[0]).is_dir()
        else CURVES_FILE
    )
    print(plot_training_curves(runs, args.output or default, smoothing=args.smoothing))
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_train,
    _add_merge_lora,
    _add_data,
    _add_convert,
    _add_push,
    _add_plot,
    _add_projectors,
    add_chat,
    add_answer,
    add_merge_answers,
    add_eval,
    add_score,
)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # Every option after `train` belongs to the trainer's own (HfArgumentParser) parser.
        from tokenpacker_llava.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
