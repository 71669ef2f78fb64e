"""One training step of a 7B-shaped TokenPacker-LLaVA with random weights: throughput and MFU.

CLIP-L/336 (24 layers, 1024 wide; the tower runs up to layer 23, the -2 feature layer) + a
projector + Llama-2-7B/Vicuna-7B shapes (32 layers, 4096 wide, 11008 MLP, vocab 32000), built from
configs directly on the device (bf16 on CUDA, fp32 on CPU; nothing is downloaded). Each row is one
(stage, projector) pair, built fresh from the same seed and trained on the same batches:

- stage 2 (finetune): projector + LLM train, the vision tower is frozen;
- stage 1 (pretrain): only the projector trains; the backward still runs through the whole LLM
  to reach the image features.

Both use the package's own freezing (``training.stages.configure_stage``) and, as the launch
scripts' recipe (``--gradient_checkpointing True`` for both stages), non-reentrant activation
checkpointing enabled on the whole model the way the Trainer does it (only the LLM layers
recompute anything: nothing under the frozen tower needs a gradient). A batch is ``--batch``
samples of a mix665k-like length mixture (``packing.make_samples``: ~1/3 text-only, log-normal
text lengths around 110 tokens, each image expanded to the projector's visual tokens), packed
into one padding-free row by ``PackedCollator`` (the launch scripts' default), random pixels.
A step is forward + backward + ``torch.optim.AdamW`` (fused on CUDA) over the trainable
parameters; the parameters (so the gradients and Adam moments) are in the run's dtype, i.e. pure
bf16 on CUDA, not DeepSpeed's fp32 master copy. Warm-up steps are not timed.

Model FLOPs of a step (MFU, not HFU: checkpointing's recomputation is not counted), summed over
the batch's samples of lengths L (visual tokens included) and its images:

- LLM matmuls: 6 N per token in stage 2 (forward 2N, backward 4N), 4 N in stage 1 (forward 2N +
  activation gradients 2N, no weight gradients); N = the LLM's parameters without the input
  embedding table. The lm_head is part of N on every position with the LLM's own loss
  (``--loss_chunk_size 0``); with the chunked loss (the scripts' default, 2048) it runs on the
  positions with a target only, and only those count.
- LLM attention: forward 2 * 2 * layers * hidden * L**2 / 2 per sample (QK^T and PV, causal
  half), times 3 in stage 2 and times 2 in stage 1.
- vision tower, forward only: 2 * N_layers per token over its 577 tokens (CLS included) plus the
  patch-embedding convolution on the 576 patches, plus 2 * 2 * layers * width * 577**2 attention.
- projector: 3 x its forward FLOPs per image (counted once by ``torch.utils.flop_counter``).

MFU = model FLOPs / step time / peak, where the peak is the measured rate of a bf16 8192**3
matmul on CUDA (fp32 1024**3 on CPU); ``--peak_tflops`` adds a column against a spec sheet (H200
dense bf16: ~989 TFLOP/s). Peak GPU memory is ``torch.cuda.max_memory_allocated`` of the row
(weights, gradients, Adam moments and activations). A row that runs out of GPU memory is printed
as OOM and the run continues.

    python benchmarks/step.py --device cuda                         # 7B shapes, bf16, batch 16
    python benchmarks/step.py --device cuda --peak_tflops 989       # also MFU against the H200 spec
    python benchmarks/step.py --device cuda --stages 2 --projectors tokenpacker:2 --steps 10
    python benchmarks/step.py --device cuda --llm_layers 8          # a shallower LLM
    python benchmarks/step.py --quick                               # tiny dims on CPU, seconds (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import time

import torch
from packing import IMAGE_TOKEN, VOCAB, make_samples
from projector import matmul_rate
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig

from tokenpacker_llava import TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.data.collate import PackedCollator
from tokenpacker_llava.models.attention import ATTENTION_CHOICES, resolve_attn_implementation
from tokenpacker_llava.training.stages import configure_stage

STAGES = {1: "pretrain", 2: "finetune"}
DEFAULT_PROJECTORS = ("mlp2x_gelu", "tokenpacker:2", "tokenpacker:3")
SHAPE_FLAGS = ("hidden", "intermediate", "llm_layers", "heads", "vocab", "vision_layers")


@dataclasses.dataclass(frozen=True)
class Shapes:
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    llm_layers: int
    heads: int
    vocab: int


CLIP_L_336_VICUNA_7B = Shapes(1024, 4096, 24, 16, 336, 14, 4096, 11008, 32, 32, 32000)
QUICK = Shapes(64, 128, 2, 4, 48, 8, 128, 256, 2, 4, VOCAB)  # 6x6 grid: 36 / 9 / 4 visual tokens


def parse_projector(spec: str) -> tuple[str, int | None]:
    """``mlp2x_gelu`` or ``tokenpacker:3`` -> (projector type, scale factor or None)."""
    name, _, scale = spec.partition(":")
    return name, int(scale) if scale else None


def projector_label(name: str, scale: int | None) -> str:
    return name if scale is None else f"{name} s{scale}"


def build_model(
    shapes: Shapes, projector: str, scale: int | None, device: str, dtype: torch.dtype, seed: int
) -> TokenPackerLlavaForConditionalGeneration:
    """Random weights, created on ``device`` in ``dtype`` (no fp32 host copy of a 7B model)."""
    vision = CLIPVisionConfig(
        hidden_size=shapes.vision_hidden,
        intermediate_size=shapes.vision_intermediate,
        num_hidden_layers=shapes.vision_layers,
        num_attention_heads=shapes.vision_heads,
        image_size=shapes.image_size,
        patch_size=shapes.patch_size,
    )
    text = LlamaConfig(
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_hidden_layers=shapes.llm_layers,
        num_attention_heads=shapes.heads,
        vocab_size=shapes.vocab,
        max_position_embeddings=4096,
    )
    config = TokenPackerLlavaConfig(
        vision_config=vision,
        text_config=text,
        projector_type=projector,
        scale_factor=scale,
        image_token_id=IMAGE_TOKEN,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = TokenPackerLlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(device)  # a no-op unless something was built elsewhere
    # (Float buffers such as the RoPE frequencies stay as transformers made them, in float32.)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {dtype}:
        raise RuntimeError(f"weights were built in {sorted(map(str, dtypes))}, not {dtype}")
    return model


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """What the model-FLOPs formula (module docstring) needs from one built model."""

    llm_params: int  # the lm_head included
    head_params: int
    llm_layers: int
    llm_hidden: int
    vision_flops_per_image: float  # forward
    projector_flops_per_image: float  # forward

    def step(self, lengths: list[int], images: int, stage: int, head_tokens: int) -> float:
        """``head_tokens``: the positions the lm_head runs on (all, or the targets only)."""
        passes = 3 if stage == 2 else 2  # forward + backward (stage 2) / + activation grads (stage 1)
        llm = (
            passes
            * 2
            * ((self.llm_params - self.head_params) * sum(lengths) + self.head_params * head_tokens)
        )
        attention = passes * sum(2 * self.llm_layers * self.llm_hidden * length**2 for length in lengths)
        return llm + attention + images * (self.vision_flops_per_image + 3 * self.projector_flops_per_image)


def flop_model(model: TokenPackerLlavaForConditionalGeneration) -> FlopModel:
    llm = model.language_model
    embedding = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    llm_params = sum(p.numel() for p in llm.parameters())  # shared (tied) tensors are listed once
    if head is None or head.weight is not embedding:
        llm_params -= embedding.numel()  # a lookup, not a matmul; a tied table is the head's matmul
    tower = model.vision_tower
    vision = tower.model
    grid_tokens = tower.grid_size**2
    tokens = grid_tokens + tower.num_prefix_tokens
    layer_params = sum(p.numel() for p in vision.encoder.layers.parameters())
    patch_params = vision.embeddings.patch_embedding.weight.numel()
    vision_flops = (
        2 * layer_params * tokens
        + 2 * patch_params * grid_tokens
        + 2 * 2 * len(vision.encoder.layers) * tower.hidden_size * tokens**2
    )
    projector = model.projector
    parameter = next(projector.parameters())
    features = torch.randn(1, grid_tokens, projector.in_dim, device=parameter.device, dtype=parameter.dtype)
    multi_level = None
    if projector.uses_multi_level:
        multi_level = torch.randn(
            1, grid_tokens, projector.multi_level_dim, device=parameter.device, dtype=parameter.dtype
        )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        projector(features, multi_level=multi_level)
    return FlopModel(
        llm_params=llm_params,
        head_params=head.weight.numel() if head is not None else 0,
        llm_layers=llm.config.num_hidden_layers,
        llm_hidden=llm.config.hidden_size,
        vision_flops_per_image=float(vision_flops),
        projector_flops_per_image=float(counter.get_total_flops()),
    )


def make_batches(
    count: int, batch: int, tokens_per_image: int, max_length: int, seed: int
) -> list[tuple[dict, list[int], int]]:
    """``count`` packed batches: (collated batch with placeholder pixels, sample lengths, images).

    ``make_samples`` draws the same conversations for every projector (only the number of
    placeholders differs). Pixels are drawn on the device per step.
    """
    samples = make_samples(count * batch, tokens_per_image, VOCAB, seed=seed, max_length=max_length)
    collate = PackedCollator()
    batches = []
    for start in range(0, len(samples), batch):
        group = samples[start : start + batch]
        collated = collate(group)
        images = len(collated["pixel_values"]) if "pixel_values" in collated else 0
        batches.append((collated, [len(s["input_ids"]) for s in group], images))
    return batches


def to_device(batch: dict, image_size: int, device: str, dtype: torch.dtype, seed: int) -> dict:
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "pixel_values" in moved:
        shape = (len(moved["pixel_values"]), 3, image_size, image_size)
        generator = torch.Generator(device=device).manual_seed(seed)
        moved["pixel_values"] = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return moved


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run_row(
    shapes: Shapes,
    projector: str,
    scale: int | None,
    stage: int,
    args: argparse.Namespace,
    device: str,
    dtype: torch.dtype,
    attention: str,
) -> dict:
    model = build_model(shapes, projector, scale, device, dtype, seed=args.seed)
    model.set_attn_implementation(attention)
    configure_stage(model, STAGES[stage])
    if not args.no_gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(kwargs)
        else:  # transformers before activation_checkpointing_enable
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    model.use_chunked_loss(args.loss_chunk_size or None)
    flops = flop_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = device.startswith("cuda")
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0, fused=True if cuda else None)
    batches = make_batches(
        args.warmup + args.steps, args.batch, model.num_image_tokens, args.max_length, args.seed
    )
    seconds = tokens = model_flops = 0.0
    loss = None
    for index, (batch, lengths, images) in enumerate(batches):
        inputs = to_device(batch, shapes.image_size, device, dtype, seed=index)
        synchronize(device)
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if index >= args.warmup:
            seconds += time.perf_counter() - start
            tokens += sum(lengths)
            targets = int((batch["labels"][:, 1:] != -100).sum())
            head_tokens = targets if args.loss_chunk_size else sum(lengths)
            model_flops += flops.step(lengths, images, stage, head_tokens)
    return {
        "stage": stage,
        "projector": projector_label(projector, scale),
        "visual_tokens": model.num_image_tokens,
        "trainable_params": sum(p.numel() for p in trainable),
        "tokens_per_step": tokens / args.steps,
        "tokens_per_s": tokens / seconds,
        "step_ms": 1000 * seconds / args.steps,
        "model_flops_per_step": model_flops / args.steps,
        "flops_per_s": model_flops / seconds,
        "loss": loss.item(),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else math.nan,
        "oom": False,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny dims, CPU fp32, 2 timed steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 1], choices=sorted(STAGES))
    parser.add_argument(
        "--projectors", nargs="+", default=list(DEFAULT_PROJECTORS), help="type or type:scale_factor"
    )
    parser.add_argument("--batch", type=int, default=16, help="samples per packed row (per device)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--max_length", type=int, default=2048, help="tokens per sample at most")
    parser.add_argument("--attn", default="auto", choices=ATTENTION_CHOICES)
    parser.add_argument("--no_gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--loss_chunk_size",
        type=int,
        default=2048,
        help="the chunked loss (as the scripts); 0: the LLM's own",
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="also report MFU against this")
    parser.add_argument("--seed", type=int, default=0)
    for name in SHAPE_FLAGS:
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the model's {name}")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.max_length = 2, 1, 512
    overrides = {name: getattr(args, name) for name in SHAPE_FLAGS if getattr(args, name) is not None}
    shapes = dataclasses.replace(QUICK if args.quick else CLIP_L_336_VICUNA_7B, **overrides)
    if shapes.vocab < VOCAB:
        parser.error(f"--vocab must be at least {VOCAB} (the synthetic token ids)")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    device = args.device
    cuda = device.startswith("cuda")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, dtype_name)
    # auto: flash_attention_2 where flash-attn is installed and CUDA is used, else sdpa_varlen.
    attention = resolve_attn_implementation(args.attn)
    projectors = [parse_projector(spec) for spec in args.projectors]

    peak = matmul_rate(8192 if cuda else 1024, 50 if cuda else 3, device, dtype)
    spec = args.peak_tflops * 1e12 if args.peak_tflops else None
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"training step, {device} ({name}), {dtype_name}, batch {args.batch} samples packed in one row, "
        f"{args.steps} timed steps after {args.warmup} warm-up, attention {attention}, "
        f"checkpointing {'off' if args.no_gradient_checkpointing else 'on'}, "
        + (f"chunked loss ({args.loss_chunk_size} tokens)" if args.loss_chunk_size else "the LLM's own loss")
    )
    print(
        f"vision {shapes.vision_layers} layers x {shapes.vision_hidden} ({shapes.image_size}px / "
        f"{shapes.patch_size}), LLM {shapes.llm_layers} layers x {shapes.hidden} (MLP {shapes.intermediate}, "
        f"vocab {shapes.vocab}); measured {dtype_name} matmul peak {peak / 1e12:.3f} TFLOP/s"
        + (f", spec peak {args.peak_tflops:.0f} TFLOP/s" if spec else "")
    )
    header = (
        f"{'stage':<6} {'projector':<16} {'visual':>6} {'tokens/s':>10} {'step ms':>9} "
        f"{'TFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6}"
    )
    print(header + (f" {'MFU spec':>8}" if spec else "") + f" {'peak GiB':>9}")

    rows = {}
    for stage in args.stages:
        for projector, scale in projectors:
            label = projector_label(projector, scale)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            try:
                row = run_row(shapes, projector, scale, stage, args, device, dtype, attention)
            except torch.cuda.OutOfMemoryError:
                row = {"stage": stage, "projector": label, "oom": True}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            if row["oom"]:
                print(f"{stage:<6} {label:<16} {'OOM':>6}")
            else:
                row["mfu"] = row["flops_per_s"] / peak
                row["mfu_spec"] = row["flops_per_s"] / spec if spec else math.nan
                line = (
                    f"{stage:<6} {label:<16} {row['visual_tokens']:>6} {row['tokens_per_s']:>10.0f} "
                    f"{row['step_ms']:>9.1f} {row['model_flops_per_step'] / 1e12:>10.3f} "
                    f"{row['flops_per_s'] / 1e12:>8.3f} {row['mfu']:>6.1%}"
                )
                print(line + (f" {row['mfu_spec']:>8.1%}" if spec else "") + f" {row['peak_gib']:>9.2f}")
            rows[(stage, label)] = row
    return {
        "rows": rows,
        "matmul_rate": peak,
        "attention": attention,
        "device": device,
        "dtype": dtype_name,
        "shapes": shapes,
    }


if __name__ == "__main__":
    main()
