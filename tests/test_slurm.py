"""Tests of `tools/sweep.py --slurm` and `--status` (tools/slurm.py, tools/slurm_job.py).

There is no SLURM here. The jobs themselves run through submitit's local executor: the same
TrainingRun object, the same signal handling and requeue protocol (USR2 -> checkpoint() -> the job
is started again), on tiny CPU runs. The SLURM submission runs against stand-in sbatch, srun, sacct,
squeue, scancel and scontrol executables that record what they were asked and answer job states
the test chooses.
"""
import contextlib
import importlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_log, write_cifar100

submitit = pytest.importorskip("submitit")


def import_tools():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return [importlib.import_module(name) for name in ("sweep", "slurm", "slurm_job")]
    finally:
        sys.path.remove(str(ROOT / "tools"))


sweep, slurm, slurm_job = import_tools()

TINY = ["--depth", "10", "--width", "1", "--epochs", "2", "--batch_size", "16", "--nthread", "1", "--deterministic"]
TINY_SUFFIX = "_batch_size-16_epochs-2"
WAIT_SECONDS = 240  # for tiny runs on 2 shared cores; the usual is well under a minute


def call(*args):
    """(exit code, stdout, stderr) of sweep.main(args) run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sweep.main([str(arg) for arg in args])
    return code, out.getvalue(), err.getvalue()


def wait_until_finished(args):
    """Poll --status until every run finished; returns its last output."""
    deadline = time.time() + WAIT_SECONDS
    while time.time() < deadline:
        code, out, _ = call(*args, "--status")
        if code == 0:
            return out
        assert "failed" not in out, out
        time.sleep(0.5)
    raise AssertionError(f"the runs did not finish in {WAIT_SECONDS} s:\n{out}")


# --- the jobs, through submitit's local executor ------------------------------------------------

@pytest.fixture(scope="module")
def local_cluster():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(slurm, "CLUSTER", "local")
        yield


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    # 256 training images: 16 steps per epoch, time for a signal to land inside an epoch.
    return write_cifar100(tmp_path_factory.mktemp("cifar"), 256, 40, num_classes=10)


def run_args(logdir, cifar, seeds):
    return ["--slurm", "--gpus_per_run", 0, "--cpus_per_run", 1, "--folders", "wrn", "--methods", "ind",
            "--seeds", *seeds, "--logdir", logdir, *TINY, "--dataroot", cifar]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, cifar, local_cluster):
    """Two runs submitted as jobs, waited for to the end."""
    logdir = tmp_path_factory.mktemp("local") / "logs"
    args = run_args(logdir, cifar, [1, 2])
    code, out, err = call(*args)
    assert code == 0, out + err
    saves = {seed: logdir / f"wrn-10-1_wrn-10-1_ind_seed{seed}{TINY_SUFFIX}" for seed in (1, 2)}
    return dict(args=args, submit_out=out, status_out=wait_until_finished(args), saves=saves)


def test_local_jobs_train_every_run_to_the_end_in_its_folder(local_sweep):
    assert local_sweep["submit_out"].count("submitted job ") == 2
    for save in local_sweep["saves"].values():
        assert [record["epoch"] for record in read_log(save)] == [1, 2]
        assert (save / "net1.pt").is_file() and (save / "net2.pt").is_file()
        record = json.loads((save / slurm.RECORD).read_text())
        assert record["cluster"] == "local" and f"slurm job {record['job_id']}" in (save / "stdout.txt").read_text()
    assert local_sweep["status_out"].count("finished ") == 2 and "# 2 runs: 2 finished" in local_sweep["status_out"]


def test_local_sweep_again_submits_nothing(local_sweep):
    before = {save: (save / slurm.RECORD).read_text() for save in local_sweep["saves"].values()}
    code, out, _ = call(*local_sweep["args"])
    assert code == 0
    assert "submitted job" not in out and out.count("# skipped: ") == 2
    assert {save: (save / slurm.RECORD).read_text() for save in before} == before


def job_process(controller_pid):
    """The pid of the process submitit's local controller runs the job in (its child)."""
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and f"\nPPid:\t{controller_pid}\n" in status:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="finds the job's process in /proc (Linux)")
def test_preempted_job_is_requeued_and_ends_with_the_uninterrupted_weights(local_sweep, tmp_path, cifar):
    args = run_args(tmp_path / "logs", cifar, [1])
    code, out, err = call(*args)
    assert code == 0, out + err
    save = tmp_path / "logs" / local_sweep["saves"][1].name
    # Preempt it in its first epoch: SLURM's USR2 goes to the job's process (submitit's), not to main.py.
    deadline = time.time() + WAIT_SECONDS
    while "from epoch 1 step 0" not in ((save / "stdout.txt").read_text() if (save / "stdout.txt").exists() else ""):
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.05)
    controller = int(json.loads((save / slurm.RECORD).read_text())["job_id"])
    os.kill(job_process(controller), signal.SIGUSR2)
    wait_until_finished(args)

    output = (save / "stdout.txt").read_text()
    assert "stopped by SIGTERM" in output, output
    starts = [line for line in output.splitlines() if line.startswith("# ") and " slurm job " in line]
    assert len(starts) == 2 and not starts[0].endswith("--resume") and "--resume" in starts[1], starts
    assert "requeue" in "".join(path.read_text() for path in (save / "slurm").glob("*_log.out")).lower()
    reference = local_sweep["saves"][1]
    for name in ("net1.pt", "net2.pt"):
        assert (save / name).read_bytes() == (reference / name).read_bytes(), name
    assert [r["test_acc_net1"] for r in read_log(save)] == [r["test_acc_net1"] for r in read_log(reference)]
