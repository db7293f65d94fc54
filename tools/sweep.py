"""Launch the runs behind a table: folders x methods x seeds, each in its own --save folder.

    python tools/sweep.py --dry_run --dataroot DATA            # list the 30 runs of the paper's table
    python tools/sweep.py --gpus 0,1,2,3 --dataroot DATA       # run them, one at a time on each GPU
    python tools/sweep.py --folders wrn --methods ds dcm dcm-same dcm-cross dcm-final --gpus 0,1 \\
        --depth 16 --width 2 --dataroot DATA                   # the link ablation, on WRN-16-2
    python tools/sweep.py --folders wrn --methods ind dml --seeds 1 2 --gpus '' --jobs_per_gpu 2 \\
        --depth 10 --width 1 --epochs 2 --dataset synthetic --nthread 1   # a tiny sweep on the CPU
    python tools/sweep.py --slurm --partition gpu --time 720 --dataroot DATA   # one SLURM job per run (slurm.py)
    python tools/sweep.py --status --dataroot DATA             # where each run stands

Options the sweep does not know go to every main.py. A run's folder is LOGDIR/ + main.py's default
name, then NAME-VALUE for each passed option that changes what is trained and is not its default
(values read by main.py's parser, so one spelling: logs/wrn-16-1_wrn-16-1_dcm_seed1_epochs-30).
Every run's options pass main.py's checks before any starts. Finished runs are skipped, those with
a checkpoint.pt resumed, the others started, seed by seed, each on the next free slot of --gpus;
output in SAVE/stdout.txt. The exit code is 0 when every run finished, 1 otherwise; Ctrl-C stops
the runs and the same command resumes them. The whole story: docs/reproducing.md.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from unittest import mock

import slurm
import slurm_job
from common import (FOLDERS, METHODS, ROOT, ToolError, bookkeeping_options, load_folder, one_line_errors, option_value,
                    read_records)

# main.py's flags the sweep sets itself, and which of its own options to use instead.
RESERVED_FLAGS = {"--save": "--logdir", "--method": "--methods", "--links": "--methods (dcm-same, ...)",
                  "--seed": "--seeds", "--gpu_id": "--gpus", "--resume": "nothing (runs resume by themselves)",
                  "--benchmark": "main.py directly"}
# main.py's options that the run folder's name shows already (the others that do not change what is
# trained, common.bookkeeping_options, are not written after it either).
NAMED_OPTIONS = ("depth", "width", "method", "links")
POLL_SECONDS = 0.5


@dataclass
class Job:
    folder: str
    method: str
    seed: int
    save: str
    action: str  # "start", "resume", "skip" (finished) or "blocked"
    reason: str = ""  # why it is skipped or blocked

    @property
    def output(self):
        return os.path.join(self.save, slurm_job.OUTPUT_NAME)


# --- options -------------------------------------------------------------------------------------

def parse_options(argv=None):
    """(options, the flags passed to main.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--folders", nargs="+", default=list(FOLDERS), choices=FOLDERS,
                        help="the training folders, each a pair of networks (default: all)")
    parser.add_argument("--methods", nargs="+", default=["ind", "dml", "dcm"], choices=METHODS,
                        help="default: ind dml dcm (the paper's table); dcm-LINKS is dcm with --links LINKS")
    parser.add_argument("--seeds", nargs="+", default=[1, 2, 3, 4, 5], type=int)
    parser.add_argument("--logdir", default="logs", help="where the run folders go (default: ./logs)")
    parser.add_argument("--gpus", default=None, type=str,
                        help="comma-separated GPU ids that take runs in parallel; '' for the CPU (default: 0 where "
                             "PyTorch finds a GPU, else the CPU)")
    parser.add_argument("--jobs_per_gpu", default=1, type=int, help="runs at a time on each GPU (small models)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and what is skipped; run nothing")
    slurm.add_options(parser)
    opt, main_args = parser.parse_known_args(argv)
    check_options(opt, main_args)
    return opt, main_args


def check_options(opt, main_args):
    if opt.gpus is None:
        import torch  # slow to import: only when --gpus is not given

        opt.gpus = "0" if torch.cuda.is_available() else ""
    gpus = opt.gpus.split(",")
    if opt.gpus and not all(gpu.strip().isdigit() for gpu in gpus):
        raise ToolError(f"--gpus takes GPU ids like 0,1,2 (or '' for the CPU), got {opt.gpus!r}")
    if len(set(gpus)) != len(gpus):
        raise ToolError(f"--gpus names a GPU twice ({opt.gpus}); use --jobs_per_gpu for several runs per GPU")
    if opt.jobs_per_gpu <= 0:
        raise ToolError(f"--jobs_per_gpu must be positive, got {opt.jobs_per_gpu}")
    if len(set(opt.seeds)) != len(opt.seeds):
        raise ToolError(f"--seeds repeats a seed: {' '.join(map(str, opt.seeds))}")
    for flag in (arg.partition("=")[0] for arg in main_args):  # '--seed 3' or '--seed=3'
        if flag in RESERVED_FLAGS:
            raise ToolError(f"{flag} is set by the sweep for each run; use {RESERVED_FLAGS[flag]}")
    slurm.check_options(opt)
    if not opt.status:  # which only reads where each run stands, a failed one too
        check_runs(opt, main_args)


def check_runs(opt, main_args):
    """Refuse, before any run starts, the values main.py's own checks (options.check_options)
    would refuse in some run of the sweep: each method and seed with the flags passed to main.py,
    in as many processes as each run gets (torchrun over --gpus_per_run GPUs under --slurm)."""
    options = load_folder(FOLDERS[0]).options  # options.py is the same file in every folder
    processes = opt.gpus_per_run if opt.slurm and opt.gpus_per_run > 1 else 1
    # WORLD_SIZE: where main.py's checks read the process count from.
    with mock.patch.dict(os.environ, {"WORLD_SIZE": str(processes)}):
        for method in opt.methods:
            for seed in opt.seeds:
                try:
                    options.parse_options(run_flags(method, seed) + main_args)
                except options.UsageError as error:
                    flags = " ".join(run_flags(method, seed))
                    raise ToolError(f"main.py would refuse {flags} with the flags passed to it: {error}") from None


# --- the runs ------------------------------------------------------------------------------------

def main_option_values(main_args, folder=FOLDERS[0]):
    """({option: value}, {option: main.py's default}) of the flags passed to main.py, read by
    main.py's own parser: the values main.py will run with, whatever their spelling."""
    options = load_folder(folder).options
    parser = options.option_parser()
    try:
        values = vars(parser.parse_args(main_args))
        options.lr_drop_epochs(argparse.Namespace(**values))  # --epoch_step's JSON, checked as main.py checks it
        return values, vars(parser.parse_args([]))
    except options.UsageError as error:
        raise ToolError(f"main.py would refuse the flags passed to it: {error}") from None


def value_text(value):
    """One spelling of an option's value for a folder name: floats by repr, lists as 60-120-160,
    nothing but letters, digits, dots and dashes."""
    value = option_value(value)
    text = "-".join(map(value_text, value)) if isinstance(value, list) else repr(value) if isinstance(value, float) \
        else str(value)
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def run_name(folder, method, seed, main_args):
    """The folder's options.default_save_dir name, then NAME-VALUE (NAME for a flag without value)
    for every passed option that changes what is trained and whose value is not main.py's default."""
    values, defaults = main_option_values(run_flags(method, seed) + main_args, folder)
    name = os.path.basename(load_folder(folder).options.default_save_dir(argparse.Namespace(**values)))
    for option in sorted(set(values) - set(bookkeeping_options()) - set(NAMED_OPTIONS)):
        if option_value(values[option]) != option_value(defaults[option]):
            name += "_" + (option if values[option] is True else f"{option}-{value_text(values[option])}")
    return name


def plan(opt, main_args):
    """Every run of the sweep, seed by seed, and what to do with it."""
    jobs = []
    for seed in opt.seeds:
        for folder in opt.folders:
            for method in opt.methods:
                save = os.path.join(opt.logdir, run_name(folder, method, seed, main_args))
                jobs.append(Job(folder, method, seed, save, *state_of(save)))
    return jobs


def state_of(save):
    """(action, reason) for a run folder, by what main.py would accept there."""
    log, checkpoint = os.path.join(save, "log.txt"), os.path.join(save, "checkpoint.pt")
    if os.path.isfile(log):
        try:
            last = read_records(log)[-1]
        except ToolError as error:
            return "blocked", str(error)
        exported = all(os.path.isfile(os.path.join(save, f"net{k}.pt")) for k in (1, 2))
        if "epochs" in last and last.get("epoch") == last["epochs"] and exported:
            return "skip", f"finished: epoch {last['epoch']} of {last['epochs']}"
    if os.path.isfile(checkpoint):
        return "resume", ""
    if os.path.isfile(log):
        return "blocked", (f"{log} exists without {os.path.basename(checkpoint)}: main.py can neither resume it "
                           f"nor start over it; move the folder away")
    return "start", ""


def run_flags(method, seed):
    """main.py's flags of a method of the sweep (dcm-LINKS: --method dcm --links LINKS) and a seed."""
    name, _, links = method.partition("-")
    return ["--method", name, *(["--links", links] if links else []), "--seed", str(seed)]


def command(job, main_args):
    """The main.py command of a job, without --gpu_id (given by the slot that runs it)."""
    args = ["--save", job.save, *run_flags(job.method, job.seed), *main_args,
            *(["--resume"] if job.action == "resume" else [])]
    return [sys.executable, os.path.relpath(ROOT / job.folder / "main.py"), *args]


# --- running -------------------------------------------------------------------------------------

def launch(job, main_args, gpu):
    """Start a job on a slot, its output appended to SAVE/stdout.txt; returns the process."""
    os.makedirs(job.save, exist_ok=True)  # main.py accepts a folder holding only stdout.txt
    full_command = command(job, main_args) + ["--gpu_id", gpu]
    with open(job.output, "a") as output:
        output.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} sweep: {shlex.join(full_command)}\n")
        output.flush()
        return subprocess.Popen(full_command, stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_jobs(jobs, main_args, gpu_slots):
    """Run the jobs, each on the next free slot; returns the failed jobs with their reason."""
    pending, running, failed = list(jobs), {}, []  # running: slot index -> (job, process, start time)
    try:
        while pending or running:
            start_on_free_slots(pending, running, main_args, gpu_slots, len(jobs))
            time.sleep(POLL_SECONDS)
            failed += collect_finished(running)
    except KeyboardInterrupt:
        # Ctrl-C reached the runs too (same process group): each writes a checkpoint and exits.
        for _, process, _ in running.values():
            process.wait()
        print(f"\ninterrupted: stopped {len(running)} running and {len(pending)} waiting runs; "
              f"the same command resumes them", file=sys.stderr)
        raise
    return failed


def start_on_free_slots(pending, running, main_args, gpu_slots, total):
    for slot, gpu in enumerate(gpu_slots):
        if slot not in running and pending:
            job = pending.pop(0)
            running[slot] = job, launch(job, main_args, gpu), time.time()
            print(f"[{total - len(pending)}/{total}] {job.action} {job.save} on {f'GPU {gpu}' if gpu else 'the CPU'}",
                  flush=True)


def collect_finished(running):
    """Take the runs that ended out of `running`; returns the failed ones with their reason."""
    failed = []
    for slot, (job, process, started) in list(running.items()):
        if process.poll() is None:
            continue
        del running[slot]
        if process.returncode == 0:
            print(f"done {job.save} ({(time.time() - started) / 60:.1f} min)", flush=True)
        else:
            last = (slurm_job.last_lines(job.output) or ["no output"])[-1]
            reason = f"exit code {process.returncode}: {last}"
            failed.append((job, reason))
            print(f"FAILED {job.save} ({reason}); output in {job.output}", flush=True)
    return failed


def print_plan(jobs, main_args, gpu_slots):
    counts = {action: sum(job.action == action for job in jobs) for action in ("start", "resume", "skip", "blocked")}
    devices = ", ".join(sorted({f"GPU {gpu}" if gpu else "the CPU" for gpu in gpu_slots}))
    print(f"# {len(jobs)} runs: {counts['start']} to start, {counts['resume']} to resume, {counts['skip']} finished "
          f"(skipped), {counts['blocked']} blocked; {len(gpu_slots)} at a time on {devices}, output in "
          f"SAVE/{slurm_job.OUTPUT_NAME}")
    for job in jobs:
        if job.action in ("start", "resume"):
            print(shlex.join(command(job, main_args)))
        else:
            print(f"# {'skipped' if job.action == 'skip' else 'BLOCKED'}: {job.save} ({job.reason})")


@one_line_errors
def main(argv=None):
    opt, main_args = parse_options(argv)
    jobs = plan(opt, main_args)
    if opt.slurm or opt.status:
        return slurm.main(opt, jobs, lambda job: command(job, main_args))
    gpu_slots = [gpu.strip() for gpu in opt.gpus.split(",") for _ in range(opt.jobs_per_gpu)]  # '' is the CPU
    print_plan(jobs, main_args, gpu_slots)
    blocked = [(job, job.reason) for job in jobs if job.action == "blocked"]
    if opt.dry_run:
        return 1 if blocked else 0
    try:
        failed = blocked + run_jobs([job for job in jobs if job.action in ("start", "resume")], main_args, gpu_slots)
    except KeyboardInterrupt:
        return 130
    print(f"sweep: {len(jobs) - len(failed)} of {len(jobs)} runs finished"
          + (f", {len(failed)} failed:" if failed else ""))
    for job, reason in failed:
        print(f"  {job.save}: {reason}" + (f" (output in {job.output})" if os.path.isfile(job.output) else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
