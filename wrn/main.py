"""Train two networks together on CIFAR with Dense Cross-layer Mutual-distillation (DCM), or with one of
the methods the paper compares it to (--method: ind, dml, ds, dcm; docs/methods.md):
`python wrn/main.py --depth 28 --width 10 --dataroot DATA` (or wrn_mobi/main.py).
SAVE/log.txt gets one `json_stats: {...}` line per epoch (epoch_log.py), SAVE/checkpoint.pt the training
state that --resume continues (checkpoint.py, safety.py), and at the end SAVE/net1.pt and net2.pt hold
the networks without their auxiliary classifiers. The recipe is main(): train; test; log; save. This file
is identical in wrn/ and wrn_mobi/; models.build_pair() decides which two networks are trained.
"""
import signal

# Stop signals recorded from the first line on (main.py run as a script): SLURM's warning (--signal) may
# come while torch still imports; the training loop's safety.StopRequest takes them over.
EARLY_STOP_SIGNALS = []
if __name__ == "__main__":
    for _signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(_signum, lambda signum, frame: EARLY_STOP_SIGNALS.append(signum))

import contextlib
import os
import sys
import time

import torch

import benchmark
import dataset
import distributed
import epoch_log
import hardware
import models
import safety
import training
from checkpoint import (CheckpointError, DiskFull, Position, RankFailed, export_networks, load_checkpoint,
                        resume_command, write_on_rank0)
from dcm_loss import kd_weight_at
from options import METHODS, UsageError, distillation_links, lr_drop_epochs, parse_options


# --- setup: the pair, its optimizer and lr schedule, a resume ---------------------------------------

def build_training_step(opt, num_classes, device, group):
    """Net 1 and net 2 of this folder (with auxiliary classifiers when the method uses them), the
    links they distil along, the speed settings and the processes that train them."""
    hardware.set_fp32_precision(opt.tf32)  # process-wide, so set by every step built, before its first convolution
    torch.manual_seed(opt.seed)
    nets = models.build_pair(opt.depth, opt.width, num_classes, METHODS[opt.method].uses_aux)
    nets = [net.to(device) for net in nets]
    nets = [group.sync_batchnorm(net, device, opt.compile) for net in nets] if opt.sync_bn else nets
    return training.TrainingStep(nets, training.StepSettings.from_options(opt, distillation_links(opt)), device, group)


def create_optimizer(opt, params, lr):
    # Weight decay on every parameter (BN and biases too), as in the reference. The fused kernel gives the
    # per-parameter loop's update in one pass. Not under --amp fp16: a GradScaler leaves an overflowing step
    # to a fused optimizer, whose first step leaves the momentum uninitialised (empty_like) when it skips.
    fused = opt.amp != "fp16" and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.SGD(params, lr, momentum=0.9, weight_decay=opt.weight_decay, fused=fused or None)


def lr_at_epoch(opt, epoch):
    """The lr of 1-based `epoch`: --lr times --lr_decay_ratio for every drop epoch <= epoch."""
    lr = opt.lr
    for drop_epoch in lr_drop_epochs(opt):
        if drop_epoch <= epoch:
            lr *= opt.lr_decay_ratio
    return lr


def optimizer_for_epoch(opt, optimizer, params, epoch):
    """The optimizer of 1-based `epoch`: a new one at each lr drop, momentum reset, as in the reference."""
    if epoch in lr_drop_epochs(opt):
        return create_optimizer(opt, params, lr_at_epoch(opt, epoch))
    return optimizer


def run_benchmark(opt, device, group):
    num_classes = dataset.NUM_CLASSES[opt.dataset]
    step = build_training_step(opt, num_classes, device, group)
    optimizer = create_optimizer(opt, step.parameters(), lr_at_epoch(opt, 1))
    pair_name = " + ".join(models.pair_names(opt.depth, opt.width))
    return benchmark.run(opt, step, optimizer, num_classes, device, pair_name)


def resume(opt, path, step, optimizer, device):
    """Restore the checkpoint at `path`; return where the run stands, or None for a finished run. log.txt
    in the checkpoint's own folder loses the lines written after it: their epochs are trained again."""
    position, log_bytes = load_checkpoint(opt, path, step, optimizer, device)
    if safety.finished_already(opt, position):
        return None
    if os.path.abspath(os.path.dirname(path)) == os.path.abspath(opt.save):
        write_on_rank0(step.group, epoch_log.drop_lines_after, opt, log_bytes)
    return position


# --- the epoch: train, test ------------------------------------------------------------------------

def train(opt, step, optimizer, data, epoch, position, checkpoints, stop):
    """Train 1-based `epoch` from `position` (a run resumed part-way through it); return its log.txt
    stats, or None when a stop request ended it (checkpointed)."""
    started = time.time() - position.train_time  # an epoch resumed part-way counts what it trained before
    total = -(-len(data.train_labels) // opt.batch_size)  # batches, the last one partial
    lr = optimizer.param_groups[0]["lr"]

    def after_step(meter):
        """After every step: a stop ends the epoch, checkpointed; so is every --checkpoint_every-th
        step. The finite-loss check waits for the device, so it is made only every few steps."""
        stopping = stop.agreed()
        if stopping or checkpoints.due_in_epoch(meter.steps):
            meter = meter.summed_over(step.group)
            safety.check_finite(meter, epoch, lr, opt.save)
            checkpoints.save(Position(epoch - 1, meter.steps, meter, time.time() - started), optimizer)
        elif meter.steps % safety.FINITE_CHECK_EVERY == 0:
            safety.check_finite(meter.summed_over(step.group), epoch, lr, opt.save)
        return stopping

    batches = dataset.train_batches(data, opt.batch_size, opt.seed, epoch, first_batch=position.step)
    kd_weight = lambda index: kd_weight_at(opt.kd_weight, opt.kd_warmup, epoch, index, total)  # noqa: E731
    meter = training.train_epoch(step, optimizer, batches, total, f"epoch {epoch}/{opt.epochs}", kd_weight,
                                 meter=position.meter, after_step=after_step)
    safety.check_finite(meter, epoch, lr, opt.save)
    if meter.steps < total:
        return None
    hardware.synchronize(step.device)
    return {**epoch_log.meter_stats("train", meter), "train_kd_weight": kd_weight(total - 1),  # the last step's
            "epoch_lr": lr, "train_time": time.time() - started}


def test(opt, step, data):
    """The test set's log.txt stats (each rank tests its shard; the sums are the whole set's), with
    the published code's protocol beside them."""
    start = time.time()
    shard = step.group.bounds(len(data.test_labels))
    meter = training.evaluate(step, dataset.test_batches(data, opt.eval_batch_size, *shard))
    published_stats = epoch_log.published_protocol_stats(step, data, opt.batch_size)
    hardware.synchronize(step.device)
    return {**epoch_log.meter_stats("test", meter), **published_stats, "test_time": time.time() - start}


# --- the recipe ----------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opt = parse_options(argv)
    hardware.keep_freed_memory()
    device, used = hardware.select_device(opt)  # and the --gpu_id and --nthread it uses, for the log
    hardware.warn_slow_cpu_bf16(opt, device)
    group = distributed.start(device)
    if opt.benchmark:
        return run_benchmark(opt, device, group)
    checkpoint = safety.check_save_dir(opt)  # before the data is loaded
    print(f"loading {opt.dataset} from {opt.dataroot} ...", flush=True)
    data = dataset.load_dataset(opt.dataset, opt.dataroot, device)
    data = dataset.training_subset(data, opt.subset, opt.seed) if opt.subset else data
    group.check_split(len(data.train_labels), len(data.test_labels), opt.batch_size)
    step = build_training_step(opt, data.num_classes, device, group)
    params = step.parameters()
    optimizer = create_optimizer(opt, params, lr_at_epoch(opt, 1))
    position = resume(opt, checkpoint, step, optimizer, device) if checkpoint else Position()
    if position is None:  # finished already
        return 0
    stop = safety.StopRequest(group)
    stop.install(EARLY_STOP_SIGNALS)
    if stop.agreed():  # a stop signal came before training began: there is nothing new to save
        return stop.report(opt, argv, before_training=True)
    write_on_rank0(group, lambda: os.makedirs(opt.save, exist_ok=True))
    checkpoints = safety.Checkpoints(opt, step)
    # What every line repeats, with the device and threads select_device chose for --gpu_id and --nthread.
    run_info = {**epoch_log.run_info(step.nets, data.num_classes, group.size), **used}
    # The run's first line, with the full path: the default --save is relative to where main.py started.
    print(f"{os.path.abspath(opt.save)}: {opt.method} ({step.settings.links} links) on {opt.dataset} "
          f"({len(data.train_labels)} training, {len(data.test_labels)} test images), {group}, "
          f"{hardware.device_name(device)}, {step.describe_settings()}, from epoch {position.epoch + 1} step "
          f"{position.step} to epoch {opt.epochs}, {run_info['n_parameters'] / 1e6:.2f}M parameters trained",
          flush=True)

    for epoch in range(position.epoch + 1, opt.epochs + 1):
        if position.step == 0:  # mid-epoch, the optimizer of this epoch comes from the checkpoint
            optimizer = optimizer_for_epoch(opt, optimizer, params, epoch)
        started = time.time()
        train_stats = train(opt, step, optimizer, data, epoch, position, checkpoints, stop)
        if train_stats is None:  # a stop request ended the epoch, checkpointed
            return stop.report(opt, argv)
        stats = {**train_stats, **test(opt, step, data), "epoch": epoch, **run_info, **checkpoints.cost()}
        write_on_rank0(group, epoch_log.log_epoch, opt, stats)
        epoch_log.print_summary(stats, opt.epochs)  # stdout is rank 0's alone (distributed.start)
        position = Position(epoch)
        stopping = stop.agreed()
        if stopping or checkpoints.due(epoch, time.time() - started):  # after the line, so that it knows it
            checkpoints.save(position, optimizer)
        if stopping:
            return stop.report(opt, argv)

    # Every rank waits: one that leaves the process group while rank 0 still writes can abort (gloo).
    write_on_rank0(group, export_networks, opt, step.nets)
    print(f"done: {os.path.join(opt.save, 'net1.pt')} and net2.pt hold the networks without auxiliary classifiers")
    return 0


if __name__ == "__main__":
    # Until the training loop installs its StopRequest, Ctrl-C quits at once, then goes unheard.
    signal.signal(signal.SIGINT, safety.interrupt_at_once)
    try:
        sys.exit(main())
    except (UsageError, CheckpointError, dataset.DatasetError, hardware.DeviceError) as error:
        distributed.print_on_rank0(f"error: {error}")
        sys.exit(2)
    except (safety.NonFiniteLoss, DiskFull, RankFailed) as error:  # stopped part-way; every rank leaves
        distributed.print_on_rank0(f"error: {error}")  # RankFailed: rank 0's own error says why
        sys.exit(1)
    except KeyboardInterrupt:
        distributed.print_on_rank0(f"\ninterrupted at once: nothing after the last checkpoint is kept; if --save "
                                   f"holds checkpoint.pt, continue with\n  {resume_command(sys.argv[1:])}")
        sys.exit(130)
    finally:
        # The run is leaving: a stop signal from here on changes neither its exit code nor its output.
        # A Ctrl-C pending now may raise while they are ignored; it has ignored the rest first.
        with contextlib.suppress(KeyboardInterrupt):
            safety.ignore_stop_signals()
        distributed.finish()
