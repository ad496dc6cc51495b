"""Which map is exact: tba-fed's (float64 sums, Cholesky) or the seed's float32 lstsq? The reference is a float64
lstsq (gelsd, no truncation) on the same stacked rows; real DINOv2-S at 112 px, span 2->4, no bias.

    PYTHONPATH=. python benchmarks/seed_map_exactness.py 2000 /tmp/tba-2000   # images, compress output directory
"""
import subprocess
import sys

import torch
from torch.utils.data import DataLoader
from safetensors.torch import load_file
from tba_fed.config import DataConfig
from tba_fed.data import data_config, fashion_mnist, pool_indices
from tba_fed.dinov2_imgfocus import load_dinov2_imgfocus
images, out = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(2)
model = load_dinov2_imgfocus(img_size=112).eval()
config = DataConfig(source="fashion_mnist", num_images=images, holdout_fraction=0.0)
dataset = fashion_mnist(config, data_config(model))
idx = pool_indices(dataset, config).tolist()
loader = DataLoader(idx, batch_size=32, collate_fn=lambda b: torch.stack([dataset[i][0] for i in b]))
xs, ys = [], []
with torch.no_grad():
    for im in loader:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(im))))
        for b in range(5):
            x = model.blocks[b](x)
            if b == 2:
                xs.append(x.clone())
        ys.append(x.clone())
x, y = torch.cat(xs).reshape(-1, 384), torch.cat(ys).reshape(-1, 384)
print("rows", x.shape[0])
s = torch.linalg.svdvals(x.double())
print("X singular values max %.4g min %.4g cond %.4g" % (s[0], s[-1], s[0] / s[-1]))
print("singular values below 0.0155*max (gelsy float32 rcond eps*rows):", int((s < 1.19e-7 * x.shape[0] * s[0]).sum()))
t64 = torch.linalg.lstsq(x.double(), y.double(), driver="gelsd").solution
t32 = torch.linalg.lstsq(x, y).solution.double()
subprocess.run([sys.executable, "-m", "tba_fed.cli", "compress", "--model", "dinov2-s-imgfocus", "--model-arg", "img_size=112",
                "--data", "fashion_mnist", "--num-images", str(images), "--plan", "2->4", "--no-bias", "--holdout-fraction", "0",
                "-o", out], check=True)
w = load_file(out + "/maps.safetensors")["span.2-4.weight"].double()
ttba = w.T  # maps store W with y = x Wᵀ


def rel(a, b):
    return float((a - b).norm() / b.norm())


def sse(t):
    return float(((x.double() @ t - y.double()) ** 2).sum())

print("rel diff vs float64 lstsq: tba-fed %.3e, seed float32 lstsq %.3e; tba-fed vs seed %.3e"
      % (rel(ttba, t64), rel(t32, t64), rel(ttba, t32)))
print("residual sse: float64 lstsq %.6e, tba-fed %.6e, seed %.6e" % (sse(t64), sse(ttba), sse(t32)))
