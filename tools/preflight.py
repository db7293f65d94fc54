"""Before the table's 30 runs: check that this machine trains every path of the code right, and project the table's hours.

    python tools/preflight.py                 # on a GPU: the table's WRN-28-10 pairs
    python tools/preflight.py --minutes 15    # done within 15 minutes: a compile gets what is left
    python tools/preflight.py --quick         # smaller pairs, fewer steps: WRN-16-4 on a GPU, WRN-16-1 on a CPU
    CUDA_VISIBLE_DEVICES= python tools/preflight.py   # the CPU paths (gloo, CPU bf16) where GPUs are visible

One check after the other, each in a process with a time limit: environment; numerics of each
candidate setting against IEEE fp32; speed (`main.py --benchmark`), projection and memory; resume;
torchrun; last the compiled candidates, each with all the time left of --minutes (a compile past it
is slow, not failed). docs/preflight.md says what each checks. The exit code is 1 if a check failed.
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

from common import FOLDERS, ROOT, setting_flags

CHECKS = ("numerics", "speed", "resume", "torchrun")
RUNS_PER_FOLDER = 3 * 5  # the table: 3 methods x 5 seeds
LIMIT = 600  # seconds an eager check may take: beyond, it hangs
COMPILE_LIMIT = 3600  # seconds a compiled candidate's check may take without --minutes
TRAIN_IMAGES, EPOCHS = 50_000, 200  # CIFAR-100's training set, the reference schedule
# the pairs and steps of `main.py --benchmark`, per (device, --quick): main.py's flags
MODES = {("cuda", False): dict(depth=28, width=10, batch_size=128, benchmark=20),
         ("cuda", True): dict(depth=16, width=4, batch_size=128, benchmark=10),
         ("cpu", False): dict(depth=16, width=1, batch_size=32, benchmark=5),
         ("cpu", True): dict(depth=16, width=1, batch_size=2, benchmark=1)}
# What --settings may name (main.py's flags: common.setting_flags).
SETTINGS = ("fp32+cl", "fp32+cl+compile", "tf32+cl", "bf16", "bf16+cl", "bf16+compile", "bf16+cl+compile", "fp16+cl",
            "fp16+cl+compile")


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller pairs and fewer steps (below)")
    parser.add_argument("--minutes", type=float, help="finish within this time: a check that would start later is "
                        "not run, a compiled candidate's gets what is left (default: each check's own limit)")
    parser.add_argument("--folders", nargs="+", default=list(FOLDERS), choices=FOLDERS)
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=CHECKS,
                        help="the checks after the environment (default: all)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS,
                        help="the candidate settings (default: the device's, docs/preflight.md)")
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
    """The rows so far, printed as they come; the checks not finished; the time left of --minutes."""

    def __init__(self, opt, environment):
        self.opt, self.environment, self.rows, self.pending = opt, environment, [], ["environment"]
        self.deadline = time.time() + 60 * opt.minutes if opt.minutes else None
        self.in_table = False
        self.mode, self.gpus = None, []  # known after the environment

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

    def run(self, title, command, compiles=False, cwd=ROOT):
        """Run a check's command, adding the PREFLIGHT rows it prints as they come, and stop it at its
        limit: LIMIT, or a compiled candidate's COMPILE_LIMIT, or what is left of --minutes if less.
        Returns its other lines of stdout, or None (and a row saying why) if it did not succeed."""
        limit = COMPILE_LIMIT if compiles else LIMIT
        left = limit if self.deadline is None else min(limit, self.deadline - time.time())
        if left <= 0:
            self.add(title, "", "skipped", f"not run: --minutes {self.opt.minutes:g} spent")
            return None
        errors, expired = tempfile.TemporaryFile("w+"), threading.Event()
        process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **self.environment}, text=True,
                                   stdout=subprocess.PIPE, stderr=errors,
                                   start_new_session=True)  # its own process group: stopping it stops what it started
        timer = threading.Timer(left, lambda: (expired.set(), stop(process)))
        timer.start()
        other = []
        try:
            for line in process.stdout:
                if line.startswith("PREFLIGHT "):
                    self.add(**json.loads(line[len("PREFLIGHT "):]))
                else:
                    other.append(line.rstrip("\n"))
            process.wait()
        finally:
            timer.cancel()
            stop(process)
        errors.seek(0)
        last = ([line.strip() for line in errors if line.strip()] or ["no output"])[-1]
        if process.returncode == 0:
            return other
        if expired.is_set() and left < limit:  # stopped at the end of --minutes: not a failure
            why = f"not finished in the {left:.0f} s left of --minutes {self.opt.minutes:g}"
            self.add(title, "", "slow", f"slow compile: {why}; a longer --minutes finishes it (the compile cache "
                     f"keeps what was compiled)") if compiles else self.add(title, "", "skipped", why)
        else:
            self.add(title, "", "fail", f"no result within {left:.0f} s: hung? ({last})" if expired.is_set()
                     else f"exit code {process.returncode}: {last}")
        return None


def stop(process):
    """Stop a check's process group: SIGTERM (torchrun then stops its workers), SIGKILL what is left 10 s later."""
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


def speed(run, folder, setting, numerics_passed, compiles=False):
    """One `main.py --benchmark` process: the figures of its line, with the epoch code's img/s."""
    title = f"speed {folder}/ {setting}"
    if not numerics_passed:
        return run.add(title, "", "skipped", "its numerics did not pass or did not finish")
    command = [sys.executable, str(ROOT / folder / "main.py"), *(f"--{key}={value}" for key, value in run.mode.items()),
               f"--nthread={run.opt.nthread}", *([] if run.gpus else ["--gpu_id="]), *setting_flags(setting)]
    started = time.time()
    lines = run.run(title, command, compiles, cwd=ROOT / folder)
    result = [line for line in lines or [] if line.startswith("benchmark | ")]
    if not result:
        return lines is None or run.add(title, "", "fail", "main.py --benchmark printed no result line")
    # benchmark | pair | method | batch | setting | device | img/s | ms/step | TFLOP/s | memory | efficiency
    fields = result[-1].split(" | ")
    epoch_images = float(fields[6].split()[0]) * float(fields[-1].split()[-1])
    run.add(title, f"{', '.join(fields[6:])}: {epoch_images:.1f} img/s in the epoch code; {time.time() - started:.0f} s",
            "pass", setting=setting, epoch_images=epoch_images, memory=fields[-2])


def conclude(run):
    """The projection and memory rows of each folder's fastest setting, the verdict, and the
    recommended command. Returns the exit code."""
    chosen, hours = {}, 0.0
    for folder in run.opt.folders:
        timed = run.passed(f"speed {folder}/ ")
        if timed:
            best = max(timed, key=lambda data: data["epoch_images"])
            chosen[folder] = best["setting"]
            run_hours = EPOCHS * TRAIN_IMAGES / best["epoch_images"] / 3600
            hours += RUNS_PER_FOLDER * run_hours
            run.add(f"projection {folder}/", f"{best['setting']}, the fastest: {run_hours:.1f} h per 200-epoch run "
                    f"(training in the epoch code; the evaluation is not timed)", "pass")
            run.add(f"memory {folder}/", f"{best['setting']}: {best['memory']}" + (
                f" of a GPU's {run.gpus[0]['memory'] / 2 ** 30:.0f} GiB" if run.gpus else " on the CPU"), "pass")
    if chosen:
        where = f"{len(run.gpus)} x {run.gpus[0]['name']}, one run per GPU" if run.gpus else "this CPU, one run at a time"
        run.add("projection: the table", f"{RUNS_PER_FOLDER * len(chosen)} runs ({', '.join(chosen)}) of WRN-"
                f"{run.mode['depth']}-{run.mode['width']} pairs, {hours:.1f} run-hours: about "
                f"{hours / max(len(run.gpus), 1):.1f} h on {where} (ind and dml counted at dcm's speed: an upper bound)",
                "pass")
    failed = sum(row["verdict"] == "fail" for row in run.rows)
    slow = [row["check"] for row in run.rows if row["verdict"] == "slow"]
    run.say((f"\n{failed} check(s) failed." if failed else "\nEvery check that finished passed.")
            + (f" Slow compile, not timed: {', '.join(slow)}; a longer --minutes times it." if slow else ""))
    if chosen:
        run.say("Recommended command for the table's runs (WRN-28-10, the paper's model) with each folder's fastest "
                "setting that passed (--amp and --tf32 change the numerics, see docs/speed.md):")
        for line in recommended_commands(chosen, run.gpus):
            run.say(f"  {line}")
        if (run.mode["depth"], run.mode["width"]) != (28, 10):
            run.say(f"The speeds were measured on WRN-{run.mode['depth']}-{run.mode['width']} pairs, not on the "
                    f"table's WRN-28-10: its settings may rank otherwise there.")
    return 1 if failed else 0


def recommended_commands(chosen, gpus):
    """tools/sweep.py's command(s) of the table's runs, each folder with its setting (one command if they agree)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:len(gpus)] if visible else [str(index) for index in range(len(gpus))]
    ids = ",".join(ids) or "''"  # '': the CPU
    groups = chosen if len(chosen) < len(FOLDERS) or len(set(chosen.values())) > 1 else {None: chosen[FOLDERS[0]]}
    return [f"python tools/sweep.py{f' --folders {folder}' if folder else ''} --gpus {ids} "
            f"--dataroot DATA {' '.join(setting_flags(setting))}".rstrip() for folder, setting in groups.items()]


def preflight(run, cache):
    opt = run.opt
    run.say(f"preflight: one compile cache for every check, kept for your runs: {cache}")
    run.run("environment", checks_command("environment"))
    gpu_row = next((row["data"] for row in run.rows if row["check"] == "environment: GPUs"), {})
    run.gpus = gpu_row.get("gpus", [])
    device = "cuda" if run.gpus else "cpu"
    run.mode = mode = MODES[device, opt.quick]
    candidates = opt.settings or candidate_settings(device, opt.quick, gpu_row.get("bf16"), gpu_row.get("tf32"))
    eager = ["fp32"] + [setting for setting in candidates if "compile" not in setting]
    compiled = [setting for setting in candidates if "compile" in setting]
    # (check, folder, setting): the eager settings first, the compiled candidates last with the time left
    plan = [(check, folder, None) for check in CHECKS[:2] for folder in opt.folders] + [
        (check, None, None) for check in CHECKS[2:]] + [
        (check, folder, setting) for folder in opt.folders for setting in compiled for check in CHECKS[:2]]
    plan = [(check, folder, setting, " ".join(filter(None, [check, folder and f"{folder}/", setting])))
            for check, folder, setting in plan if check in opt.checks]
    run.pending = [title for *_, title in plan]
    run.say(f"\n{'GPU' if run.gpus else 'CPU'}{' --quick' if opt.quick else ''}: WRN-{mode['depth']}-{mode['width']} "
            f"pairs at batch {mode['batch_size']}; checks to run: {', '.join(run.pending)}")
    config = dict(nthread=opt.nthread, depth=mode["depth"], width=mode["width"], batch_size=mode["batch_size"],
                  device=device, gpus=len(run.gpus))
    for check, folder, setting, title in plan:
        if check == "numerics":
            run.run(title, checks_command("numerics", **config, folder=folder, settings={
                name: setting_flags(name) for name in ([setting] if setting else eager)}), compiles=bool(setting))
        elif check == "speed":
            for name in [setting] if setting else eager:
                passed = "numerics" not in opt.checks or name in [
                    data["setting"] for data in run.passed(f"numerics {folder}/ ")]
                speed(run, folder, name, passed, compiles=bool(setting))
        else:
            run.run(check, checks_command(check, **config))
        run.pending.remove(title)
    return conclude(run)


def main(argv=None):
    opt = parse_options(argv)
    cache = Path(opt.out).expanduser().resolve() / "compile"
    scratch = tempfile.mkdtemp(prefix="preflight_")  # the checks' temporary files, removed at the end
    run = Preflight(opt, {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
                          "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "TMPDIR": scratch,
                          "PYTHONUNBUFFERED": "1"})
    previous = {number: signal.signal(number, stop_on_signal) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        return preflight(run, cache)
    except Stopped as stopped:
        run.say(f"\npreflight: stopped by {stopped}; did not finish: {', '.join(run.pending)}")
        if run.mode:  # what the finished checks measured still projects and recommends
            conclude(run)
        return 130 if str(stopped) == "SIGINT" else 143
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        shutil.rmtree(scratch, ignore_errors=True)


def stop_on_signal(number, frame):
    raise Stopped(signal.Signals(number).name)


if __name__ == "__main__":
    sys.exit(main())
