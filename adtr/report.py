"""A self-contained HTML test report: metrics, curves, score histograms, heatmap grids.

Every figure is a PNG embedded as base64, so the single index.html can be mailed or
archived. Overlays use a perceptual colour map (inferno) over the visible image, with the
fixed colour range of the run (render.display_range), and the predicted defect mask
(map >= pixel threshold) drawn as a cyan outline; ground truth is drawn in green.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to memory only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.ndimage import binary_dilation  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from adtr.data.images import read_image, read_mask  # noqa: E402
from adtr.data.samples import Sample  # noqa: E402
from adtr.data.transforms import resize_map  # noqa: E402
from adtr.fileio import atomic_write_text  # noqa: E402
from adtr.render import overlay  # noqa: E402
from adtr.thresholds import Thresholds  # noqa: E402

THUMB = 224  # pixels per panel in the grids
N_CASES = 6  # images per grid


def _png(fig_or_array) -> str:
    buf = io.BytesIO()
    if isinstance(fig_or_array, np.ndarray):
        Image.fromarray(fig_or_array).save(buf, format="PNG")
    else:
        fig_or_array.savefig(buf, format="PNG", dpi=100, bbox_inches="tight")
        plt.close(fig_or_array)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(title: str, src: str) -> str:
    t = html.escape(title)
    return f'<figure><img src="{src}" alt="{t}"><figcaption>{t}</figcaption></figure>'


def _curves(scores: np.ndarray, labels: np.ndarray, threshold: float) -> list[tuple[str, str]]:
    figs = []
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, lw=2)
        ax.plot([0, 1], [0, 1], ls="--", c="gray")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (images)")
        figs.append(("ROC curve", _png(fig)))
        precision, recall, _ = precision_recall_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(recall, precision, lw=2)
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (images)", ylim=(0, 1.05))
        figs.append(("PR curve", _png(fig)))
    fig, ax = plt.subplots(figsize=(5, 4))
    bins = np.linspace(scores.min(), scores.max(), 30)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good", color="tab:green")
    if labels.any():
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomalous", color="tab:red")
    ax.axvline(threshold, c="k", ls="--", label="threshold")
    ax.set(xlabel="anomaly score", ylabel="images", title="Score histogram")
    ax.legend()
    figs.append(("Score histogram", _png(fig)))
    return figs


def _outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    edge = binary_dilation(mask, iterations=2) & ~mask
    out = image.copy()
    out[edge] = colour
    return out


def _thumb(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    s = THUMB / max(h, w)
    return np.asarray(Image.fromarray(a).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))


def _case_row(sample: Sample, score: float, small_map: np.ndarray, thr: Thresholds, vrange) -> str:
    image = read_image(sample.path)
    size = image.shape[:2]
    anomaly_map = resize_map(small_map, size)
    truth = read_mask(sample.mask_path, size) if sample.mask_path else np.zeros(size, bool)
    predicted = thr.defect_mask(anomaly_map)
    panels = [
        ("image", image),
        ("ground truth", _outline(image, truth, (0, 255, 0))),
        ("heatmap", overlay(image, anomaly_map, *vrange)),
        ("predicted mask", _outline(overlay(image, anomaly_map, *vrange), predicted, (0, 255, 255))),
    ]
    cells = "".join(_figure(t, _png(_thumb(p))) for t, p in panels)
    verdict = "anomalous" if thr.is_anomalous(score) else "good"
    label = "anomalous" if sample.label else "good"
    caption = (
        f"{html.escape(str(sample.path))}: truth <b>{label}</b> ({html.escape(sample.defect)}), "
        f"score {score:.4g}, normalised {float(thr.normalize(score)):.2f}, verdict <b>{verdict}</b>"
    )
    return f'<div class="case"><p>{caption}</p><div class="row">{cells}</div></div>'


def write_report(
    out_dir: Path | str,
    metrics: dict,
    samples: Sequence[Sample],
    scores: np.ndarray,
    maps: Sequence[np.ndarray],
    thresholds: Thresholds,
    display_range: tuple[float, float],
    title: str = "adtr test report",
) -> Path:
    """Write out_dir/index.html; maps are at the model's input size, one per sample."""
    labels = np.array([s.label for s in samples])
    scores = np.asarray(scores, dtype=np.float64)
    # Worst: the anomalies scored lowest and the good images scored highest; best: the reverse.
    order = np.argsort(scores)
    anomalous_low = [i for i in order if labels[i] == 1]
    good_high = [i for i in order[::-1] if labels[i] == 0]
    worst = (anomalous_low[: N_CASES // 2] + good_high[: N_CASES // 2])[:N_CASES]
    best = (anomalous_low[::-1][: N_CASES // 2] + good_high[::-1][: N_CASES // 2])[:N_CASES]

    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v:.4f}</td></tr>" if isinstance(v, float)
        else f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in metrics.items() if k != "scores"
    )  # fmt: skip
    curves = "".join(_figure(t, src) for t, src in _curves(scores, labels, thresholds.image))

    def grid(indices: list[int]) -> str:
        return "".join(_case_row(samples[i], scores[i], maps[i], thresholds, display_range) for i in indices)

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
.row {{ display: flex; flex-wrap: wrap; gap: 8px; }} figure {{ margin: 0; }}
figcaption {{ font-size: 12px; text-align: center; }} .case {{ margin-bottom: 1.5em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Image threshold: {html.escape(thresholds.describe())}; anomalous when the score is at or above it.
Pixel threshold {thresholds.pixel:.4g}. Higher scores are more anomalous.</p>
<h2>Metrics</h2><table>{rows}</table>
<h2>Curves</h2><div class="row">{curves}</div>
<h2>Worst cases</h2><p>Anomalous images with the lowest scores, good images with the highest.</p>{grid(worst)}
<h2>Best cases</h2><p>Anomalous images with the highest scores, good images with the lowest.</p>{grid(best)}
<script>
// Records how many figures decoded, for automated checks of the page (no network is used).
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length + "/" + imgs.length;
}});
</script>
</body></html>
"""
    out = Path(out_dir) / "index.html"
    atomic_write_text(out, page)
    return out
