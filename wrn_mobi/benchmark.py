"""`python main.py --benchmark N [model and speed flags]`: how fast this machine trains the pair.

Times N training steps after a warm-up and prints one line:
  img/s and ms/step    of the bare step (forward, loss, backward, SGD) on a batch made in advance
  TFLOP/s              the step's FLOPs (counted by torch.utils.flop_counter) over its time
  % of matmul peak     that against a dense matmul of the same dtype timed in the same run
  peak memory          of the GPU's tensors, or of the process on a CPU
  pipeline efficiency  img/s of the real epoch code (batches drawn and augmented by dataset.py,
                       loss terms, meters, progress bar) over img/s of the bare step
The data are random images made in memory: no dataset is read and nothing is written.
This file is identical in wrn/ and wrn_mobi/.
"""
import itertools
import math
import sys
import time

import torch
from tqdm import tqdm

import dataset
import hardware
import training

WARMUP_STEPS = 3  # the first steps pick cuDNN algorithms and, with --compile, compile the step
MATMUL_SHAPE = {"cuda": (8192, 10), "cpu": (1024, 1)}  # (matrix size, matmuls per timing)
MATMUL_SECONDS = 0.5


def run(opt, step, optimizer, num_classes, device, pair_name):
    """Time the bare step and the real epoch code for opt.benchmark steps each; print the line."""
    data = dataset.random_image_data(opt.benchmark * opt.batch_size, num_classes, device, seed=opt.seed)
    images, targets = next(dataset.train_batches(data, opt.batch_size, opt.seed, epoch=1))
    announce("counting the FLOPs of one step")
    flops_per_step = training_step_flops(step, images, targets)

    announce(f"warm-up, {WARMUP_STEPS} steps" + (" (compiling the step)" if step.settings.compile else ""))
    for _ in steps(WARMUP_STEPS, "warm-up"):
        step.train(images, targets, optimizer, step.settings.kd_weight)
    hardware.synchronize(device)
    hardware.reset_peak_memory(device)
    announce(f"timing {opt.benchmark} bare steps")
    bare_seconds = timed(device, lambda: [step.train(images, targets, optimizer, step.settings.kd_weight)
                                          for _ in steps(opt.benchmark, "bare step")])

    announce(f"timing {WARMUP_STEPS} + {opt.benchmark} steps of the epoch code")
    warmup_batches = itertools.islice(dataset.train_batches(data, opt.batch_size, opt.seed, epoch=0), WARMUP_STEPS)
    kd_weight_at = lambda index: step.settings.kd_weight  # noqa: E731
    training.train_epoch(step, optimizer, warmup_batches, WARMUP_STEPS, "warm-up", kd_weight_at)
    epoch_seconds = timed(device, lambda: training.train_epoch(
        step, optimizer, dataset.train_batches(data, opt.batch_size, opt.seed, epoch=1), opt.benchmark,
        "benchmark", kd_weight_at).loss())
    memory, memory_kind = hardware.peak_memory(device)

    announce(f"timing the matmul peak ({MATMUL_SECONDS} s)")
    peak_name, peak_flops = matmul_peak(device, step.amp_dtype, step.settings.tf32 and device.type == "cuda")
    seconds_per_step = bare_seconds / opt.benchmark
    achieved = flops_per_step / seconds_per_step
    fields = [
        "benchmark",
        pair_name,
        f"{opt.method} ({step.settings.links} links)",
        f"batch {opt.batch_size}",
        step.describe_settings(),
        hardware.device_name(device),
        f"{opt.batch_size / seconds_per_step:.1f} img/s",
        f"{seconds_per_step * 1e3:.2f} ms/step",
        f"{achieved / 1e12:.3f} TFLOP/s",
        f"{100 * achieved / peak_flops:.1f}% of {peak_name} matmul peak {peak_flops / 1e12:.3f} TFLOP/s",
        f"peak {memory_kind} {memory / 2 ** 30:.2f} GiB",
        f"pipeline efficiency {bare_seconds / epoch_seconds:.3f}",
    ]
    print(" | ".join(fields), flush=True)


def announce(phase):
    """One line on stderr as each phase starts (a slow machine or a compile takes minutes); stdout
    holds the result line only."""
    print(f"benchmark: {phase} ...", file=sys.stderr, flush=True)


def steps(count, description):
    """range(count), with a progress bar on a terminal: it reads nothing from the device."""
    return tqdm(range(count), desc=description, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def timed(device, work):
    """Wall-clock seconds of work(), including what it queued on the device."""
    hardware.synchronize(device)
    start = time.perf_counter()
    work()
    hardware.synchronize(device)
    return time.perf_counter() - start


def convolution_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                               transposed, _output_padding, _groups, output_mask, out_shape=None):
    """FLOPs of aten.convolution_backward: the input gradient and the weight gradient each cost one
    forward convolution, 2 * batch * (weight elements, per group) * filter positions.

    Replaces torch.utils.flop_counter's own formula, whose weight gradient ignores `groups` and
    so counts a depthwise convolution's backward pass ~channels times too high (the MobileNet).
    """
    positions = math.prod(x_shape[2:] if transposed else grad_out_shape[2:])
    forward = 2 * grad_out_shape[0] * math.prod(w_shape) * positions
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def training_step_flops(step, images, targets):
    """FLOPs of one forward and backward pass of both networks and the loss (eager, same batch)."""
    # Imported here, not by main.py's every start: a CUDA torch without triton logs "triton not
    # found; flop counting will not work for triton kernels" when the module is imported.
    from torch.utils.flop_counter import FlopCounterMode

    step.set_mode(training=True)
    custom = {torch.ops.aten.convolution_backward: convolution_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        *_, loss = step.forward_and_loss(images, targets, step.settings.kd_weight, eager=True)
        loss.backward()
    for net in step.nets:
        net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(device, amp_dtype, tf32):
    """(dtype name, FLOP/s) of the fastest of several timed square matmuls in the step's dtype:
    TF32 when the step's fp32 work runs in TF32 (--tf32 on a GPU; hardware.set_fp32_precision has
    set cuBLAS's matmuls to it, as cuDNN's convolutions)."""
    dtype = amp_dtype or torch.float32
    name = "tf32" if tf32 and dtype == torch.float32 else \
        {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    size, repeats = MATMUL_SHAPE.get(device.type, MATMUL_SHAPE["cpu"])
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + MATMUL_SECONDS
    while time.perf_counter() < deadline:
        seconds = timed(device, lambda: [a @ b for _ in range(repeats)])
        best = max(best, repeats * 2 * size ** 3 / seconds)
    return name, best
