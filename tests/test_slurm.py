"""Tests of `tools/sweep.py --slurm` and `--status` (tools/slurm.py, tools/slurm_job.py).

There is no SLURM here. The jobs themselves run through submitit's local executor: the same
TrainingRun object, the same signal handling and requeue protocol (USR2 -> checkpoint() -> the job
is started again), on tiny CPU runs. The SLURM submission runs against stand-in sbatch, srun, sacct,
squeue, scancel and scontrol executables that record what they were asked and answer job states
the test chooses.
"""
import contextlib
import gc
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
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
    # submitit's LocalJob cleans up in __del__, which fails once the interpreter is shutting down:
    # let the jobs of this module go while it still runs.
    slurm._submitted.clear()
    gc.collect()


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
@pytest.mark.parametrize("main_py_too", [False, True], ids=["job_signalled", "main_py_signalled_too"])
def test_preempted_job_is_requeued_and_ends_with_the_uninterrupted_weights(local_sweep, tmp_path, cifar, main_py_too):
    args = run_args(tmp_path / "logs", cifar, [1])
    code, out, err = call(*args)
    assert code == 0, out + err
    save = tmp_path / "logs" / local_sweep["saves"][1].name
    # Preempt it in its first epoch: SLURM's USR2 goes to the job's process (submitit's), and on some
    # clusters to main.py as well.
    deadline = time.time() + WAIT_SECONDS
    while "from epoch 1 step 0" not in ((save / "stdout.txt").read_text() if (save / "stdout.txt").exists() else ""):
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.05)
    controller = int(json.loads((save / slurm.RECORD).read_text())["job_id"])
    job = job_process(controller)
    if main_py_too:  # as SLURM does where it signals every process of the job (proctrack/linuxproc)
        os.kill(job_process(job), signal.SIGUSR2)
    os.kill(job, signal.SIGUSR2)
    wait_until_finished(args)

    output = (save / "stdout.txt").read_text()
    # The job's SIGTERM reaches main.py too, before or after main.py stopped on its own USR2.
    assert "stopped by SIGTERM" in output or main_py_too and "stopped by SIGUSR2" in output, output
    assert ("SIGUSR2: finishing the current step" in output) == main_py_too, output
    starts = [line for line in output.splitlines() if line.startswith("# ") and " slurm job " in line]
    assert len(starts) == 2 and not starts[0].endswith("--resume") and "--resume" in starts[1], starts
    assert "requeue" in "".join(path.read_text() for path in (save / "slurm").glob("*_log.out")).lower()
    reference = local_sweep["saves"][1]
    for name in ("net1.pt", "net2.pt"):
        assert (save / name).read_bytes() == (reference / name).read_bytes(), name
    assert [r["test_acc_net1"] for r in read_log(save)] == [r["test_acc_net1"] for r in read_log(reference)]


def torchrun_handles(option):
    from torch.distributed.run import get_args_parser
    return option in get_args_parser()._option_string_actions


@pytest.mark.skipif(not torchrun_handles("--signals_to_handle"), reason="this torchrun dies of USR2 (PyTorch 2.4)")
def test_a_torchrun_job_whose_every_process_gets_usr2_stops_with_a_checkpoint(tmp_path, cifar):
    # Where SLURM signals every process of the job, torchrun gets USR2 as well as its ranks: it
    # must let them finish the step and write the checkpoint, not die of it.
    command = [sys.executable, str(ROOT / "wrn" / "main.py"), "--save", "run", "--method", "ind", *TINY,
               "--dataroot", str(cifar)]
    run = slurm_job.TrainingRun(command, "run", str(tmp_path), 2, 60)
    failure = []
    job = threading.Thread(target=lambda: failure.append(pytest.raises(RuntimeError, run).value))
    job.start()
    output = tmp_path / "run" / "stdout.txt"
    deadline = time.time() + WAIT_SECONDS
    while "from epoch 1 step 0" not in (output.read_text() if output.exists() else ""):
        assert time.time() < deadline and job.is_alive(), output.read_text() if output.exists() else "no output"
        time.sleep(0.05)
    os.killpg(run.process.pid, signal.SIGUSR2)
    job.join(WAIT_SECONDS)
    assert run.process.returncode != -signal.SIGUSR2, output.read_text()  # torchrun did not die of it
    assert "stopped by SIGUSR2" in output.read_text() and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert "main.py exited with code 1" in str(failure[0])  # torchrun's code for stopped ranks


def loaded(pid, library):
    """Whether process `pid` has mapped a shared library whose name contains `library`."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches the import of torch in /proc (Linux)")
@pytest.mark.parametrize("folder", ["wrn", "wrn_mobi"])
def test_a_warning_signal_while_main_py_imports_torch_stops_it_cleanly(tmp_path, cifar, folder):
    # SLURM may send its warning up to 60 s early, at the job's start: main.py must not die of it
    # (the job would fail) but stop as it does on a stop signal, with nothing to save yet.
    save = tmp_path / "run"
    main_py = subprocess.Popen([sys.executable, str(ROOT / folder / "main.py"), "--save", str(save), "--method",
                                "ind", *TINY, "--dataroot", str(cifar)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + WAIT_SECONDS
    while not loaded(main_py.pid, "libtorch"):  # in `import torch`, long before the training loop
        assert main_py.poll() is None and time.time() < deadline, main_py.communicate()[0]
        time.sleep(0.01)
    main_py.send_signal(signal.SIGUSR2)
    output = main_py.communicate(timeout=WAIT_SECONDS)[0]
    assert main_py.returncode == 143, output
    assert "stopped by SIGUSR2 before training began; nothing new to save" in output, output
    assert not save.exists()  # nothing written: the same command starts it over


def stopped_run(tmp_path, child):
    """A TrainingRun whose main.py is the Python code `child`, started, then checkpoint()ed (as on
    SLURM's USR2 to the job): returns checkpoint()'s answer."""
    (tmp_path / "child.py").write_text(child)
    run = slurm_job.TrainingRun([sys.executable, "child.py", "--save", "run"], "run", str(tmp_path), 0, 1)
    run.process = subprocess.Popen([sys.executable, str(tmp_path / "child.py")], start_new_session=True)
    time.sleep(0.5)
    with contextlib.redirect_stdout(io.StringIO()):
        return run.checkpoint()


@pytest.mark.parametrize("child, requeued", [
    ("import os, signal\nos.kill(os.getpid(), signal.SIGUSR2)", True),  # killed before it handled signals
    ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\ntime.sleep(60)", True),
    ("import time\ntime.sleep(60)", True),  # killed by the job's SIGTERM
    ("import sys\nsys.exit(1)", False),  # failed with an error
    ("import sys\nsys.exit(2)", False),  # refused its options
], ids=["killed_by_usr2", "stopped_143", "killed_by_sigterm", "error_1", "usage_error_2"])
def test_a_job_is_requeued_when_a_signal_stopped_main_py_even_without_a_checkpoint(tmp_path, child, requeued):
    answer = stopped_run(tmp_path, child)
    assert (answer is not None) == requeued, answer
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # requeued, the run starts over


# --- the SLURM submission, against stand-in SLURM commands ----------------------------------------

FAKE_COMMANDS = {
    # Records its script, answers with the next job id; refuses the partition "nope".
    "sbatch": """if grep -q -- --partition=nope "${@: -1}"; then
    echo "sbatch: error: invalid partition specified: nope" >&2; exit 1
fi
n=$(( $(cat "$FAKE/next_id" 2>/dev/null || echo 100) + 1 )); echo $n > "$FAKE/next_id"
cp "${@: -1}" "$FAKE/script_$n.sh"
echo "Submitted batch job $n\"""",
    # Knows the jobs listed in $FAKE/sacct.txt ("ID STATE" lines).
    "sacct": """echo "JobID|State|NodeList"
while read -r id state; do echo "$id|$state|node1"; done < <(cat "$FAKE/sacct.txt" 2>/dev/null)""",
    # Knows the jobs listed in $FAKE/squeue.txt, refuses others as SLURM does.
    "squeue": """state=$(awk -v id="$3" '$1 == id {print $2}' "$FAKE/squeue.txt" 2>/dev/null)
[ -n "$state" ] || { echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }
echo "$state\"""",
    "srun": "", "scancel": "", "scontrol": "",
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Stand-in SLURM commands on PATH; each call is appended to calls.txt."""
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, body in FAKE_COMMANDS.items():
        (fake / name).write_text(f'#!/bin/bash\necho "{name} $*" >> "$FAKE/calls.txt"\n{body}\n')
        (fake / name).chmod(0o755)
    monkeypatch.setenv("FAKE", str(fake))
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "CLUSTER", "slurm")
    monkeypatch.chdir(tmp_path)

    def calls(command):
        path = fake / "calls.txt"
        return [line for line in (path.read_text().splitlines() if path.exists() else []) if line.startswith(command)]

    def set_states(sacct=(), squeue=()):
        (fake / "sacct.txt").write_text("".join(f"{job} {state}\n" for job, state in sacct))
        (fake / "squeue.txt").write_text("".join(f"{job} {state}\n" for job, state in squeue))

    return dict(dir=fake, calls=calls, set_states=set_states)


CLUSTER_ARGS = ["--slurm", "--folders", "wrn", "--methods", "ind", "dml", "--seeds", 1, "--logdir", "logs",
                "--partition", "gpu", "--time", 90, "--account", "lab", "--gpus_per_run", 2, "--cpus_per_run", 6,
                "--mem_gb", 48, "--setup", "module load cuda/12", "--setup", "source ~/venv/bin/activate",
                "--slurm_param", "exclude=node7", *TINY, "--sync_bn", "--dataroot", "DATA"]
CLUSTER_SUFFIX = "_batch_size-16_epochs-2_sync_bn"


def saves():
    return {method: Path("logs") / f"wrn-10-1_wrn-10-1_{method}_seed1{CLUSTER_SUFFIX}" for method in ("ind", "dml")}


def test_slurm_submission_asks_for_gpus_time_signal_requeue_and_runs_the_setup(fake_slurm):
    code, out, err = call(*CLUSTER_ARGS)
    assert code == 0, out + err
    assert len(fake_slurm["calls"]("sbatch")) == 2
    for job_id, (method, save) in zip((101, 102), saves().items()):
        record = json.loads((save / slurm.RECORD).read_text())
        assert record["job_id"] == str(job_id) and record["cluster"] == "slurm"
        assert f"submitted job {job_id}: start {save}" in out
        script = (fake_slurm["dir"] / f"script_{job_id}.sh").read_text()
        lines = script.splitlines()
        for flag in ("--gres=gpu:2", "--time=90", "--signal=USR2@120", "--requeue", "--partition=gpu",
                     "--account=lab", "--cpus-per-task=6", "--mem=48GB", "--exclude=node7", "--nodes=1",
                     f"--job-name={save.name}", f"--output={Path.cwd() / save / 'slurm' / '%j_0_log.out'}"):
            assert f"#SBATCH {flag}" in lines, (flag, script)
        assert lines.index("module load cuda/12") < lines.index("source ~/venv/bin/activate") < \
            next(index for index, line in enumerate(lines) if line.startswith("srun "))
        # What the job will run: torchrun over its 2 GPUs, --sync_bn passed through, no --resume yet.
        run = submitit.core.utils.DelayedSubmission.load(save / "slurm" / f"{job_id}_submitted.pkl").function
        argv = run.argv()
        assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        assert argv[5].endswith(os.path.join("wrn", "main.py")) and "--gpu_id" not in argv
        assert argv[argv.index("--method") + 1] == method and "--sync_bn" in argv and "--resume" not in argv


def test_slurm_dry_run_lists_the_jobs_and_submits_nothing(fake_slurm):
    code, out, _ = call(*CLUSTER_ARGS, "--dry_run")
    assert code == 0
    assert "2 to submit" in out and "2 GPUs, torchrun, 6 CPUs, 48 GB, 90 min, partition gpu" in out
    assert "# setup: module load cuda/12" in out
    commands = [line.split() for line in out.splitlines() if not line.startswith("#")]
    assert [command[3] for command in commands] == [str(save) for save in saves().values()]
    assert fake_slurm["calls"]("sbatch") == [] and not Path("logs").exists()


def test_slurm_rerun_submits_only_runs_whose_job_failed_or_vanished(fake_slurm):
    ind, dml = saves().values()
    assert call(*CLUSTER_ARGS)[0] == 0  # jobs 101 (ind) and 102 (dml)
    # Queued and running jobs get no second one; squeue is asked about a job sacct does not know.
    for sacct, squeue in ([("101", "RUNNING"), ("102", "PENDING")], []), ([("101", "REQUEUED")], [("102", "PENDING")]):
        fake_slurm["set_states"](sacct, squeue)
        code, out, _ = call(*CLUSTER_ARGS)
        assert code == 0 and "submitted job" not in out and "2 queued or running" in out, out
        assert len(fake_slurm["calls"]("sbatch")) == 2
    assert "squeue --noheader --jobs 102 --format=%T" in fake_slurm["calls"]("squeue")
    # ind's job failed after writing a checkpoint; dml's vanished (neither sacct nor squeue knows it).
    (ind / "checkpoint.pt").write_bytes(b"")
    fake_slurm["set_states"]([("101", "FAILED")])
    code, out, _ = call(*CLUSTER_ARGS)
    assert code == 0
    assert f"submitted job 103: resume {ind}" in out and f"submitted job 104: start {dml}" in out
    assert json.loads((ind / slurm.RECORD).read_text())["job_id"] == "103"
    run = submitit.core.utils.DelayedSubmission.load(ind / "slurm" / "103_submitted.pkl").function
    assert run.argv()[-1] == "--resume"  # the job resumes from the checkpoint it finds


def finished_log(method):
    """A log.txt line of a finished 2-epoch run, with the keys --status and the sweep read."""
    record = {"epoch": 2, "epochs": 2, "method": method, "links": "none", "depth": 10, "width": 1, "seed": 1,
              "architecture": "wrn", "net1": "wrn-10-1", "net2": "wrn-10-1",
              "dataset": "CIFAR100", "lr": 0.1, "epoch_step": "[60,120,160]", "lr_decay_ratio": 0.2,
              "test_acc_net1": 60.0, "test_acc_net2": 58.5, "n_parameters_net1": 1, "n_parameters_net2": 1}
    return "json_stats: " + json.dumps(record) + "\n"


def test_status_says_where_each_run_stands(fake_slurm):
    args = ["--folders", "wrn", "--methods", "ind", "dml", "ds", "--seeds", 1, 2, "--logdir", "logs", *TINY]
    save = {(method, seed): Path("logs") / f"wrn-10-1_wrn-10-1_{method}_seed{seed}{TINY_SUFFIX}"
            for method in ("ind", "dml", "ds") for seed in (1, 2)}
    for (method, seed), job_id in ((("ind", 1), 0), (("dml", 1), 201), (("ds", 1), 202), (("ind", 2), 203)):
        save[method, seed].mkdir(parents=True)
        if job_id:
            (save[method, seed] / slurm.RECORD).write_text(json.dumps(
                {"job_id": str(job_id), "cluster": "slurm", "folder": str(save[method, seed] / "slurm")}))
    (save["ind", 1] / "log.txt").write_text(finished_log("ind"))
    for name in ("net1.pt", "net2.pt"):
        (save["ind", 1] / name).write_bytes(b"")
    (save["dml", 1] / "log.txt").write_text(finished_log("dml").replace('"epoch": 2,', '"epoch": 1,'))
    (save["dml", 1] / "checkpoint.pt").write_bytes(b"")
    save["dml", 2].mkdir(parents=True)
    (save["dml", 2] / "checkpoint.pt").write_bytes(b"")  # stopped in its first epoch by a local sweep
    (save["ds", 1] / "stdout.txt").write_text("epoch 1/2 ...\nerror: --depth 10 is too shallow for ds\n")
    # submitit's log of the job's step: its own lines, the traceback, srun's verdict.
    (save["ds", 1] / "slurm").mkdir()
    (save["ds", 1] / "slurm" / "202_0_log.out").write_text(
        "submitit INFO (2026-01-01 10:00:00,000) - Starting with JobEnvironment(job_id=202)\n"
        "submitit ERROR (2026-01-01 10:00:09,000) - Submitted job triggered an exception\n"
        "Traceback (most recent call last):\n  File \"submitit/core/_submit.py\", line 11, in <module>\n"
        "RuntimeError: main.py exited with code 2: error: --depth 10 is too shallow for ds\n"
        "srun: error: node1: task 0: Exited with exit code 1\n")
    fake_slurm["set_states"]([("201", "RUNNING"), ("202", "FAILED"), ("203", "PENDING")])

    code, out, _ = call(*args, "--status")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"finished     {save['ind', 1]} (epoch 2 of 2, test error 40.00 / 41.50 %)"
    assert lines[1] == f"running      {save['dml', 1]} (job 201, epoch 1 of 2, test error 40.00 / 41.50 %)"
    # A failed run: why, from main.py's output and from submitit's log.
    assert lines[2] == f"failed       {save['ds', 1]} (job 202, FAILED)"
    assert lines[3:10] == [f"    {save['ds', 1] / 'stdout.txt'}:", "    | epoch 1/2 ...",
                           "    | error: --depth 10 is too shallow for ds", f"    {save['ds', 1] / 'slurm' / '202_0_log.out'}:",
                           "    | submitit ERROR (2026-01-01 10:00:09,000) - Submitted job triggered an exception",
                           "    | RuntimeError: main.py exited with code 2: error: --depth 10 is too shallow for ds",
                           "    | srun: error: node1: task 0: Exited with exit code 1"], lines
    assert lines[10] == f"queued       {save['ind', 2]} (job 203, PENDING)"
    assert lines[11:13] == [f"stopped      {save['dml', 2]} (in epoch 1; no job: --slurm resumes it)",
                            f"not started  {save['ds', 2]}"]
    assert lines[13] == "# 6 runs: 1 finished, 1 running, 1 queued, 1 failed, 1 stopped, 1 not started"
    assert fake_slurm["calls"]("sbatch") == []
    # Once every run finished, the exit code is 0.
    for key in list(save)[1:]:
        save.pop(key)
    assert call("--folders", "wrn", "--methods", "ind", "--seeds", 1, "--logdir", "logs", *TINY, "--status")[0] == 0


def test_slurm_without_submitit_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` fail
    code, out, err = call("--slurm", "--methods", "ind", "--logdir", tmp_path / "logs", *TINY)
    assert code == 2 and out == ""
    assert err == ("error: sweep.py --slurm needs submitit, which is not installed: pip install -r "
                   "requirements-tools.txt (or pip install submitit)\n")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("args, words", [
    (["--slurm_param", "exclude"], ["--slurm_param", "KEY=VALUE", "'exclude'"]),
    (["--gpus_per_run", "-1"], ["--gpus_per_run", "at least 0"]),
    (["--time", "2", "--signal_delay", "120"], ["--signal_delay", "--time"]),
    # SLURM may send the warning 60 s early: at the job's start, every time it is requeued.
    (["--time", "2", "--signal_delay", "60"], ["--signal_delay", "60 s", "--time 3 or more"]),
], ids=["slurm_param", "gpus_per_run", "signal_delay", "signal_resolution"])
def test_slurm_refuses_bad_options_before_submitting(tmp_path, args, words):
    code, out, err = call("--slurm", "--logdir", tmp_path / "logs", *args)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(word in err for word in words), err
    assert not (tmp_path / "logs").exists()


def test_slurm_says_what_sbatch_refused_in_one_line(fake_slurm):
    code, out, err = call(*CLUSTER_ARGS, "--partition", "nope")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: SLURM refused the job of {saves()['ind']}: ") and "invalid partition" in err
    assert "0 of 2 jobs were submitted" in err and not Path("logs").exists()


def test_job_options_without_slurm_are_refused(tmp_path):
    code, out, err = call("--partition", "gpu", "--logdir", tmp_path / "logs", *TINY, "--gpus", "")
    assert code == 2 and err == ("error: --partition describes the SLURM jobs of --slurm; add --slurm, or drop "
                                 "--partition to run the sweep on this machine\n"), err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("gpus, visible, tail", [(0, "", ["--gpu_id", ""]), (1, "3", ["--gpu_id", "3"]),
                                                 (1, None, ["--gpu_id", "0"])], ids=["cpu", "slurm_gpu", "no_env"])
def test_a_one_process_job_trains_on_the_gpu_slurm_gave_it(tmp_path, monkeypatch, gpus, visible, tail):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    command = ["python", "wrn/main.py", "--save", "logs/run", "--seed", "1"]
    run = slurm_job.TrainingRun(command, "logs/run", str(tmp_path), gpus, 120)
    assert run.argv() == command + tail
    (tmp_path / "logs" / "run").mkdir(parents=True)
    (tmp_path / "logs" / "run" / "checkpoint.pt").write_bytes(b"")
    assert run.argv() == command + ["--resume"] + tail
