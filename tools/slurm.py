"""The sweep on a SLURM cluster (`tools/sweep.py --slurm`) and where each run stands (`--status`).

Each run of the sweep's plan becomes one SLURM job, submitted through submitit (an optional
package: pip install -r requirements-tools.txt) with its GPUs, CPUs, memory and time limit, its
output in the run folder (submitit's files in SAVE/slurm/, main.py's in SAVE/stdout.txt) and its
job id in SAVE/slurm_job.json. The job (slurm_job.TrainingRun) asks SLURM for USR2 --signal_delay
seconds before the time limit and for --requeue: on that signal main.py writes its checkpoint, and
submitit requeues the job, which resumes the run.

Submitting again is safe: finished runs are skipped, a run whose recorded job is still queued or
running (sacct, through submitit; squeue for a job sacct does not know) gets no second job, and a
run whose job failed, was cancelled or vanished is submitted again, resuming from its checkpoint.
"""
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import slurm_job
from common import ToolError, import_optional
from summarize import read_log

RECORD = "slurm_job.json"  # in the run folder: the job that trains it
SUBMITIT_FOLDER = "slurm"  # in the run folder: submitit's job files and logs
# submitit's executor: "slurm"; the tests run the same jobs through submitit's "local" executor.
CLUSTER = "slurm"
# How often a job may be requeued at its time limit: a 200-epoch run fits in many short jobs.
MAX_TIMEOUTS = 100
# SLURM job states (sacct, squeue) of a job that is not over.
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "CONFIGURING"}
RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}
# The lines of submitit's log (stdout and stderr of the job's step) that say why a job failed.
# Not a traceback's indented source lines: its last line says it.
REASON = re.compile(r"^\S.*(error|exception|killed|cancelled|time limit|not requeued|exit code|out of memory|oom)",
                    re.IGNORECASE)
# SLURM may send --signal's warning up to this many seconds earlier than asked (sbatch's manual).
SIGNAL_RESOLUTION = 60
_submitted = {}  # job id -> submitit job of this process (a local job's state needs its process)


# --- options -------------------------------------------------------------------------------------

# The options that describe the jobs (and --setup, --slurm_param): (default, metavar, least value of a
# number, help). Without --slurm, one of them away from its default is a mistake.
JOB_OPTIONS = {
    "--partition": (None, "P", None, "SLURM partition (default: the cluster's)"),
    "--account": (None, "A", None, "account charged for the jobs"),
    "--qos": (None, "Q", None, "quality of service"),
    "--constraint": (None, "C", None, "node features, e.g. a100"),
    "--time": (1440, "MIN", 1, "time limit of each job in minutes; a longer run is requeued"),
    "--mem_gb": (32, "G", 1, "memory of each job"),
    "--cpus_per_run": (8, "N", 1, "CPUs of each job"),
    "--gpus_per_run": (1, "G", 0, "GPUs of each job; G > 1 trains under torchrun across them, 0 on the CPU"),
    "--signal_delay": (120, "S", 1, "seconds between SLURM's warning signal and the end of the job, to write the "
                                    "checkpoint"),
}


def add_options(parser):
    """The --slurm options of sweep.py's parser."""
    group = parser.add_argument_group(
        "SLURM (--slurm: one job per run through submitit; pip install -r requirements-tools.txt)")
    group.add_argument("--slurm", action="store_true", help="submit each run as a SLURM job instead of running it here")
    group.add_argument("--status", action="store_true",
                       help="one line per run: finished, running, queued, failed, stopped or not started; exit "
                            "code 0 only when all finished")
    for flag, (default, metavar, least, text) in JOB_OPTIONS.items():
        group.add_argument(flag, default=default, type=None if least is None else int, metavar=metavar,
                           help=text + ("" if default is None else f" (default: {default})"))
    group.add_argument("--setup", action="append", default=[], metavar="LINE",
                       help="a shell line run in the job before training, e.g. 'module load cuda'; repeatable")
    group.add_argument("--slurm_param", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --slurm_param exclude=node12 mail-type=END")


def check_options(opt):
    if not (opt.slurm or opt.status):
        given = [flag for flag, (default, *_) in JOB_OPTIONS.items() if getattr(opt, flag[2:]) != default]
        given += [flag for flag in ("--setup", "--slurm_param") if getattr(opt, flag[2:])]
        if given:
            raise ToolError(f"{given[0]} describes the SLURM jobs of --slurm; add --slurm, or drop {given[0]} "
                            f"to run the sweep on this machine")
    for flag, (_, _, least, _) in JOB_OPTIONS.items():
        if least is not None and getattr(opt, flag[2:]) < least:
            raise ToolError(f"{flag} must be at least {least}, got {getattr(opt, flag[2:])}")
    if opt.signal_delay + SIGNAL_RESOLUTION >= 60 * opt.time:
        raise ToolError(f"--signal_delay {opt.signal_delay} s plus the {SIGNAL_RESOLUTION} s SLURM may send the "
                        f"signal early leave no time to train in --time {opt.time} min; use --time "
                        f"{(opt.signal_delay + SIGNAL_RESOLUTION) // 60 + 1} or more, or a shorter --signal_delay")
    for param in opt.slurm_param:
        key, equals, _ = param.partition("=")
        if not equals or not key or key.startswith("-"):
            raise ToolError(f"--slurm_param takes KEY=VALUE (an sbatch option without its dashes, e.g. "
                            f"exclude=node12), got {param!r}")


# --- where each run stands -----------------------------------------------------------------------

def read_record(save):
    """The job recorded in SAVE/slurm_job.json, or None."""
    try:
        with open(os.path.join(save, RECORD)) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def job_states(records):
    """{run folder: SLURM state of its recorded job}: one sacct call through submitit for all;
    squeue for a job sacct does not know (no accounting, or not yet recorded); UNKNOWN for a job
    that neither knows (it vanished)."""
    if not records:
        return {}
    submitit = import_optional("submitit", "sweep.py --slurm")
    submitit.SlurmJob.watcher.clear()  # states of an earlier question in this process are old
    jobs = {}
    for save, record in records.items():
        if record["cluster"] == "local":
            jobs[save] = _submitted.get(record["job_id"]) or submitit.LocalJob(record["folder"], record["job_id"])
        else:
            jobs[save] = submitit.SlurmJob(record["folder"], record["job_id"])
    if any(record["cluster"] != "local" for record in records.values()):
        submitit.SlurmJob.watcher.update()
    states = {}
    for save, job in jobs.items():
        if records[save]["cluster"] == "local":
            states[save] = job.state
        else:
            state = job.watcher.get_state(job.job_id, mode="cache")
            states[save] = squeue_state(job.job_id) if state == "UNKNOWN" else state
    return {save: state.split()[0].upper() for save, state in states.items()}  # "CANCELLED by 42"


def squeue_state(job_id):
    try:
        result = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ToolError(f"cannot ask SLURM about job {job_id} (sacct does not know it, squeue failed: {error}); "
                        f"run this on a node where sacct or squeue works") from None
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else "UNKNOWN"


def standing(job, record, state):
    """(word, details, lines of output) of a run: finished, running, queued, failed, blocked,
    stopped (a checkpoint, no job) or not started."""
    if job.action == "skip":
        return "finished", progress(job.save), []
    if job.action == "blocked":
        return "blocked", job.reason, []
    if record is None:
        if job.action == "resume":
            return "stopped", f"{progress(job.save) or 'in epoch 1'}; no job: --slurm resumes it", []
        return "not started", "", []
    if state in QUEUED:
        return "queued", f"job {record['job_id']}, {state}", []
    if state in RUNNING:
        return "running", f"job {record['job_id']}, {progress(job.save) or 'starting'}", []
    return "failed", f"job {record['job_id']}, {state}", failure_lines(job.save, record)


def progress(save):
    """'epoch e of E, test error a / b %' from the run's log, or ''."""
    try:
        last = read_log(os.path.join(save, "log.txt"))[-1]
    except ToolError:
        return ""
    return (f"epoch {last['epoch']} of {last['epochs']}, test error "
            f"{100 - last['test_acc_net1']:.2f} / {100 - last['test_acc_net2']:.2f} %")


def failure_lines(save, record):
    """Why a job failed, from every output it left, each file's name then its lines: the last lines
    of main.py's output (its error message is its last line), and the lines of submitit's log that
    report a failure (the traceback's last line, srun's and slurmstepd's errors, a cancellation, a
    time limit, a job submitit did not requeue)."""
    lines = []
    for path, count, pattern in ((os.path.join(save, slurm_job.OUTPUT_NAME), 3, None),
                                 *((os.path.join(record["folder"], f"{record['job_id']}_0_log.{suffix}"), 4, REASON)
                                   for suffix in ("out", "err"))):
        found = slurm_job.last_lines(path, count, pattern)
        if found:
            lines += [f"{os.path.join(save, os.path.relpath(path, save))}:", *(f"| {line}" for line in found)]
    return lines or ["no output: neither main.py nor submitit wrote anything"]


def status(jobs):
    """Print one line per run; returns 0 when every run finished, 1 otherwise."""
    records = {job.save: record for job in jobs if (record := read_record(job.save)) is not None}
    states = job_states({save: record for save, record in records.items()
                         if not any(job.save == save and job.action == "skip" for job in jobs)})
    words = []
    for job in jobs:
        word, details, lines = standing(job, records.get(job.save), states.get(job.save))
        words.append(word)
        print(f"{word:<12} {job.save}" + (f" ({details})" if details else ""))
        for line in lines:
            print(f"    {line}")
    counts = ", ".join(f"{words.count(word)} {word}" for word in
                       ("finished", "running", "queued", "failed", "blocked", "stopped", "not started") if word in words)
    print(f"# {len(jobs)} runs: {counts}")
    return 0 if all(word == "finished" for word in words) else 1


# --- submitting ----------------------------------------------------------------------------------

def parameters(opt, name):
    """submitit's executor parameters of one run's job (the generic ones, and slurm_*)."""
    slurm = {"partition": opt.partition, "account": opt.account, "qos": opt.qos, "constraint": opt.constraint,
             "gres": f"gpu:{opt.gpus_per_run}" if opt.gpus_per_run else None}
    extra = dict(param.split("=", 1) for param in opt.slurm_param)
    return {"name": name, "timeout_min": opt.time, "cpus_per_task": opt.cpus_per_run, "mem_gb": opt.mem_gb,
            "nodes": 1, "tasks_per_node": 1, "stderr_to_stdout": True,
            **{f"slurm_{key}": value for key, value in slurm.items() if value is not None},
            "slurm_setup": list(opt.setup), "slurm_signal_delay_s": opt.signal_delay,
            # --requeue: SLURM may requeue the job (submitit's `scontrol requeue`, or preemption).
            "slurm_additional_parameters": {"requeue": True, **extra}}


def submit(opt, job, main_command):
    """Submit one run's job; records and returns its id."""
    submitit = import_optional("submitit", "sweep.py --slurm")
    import cloudpickle  # submitit's pickler; the job gets slurm_job's code with the object

    cloudpickle.register_pickle_by_value(slurm_job)
    folder = os.path.abspath(os.path.join(job.save, SUBMITIT_FOLDER))
    executor = submitit.AutoExecutor(folder=folder, cluster=CLUSTER, **{f"{CLUSTER}_max_num_timeout": MAX_TIMEOUTS})
    executor.update_parameters(**parameters(opt, os.path.basename(job.save)))
    run = slurm_job.TrainingRun(main_command, job.save, os.getcwd(), opt.gpus_per_run, opt.signal_delay)
    with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal; the error carries it
        submitted = executor.submit(run)
    _submitted[submitted.job_id] = submitted
    record = {"job_id": submitted.job_id, "cluster": CLUSTER, "folder": folder,
              "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join(main_command)}
    with open(os.path.join(job.save, RECORD), "w") as file:
        json.dump(record, file, indent=1)
    return submitted.job_id


def first_missing(path):
    """The outermost folder of `path` that does not exist yet (what makedirs would create), or None."""
    missing, path = None, os.path.abspath(path)
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def resources(opt):
    """The job's request in words (what --dry_run and the submission print)."""
    gpus = f"{opt.gpus_per_run} GPU" + ("s, torchrun" if opt.gpus_per_run > 1 else "") if opt.gpus_per_run else "no GPU"
    words = [gpus, f"{opt.cpus_per_run} CPU" + "s" * (opt.cpus_per_run > 1), f"{opt.mem_gb} GB", f"{opt.time} min"]
    words += [f"{key} {value}" for key, value in (("partition", opt.partition), ("account", opt.account),
                                                   ("qos", opt.qos), ("constraint", opt.constraint)) if value]
    words += [f"sbatch --{param}" for param in opt.slurm_param]
    words.append(f"USR2 {opt.signal_delay} s before the end, then checkpoint and requeue")
    return ", ".join(words)


def main(opt, jobs, command):
    """--slurm and --status: `jobs` is the sweep's plan, `command(job)` a run's main.py command."""
    if opt.status:
        return status(jobs)
    submitit = import_optional("submitit", "sweep.py --slurm")
    records = {job.save: record for job in jobs if job.action in ("start", "resume")
               and (record := read_record(job.save)) is not None}
    states = job_states(records)
    active = {save for save, state in states.items() if state in QUEUED | RUNNING}
    to_submit = [job for job in jobs if job.action in ("start", "resume") and job.save not in active]
    blocked = [job for job in jobs if job.action == "blocked"]
    print(f"# {len(jobs)} runs: {len(to_submit)} to submit ({sum(job.action == 'resume' for job in to_submit)} "
          f"resume their checkpoint), {len(active)} queued or running (not submitted again), "
          f"{sum(job.action == 'skip' for job in jobs)} finished (skipped), {len(blocked)} blocked; one SLURM job "
          f"per run: {resources(opt)}; output in SAVE/{slurm_job.OUTPUT_NAME}")
    for line in opt.setup:
        print(f"# setup: {line}")
    for job in jobs:
        if job.save in active:
            print(f"# {states[job.save].lower()}: {job.save} (job {records[job.save]['job_id']})")
        elif job.action in ("skip", "blocked"):
            print(f"# {'skipped' if job.action == 'skip' else 'BLOCKED'}: {job.save} ({job.reason})")
        elif opt.dry_run:
            print(shlex.join(command(job)))
    if opt.dry_run:
        return 1 if blocked else 0
    for done, job in enumerate(to_submit):
        created = first_missing(os.path.join(job.save, SUBMITIT_FOLDER))
        os.makedirs(job.save, exist_ok=True)
        try:
            # The job adds --resume itself when it finds a checkpoint (also after a requeue).
            job_id = submit(opt, job, command(replace(job, action="start")))
        except (submitit.core.utils.FailedJobError, OSError) as error:
            if created:  # what this submission wrote
                shutil.rmtree(created, ignore_errors=True)
            reason = (str(error).strip().splitlines() or ["no message"])[-1]
            print(f"error: SLURM refused the job of {job.save}: {reason}; {done} of {len(to_submit)} jobs were "
                  f"submitted, the same command submits the others once the options are fixed", file=sys.stderr)
            return 2
        print(f"submitted job {job_id}: {job.action} {job.save}", flush=True)
    print(f"sweep: {len(to_submit)} jobs submitted; `python tools/sweep.py --status` with the same options "
          f"shows where each run stands")
    return 1 if blocked else 0
