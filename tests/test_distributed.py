"""torchrun on the CPU (gloo): two processes train what one process trains, rank 0 alone writes,
sharded evaluation counts every test image once, checkpoints move between process counts where
BN's batches stay the same, a global batch that the processes cannot share is refused, a compiled
step has no graph break, --sync_bn makes one all-reduce per BN layer in each direction, and the
other ranks wait for a slow checkpoint.

The runs are short (WRN-16-1 pairs, WRN-10-1 when compiled; 21 training images: a batch of 16,
then one of 5 that two processes split 3 + 2) at the recipe's lr 0.1, where a wrong gradient shows: a
path that claims to compute what one process computes must make the same weight update (weights
minus initial weights), to a relative error far below what a gradient without the batch statistics'
share gives (about 1e-1 and up). Longer runs at lr 0.1 are chaotic: float rounding alone then
drives the weights apart (two processes against one: 2e-5 relative after 2 steps, 2e-3 after 4).
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, load_folder, read_log, run_main, write_cifar100

NUM_TRAIN, NUM_TEST, SUBSET, BATCH, EPOCHS, LR, DEPTH = 101, 25, 21, 16, 1, 0.1, 16
TIMEOUT = 300


def run_args(save, dataroot, *extra):
    return ["--gpu_id", "", "--nthread", "1", "--save", str(save), "--dataroot", str(dataroot), "--depth", str(DEPTH),
            "--width", "1", "--subset", str(SUBSET), "--batch_size", str(BATCH), "--epochs", str(EPOCHS), "--lr",
            str(LR), "--deterministic", *map(str, extra)]


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


def update_errors(state, reference_state, depth=DEPTH, aux=True):
    """Per network, |update - reference update| / |reference update|, the updates being the
    checkpointed floating-point weights minus the initial ones."""
    torch.manual_seed(1)  # --seed 1: the initial weights of both runs
    initial_weights = [net.state_dict() for net in load_folder("wrn").models.build_pair(depth, 1, 100, aux)]
    errors = {}
    for initial, name in zip(initial_weights, ("net1", "net2")):
        assert state[name].keys() == reference_state[name].keys()  # plain state dicts: no "module." prefix
        keys = [key for key, value in reference_state[name].items() if value.is_floating_point()]
        update = torch.cat([(state[name][key] - initial[key]).flatten() for key in keys])
        reference = torch.cat([(reference_state[name][key] - initial[key]).flatten() for key in keys])
        errors[name] = ((update - reference).norm() / reference.norm()).item()
    return errors


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
    result = torchrun(run_args(folder / "save", data, "--sync_bn", "--checkpoint_every", 1), folder / "torchrun_tmp")
    assert result.returncode == 0, result.stderr
    return folder, folder / "save", result


def test_two_processes_with_sync_bn_make_the_single_process_update(data, single, two_ranks):
    # Measured on torch 2.14.1 and 2.11: 4e-7 (with the batch statistics detached: 0.27 and 0.37).
    _, save, _ = two_ranks
    distributed, reference = weights(save), weights(single)
    assert (distributed["epoch"], distributed["step"]) == (EPOCHS, 0)
    errors = update_errors(distributed, reference)
    assert max(errors.values()) < 1e-4, errors
    records, reference_records = read_log(save), read_log(single)
    for record, reference_record in zip(records, reference_records):
        assert record["world_size"] == 2 and reference_record["world_size"] == 1
        assert record["train_loss"] == pytest.approx(reference_record["train_loss"], rel=1e-5)
        assert record["test_loss"] == pytest.approx(reference_record["test_loss"], rel=1e-5)


def test_only_rank_0_prints_and_writes(single, two_ranks):
    folder, save, result = two_ranks
    assert files_under(save) == files_under(single)  # log.txt, checkpoint.pt, net1.pt, net2.pt
    created = [name for name in files_under(folder) if not name.startswith("torchrun_tmp")]
    assert created == ["save"] + [f"save/{name}" for name in files_under(single)]
    assert result.stdout.count("epoch 1/1 ") == 1 and result.stdout.count("done: ") == 1, result.stdout


def test_sharded_test_accuracy_is_that_of_the_whole_test_set(data, two_ranks):
    # 25 test images over 2 processes: the logged numbers are those of one process evaluating the
    # run's final weights on all 25, each image counted once.
    _, save, _ = two_ranks
    modules = load_folder("wrn")
    device = torch.device("cpu")
    state = weights(save)
    nets = modules.models.build_pair(DEPTH, 1, 100, aux=True)
    for net, name in zip(nets, ("net1", "net2")):
        net.load_state_dict(state[name])
    step = modules.training.TrainingStep(nets, modules.training.StepSettings("dense"), device)
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


def test_sigterm_stops_every_rank_at_one_step_and_the_checkpoint_resumes_in_one_process(tmp_path, data):
    # torchrun forwards SIGTERM to both processes; they agree on the step to stop after, rank 0
    # writes the checkpoint, and one process finishes the run (10 steps).
    (tmp_path / "torchrun_tmp").mkdir()
    save = tmp_path / "save"
    args = run_args(save, data, "--sync_bn", "--checkpoint_every", 1, "--epochs", 5)
    process = subprocess.Popen(torchrun_command(args), cwd=ROOT / "wrn", env=torchrun_env(tmp_path / "torchrun_tmp"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (save / "checkpoint.pt").exists():  # training is under way
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT)
    state = weights(save)
    assert (state["epoch"], state["step"]) < (5, 0), "the run ended before the signal"
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr, stderr
    result = run_main("wrn", *args[2:], "--resume")
    assert result.returncode == 0, result.stderr
    assert [record["epoch"] for record in read_log(save)] == [1, 2, 3, 4, 5]


def test_a_global_batch_the_processes_cannot_share_is_refused(tmp_path, data):
    (tmp_path / "torchrun_tmp").mkdir()
    result = torchrun(run_args(tmp_path / "save", data, "--batch_size", 15), tmp_path / "torchrun_tmp")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--batch_size 15" in errors[0] and "2 processes" in errors[0], result.stderr
    # The one traceback is torchrun's own report of a failed process (ChildFailedError).
    assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr, result.stderr
    assert not (tmp_path / "save").exists()


def test_a_last_batch_or_test_set_smaller_than_the_process_count_is_refused():
    # 21 training images in batches of 16: a last batch of 5; 25 test images.
    modules = load_folder("wrn")
    modules.distributed.Group(rank=0, size=5).check_split(21, 25, 16)
    for size, num_test in ((6, 25), (5, 4)):
        with pytest.raises(modules.dataset.DatasetError, match=rf"last batch holds 5 images and the test set "
                                                               rf"{num_test}, fewer than the {size} processes"):
            modules.distributed.Group(rank=0, size=size).check_split(21, num_test, 16)


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
    # network is compiled inside DDP instead, and GlobalBatchNorm2d's all-reduce is traced. Every
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
    # BN over the global batch: the single process's eager update, up to Inductor's rounding.
    # Measured on torch 2.14.1 and 2.11: 4e-4 (the in-place all_reduce's compiled backward on torch
    # 2.11: 0.13 and 0.32).
    errors = update_errors(weights(save), weights(single_eager), depth=10, aux=False)
    assert max(errors.values()) < 3e-3, errors
    record, reference = read_log(save)[0], read_log(single_eager)[0]
    assert record["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-4)


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


def test_compile_with_sync_bn_is_refused_where_the_functional_all_reduce_has_no_gradient(tmp_path, data):
    # Older torch releases; a stand-in flag here.
    (tmp_path / "torchrun_tmp").mkdir()
    runner = tmp_path / "no_gradient.py"
    runner.write_text("import runpy, sys\nsys.path.insert(0, sys.argv[1])\nimport distributed\n"
                      "distributed.SUM_IS_DIFFERENTIABLE = False\nsys.argv = sys.argv[1:]\n"
                      "runpy.run_path(sys.argv[0] + '/main.py', run_name='__main__')\n")
    args = run_args(tmp_path / "save", data, "--sync_bn", "--compile")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(runner),
               str(ROOT / "wrn"), *args]
    result = subprocess.run(command, cwd=ROOT / "wrn", env=torchrun_env(tmp_path / "torchrun_tmp"),
                            capture_output=True, text=True, timeout=TIMEOUT)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--compile --sync_bn needs a torch" in errors[0], result.stderr[-3000:]
    assert "exitcode: 2" in result.stderr and not (tmp_path / "save").exists()


# --- the collectives of --sync_bn, and the wait for rank 0's checkpoint -------------------------------

class CollectiveCalls(TorchDispatchMode):
    """The all-reduces (in-place c10d or functional) dispatched while it is active, and whether a
    tensor was made from Python numbers (a host-to-device copy on a GPU)."""

    def __init__(self):
        super().__init__()
        self.all_reduces, self.from_host = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.all_reduces += func.namespace in ("c10d", "_c10d_functional") and "reduce" in func.__name__
        self.from_host += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


@pytest.fixture
def one_rank_process_group(tmp_path):
    # A process group of this process alone: the collectives run (and sum one rank).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sync_bn_makes_one_all_reduce_per_bn_layer_forward_and_one_backward(one_rank_process_group):
    modules = load_folder("wrn")
    net = modules.models.wrn(10, 1, 10, aux=False)
    net = modules.distributed.Group(rank=0, size=2).sync_batchnorm(net, torch.device("cpu"))
    layers = sum(isinstance(module, modules.distributed.GlobalBatchNorm2d) for module in net.modules())
    with CollectiveCalls() as forward:
        outputs = net(torch.randn(4, 3, 32, 32))
    with CollectiveCalls() as backward:
        sum(output.sum() for output in outputs).backward()
    assert layers == 7
    assert (forward.all_reduces, backward.all_reduces, forward.from_host) == (layers, layers, 0)


def test_sync_bn_statistics_of_two_ranks_keep_the_accuracy_of_two_passes(monkeypatch):
    # Two ranks' slices of a batch far from zero mean (1000 + N(0, 1)): the global mean and variance
    # as float64 gives them; a sum of squares minus a squared sum in fp32 is off by about 1e-1.
    distributed = load_folder("wrn").distributed
    torch.manual_seed(0)
    batch = 1000 + torch.randn(8, 3, 4, 4)
    # Momentum 1: the running statistics are this batch's.
    rank1, rank0 = (distributed.Group(rank, 2).sync_batchnorm(torch.nn.BatchNorm2d(3, momentum=1.0),
                                                              torch.device("cpu")) for rank in (1, 0))
    rank1_rows = []
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda rows: rank1_rows.append(rows) or rows)
    rank1(batch[5:])
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda rows: rows + rank1_rows[0])  # both rows
    rank0(batch[:5])
    exact = batch.double()
    torch.testing.assert_close(rank0.running_mean, exact.mean((0, 2, 3)).float(), rtol=1e-7, atol=0)
    torch.testing.assert_close(rank0.running_var, exact.var((0, 2, 3)).float(), rtol=1e-5, atol=0)


# Rank 0's first checkpoint takes SLOW_SAVE seconds, the training collectives time out after
# COLLECTIVE_TIMEOUT (stand-ins for a checkpoint on slow storage and NCCL's 10-minute watchdog).
SLOW_SAVE, COLLECTIVE_TIMEOUT = 6, 3
SLOW_SAVE_RUNNER = f"""
import datetime, runpy, sys, time
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
init_process_group = dist.init_process_group
dist.init_process_group = lambda *args, **kwargs: init_process_group(
    *args, **kwargs, timeout=datetime.timedelta(seconds={COLLECTIVE_TIMEOUT}))
import safety
save_checkpoint = safety.save_checkpoint
def slow_first_save(*args):
    time.sleep({SLOW_SAVE})
    safety.save_checkpoint = save_checkpoint
    return save_checkpoint(*args)
safety.save_checkpoint = slow_first_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0] + "/main.py", run_name="__main__")
"""


def test_the_other_ranks_wait_for_a_slow_checkpoint_without_timing_out(tmp_path, data):
    # Rank 0 saves after step 1 of 2 (slowly), after step 2 and at the end of the epoch. Without
    # --sync_bn, the first training collective after the slow save is DDP's buffer broadcast in
    # step 2.
    (tmp_path / "torchrun_tmp").mkdir()
    runner = tmp_path / "slow_save.py"
    runner.write_text(SLOW_SAVE_RUNNER)
    args = run_args(tmp_path / "save", data, "--checkpoint_every", 1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(runner),
               str(ROOT / "wrn"), *args]
    result = subprocess.run(command, cwd=ROOT / "wrn", env=torchrun_env(tmp_path / "torchrun_tmp"),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert weights(tmp_path / "save")["epoch"] == 1
