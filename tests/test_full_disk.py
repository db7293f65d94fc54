"""A full disk while the run writes its files (checkpoint.pt, log.txt, net1.pt and net2.pt): one
line that names the file, the checkpoint that is intact and the command that continues the run; exit code 1, no temporary file left, and under torchrun every
process leaves. The disk is a stand-in (stand_ins/small_disk.py): the files under the run's folder
share a few bytes, and a write beyond them fails with ENOSPC as on a full device.

The runs train 32 synthetic images for one step per epoch; their checkpoint is about 1.3 MB.
"""
import os
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_folder, read_log
from stand_ins import small_disk

SHORT = ["--dataset", "synthetic", "--depth", "10", "--width", "1", "--method", "ind", "--batch_size", "32",
         "--subset", "32", "--nthread", "1", "--gpu_id", "", "--checkpoint_interval", "0"]
# Room for one checkpoint (with its log lines), not for a second one beside it while it is replaced.
ONE_CHECKPOINT = 2_000_000
TIMEOUT = 240


def small_disk_env(folder, capacity):
    """The environment of a process in which `folder` lies on a disk of `capacity` bytes."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(folder.parent),
            "PYTHONPATH": str(ROOT / "tests" / "stand_ins"), "SMALL_DISK": f"{folder}:{capacity}"}


def run(command, folder, capacity):
    return subprocess.run(command, cwd=ROOT / "wrn", env=small_disk_env(folder, capacity), capture_output=True,
                          text=True, timeout=TIMEOUT)


def main_command(save, *args):
    return [sys.executable, str(ROOT / "wrn" / "main.py"), *SHORT, "--save", str(save), *map(str, args)]


def error_line(result):
    """The run's one line on stderr, after checking that it failed with exit code 1 and no traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line, = result.stderr.splitlines()
    return line


def test_a_full_disk_at_a_checkpoint_says_so_in_one_line_and_the_run_resumes_with_room(tmp_path):
    save = tmp_path / "run"
    result = run(main_command(save, "--epochs", 3), tmp_path, ONE_CHECKPOINT)
    line = error_line(result)
    assert line.startswith(f"error: no space left on the device of {save / 'checkpoint.pt'}; {save / 'checkpoint.pt'} "
                           f"is intact: free some space, then continue with: "), line
    assert line.endswith(f"--save {save} --epochs 3 --resume")
    assert sorted(path.name for path in save.iterdir()) == ["checkpoint.pt", "log.txt"]  # no temporary file
    assert [record["epoch"] for record in read_log(save)] == [1, 2]
    assert torch.load(save / "checkpoint.pt", weights_only=True)["epoch"] == 1

    python, *arguments = shlex.split(line.split("continue with: ", 1)[1])
    assert python == "python"
    resumed = run([sys.executable, *arguments], tmp_path, 10 ** 9)  # the room made
    assert resumed.returncode == 0, resumed.stderr
    assert [record["epoch"] for record in read_log(save)] == [1, 2, 3]  # epoch 2 again, then 3


def test_a_full_disk_at_the_log_line_leaves_no_part_of_it(tmp_path):
    save = tmp_path / "run"
    line = error_line(run(main_command(save, "--epochs", 1), tmp_path, 500))
    assert line == (f"error: no space left on the device of {save / 'log.txt'}; {save} holds no checkpoint.pt yet: "
                    f"free some space, then remove {save} and start the run again")
    assert [(path.name, path.stat().st_size) for path in save.iterdir()] == [("log.txt", 0)]


def test_a_full_disk_at_an_export_raises_disk_full_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    checkpoint = load_folder("wrn").checkpoint
    nets = [load_folder("wrn").models.wrn(10, 1, num_classes=10, aux=False) for _ in range(2)]
    # The stand-in replaces these two in this process: monkeypatch puts them back afterwards.
    for module, name in (("builtins", "open"), ("os", "write")):
        monkeypatch.setattr(f"{module}.{name}", getattr(sys.modules[module], name))
    small_disk.install(tmp_path, 400_000)  # net1.pt fits (313 kB), net2.pt not beside it
    with pytest.raises(checkpoint.DiskFull) as raised:
        checkpoint.export_networks(type("Options", (), {"save": str(tmp_path)}), nets)
    assert str(raised.value).startswith(f"no space left on the device of {tmp_path / 'net2.pt'}; ")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["net1.pt"]


def test_under_torchrun_every_process_leaves_when_rank_0_finds_the_disk_full(tmp_path):
    save = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               *main_command(save, "--epochs", 3)[1:]]
    result = run(command, tmp_path, ONE_CHECKPOINT)  # the timeout: a process that waited for rank 0
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: no space left on the device of "
                                                     f"{save / 'checkpoint.pt'}"), result.stderr
    # The one traceback is torchrun's own report of a failed process (ChildFailedError).
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr, result.stderr
    assert sorted(path.name for path in save.iterdir()) == ["checkpoint.pt", "log.txt"]
