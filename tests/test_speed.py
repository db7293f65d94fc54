"""The speed settings (--amp, --tf32, --channels_last, --compile), evaluation batches, the CPU allocator
setting and `main.py --benchmark`. All on the CPU; no test is timed.

The steps of the speed settings and of resumes with other settings are built by main.py's own
functions in this process and compared with the reference's fp32 eager step by their weight updates.
"""
import ctypes
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_folder, read_log, run_main, write_cifar100

ONE_BATCH = 32  # the training set of a main.py run of one step per epoch

BENCHMARK_LINE = re.compile(
    r"^benchmark \| (?P<pair>[^|]+) \| (?P<method>\w+) \((?P<links>\w+) links\) \| batch (?P<batch>\d+) \| "
    r"(?P<settings>[^|]+) \| (?P<device>[^|]+) \| (?P<images>[\d.]+) img/s \| (?P<ms>[\d.]+) ms/step \| "
    r"(?P<tflops>[\d.]+) TFLOP/s \| peak (?P<memory_kind>GPU memory|process RSS) (?P<memory>[\d.]+) GiB \| "
    r"pipeline efficiency (?P<efficiency>[\d.]+)$")


def run_ok(folder, *args, **kwargs):
    result = run_main(folder, *args, **kwargs)
    assert result.returncode == 0, f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# --- one training step of every setting against the fp32 eager step ---------------------------------
# A setting that computes another gradient shows in the weight update of one SGD step at the
# recipe's lr 0.1 (w_after - w_before), and not always in the loss: a gradient term dropped in one
# path leaves the loss as it was. Each test compares ||update - reference|| / ||reference||, each
# network's parameters as one vector, against a tolerance between the error of the real setting and
# that of a gradient made wrong in that setting's path alone, both measured here (torch 2.14.1):
#   bf16 0.13 and fp16 0.045, against 0.82 with the auxiliary classifiers' outputs detached under
#   autocast (bf16 keeps 8 bits of mantissa); channels_last 4e-4, resumes that change it 2e-3, and
#   compiled 4e-6, against 0.05 to 0.1 with half the gradient of net 1's KL terms in that path only.
# In this process, on 8 images: an eager step of WRN-16-1 takes well under a second.

CPU = torch.device("cpu")
DCM_16_1 = ["--depth", "16", "--width", "1"]  # DCM's 6 classifiers and 18 KL terms
DML_10_1 = ["--depth", "10", "--width", "1", "--method", "dml"]  # the smallest pair that distils: compiled fast


def step_and_optimizer(argv):
    """main.py's options, training step (networks initialised by --seed) and optimizer for `argv`."""
    modules = load_folder("wrn")
    opt = modules.options.parse_options(["--nthread", "1", *map(str, argv)])
    step = modules.main.build_training_step(opt, 100, CPU, modules.distributed.Group())
    return opt, step, modules.main.create_optimizer(opt, step.parameters(), opt.lr)


def batch(seed, size=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 100, (size,), generator=generator)


def flat_weights(step):
    # flatten() reads in logical (N, C, H, W) order whatever the memory layout.
    return [torch.cat([p.detach().flatten() for p in net.parameters()]) for net in step.nets]


def update(step, optimizer, images, targets):
    """[net 1's, net 2's] weight update of one training step on the batch."""
    before = flat_weights(step)
    step.set_mode(training=True)
    step.train(images, targets, optimizer, step.settings.kd_weight)
    return [after - b for after, b in zip(flat_weights(step), before)]


def relative_error(updates, reference):
    """The larger of the two networks' ||update - reference|| / ||reference||."""
    return max(((u - r).norm() / r.norm()).item() for u, r in zip(updates, reference))


def first_update(argv):
    _, step, optimizer = step_and_optimizer(argv)
    return update(step, optimizer, *batch(0))


@pytest.fixture(scope="module")
def fp32_dcm_update():
    return first_update(DCM_16_1)


@pytest.mark.parametrize("flags, tolerance", [(["--amp", "bf16"], 0.25), (["--amp", "fp16"], 0.1),
                                              (["--channels_last"], 1e-2)], ids=["bf16", "fp16", "channels_last"])
def test_a_speed_setting_makes_the_fp32_steps_update(fp32_dcm_update, flags, tolerance):
    assert relative_error(first_update(DCM_16_1 + flags), fp32_dcm_update) < tolerance


def test_a_compiled_step_makes_the_eager_steps_update(monkeypatch):
    # Dynamo imports the modules of the code it traces by name (torch 2.11): the folder's, as in main.py.
    for name, module in vars(load_folder("wrn")).items():
        monkeypatch.setitem(sys.modules, name, module)
    # A compiled graph per network and one for the loss; channels_last too, as on GPUs.
    assert relative_error(first_update(DML_10_1 + ["--compile", "--channels_last"]),
                          first_update(DML_10_1)) < 1e-3


# --- resuming with other speed settings --------------------------------------------------------------

def resumed_and_uninterrupted(tmp_path, saved_flags, resumed_flags, loss_scale=None):
    """A run checkpointed after its first step (its fp16 loss scale set to `loss_scale` first) and
    resumed from there with `resumed_flags`, and the same run going on uninterrupted; for each,
    (its training step, the weight update of its second step)."""
    modules = load_folder("wrn")
    opt, step, optimizer = step_and_optimizer(DCM_16_1 + ["--save", tmp_path, *saved_flags])
    update(step, optimizer, *batch(0))  # momentum from here on
    if loss_scale:
        step.scaler.update(loss_scale)
    modules.checkpoint.save_checkpoint(opt, modules.checkpoint.Position(epoch=1), step, optimizer)
    resumed_opt, resumed, resumed_optimizer = step_and_optimizer(DCM_16_1 + ["--save", tmp_path, *resumed_flags])
    modules.checkpoint.load_checkpoint(resumed_opt, str(tmp_path / "checkpoint.pt"), resumed, resumed_optimizer, CPU)
    images, targets = batch(1)
    return ((resumed, update(resumed, resumed_optimizer, images, targets)),
            (step, update(step, optimizer, images, targets)))


@pytest.mark.parametrize("saved_flags, resumed_flags", [([], ["--channels_last"]), (["--channels_last"], [])],
                         ids=["to_channels_last", "from_channels_last"])
def test_a_resume_that_changes_channels_last_makes_the_uninterrupted_update(tmp_path, saved_flags, resumed_flags):
    # The momentum must take each parameter's layout: the fused SGD walks both in memory order.
    (_, resumed), (_, uninterrupted) = resumed_and_uninterrupted(tmp_path, saved_flags, resumed_flags)
    assert relative_error(resumed, uninterrupted) < 1e-2


def test_an_fp16_run_resumes_with_its_loss_scale_and_momentum(tmp_path):
    # 1024: a loss scale the first steps do not reach by themselves.
    (resumed, resumed_update), (step, uninterrupted_update) = resumed_and_uninterrupted(
        tmp_path, ["--amp", "fp16"], ["--amp", "fp16"], loss_scale=1024.0)
    assert resumed.scaler.state_dict() == step.scaler.state_dict() and step.scaler.get_scale() == 1024.0
    assert relative_error(resumed_update, uninterrupted_update) == 0


def test_channels_last_run_exports_plain_contiguous_networks(tmp_path):
    opt, step, _ = step_and_optimizer(DCM_16_1 + ["--save", tmp_path, "--channels_last"])
    load_folder("wrn").checkpoint.export_networks(opt, step.nets)
    net = load_folder("wrn").models.wrn(16, 1, 100, aux=False)
    state = torch.load(tmp_path / "net1.pt", weights_only=True)
    assert all(tensor.is_contiguous() for tensor in state.values())
    net.load_state_dict(state)


# --- the precision of fp32 work ----------------------------------------------------------------------

@pytest.mark.parametrize("flags, tf32", [([], False), (["--tf32"], True)], ids=["default", "tf32"])
def test_the_tf32_option_sets_both_fp32_precisions(flags, tf32):
    # PyTorch's defaults differ (cuDNN TF32 on, cuBLAS off): the option, not PyTorch, decides both,
    # on every device, when the step is built (tools/preflight.py builds one per setting). The
    # other precision first, and the default after, through the project's own setter.
    modules = load_folder("wrn")
    modules.hardware.set_fp32_precision(not tf32)
    try:
        opt = modules.options.parse_options(["--depth", "10", "--width", "1", "--method", "ind", *flags])
        modules.main.build_training_step(opt, 10, torch.device("cpu"), modules.distributed.Group())
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (tf32, tf32)
    finally:
        modules.hardware.set_fp32_precision(False)


def test_settings_say_whether_fp32_work_runs_in_tf32():
    modules = load_folder("wrn")
    nets = modules.models.build_pair(10, 1, 10, aux=False)

    def settings(device, **speed):
        # A "cuda" device stands in for a GPU: building the step makes no CUDA call.
        settings = modules.training.StepSettings("none", **speed)
        return modules.training.TrainingStep(nets, settings, torch.device(device)).describe_settings()

    assert settings("cpu") == settings("cuda") == "fp32, eager"
    assert settings("cuda", tf32=True) == "tf32, eager"
    assert settings("cpu", tf32=True) == "fp32, eager"  # a CPU has no TF32
    assert settings("cuda", tf32=True, amp="bf16") == "amp bf16, eager"


# --- evaluation does not depend on its batch size ---------------------------------------------------

@pytest.mark.parametrize("folder_name", ["wrn", "wrn_mobi"])
def test_evaluation_numbers_do_not_depend_on_the_batch_size(folder_name):
    modules = load_folder(folder_name)
    device = torch.device("cpu")
    data = modules.dataset.random_image_data(16, 10, device, seed=3)
    data.test_images, data.test_labels = data.train_images[:13], data.train_labels[:13]
    torch.manual_seed(0)
    nets = modules.models.build_pair(16, 1, 10, aux=True)
    step = modules.training.TrainingStep(nets, modules.training.StepSettings("dense"), device)
    optimizer = torch.optim.SGD(step.parameters(), 0.1)
    # Two training steps move the BN running statistics away from their initial (0, 1).
    modules.training.train_epoch(step, optimizer, modules.dataset.train_batches(data, 8, 1, 1), 2, "train",
                                 lambda index: 1.0)
    buffers = [{name: b.clone() for name, b in net.named_buffers()} for net in nets]

    meters = [modules.training.evaluate(step, modules.dataset.test_batches(data, size)) for size in (3, 13)]
    assert meters[0].accuracies() == meters[1].accuracies()
    assert meters[0].loss() == pytest.approx(meters[1].loss(), rel=1e-5)
    assert meters[0].count == meters[1].count == 13
    # Eval mode: the pass reads the running statistics and leaves them as they were.
    for net, saved in zip(nets, buffers):
        assert all(torch.equal(b, saved[name]) for name, b in net.named_buffers())


def test_main_logs_the_speed_settings_and_uses_the_eval_batch_size(tmp_path):
    data = write_cifar100(tmp_path / "data", ONE_BATCH, 20)
    save = tmp_path / "save"
    # --tf32: ignored on a CPU, but logged.
    run_ok("wrn", "--save", save, "--dataroot", data, "--depth", 16, "--width", 1, "--batch_size", ONE_BATCH,
           "--epochs", 1, "--nthread", 1, "--eval_batch_size", 7, "--amp", "bf16", "--tf32", "--channels_last")
    record, = read_log(save)
    assert (record["amp"], record["tf32"], record["channels_last"], record["compile"]) == ("bf16", True, True, False)
    assert record["eval_batch_size"] == 7
    # 20 test images, counted whole over batches of 7, 7 and 6.
    assert (record["test_acc_net1"] * 20 / 100) == pytest.approx(round(record["test_acc_net1"] * 20 / 100))


# --- FLOPs of a training step -----------------------------------------------------------------------

@pytest.mark.parametrize("folder_name, forward_gflop_per_image", [("wrn", 0.139 + 0.139), ("wrn_mobi", 0.139 + 2.579)])
def test_training_step_costs_three_forward_passes(folder_name, forward_gflop_per_image):
    # Backward = input gradients + weight gradients, each as costly as the forward pass (the first
    # convolution has no input gradient). torch's own formula counts the MobileNet's depthwise
    # weight gradients ~channels times too high; the benchmark's must not.
    modules = load_folder(folder_name)
    device = torch.device("cpu")
    torch.manual_seed(0)
    step = modules.training.TrainingStep(modules.models.build_pair(16, 1, 100, aux=True),
                                         modules.training.StepSettings("dense"), device)
    images, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2,))
    ratio = modules.benchmark.training_step_flops(step, images, targets) / (2 * forward_gflop_per_image * 1e9)
    assert 2.9 < ratio < 3.02, ratio
    assert all(p.grad is None for p in step.parameters())


def test_convolution_backward_formula_counts_groups():
    convolution_backward_flops = load_folder("wrn").benchmark.convolution_backward_flops
    grad_out, x = (8, 64, 16, 16), (8, 64, 32, 32)
    dense_weight, depthwise_weight = (64, 64, 3, 3), (64, 1, 3, 3)
    forward_dense = 2 * 8 * 64 * 64 * 9 * 16 * 16
    args = (None, (2, 2), (1, 1), (1, 1), False, (0, 0))
    assert convolution_backward_flops(grad_out, x, dense_weight, *args, 1, [True, True, False]) == 2 * forward_dense
    assert convolution_backward_flops(grad_out, x, depthwise_weight, *args, 64, [True, True, False]) == \
        2 * forward_dense // 64
    assert convolution_backward_flops(grad_out, x, dense_weight, *args, 1, [False, True, False]) == forward_dense


# --- the CPU allocator -----------------------------------------------------------------------------

REUSE_PROBE = """
import resource, torch
def faults_per_reuse():
    # The fewest page faults over several allocations of a 64 MB block (far above glibc's default
    # mmap threshold), each freed before the next: the kernel itself adds faults now and then.
    torch.empty(16 << 20).fill_(1)
    counts = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 << 20).fill_(1)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts)
"""


def glibc():
    try:
        return hasattr(ctypes.CDLL(None), "mallopt")
    except OSError:
        return False


def probe(code):
    result = subprocess.run([sys.executable, "-c", REUSE_PROBE + code], cwd=ROOT / "wrn", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not glibc(), reason="the allocator setting is glibc's")
def test_freed_memory_is_reused_without_page_faults_inside_a_running_main():
    pages = (64 << 20) // 4096
    # Control: a plain process faults every page of a reallocated 64 MB block in again.
    assert probe("print(faults_per_reuse())") > pages / 2
    # The same probe in a process where main.py has run (a one-step benchmark) faults almost none.
    ran_main = probe("import sys; sys.path.insert(0, '.'); import main\n"
                     "main.main(['--gpu_id', '', '--nthread', '1', '--depth', '10', '--width', '1', '--method', 'ind',"
                     " '--batch_size', '4', '--benchmark', '1'])\n"
                     "print(faults_per_reuse())")
    assert ran_main < pages / 20


# --- main.py --benchmark ------------------------------------------------------------------------------

@pytest.mark.parametrize("folder_name", ["wrn", "wrn_mobi"])
def test_benchmark_prints_one_line_with_every_figure_and_writes_nothing(tmp_path, folder_name):
    result = run_ok(folder_name, "--benchmark", 2, "--depth", 16, "--width", 1, "--batch_size", 4,
                    "--nthread", 1, "--channels_last", cwd=tmp_path)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    match = BENCHMARK_LINE.match(lines[0])
    assert match, lines[0]
    figures = match.groupdict()
    net2 = "wrn-16-1" if folder_name == "wrn" else "mobilenet"
    assert figures["pair"] == f"wrn-16-1 + {net2}" and figures["method"] == "dcm" and figures["links"] == "dense"
    assert figures["batch"] == "4" and figures["settings"] == "fp32, channels_last, eager"
    assert figures["memory_kind"] == "process RSS"
    for key in ("images", "ms", "tflops", "memory", "efficiency"):
        assert float(figures[key]) > 0, key
    # img/s is printed to 0.1: on a slow machine (~1 img/s) that rounding alone is a few %.
    seconds = float(figures["ms"]) / 1e3
    assert float(figures["images"]) * seconds == pytest.approx(4, abs=0.04 + 0.05 * seconds)
    assert list(tmp_path.iterdir()) == [], "--benchmark must not write files"
    phases = [line for line in result.stderr.splitlines() if line.startswith("benchmark: ")]
    assert len(phases) == 4 and "warm-up" in phases[1], result.stderr  # each phase says it has started


def test_the_kl_weight_tensor_is_made_once_and_again_only_when_the_weight_changes(monkeypatch):
    # Every step passes the KL weight to the (compiled) loss as a 0-dim tensor on the device: made once, not
    # per step, and anew only when a warm-up changes the weight.
    _, step, optimizer = step_and_optimizer(DML_10_1)
    made, full = [], torch.full
    monkeypatch.setattr(torch, "full", lambda *args, **kwargs: made.append(args[1]) or full(*args, **kwargs))
    images, targets = batch(0, size=4)
    for weight in (1.0, 1.0, 1.0, 0.5, 0.5):
        step.train(images, targets, optimizer, weight)
    assert made == [1.0, 0.5]
