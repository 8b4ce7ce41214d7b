"""Bad input and injected faults against the real CLI: what it said and its exit code.

    python bench/robustness.py [--run RUN] [--memory 10,50,90] [--baseline DIR]
    python bench/robustness.py --only calibration,drift [--baseline DIR] [--steps 30]

Builds each bad input in a temporary folder (a copy of a few bottle images), runs the
`adtr` verb a user would, and writes results/robustness.md and .json. --run names a fitted
run folder for the predict/test rows (default: a 1-epoch fit made here on 10 images at
128x128). The rows of issue 14 follow: camera arrays through predict_image (score next to
the file's), mask folders, one-sided test sets and empty masks, huge images. --memory adds
peak resident memory of `adtr predict` (a child process each) on flat images of the given
megapixels; --baseline DIR (a folder holding an older `adtr/` package, e.g. from
`git archive`) measures that code too, for a before / after figure.

--only SECTIONS runs some sections and replaces just their part of results/robustness.md and
.json: `cli` (the rows above), `calibration` (issue 14 kind 1: fits on the first k good bottle
images, k = 1, 3, 5, 8, 20, tested on 20 good + 10 broken_large + 10 contamination), `drift`
(kind 4: a run on colour parts scoring the good image 000 as is, cropped to 900x600, padded
into a grey 1400x900 canvas or a black one, with and without --letterbox; a run on grey parts
scoring colour ones). --steps sets those fits' budget (default 30: the figures are about
decisions, not quality). Their rows are kept per code version: --versions before (with
--baseline) or now measures one and keeps the other's rows.
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


def cli_rows(args: argparse.Namespace, tmp: Path, run_dir: Path, base: Path, good: list[Path]) -> list[list]:
    """Bad files, folders and run folders through the CLI, and issue 14's kinds 2, 3, 5 and 6."""
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

    return rows


def child(args: list[str], pythonpath: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    """`adtr ARGS` in a child process, with the --baseline package first on its path when given.

    cwd lies outside the repository: `python -m` puts the working folder first on sys.path.
    """
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(adtr_command() + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd)


def warning_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [ln.strip() for ln in r.stderr.splitlines() if ln.startswith("WARNING")]


def versions(baseline: Path | None, wanted: set[str]) -> list[tuple[str, Path | None]]:
    """(label, PYTHONPATH) of the code versions to measure: "before" (the --baseline package), "now"."""
    return ([("before", baseline)] if baseline and "before" in wanted else []) + (
        [("now", None)] if "now" in wanted else []
    )


def calibration_rows(
    data: Path, tmp: Path, ks: list[int], steps: int, code_versions: list[tuple[str, Path | None]]
) -> dict[str, list[list]]:
    """Issue 14 kind 1: `adtr fit` on the first k good training images, `adtr test` on 20 good +
    10 broken_large + 10 contamination test images: warnings, calibration, decisions; rows per version."""
    test = tmp / "calib_test"
    for defect, n in (("good", 20), ("broken_large", 10), ("contamination", 10)):
        (test / defect).mkdir(parents=True)
        for f in sorted((data / "test" / defect).glob("*.png"))[:n]:
            shutil.copy(f, test / defect / f.name)
    rows: dict[str, list[list]] = {}
    for label, code in code_versions:
        rows[label] = []
        for k in ks:
            train = tmp / f"train_{k}"
            if not train.exists():
                (train / "good").mkdir(parents=True)
                for f in sorted((data / "train" / "good").glob("*.png"))[:k]:
                    shutil.copy(f, train / "good" / f.name)
            run_dir = tmp / f"calib_{label}_{k}"
            t0 = time.perf_counter()
            r = child(["fit", train, "--out", run_dir, "--steps", steps, "--quiet"], code, tmp)
            seconds = time.perf_counter() - t0
            if r.returncode != 0:
                rows[label].append([k, label, f"fit failed: {r.stderr.strip()[-200:]}"] + [""] * 7)
                continue
            fit_said = r.stdout.strip().splitlines()[-1].split("; ")[1]  # "final loss ..., validation loss ..."
            thr = json.loads((run_dir / "config.json").read_text())["calibration"]["thresholds"]
            source = thr.get("source", "held_out" if k >= 5 and round(0.1 * k) else "training")
            t = child(["test", run_dir, test, "--json", tmp / "m.json", "--quiet"], code, tmp)
            metrics = json.loads((tmp / "m.json").read_text()) if t.returncode == 0 else {}
            implied = thr.get("implied_false_alarm_rate", "-")
            rows[label].append([k, label, " / ".join(warning_lines(r)) or "none", f"{thr['n_good']} ({source})",
                         round(thr["false_alarm_rate"], 3),
                         round(implied, 3) if isinstance(implied, float) else str(implied),
                         round(metrics.get("false_alarm_rate_at_threshold", float("nan")), 3),
                         round(metrics.get("detection_rate_at_threshold", float("nan")), 3),
                         f"`{fit_said}`", round(seconds)])  # fmt: skip
            print(rows[label][-1], flush=True)
    return rows


def drift_rows(
    data: Path, tmp: Path, steps: int, n_train: int, code_versions: list[tuple[str, Path | None]]
) -> dict[str, list[list]]:
    """Issue 14 kind 4: a run on colour parts scores the good test image 000 as is, cropped to
    900x600, padded into a grey 1400x900 canvas and into a black one (its own background: a
    wider camera), with and without --letterbox where the code has it; a run on grey parts
    scores the 20 good colour test images (and their grey copies)."""
    colour, grey = tmp / "drift_colour" / "good", tmp / "drift_grey" / "good"
    colour.mkdir(parents=True)
    grey.mkdir(parents=True)
    for f in sorted((data / "train" / "good").glob("*.png"))[:n_train]:
        shutil.copy(f, colour / f.name)
        Image.open(f).convert("L").save(grey / f.name)
    cases = tmp / "drift_cases"
    cases.mkdir()
    good = np.asarray(Image.open(data / "test" / "good" / "000.png").convert("RGB"))
    Image.fromarray(good).save(cases / "as_is_900x900.png")
    Image.fromarray(good[150:750]).save(cases / "cropped_900x600.png")
    canvas = np.full((900, 1400, 3), 128, np.uint8)
    canvas[:, 250:1150] = good
    Image.fromarray(canvas).save(cases / "padded_grey_1400x900.png")
    canvas[:] = 0  # a wider camera: the same part on its own (black) background, as letterbox would see it
    canvas[:, 250:1150] = good
    Image.fromarray(canvas).save(cases / "padded_black_1400x900.png")
    test_colour = sorted((data / "test" / "good").glob("*.png"))
    test_grey = tmp / "drift_test_grey"
    test_grey.mkdir()
    for f in test_colour:
        Image.open(f).convert("L").save(test_grey / f.name)
    rows: dict[str, list[list]] = {}
    for label, code in code_versions:
        rows[label] = []
        runs = {}
        for name, folder in (("colour", colour.parent), ("grey", grey.parent)):
            runs[name] = tmp / f"drift_{label}_{name}"
            r = child(["fit", folder, "--out", runs[name], "--steps", steps, "--quiet"], code, tmp)
            assert r.returncode == 0, r.stderr[-500:]

        def predict(run_dir: Path, paths: list[Path], extra: list[str], code: Path | None = code) -> list[dict]:
            out = tmp / "drift_pred"
            shutil.rmtree(out, ignore_errors=True)
            r = child(["predict", run_dir, *paths, "--out", out, "--no-heatmaps", "--quiet", *extra], code, tmp)
            assert r.returncode == 0, r.stderr[-500:]
            return json.loads((out / "scores.json").read_text())["predictions"]

        threshold = json.loads((runs["colour"] / "config.json").read_text())["calibration"]["thresholds"]["image"]
        for extra in ([], ["--letterbox"]) if label == "now" else ([],):
            for row in predict(runs["colour"], sorted(cases.iterdir()), extra):
                warned = row.get("input_warnings") or []
                rows[label].append([f"colour run: {Path(row['path']).stem}", label, "yes" if extra else "no",
                             f"{row['anomaly_score']:.2f} (threshold {threshold:.2f})", row["is_anomalous"],
                             " / ".join(warned) if warned else "none"])  # fmt: skip
                print(rows[label][-1], flush=True)
        for what, paths in (("20 good colour test images", test_colour),
                            ("the same 20, grey", sorted(test_grey.iterdir()))):  # fmt: skip
            preds = predict(runs["grey"], paths, [])
            flagged = sum(bool(p["is_anomalous"]) for p in preds)
            warned = [w for p in preds for w in (p.get("input_warnings") or [])]
            said = f"{len(warned)} images warned, e.g. `{warned[0]}`" if warned else "none"
            rows[label].append([f"grey run: {what}", label, "no", f"good flagged {flagged}/{len(preds)}", "", said])
            print(rows[label][-1], flush=True)
    return rows


def merged(stem: Path, key: str, rows: dict[str, list[list]]) -> dict[str, list[list]]:
    """stem.json's rows of section key, per code version, with the versions measured now replaced."""
    path = stem.with_suffix(".json")
    old = json.loads(path.read_text()).get(key, {}) if path.exists() else {}
    return {**(old if isinstance(old, dict) else {}), **rows}


def merge_results(stem: Path, result: dict, sections: dict[str, str]) -> None:
    """Replace only the given keys of stem.json and sections of stem.md ("" is the part before
    the first "## " heading; other keys are headings), keeping everything else as it was."""
    old = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    text = stem.with_suffix(".md").read_text() if stem.with_suffix(".md").exists() else ""
    parts = text.split("\n## ")
    ordered = {"": parts[0].rstrip("\n") + "\n"} | {
        p.split("\n", 1)[0]: "## " + p.rstrip("\n") + "\n" for p in parts[1:]
    }
    for title, body in sections.items():
        ordered[title] = body if not title else f"## {title}\n\n{body.rstrip()}\n"
    write_results(stem, {**old, **result}, "\n".join(ordered.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA / "mvtec" / "bottle")
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO / "results" / "robustness")
    p.add_argument("--memory", default="", help="megapixels for the peak-memory table, e.g. 10,50,90 (default: none)")
    p.add_argument("--baseline", type=Path, default=None, help="folder with an older adtr/ package to compare")
    p.add_argument("--only", default="", help="sections to run: cli, calibration, drift (default: cli); the others "
                   "keep their part of the results files")  # fmt: skip
    p.add_argument("--steps", type=int, default=30, help="training steps of the calibration and drift fits")
    p.add_argument("--ks", default="1,3,5,8,20", help="training-set sizes of the calibration section")
    p.add_argument("--drift-train", type=int, default=50, help="good training images of the drift section's runs")
    p.add_argument("--versions", default="", help="code versions of those sections: before (needs --baseline), now; "
                   "others keep their rows (default: both with --baseline, else now)")  # fmt: skip
    args = p.parse_args()
    only = set(filter(None, args.only.split(","))) or {"cli"}
    tmp = Path(tempfile.mkdtemp(prefix="adtr-robust-"))
    good = sorted((args.data / "train" / "good").glob("*.png"))[:10]
    base = tmp / "parts"
    (base / "good").mkdir(parents=True)
    for f in good:
        shutil.copy(f, base / "good" / f.name)
    run_dir = args.run
    if run_dir is None and ("cli" in only or args.memory):
        run_dir = tmp / "run"
        code, said, _ = run(
            ["fit", str(base), "--out", str(run_dir), "--epochs", "1", "--image-size", "128", "--quiet"]
        )
        assert code == 0, said
    result: dict = {}
    md: dict[str, str] = {}
    if "cli" in only:
        rows = cli_rows(args, tmp, run_dir, base, good)
        result["rows"] = rows
        md[""] = ("# Bad input against the CLI\n\nCommand: `python bench/robustness.py`\n\n"
                  + md_table(["input", "what adtr said", "exit code", "seconds"], rows) + "\n")  # fmt: skip
    if args.memory:
        mem = memory_rows(run_dir, tmp, [int(v) for v in args.memory.split(",")], args.baseline)
        result["memory"] = mem
        md["Peak memory of `adtr predict` vs megapixels"] = (
            f"Command: `python bench/robustness.py --memory {args.memory}`; one flat RGB PNG per run, peak RSS "
            "of the child process (model at 128x128; Python, torch and the model take about 0.4 GiB alone).\n\n"
            + md_table(["image", "code", "heatmap", "peak RSS MiB", "seconds", "exit code"], mem)
            + "\n"
        )
        service = service_memory_rows(run_dir, tmp, [int(v) for v in args.memory.split(",")])
        result["service_memory"] = service
        md["Service: resident memory around one upload (heatmap on), MiB"] = (
            "serve.score_upload in a child process with the allocator settings of `adtr serve`; after it "
            "returns, the service calls release_memory() (malloc_trim) for images of 4 MP or more.\n\n"
            + md_table(["image", "before", "peak", "after the request", "after release_memory"], service)
            + "\n"
        )
    wanted = set(filter(None, args.versions.split(","))) or ({"before", "now"} if args.baseline else {"now"})
    code_versions = versions(args.baseline, wanted)
    if "calibration" in only:
        ks = [int(k) for k in args.ks.split(",")]
        rows = merged(args.out, "calibration", calibration_rows(args.data, tmp, ks, args.steps, code_versions))
        result["calibration"] = rows
        md["Issue 14 kind 1: calibration with few good images"] = (
            f"Command: `python bench/robustness.py --only calibration --steps {args.steps} [--baseline DIR "
            "--versions before]`; before: `--baseline` with the `adtr/` of main before this change (`git archive`). "
            "`adtr fit train_k --steps N` on the first k good bottle training images (default size 256x256), "
            "then `adtr test` on 20 good + 10 broken_large + 10 contamination test images. fit s: wall seconds on "
            "the shared 2-core machine, whose load varied between the runs; cross-fitting makes 4 fits of one.\n\n"
            + md_table(["k", "code", "warnings of fit", "images behind the threshold", "stored false-alarm rate",
                        "implied false-alarm rate", "good test parts flagged", "anomalous flagged",
                        "fit said", "fit s"], rows.get("before", []) + rows.get("now", [])) + "\n")  # fmt: skip
    if "drift" in only:
        rows = merged(args.out, "drift", drift_rows(args.data, tmp, args.steps, args.drift_train, code_versions))
        result["drift"] = rows
        md["Issue 14 kind 4: inputs that differ from training"] = (
            f"Command: `python bench/robustness.py --only drift --steps {args.steps} --drift-train {args.drift_train} "
            "[--baseline DIR --versions before]`. Runs fitted on the first "
            f"{args.drift_train} good bottle training images (colour, or converted to grey), default size; "
            "`adtr predict` on the cases.\n\n"
            + md_table(["input", "code", "letterbox", "score", "flagged", "input warnings"],
                       rows.get("before", []) + rows.get("now", [])) + "\n")  # fmt: skip
    if args.only:
        merge_results(args.out, result, md)
    else:
        write_results(args.out, result, "\n".join(md.values()))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
