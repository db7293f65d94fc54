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

import distillation
import distributed
import models

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
