"""Train two networks together on CIFAR with Dense Cross-layer Mutual-distillation (DCM), or with
one of the methods the paper compares it to, from the same script:

    ind  each network alone, no auxiliary classifiers, cross-entropy only (the baseline)
    dml  no auxiliary classifiers, cross-entropy + KL between the two final classifiers
    ds   auxiliary classifiers (deep supervision), cross-entropy on all, no KL
    dcm  auxiliary classifiers, cross-entropy on all + KL along --links (default: dense)

    python wrn/main.py --depth 28 --width 10 --dataroot DATA   # or wrn_mobi/main.py, from the top folder

Without --save a run goes to ./logs/<net1>_<net2>_<method>_seed<seed> under the folder it is started in
(wrn/logs when started inside wrn/); its first line names that folder in full.

SAVE/log.txt gets one `json_stats: {...}` line per epoch, SAVE/checkpoint.pt the full training
state (`--resume` continues from it), and at the end SAVE/net1.pt and SAVE/net2.pt hold each
network without its auxiliary classifiers. `--amp`, `--tf32`, `--channels_last` and `--compile`
make it faster (training.py), `--benchmark N` measures how fast (benchmark.py). Under
`torchrun --nproc_per_node=G main.py ...` G processes share each batch (distributed.py). The
checks of the options are in options.py. This file
is identical in wrn/ and wrn_mobi/; models.build_pair() decides which two networks are trained.
"""
import signal

# Stop signals that came before the training loop listened for them (main.py run as a script). SLURM
# may send its warning (--signal) up to 60 s early, while torch still imports: recorded from the first
# line on, it does not kill the run; the training loop's safety.StopRequest takes it over.
EARLY_STOP_SIGNALS = []
if __name__ == "__main__":
    for _name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, _name):  # Windows has no USR signals
            signal.signal(getattr(signal, _name), lambda signum, frame: EARLY_STOP_SIGNALS.append(signum))

import contextlib
import json
import os
import sys
import time

import torch

import benchmark
import dataset
import distillation
import distributed
import epoch_log
import hardware
import models
import safety
import training
from checkpoint import (CheckpointError, DiskFull, Position, RankFailed, export_networks, load_checkpoint,
                        write_on_rank0)
from dcm_loss import LINKS
from options import METHODS, ArgumentParser, distillation_links, HelpFormatter, UsageError, check_options, default_save_dir, lr_drop_epochs

# --- options -------------------------------------------------------------------------------------

def option_parser():
    """main.py's options; tools/sweep.py parses the flags it passes with it, to compare them by value."""
    parser = ArgumentParser(description="DCM: two networks trained together on CIFAR.", formatter_class=HelpFormatter)
    parser.add_argument("--save", default="", type=str,
                        help="folder for log.txt, checkpoint.pt, net1.pt and net2.pt "
                             "(default: ./logs/<net1>_<net2>_<method>_seed<seed> under the folder main.py is "
                             "started in)")
    parser.add_argument("--depth", default=28, type=int, help="WRN depth (6n+4) of net 1 (and net 2 in wrn/)")
    parser.add_argument("--width", default=10, type=int, help="WRN width of net 1 (and net 2 in wrn/)")
    parser.add_argument("--dataset", default="CIFAR100", choices=dataset.DATASETS, help="what to train and test on")
    parser.add_argument("--dataroot", default="./data", type=str,
                        help="folder holding the dataset; downloaded there when missing")
    parser.add_argument("--batch_size", default=128, type=int, help="the global batch, split over torchrun's processes")
    parser.add_argument("--lr", default=0.1, type=float, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--epochs", default=200, type=int, help="epochs to train")
    parser.add_argument("--subset", default=None, type=int, metavar="N",
                        help="train on N images only, the same in every epoch: a class-balanced subset of the "
                             "training set chosen by --seed, for short runs on real data (smoke tests, debugging a "
                             "recipe; not the paper's recipe). The test set stays whole. Default: all images")
    parser.add_argument("--weight_decay", default=0.0005, type=float, help="on every parameter")
    parser.add_argument("--epoch_step", default="[60,120,160]", type=str,
                        help="JSON list of 1-based epochs at whose start the lr is multiplied by --lr_decay_ratio")
    parser.add_argument("--lr_decay_ratio", default=0.2, type=float, help="the lr's factor at each --epoch_step")
    parser.add_argument("--seed", default=1, type=int, help="initialisation, shuffling, augmentation and --subset")
    parser.add_argument("--nthread", default=None, type=int,
                        help="CPU threads for torch (default: the cores this process may use; batches are made on "
                             "the training device, no loader workers)")
    parser.add_argument("--resume", nargs="?", const=True, default="", metavar="PATH",
                        help="continue the run in --save (no PATH), or from the checkpoint file PATH")
    parser.add_argument("--checkpoint_interval", default=10.0, type=float, metavar="MINUTES",
                        help="checkpoint at the end of an epoch when the next epoch would end MINUTES or more "
                             "after the last checkpoint; the first epoch of each process, the last epoch and a stop "
                             "by a signal are always checkpointed. 0: after every epoch (safety.py)")
    parser.add_argument("--checkpoint_every", default=None, type=int, metavar="N",
                        help="also checkpoint every N steps inside an epoch, for epochs longer than you want to lose "
                             "(default: at the ends of epochs only); separate from --checkpoint_interval, which is "
                             "judged at ends of epochs, where the log line is written and the ranks agree once per "
                             "epoch, while a step count checkpoints the same steps in every run")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic algorithms (bit-exact reruns and resumes on the CPU; slower on a GPU)")
    parser.add_argument("--note", default="", type=str, help="free text copied into every log line")
    parser.add_argument("--gpu_id", default=None, type=str,
                        help="the GPU to train on (sets CUDA_VISIBLE_DEVICES; '' for the CPU). Default: GPU 0 of "
                             "the visible ones, or the CPU where there is none; under torchrun each process takes "
                             "GPU LOCAL_RANK")
    parser.add_argument("--sync_bn", action="store_true",
                        help="under torchrun, BN statistics of the global batch instead of each process's slice")
    parser.add_argument("--method", default="dcm", choices=sorted(METHODS),
                        help="ind: independent, dml: deep mutual learning, ds: deep supervision, dcm (default)")
    parser.add_argument("--links", default="dense", choices=[links for links in LINKS if links != "none"],
                        help="which classifier pairs DCM distils between (ablation); dcm only")
    kd = parser.add_argument_group("distillation of dml and dcm (the defaults are the published DCM's)")
    kd.add_argument("--temperature", default=1.0, type=float, metavar="T", help="every KL term on softmax(z / T) "
                    "of both sides, times T^2 (Hinton et al. 2015); the cross-entropy stays at T = 1")
    kd.add_argument("--kd_weight", default=1.0, type=float, metavar="L", help="the weight of every KL term")
    kd.add_argument("--kd_warmup", default=0.0, type=float, metavar="E", help="the KL weight rises over the first E "
                    "epochs, per step: L exp(-5 (1 - t)^2), t = epochs done / E (Laine & Aila 2017)")
    kd.add_argument("--kl_eps", default=1e-8, type=float, metavar="EPS", help="the KL's probabilities smoothed to "
                    "(p + EPS) / (1 + C EPS); the published 1e-8 caps each term near 18.4 nats, 0 is the plain KL")
    speed = parser.add_argument_group("speed (the defaults are the reference's fp32 eager training)")
    speed.add_argument("--amp", default="none", choices=sorted(training.AMP_DTYPES),
                       help="autocast the networks to bf16, or to fp16 with loss scaling (changes the numerics)")
    speed.add_argument("--tf32", action="store_true",
                       help="TF32 tensor cores for fp32 convolutions and matmuls on Ampere and newer GPUs "
                            "(changes the numerics; ignored on CPUs)")
    speed.add_argument("--channels_last", action="store_true", help="NHWC memory layout for networks and batches")
    speed.add_argument("--compile", action="store_true", help="torch.compile each network's forward pass and the loss")
    speed.add_argument("--eval_batch_size", default=500, type=int,
                       help="test batch size (BN in eval mode: the numbers do not depend on it)")
    speed.add_argument("--benchmark", default=None, type=int, metavar="N",
                       help="time N training steps on random in-memory data, print one line and exit "
                            "(one process: not under torchrun)")
    return parser


def parse_options(argv=None):
    opt = option_parser().parse_args(argv)
    check_options(opt)
    # One spelling of each value: '[60, 120, 160]' is logged and checkpointed as '[60,120,160]'.
    opt.epoch_step = json.dumps(lr_drop_epochs(opt), separators=(",", ":"))
    if not opt.save:
        opt.save = default_save_dir(opt)
    return opt


# --- setup ---------------------------------------------------------------------------------------

def build_training_step(opt, num_classes, device, group):
    """Net 1 and net 2 of this folder (with auxiliary classifiers when the method uses them), the
    links they distil along, the speed settings and the processes that train them."""
    hardware.set_fp32_precision(opt.tf32)  # process-wide, so set by every step built, before its first convolution
    torch.manual_seed(opt.seed)
    nets = [net.to(device) for net in models.build_pair(opt.depth, opt.width, num_classes, METHODS[opt.method].uses_aux)]
    nets = [group.sync_batchnorm(net, device, opt.compile) for net in nets] if opt.sync_bn else nets
    return training.TrainingStep(nets, training.StepSettings.from_options(opt, distillation_links(opt)), device, group)


# --- optimisation: one SGD over both networks, step lr --------------------------------------------

def create_optimizer(opt, params, lr):
    # Weight decay on every parameter (BN and biases too), as in the reference. The fused kernel
    # updates every parameter in one pass: the same update as the per-parameter loop, up to the
    # last bit (it uses fused multiply-adds). Not under --amp fp16: its GradScaler leaves a fused
    # optimizer to skip an overflowing step itself, and the fused SGD's first step makes the
    # momentum buffers uninitialised (empty_like) before it skips, so the next step reads garbage;
    # the per-parameter SGD's step the scaler skips whole, leaving no momentum behind.
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
    """The optimizer to train 1-based `epoch` with. At each lr drop the reference creates a new
    optimizer, which also resets the momentum buffers; so does this."""
    if epoch in lr_drop_epochs(opt):
        return create_optimizer(opt, params, lr_at_epoch(opt, epoch))
    return optimizer


# --- the epoch: train, test ------------------------------------------------------------------------

def train(opt, step, optimizer, data, epoch, position, checkpoints, stop):
    """Train 1-based `epoch` from `position` (past its first steps when the run resumed part-way
    through it); return its log.txt stats, or None when a stop request ended it (checkpointed)."""
    started = time.time() - position.train_time  # an epoch resumed part-way counts what it trained before
    total = dataset.num_batches(len(data.train_labels), opt.batch_size)
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
    kd_weight_at = lambda index: distillation.kd_weight_at(opt.kd_weight, opt.kd_warmup, epoch, index, total)
    meter = training.train_epoch(step, optimizer, batches, total, f"epoch {epoch}/{opt.epochs}", kd_weight_at,
                                 meter=position.meter, after_step=after_step)
    safety.check_finite(meter, epoch, lr, opt.save)
    if meter.steps < total:
        return None
    hardware.synchronize(step.device)
    return {**epoch_log.meter_stats("train", meter), "train_kd_weight": kd_weight_at(total - 1),  # the last step's
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


# --- setup ---------------------------------------------------------------------------------------

def select_device(opt):
    """The training device, and the --gpu_id and --nthread it uses (for the log)."""
    hardware.keep_freed_memory()
    try:
        device, used = hardware.select_device(opt)
    except hardware.DeviceError as error:
        raise UsageError(str(error)) from None
    hardware.warn_slow_cpu_bf16(opt, device)
    return device, used


def run_benchmark(opt, device, group):
    num_classes = dataset.NUM_CLASSES[opt.dataset]
    step = build_training_step(opt, num_classes, device, group)
    optimizer = create_optimizer(opt, step.parameters(), lr_at_epoch(opt, 1))
    pair_name = " + ".join(models.pair_names(opt.depth, opt.width))
    return benchmark.run(opt, step, optimizer, num_classes, device, pair_name)


def load_data(opt, device, group):
    """The checkpoint to resume (None: a new run), checked before the data is loaded; the data."""
    try:
        checkpoint = safety.check_save_dir(opt)
        if group.is_main:
            print(f"loading {opt.dataset} from {opt.dataroot} ...", flush=True)
        data = dataset.load_dataset(opt.dataset, opt.dataroot, device)
        if opt.subset:
            data = dataset.training_subset(data, opt.subset, opt.seed)
        group.check_split(len(data.train_labels), len(data.test_labels), opt.batch_size)
    except (CheckpointError, dataset.DatasetError) as error:
        raise UsageError(str(error)) from None
    return checkpoint, data


def resume(opt, path, step, optimizer, device):
    """Restore the checkpoint at `path`; return where the run stands, or None for a finished run
    (said so; nothing is written). log.txt in the checkpoint's own folder loses the lines written
    after it: their epochs are trained again."""
    try:
        position, log_bytes = load_checkpoint(opt, path, step, optimizer, device)
        if safety.finished_already(opt, position):
            return None
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    if os.path.abspath(os.path.dirname(path)) == os.path.abspath(opt.save):
        write_on_rank0(step.group, epoch_log.drop_lines_after, opt, log_bytes)
    return position


def announce(opt, step, data, device, position, run_info):
    """The run's first line (rank 0's: the other ranks' stdout goes nowhere)."""
    # The full path: the default --save is relative to the folder main.py was started in.
    print(f"{os.path.abspath(opt.save)}: {opt.method} ({step.settings.links} links) on {opt.dataset} "
          f"({len(data.train_labels)} training, {len(data.test_labels)} test images), {step.group}, "
          f"{hardware.device_name(device)}, {step.describe_settings()}, "
          f"from epoch {position.epoch + 1} step {position.step} to epoch {opt.epochs}, "
          f"{run_info['n_parameters'] / 1e6:.2f}M parameters trained", flush=True)


# --- the recipe ----------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opt = parse_options(argv)
    device, used = select_device(opt)
    group = distributed.start(device)
    if opt.benchmark:
        return run_benchmark(opt, device, group)
    checkpoint, data = load_data(opt, device, group)
    step = build_training_step(opt, data.num_classes, device, group)
    params = step.parameters()
    optimizer = create_optimizer(opt, params, lr_at_epoch(opt, 1))
    position = resume(opt, checkpoint, step, optimizer, device) if checkpoint else Position()
    if position is None:  # finished already
        return 0
    stop = safety.StopRequest(group)
    stop.install(EARLY_STOP_SIGNALS)
    if stop.agreed():  # a stop signal came before training began: there is nothing new to save
        return stop.report_before_training(argv)
    write_on_rank0(group, lambda: os.makedirs(opt.save, exist_ok=True))
    checkpoints = safety.Checkpoints(opt, step)
    # What every line repeats, with the device and threads select_device chose for --gpu_id and --nthread.
    run_info = {**epoch_log.run_info(step.nets, data.num_classes, group.size), **used}
    announce(opt, step, data, device, position, run_info)

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
    except UsageError as error:
        distributed.print_on_rank0(f"error: {error}")
        sys.exit(2)
    except safety.NonFiniteLoss as error:
        distributed.print_on_rank0(f"error: {error}")
        sys.exit(1)
    except DiskFull as error:  # a run that stopped part-way, as above; every rank leaves
        distributed.print_on_rank0(f"error: {error}; {error.fix(safety.resume_command(sys.argv[1:]))}")
        sys.exit(1)
    except RankFailed:  # rank 0 says why
        sys.exit(1)
    except KeyboardInterrupt:
        distributed.print_on_rank0(f"\ninterrupted at once: nothing after the last checkpoint is kept; if --save "
                                   f"holds checkpoint.pt, continue with\n  {safety.resume_command(sys.argv[1:])}")
        sys.exit(130)
    finally:
        # The run is leaving: a stop signal from here on changes neither its exit code nor its output.
        # A Ctrl-C pending now may raise while they are ignored; it has ignored the rest first.
        with contextlib.suppress(KeyboardInterrupt):
            safety.ignore_stop_signals()
        distributed.finish()
