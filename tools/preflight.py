"""Before the table's 30 runs: check that this machine runs every path of the code right, and project their hours.

    python tools/preflight.py               # on a GPU: the table's WRN-28-10 pairs, planned for 8 minutes
    python tools/preflight.py --budget 16   # more time: every check below, nothing dropped
    python tools/preflight.py --quick       # smaller models and fewer steps (below)
    python tools/preflight.py --cpu         # ignore the GPUs: check the CPU paths (gloo, CPU bf16, ...)

The checks run in the order of what a user loses without them; each is given a share of the
--budget and is stopped at it (a hang or a compile slower than planned fails its rows, the next
check still runs). Checks whose planned cost does not fit the budget are listed at the start as
not run, with the budget that runs them:

  1. environment   torch / CUDA / cuDNN / NCCL / Triton versions; the GPUs (name, memory, driver,
                   bf16 and TF32 tensor cores); the CPU and its bf16 support (60 s at most)
  2. numerics      per folder, one SGD step of the pair on one batch from one initialisation: the
                   default setting (IEEE fp32, TF32 off) and each candidate for the recommended one
                   (GPU: tf32+cl, bf16+cl, bf16+cl+compile; fp16 instead of bf16 and no TF32 before
                   Ampere): the loss within 1e-3 (fp32) or 1e-2 (tf32, bf16, fp16) of fp32's
                   relative to it, every gradient finite, 3 more steps finite
  3. resume        SIGTERM in the middle of an epoch, then --resume: the final weights equal the
                   uninterrupted run's, bit for bit on a CPU (--deterministic); on CUDA within what
                   two uninterrupted runs differ by, and whether those two are byte-identical
                   (--deterministic exact on this GPU)
  4. speed         per folder, img/s of the real epoch code for each setting that passed 2, on the
                   steps 2 built and compiled; the fastest is the setting chosen for the folder
  5. projection    with that setting, steady-state steps of dcm (its graphs from 2): img/s, minutes
                   of a 200-epoch run, hours of the default sweep (2 folders x 3 methods x 5 seeds)
                   on this machine's GPUs, one run per GPU; the peak memory of a run
  6. sharing       both folders' runs timed at once on one device: two runs per GPU
                   (tools/sweep.py --jobs_per_gpu 2) are recommended only if that measured
                   throughput beats one run at a time and both fit in memory
  7. torchrun      NCCL on GPUs, gloo on a CPU: 2 processes with --sync_bn train what 1 process
                   trains; with 1 GPU, main.py's code builds the NCCL group, SyncBatchNorm and DDP
                   on one rank (2 NCCL ranks cannot share a GPU: the row says what was not covered)
  8. the rest of a run   per folder, the graphs a compiled run adds (the last partial batch, the
                   evaluation), compiled and counted once, and the evaluation's speed
  9. ind and dml   their projections (new graphs to compile: without auxiliary classifiers)
  10. other settings   numerics of the settings that are no candidates (fp32+cl, tf32, bf16, fp16, ...)

One compile cache serves every check and is kept for your runs: --out/compile (Inductor's and
Triton's caches); a worker process per folder keeps its compiled steps between checks 2, 4, 5, 6
and 8, so that a graph is compiled once. Each check's line says how many graphs it compiled.
Every row is printed, and appended to --out/preflight-DATE.md, as soon as it is known: a run
stopped from outside keeps every finished row, and its plan at the top says what did not run.
The exit code is 1 if a check failed.

Plans (the shares are planned, not measured: no GPU has run this code yet; the first GPU run will
confirm or correct them, and its `time:` rows show each check's seconds against its share):
  GPU           WRN-28-10 pairs, batch 128, default --budget 8: after the environment, checks 2-7
                and 10 are planned at 435 s, most of it two cold compiles of a pair's training
                step; 8 and 9 (four more cold compiles per folder) need --budget 16
  GPU --quick   WRN-16-4 pairs, batch 128, default --budget 4: checks 2-7 planned at 213 s, then
                what else fits
  CPU           WRN-16-1 pairs, batch 32, with --compile's Inductor (minutes per graph on a
                CPU), default --budget 30
  CPU --quick   WRN-16-1 pairs, batch 2, no --compile (tests/test_speed.py covers it), no fp16
                (emulated on a CPU, minutes for the MobileNet), every check planned at 169 s on an
                idle CPU; default --budget 10, since a CPU shared with other work is slower
Under --quick the measured model is not the table's: the projection says which model it timed,
and the recommended command is for the table's WRN-28-10 all the same.
"""
import argparse
import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
CHECKS = TOOLS / "preflight_checks.py"
FOLDERS = ("wrn", "wrn_mobi")
METHODS = ("ind", "dml", "dcm")
SEEDS = 5  # the default sweep: 2 folders x 3 methods x 5 seeds
GIB = 2 ** 30
CUDA_CONTEXT = 1 * GIB  # what a process holds on a GPU besides its tensors' caching allocator, about
SHARING_GAIN = 1.1  # two runs on one GPU must do 10% more work per hour than one to be worth it
ENVIRONMENT_LIMIT = 60


def setting_flags(setting):
    """main.py's flags of a setting name such as 'bf16+cl+compile' ('fp32' is IEEE fp32, 'tf32' fp32 on TF32 cores)."""
    dtype, *extras = setting.split("+")
    return ((["--amp", dtype] if dtype in ("bf16", "fp16") else []) + (["--tf32"] if dtype == "tf32" else [])
            + (["--channels_last"] if "cl" in extras else []) + (["--compile"] if "compile" in extras else []))


# What each mode measures: the model and sizes of the worker's steps, the steps timed, and what each
# check is planned to take on a machine that has never compiled this code (seconds; GPU figures are
# a plan until a GPU run confirms them).
PLANS = {
    ("cuda", False): dict(depth=28, width=10, batch_size=128, budget=8, speed=(10, 4.0), projection=(20, 8.0),
                          share_seconds=10.0, test_images=2000,
                          small=dict(depth=16, width=4, batch_size=128, train_images=1024, test_images=512),
                          planned=dict(numerics=115, resume=40, speed=20, projection=15, sharing=20, torchrun=35,
                                       rest=120, methods=130, other=20)),
    ("cuda", True): dict(depth=16, width=4, batch_size=128, budget=4, speed=(5, 2.0), projection=(10, 3.0),
                         share_seconds=5.0, test_images=2000,
                         small=dict(depth=16, width=4, batch_size=128, train_images=1024, test_images=512),
                         planned=dict(numerics=45, resume=40, speed=10, projection=8, sharing=12, torchrun=35,
                                      rest=30, methods=60, other=15)),
    ("cpu", False): dict(depth=16, width=1, batch_size=32, budget=30, speed=(5, 10.0), projection=(5, 10.0),
                         share_seconds=5.0, test_images=500,
                         small=dict(depth=16, width=1, batch_size=32, train_images=256, test_images=64),
                         planned=dict(numerics=330, resume=60, speed=30, projection=20, sharing=15, torchrun=60,
                                      rest=300, methods=400, other=40)),
    ("cpu", True): dict(depth=16, width=1, batch_size=2, budget=10, speed=(1, 5.0), projection=(1, 5.0),
                        share_seconds=1.0, test_images=16,
                        small=dict(depth=16, width=1, batch_size=8, train_images=32, test_images=16),
                        planned=dict(numerics=20, resume=30, speed=5, projection=5, sharing=5, torchrun=30,
                                     rest=2, methods=10, other=10)),
}


def candidate_settings(device, quick, bf16, tf32):
    """(candidates for the recommended setting, the other settings) of a device: the fastest
    candidate whose numerics pass is recommended; the others are checked last, for completeness."""
    if device == "cuda":
        amp = "bf16" if bf16 else "fp16"
        candidates = (["tf32+cl"] if tf32 else []) + [f"{amp}+cl", f"{amp}+cl+compile"]
        others = ["fp32+cl"] + (["tf32"] if tf32 else []) + [amp] + (["fp16", "fp16+cl"] if bf16 else [])
        return candidates, others
    if quick:  # no compile (minutes on a CPU), no fp16 (emulated: minutes for the MobileNet)
        return ["fp32+cl", "bf16+cl"], ["bf16"]
    return ["fp32+cl", "bf16+cl", "fp32+cl+compile", "bf16+cl+compile"], ["bf16", "fp16", "fp16+cl"]


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer steps (see below)")
    parser.add_argument("--cpu", action="store_true", help="check the CPU even where GPUs are visible")
    parser.add_argument("--budget", type=float, metavar="MIN",
                        help="minutes for the whole preflight (default: the mode's, below); checks that do not "
                             "fit are not run and said so")
    parser.add_argument("--out", default=str(Path.home() / ".cache" / "dcm-preflight"), metavar="DIR",
                        help="where the results file and the compile cache (DIR/compile, kept for later runs) go "
                             "(default: %(default)s)")
    parser.add_argument("--depth", type=int, help="WRN depth of the timed pairs (default: the mode's)")
    parser.add_argument("--width", type=int, help="WRN width of the timed pairs (default: the mode's)")
    parser.add_argument("--nthread", default=4, type=int, help="CPU threads of each check (capped at the cores)")
    opt = parser.parse_args(argv)
    if opt.depth is not None and (opt.depth < 16 or (opt.depth - 4) % 6):
        parser.error(f"--depth {opt.depth}: DCM's auxiliary classifiers need a WRN depth 6n+4 of at least 16")
    if (opt.width is not None and opt.width <= 0) or opt.nthread <= 0:
        parser.error("--width and --nthread must be positive")
    if opt.budget is not None and not opt.budget > 0:
        parser.error(f"--budget must be a positive number of minutes, got {opt.budget}")
    return opt


# --- the plan: checks in order, each with its share of the budget ------------------------------------

class Item:
    """One planned check: its title, the seconds it is planned to take, the checks it needs, and
    (once the budget is split) its share, or why it does not run."""

    def __init__(self, key, title, planned, needs=()):
        self.key, self.title, self.planned, self.needs = key, title, planned, needs
        self.share, self.not_run = None, None


def plan_items(planned):
    """Every check after the environment, in the order of what a user loses without it."""
    items = [Item(f"numerics {folder}", f"numerics {folder}/ (default and candidate settings)", planned["numerics"])
             for folder in FOLDERS]
    items.append(Item("resume", "interrupt and resume; --deterministic", planned["resume"]))
    items += [Item(f"speed {folder}", f"speed {folder}/", planned["speed"], needs=[f"numerics {folder}"])
              for folder in FOLDERS]
    items += [Item(f"projection {folder}", f"projection and memory {folder}/ (dcm)", planned["projection"],
                   needs=[f"speed {folder}"]) for folder in FOLDERS]
    items.append(Item("sharing", "two runs on one device", planned["sharing"],
                      needs=[f"projection {folder}" for folder in FOLDERS]))
    items.append(Item("torchrun", "torchrun", planned["torchrun"]))
    items += [Item(f"rest {folder}", f"the rest of a run {folder}/ (compiles, testing)", planned["rest"],
                   needs=[f"speed {folder}"]) for folder in FOLDERS]
    items += [Item(f"methods {folder}", f"projection {folder}/ ind and dml", planned["methods"],
                   needs=[f"speed {folder}"]) for folder in FOLDERS]
    items += [Item(f"other {folder}", f"numerics {folder}/ (other settings)", planned["other"]) for folder in FOLDERS]
    return items


def split_budget(items, seconds):
    """Give each check, in order, its planned seconds while they fit in `seconds` (a check whose
    prerequisite does not run does not run either); the time left over is shared out in proportion,
    so that the shares add up to the budget."""
    used, running = 0.0, set()
    for item in items:
        missing = [need for need in item.needs if need not in running]
        if missing:
            item.not_run = f"needs {missing[0]}, which does not run"
        elif used + item.planned > seconds:
            item.not_run = f"planned {item.planned} s, over the budget"
        else:
            used += item.planned
            running.add(item.key)
    for item in items:
        if not item.not_run:
            item.share = item.planned * seconds / used
    return sum(item.planned for item in items) / 60


# --- the check processes ---------------------------------------------------------------------------

class Stopped(Exception):
    """The preflight got SIGTERM or SIGINT from its caller."""


class CheckProcess:
    """A process of preflight_checks.py (its own session, so that stopping it stops what it
    started), its stdout read line by line as it comes."""

    def __init__(self, arguments, environment):
        self.process = subprocess.Popen([sys.executable, str(CHECKS), *arguments], cwd=TOOLS.parent,
                                        env={**os.environ, **environment, "PYTHONUNBUFFERED": "1"},
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        self.lines = queue.Queue()
        self.unfinished = 0  # commands sent whose PREFLIGHT-DONE has not come
        self.errors = collections.deque(maxlen=5)
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines.put), daemon=True).start()
        self.error_reader = threading.Thread(target=self._read, args=(self.process.stderr, self._error), daemon=True)
        self.error_reader.start()

    @staticmethod
    def _read(stream, put):
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def _error(self, line):
        if line and line.strip():
            self.errors.append(line.strip())

    def send(self, command):
        self.unfinished += 1
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def next_line(self, deadline):
        """The next line of stdout, None at its end; raises TimeoutError at `deadline`."""
        try:
            return self.lines.get(timeout=max(deadline - time.time(), 0))
        except queue.Empty:
            raise TimeoutError from None

    def problem(self):
        """Why the process ended without finishing its check."""
        code = self.process.wait()
        self.error_reader.join(timeout=10)
        return f"exit code {code}: {self.errors[-1] if self.errors else 'no output'}"

    def stop(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


class Preflight:
    """The run: its report (stdout and the results file, row by row), its workers, its rows."""

    def __init__(self, opt, results_file, environment):
        self.opt, self.results_file, self.environment = opt, results_file, environment
        self.rows, self.workers, self.running = [], {}, []
        self.in_table = False  # whether the last line said was a table's
        self.chosen = {}  # folder -> the setting its speed check chose
        self.setup = None  # the workers' device, model and batch, once the environment is known
        self.pending = []  # the checks planned that have not finished

    def say(self, text=""):
        """A line on stdout and in the results file, at once."""
        print(text, flush=True)
        with open(self.results_file, "a") as results:
            results.write(text + "\n")
        self.in_table = text.startswith("| ")

    def add_row(self, row):
        if not self.in_table:
            self.say("\n| check | figure | verdict |")
            self.say("|---|---|---|")
        self.rows.append(row)
        verdict = {"pass": "pass", "fail": "FAIL", "skipped": "skipped"}[row["verdict"]]
        verdict += f": {row['why']}" if row["why"] else ""
        self.say(f"| {row['check']} | {row['figure'].replace('|', '/')} | {verdict.replace('|', '/')} |")

    def fail(self, title, why):
        self.add_row({"check": title, "figure": "", "verdict": "fail", "why": why, "data": {}})

    def worker(self, folder):
        """The folder's worker, started (or started again after it was stopped), set up with
        self.setup once that is known."""
        if folder not in self.workers or self.workers[folder].process.poll() is not None:
            self.workers[folder] = CheckProcess(["worker", json.dumps({"folder": folder})], self.environment)
            if self.setup:
                self.workers[folder].send({"check": "setup", **self.setup})
        return self.workers[folder]

    def run(self, title, jobs, limit):
        """Send each worker of `jobs` [(worker, command)] its command, all at once; report their rows
        in order, each as soon as it and those before it are known; stop them all at `limit`
        seconds. Returns the graphs compiled for the commands, None if they did not finish."""
        started, deadline = time.time(), time.time() + limit
        self.running = [process for process, _ in jobs]
        graphs = 0
        for process, command in jobs:
            process.send(command)
        try:
            for process, command in jobs:
                while process.unfinished:
                    line = process.next_line(deadline)
                    if line is None:  # the worker ended in the middle of its command
                        self.fail(title, process.problem())
                        graphs = None
                        break
                    if line.startswith("PREFLIGHT-DONE "):
                        process.unfinished -= 1
                        if graphs is not None:
                            graphs += json.loads(line[len("PREFLIGHT-DONE "):])["graphs"]
                    elif line.startswith("PREFLIGHT "):
                        self.add_row(json.loads(line[len("PREFLIGHT "):]))
        except TimeoutError:
            for process, _ in jobs:
                process.stop()
            self.fail(title, f"no result within its share of {limit:.0f} s (--budget gives more)")
            graphs = None
        self.running = []
        seconds = time.time() - started
        counted = "" if graphs is None else f", {graphs} graph(s) compiled"
        self.add_row({"check": f"time: {title}", "verdict": "pass", "why": "", "data": {"graphs": graphs},
                      "figure": f"{seconds:.0f} s of its {limit:.0f} s share{counted}"})
        return graphs

    def stop_all(self):
        for process in [*self.running, *self.workers.values()]:
            if process.process.poll() is None:
                process.stop()

    def data(self, prefix):
        """The data of the passing rows whose check starts with `prefix` (a projection's: those of one method)."""
        return [row["data"] for row in self.rows if row["check"].startswith(prefix) and row["verdict"] == "pass"
                and (not prefix.startswith("projection") or "method" in row["data"])]


# --- decisions from the rows ------------------------------------------------------------------------------

def chosen_setting(speed_data):
    """The setting of the fastest passing speed row, or None."""
    return max(speed_data, key=lambda data: data["images_per_second"])["setting"] if speed_data else None


def projection_summary(projection, rest, devices, device_words, model_words):
    """The default sweep's hours on this machine, one run per device. `projection`: the data of the
    projection rows (folder, method, minutes of a run, and whether they include testing); `rest`:
    folder -> minutes a compiled run adds (testing, compiling), where measured. Each method counts
    at its measured speed, a method not measured at dcm's (an upper bound: ind and dml have no
    auxiliary classifiers)."""
    minutes, complete = {}, True
    for data in projection:
        added = 0.0 if data["tested"] else rest.get(data["folder"])
        complete &= added is not None
        minutes[data["folder"], data["method"]] = data["minutes"] + (added or 0.0)
    if not all((folder, "dcm") in minutes for folder in FOLDERS):
        return {"check": "projection: default sweep", "figure": "", "verdict": "skipped",
                "why": "a dcm projection did not run", "data": {}}
    measured = all((folder, method) in minutes for folder in FOLDERS for method in METHODS)
    hours = SEEDS * sum(minutes.get((folder, method), minutes[folder, "dcm"])
                        for folder in FOLDERS for method in METHODS) / 60
    notes = ([] if measured else ["ind and dml counted at dcm's speed (not timed in this budget)"]) + (
        [] if complete else ["compiled runs: training only (testing and compiling not timed in this budget)"])
    return {"check": "projection: default sweep", "verdict": "pass", "why": "", "data": {"hours": hours},
            "figure": f"{len(FOLDERS) * len(METHODS) * SEEDS} runs of {model_words}, {hours:.1f} run-hours: "
                      f"about {hours / devices:.1f} h on {device_words} (one run per "
                      f"{'GPU' if devices > 1 else 'device'}{' at a time' if devices == 1 else ''})"
                      + "".join(f"; {note}" for note in notes)}


def memory_rows(projection, gpu_memory):
    rows = []
    for data in projection:
        need = data["reserved"] + CUDA_CONTEXT
        fits = 2 * need <= gpu_memory
        rows.append({"check": f"memory {data['folder']}/ {data['method']}", "verdict": "pass", "why": "",
                     "data": {**data, "two_fit": fits},
                     "figure": f"peak {data['memory'] / GIB:.1f} GiB allocated, {data['reserved'] / GIB:.1f} GiB "
                               f"reserved, of {gpu_memory / GIB:.0f} GiB: 2 runs {'fit' if fits else 'do not fit'} "
                               f"on one GPU"})
    return rows


def sharing_row(shared, alone, memory):
    """Whether two runs per GPU pay: with run i timed at shared_i img/s beside the other and at
    alone_i by itself, the two did in each second the work of sum(shared_i / alone_i) seconds of
    one run at a time. Recommended only above SHARING_GAIN and where 2 runs fit in memory."""
    gain = sum(shared[folder] / alone[folder] for folder in shared)
    fits = all(row["data"]["two_fit"] for row in memory) and bool(memory)
    recommend = gain >= SHARING_GAIN and fits
    reason = ("" if gain >= SHARING_GAIN else f"below the {SHARING_GAIN:g} that pays for sharing") if fits else (
        "2 runs do not fit in memory" if memory else "no GPU memory measured")
    words = ", ".join(f"{folder}/ {shared[folder]:.0f} img/s (alone {alone[folder]:.0f})" for folder in shared)
    return {"check": "sharing: two runs per GPU", "verdict": "pass", "why": "", "data": {"recommend": recommend},
            "figure": f"both at once: {words}: {gain:.2f}x the work of one run at a time; "
                      + ("recommended: tools/sweep.py --jobs_per_gpu 2" if recommend else f"one run per GPU ({reason})")}


def recommended_command(chosen, device, gpu_ids, jobs_per_gpu=1):
    """The tools/sweep.py command(s) of the table's default sweep (WRN-28-10, the paper's model)
    with each folder's chosen setting."""
    gpus = ",".join(gpu_ids) if device == "cuda" else "''"
    jobs = " --jobs_per_gpu 2" if jobs_per_gpu == 2 else ""
    groups = [(None, next(iter(chosen.values())))] if len(set(chosen.values())) == 1 else list(chosen.items())
    commands = []
    for folder, setting in groups:
        folders = f" --folders {folder}" if folder else ""
        flags = " ".join(setting_flags(setting))
        commands.append(f"python tools/sweep.py{folders} --gpus {gpus}{jobs} --dataroot DATA {flags}".rstrip())
    return commands


# --- the run -------------------------------------------------------------------------------------------------

def main(argv=None):
    opt = parse_options(argv)
    started = time.time()
    out = Path(opt.out).expanduser().resolve()
    cache = out / "compile"
    (cache / "inductor").mkdir(parents=True, exist_ok=True)
    (cache / "triton").mkdir(parents=True, exist_ok=True)
    results_file = out / f"preflight-{time.strftime('%Y%m%d-%H%M%S')}.md"
    scratch = tempfile.mkdtemp(prefix="preflight_")  # every check's temporary files, removed at the end
    environment = {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
                   "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "TMPDIR": scratch,
                   **({"CUDA_VISIBLE_DEVICES": ""} if opt.cpu else {})}
    run = Preflight(opt, results_file, environment)
    previous = {number: signal.signal(number, stop_on_signal) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        return preflight(run, opt, started, cache)
    except Stopped as stop:
        run.stop_all()
        run.say(f"\npreflight: stopped by {stop.args[0]}; the rows above are every check that finished; "
                f"did not finish: {', '.join(run.pending) or 'none'}")
        return 130 if stop.args[0] == "SIGINT" else 143
    finally:
        run.stop_all()
        for number, handler in previous.items():
            signal.signal(number, handler)
        shutil.rmtree(scratch, ignore_errors=True)


def stop_on_signal(number, frame):
    raise Stopped(signal.Signals(number).name)


def preflight(run, opt, started, cache):
    run.pending = ["environment"]
    run.say(f"preflight: results in {run.results_file}; one compile cache for every check, kept for your runs: "
            f"{cache}")
    for folder in FOLDERS:  # both import torch and their folder while the environment is checked
        run.worker(folder)
    run.run("environment", [(run.worker("wrn"), {"check": "environment", "nthread": opt.nthread, "device": "cpu"})],
            ENVIRONMENT_LIMIT)
    gpu_row = next((row["data"] for row in run.rows if row["check"] == "environment: GPUs"), {})
    gpus = gpu_row.get("gpus", [])
    device = "cuda" if gpus else "cpu"
    plan = PLANS[device, opt.quick]
    depth, width = opt.depth or plan["depth"], opt.width or plan["width"]
    budget = opt.budget or plan["budget"]
    candidates, others = candidate_settings(device, opt.quick, gpu_row.get("bf16", False), gpu_row.get("tf32", False))
    items = plan_items(plan["planned"])
    everything = split_budget(items, budget * 60 - (time.time() - started))
    model_words = f"WRN-{depth}-{width} pairs"
    run.say(f"plan: {'GPU' if gpus else 'CPU'}{' --quick' if opt.quick else ''}, {model_words} at batch "
            f"{plan['batch_size']}, a {budget:g}-minute budget (every check: about {everything:.0f} min, as "
            f"planned); each check is stopped at its share:")
    for item in items:
        run.say(f"  {item.title}: " + (f"{item.share:.0f} s" if item.share else
                                        f"not run ({item.not_run}; --budget {everything + 1:.0f} runs it)"))
    run.pending = [item.title for item in items if item.share]

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu_ids = ([gpu.strip() for gpu in visible.split(",") if gpu.strip()] if visible else
               [str(index) for index in range(len(gpus))])[:len(gpus)]
    # The workers train on the first visible GPU; resume and torchrun pick theirs with --gpu_id or
    # CUDA_VISIBLE_DEVICES.
    base = {"nthread": opt.nthread, "device": device, "depth": depth, "width": width, "batch_size": plan["batch_size"]}
    run.setup = base
    for folder in FOLDERS:
        run.worker(folder).send({"check": "setup", **base})
    small = {**base, **plan["small"], "gpus": len(gpus), "gpu_ids": gpu_ids}
    chosen = run.chosen

    def command(item, folder, check, **arguments):
        return run.run(item.title, [(run.worker(folder), {"check": check, **arguments})], item.share)

    for item in items:
        if not item.share:
            continue
        kind, folder = (item.key.split() + [None])[:2]
        if kind == "numerics":
            command(item, folder, "numerics", settings=["fp32", *candidates])
        elif kind == "resume":
            command(item, "wrn", "resume", **small, epochs=2, timeout=item.share - 5)
        elif kind == "speed":
            passed = [data["setting"] for data in run.data(f"numerics {folder}/ ")]
            command(item, folder, "speed", settings=["fp32", *candidates], passed=passed, steps=plan["speed"][0],
                    seconds=plan["speed"][1])
            chosen[folder] = chosen_setting(run.data(f"speed {folder}/")) or "fp32"
        elif kind == "projection":
            command(item, folder, "projection", setting=chosen[folder], methods=["dcm"], steps=plan["projection"][0],
                    seconds=plan["projection"][1], test_images=plan["test_images"])
            for row in memory_rows(run.data(f"projection {folder}/ dcm"), min(gpu["memory"] for gpu in gpus)) if gpus else []:
                run.add_row(row)
            if folder == FOLDERS[-1]:
                run.add_row(sweep_row(run, gpus, model_words))
        elif kind == "sharing":
            jobs = [(run.worker(folder), {"check": "share", "setting": chosen[folder],
                                                "seconds": plan["share_seconds"]}) for folder in FOLDERS]
            run.run(item.title, jobs, item.share)
            shared = {data["folder"]: data["images_per_second"] for data in run.data("sharing ")}
            alone = {data["folder"]: data["images_per_second"] for data in run.data("projection ")
                     if data["method"] == "dcm"}
            if len(shared) == len(alone) == len(FOLDERS):
                run.add_row(sharing_row(shared, alone, [row for row in run.rows if row["check"].startswith("memory ")]))
        elif kind == "torchrun":
            command(item, "wrn", "torchrun", **small, epochs=1, timeout=item.share - 5)
        elif kind == "rest":
            command(item, folder, "extra_compiles", setting=chosen[folder], test_images=plan["test_images"])
            if folder == FOLDERS[-1] and any("compile" in setting for setting in chosen.values()):
                run.add_row({**sweep_row(run, gpus, model_words), "check": "projection: default sweep, whole runs"})
        elif kind == "methods":
            command(item, folder, "projection", setting=chosen[folder], methods=["ind", "dml"],
                    steps=plan["projection"][0], seconds=plan["projection"][1], test_images=plan["test_images"])
            if folder == FOLDERS[-1]:
                run.add_row({**sweep_row(run, gpus, model_words), "check": "projection: default sweep, every method"})
        elif kind == "other":
            command(item, folder, "numerics", settings=others, keep=False)
        run.pending.remove(item.title)
    for item in items:
        if not item.share:
            run.add_row({"check": item.title, "figure": "", "verdict": "skipped", "why": f"not run: {item.not_run}",
                         "data": {}})
    if not gpus:
        run.add_row({"check": "memory", "figure": "", "verdict": "skipped",
                     "why": "no CUDA GPU (the projection rows give the process's peak RSS)", "data": {}})

    share = next((row["data"]["recommend"] for row in run.rows if row["check"] == "sharing: two runs per GPU"), False)
    failed = sum(row["verdict"] == "fail" for row in run.rows)
    run.say(f"\nThe compile cache, kept for your runs (TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR): {cache}")
    run.say(f"{time.time() - started:.0f} s in all. " + (f"{failed} check(s) failed." if failed else "Every check passed."))
    run.say("Recommended command for the table's runs (WRN-28-10, the paper's model) on this machine, with the "
            "fastest setting that passed (--amp and --tf32 change the numerics, see docs/speed.md):")
    for line in recommended_command({folder: chosen.get(folder, "fp32") for folder in FOLDERS}, device, gpu_ids,
                                    2 if share and device == "cuda" else 1):
        run.say(f"  {line}")
    if (depth, width) != (28, 10):
        run.say(f"The speeds above were measured on {model_words}, not on the table's WRN-28-10 pairs"
                + (" (--quick)" if opt.quick else "") + ": its settings may rank otherwise there.")
    return 1 if failed else 0


def sweep_row(run, gpus, model_words):
    """projection_summary of the rows so far: what a compiled run adds is the rest-of-a-run row's
    compiles and testing, plus the full batch's compile timed by the numerics check."""
    rest = {}
    for folder in FOLDERS:
        extra = [row["data"] for row in run.rows if row["check"] == f"projection {folder}/: the rest of a run"
                 and row["verdict"] == "pass"]
        setting = next((data["setting"] for data in run.data(f"speed {folder}/")
                        if data["setting"] == run.chosen.get(folder)), None)
        first = next((data["first_seconds"] for data in run.data(f"numerics {folder}/ ") if data["setting"] == setting), 0)
        if extra:
            rest[folder] = extra[0]["test_minutes"] + (extra[0]["seconds"] + first) / 60
    return projection_summary(run.data("projection "), rest, max(len(gpus), 1), device_words(gpus), model_words)


def device_words(gpus):
    return f"{len(gpus)} x {gpus[0]['name']}" if gpus else "this CPU"


if __name__ == "__main__":
    sys.exit(main())
