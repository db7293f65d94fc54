"""--checkpoint_interval: checkpoints at ends of epochs about every MINUTES, always after the first
and the last epoch and on a stop; the ranks agree on rank 0's clock; each log line says what the
checkpoints since the previous line cost; a run killed after an epoch that was not checkpointed
retrains it on --resume and ends with the uninterrupted run's weights.

The schedule is tested with a stand-in clock (no timed test); the end-to-end runs use intervals of
0 (every epoch) and of 1000 minutes (only the first and the last epoch).
"""
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import ROOT, import_tools, load_folder, read_log, run_main, write_cifar100
from test_distributed import torchrun
from test_first_run import summarize, sweep
from test_reliability import assert_same_run, run_args, start, weights

paper, = import_tools("paper")

NUM_TRAIN, NUM_TEST = 128, 24  # test_reliability's run_args: batch 16 (8 steps), 3 epochs
SAVE_SECONDS, SAVE_BYTES = 5.0, 1000  # what the stand-in checkpoint costs


class Clock:
    """time.time() as safety.py reads it, moved by the test."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        return self.now


class FakeGroup:
    """One rank of a run; any() records the flag it is given and answers `answers` in order (rank
    0's decisions, for a rank that is not rank 0), or the flag itself."""

    def __init__(self, is_main, answers=None):
        self.is_main, self.answers, self.flags = is_main, answers, []

    def any(self, flag):
        self.flags.append(flag)
        return self.answers[len(self.flags) - 1] if self.answers is not None else flag


def run_schedule(monkeypatch, epoch_minutes, interval, group=None, epochs=6):
    """Ends `epochs` epochs of `epoch_minutes` each as main.py does, through safety.Checkpoints on a
    stand-in clock: each epoch's line takes cost(), then the epoch is saved when due(). Returns
    (the epochs checkpointed, each line's cost, the group)."""
    modules = load_folder("wrn")
    safety = modules.safety
    clock, saved, costs = Clock(), [], []

    def save_checkpoint(opt, position, step, optimizer):
        saved.append(position.epoch)
        clock.now += SAVE_SECONDS
        return SAVE_BYTES

    monkeypatch.setattr(safety, "time", clock)
    monkeypatch.setattr(safety, "save_checkpoint", save_checkpoint)
    group = group or FakeGroup(is_main=True)
    opt = SimpleNamespace(epochs=epochs, checkpoint_interval=interval, checkpoint_every=None)
    checkpoints = safety.Checkpoints(opt, SimpleNamespace(group=group))
    for epoch in range(1, epochs + 1):
        started = clock.now
        clock.now += epoch_minutes * 60
        costs.append(checkpoints.cost())
        if checkpoints.due(epoch, clock.now - started):
            checkpoints.save(modules.checkpoint.Position(epoch), optimizer=None)
    return saved, costs, group


def test_checkpoints_stay_within_the_interval_and_the_first_and_last_epochs_are_kept(monkeypatch):
    # 4-minute epochs, 10-minute interval: after epoch 1 (the first), then whenever the next epoch
    # would end 10 minutes or more after the last checkpoint, and after epoch 6 (the last).
    saved, costs, _ = run_schedule(monkeypatch, epoch_minutes=4, interval=10)
    assert saved == [1, 3, 5, 6]
    # Each line holds what the checkpoints since the previous line cost: the one after epoch k is
    # counted in line k + 1 (it knows the line, so it is written after it).
    assert [cost["checkpoint_time"] for cost in costs] == [0, SAVE_SECONDS, 0, SAVE_SECONDS, 0, SAVE_SECONDS]
    assert [cost["checkpoint_bytes"] for cost in costs] == [0, SAVE_BYTES, 0, SAVE_BYTES, 0, SAVE_BYTES]


@pytest.mark.parametrize("epoch_minutes, interval", [(4, 0), (15, 10)], ids=["interval_0", "epochs_past_interval"])
def test_every_epoch_is_checkpointed_with_interval_0_or_epochs_longer_than_it(monkeypatch, epoch_minutes, interval):
    saved, _, _ = run_schedule(monkeypatch, epoch_minutes, interval)
    assert saved == [1, 2, 3, 4, 5, 6]


def test_checkpoint_every_counts_the_steps_of_an_epoch():
    safety = load_folder("wrn").safety
    every_3 = safety.Checkpoints(SimpleNamespace(checkpoint_every=3), step=None)
    assert [steps for steps in range(1, 10) if every_3.due_in_epoch(steps)] == [3, 6, 9]
    assert not any(safety.Checkpoints(SimpleNamespace(checkpoint_every=None), None).due_in_epoch(s) for s in range(9))


def test_the_ranks_take_rank_0s_decision_at_the_same_collectives(monkeypatch):
    # Rank 0 decides by its clock; rank 1's clock (here: other epoch lengths) must not matter, and
    # both ranks must make the same collective calls, or a torchrun run would hang.
    _, _, rank0 = run_schedule(monkeypatch, epoch_minutes=4, interval=10)
    # Epoch 1 (the first) and 6 (the last) need no vote; epochs 2 to 5 vote (False, True, False,
    # True); each checkpoint is followed by the answer to whether rank 0's write failed
    # (checkpoint.write_on_rank0).
    assert rank0.flags == [False, False, True, False, False, True, False, False]
    rank1 = FakeGroup(is_main=False, answers=rank0.flags)
    saved, _, _ = run_schedule(monkeypatch, epoch_minutes=11, interval=10, group=rank1)
    assert rank1.flags == [False] * len(rank0.flags)  # only rank 0's clock votes
    assert saved == []  # rank 0 alone writes


def test_checkpoint_interval_is_an_option_a_resume_may_change(folder):
    modules = load_folder(folder)
    options, checkpoint = modules.options, modules.checkpoint
    assert vars(options.option_parser().parse_args([]))["checkpoint_interval"] == 10.0
    saved = vars(options.parse_options([]))
    assert checkpoint.mismatched_options(options.parse_options(["--checkpoint_interval", "0"]), saved) == []


# --- end to end: fewer checkpoints, the same run ------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("interval_data"), NUM_TRAIN, NUM_TEST)


@pytest.fixture(scope="module")
def every_epoch(tmp_path_factory, data):
    """The uninterrupted run, checkpointed after every epoch (--checkpoint_interval 0)."""
    save = tmp_path_factory.mktemp("every_epoch") / "save"
    result = run_main("wrn", *run_args(save, data, "--checkpoint_interval", 0)[2:])
    assert result.returncode == 0, result.stderr
    return save


def test_each_line_logs_the_seconds_and_bytes_of_the_checkpoints_before_it(every_epoch):
    records = read_log(every_epoch)
    size = (every_epoch / "checkpoint.pt").stat().st_size
    assert records[0]["checkpoint_time"] == 0 and records[0]["checkpoint_bytes"] == 0  # none written yet
    for record in records[1:]:  # the previous epoch's checkpoint, of the same size as the last one
        assert record["checkpoint_time"] > 0 and record["checkpoint_bytes"] == size, record


def test_summarize_and_sweep_take_the_checkpoint_keys_as_neither_recipe_nor_name(every_epoch):
    # The interval changes no number, and the cost keys are measurements: a run's row and its
    # comparison with the paper do not depend on them.
    run = summarize.Run(str(every_epoch / "log.txt"), read_log(every_epoch))
    assert not [key for key in run.row_options if key.startswith("checkpoint")], run.row_options
    assert not [reason for reason in paper.recipe_differences(run.row_options) if "checkpoint" in reason]
    assert sweep.run_name("wrn", "dcm", 1, ["--checkpoint_interval", "5"]) == "wrn-28-10_wrn-28-10_dcm_seed1"


def test_a_kill_after_an_unsaved_epoch_retrains_it_on_resume_to_the_same_weights(tmp_path, data, every_epoch):
    save = tmp_path / "save"
    args = run_args(save, data, "--checkpoint_interval", 1000)  # only the first and the last epoch
    process = start("wrn", args)
    log = save / "log.txt"
    while process.poll() is None and not (log.exists() and len(log.read_text().splitlines()) == 2):
        time.sleep(0.001)
    process.kill()  # during epoch 3: epoch 2 was logged, not checkpointed
    process.wait()
    assert process.returncode < 0, "the run ended before it could be killed"
    state = weights(save / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (1, 0)
    assert state["log_bytes"] < log.stat().st_size  # epoch 2's line is after the checkpoint
    result = run_main("wrn", *run_args(save, data, "--checkpoint_interval", 1000, "--resume")[2:])
    assert result.returncode == 0, result.stderr
    assert "epoch 2/3" in result.stdout, result.stdout  # epoch 2 trained again, its line logged once
    assert_same_run(every_epoch, save)


# main.py as a script, with SIGTERM raised during the test pass of one epoch (the second call of
# training.evaluate): after the last step's stop vote, before the epoch's line.
SIGTERM_WHILE_TESTING = """
import os, runpy, signal, sys
main_py, epoch, *args = sys.argv[1:]
sys.path.insert(0, os.path.dirname(main_py))
sys.argv = [main_py, *args]
import training
evaluate, calls = training.evaluate, []
def evaluate_then_sigterm(*a, **k):
    calls.append(1)
    if len(calls) == int(epoch):
        signal.raise_signal(signal.SIGTERM)
    return evaluate(*a, **k)
training.evaluate = evaluate_then_sigterm
runpy.run_path(main_py, run_name="__main__")
"""


def test_a_stop_at_the_end_of_an_epoch_checkpoints_it_and_resumes_to_the_same_weights(tmp_path, data, every_epoch):
    # Epoch 2 is neither the first nor the last, and 1000 minutes have not passed: only the stop
    # makes its end a checkpoint, after its line.
    save = tmp_path / "save"
    args = run_args(save, data, "--checkpoint_interval", 1000)
    result = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_TESTING, str(ROOT / "wrn" / "main.py"), "2", *args],
                            cwd=ROOT / "wrn", capture_output=True, text=True, timeout=240)
    assert result.returncode == 143, result.stderr
    assert "stopped by SIGTERM" in result.stderr, result.stderr
    state = weights(save / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (2, 0)
    assert [record["epoch"] for record in read_log(save)] == [1, 2]
    assert state["log_bytes"] == (save / "log.txt").stat().st_size  # the checkpoint knows epoch 2's line
    result = run_main("wrn", *run_args(save, data, "--checkpoint_interval", 1000, "--resume")[2:])
    assert result.returncode == 0, result.stderr
    assert "epoch 2/3" not in result.stdout and "epoch 3/3" in result.stdout, result.stdout
    assert_same_run(every_epoch, save)


def test_two_processes_vote_with_rank_0s_clock_and_finish(tmp_path, data):
    # Epoch 2 is neither the first nor the last: both ranks take part in the vote on rank 0's clock
    # (interval 0: due), rank 0 writes, and the run goes on in step to its end.
    (tmp_path / "torchrun_tmp").mkdir()
    save = tmp_path / "save"
    result = torchrun(run_args(save, data, "--checkpoint_interval", 0), tmp_path / "torchrun_tmp")
    assert result.returncode == 0, result.stderr
    records = read_log(save)
    assert [record["epoch"] for record in records] == [1, 2, 3]
    assert all(record["checkpoint_bytes"] > 0 for record in records[1:])  # epochs 1 and 2 were checkpointed
    assert weights(save / "checkpoint.pt")["epoch"] == 3
