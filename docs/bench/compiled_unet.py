"""The compiled-model check of docs/benchmarks.md: a randomly initialised diffusers ``UNet2DModel`` at 64 px,
batch 2, float32 on the CPU, compiled with ``torch.compile`` once with ``torch.nn.GroupNorm`` and once converted
to groupnorm's layer, timed in turns in one process (forward under ``no_grad``, and forward+backward).

    python docs/bench/compiled_unet.py [--threads N] [--rounds R] [--channels-last]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import diffusers
import torch

import groupnorm.torch as gt


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    base = model().to(memory_format=fmt)
    ours = gt.convert(copy.deepcopy(base))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    t = torch.tensor([10, 500])
    compiled = {"torch.nn.GroupNorm": torch.compile(base, fullgraph=True), "groupnorm": torch.compile(ours, fullgraph=True)}

    def forward(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m(x, t).sample

    def training(m: torch.nn.Module) -> None:
        m(x, t).sample.square().mean().backward()

    for mode, step in (("forward", forward), ("forward+backward", training)):
        for m in compiled.values():  # compile and warm up
            step(m)
            step(m)
        times: dict[str, list[float]] = {name: [] for name in compiled}
        for _ in range(args.rounds):
            for name, m in compiled.items():
                start = time.perf_counter()
                step(m)
                times[name].append(time.perf_counter() - start)
        peer, mine = (statistics.median(times[n]) for n in compiled)
        print(f"{mode}: torch.nn.GroupNorm {peer * 1e3:.1f} ms, groupnorm {mine * 1e3:.1f} ms, ratio {mine / peer:.2f}")
    with torch.no_grad():
        diff = (compiled["groupnorm"](x, t).sample - compiled["torch.nn.GroupNorm"](x, t).sample).abs().max()
    print(f"largest difference of the outputs: {diff.item():.2e}")


if __name__ == "__main__":
    main()
