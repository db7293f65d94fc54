"""torchrun on the CPU (gloo): two processes train what one process trains, rank 0 alone writes,
sharded evaluation counts every test image once, checkpoints move between process counts where
BN's batches stay the same, a global batch that the processes cannot share is refused, and a
compiled step has no graph break.

The tiny training set (101 images, batches of 16) ends each epoch with a batch of 5, which two
processes split 3 + 2; the 25 test images split 13 + 12.

Why a small --lr: these tiny runs are chaotic at lr 0.1, so float rounding alone (one process
with --nthread 2 against --nthread 1 differs as much) drives the weights apart by percents within
a few steps. At lr 1e-5 the steps are well-conditioned: the weights must agree to 1e-5, and the
update each network made (weights minus initial weights) must agree to 1e-3 in norm, which a
wrongly weighted or unsynchronised slice would miss by far more.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, load_folder, read_log, run_main, write_cifar100

NUM_TRAIN, NUM_TEST, BATCH, EPOCHS, LR = 101, 25, 16, 2, 1e-5
TIMEOUT = 300


def run_args(save, dataroot, *extra):
    return ["--gpu_id", "", "--nthread", "1", "--save", str(save), "--dataroot", str(dataroot), "--depth", "16",
            "--width", "1", "--batch_size", str(BATCH), "--epochs", str(EPOCHS), "--lr", str(LR), "--deterministic",
            *map(str, extra)]


def torchrun_command(args, processes=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone",
            str(ROOT / "wrn" / "main.py"), *args]


def torchrun_env(tmp):
    # torchrun keeps its own files (worker error files) in the temporary folder: give it one of its
    # own, so that any other file created in the test's folder is main.py's.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}


def torchrun(args, tmp, processes=2):
    return subprocess.run(torchrun_command(args, processes), cwd=ROOT / "wrn", env=torchrun_env(tmp),
                          capture_output=True, text=True, timeout=TIMEOUT)


def weights(save):
    return torch.load(save / "checkpoint.pt", map_location="cpu", weights_only=True)


def accuracies(record):
    return {key: value for key, value in record.items() if "_acc" in key}


def files_under(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("distributed_data"), NUM_TRAIN, NUM_TEST)


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    save = tmp_path_factory.mktemp("single") / "save"
    result = run_main("wrn", *run_args(save, data, "--sync_bn")[2:])
    assert result.returncode == 0, result.stderr
    return save


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data):
    """(folder the run was started in, its save folder, the CompletedProcess)."""
    folder = tmp_path_factory.mktemp("two_ranks")
    (folder / "torchrun_tmp").mkdir()
    result = torchrun(run_args(folder / "save", data, "--sync_bn", "--checkpoint_every", 3), folder / "torchrun_tmp")
    assert result.returncode == 0, result.stderr
    return folder, folder / "save", result


def test_two_processes_with_sync_bn_train_the_single_process_weights(data, single, two_ranks):
    _, save, _ = two_ranks
    torch.manual_seed(1)  # --seed 1: the initial weights of both runs
    initial = [net.state_dict() for net in load_folder("wrn").models.build_pair(16, 1, 100, aux=True)]
    reference, distributed = weights(single), weights(save)
    assert (distributed["epoch"], distributed["step"]) == (EPOCHS, 0)
    for index, name in enumerate(("net1", "net2")):
        assert distributed[name].keys() == reference[name].keys()  # plain state dicts: no "module." prefix
        for key, value in reference[name].items():
            torch.testing.assert_close(distributed[name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")
        keys = [key for key, value in initial[index].items() if value.is_floating_point()]
        update = torch.cat([(distributed[name][key] - initial[index][key]).flatten() for key in keys])
        reference_update = torch.cat([(reference[name][key] - initial[index][key]).flatten() for key in keys])
        assert (update - reference_update).norm() <= 1e-3 * reference_update.norm(), name
    records, reference_records = read_log(save), read_log(single)
    assert [accuracies(r) for r in records] == [accuracies(r) for r in reference_records]
    for record, reference_record in zip(records, reference_records):
        assert record["world_size"] == 2 and reference_record["world_size"] == 1
        assert record["train_loss"] == pytest.approx(reference_record["train_loss"], rel=1e-5)
        assert record["test_loss"] == pytest.approx(reference_record["test_loss"], rel=1e-5)


def test_only_rank_0_prints_and_writes(single, two_ranks):
    folder, save, result = two_ranks
    assert files_under(save) == files_under(single)  # log.txt, checkpoint.pt, net1.pt, net2.pt
    created = [name for name in files_under(folder) if not name.startswith("torchrun_tmp")]
    assert created == ["save"] + [f"save/{name}" for name in files_under(single)]
    assert result.stdout.count("epoch 1/2 ") == 1 and result.stdout.count("done: ") == 1, result.stdout


def test_sharded_test_accuracy_is_that_of_the_whole_test_set(data, two_ranks):
    # 25 test images over 2 processes: the logged numbers are those of one process evaluating the
    # run's final weights on all 25, each image counted once.
    _, save, _ = two_ranks
    modules = load_folder("wrn")
    device = torch.device("cpu")
    state = weights(save)
    nets = modules.models.build_pair(16, 1, 100, aux=True)
    for net, name in zip(nets, ("net1", "net2")):
        net.load_state_dict(state[name])
    step = modules.training.TrainingStep(nets, "dense", device)
    test_data = modules.dataset.load_dataset("CIFAR100", str(data), device)
    meter = modules.training.evaluate(step, modules.dataset.test_batches(test_data, 7))
    assert meter.count == NUM_TEST
    stats = modules.epoch_log.meter_stats("test", meter)
    record = read_log(save)[-1]
    assert accuracies({k: v for k, v in stats.items() if k.startswith("test_acc")}) == \
        {k: v for k, v in accuracies(record).items() if k.startswith("test_acc")}
    assert record["test_loss"] == pytest.approx(stats["test_loss"], rel=1e-5)


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path, data, two_ranks):
    _, save, _ = two_ranks
    result = run_main("wrn", *run_args(tmp_path / "save", data, "--sync_bn", "--resume", save / "checkpoint.pt",
                                       "--epochs", EPOCHS + 1)[2:])
    assert result.returncode == 0, result.stderr
    assert [record["epoch"] for record in read_log(tmp_path / "save")] == [EPOCHS + 1]
    assert weights(tmp_path / "save")["epoch"] == EPOCHS + 1


def test_a_resume_that_would_change_bn_batches_is_refused_by_every_process(tmp_path, data, single):
    # The single process's run normalised by the whole batch; two processes without --sync_bn
    # would normalise by halves from here on.
    (tmp_path / "torchrun_tmp").mkdir()
    result = torchrun(run_args(tmp_path / "save", data, "--resume", single / "checkpoint.pt", "--epochs", EPOCHS + 1),
                      tmp_path / "torchrun_tmp")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "trained by 1 process" in errors[0] and "2 processes would change" in errors[0] \
        and errors[0].endswith("add --sync_bn, or resume in one process"), result.stderr
    assert not (tmp_path / "save").exists()


def test_sigterm_stops_every_rank_at_one_step_and_the_checkpoint_resumes_in_one_process(tmp_path, data, two_ranks):
    # torchrun forwards SIGTERM to both processes; they agree on the step to stop after, rank 0
    # writes the checkpoint with the epoch's partial sums of both, and one process finishes the
    # run: its epochs log the numbers of the uninterrupted two-process run.
    (tmp_path / "torchrun_tmp").mkdir()
    save = tmp_path / "save"
    process = subprocess.Popen(torchrun_command(run_args(save, data, "--sync_bn", "--checkpoint_every", 1)),
                               cwd=ROOT / "wrn", env=torchrun_env(tmp_path / "torchrun_tmp"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (save / "checkpoint.pt").exists():  # training is under way
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT)
    state = weights(save)
    assert (state["epoch"], state["step"]) < (EPOCHS, 0), "the run ended before the signal"
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr, stderr
    result = run_main("wrn", *run_args(save, data, "--sync_bn", "--checkpoint_every", 1, "--resume")[2:])
    assert result.returncode == 0, result.stderr
    records, reference_records = read_log(save), read_log(two_ranks[1])
    assert [accuracies(r) for r in records] == [accuracies(r) for r in reference_records]
    for record, reference_record in zip(records, reference_records):
        assert record["train_loss"] == pytest.approx(reference_record["train_loss"], rel=1e-5)


def test_a_global_batch_the_processes_cannot_share_is_refused(tmp_path, data):
    (tmp_path / "torchrun_tmp").mkdir()
    result = torchrun(run_args(tmp_path / "save", data, "--batch_size", 15), tmp_path / "torchrun_tmp")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--batch_size 15" in errors[0] and "2 processes" in errors[0], result.stderr
    # The one traceback is torchrun's own report of a failed process (ChildFailedError).
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr, result.stderr
    assert not (tmp_path / "save").exists()


def test_one_process_refuses_nothing_it_accepted_before(tmp_path, data):
    # Without torchrun, --batch_size 15 is a batch like any other (no process group, no sharding).
    result = run_main("wrn", *run_args(tmp_path / "save", data, "--batch_size", 15, "--epochs", 1)[2:])
    assert result.returncode == 0, result.stderr
    assert read_log(tmp_path / "save")[0]["world_size"] == 1


# --- --compile under torchrun -------------------------------------------------------------------------

# Two steps of 8 + 8 images and one test shard per rank: one batch shape each to compile.
COMPILE_ARGS = ["--depth", "10", "--width", "1", "--method", "ind", "--subset", "32", "--batch_size", "16",
                "--epochs", "1", "--lr", str(LR), "--nthread", "1"]


@pytest.fixture(scope="module")
def single_eager(tmp_path_factory, data):
    save = tmp_path_factory.mktemp("single_eager") / "save"
    result = run_main("wrn", "--save", save, "--dataroot", data, *COMPILE_ARGS)
    assert result.returncode == 0, result.stderr
    return save


def test_a_compiled_two_process_run_with_sync_bn_has_no_graph_break(tmp_path, data, single_eager):
    # Compiled around DDP, Dynamo broke the graph in DDP's forward pass, twice per network; each
    # network is compiled inside DDP instead, and GlobalBatchNorm2d's all-reduces are traced. Every
    # graph is compiled afresh (Inductor's cache lives in the new temporary folder): minutes on a CPU.
    (tmp_path / "torchrun_tmp").mkdir()
    save = tmp_path / "save"
    args = ["--gpu_id", "", "--save", save, "--dataroot", data, *COMPILE_ARGS, "--compile", "--sync_bn"]
    result = subprocess.run(torchrun_command(map(str, args)), cwd=ROOT / "wrn", capture_output=True, text=True,
                            env={**torchrun_env(tmp_path / "torchrun_tmp"), "TORCH_LOGS": "graph_breaks"},
                            timeout=3 * TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    breaks = [line for line in result.stderr.splitlines() if "Graph break" in line]
    assert breaks == [], "\n".join(breaks)
    # BN over the global batch: the single process's eager run, up to float rounding.
    record, reference = read_log(save)[0], read_log(single_eager)[0]
    assert record["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    assert record["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-5)
    state, reference_state = weights(save), weights(single_eager)
    for name in ("net1", "net2"):
        for key, value in reference_state[name].items():
            torch.testing.assert_close(state[name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


def test_sync_bn_on_gpus_is_torchs_sync_batchnorm_in_eager_mode_and_global_batchnorm_when_compiled():
    # Dynamo breaks the graph at every SyncBatchNorm; a "cuda" device stands in for a GPU (the
    # conversion makes no CUDA call).
    distributed = load_folder("wrn").distributed
    group = distributed.Group(rank=0, size=2)

    def norms(device, compiled):
        net = load_folder("wrn").models.wrn(10, 1, 10, aux=False)
        return {type(module) for module in group.sync_batchnorm(net, torch.device(device), compiled).modules()
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)}

    assert norms("cuda", compiled=False) == {torch.nn.SyncBatchNorm}
    assert norms("cuda", compiled=True) == norms("cpu", compiled=False) == {distributed.GlobalBatchNorm2d}
