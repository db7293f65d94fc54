"""main.py's options and their checks. Every mistake is a UsageError: main.py prints its one line and
exits with code 2. This file is identical in wrn/ and wrn_mobi/.
"""
import argparse
import json
import math
import os
from typing import NamedTuple, Optional

import dataset
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


def number_type(convert, positive):
    """An argparse type: `convert`(text), finite and > 0 (`positive`) or >= 0."""
    def parse(text):
        value = convert(text)
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise argparse.ArgumentTypeError(f"must be {'>' if positive else '>='} 0, got {text}")
        return value
    parse.__name__ = convert.__name__  # argparse's "invalid int value: '1.5'"
    return parse


POSITIVE_INT, POSITIVE, NONNEGATIVE_INT, NONNEGATIVE = (number_type(convert, positive) for positive in (True, False)
                                                        for convert in (int, float))


def option_parser():
    """main.py's options; tools/sweep.py parses the flags it passes with it, to compare them by value."""
    parser = ArgumentParser(description="DCM: two networks trained together on CIFAR.", formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--save", default="", help="folder for log.txt, checkpoint.pt, net1.pt and net2.pt (default: "
        "./logs/<net1>_<net2>_<method>_seed<seed> under the folder main.py is started in)")
    add("--depth", default=28, type=int, help="WRN depth (6n+4) of net 1 (and net 2 in wrn/)")
    add("--width", default=10, type=POSITIVE_INT, help="WRN width of net 1 (and net 2 in wrn/)")
    add("--dataset", default="CIFAR100", choices=dataset.DATASETS, help="what to train and test on")
    add("--dataroot", default="./data", help="folder holding the dataset; downloaded there when missing")
    add("--batch_size", default=128, type=POSITIVE_INT, help="the global batch, split over torchrun's processes")
    add("--lr", default=0.1, type=POSITIVE, help="SGD learning rate (momentum 0.9)")
    add("--epochs", default=200, type=POSITIVE_INT, help="epochs to train")
    add("--subset", default=None, type=POSITIVE_INT, metavar="N", help="train on N images only: a class-balanced "
        "subset of the training set chosen by --seed, for short runs on real data (not the paper's recipe)")
    add("--weight_decay", default=0.0005, type=NONNEGATIVE, help="on every parameter")
    add("--epoch_step", default="[60,120,160]",
        help="JSON list of 1-based epochs at whose start the lr is multiplied by --lr_decay_ratio")
    add("--lr_decay_ratio", default=0.2, type=POSITIVE, help="the lr's factor at each --epoch_step")
    add("--seed", default=1, type=NONNEGATIVE_INT, help="initialisation, shuffling, augmentation and --subset")
    add("--nthread", default=None, type=POSITIVE_INT, help="CPU threads (default: the cores this process may use)")
    add("--resume", nargs="?", const=True, default="", metavar="PATH",
        help="continue the run in --save (no PATH), or from the checkpoint file PATH")
    add("--checkpoint_interval", default=10.0, type=NONNEGATIVE, metavar="MINUTES",
        help="checkpoint at the end of an epoch when the next epoch would end MINUTES or more after the last "
             "checkpoint (0: after every epoch); the first and last epochs and a stop are always checkpointed")
    add("--checkpoint_every", default=None, type=POSITIVE_INT, metavar="N", help="also every N steps in an epoch")
    add("--deterministic", action="store_true", help="deterministic algorithms (slower on a GPU)")
    add("--note", default="", help="free text copied into every log line")
    add("--gpu_id", default=None, help="the GPU to train on (sets CUDA_VISIBLE_DEVICES; '' for the CPU). Default: "
        "GPU 0 of the visible ones, or the CPU; under torchrun each process takes GPU LOCAL_RANK")
    add("--sync_bn", action="store_true", help="under torchrun, BN statistics of the global batch, not each slice's")
    add("--method", default="dcm", choices=sorted(METHODS),
        help="ind: independent, dml: deep mutual learning, ds: deep supervision, dcm (default)")
    add("--links", default="dense", choices=[name for name in LINKS if name != "none"],
        help="which classifier pairs dcm distils between (ablation)")
    # Every option of this group belongs to the KL terms: parse_options refuses it changed for ind and ds.
    parser.distillation = kd = parser.add_argument_group("distillation of dml and dcm (defaults: the published DCM's)")
    kd.add_argument("--temperature", default=1.0, type=POSITIVE, metavar="T", help="every KL term on "
                    "softmax(z / T) of both sides, times T^2 (Hinton et al. 2015); the cross-entropy stays at T = 1")
    kd.add_argument("--kd_weight", default=1.0, type=NONNEGATIVE, metavar="L", help="the weight of every KL term")
    kd.add_argument("--kd_warmup", default=0.0, type=NONNEGATIVE, metavar="E", help="the KL weight rises over the "
                    "first E epochs, per step: L exp(-5 (1 - t)^2), t = epochs done / E (Laine & Aila 2017)")
    kd.add_argument("--kl_eps", default=1e-8, type=NONNEGATIVE, metavar="EPS", help="the KL's probabilities "
                    "smoothed to (p + EPS) / (1 + C EPS); the published 1e-8 caps each term near 18.4 nats")
    speed = parser.add_argument_group("speed (the defaults are the reference's fp32 eager training)")
    speed.add_argument("--amp", default="none", choices=sorted(training.AMP_DTYPES),
                       help="autocast the networks to bf16, or to fp16 with loss scaling (changes the numerics)")
    speed.add_argument("--tf32", action="store_true", help="TF32 tensor cores for fp32 convolutions and matmuls "
                       "on Ampere and newer GPUs (changes the numerics; ignored on CPUs)")
    speed.add_argument("--channels_last", action="store_true", help="NHWC memory layout for networks and batches")
    speed.add_argument("--compile", action="store_true", help="torch.compile each network's forward pass and the loss")
    speed.add_argument("--eval_batch_size", default=500, type=POSITIVE_INT, help="test batch size (BN in eval mode)")
    speed.add_argument("--benchmark", default=None, type=POSITIVE_INT, metavar="N",
                       help="time N training steps on random in-memory data, print one line and exit")
    return parser


def parse_options(argv=None):
    """main.py's checked options; --save filled in, --epoch_step spelled one way ('[60,120,160]')."""
    parser = option_parser()
    opt = parser.parse_args(argv)
    check_options(opt)
    changed = [action.option_strings[0] for action in parser.distillation._group_actions
               if getattr(opt, action.dest) != action.default]
    if distillation_links(opt) == "none" and changed:
        raise UsageError(f"--method {opt.method} has no KL term: drop {', '.join(changed)} (or use dml or dcm)")
    opt.epoch_step = json.dumps(lr_drop_epochs(opt), separators=(",", ":"))
    opt.save = opt.save or default_save_dir(opt)
    return opt


def default_save_dir(opt):
    method = opt.method if opt.links == "dense" else f"{opt.method}-{opt.links}"
    return os.path.join("logs", f"{'_'.join(models.pair_names(opt.depth, opt.width))}_{method}_seed{opt.seed}")


def check_options(opt):
    """Raise a UsageError naming the first option main.py cannot train with, and the fix."""
    if opt.depth < 10 or (opt.depth - 4) % 6 != 0:
        raise UsageError(f"--depth {opt.depth} is not a WRN depth: use 6n+4 (10, 16, 22, 28, 40, ...)")
    if METHODS[opt.method].uses_aux and opt.depth < 16:
        raise UsageError(f"--depth {opt.depth} is too shallow for the auxiliary classifiers of --method "
                         f"{opt.method}: use --depth 16 or more, or --method ind / dml")
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
    """The 1-based epochs of --epoch_step, e.g. [60, 120, 160]; UsageError where it is malformed."""
    try:
        epochs = json.loads(opt.epoch_step)
    except json.JSONDecodeError:
        epochs = None
    if (not isinstance(epochs, list) or not all(type(e) is int and e > 0 for e in epochs)
            or epochs != sorted(set(epochs))):
        raise UsageError(f"--epoch_step must be a JSON list of increasing positive epochs like '[60,120,160]', "
                         f"got {opt.epoch_step!r}")
    return epochs
