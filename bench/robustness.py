"""Bad input and injected faults against the real CLI: what it said and its exit code.

    python bench/robustness.py [--run RUN] [--memory 10,50,90] [--baseline DIR]

Builds each bad input in a temporary folder (a copy of a few bottle images), runs the
`adtr` verb a user would, and writes results/robustness.md and .json. --run names a fitted
run folder for the predict/test rows (default: a 1-epoch fit made here on 10 images at
128x128). The rows of issue 14 follow: camera arrays through predict_image (score next to
the file's), mask folders, one-sided test sets and empty masks, huge images. --memory adds
peak resident memory of `adtr predict` (a child process each) on flat images of the given
megapixels; --baseline DIR (a folder holding an older `adtr/` package, e.g. from
`git archive`) measures that code too, for a before / after figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, adtr_command, md_table, write_results  # noqa: E402


def run(args: list[str], grep: str | None = None) -> tuple[int, str, float]:
    """Run `adtr ARGS`: (exit code, the line that matters, seconds).

    The line: the first holding `grep` (all of them, joined, when grep is given), else the
    first error line, else the last line.
    """
    t0 = time.perf_counter()
    r = subprocess.run(adtr_command() + args, capture_output=True, text=True)
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip() and "%|" not in ln]
    if grep is not None:
        said = " / ".join(ln.strip() for ln in lines if grep in ln) or "(nothing)"
        return r.returncode, said[:400], time.perf_counter() - t0
    said = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
    return r.returncode, said.strip()[:220], time.perf_counter() - t0


def peak_predict_memory(run_dir: Path, images: list[Path], out: Path, heatmaps: bool, pythonpath: Path | None) -> tuple:
    """(peak RSS MiB, seconds, exit code) of `adtr predict RUN IMAGES` in a child process.

    The child runs in out's parent folder: `python -m` puts the working folder first on
    sys.path, which would otherwise shadow the --baseline package.
    """
    env = dict(os.environ, ADTR_MAX_PIXELS="200000000")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = adtr_command() + ["predict", str(run_dir), *map(str, images), "--out", str(out), "--quiet"]
    cmd += [] if heatmaps else ["--no-heatmaps"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=out.parent)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not all children's
    shutil.rmtree(out, ignore_errors=True)
    return usage.ru_maxrss / 1024.0, time.perf_counter() - t0, os.waitstatus_to_exitcode(status)


def memory_rows(run_dir: Path, tmp: Path, megapixels: list[int], baseline: Path | None) -> list[list]:
    """Peak memory of predict vs megapixels: flat grey-ish RGB PNGs, square, made here."""
    rows = []
    for mp in megapixels:
        side = int((mp * 1e6) ** 0.5)
        image = tmp / f"flat_{mp}mp.png"
        Image.new("RGB", (side, side), (128, 120, 110)).save(image, compress_level=1)
        for label, path in [("this adtr", None)] + ([("baseline", baseline)] if baseline else []):
            for heatmaps in (False, True):
                peak, seconds, code = peak_predict_memory(run_dir, [image], tmp / "mem_out", heatmaps, path)
                rows.append([f"{side}x{side} ({mp} MP)", label, "yes" if heatmaps else "no",
                             round(peak), round(seconds, 1), code])  # fmt: skip
                print(rows[-1], flush=True)
        image.unlink()
    # A batch of large files: the decoded full-size images of one batch were all held at once.
    images = []
    for i in range(4):
        images.append(tmp / f"flat_25mp_{i}.png")
        Image.new("RGB", (5000, 5000), (128, 120, 110 + i)).save(images[-1], compress_level=1)
    for label, path in [("this adtr", None)] + ([("baseline", baseline)] if baseline else []):
        peak, seconds, code = peak_predict_memory(run_dir, images, tmp / "mem_out", False, path)
        rows.append(["4 files of 5000x5000 (25 MP), one batch", label, "no", round(peak), round(seconds, 1), code])
        print(rows[-1], flush=True)
    return rows


SERVICE_PROBE = """
import sys, resource
from adtr.runtime import configure_cpu
from adtr.detector import ADTRDetector
from adtr import serve
configure_cpu()  # what `adtr serve` does: glibc keeps freed blocks for reuse
det = ADTRDetector.load(sys.argv[1], progress=False)
data = open(sys.argv[2], "rb").read()
def rss():
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")).split()[1]) / 1024
before = rss()
serve.score_upload(det, "big.png", data, max_pixels=10**9, heatmap=True)
after = rss()
serve.release_memory()
print(round(before), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), round(after), round(rss()))
"""


def service_memory_rows(run_dir: Path, tmp: Path, megapixels: list[int]) -> list[list]:
    """Resident memory of the service code around one upload with a heatmap: before, peak, after, after trim."""
    rows = []
    for mp in megapixels:
        side = int((mp * 1e6) ** 0.5)
        image = tmp / f"flat_{mp}mp.png"
        Image.new("RGB", (side, side), (128, 120, 110)).save(image, compress_level=1)
        r = subprocess.run([sys.executable, "-c", SERVICE_PROBE, str(run_dir), str(image)], capture_output=True,
                           text=True, env=dict(os.environ, ADTR_MALLOC=""), cwd=tmp)  # fmt: skip
        values = r.stdout.split() if r.returncode == 0 else ["failed: " + r.stderr[-150:]] + [""] * 3
        rows.append([f"{side}x{side} ({mp} MP)", *values])
        print(rows[-1], flush=True)
        image.unlink()
    return rows


def array_rows(run_dir: Path, image_file: Path, tmp: Path) -> list[list]:
    """predict_image with the arrays cameras and OpenCV hand over, next to the file's score."""
    from adtr import ADTRDetector

    det = ADTRDetector.load(run_dir, progress=False)
    rgb = np.asarray(Image.open(image_file).convert("RGB"))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    grey_file = tmp / "grey.png"
    Image.fromarray(grey).save(grey_file)
    file_score = det.predict([image_file])[0].anomaly_score
    grey_score = det.predict([grey_file])[0].anomaly_score
    cases = [
        ("RGB uint8 (H, W, 3)", rgb, {}, file_score),
        ("grey 2-D (H, W)", grey, {}, grey_score),
        ("grey (H, W, 1)", grey[:, :, None], {}, grey_score),
        ("RGBA (opaque)", np.dstack([rgb, np.full(grey.shape, 255, np.uint8)]), {}, file_score),
        ("uint16 grey (x257)", grey.astype(np.uint16) * 257, {}, grey_score),
        ("float32 0..1, value_range=1.0", rgb.astype(np.float32) / 255, {"value_range": 1.0}, file_score),
        ("float32 0..255, value_range=255.0", rgb.astype(np.float32), {"value_range": 255.0}, file_score),
        ("float32 without value_range", rgb.astype(np.float32), {}, file_score),
        ("channel-first (3, H, W)", np.moveaxis(rgb, 2, 0), {}, file_score),
        ("BGR, channel_order='bgr'", rgb[:, :, ::-1], {"channel_order": "bgr"}, file_score),
        ("(H, W, 2)", rgb[:, :, :2], {}, file_score),
    ]
    rows = []
    for what, array, options, expected in cases:
        t0 = time.perf_counter()
        try:
            said = f"scored {det.predict_image(array, **options).anomaly_score:.4f} (its file: {expected:.4f})"
        except ValueError as e:
            said = f"{type(e).__name__}: {e}"[:220]
        rows.append([f"predict_image: {what}", f"`{said}`", "", round(time.perf_counter() - t0, 1)])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA / "mvtec" / "bottle")
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO / "results" / "robustness")
    p.add_argument("--memory", default="", help="megapixels for the peak-memory table, e.g. 10,50,90 (default: none)")
    p.add_argument("--baseline", type=Path, default=None, help="folder with an older adtr/ package to compare")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="adtr-robust-"))
    good = sorted((args.data / "train" / "good").glob("*.png"))[:10]
    base = tmp / "parts"
    (base / "good").mkdir(parents=True)
    for f in good:
        shutil.copy(f, base / "good" / f.name)
    run_dir = args.run
    if run_dir is None:
        run_dir = tmp / "run"
        code, said, _ = run(
            ["fit", str(base), "--out", str(run_dir), "--epochs", "1", "--image-size", "128", "--quiet"]
        )
        assert code == 0, said
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes(good[0].read_bytes()[:5000])
    (bad / "notes.png").write_text("this is not a picture")
    (bad / "notes.txt").write_text("this is not a picture")
    arr = np.asarray(Image.open(good[0]))
    Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(bad / "sixteen_bit.png")
    Image.fromarray(arr).convert("RGBA").save(bad / "rgba.png")
    Image.fromarray(arr).convert("P").save(bad / "palette.png")
    Image.fromarray(arr).convert("L").save(bad / "gray.png")
    Image.new("L", (12000, 12000)).save(bad / "bomb.png")

    rows = []

    def case(what: str, cmd: list[str], grep: str | None = None) -> None:
        code, said, seconds = run(cmd, grep)
        rows.append([what, f"`{said}`", code, round(seconds, 1)])
        print(rows[-1], flush=True)

    pred = ["predict", str(run_dir)]
    out = ["--out", str(tmp / "pred"), "--quiet", "--no-heatmaps"]
    case("zero-byte PNG named in predict", pred + [str(bad / "empty.png")] + out)
    case("truncated PNG named in predict", pred + [str(bad / "truncated.png")] + out)
    case("text file named .png", pred + [str(bad / "notes.png")] + out)
    case("text file named .txt", pred + [str(bad / "notes.txt")] + out)
    case("12000x12000 image (decompression bomb)", pred + [str(bad / "bomb.png")] + out)
    case("16-bit, RGBA, palette, grayscale PNGs", pred + [str(bad / n) for n in
         ("sixteen_bit.png", "rgba.png", "palette.png", "gray.png")] + out)  # fmt: skip
    case("folder with bad files among good ones", pred + [str(bad), str(base / "good")] + out)

    empty = tmp / "empty_dir"
    (empty / "good").mkdir(parents=True)
    case("fit on an empty good/ folder", ["fit", str(empty), "--out", str(tmp / "r1")])
    cat = tmp / "category"
    (cat / "test").mkdir(parents=True)
    case("fit on a category without train/good", ["fit", str(cat), "--out", str(tmp / "r2")])
    corrupt = tmp / "corrupt_train"
    shutil.copytree(base, corrupt)
    shutil.copy(bad / "truncated.png", corrupt / "good" / "zzz_truncated.png")
    case("fit with one truncated image among 11", ["fit", str(corrupt), "--out", str(tmp / "r3"), "--quiet"])
    case("fit --image-size 250", ["fit", str(base), "--out", str(tmp / "r4"), "--image-size", "250"])

    labelled = tmp / "labelled"
    (labelled / "good").mkdir(parents=True)
    shutil.copy(good[0], labelled / "good" / "000.png")
    (labelled / "crack").mkdir()
    shutil.copy(good[1], labelled / "crack" / "000.png")
    (labelled / "ground_truth" / "crack").mkdir(parents=True)
    Image.new("L", (100, 100)).save(labelled / "ground_truth" / "crack" / "000_mask.png")
    case("mask of another size than its image", ["test", str(run_dir), str(labelled), "--quiet"])
    (labelled / "ground_truth" / "crack" / "000_mask.png").unlink()
    shutil.copy(good[2], labelled / "crack" / "001.png")
    Image.new("L", arr.shape[1::-1]).save(labelled / "ground_truth" / "crack" / "001_mask.png")
    case("missing mask for one defect image", ["test", str(run_dir), str(labelled), "--quiet"])

    broken = tmp / "broken_run"
    broken.mkdir()
    shutil.copy(run_dir / "config.json", broken / "config.json")
    case("run folder without its weights", ["test", str(broken), str(base), "--quiet"])
    doc = json.loads((run_dir / "config.json").read_text())
    doc["model"]["hidden_dim"] = 64
    (broken / "config.json").write_text(json.dumps(doc))
    shutil.copy(run_dir / "model.safetensors", broken / "model.safetensors")
    case("config tampered (hidden_dim changed)", ["test", str(broken), str(base), "--quiet"])
    doc["model"]["hidden_dim"] = json.loads((run_dir / "config.json").read_text())["model"]["hidden_dim"]
    doc["schema_version"] = 2
    (broken / "config.json").write_text(json.dumps(doc))
    case("run from another schema version", ["test", str(broken), str(base), "--quiet"])
    (broken / "model.safetensors").write_bytes(b"\x80\x04\x95 pickle bytes, not safetensors")
    doc["schema_version"] = 1
    (broken / "config.json").write_text(json.dumps(doc))
    case("weights file replaced by a pickle", ["test", str(broken), str(base), "--quiet"])

    # -- issue 14: inputs from the field ----------------------------------------------------
    rows += array_rows(run_dir, args.data / "test" / "good" / "000.png", tmp)

    def labelled_copy(name: str, defects: int = 3) -> Path:
        root = tmp / name
        (root / "good").mkdir(parents=True)
        (root / "broken_large").mkdir()
        (root / "ground_truth" / "broken_large").mkdir(parents=True)
        for f in sorted((args.data / "test" / "good").glob("*.png"))[:3]:
            shutil.copy(f, root / "good" / f.name)
        for f in sorted((args.data / "test" / "broken_large").glob("*.png"))[:defects]:
            shutil.copy(f, root / "broken_large" / f.name)
            shutil.copy(args.data / "ground_truth" / "broken_large" / f"{f.stem}_mask.png",
                        root / "ground_truth" / "broken_large" / f"{f.stem}_mask.png")  # fmt: skip
        return root

    test = ["test", str(run_dir)]
    flat = labelled_copy("mask_flat")
    (flat / "ground_truth" / "broken_large").rename(flat / "mask")
    case("masks in a flat mask/ folder", test + [str(flat)], grep="WARNING")
    nested = labelled_copy("mask_nested")
    (nested / "ground_truth").rename(nested / "mask")
    case("masks in mask/broken_large/", test + [str(nested)], grep="WARNING")
    near = labelled_copy("mask_near_miss")
    gt = near / "ground_truth" / "broken_large"
    (gt / "000_mask.png").rename(gt / "000.png")
    case("mask named 000.png instead of 000_mask.png", test + [str(near)])
    only_good = labelled_copy("only_good")
    shutil.rmtree(only_good / "broken_large")
    shutil.rmtree(only_good / "ground_truth")
    case("test folder with only good/", test + [str(only_good)], grep="not computed")
    only_bad = labelled_copy("only_defect")
    shutil.rmtree(only_bad / "good")
    case("test folder with only a defect folder (masks)", test + [str(only_bad)], grep="not computed")
    empty_mask = labelled_copy("empty_mask")
    mask = empty_mask / "ground_truth" / "broken_large" / "000_mask.png"
    Image.new("L", Image.open(mask).size).save(mask)
    case("anomalous image with an all-black mask", test + [str(empty_mask), "--json", str(tmp / "m.json")],
         grep="empty")  # fmt: skip
    note = json.loads((tmp / "m.json").read_text()).get("pixel_metrics_note", "(none)")
    rows.append(["the same: pixel metrics in the JSON", f"`{note}`", "", ""])

    for mp, side in ((92, 9592), (108, 10392)):
        Image.new("L", (side, side), 128).save(bad / f"flat_{mp}mp.png", compress_level=1)
        case(f"{side}x{side} flat PNG ({mp} MP)", pred + [str(bad / f"flat_{mp}mp.png")] + out)
    case("92 MP with --max-pixels 5e7", pred + [str(bad / "flat_92mp.png")] + out + ["--max-pixels", "5e7"])

    md = ("# Bad input against the CLI\n\nCommand: `python bench/robustness.py`\n\n"
          + md_table(["input", "what adtr said", "exit code", "seconds"], rows) + "\n")  # fmt: skip
    result = {"rows": rows}
    if args.memory:
        mem = memory_rows(run_dir, tmp, [int(v) for v in args.memory.split(",")], args.baseline)
        result["memory"] = mem
        md += (f"\n## Peak memory of `adtr predict` vs megapixels\n\nCommand: `python bench/robustness.py "
               f"--memory {args.memory}`; one flat RGB PNG per run, peak RSS of the child process "
               "(model at 128x128; Python, torch and the model take about 0.4 GiB alone).\n\n"
               + md_table(["image", "code", "heatmap", "peak RSS MiB", "seconds", "exit code"], mem) + "\n")
        service = service_memory_rows(run_dir, tmp, [int(v) for v in args.memory.split(",")])
        result["service_memory"] = service
        md += ("\n## Service: resident memory around one upload (heatmap on), MiB\n\nserve.score_upload in a "
               "child process with the allocator settings of `adtr serve`; after it returns, the service calls "
               "release_memory() (malloc_trim) for images of 4 MP or more.\n\n"
               + md_table(["image", "before", "peak", "after the request", "after release_memory"], service) + "\n")
    write_results(args.out, result, md)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
