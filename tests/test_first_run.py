"""What a new user meets first: defaults that fit the machine and say what they chose, short runs
on a fixed training subset (--subset), a finished run that resume leaves alone, help texts that
show the defaults, and messages that name runs still in their first epoch."""
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, import_tools, load_folder, read_log, run_main

# A run that trains 32 images for one step and tests the 512 synthetic test images: seconds.
SHORT = ["--dataset", "synthetic", "--depth", "10", "--width", "1", "--method", "ind", "--epochs", "1",
         "--batch_size", "32", "--subset", "32"]
CPU_ONLY = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


summarize, sweep, paper, common = import_tools("summarize", "sweep", "paper", "common")
bookkeeping_options, main_defaults, run_options = common.bookkeeping_options, common.main_defaults, common.run_options


def file_states(folder):
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One short run with the machine's defaults (no --gpu_id, no --nthread, no --save), started
    from another folder than wrn/ as `python wrn/main.py` is from the top folder."""
    cwd = tmp_path_factory.mktemp("top")
    result = subprocess.run([sys.executable, str(ROOT / "wrn" / "main.py"), *SHORT], cwd=cwd, env=CPU_ONLY,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return SimpleNamespace(result=result, save=cwd / "logs" / "wrn-10-1_wrn-10-1_ind_seed1")


def test_defaults_record_the_device_and_threads_used(default_run):
    threads = len(os.sched_getaffinity(0))
    assert "no GPU found: training on the CPU" in default_run.result.stderr.splitlines()
    record, = read_log(default_run.save)  # the run went to ./logs/<name> of the folder it was started in
    assert record["gpu_id"] == "" and record["nthread"] == threads
    first = [line for line in default_run.result.stdout.splitlines() if line.startswith(str(default_run.save.name))
             or "logs/" in line][0]
    assert f"CPU, {threads} threads" in first and "(32 training, 512 test images)" in first


def test_select_device_returns_what_it_chose_and_leaves_the_options_as_given(monkeypatch):
    # The log records the device and threads used (above); the options keep what the user gave.
    modules = load_folder("wrn")
    monkeypatch.setattr(modules.hardware.torch.cuda, "is_available", lambda: False)
    opt = modules.options.parse_options(["--nthread", "1"])
    threads = torch.get_num_threads()
    try:
        device, used = modules.hardware.select_device(opt)
    finally:
        torch.set_num_threads(threads)
    assert device == torch.device("cpu") and used == {"gpu_id": "", "nthread": 1}
    assert (opt.gpu_id, opt.nthread) == (None, 1)


def test_the_first_line_names_the_default_run_folder_in_full(default_run):
    # ./logs is the logs/ of the folder main.py was started in (wrn/logs inside wrn/): the line says which.
    line, = [line for line in default_run.result.stdout.splitlines() if " links) on " in line]
    assert line.startswith(f"{default_run.save.resolve()}: ind (none links) on synthetic"), line


def test_epoch_line_labels_nets_and_splits(default_run):
    line, = [line for line in default_run.result.stdout.splitlines() if line.startswith("epoch 1/1")]
    assert re.search(r"train: loss [\d.]+, acc net 1 [\d.]+%, net 2 [\d.]+%  test: loss [\d.]+, acc net 1 "
                     r"[\d.]+%, net 2 [\d.]+%  \(\d+ s training, \d+ s testing\)$", line), line


def test_resuming_a_finished_run_says_so_and_changes_nothing(default_run):
    before = file_states(default_run.save)
    result = subprocess.run([sys.executable, str(ROOT / "wrn" / "main.py"), *SHORT, "--nthread", "1", "--resume"],
                            cwd=default_run.save.parents[1], env=CPU_ONLY, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "already finished (epoch 1 of 1); nothing changed. Pass a larger --epochs to extend it" in result.stdout
    assert file_states(default_run.save) == before


def test_the_subset_is_part_of_the_run_on_resume(default_run):
    assert SHORT[-2:] == ["--subset", "32"]
    result = subprocess.run([sys.executable, str(ROOT / "wrn" / "main.py"), *SHORT[:-2], "--epochs", "2",
                             "--nthread", "1", "--save", str(default_run.save), "--resume"], env=CPU_ONLY,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 2 and "--subset 32" in result.stderr, result.stderr


def test_a_gpu_id_without_a_gpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_main("wrn", *SHORT, "--gpu_id", "0", "--save", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --gpu_id 0: this machine shows no such GPU"), result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("folder, module", [("wrn", "main"), ("tools", "evaluate")])  # main.py: one file in both
def test_a_normal_start_imports_no_flop_counter(folder, module):
    # torch.utils.flop_counter logs "triton not found; flop counting will not work for triton kernels"
    # when it is imported by a CUDA torch without triton: --benchmark alone imports it, and evaluate.py
    # once it counts a network's FLOPs.
    code = (f"import sys; import {module}; "
            "print(sorted({'torch.utils.flop_counter', 'triton'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / folder, env=CPU_ONLY, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def torchvision_for_another_torch(folder):
    """A stand-in package for a torchvision 0.28.0 built for another torch, in `folder`: its import
    dies as such a build's does."""
    (folder / "torchvision").mkdir(parents=True)
    (folder / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    (folder / "torchvision-0.28.0.dist-info").mkdir()
    (folder / "torchvision-0.28.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    return folder


@pytest.mark.parametrize("dataset", ["CIFAR100", "FashionMNIST"])
def test_a_torchvision_for_another_torch_is_named_in_one_line(tmp_path, dataset):
    stand_in = torchvision_for_another_torch(tmp_path / "site")
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "wrn" / "main.py"), *SHORT, "--dataset", dataset,
                             "--dataroot", str(run / "data"), "--save", str(run / "logs"), "--gpu_id", ""],
                            env={**CPU_ONLY, "PYTHONPATH": str(stand_in)}, capture_output=True, text=True,
                            timeout=240)
    release, _, build = torch.__version__.partition("+")
    index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
    assert result.returncode == 2 and result.stderr == (
        f"error: torchvision 0.28.0 does not import with torch {torch.__version__} (RuntimeError: operator "
        f"torchvision::nms does not exist): they must be builds for each other; reinstall both from one index: "
        f"pip install --force-reinstall torch=={release} torchvision{index}\n")
    assert not run.exists()  # neither the dataroot nor the run folder


def test_checkpoints_past_epochs_are_refused_and_unexported_ones_go_on(tmp_path):
    modules = load_folder("wrn")
    safety, Position = modules.safety, modules.checkpoint.Position
    opt = SimpleNamespace(epochs=2, save=str(tmp_path))
    for position in (Position(epoch=3), Position(epoch=2, step=5)):
        with pytest.raises(safety.CheckpointError, match=r"has begun epoch 3, past --epochs 2; pass --epochs 3"):
            safety.finished_already(opt, position)
    assert not safety.finished_already(opt, Position(epoch=2))  # not exported yet: main.py exports it
    assert not safety.finished_already(opt, Position(epoch=1, step=7))


def test_subset_is_class_balanced_fixed_by_the_seed_and_leaves_the_test_set(folder):
    dataset = load_folder(folder).dataset
    data = dataset.load_dataset("synthetic", "unused", torch.device("cpu"))
    subset = dataset.training_subset(data, 1005, seed=1)
    counts = torch.bincount(subset.train_labels, minlength=10)
    assert len(subset.train_labels) == 1005 and counts.max() - counts.min() <= 1
    assert torch.equal(subset.test_images, data.test_images) and torch.equal(subset.test_labels, data.test_labels)
    again, other = dataset.training_subset(data, 1005, seed=1), dataset.training_subset(data, 1005, seed=2)
    assert torch.equal(again.train_images, subset.train_images)
    assert not torch.equal(other.train_images, subset.train_images)
    # Every image of the subset is a training image with its own label.
    flat = data.train_images.flatten(1)
    for image, label in zip(subset.train_images[:20], subset.train_labels[:20]):
        index = (flat == image.flatten()).all(dim=1).nonzero()[0, 0]
        assert data.train_labels[index] == label
    with pytest.raises(dataset.DatasetError, match="--subset 5000: the training set holds only 2048 images"):
        dataset.training_subset(data, 5000, seed=1)


def test_subset_keeps_a_row_out_of_the_paper_comparison_and_names_the_sweep_folder():
    recipe = run_options({**main_defaults(), "world_size": 1})  # a run of main.py without flags
    assert paper.recipe_differences(recipe) == []
    assert paper.recipe_differences({**recipe, "subset": 10000}) == ["subset 10000 (the paper's: null)"]
    assert paper.recipe_differences({key: value for key, value in recipe.items() if key != "subset"}) == []
    assert sweep.run_name("wrn", "dcm", 1, ["--subset", "10000"]) == "wrn-28-10_wrn-28-10_dcm_seed1_subset-10000"


def test_main_help_shows_the_defaults(capsys):
    options = load_folder("wrn").options
    with pytest.raises(SystemExit) as exit_code:
        options.parse_options(["--help"])
    assert exit_code.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--batch_size BATCH_SIZE the global batch, split over torchrun's processes (default: 128)",
                  "--lr LR SGD learning rate (momentum 0.9) (default: 0.1)", "--epochs EPOCHS epochs to train (default: 200)", "--subset N train on N images only",
                  "(default: the cores this process may use", "Default: GPU 0 of the visible ones, or the CPU"):
        assert shown in text, shown


def test_summarize_help_lists_every_ignored_option(capsys):
    with pytest.raises(SystemExit):
        summarize.parse_options(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("Options that do not define a cell (runs differing only in them share it): "
            + ", ".join(bookkeeping_options()) + ".") in text


def test_sweep_without_gpus_plans_on_the_device_it_finds(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert sweep.main(["--dry_run", "--logdir", str(tmp_path), "--seeds", "1", "--folders", "wrn"]) == 0
    assert "1 at a time on the CPU, output in" in capsys.readouterr().out.splitlines()[0]
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a machine with a GPU
    assert sweep.main(["--dry_run", "--logdir", str(tmp_path), "--seeds", "1", "--folders", "wrn"]) == 0
    assert "1 at a time on GPU 0, output in" in capsys.readouterr().out.splitlines()[0]
