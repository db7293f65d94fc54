"""`python main.py --benchmark N [model and speed flags]`: how fast this machine trains the pair, on random images
made in memory (nothing is read or written); docs/speed.md explains the line it prints. Same in wrn/ and wrn_mobi/."""
import itertools
import math
import sys
import time

import torch

import dataset
import hardware
import training

WARMUP_STEPS = 3  # the first steps pick cuDNN algorithms and, with --compile, compile the step


def run(opt, step, optimizer, num_classes, device, pair_name):
    """Time the bare step and the real epoch code for opt.benchmark steps each; print the line on
    stdout, and each phase as it starts on stderr (a slow machine or a compile takes minutes)."""
    data = dataset.random_image_data(opt.benchmark * opt.batch_size, num_classes, device, seed=opt.seed)
    images, targets = next(dataset.train_batches(data, opt.batch_size, opt.seed, epoch=1))
    kd_weight = step.settings.kd_weight

    def phase(name):
        print(f"benchmark: {name} ...", file=sys.stderr, flush=True)

    def bare_steps(count):
        for _ in range(count):
            step.train(images, targets, optimizer, kd_weight)

    def epoch_code(epoch, steps):
        batches = itertools.islice(dataset.train_batches(data, opt.batch_size, opt.seed, epoch), steps)
        training.train_epoch(step, optimizer, batches, steps, "benchmark", lambda index: kd_weight).loss()

    phase("counting the FLOPs of one step")
    flops_per_step = training_step_flops(step, images, targets)
    phase(f"warm-up, {WARMUP_STEPS} steps" + (" (compiling the step)" if step.settings.compile else ""))
    bare_steps(WARMUP_STEPS)
    hardware.reset_peak_memory(device)  # the allocator counts on the host: no need to wait for the device
    phase(f"timing {opt.benchmark} bare steps")
    bare_seconds = timed(device, lambda: bare_steps(opt.benchmark))
    phase(f"timing {WARMUP_STEPS} + {opt.benchmark} steps of the epoch code")
    epoch_code(0, WARMUP_STEPS)
    epoch_seconds = timed(device, lambda: epoch_code(1, opt.benchmark))
    memory, memory_kind = hardware.peak_memory(device)

    seconds_per_step = bare_seconds / opt.benchmark
    fields = ["benchmark", pair_name, f"{opt.method} ({step.settings.links} links)", f"batch {opt.batch_size}",
              step.describe_settings(), hardware.device_name(device), f"{opt.batch_size / seconds_per_step:.1f} img/s",
              f"{seconds_per_step * 1e3:.2f} ms/step", f"{flops_per_step / seconds_per_step / 1e12:.3f} TFLOP/s",
              f"peak {memory_kind} {memory / 2 ** 30:.2f} GiB",
              f"pipeline efficiency {bare_seconds / epoch_seconds:.3f}"]
    print(" | ".join(fields), flush=True)


def timed(device, work):
    """Wall-clock seconds of work(), including what it queued on the device."""
    hardware.synchronize(device)
    start = time.perf_counter()
    work()
    hardware.synchronize(device)
    return time.perf_counter() - start


def convolution_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                               transposed, _output_padding, _groups, output_mask, out_shape=None):
    """FLOPs of aten.convolution_backward: the input gradient and the weight gradient each cost one forward
    convolution, 2 * batch * (weight elements, per group) * filter positions. Replaces torch.utils.flop_counter's
    own formula, whose weight gradient ignores `groups` and so counts a depthwise convolution's backward pass
    ~channels times too high (the MobileNet)."""
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

