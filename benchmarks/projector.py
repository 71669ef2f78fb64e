"""Projector forward+backward throughput: this TokenPacker vs a reference-style formulation.

The reference code groups keys and values into regions with several permute/reshape copies
and calls ``nn.MultiheadAttention`` (which projects every key and value, and also computes the
attention weights it then throws away). Ours moves the key/value projections onto the one
query of each region (``RegionAttention``). Both get the same weights and inputs; the table
reports time per forward+backward (the formulations and the matmul timed in interleaved rounds), images/s, the speedup, the FLOPs each formulation executes
(counted by ``torch.utils.flop_counter``), the rate it reaches, and that rate as a share of a
plain matmul's rate measured on the same device and dtype. The largest output difference shows
they compute the same function.

    python benchmarks/projector.py              # CLIP-L/336 widths, H=4096, batch 4 (CPU fp32)
    python benchmarks/projector.py --quick      # small widths, seconds (run by the tests)
    python benchmarks/projector.py --device cuda --dtype bfloat16 --batch 32   # on a GPU
    python benchmarks/projector.py --compile    # adds ours under torch.compile (--compile_parts)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tokenpacker_llava.models.projectors import build_projector

REFERENCE = "reference-style (MHA + reshapes)"
OURS = "tokenpacker_llava (projections absorbed)"
COMPILED = "tokenpacker_llava + torch.compile"


class ReferenceStyleTokenPacker(nn.Module):
    """The reference repository's formulation, with the same parameter names."""

    def __init__(self, dim: int, kv_dim: int, out_dim: int, grid: int, scale: int, heads: int = 8) -> None:
        super().__init__()
        self.grid, self.scale = grid, scale
        self.q_proj_1 = nn.Linear(dim, dim, bias=False)
        self.k_proj_1 = nn.Sequential(nn.Linear(kv_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.v_proj_1 = nn.Sequential(nn.Linear(kv_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.ln_q_1 = nn.LayerNorm(dim, eps=1e-6)
        self.ln_k_1 = nn.LayerNorm(dim, eps=1e-6)
        self.ln_v_1 = nn.LayerNorm(dim, eps=1e-6)
        self.clip_attn = nn.MultiheadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    @staticmethod
    def divide_feature(x: torch.Tensor, kernel: int, token_num: int, n: int, c: int) -> torch.Tensor:
        # (L, N, C) -> (kernel*kernel, N * regions, C), through the reference's reshapes.
        side = int(token_num**0.5)
        regions = side // kernel
        x = x.permute(1, 0, 2).reshape(n, side, side, c)
        x = x.reshape(n, regions, kernel, regions, kernel, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(n * regions * regions, kernel * kernel, c).permute(1, 0, 2)
        return x.contiguous()

    def forward(self, x: torch.Tensor, x_multi: torch.Tensor) -> torch.Tensor:
        key = self.ln_k_1(self.k_proj_1(x_multi)).permute(1, 0, 2)
        value = self.ln_v_1(self.v_proj_1(x_multi)).permute(1, 0, 2)
        token_num, n, c = key.shape
        g = self.grid // self.scale
        q = F.interpolate(
            x.reshape(n, self.grid, self.grid, -1).permute(0, 3, 1, 2).float(), size=(g, g), mode="bilinear"
        ).to(x.dtype)
        q = q.permute(0, 2, 3, 1).reshape(n, g * g, -1)
        query = self.ln_q_1(self.q_proj_1(q)).permute(1, 0, 2)  # (g*g, N, C)
        query = query.permute(1, 0, 2).reshape(1, n * g * g, c)
        reshape_key = self.divide_feature(key, self.scale, token_num, n, c)
        reshape_value = self.divide_feature(value, self.scale, token_num, n, c)
        out = self.clip_attn(query, reshape_key, reshape_value)[0]  # weights computed and dropped
        return self.mlp(out.reshape(n, g * g, c))


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each run, timed in rounds (one call of each per round) after one untimed
    warm-up call each: a machine that slows down or speeds up mid-benchmark (a shared host)
    then shifts every row alike instead of whichever ran at that time."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fwd_bwd(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def run() -> None:
        module(*inputs).float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    return run


def count_flops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of one forward+backward, as torch's flop counter sees them (matmuls and attention)."""
    with FlopCounterMode(display=False) as counter:
        module(*inputs).float().square().mean().backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul(size: int, device: str, dtype: torch.dtype) -> tuple[Callable[[], object], int]:
    """A square ``size`` matmul and its FLOPs: the device's practical GEMM peak for the comparison."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * size**3


def matmul_rate(size: int, repeats: int, device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a square ``size`` matmul (median of ``repeats``)."""
    run, flops = matmul(size, device, dtype)
    return flops / interleaved_medians({"matmul": run}, repeats, device)["matmul"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--compile", action="store_true", help="add ours under torch.compile")
    args = parser.parse_args(argv)
    dim, kv_dim, out_dim, grid = (1024, 4096, 4096, 24) if not args.quick else (128, 512, 256, 24)
    batch = args.batch if not args.quick else 2
    repeats = args.repeats if not args.quick else 20  # tiny iterations: more of them, less noise
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ours = build_projector(
        "tokenpacker",
        in_dim=dim,
        multi_level_dim=kv_dim,
        out_dim=out_dim,
        grid_size=grid,
        scale_factor=args.scale,
    )
    reference = ReferenceStyleTokenPacker(dim, kv_dim, out_dim, grid, args.scale)
    reference.load_state_dict(ours.state_dict(), strict=True)
    ours.to(args.device, dtype)
    reference.to(args.device, dtype)
    x = torch.randn(batch, grid * grid, dim, device=args.device, dtype=dtype)
    x_multi = torch.randn(batch, grid * grid, kv_dim, device=args.device, dtype=dtype)
    with torch.no_grad():
        difference = (ours(x, x_multi).float() - reference(x, x_multi).float()).abs().max().item()
    modules = {REFERENCE: reference, OURS: ours}
    if args.compile:
        modules[COMPILED] = copy.deepcopy(ours)
        modules[COMPILED].compile()  # as --compile_parts projector; compiled by the warm-up call
    flops = {name: count_flops(module, (x, x_multi)) for name, module in modules.items() if name != COMPILED}
    runs = {name: fwd_bwd(module, (x, x_multi)) for name, module in modules.items()}
    # The matmul that defines "of matmul" is timed in the same rounds as the projectors.
    runs["matmul"], matmul_flops = matmul(512 if args.quick else 4096, args.device, dtype)
    rows = interleaved_medians(runs, repeats, args.device)
    peak = matmul_flops / rows.pop("matmul")
    if args.compile:
        flops[COMPILED] = flops[OURS]
        with torch.no_grad():
            compiled_difference = (
                (modules[COMPILED](x, x_multi).float() - ours(x, x_multi).float()).abs().max().item()
            )
    base = rows[REFERENCE]
    print(
        f"TokenPacker fwd+bwd, {args.device} {args.dtype}, batch {batch}, widths {dim}/{kv_dim}->{out_dim}, "
        f"grid {grid}, scale {args.scale} ({(grid // args.scale) ** 2} tokens), median of {repeats}, "
        f"torch threads {torch.get_num_threads()}; matmul rate {peak / 1e12:.3f} TFLOP/s"
    )
    print(
        f"{'formulation':<42} {'ms/iter':>9} {'images/s':>9} {'speedup':>8} {'GFLOP':>8} "
        f"{'TFLOP/s':>8} {'of matmul':>9}"
    )
    for name, seconds in rows.items():
        rate = flops[name] / seconds
        print(
            f"{name:<42} {1000 * seconds:>9.1f} {batch / seconds:>9.1f} {base / seconds:>7.2f}x "
            f"{flops[name] / 1e9:>8.1f} {rate / 1e12:>8.3f} {rate / peak:>9.0%}"
        )
    print(f"max |output difference| {difference:.2e} (ours vs reference-style)")
    result = {"rows": rows, "flops": flops, "matmul_rate": peak, "difference": difference}
    if args.compile:
        print(f"max |output difference| {compiled_difference:.2e} (compiled vs eager)")
        result["compiled_difference"] = compiled_difference
    return result


if __name__ == "__main__":
    main()
