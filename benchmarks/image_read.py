"""Reading an image folder's file: the loader before issue #15 (Pillow's RGB conversion) vs `tba_fed.images`.

    python benchmarks/image_read.py                  # 9 interleaved repeats of 200 reads each
    python benchmarks/image_read.py --repeats 15

Per file, median over repeats, interleaved so that a shared machine's load falls on both alike:
- 8-bit RGB PNG (224 x 224): both give the same Pillow image; the new loader also checks frames and depth;
- 16-bit gray PNG (224 x 224, 12-bit values): the old loader clipped it to 8 bits, the new one reads floats;
each alone and followed by timm's eval transform for a 224 px ViT (what a data loader does per image).
Prints milliseconds per image and the ratio new / old.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from timm.data import create_transform

from tba_fed.images import read_image


def old_loader(path: str) -> Image.Image:
    """tba_fed.data.read_image before issue #15."""
    with Image.open(path) as image:
        return image.convert("RGB")


def timed(function: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        function()
    return (time.perf_counter() - start) / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    transform = create_transform(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.9, is_training=False)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        files = {"8-bit RGB PNG": Path(folder) / "rgb8.png", "16-bit gray PNG": Path(folder) / "gray16.png"}
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(files["8-bit RGB PNG"])
        Image.fromarray(rng.integers(0, 4096, (224, 224), dtype=np.uint16)).save(files["16-bit gray PNG"])
        cases = {}
        for name, path in files.items():
            p = str(path)
            cases[(name, "read")] = {"old": lambda p=p: old_loader(p), "new": lambda p=p: read_image(p)}
            cases[(name, "read + transform")] = {"old": lambda p=p: transform(old_loader(p)),
                                                 "new": lambda p=p: transform(read_image(p))}
        times: dict[tuple, dict[str, list[float]]] = {key: {"old": [], "new": []} for key in cases}
        for _ in range(args.repeats):
            for key, pair in cases.items():
                for which in ("old", "new"):
                    times[key][which].append(timed(pair[which], args.reads))
    print(f"{platform.processor() or platform.machine()}, {args.repeats} repeats x {args.reads} reads, median ms per image")
    for (name, what), pair in times.items():
        old, new = statistics.median(pair["old"]), statistics.median(pair["new"])
        print(f"{name:16} {what:17} old {old:6.3f}  new {new:6.3f}  new/old {new / old:5.2f}")


if __name__ == "__main__":
    main()
