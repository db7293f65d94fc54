"""What main.py's options may be: the methods, the checks of a command line with the message that
says what to do instead, --epoch_step's epochs, and the run folder a run gets without --save.
Every mistake is a UsageError: main.py prints its one line and exits with code 2. This file is
identical in wrn/ and wrn_mobi/.
"""
import argparse
import json
import math
import os
from typing import NamedTuple, Optional

import dataset
import distillation
import distributed
import models
import training
from dcm_loss import LINKS

class Method(NamedTuple):
    uses_aux: bool  # auxiliary classifiers on both networks
    links: Optional[str]  # the distillation links (dcm_loss.LINKS); None: those of --links


METHODS = {"ind": Method(uses_aux=False, links="none"), "dml": Method(uses_aux=False, links="final"),
           "ds": Method(uses_aux=True, links="none"), "dcm": Method(uses_aux=True, links=None)}


class UsageError(Exception):
    """A mistake in the command line or in the files it names: one message, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action):  # every default worth showing, unless the help text already says it
        shown = action.default not in (None, "", False, argparse.SUPPRESS) and "default" not in (action.help or "")
        return (action.help or "") + (" (default: %(default)s)" if shown else "")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line like every other mistake, not argparse's usage block
        raise UsageError(f"{message} (see --help)")


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


def check_options(opt):
    """Raise a UsageError naming the first option that main.py cannot train with, and the fix."""
    uses_aux = METHODS[opt.method].uses_aux
    if opt.depth < 10 or (opt.depth - 4) % 6 != 0:
        raise UsageError(f"--depth {opt.depth} is not a WRN depth: use 6n+4 (10, 16, 22, 28, 40, ...)")
    if uses_aux and opt.depth < 16:
        raise UsageError(f"--depth {opt.depth} is too shallow for the auxiliary classifiers of --method "
                         f"{opt.method}: use --depth 16 or more, or --method ind / dml")
    positive = {"--width": opt.width, "--batch_size": opt.batch_size, "--epochs": opt.epochs,
                "--lr": opt.lr, "--lr_decay_ratio": opt.lr_decay_ratio, "--nthread": opt.nthread,
                "--eval_batch_size": opt.eval_batch_size, "--benchmark": opt.benchmark,
                "--checkpoint_every": opt.checkpoint_every, "--subset": opt.subset}
    for flag, value in positive.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{flag} must be a positive number, got {value}")
    if opt.seed < 0:  # numpy's generators (shuffling, augmentation, --subset) take no negative seed
        raise UsageError(f"--seed must be 0 or more, got {opt.seed}")
    if not (opt.weight_decay >= 0 and math.isfinite(opt.weight_decay)):
        raise UsageError(f"--weight_decay must be >= 0, got {opt.weight_decay}")
    if not (opt.checkpoint_interval >= 0 and math.isfinite(opt.checkpoint_interval)):
        raise UsageError(f"--checkpoint_interval must be >= 0 minutes (0: after every epoch), "
                         f"got {opt.checkpoint_interval}")
    if problem := distillation.option_error(opt, has_kl=distillation_links(opt) != "none"):
        raise UsageError(problem)
    lr_drop_epochs(opt)  # raises UsageError on a malformed --epoch_step
    if opt.method != "dcm" and opt.links != "dense":
        raise UsageError(f"--links chooses DCM's distillation pairs; --method {opt.method} has fixed links "
                         f"(drop --links, or use --method dcm)")
    if "," in (opt.gpu_id or ""):
        raise UsageError(f"--gpu_id takes one GPU, got {opt.gpu_id!r}; start one run per GPU "
                         f"(for instance one seed on each), or one run over several with torchrun")
    ranks = distributed.launched_ranks()
    if opt.batch_size % ranks:
        raise UsageError(f"--batch_size {opt.batch_size} is the global batch: {ranks} processes cannot share it "
                         f"evenly; use a multiple of {ranks}")
    if ranks > 1 and (opt.gpu_id not in (None, "0", "") or opt.benchmark):
        raise UsageError("under torchrun each process trains on GPU LOCAL_RANK (choose the GPUs with "
                         "CUDA_VISIBLE_DEVICES, or --gpu_id '' for the CPU), and --benchmark runs without torchrun")


def distillation_links(opt):
    """The classifier pairs the run distils between (dcm_loss.LINKS): its method's, or --links for dcm."""
    return METHODS[opt.method].links or opt.links


def lr_drop_epochs(opt):
    """The 1-based epochs of --epoch_step, e.g. [60, 120, 160]."""
    try:
        epochs = json.loads(opt.epoch_step)
    except json.JSONDecodeError:
        epochs = None
    if (not isinstance(epochs, list) or not all(type(e) is int and e > 0 for e in epochs)
            or epochs != sorted(set(epochs))):
        raise UsageError(f"--epoch_step must be a JSON list of increasing positive epochs like '[60,120,160]', "
                         f"got {opt.epoch_step!r}")
    return epochs


def default_save_dir(opt):
    method = opt.method if opt.links == "dense" else f"{opt.method}-{opt.links}"
    return os.path.join("logs", f"{'_'.join(models.pair_names(opt.depth, opt.width))}_{method}_seed{opt.seed}")
