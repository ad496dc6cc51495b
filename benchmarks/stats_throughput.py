"""Statistics pass vs plain timm inference, side by side in one run; and peak memory vs image count.

    python benchmarks/stats_throughput.py                      # real DINOv2-S at 224 px
    python benchmarks/stats_throughput.py --model deit_small_patch16_224 --img-size 224

Throughput: the same pre-generated images go through (a) ``model(images)`` and (b) the statistics pass
of one span (all tokens, float64 G and C), interleaved per repeat; the medians and their ratio b/a are
printed. A span ending early should beat inference (later blocks never run); one ending at the last
block should stay within 5%. Memory: the statistics pass over a streaming loader of 256 and of 2,048
synthetic images, each in a fresh process, peak RSS compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader

from tba_fed import ModelConfig, ViTAdapter, create_model, parse_plan
from tba_fed.calibrate import collect_span_stats
from tba_fed.data import SyntheticImages


def build(name: str, img_size: int) -> torch.nn.Module:
    kwargs = {"img_size": img_size}
    return create_model(ModelConfig(name=name, kwargs=kwargs))


def throughput(args: argparse.Namespace) -> list[dict]:
    model = build(args.model, args.img_size)
    adapter = ViTAdapter(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen)
               for _ in range(args.images // args.batch_size)]
    count = len(batches) * args.batch_size

    def inference() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for images in batches:
                model(images)
        return count / (time.perf_counter() - start)

    def stats(span) -> float:
        start = time.perf_counter()
        collect_span_stats(adapter, batches, [span], token_mode="all")
        return count / (time.perf_counter() - start)

    spans = [parse_plan(text, adapter.num_blocks).spans[0] for text in args.spans.split(",")]
    inference()  # warm-up
    rows = []
    for span in spans:
        a, b = [], []
        for _ in range(args.repeats):
            a.append(inference())
            b.append(stats(span))
        rows.append({"span": str(span), "inference_img_s": statistics.median(a), "stats_img_s": statistics.median(b),
                     "ratio": statistics.median(b) / statistics.median(a)})
    return rows


def peak_memory(args: argparse.Namespace) -> None:
    """Child process: one statistics pass over a streaming loader; prints peak RSS in MiB."""
    model = build(args.model, args.img_size)
    adapter = ViTAdapter(model)
    span = parse_plan(args.spans.split(",")[0], adapter.num_blocks).spans[0]
    loader = DataLoader(SyntheticImages(args.memory_child, args.img_size), batch_size=args.batch_size)
    collect_span_stats(adapter, loader, [span], token_mode="all")
    print(json.dumps({"images": args.memory_child, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2-s-imgfocus")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--spans", default="9->11,2->4", help="comma-separated; the first is used for memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-images", default="256,2048")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory(args)
        return
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}\n")
    print("| span | timm inference (img/s) | statistics pass (img/s) | ratio |\n|---|---|---|---|")
    for row in throughput(args):
        print(f"| {row['span']} | {row['inference_img_s']:.1f} | {row['stats_img_s']:.1f} | {row['ratio']:.3f} |")
    memory = []
    for count in (int(c) for c in args.memory_images.split(",")):
        child = [sys.executable, __file__, "--memory-child", str(count), "--model", args.model, "--img-size",
                 str(args.img_size), "--batch-size", str(args.batch_size), "--spans", args.spans,
                 "--threads", str(args.threads)]
        memory.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    print("\n| images | peak RSS (MiB) |\n|---|---|")
    for row in memory:
        print(f"| {row['images']} | {row['peak_rss_mib']:.0f} |")
    print(f"\npeak memory ratio {memory[-1]['images']} vs {memory[0]['images']} images: "
          f"{memory[-1]['peak_rss_mib'] / memory[0]['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
