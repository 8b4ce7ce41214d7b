"""Bad input and injected faults against the real CLI: what it said and its exit code.

    python bench/robustness.py [--run RUN]

Builds each bad input in a temporary folder (a copy of a few bottle images), runs the
`adtr` verb a user would, and writes results/robustness.md and .json. --run names a fitted
run folder for the predict/test rows (default: a 1-epoch fit made here on 10 images).
"""

from __future__ import annotations

import argparse
import json
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


def run(args: list[str]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    r = subprocess.run(adtr_command() + args, capture_output=True, text=True)
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip() and "%|" not in ln]
    said = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
    return r.returncode, said.strip()[:220], time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA / "mvtec" / "bottle")
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO / "results" / "robustness")
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

    def case(what: str, cmd: list[str]) -> None:
        code, said, seconds = run(cmd)
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

    md = ("# Bad input against the CLI\n\nCommand: `python bench/robustness.py`\n\n"
          + md_table(["input", "what adtr said", "exit code", "seconds"], rows) + "\n")  # fmt: skip
    write_results(args.out, {"rows": rows}, md)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
