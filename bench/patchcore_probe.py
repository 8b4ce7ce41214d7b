"""Why our PatchCore-Lite0 scores 0.925 on transistor: the same features without the coreset.

    python bench/patchcore_probe.py [--set mvtec/transistor] [--data ../shared/data]

bench/references.py's PatchCore with the whole memory bank (no coreset: the exact nearest
neighbour, the coreset's upper bound) and three changes of its score, each on the same
features: "raw gauss" (the bench's score: map smoothed with sigma 4, maximum), "raw max" (the
maximum of the unsmoothed stride-8 grid), "equalnorm" (each stage divided by its mean channel
norm before the distance). Prints image AUROC overall and per defect type (each type against
the good test images). About 4 minutes per variant on 2 cores at 256x256.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA  # noqa: E402
from references import _features, _maps_and_scores, _nearest_distance  # noqa: E402

from adtr.data.mvtec import test_samples, train_samples  # noqa: E402
from adtr.metrics import auroc  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--set", default="mvtec/transistor")
    p.add_argument("--image-size", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(2)
    root = args.data / args.set
    train, test = train_samples(root), test_samples(root)
    size = (args.image_size, args.image_size)
    t0 = time.time()
    f_train, _, _ = _features(train, size, (8, 16))
    f_test, _, _ = _features(test, size, (8, 16))
    print(f"features {time.time() - t0:.0f} s, train {tuple(f_train.shape)}", flush=True)
    labels = np.array([s.label for s in test])
    types = np.array([Path(s.path).parent.name for s in test])
    local = lambda f: F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)  # noqa: E731
    c8 = f_train.shape[1] - 112  # Lite0: 40 channels at stride 8, 112 at stride 16

    def run(name: str, tr: torch.Tensor, te: torch.Tensor, smooth: bool = True) -> None:
        n, c, h, w = te.shape
        bank = local(tr).permute(0, 2, 3, 1).reshape(-1, c)
        d = _nearest_distance(local(te).permute(0, 2, 3, 1).reshape(-1, c), bank).reshape(n, h, w)
        s = _maps_and_scores(d, size)[0] if smooth else d.flatten(1).amax(1).numpy()
        per = {}
        for t in sorted(set(types) - {"good"}):
            keep = (types == t) | (types == "good")
            per[t] = round(auroc(s[keep], labels[keep]), 4)
        print(name, round(auroc(s, labels), 4), per, flush=True)

    n8, n16 = f_train[:, :c8].norm(dim=1).mean(), f_train[:, c8:].norm(dim=1).mean()
    print(f"mean channel norm: stride 8 {n8:.1f}, stride 16 {n16:.1f}", flush=True)
    run("raw gauss", f_train, f_test)
    run("raw max", f_train, f_test, smooth=False)
    eq = lambda f: torch.cat([f[:, :c8] / n8, f[:, c8:] / n16], 1)  # noqa: E731
    run("equalnorm gauss", eq(f_train), eq(f_test))


if __name__ == "__main__":
    main()
