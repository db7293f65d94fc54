"""The sweep on a real SLURM (`tests_slurm/run.sh` brings one up with .ci/slurm/setup.sh).

Each scenario submits one tiny CPU run (WRN-10-1 pair, synthetic data, one CPU, --deterministic),
interrupts it the way a cluster does, and checks that it ends with net1.pt and net2.pt byte-identical
to the uninterrupted run of the local sweep. The scenarios run at the same time (SLURM's own waits
dominate: a requeued job waits for its credential to expire, 30 s here); the node-down scenario
alone runs last, as it takes the node from every job. Each prints its wall time.

On a real cluster (sinfo answers, no .ci/slurm cluster here): SLURM_TIER_DIR names a folder every
node sees; the byte-for-byte comparison with the reference trained here assumes nodes that compute
as this machine does (the same CPU type); the node-down scenario is skipped.
"""
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if not shutil.which("sinfo") or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
    pytest.skip("THE REAL-SLURM TIER IS SKIPPED: no SLURM answers here (sinfo failed); tests_slurm/run.sh starts "
                "one (root on Debian), or run it on a cluster", allow_module_level=True)

LOCAL_CLUSTER = "/run/slurm-local/slurmctld.pid"  # written by .ci/slurm/setup.sh
TINY = ["--depth", "10", "--width", "1", "--dataset", "synthetic", "--subset", "512", "--batch_size", "16",
        "--nthread", "1", "--deterministic"]
EPOCHS = 4  # time for an interruption after epoch 1, in an epoch that is not the last
LONG_EPOCHS = 24  # longer than one job of --time 2 (the time-limit scenario) even on an idle CPU
SCENARIO_SECONDS = 1200  # the longest a scenario may take on the 2 shared cores
DOCS_SEED = 3  # docs/slurm.md's job script is submitted with SEED=3
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED", "UNKNOWN"}
TIMES = {}  # scenario -> wall seconds


def sweep(*args):
    """(exit code, stdout + stderr) of tools/sweep.py ARGS run from the repository's top folder."""
    result = subprocess.run([sys.executable, "tools/sweep.py", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True)
    return result.returncode, result.stdout + result.stderr


def slurm(*command):
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True)
    assert result.returncode == 0, f"{shlex.join(map(str, command))}: {result.stdout}{result.stderr}"
    return result.stdout


def job_state(job_id):
    """The job's state (squeue, else sacct), e.g. RUNNING, PENDING, COMPLETED, CANCELLED."""
    states = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not states:
        states = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "state"], capture_output=True,
                                text=True).stdout.split()
    return states[0] if states else "UNKNOWN"


def wait_for(condition, what, seconds=SCENARIO_SECONDS):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"waited {seconds} s for {what}"
        time.sleep(1)


def text(path):
    return path.read_text(errors="replace") if path.exists() else ""


def epochs_logged(save):
    return text(save / "log.txt").count("json_stats:")


def job_starts(save):
    """main.py's command lines in the run's output: one per job start."""
    return [line for line in text(save / "stdout.txt").splitlines() if re.match(r"# .* slurm job \d+: ", line)]


def assert_same_weights(save, reference, details=""):
    for name in ("net1.pt", "net2.pt"):
        assert (save / name).is_file(), f"{save} has no {name}\n{details}{text(save / 'stdout.txt')}"
        assert (save / name).read_bytes() == (reference / name).read_bytes(), f"{save / name} differs from {reference}"


class Run:
    """One run of the sweep submitted to SLURM, in a --logdir of its own."""

    def __init__(self, base, name, epochs=EPOCHS, minutes=10, signal_delay=30):
        self.logdir = base / name
        self.args = ["--folders", "wrn", "--methods", "ind", "--seeds", 1, "--logdir", self.logdir, *TINY,
                     "--epochs", epochs, "--gpus_per_run", 0, "--cpus_per_run", 1, "--mem_gb", 1,
                     "--time", minutes, "--signal_delay", signal_delay]

    def submit(self):
        code, out = sweep("--slurm", *self.args)
        assert code == 0 and "submitted job" in out, out
        return out

    @property
    def save(self):
        saves = [path for path in self.logdir.iterdir() if path.is_dir()]
        assert len(saves) == 1, saves
        return saves[0]

    @property
    def job_id(self):
        return json.loads((self.save / "slurm_job.json").read_text())["job_id"]

    def status(self):
        return sweep("--status", *self.args)

    def wait_until_trained(self, epochs=1):
        wait_for(lambda: epochs_logged(self.save) >= epochs, f"{epochs} epochs of {self.save}")

    def wait_until_finished(self):
        """Until net2.pt is written and the job has ended (cheap checks: --status imports PyTorch), then
        --status must say finished."""
        def finished():
            state = job_state(self.job_id)
            assert state not in FAILED, f"job {self.job_id} {state}\n{self.details()}{text(self.save / 'stdout.txt')}"
            return (self.save / "net2.pt").exists() and state not in ACTIVE
        wait_for(finished, f"{self.save} to finish")
        code, out = self.status()
        assert code == 0 and out.startswith("finished "), out

    def details(self):
        logs = "".join(text(path) for path in (self.save / "slurm").glob("*_log.*"))
        return f"--status:\n{self.status()[1]}\nsubmitit's log:\n{logs}\nstdout.txt:\n"


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """Where the runs go: SLURM_TIER_DIR on a real cluster (a folder every node sees), else a temporary one."""
    if os.environ.get("SLURM_TIER_DIR"):
        return Path(tempfile.mkdtemp(prefix="slurm_tier_", dir=os.environ["SLURM_TIER_DIR"]))
    return tmp_path_factory.mktemp("slurm_tier")


@pytest.fixture(scope="session")
def pool():
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as executor:
        yield executor
    print("\nscenario wall times (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in TIMES.items()))


def timed(name, function, *args):
    def scenario():
        start = time.time()
        try:
            return function(*args)
        finally:
            TIMES[name] = time.time() - start
    return scenario


@pytest.fixture(scope="session")
def references(base, pool):
    """references(epochs, seed=1): the future run folder of the uninterrupted run, trained once by the
    local sweep (no SLURM), started by the first scenario that asks."""
    futures, lock = {}, threading.Lock()

    def local(epochs, seed):
        logdir = base / f"reference_{epochs}_{seed}"
        code, out = sweep("--folders", "wrn", "--methods", "ind", "--seeds", seed, "--logdir", logdir, *TINY,
                          "--epochs", epochs, "--gpus", "")
        assert code == 0, out
        return next(path for path in logdir.iterdir() if path.is_dir())

    def reference(epochs, seed=1):
        with lock:
            if (epochs, seed) not in futures:
                futures[epochs, seed] = pool.submit(local, epochs, seed)
            return futures[epochs, seed]
    return reference


# --- the scenarios --------------------------------------------------------------------------------

def submit_status_resubmit(base, references):
    # The long run: time for --status and a second submission while it runs.
    reference = references(LONG_EPOCHS)
    run = Run(base, "submit", epochs=LONG_EPOCHS)
    run.submit()
    code, status = run.status()
    assert code == 1 and re.search(r"^(queued|running) ", status, re.MULTILINE), status
    wait_for(lambda: epochs_logged(run.save) >= 1, "the first epoch")
    code, status = run.status()
    assert code == 1 and status.startswith(f"running      {run.save} (job {run.job_id}, epoch "), status
    code, out = sweep("--slurm", *run.args)  # while running: no second job
    assert code == 0 and "submitted job" not in out and "1 queued or running (not submitted again)" in out, out
    run.wait_until_finished()
    code, out = sweep("--slurm", *run.args)  # finished: skipped
    assert code == 0 and "submitted job" not in out and "# skipped: " in out, out
    assert len(job_starts(run.save)) == 1
    assert_same_weights(run.save, reference.result(), run.details())


def scontrol_requeue_mid_run(base, references):
    reference = references(EPOCHS)
    run = Run(base, "requeue")
    run.submit()
    run.wait_until_trained(1)
    slurm("scontrol", "requeue", run.job_id)
    run.wait_until_finished()
    starts = job_starts(run.save)
    assert len(starts) == 2 and starts[1].endswith("--gpu_id ''") and "--resume" in starts[1], run.details()
    assert_same_weights(run.save, reference.result(), run.details())


def time_limit(base, references):
    # USR2 arrives 30 to 90 s into each 2-minute job (SLURM's 60 s resolution): at any moment of the
    # run, its start included; each job trains for a while, is requeued, and the next resumes.
    reference = references(LONG_EPOCHS)
    run = Run(base, "time_limit", epochs=LONG_EPOCHS, minutes=2, signal_delay=30)
    run.submit()
    run.wait_until_finished()
    assert len(job_starts(run.save)) >= 2, run.details()
    assert_same_weights(run.save, reference.result(), run.details())


def usr2_at_job_start(base, references):
    # The warning as soon as main.py is started (it is still importing torch): it must not fail the job.
    reference = references(EPOCHS)
    run = Run(base, "usr2_start")
    run.submit()
    wait_for(lambda: (run.save / "stdout.txt").exists(), "main.py to start")
    slurm("scancel", "--signal=USR2", run.job_id)
    run.wait_until_finished()
    output = text(run.save / "stdout.txt")
    assert len(job_starts(run.save)) == 2 and "from epoch 1 step 0" in output, run.details()
    assert_same_weights(run.save, reference.result(), run.details())


def usr2_to_every_process_mid_run(base, references):
    # scancel --signal signals every process of the job's step (proctrack/linuxproc): submitit and main.py.
    reference = references(EPOCHS)
    run = Run(base, "usr2_mid_run")
    run.submit()
    run.wait_until_trained(1)
    slurm("scancel", "--signal=USR2", run.job_id)
    run.wait_until_finished()
    output = text(run.save / "stdout.txt")
    assert "SIGUSR2: finishing the current step" in output and len(job_starts(run.save)) == 2, run.details()
    assert_same_weights(run.save, reference.result(), run.details())


def scancel_then_resubmit(base, references):
    reference = references(EPOCHS)
    run = Run(base, "scancel")
    run.submit()
    run.wait_until_trained(1)
    cancelled = run.job_id
    slurm("scancel", cancelled)
    wait_for(lambda: job_state(cancelled).startswith("CANCELLED"), "the job to be cancelled")
    code, status = run.status()
    assert code == 1 and status.startswith("failed ") and f"job {cancelled}, CANCELLED" in status, status
    assert "stdout.txt:" in status, status  # why, from the run's output
    code, out = sweep("--slurm", *run.args)
    assert code == 0 and f"resume {run.save}" in out, out
    run.wait_until_finished()
    assert run.job_id != cancelled and "--resume" in job_starts(run.save)[-1], run.details()
    assert_same_weights(run.save, reference.result(), run.details())


def docs_job_script(base, references):
    """The hand-written job script of docs/slurm.md, as given, with tiny options; stopped mid-run by the
    TERM its --signal=B:TERM@120 sends before the time limit, it requeues itself and resumes."""
    docs = (ROOT / "docs" / "slurm.md").read_text()
    script = re.search(r"```bash\n(#!/bin/bash\n# sbatch .*?)```", docs, re.DOTALL).group(1)
    command = re.search(r"^# (sbatch [^:]*):", script, re.MULTILINE).group(1).split()
    script = script.replace("--gres=gpu:1 ", "").replace("--depth 28 --width 10 --dataroot DATA",
                                                         shlex.join([*TINY, "--epochs", str(EPOCHS), "--method", "ind"]))
    folder = base / "docs_script"
    folder.mkdir()
    (folder / "wrn").symlink_to(ROOT / "wrn")
    (folder / command[-1]).write_text(script)
    # sbatch is called from an environment whose python (as an activated virtual environment's) the
    # job must run, not the one of a login shell; this one leaves a mark when it runs.
    environment = folder / "environment" / "bin"
    environment.mkdir(parents=True)
    (environment / "python").write_text(f'#!/bin/sh\ntouch "$(dirname "$0")/ran"\nexec {sys.executable} "$@"\n')
    (environment / "python").chmod(0o755)
    submitted = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                               env={**os.environ, "PATH": f"{environment}{os.pathsep}{os.environ['PATH']}"})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"\d+", submitted.stdout).group()
    seed = int(re.search(r"SEED=(\d+)", " ".join(command)).group(1))
    reference = references(EPOCHS, seed)
    save = folder / "logs" / f"seed{seed}"
    output = folder / f"slurm-{job_id}.out"
    wait_for(lambda: epochs_logged(save) >= 1 or job_state(job_id) in FAILED | {"COMPLETED"},
             "the job script's first epoch")
    assert epochs_logged(save) >= 1 and not (save / "net2.pt").exists(), f"job {job_id}: {job_state(job_id)}\n{text(output)}"
    assert (environment / "ran").exists(), f"the job did not run the python of sbatch's environment:\n{text(output)}"
    slurm("scancel", "--batch", "--signal=TERM", job_id)  # what --signal=B:TERM@120 does
    wait_for(lambda: (save / "net2.pt").exists() or job_state(job_id) in FAILED, "the job script's run to end")
    wait_for(lambda: job_state(job_id) not in ("PENDING", "RUNNING", "COMPLETING"), "the job to end")
    assert job_state(job_id) == "COMPLETED", f"job {job_id}: {job_state(job_id)}\n{text(output)}"
    assert "stopped by SIGTERM" in text(output) and text(output).count("from epoch") == 2, text(output)
    assert_same_weights(save, reference.result(), text(output))


CONCURRENT = {"submit_status_resubmit": submit_status_resubmit, "scontrol_requeue": scontrol_requeue_mid_run,
              "time_limit": time_limit, "usr2_at_job_start": usr2_at_job_start,
              "usr2_to_every_process": usr2_to_every_process_mid_run, "scancel_then_resubmit": scancel_then_resubmit,
              "docs_job_script": docs_job_script}


@pytest.fixture(scope="session")
def scenarios(request, base, references, pool):
    """The selected scenarios (-k), started at once."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if hasattr(item, "callspec") and "name" in item.callspec.params}
    return {name: pool.submit(timed(name, function, base, references)) for name, function in CONCURRENT.items()
            if name in selected}


@pytest.mark.parametrize("name", list(CONCURRENT))
def test_scenario(scenarios, name):
    scenarios[name].result()
    print(f"\n{name}: {TIMES[name]:.0f} s", end="")


def node_down(base, references):
    reference = references(EPOCHS)
    run = Run(base, "node_down")
    run.submit()
    run.wait_until_trained(1)
    job_id, node = run.job_id, slurm("squeue", "-h", "-j", run.job_id, "-o", "%N").strip()
    slurm("scontrol", "update", f"nodename={node}", "state=down", "reason=tests_slurm node down")
    wait_for(lambda: job_state(job_id) != "RUNNING", "SLURM to take the job off the down node")
    slurm("scontrol", "update", f"nodename={node}", "state=resume")
    run.wait_until_finished()
    assert len(job_starts(run.save)) == 2, run.details()
    assert_same_weights(run.save, reference.result(), run.details())


@pytest.mark.skipif(not Path(LOCAL_CLUSTER).exists(), reason="sets a node down: only on .ci/slurm's own cluster")
def test_node_down_last_alone(scenarios, references, base):
    concurrent.futures.wait(scenarios.values())  # it takes the node from every job
    timed("node_down", node_down, base, references)()
    print(f"\nnode_down: {TIMES['node_down']:.0f} s", end="")
