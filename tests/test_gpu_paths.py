"""The paths a GPU or a torchrun run takes that a CPU run does not, each shown on the CPU with a
stand-in: a checkpoint loaded for an accelerator (its tensors refuse .numpy(), as CUDA tensors do),
fp16 loss scaling whose first step after the optimizer is made overflows, a resume that would
change BN's batches, and the question whether a GPU computes in bf16 natively."""

import pytest
import torch
from torch.utils._pytree import tree_map

from conftest import load_folder

TINY = ["--depth", "10", "--width", "1", "--method", "ind", "--dataset", "synthetic"]


def options(folder, save, *argv):
    return load_folder(folder).options.parse_options(["--save", str(save), *TINY, *argv])


def tiny_step(folder, device=torch.device("cpu"), amp="none"):
    """Two WRN-10-1 without auxiliary classifiers on `device`, trained as main.py's --method ind
    (wrn_mobi's MobileNet would make fp16 on a CPU, which emulates it, take minutes)."""
    modules = load_folder(folder)
    torch.manual_seed(0)
    with device:
        nets = [modules.models.wrn(10, 1, num_classes=10, aux=False) for _ in range(2)]
    return modules.training.TrainingStep(nets, modules.training.StepSettings("none", amp=amp), device)


def batch(count=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 32, 32, generator=generator), torch.randint(0, 10, (count,), generator=generator)


# --- a resume onto an accelerator --------------------------------------------------------------------

class AcceleratorTensor(torch.Tensor):
    """A tensor as the host sees a CUDA tensor: .numpy() refuses; anything computed from it (its
    .cpu() copy included) is a plain host tensor."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")


def load_as_on_an_accelerator(real_load):
    """torch.load whose tensors, unless mapped to the CPU, come back as AcceleratorTensors."""
    def load(f, map_location=None, **kwargs):
        state = real_load(f, map_location="cpu", **kwargs)
        if str(map_location) == "cpu":
            return state
        return tree_map(lambda value: value.as_subclass(AcceleratorTensor) if isinstance(value, torch.Tensor)
                        else value, state)
    return load


@pytest.mark.filterwarnings("ignore:.*meta parameter")  # the meta networks take no values: nothing to check there
def test_a_checkpoint_resumes_onto_an_accelerator_with_the_host_state_on_the_host(folder, tmp_path, monkeypatch):
    # "meta" stands for the training device of a GPU run: the networks, the optimizer and the
    # meter live there; the Python numbers must come from the host.
    modules = load_folder(folder)
    opt = options(folder, tmp_path)
    step = tiny_step(folder)
    optimizer = modules.main.create_optimizer(opt, step.parameters(), 0.1)
    meter = modules.training.EpochMeter()
    for seed in range(2):
        images, targets = batch(seed=seed)
        outputs_net1, outputs_net2, terms = step.train(images, targets, optimizer, 1.0)
        meter.update(terms, outputs_net1, outputs_net2, targets)
    tmp_path.mkdir(exist_ok=True)
    modules.checkpoint.save_checkpoint(opt, modules.checkpoint.Position(0, 2, meter, 1.5), step, optimizer)

    device = torch.device("meta")
    resumed = tiny_step(folder, device)
    resumed_optimizer = modules.main.create_optimizer(opt, resumed.parameters(), 0.1)
    monkeypatch.setattr(torch, "load", load_as_on_an_accelerator(torch.load))
    position, log_bytes = modules.checkpoint.load_checkpoint(opt, str(tmp_path / "checkpoint.pt"), resumed,
                                                             resumed_optimizer, device)

    assert (position.epoch, position.step, position.train_time, log_bytes) == (0, 2, 1.5, 0)
    buffers = [resumed_optimizer.state[p]["momentum_buffer"] for p in resumed.parameters()]
    assert len(buffers) == len(resumed.parameters()) and all(buffer.device == device for buffer in buffers)
    resumed_meter = position.meter
    assert (resumed_meter.count, resumed_meter.steps) == (meter.count, meter.steps)
    tensors = [value for value in vars(resumed_meter).values() if isinstance(value, torch.Tensor)]
    assert len(tensors) == 3 and all(tensor.device == device for tensor in tensors)


# --- fp16 loss scaling --------------------------------------------------------------------------------

def test_an_overflowing_first_step_after_the_optimizer_is_made_is_skipped_whole(folder, tmp_path):
    # The first step of a run, and of every lr drop (a new optimizer), may overflow under fp16's
    # initial loss scale: an inf pixel makes it certain. The step must leave the weights as they
    # were and no momentum behind, and the next steps must train on.
    modules = load_folder(folder)
    opt = options(folder, tmp_path, "--amp", "fp16")
    step = tiny_step(folder, amp=opt.amp)
    params = step.parameters()
    optimizer = modules.main.create_optimizer(opt, params, 0.1)
    images, targets = batch()
    images[0, 0, 0, 0] = float("inf")
    before = [p.detach().clone() for p in params]
    step.train(images, targets, optimizer, 1.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "the overflowing step changed weights"
    assert not any(optimizer.state[p] for p in params), "the overflowing step left optimizer state"
    assert step.scaler.get_scale() < 2.0 ** 16
    for seed in (1, 2):
        step.train(*batch(seed=seed), optimizer, 1.0)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_without_loss_scaling_the_optimizer_stays_the_fused_sgd(folder, tmp_path, amp):
    # The default fp32 step (and bf16's) keeps its update, bit for bit.
    opt = options(folder, tmp_path, "--amp", amp)
    assert load_folder(folder).main.create_optimizer(opt, [torch.nn.Parameter(torch.ones(2))], 0.1).defaults["fused"]


# --- a resume that would change BN's batches ----------------------------------------------------------

@pytest.mark.parametrize("saved,given", [
    ((1, False), (1, False)), ((4, False), (4, False)), ((4, True), (2, True)), ((1, False), (8, True)),
    ((4, True), (1, False)), ((1, True), (3, True)),
])
def test_a_resume_that_keeps_bn_batches_is_accepted(saved, given):
    load_folder("wrn").checkpoint.check_bn_batches("c.pt", *saved, *given)


@pytest.mark.parametrize("saved,given,fix", [
    ((4, False), (1, False), "resume it with 4 processes in all and without --sync_bn"),
    ((4, False), (2, False), "resume it with 4 processes in all and without --sync_bn"),
    ((4, False), (4, True), "resume it with 4 processes in all and without --sync_bn"),
    ((1, False), (2, False), "add --sync_bn, or resume in one process"),
    ((2, True), (4, False), "add --sync_bn, or resume in one process"),
])
def test_a_resume_that_changes_bn_batches_is_refused_naming_both_counts_and_the_fix(saved, given, fix):
    checkpoint = load_folder("wrn").checkpoint
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.check_bn_batches("c.pt", *saved, *given)
    message = str(error.value)
    assert message.startswith("--resume c.pt was trained by ") and message.endswith(fix)
    assert f"by {saved[0]} process" in message and f"; {given[0]} process" in message


# --- TF32: one precision, whatever API set it before ---------------------------------------------------

def fp32_precision_readings():
    """What every reader of the running torch says about fp32 convolutions and matmuls: the old
    flags and the global matmul precision, and on torch 2.9 and later each backend's
    fp32_precision. A reader that finds the APIs mixed raises."""
    backends = torch.backends
    readings = {"cudnn.allow_tf32": backends.cudnn.allow_tf32, "matmul.allow_tf32": backends.cuda.matmul.allow_tf32,
                "matmul precision": torch.get_float32_matmul_precision()}
    if hasattr(backends, "fp32_precision"):
        readings.update({"cuda.matmul": backends.cuda.matmul.fp32_precision,
                         "cudnn.conv": backends.cudnn.conv.fp32_precision,
                         "cudnn.rnn": backends.cudnn.rnn.fp32_precision,
                         "mkldnn.matmul": backends.mkldnn.matmul.fp32_precision,
                         "mkldnn.conv": backends.mkldnn.conv.fp32_precision})
    return readings


@pytest.fixture
def hardware(folder):
    """hardware.py of `folder`; the run's default precision (IEEE fp32) is set back afterwards,
    through its own setter (how a torch release exposes its flags is not the tests' business)."""
    module = load_folder(folder).hardware
    yield module
    module.set_fp32_precision(False)


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("earlier", ["highest", "high", "medium"])
def test_the_fp32_precision_is_set_consistently_after_a_user_s_own_setting(hardware, earlier, tf32):
    # A user's set_float32_matmul_precision("high") and then the old flags alone left oneDNN's
    # matmuls in TF32 and cuBLAS's in IEEE fp32 on torch 2.11 and 2.14: get_float32_matmul_precision()
    # (inductor's max-autotune calls it) raised.
    torch.set_float32_matmul_precision(earlier)
    hardware.set_fp32_precision(tf32)
    readings = fp32_precision_readings()
    expected = {"cudnn.allow_tf32": tf32, "matmul.allow_tf32": tf32, "matmul precision": "high" if tf32 else "highest"}
    if hasattr(torch.backends, "fp32_precision"):
        precision = "tf32" if tf32 else "ieee"
        # The CPU's (oneDNN's) work stays IEEE fp32: --tf32 is for GPUs.
        expected.update({"cuda.matmul": precision, "cudnn.conv": precision, "cudnn.rnn": precision,
                         "mkldnn.matmul": "ieee", "mkldnn.conv": "ieee"})
    assert readings == expected
