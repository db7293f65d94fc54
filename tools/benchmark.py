"""The speed table: `main.py --benchmark` for both folders and each speed setting, one process per row.

    python tools/benchmark.py                      # WRN-28-10 pairs, every setting, on GPU 0
    python tools/benchmark.py --steps 10 --settings fp32 bf16+cl+compile --folders wrn
    python tools/benchmark.py --gpu_id '' --depth 16 --width 1 --settings fp32 fp32+cl

Each row runs in a fresh process (its own compile cache warm-up and memory peak) with a time
limit; a row that fails or runs out of time is reported as such and the others still run.
Prints a Markdown table; the exit code is 1 if any row failed.
"""
import argparse
import re
import subprocess
import sys
import time

from common import FOLDERS, ROOT, markdown_table, setting_flags

# The rows a --settings may name (main.py with common.setting_flags); tools/preflight.py checks and
# times its candidates from this list.
SETTINGS = ("fp32", "fp32+cl", "fp32+cl+compile", "tf32+cl", "bf16", "bf16+cl", "bf16+compile",
            "bf16+cl+compile", "fp16+cl", "fp16+cl+compile")
# Every pair's default rows: fp32 and bf16 in both memory layouts (depthwise convolutions, as in
# the MobileNet, are the layers whose speed depends most on it), and compiled.
DEFAULT_SETTINGS = ("fp32", "fp32+cl", "bf16", "bf16+cl", "bf16+compile", "bf16+cl+compile")
TRAIN_IMAGES, EPOCHS = 50_000, 200  # CIFAR-100's training set, the reference schedule
COLUMNS = ("folder", "pair", "setting", "img/s", "ms/step", "TFLOP/s", "peak memory", "pipeline efficiency",
           f"{EPOCHS} epochs of training")


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", nargs="+", default=list(FOLDERS), choices=FOLDERS)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS,
                        help="rows to run in every folder (default: " + ", ".join(DEFAULT_SETTINGS) + ")")
    parser.add_argument("--steps", default=20, type=int, help="timed steps per row (after a warm-up)")
    parser.add_argument("--depth", default=28, type=int)
    parser.add_argument("--width", default=10, type=int)
    parser.add_argument("--batch_size", default=128, type=int)
    parser.add_argument("--method", default="dcm", choices=["ind", "dml", "ds", "dcm"])
    parser.add_argument("--gpu_id", default=None, type=str,
                        help="'' for the CPU (default: main.py's, GPU 0 or the CPU)")
    parser.add_argument("--nthread", default=None, type=int, help="default: main.py's, the cores a process may use")
    parser.add_argument("--timeout", default=300, type=int, help="seconds allowed to one row")
    opt = parser.parse_args(argv)
    if opt.steps <= 0 or opt.timeout <= 0:
        parser.error("--steps and --timeout must be positive")
    return opt


def row_command(opt, folder, setting):
    common = ["--depth", opt.depth, "--width", opt.width, "--batch_size", opt.batch_size]
    common += ["--gpu_id", opt.gpu_id] if opt.gpu_id is not None else []
    common += ["--nthread", opt.nthread] if opt.nthread is not None else []
    command = [ROOT / folder / "main.py", "--benchmark", opt.steps, "--method", opt.method, *common,
               *setting_flags(setting)]
    return [sys.executable, *map(str, command)]


def parse_line(line):
    """The figures of a `benchmark | ...` line, as table cells."""
    fields = line.split(" | ")
    cells = {"pair": fields[1], "device": fields[5], "img/s": number(line, r"([\d.]+) img/s"),
             "ms/step": number(line, r"([\d.]+) ms/step"), "TFLOP/s": number(line, r"([\d.]+) TFLOP/s")}
    memory = re.search(r"peak (GPU memory|process RSS) ([\d.]+) GiB", line)
    if memory:
        cells["peak memory"] = f"{memory.group(2)} GiB" + (" (RSS)" if memory.group(1) == "process RSS" else "")
    efficiency = number(line, r"pipeline efficiency ([\d.]+)")
    if efficiency:
        cells["pipeline efficiency"] = efficiency
        epoch_images_per_second = float(cells["img/s"]) * float(efficiency)
        cells[f"{EPOCHS} epochs of training"] = f"{EPOCHS * TRAIN_IMAGES / epoch_images_per_second / 3600:.1f} h"
    return cells


def number(line, pattern):
    match = re.search(pattern, line)
    return match.group(1) if match else None


def run_row(opt, folder, setting):
    """(cells, error): the row's figures, or why there are none."""
    try:
        result = subprocess.run(row_command(opt, folder, setting), cwd=ROOT / folder, capture_output=True,
                                text=True, timeout=opt.timeout)
    except subprocess.TimeoutExpired:
        return None, f"no result within --timeout {opt.timeout} s"
    lines = [line for line in result.stdout.splitlines() if line.startswith("benchmark | ")]
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"exit code {result.returncode}: {last}"
    return parse_line(lines[-1]), None


def main(argv=None):
    opt = parse_options(argv)
    started = time.time()
    rows, failures, device = [], 0, None
    for folder in opt.folders:
        for setting in opt.settings or DEFAULT_SETTINGS:
            row_started = time.time()
            cells, error = run_row(opt, folder, setting)
            seconds = time.time() - row_started
            print(f"  {folder} {setting}: {error or cells['img/s'] + ' img/s'} ({seconds:.0f} s)", file=sys.stderr,
                  flush=True)
            if error:
                failures += 1
                cells = {"pair": "", "img/s": f"failed: {error}"}
            device = device or cells.get("device")
            rows.append({"folder": f"{folder}/", "setting": setting, **cells})
    print(f"Device: {device or 'unknown'}; --depth {opt.depth} --width {opt.width} --batch_size {opt.batch_size} "
          f"--method {opt.method}, {opt.steps} timed steps per row; {time.time() - started:.0f} s in all.")
    print(f"The last column is {EPOCHS} epochs of {TRAIN_IMAGES} images at the real epoch code's speed, "
          f"evaluation excluded.\n")
    print("\n".join(markdown_table(COLUMNS, [[str(row.get(column) or "") for column in COLUMNS] for row in rows])))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
