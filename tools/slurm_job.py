"""What a SLURM job of `tools/sweep.py --slurm` runs: one main.py run, stopped cleanly and requeued
when SLURM signals the job before killing it (preemption or the time limit).

submitit runs a TrainingRun object in the job. It starts main.py (or torchrun over the job's GPUs)
as a child process, with --resume when the run folder holds a checkpoint, its output appended to
SAVE/stdout.txt. SLURM sends its warning signal (USR2, --signal) to submitit's process (on some
clusters to every process of the job as well: main.py stops on it as on SIGTERM, and torchrun
passes it on to its ranks): submitit calls checkpoint(), which passes SIGTERM on to the child's
process group (main.py, or torchrun and every rank), waits until main.py has written its checkpoint
and exited (exit code 143), and returns a new TrainingRun: submitit then requeues the job, and the
requeued job resumes the run. A run longer than the time limit thus ends across several jobs with
the weights of one uninterrupted run. A signal that main.py cannot handle yet (in the moment before
its first line runs) kills it: the job is requeued all the same, and the run starts over or resumes
its checkpoint. Only a main.py that failed with an error (exit 1 or 2) ends the job as failed.

Only the standard library here (and submitit inside checkpoint()): the object is pickled with
this module's code, so the job does not need tools/ on its Python path.
"""
import os
import shlex
import signal
import subprocess
import time

CHECKPOINT = "checkpoint.pt"
OUTPUT_NAME = "stdout.txt"  # as the local sweep: summarize and the sweep's --status read it there
SIGTERM_EXIT = 128 + signal.SIGTERM  # main.py's exit code after writing its checkpoint on SIGTERM


class TrainingRun:
    """One main.py run as a submitit job (callable, with submitit's checkpoint() protocol).

    command: main.py's command line ([python, main.py, --save SAVE, ...]) without --resume and
        --gpu_id, relative to `cwd`; save: the run folder (relative to `cwd`); gpus: the job's GPUs
        (0: the CPU, 1: one process, G > 1: torchrun with G processes); stop_grace_s: SLURM's signal
        delay, the seconds torchrun gives its ranks to write the checkpoint after SIGTERM, and that
        the job waits for SLURM's USR2 after a SIGTERM stopped main.py directly."""

    def __init__(self, command, save, cwd, gpus, stop_grace_s):
        self.command, self.save, self.cwd, self.gpus, self.stop_grace_s = command, save, cwd, gpus, stop_grace_s
        self.process = None

    def __getstate__(self):  # the running child stays with this job; the pickle holds the run
        return {**self.__dict__, "process": None}

    def path(self, name):
        return os.path.join(self.cwd, self.save, name)

    def argv(self):
        """main.py's command line in this job: --resume when the folder holds a checkpoint, and the
        GPU SLURM gave the job (its CUDA_VISIBLE_DEVICES), or torchrun over all of them."""
        args = self.command[2:] + (["--resume"] if os.path.isfile(self.path(CHECKPOINT)) else [])
        if self.gpus > 1:  # each rank takes GPU LOCAL_RANK among the job's visible GPUs
            return [self.command[0], "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.gpus}", self.command[1], *args]
        gpu_id = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] if self.gpus else ""
        return [*self.command[:2], *args, "--gpu_id", gpu_id]

    def __call__(self):
        """Train (or continue) the run to its end; returns the run folder. Raises RuntimeError with
        main.py's last output line when it fails."""
        argv = self.argv()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(self.stop_grace_s),
               # Where SLURM signals every process of the job, torchrun gets its USR2 too: it passes it
               # on to the ranks instead of dying of it (torchrun's --signals_to_handle; a torchrun
               # without that option ignores the variable).
               "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"}
        os.makedirs(self.path(""), exist_ok=True)
        with open(self.path(OUTPUT_NAME), "a") as output:
            output.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} slurm job {job_id()}: {shlex.join(argv)}\n")
            output.flush()
            # A session of its own: a signal to its process group reaches torchrun's ranks too.
            self.process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, cwd=self.cwd, env=env,
                                            start_new_session=True)
        # poll() and sleep, not wait(): checkpoint() may run in this thread (a signal handler)
        # while this loop is suspended, and Popen.wait() holds a lock that it would wait for.
        while self.process.poll() is None:
            time.sleep(1)
        code = self.process.returncode
        if code == 0:
            return self.save
        if stopped_by_signal(code):
            # SLURM's signal reached main.py itself (preemption signals every process of the job; a
            # warning signal may come before main.py handles it); its USR2 to submitit, which
            # requeues, may follow within the signal delay.
            time.sleep(self.stop_grace_s)
        last = (last_lines(self.path(OUTPUT_NAME)) or ["no output"])[-1]
        raise RuntimeError(f"main.py exited with code {code}: {last} "
                           f"(output in {os.path.join(self.save, OUTPUT_NAME)})")

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on SLURM's warning signal: stop main.py (it saves a checkpoint),
        then return the submission that continues the run; None (no requeue) if it failed."""
        from submitit.helpers import DelayedSubmission

        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                # Wait for the exit without reaping it (WNOWAIT), so that poll() still sees it.
                os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT)
            except (ProcessLookupError, ChildProcessError):  # already exited and reaped
                pass
            code = self.process.poll()
            print(f"{self.save}: stopped main.py for the requeue (exit code {code})", flush=True)
            # Requeued unless main.py failed with an error (exit 1 or 2): the requeued job resumes
            # from the checkpoint, or starts the run over where there is none. torchrun exits 1
            # when its ranks stopped, with their checkpoint written.
            stopped_ranks = self.gpus > 1 and code == 1 and os.path.isfile(self.path(CHECKPOINT))
            if not (code == 0 or stopped_by_signal(code) or stopped_ranks):
                return None
        return DelayedSubmission(TrainingRun(self.command, self.save, self.cwd, self.gpus, self.stop_grace_s))


def stopped_by_signal(code):
    """Whether main.py's exit code says a signal stopped it: 143 after it wrote its checkpoint (or
    found nothing to save), or killed by the signal (negative) before it could handle it."""
    return code == SIGTERM_EXIT or code < 0


def job_id():
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID", "?")


def last_lines(path, count=1, pattern=None):
    """The last `count` different non-empty lines of a file (those matching `pattern`), or [] without
    any: of main.py's output, its error message is its last line."""
    try:
        with open(path, errors="replace") as output:
            lines = [line.rstrip() for line in output if line.strip() and (not pattern or pattern.search(line))]
    except OSError:
        return []
    return list(dict.fromkeys(lines))[-count:]  # submitit logs its error twice
