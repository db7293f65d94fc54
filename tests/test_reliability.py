"""Safe to interrupt, impossible to corrupt: SIGKILL at any moment and --resume gives the
uninterrupted run's weights bit for bit and its log lines; SIGTERM, SIGINT, SIGUSR1 and SIGUSR2
checkpoint and exit, and a Ctrl-C after the run decided to stop changes nothing; a non-finite loss
stops the run; checkpoints never run code; bad input is refused cleanly.

Runs use --deterministic and one thread, so that two runs of the same command are bit-identical.
"""
import hashlib
import json
import os
import pickle
import random
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, load_folder, read_log, run_main, write_cifar100

NUM_TRAIN, NUM_TEST, BATCH, EPOCHS = 128, 24, 16, 3  # 8 steps per epoch
TIMES = ("train_time", "test_time", "checkpoint_time", "checkpoint_bytes")  # and what checkpoints cost


def run_args(save, dataroot, *extra):
    return ["--gpu_id", "", "--nthread", "1", "--save", str(save), "--dataroot", str(dataroot), "--depth", "16",
            "--width", "1", "--batch_size", str(BATCH), "--epochs", str(EPOCHS), "--deterministic", *map(str, extra)]


def start(folder, args):
    return subprocess.Popen([sys.executable, str(ROOT / folder / "main.py"), *args], cwd=ROOT / folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def comparable(record):
    """A log record's measured numbers: no option, no wall-clock time."""
    options = vars(load_folder("wrn").options.parse_options([]))
    return {key: value for key, value in record.items() if key not in options and key not in TIMES}


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(reference, save):
    """Same exported weights (bytes and tensors) and the same log lines, times and paths aside."""
    for name in ("net1.pt", "net2.pt"):
        assert (reference / name).read_bytes() == (save / name).read_bytes(), name
    for name in ("net1", "net2"):
        a, b = weights(reference / "checkpoint.pt")[name], weights(save / "checkpoint.pt")[name]
        assert all(torch.equal(a[key], b[key]) for key in a), name
    reference_records, records = read_log(reference), read_log(save)
    assert [record["epoch"] for record in records] == list(range(1, EPOCHS + 1))
    assert [comparable(r) for r in records] == [comparable(r) for r in reference_records]


def checkpoint_mtime(save):
    path = save / "checkpoint.pt"
    return path.stat().st_mtime_ns if path.exists() else 0


def wait_for_new_checkpoint(process, save, before):
    while process.poll() is None and checkpoint_mtime(save) == before:
        time.sleep(0.001)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("reliability_data"), NUM_TRAIN, NUM_TEST)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The uninterrupted run (it checkpoints every step too: saving changes no number)."""
    save = tmp_path_factory.mktemp("reference") / "save"
    result = run_main("wrn", *run_args(save, data, "--checkpoint_every", 1)[2:])
    assert result.returncode == 0, result.stderr
    return save


# --- SIGKILL at any moment --------------------------------------------------------------------------

def test_sigkill_at_random_moments_and_resume_gives_the_uninterrupted_run(tmp_path, data, reference):
    save = tmp_path / "killed"
    rng = random.Random(0)
    kills = []
    for attempt in range(4):
        resume = ["--resume"] if (save / "checkpoint.pt").exists() else []
        process = start("wrn", run_args(save, data, "--checkpoint_every", 1, *resume))
        wait_for_new_checkpoint(process, save, checkpoint_mtime(save))  # training is under way
        if attempt == 2:  # in the middle of writing a checkpoint
            while process.poll() is None and not (save / "checkpoint.pt.tmp").exists():
                time.sleep(0.0002)
        else:
            time.sleep(rng.uniform(0.0, 0.25))
        process.kill()
        process.wait()
        state = weights(save / "checkpoint.pt")  # always whole and loadable
        kills.append((state["epoch"], state["step"]))
    assert kills[-1] < (EPOCHS, 0), f"the kills came too late to test anything: {kills}"
    process = start("wrn", run_args(save, data, "--checkpoint_every", 1, "--resume"))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert_same_run(reference, save)


def test_lines_logged_after_the_last_checkpoint_are_dropped_on_resume(tmp_path, data, reference):
    # A kill between appending an epoch's line and writing that epoch's checkpoint leaves a line
    # that the checkpoint does not know about; the resumed run redoes the epoch and its line.
    save = tmp_path / "save"
    assert run_main("wrn", *run_args(save, data, "--epochs", 1)[2:]).returncode == 0
    state = weights(save / "checkpoint.pt")
    assert state["epoch"] == 1 and state["log_bytes"] == (save / "log.txt").stat().st_size
    epoch_1_line = (save / "log.txt").read_text()
    with open(save / "log.txt", "a") as log:
        log.write(epoch_1_line.replace('"epoch": 1,', '"epoch": 2,'))  # as if epoch 2 had been logged
    assert run_main("wrn", *run_args(save, data, "--resume")[2:]).returncode == 0
    assert (save / "log.txt").read_text().startswith(epoch_1_line)
    assert_same_run(reference, save)


# --- SIGTERM and SIGINT --------------------------------------------------------------------------------

# SIGUSR1 and SIGUSR2: a cluster's warning before the time limit (SLURM's --signal), which some
# clusters send to every process of the job.
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 143),
                                          (signal.SIGUSR2, 143)], ids=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"])
def test_signal_checkpoints_prints_the_resume_command_and_exits(tmp_path, data, reference, signum, code):
    save = tmp_path / "save"
    process = start("wrn", run_args(save, data))
    while process.poll() is None and not (save / "log.txt").exists():  # epoch 1 is done
        time.sleep(0.005)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and f"stopped by {signal.Signals(signum).name}: " in stderr, stderr
    command = stderr.strip().splitlines()[-1].strip()
    assert command.startswith("python ") and command.endswith("--resume"), stderr
    state = weights(save / "checkpoint.pt")
    assert (state["epoch"], state["step"]) < (EPOCHS, 0)
    if signum != signal.SIGTERM:  # the checkpoint and the command are the same whichever signal stopped the run
        return
    # The printed command, run where the run was started, continues it to the same end.
    argv = shlex.split(command)[2:]
    result = subprocess.run([sys.executable, str(ROOT / "wrn" / "main.py"), *argv], cwd=ROOT / "wrn",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_run(reference, save)


# main.py run by a wrapper that presses Ctrl-C itself at chosen points of the run, so that each one
# lands exactly there: signal.raise_signal runs the Python handler before it returns. The first
# Ctrl-C comes at FIRST ("load": as the data is loaded, "step": before the third step; a checkpoint
# follows every step); with "at_once" a second one comes as the stop's checkpoint write begins.
# Then, late, while the run leaves: after it printed how to resume, as it leaves the process group,
# and in an atexit callback during the interpreter's shutdown. Each press is announced on stderr.
CTRL_C_WRAPPER = """
import atexit, os, runpy, signal, sys
main_py, first, second, *args = sys.argv[1:]
sys.path.insert(0, os.path.dirname(main_py))
sys.argv = [main_py, *args]
import dataset, distributed, safety, training

pressed = []

def ctrl_c(where):
    print(f"test: Ctrl-C {where}", file=sys.stderr, flush=True)
    pressed.append(where)
    signal.raise_signal(signal.SIGINT)

def press_before(owner, name, where, when):
    function = getattr(owner, name)
    def wrapped(*a, **k):
        if when():
            ctrl_c(where)
        return function(*a, **k)
    setattr(owner, name, wrapped)

steps = []
def counted():
    steps.append(1)
    return len(steps) == 3
press_before(dataset, "load_dataset", "first", lambda: first == "load")
press_before(training.EpochMeter, "update", "first", lambda: first == "step" and counted())  # in step 3
press_before(safety, "save_checkpoint", "second", lambda: second == "at_once" and pressed == ["first"])
report = safety.StopRequest.report
def report_then_press(*a, **k):
    code = report(*a, **k)
    ctrl_c("after report")
    return code
safety.StopRequest.report = report_then_press
press_before(distributed, "finish", "in finish", lambda: True)
atexit.register(ctrl_c, "in atexit")
runpy.run_path(main_py, run_name="__main__")
"""


@pytest.mark.parametrize("first, second", [("step", "none"), ("step", "at_once"), ("load", "none")],
                         ids=["stopped", "second_ctrl_c_at_once", "ctrl_c_while_loading"])
def test_ctrl_c_stops_cleanly_and_later_ctrl_c_changes_nothing(tmp_path, data, first, second):
    save = tmp_path / "save"
    args = run_args(save, data, "--depth", 10, "--method", "ind", "--checkpoint_every", 1)  # small and quick
    result = subprocess.run([sys.executable, "-c", CTRL_C_WRAPPER, str(ROOT / "wrn" / "main.py"), first, second, *args],
                            cwd=ROOT / "wrn", capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stderr = result.stderr
    stopped = first == "step" and second == "none"  # the only way that reaches the resume command
    presses = ["first"] + ["second"] * (second == "at_once") + ["after report"] * stopped + ["in finish", "in atexit"]
    assert [line[len("test: Ctrl-C "):] for line in stderr.splitlines() if line.startswith("test: Ctrl-C ")] == \
        presses, stderr
    assert result.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    if first == "load":  # before anything was written
        assert "interrupted at once" in stderr and not save.exists(), stderr
    elif second == "at_once":  # the stop's checkpoint was not written; the last one is whole
        assert "interrupted at once" in stderr, stderr
        state = weights(save / "checkpoint.pt")
        assert (state["epoch"], state["step"]) == (0, 2)
    else:  # stopped
        assert "stopped by SIGINT" in stderr and "interrupted at once" not in stderr, stderr
        printed = [line for line in stderr.splitlines() if line.strip() and not line.startswith("test: ")]
        assert printed[-1].strip().endswith("--resume"), stderr
        state = weights(save / "checkpoint.pt")
        assert (state["epoch"], state["step"]) == (0, 3)


# --- a non-finite loss ------------------------------------------------------------------------------

def test_a_nan_stops_the_run_naming_epoch_step_and_terms_and_keeps_the_checkpoint(tmp_path, data):
    save = tmp_path / "save"
    assert run_main("wrn", *run_args(save, data, "--epochs", 1)[2:]).returncode == 0
    state = weights(save / "checkpoint.pt")
    state["net2"]["head.fc.weight"][0, 0] = float("nan")  # net 2's final classifier goes bad
    torch.save(state, save / "checkpoint.pt")
    before = {name: (save / name).read_bytes() for name in ("checkpoint.pt", "log.txt")}
    result = run_main("wrn", *run_args(save, data, "--checkpoint_every", 1, "--resume")[2:])
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    line, = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "epoch 2, step 1" in line and "ce_net2_final" in line and "ce_net1_final" not in line
    assert {name: (save / name).read_bytes() for name in before} == before


# --- loading never runs code -------------------------------------------------------------------------

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_that_needs_arbitrary_unpickling_is_refused_and_its_code_never_runs(tmp_path, data):
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"options": {}, "net1": Payload(str(marker))}, crafted)
    result = run_main("wrn", *run_args(tmp_path / "save", data, "--resume", crafted)[2:])
    line = error_line(result)
    assert str(crafted) in line and "unpickling" in line
    assert not marker.exists()
    with open(tmp_path / "raw.pkl", "wb") as f:  # a plain pickle, not a torch zip file
        pickle.dump(Payload(str(marker)), f)
    assert "unpickling" in error_line(run_main("wrn", *run_args(tmp_path / "save", data, "--resume",
                                                                 tmp_path / "raw.pkl")[2:]))
    assert not marker.exists() and not (tmp_path / "save").exists()


# --- bad input: one line, exit code 2, nothing created, nothing changed ----------------------------------

def error_line(result):
    assert result.returncode == 2, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def tree_hashes(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(reference):
    return reference


BAD_OPTIONS = {
    "depth_not_6n+4": (["--depth", "20"], ["--depth 20", "6n+4"]),
    "too_shallow_for_aux": (["--depth", "10"], ["--depth 10", "too shallow"]),
    "width_0": (["--width", "0"], ["--width"]),
    "unknown_dataset": (["--dataset", "MNIST"], ["--dataset", "MNIST"]),
    "unknown_method": (["--method", "kd"], ["--method", "kd"]),
    "unknown_links": (["--links", "all"], ["--links", "all"]),
    "epoch_step_not_increasing": (["--epoch_step", "[120,60]"], ["--epoch_step", "increasing"]),
    "epoch_step_not_a_list": (["--epoch_step", "60"], ["--epoch_step"]),
    "batch_size_0": (["--batch_size", "0"], ["--batch_size"]),
    "lr_negative": (["--lr", "-0.1"], ["--lr"]),
    "lr_nan": (["--lr", "nan"], ["--lr"]),
    "epochs_0": (["--epochs", "0"], ["--epochs"]),
    "checkpoint_every_0": (["--checkpoint_every", "0"], ["--checkpoint_every"]),
    "checkpoint_interval_negative": (["--checkpoint_interval", "-1"], ["--checkpoint_interval", ">= 0"]),
    "seed_negative": (["--seed", "-1"], ["--seed", "-1"]),
}


@pytest.mark.parametrize("args, words", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_are_refused_by_name(tmp_path, args, words):
    options = load_folder("wrn").options
    with pytest.raises(options.UsageError) as error:
        options.parse_options(["--save", str(tmp_path / "save"), "--dataroot", str(tmp_path / "data"), *args])
    assert all(word in str(error.value) for word in words), str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_option_gives_one_line_exit_2_and_creates_nothing(tmp_path):
    # main.py turns the refusals above into one `error:` line and exit code 2 before it writes anything.
    (tmp_path / "existing.txt").write_text("kept")
    before = tree_hashes(tmp_path)
    for name in ("depth_not_6n+4", "lr_nan"):
        args, words = BAD_OPTIONS[name]
        line = error_line(run_main("wrn", "--save", tmp_path / "save", "--dataroot", tmp_path / "data", *args))
        assert all(word in line for word in words), line
        assert tree_hashes(tmp_path) == before


def test_resume_from_a_checkpoint_of_another_config_names_every_mismatch(tmp_path, data, finished_run):
    before = tree_hashes(finished_run)
    args = run_args(tmp_path / "save", data, "--resume", finished_run / "checkpoint.pt", "--seed", 2, "--lr", 0.05)
    line = error_line(run_main("wrn", *args[2:]))
    assert "--seed 1 (not 2)" in line and "--lr 0.1 (not 0.05)" in line
    assert tree_hashes(finished_run) == before and not (tmp_path / "save").exists()


def test_resume_from_a_truncated_checkpoint_is_refused(tmp_path, data, finished_run):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((finished_run / "checkpoint.pt").read_bytes()[:5000])
    before = tree_hashes(tmp_path)
    line = error_line(run_main("wrn", *run_args(tmp_path / "save", data, "--resume", truncated)[2:]))
    assert str(truncated) in line and "truncated" in line
    assert tree_hashes(tmp_path) == before


def test_save_below_a_file_is_refused(tmp_path, data):
    (tmp_path / "results").write_text("a file")
    before = tree_hashes(tmp_path)
    line = error_line(run_main("wrn", *run_args(tmp_path / "results" / "run1", data)[2:]))
    assert "is a file" in line and "--save" in line
    assert tree_hashes(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_save_folder_is_refused(tmp_path, data):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = error_line(run_main("wrn", *run_args(locked / "run", data)[2:]))
    assert "not writable" in line


def test_a_refused_dataset_leaves_no_save_folder_behind(tmp_path):
    root = write_cifar100(tmp_path / "data", 8, 8)
    (root / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    line = error_line(run_main("wrn", *run_args(tmp_path / "save", root)[2:]))
    assert "test" in line
    assert not (tmp_path / "save").exists()


def test_the_log_lines_are_whole_json_records(finished_run):
    for line in (finished_run / "log.txt").read_text().splitlines():
        assert line.startswith("json_stats: ")
        json.loads(line[len("json_stats: "):])
