"""Before the table's 30 runs: check that this machine trains every path of the code right, and project the table's hours.

    python tools/preflight.py                 # on a GPU: the table's WRN-28-10 pairs
    python tools/preflight.py --minutes 15    # done within 15 minutes: a compile gets what is left
    python tools/preflight.py --quick         # smaller pairs, fewer steps: WRN-16-4 on a GPU, WRN-16-1 on a CPU
    python tools/preflight.py --cpu           # the CPU paths (gloo, CPU bf16) even where GPUs are visible

The checks run one after the other, each in a process of its own with a time limit: a check that
hangs fails its row, and the next one runs.
  environment  torch, CUDA, cuDNN, NCCL and Triton versions; the GPUs; the CPU and its bf16 support
  numerics     per folder, one SGD step of the pair on one batch from one initialisation in IEEE fp32
               (TF32 off: the default setting, the reference) and in each candidate setting (GPU:
               tf32+cl, bf16+cl, bf16+cl+compile, with fp16 for bf16 and no TF32 before Ampere;
               CPU: fp32+cl, bf16+cl, and bf16+cl+compile without --quick): the loss within 1e-3
               (fp32) or 1e-2 (tf32, bf16, fp16) of fp32's, the gradients finite, 3 more steps finite
  speed        per folder and setting that passed: `main.py --benchmark N`, the folder's own timing
               (img/s, TFLOP/s, peak memory, pipeline efficiency); the fastest in the epoch code is
               the folder's setting, and gives the projection (hours of the table's 2 folders x 3
               methods x 5 seeds, one run per GPU) and the memory rows
  resume       SIGTERM inside an epoch, --resume: the final weights against an uninterrupted run's
               (--deterministic; bit for bit on a CPU, the difference said on a GPU)
  torchrun     2 processes with --sync_bn update the networks as 1 process does: NCCL on 2 GPUs,
               else gloo on the CPU
Compiled candidates come last, numerics then speed: a cold compile takes minutes on a fresh GPU, so
each gets all the time left of --minutes (without it, an hour); one that does not finish there is
reported as a slow compile, not as a failure. Every check uses one compile cache, DIR/compile
(--out), kept for your runs. Rows are printed as each check finishes; a preflight stopped by
SIGTERM or Ctrl-C says which checks did not finish. The exit code is 1 if a check failed.
"""
import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchmark  # tools/benchmark.py: the settings table, main.py --benchmark's command line and its parser

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("wrn", "wrn_mobi")
CHECKS = ("numerics", "speed", "resume", "torchrun")
RUNS_PER_FOLDER = 3 * 5  # the table: 3 methods x 5 seeds
LIMIT = 600  # seconds an eager check may take: beyond, it hangs
COMPILE_LIMIT = 3600  # seconds a compiled candidate's check may take without --minutes
# model and steps of `main.py --benchmark` per (device, --quick)
MODES = {("cuda", False): dict(depth=28, width=10, batch_size=128, steps=20),
         ("cuda", True): dict(depth=16, width=4, batch_size=128, steps=10),
         ("cpu", False): dict(depth=16, width=1, batch_size=32, steps=5),
         ("cpu", True): dict(depth=16, width=1, batch_size=2, steps=1)}


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller pairs and fewer steps (below)")
    parser.add_argument("--cpu", action="store_true", help="check the CPU even where GPUs are visible")
    parser.add_argument("--minutes", type=float, help="finish within this time: a check that would start later is "
                        "not run, a compile gets what is left (default: no limit but each check's own)")
    parser.add_argument("--folders", nargs="+", default=list(FOLDERS), choices=FOLDERS)
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS,
                        help="the checks to run after the environment (default: all)")
    parser.add_argument("--settings", nargs="+", choices=sorted(set(benchmark.SETTINGS) - {"plain", "fp32"}),
                        help="the candidate settings (default: the device's, above)")
    parser.add_argument("--out", default=str(Path.home() / ".cache" / "dcm-preflight"), metavar="DIR",
                        help="DIR/compile is the compile cache, kept for your runs (default: %(default)s)")
    parser.add_argument("--nthread", default=4, type=int, help="CPU threads of each process (capped at the cores)")
    opt = parser.parse_args(argv)
    if opt.nthread <= 0 or (opt.minutes is not None and not opt.minutes > 0):
        parser.error("--nthread and --minutes must be positive")
    opt.nthread = min(opt.nthread, os.cpu_count() or 1)
    return opt


def candidate_settings(device, quick, bf16, tf32):
    """The settings the fastest of which, once its numerics pass, is recommended."""
    if device == "cuda":
        amp = "bf16" if bf16 else "fp16"
        return (["tf32+cl"] if tf32 else []) + [f"{amp}+cl", f"{amp}+cl+compile"]
    return ["fp32+cl", "bf16+cl"] + ([] if quick else ["bf16+cl+compile"])  # compiling takes minutes on a CPU


class Stopped(Exception):
    """SIGTERM or SIGINT from the caller."""


class Preflight:
    """The rows so far, printed as they come; the time left of --minutes; the check processes."""

    def __init__(self, opt, environment):
        self.opt, self.environment, self.rows, self.pending = opt, environment, [], ["environment"]
        self.deadline = time.time() + 60 * opt.minutes if opt.minutes else None
        self.in_table = False

    def say(self, text=""):
        print(text, flush=True)
        self.in_table = text.startswith("| ")

    def add(self, check, figure, verdict, why="", **data):
        if not self.in_table:
            self.say("\n| check | figure | verdict |\n|---|---|---|")
        self.rows.append({"check": check, "verdict": verdict, "data": data})
        words = {"pass": "pass", "fail": "FAIL"}.get(verdict, verdict) + (f": {why}" if why else "")
        self.say(f"| {check} | {figure.replace('|', '/')} | {words.replace('|', '/')} |")

    def passed(self, prefix):
        return [row["data"] for row in self.rows if row["check"].startswith(prefix) and row["verdict"] == "pass"]

    def time_left(self):
        return None if self.deadline is None else self.deadline - time.time()

    def run(self, title, command, compiles=False, cwd=ROOT):
        """Run a check's command with its time limit (LIMIT; a compile's: what is left of --minutes, or
        COMPILE_LIMIT); add the PREFLIGHT rows it prints, as they come. Returns its other stdout lines,
        or None (and a row saying why) when it did not finish."""
        left = self.time_left()
        limit = min(COMPILE_LIMIT if compiles else LIMIT, float("inf") if left is None else left)
        if limit <= 0:
            self.add(title, "", "skipped", f"not run: --minutes {self.opt.minutes:g} spent")
            return None
        errors = tempfile.TemporaryFile("w+")
        process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **self.environment}, text=True,
                                   stdout=subprocess.PIPE, stderr=errors,
                                   start_new_session=True)  # its own process group: stopping it stops what it started
        expired = threading.Event()
        timer = threading.Timer(limit, lambda: (expired.set(), stop(process)))
        timer.start()
        other = []
        try:
            for line in process.stdout:
                if line.startswith("PREFLIGHT "):
                    row = json.loads(line[len("PREFLIGHT "):])
                    self.add(row.pop("check"), row.pop("figure"), row.pop("verdict"), row.pop("why"), **row["data"])
                else:
                    other.append(line.rstrip("\n"))
            process.wait()
        finally:
            timer.cancel()
            stop(process)
        if process.returncode == 0:
            return other
        errors.seek(0)
        last = ([line.strip() for line in errors if line.strip()] or ["no output"])[-1]
        if expired.is_set():
            if limit < (COMPILE_LIMIT if compiles else LIMIT):  # stopped at the end of --minutes
                why = f"not finished in the {limit:.0f} s left of --minutes {self.opt.minutes:g}"
                self.add(title, "", "slow" if compiles else "skipped", ("slow compile: " if compiles else "") + why
                         + ("; more --minutes finish it (the compile cache keeps what was compiled)" if compiles else ""))
            else:
                self.add(title, "", "fail", f"no result within {limit:.0f} s: hung? ({last})")
        else:
            self.add(title, "", "fail", f"exit code {process.returncode}: {last}")
        return None


def stop(process):
    """Stop a check's process group: SIGTERM (torchrun then stops its workers), SIGKILL to what is left 10 s later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline:
            process.poll()  # reaped, the check's own process leaves the group
            os.killpg(process.pid, 0)  # raises ProcessLookupError once the group is empty
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def checks_command(check, **config):
    return [sys.executable, str(Path(__file__).with_name("preflight_checks.py")), check, json.dumps(config)]


def speed(run, folder, setting, mode, opt, device, numerics_passed, compiles=False):
    """One `main.py --benchmark` run: its row, with the epoch code's img/s, what it projects and its memory."""
    if not numerics_passed:
        return run.add(f"speed {folder}/ {setting}", "", "skipped", "its numerics did not pass or did not finish")
    options = benchmark.parse_options(["--depth", str(mode["depth"]), "--width", str(mode["width"]), "--batch_size",
                                       str(mode["batch_size"]), "--steps", str(mode["steps"]), "--nthread",
                                       str(opt.nthread), *(["--gpu_id", ""] if device == "cpu" else [])])
    started = time.time()
    lines = run.run(f"speed {folder}/ {setting}", benchmark.row_command(options, folder, setting), compiles,
                    cwd=ROOT / folder)
    result = [line for line in lines or [] if line.startswith("benchmark | ")]
    if lines is None or not result:
        if lines is not None:
            run.add(f"speed {folder}/ {setting}", "", "fail", "main.py --benchmark printed no result line")
        return
    cells = benchmark.parse_line(result[-1])
    epoch_images = float(cells["img/s"]) * float(cells["pipeline efficiency"])
    run.add(f"speed {folder}/ {setting}", f"{cells['img/s']} img/s, {cells['ms/step']} ms/step, {cells['TFLOP/s']} "
            f"TFLOP/s ({cells['% of matmul peak']}), peak memory {cells['peak memory']}, pipeline efficiency "
            f"{cells['pipeline efficiency']}: {epoch_images:.1f} img/s in the epoch code ({time.time() - started:.0f} s)",
            "pass", folder=folder, setting=setting, epoch_images=epoch_images, memory=cells["peak memory"])


def summary(run, opt, mode, gpus):
    """The projection and memory rows from each folder's fastest setting; returns folder -> setting."""
    chosen, hours = {}, 0.0
    for folder in opt.folders:
        timed = run.passed(f"speed {folder}/ ")
        if not timed:
            run.add(f"projection {folder}/", "", "skipped", "no speed row passed")
            continue
        best = max(timed, key=lambda data: data["epoch_images"])
        chosen[folder] = best["setting"]
        run_hours = benchmark.EPOCHS * benchmark.TRAIN_IMAGES / best["epoch_images"] / 3600
        hours += RUNS_PER_FOLDER * run_hours
        run.add(f"projection {folder}/", f"{best['setting']}, the fastest: {run_hours:.1f} h per 200-epoch run "
                f"(training in the epoch code; the evaluation is not timed)", "pass")
        run.add(f"memory {folder}/", f"{best['setting']}: peak {best['memory']}" + (
            f" of the {gpus[0]['memory'] / 2 ** 30:.0f} GiB of a GPU" if gpus else " (process RSS, on the CPU)"), "pass")
    if len(chosen) == len(FOLDERS):
        devices = f"{len(gpus)} x {gpus[0]['name']}" if gpus else "this CPU"
        run.add("projection: the table", f"{len(FOLDERS) * RUNS_PER_FOLDER} runs of WRN-{mode['depth']}-{mode['width']} "
                f"pairs, {hours:.1f} run-hours: about {hours / max(len(gpus), 1):.1f} h on {devices}, one run per "
                f"{'GPU' if gpus else 'device'} (ind and dml counted at dcm's speed: an upper bound)", "pass")
    return chosen


def recommended_commands(chosen, gpu_ids):
    """tools/sweep.py's command(s) of the table's runs (WRN-28-10, the paper's model), each folder with its setting."""
    gpus = ",".join(gpu_ids) or "''"
    groups = chosen if len(chosen) < len(FOLDERS) or len(set(chosen.values())) > 1 else {None: chosen[FOLDERS[0]]}
    return [f"python tools/sweep.py{f' --folders {folder}' if folder else ''} --gpus {gpus} --dataroot DATA "
            f"{' '.join(benchmark.SETTINGS[setting])}".rstrip() for folder, setting in groups.items()]


def preflight(run, opt, cache):
    run.say(f"preflight: one compile cache for every check, kept for your runs: {cache}")
    config = {"nthread": opt.nthread}
    run.run("environment", checks_command("environment", **config))
    gpus = next((row["data"]["gpus"] for row in run.rows if row["check"] == "environment: GPUs"), [])
    gpu_row = next((row["data"] for row in run.rows if row["check"] == "environment: GPUs"), {})
    device = "cuda" if gpus else "cpu"
    mode = MODES[device, opt.quick]
    candidates = opt.settings or candidate_settings(device, opt.quick, gpu_row.get("bf16"), gpu_row.get("tf32"))
    eager = ["fp32"] + [setting for setting in candidates if "compile" not in setting]
    compiled = [setting for setting in candidates if "compile" in setting]
    run.pending = [f"{check} {folder}/" for check in ("numerics", "speed") if check in opt.checks
                   for folder in opt.folders] + [check for check in ("resume", "torchrun") if check in opt.checks] + [
        f"{check} {folder}/ {setting}" for folder in opt.folders for setting in compiled
        for check in ("numerics", "speed") if check in opt.checks]
    run.say(f"\n{'GPU' if gpus else 'CPU'}{' --quick' if opt.quick else ''}: WRN-{mode['depth']}-{mode['width']} pairs "
            f"at batch {mode['batch_size']}; checks to run: {', '.join(run.pending)}")
    config.update(depth=mode["depth"], width=mode["width"], batch_size=mode["batch_size"], device=device,
                  gpus=len(gpus))

    def passed(folder, settings):
        if "numerics" not in opt.checks:
            return settings
        return [data["setting"] for data in run.passed(f"numerics {folder}/ ") if data["setting"] in settings]

    def finished(title):
        run.pending.remove(title)

    for folder in opt.folders if "numerics" in opt.checks else []:
        run.run(f"numerics {folder}/", checks_command("numerics", folder=folder, **config, settings={
            setting: benchmark.SETTINGS[setting] for setting in eager}))
        finished(f"numerics {folder}/")
    for folder in opt.folders if "speed" in opt.checks else []:
        for setting in eager:
            speed(run, folder, setting, mode, opt, device, passed(folder, [setting]))
        finished(f"speed {folder}/")
    for check in [check for check in ("resume", "torchrun") if check in opt.checks]:
        run.run(check, checks_command(check, **config))
        finished(check)
    for folder in opt.folders:
        for setting in compiled:
            if "numerics" in opt.checks:
                run.run(f"numerics {folder}/ {setting}", checks_command("numerics", folder=folder, **config, settings={
                    setting: benchmark.SETTINGS[setting]}), compiles=True)
                finished(f"numerics {folder}/ {setting}")
            if "speed" in opt.checks:
                speed(run, folder, setting, mode, opt, device, passed(folder, [setting]), compiles=True)
                finished(f"speed {folder}/ {setting}")

    chosen = summary(run, opt, mode, gpus) if "speed" in opt.checks else {}
    failed = sum(row["verdict"] == "fail" for row in run.rows)
    slow = [row["check"] for row in run.rows if row["verdict"] == "slow"]
    run.say(f"\n{failed} check(s) failed." if failed else "\nEvery check that ran passed.")
    if slow:
        run.say(f"Slow compile, not timed: {', '.join(slow)}; a longer --minutes times it.")
    if chosen:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpu_ids = [gpu.strip() for gpu in visible.split(",")][:len(gpus)] if visible else [
            str(index) for index in range(len(gpus))]
        run.say("Recommended command for the table's runs (WRN-28-10, the paper's model) with each folder's fastest "
                "setting that passed (--amp and --tf32 change the numerics, see docs/speed.md):")
        for line in recommended_commands(chosen, gpu_ids):
            run.say(f"  {line}")
        if (mode["depth"], mode["width"]) != (28, 10):
            run.say(f"The speeds were measured on WRN-{mode['depth']}-{mode['width']} pairs, not on the table's "
                    f"WRN-28-10: its settings may rank otherwise there.")
    return 1 if failed else 0


def main(argv=None):
    opt = parse_options(argv)
    cache = Path(opt.out).expanduser().resolve() / "compile"
    scratch = tempfile.mkdtemp(prefix="preflight_")  # the checks' temporary files, removed at the end
    run = Preflight(opt, {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
                          "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "TMPDIR": scratch,
                          "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": ""} if opt.cpu else {})})
    previous = {number: signal.signal(number, stop_on_signal) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        return preflight(run, opt, cache)
    except Stopped as stopped:
        run.say(f"\npreflight: stopped by {stopped}; the rows above are the checks that finished; did not finish: "
                f"{', '.join(run.pending) or 'none'}")
        return 130 if str(stopped) == "SIGINT" else 143
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        shutil.rmtree(scratch, ignore_errors=True)


def stop_on_signal(number, frame):
    raise Stopped(signal.Signals(number).name)


if __name__ == "__main__":
    sys.exit(main())
