"""The training state on disk: SAVE/checkpoint.pt to resume a run (a plain dict loaded with
weights_only=True: loading never runs code), SAVE/net1.pt and net2.pt to deploy; every file written
atomically. What a checkpoint holds and why: docs/interrupting.md. Identical in wrn/ and wrn_mobi/."""
import errno
import os
import shlex
import sys
import warnings
from dataclasses import dataclass

import torch

import training

CHECKPOINT = "checkpoint.pt"
LOG = "log.txt"  # epoch_log.py writes it; a checkpoint records its size
AUX_PREFIXES = ("aux1.", "aux2.")  # where models.py keeps the auxiliary classifiers
# The options a resume may change (--epochs, speed, paths, bookkeeping); every other option, one added
# later included, defines what is trained and must keep the checkpoint's value.
RESUMABLE_OPTIONS = ("epochs", "save", "resume", "dataroot", "nthread", "gpu_id", "note", "checkpoint_every",
                     "checkpoint_interval", "deterministic", "eval_batch_size", "amp", "tf32", "channels_last",
                     "compile", "benchmark", "sync_bn")


@dataclass
class Position:
    """`epoch` epochs completed, `step` steps into the next, its partial meter (summed over the ranks) and seconds."""
    epoch: int = 0
    step: int = 0
    meter: training.EpochMeter | None = None
    train_time: float = 0.0


class CheckpointError(Exception):
    """A checkpoint, or a --save folder, that cannot serve this run: the message says why and what to do."""


class DiskFull(Exception):
    """A file of the run (`path`) did not fit on its device; atomic_save left the checkpoint beside it whole."""

    def __init__(self, path):
        folder = os.path.dirname(path) or "."
        checkpoint = os.path.join(folder, CHECKPOINT)
        fix = (f"{checkpoint} is intact: free some space, then continue with: {resume_command(sys.argv[1:])}"
               if os.path.isfile(checkpoint) else
               f"{folder} holds no {CHECKPOINT} yet: free some space, then remove {folder} and start the run again")
        super().__init__(f"no space left on the device of {path}; {fix}")


class RankFailed(Exception):
    """Rank 0 failed to write a file of the run (write_on_rank0): raised on the other ranks, rank 0 says why."""


def resume_command(argv):
    """The command line that continues this run: its own arguments, --resume instead of any --resume."""
    kept, after_resume = [], False
    for argument in argv:  # --resume's optional PATH: the next argument, unless it is an option
        if not (argument.startswith("--resume") or after_resume and not argument.startswith("--")):
            kept.append(argument)
        after_resume = argument == "--resume"
    return shlex.join(["python", sys.argv[0], *kept, "--resume"])


def out_of_space(error):
    """Whether `error`, or one it arose from (torch.save wraps its OSError), says the device or quota is full."""
    while error is not None and not (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)):
        error = error.__cause__ or error.__context__
    return error is not None


def atomic_save(obj, path):
    """torch.save(obj, path) so that `path` is always either the old file or the whole new one, and no temporary
    file is left; durable. Returns the file's size in bytes; raises DiskFull where the new file did not fit."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # also a second Ctrl-C in the middle of the write
        if os.path.exists(temporary):
            os.remove(temporary)
        if out_of_space(error):
            raise DiskFull(path) from None
        raise
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)  # the rename made durable
    os.fsync(folder)
    os.close(folder)
    return os.path.getsize(path)


def save_checkpoint(opt, position, step, optimizer):
    """SAVE/checkpoint.pt: the run at `position` (a Position); returns the file's size in bytes."""
    log = os.path.join(opt.save, LOG)
    state = {
        "epoch": position.epoch,
        "step": position.step,
        "epoch_meter": position.meter.state_dict() if position.step else None,
        "epoch_train_time": position.train_time,
        **{f"net{index}": net.state_dict() for index, net in enumerate(step.nets, start=1)},
        "optimizer": optimizer.state_dict(),
        "grad_scaler": step.scaler.state_dict(),  # empty unless --amp fp16
        "options": vars(opt),
        "world_size": step.group.size,  # the processes that shared each batch (BN's batches without --sync_bn)
        "log_bytes": os.path.getsize(log) if os.path.exists(log) else 0,  # a resume cuts off log.txt after it
    }
    return atomic_save(state, os.path.join(opt.save, CHECKPOINT))


def mismatched_options(opt, saved_options):
    """'--NAME SAVED (not GIVEN)' per option outside RESUMABLE_OPTIONS changed (parse_options spells values one way)."""
    return [f"--{name} {saved_options.get(name)} (not {value})" for name, value in vars(opt).items()
            if name not in RESUMABLE_OPTIONS and saved_options.get(name) != value]


def check_bn_batches(path, saved_world_size, saved_sync_bn, world_size, sync_bn):
    """CheckpointError for a resume whose process count and --sync_bn give BN other batches than its run's."""
    processes = lambda count, sync: f"{count} process{'es' * (count > 1)}" + " with --sync_bn" * sync  # noqa: E731
    saved = 1 if saved_sync_bn else saved_world_size  # the slices of each batch BN normalises by
    if saved != (1 if sync_bn else world_size):
        fix = ("add --sync_bn, or resume in one process" if saved == 1
               else f"resume it with {saved_world_size} processes in all and without --sync_bn")
        raise CheckpointError(f"--resume {path} was trained by {processes(saved_world_size, saved_sync_bn)}; "
                              f"{processes(world_size, sync_bn)} would change BN's batches mid-run: {fix}")


def load_checkpoint(opt, path, step, optimizer, device):
    """Restore `path` into the nets, optimizer and loss scaler; return (its Position, meter on `device`; log bytes)."""
    try:  # onto the host: load_state_dict moves the tensors to their parameters' device
        with warnings.catch_warnings():  # torch's warnings about a foreign pickle: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
        saved_options = state["options"]
    except Exception as error:  # truncated, corrupt, or needing arbitrary unpickling (refused unrun)
        raise CheckpointError(f"--resume {path} is not a checkpoint this script can load safely "
                              f"({type(error).__name__}): truncated, corrupt, or needing arbitrary unpickling "
                              f"(refused); give another file") from None
    if mismatched := mismatched_options(opt, saved_options):
        raise CheckpointError(f"--resume {path} belongs to another run: it was trained with {', '.join(mismatched)}; "
                              f"rerun with the run's own flags")
    check_bn_batches(path, state["world_size"], saved_options["sync_bn"], step.group.size, opt.sync_bn)
    try:
        for index, net in enumerate(step.nets, start=1):
            net.load_state_dict(state[f"net{index}"])
    except RuntimeError:
        raise CheckpointError(f"--resume {path} holds networks of another shape (trained by the other folder, "
                              f"wrn/ or wrn_mobi/?); resume it where it was trained") from None
    optimizer.load_state_dict(state["optimizer"])
    # load_state_dict keeps the momentum's saved memory layout, and a resume may change --channels_last:
    # the fused SGD walks a parameter and its momentum as flat arrays (CPU: elements mixed up; CUDA: refused).
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                param_state[key] = torch.empty_like(param).copy_(value)  # empty_like keeps param's strides
    if step.scaler.is_enabled() and state["grad_scaler"]:
        step.scaler.load_state_dict(state["grad_scaler"])
    meter = None
    if state["epoch_meter"] is not None:
        meter = training.EpochMeter()
        meter.load_state_dict(state["epoch_meter"], device)
        if not step.group.is_main:  # rank 0 holds the sums of all ranks; the others go on from zero
            meter.clear_sums()
    return Position(state["epoch"], state["step"], meter, state["epoch_train_time"]), state["log_bytes"]


def write_on_rank0(group, write, *args):
    """write(*args) on rank 0 alone (collective): a failure is raised there, and as RankFailed on the others."""
    failure = None
    if group.is_main:
        try:
            write(*args)
        except BaseException as error:  # a second Ctrl-C too: the other ranks must not wait for rank 0
            failure = error
    if group.any(failure is not None):
        raise failure or RankFailed("rank 0 failed to write a file of the run")


def export_networks(opt, nets):
    """SAVE/net1.pt, net2.pt: state dicts without the auxiliary classifiers, for models.py's nets with aux=False."""
    for index, net in enumerate(nets, start=1):
        # contiguous(): the same plain NCHW tensors whether or not the run trained in channels_last.
        backbone = {key: value.cpu().contiguous() for key, value in net.state_dict().items()
                    if not key.startswith(AUX_PREFIXES)}
        atomic_save(backbone, os.path.join(opt.save, f"net{index}.pt"))
