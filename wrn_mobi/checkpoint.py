"""The training state on disk: SAVE/checkpoint.pt to resume a run, SAVE/net1.pt and net2.pt to deploy.

A checkpoint holds everything the rest of the run depends on: both networks with their auxiliary
classifiers, the optimizer (momentum buffers and lr: where the run is in the schedule), the fp16
loss scale, how far the run got (epoch and step), the partial sums of the epoch in progress,
every random number generator, and the size log.txt had when it was written. Batches depend only
on (seed, epoch, step), so a run resumed from it computes exactly what the uninterrupted run would.
Under torchrun rank 0 writes it with the plain networks' state dicts and the meter summed over the
ranks: it resumes with any number of processes, or in one, as long as BN keeps normalising by the
same batches (--sync_bn, or the run's own process count; check_bn_batches).

Every file is written to a temporary file in the same folder, flushed and fsynced, then renamed
over the old one (and the folder fsynced): a crash at any point leaves the previous file whole, and
a full disk the previous file and no temporary one (DiskFull says so).
Checkpoints are plain dicts of tensors and Python values, read back with weights_only=True, so
loading one never runs code. This file is identical in wrn/ and wrn_mobi/.
"""
import errno
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._pytree import tree_leaves

import training

CHECKPOINT = "checkpoint.pt"
LOG = "log.txt"  # epoch_log.py writes it; a checkpoint records its size
AUX_PREFIXES = ("aux1.", "aux2.")  # where models.py keeps the auxiliary classifiers
# The options that may differ between a checkpoint and the run resuming it: --epochs (to extend the
# run), the speed options, where the files are, and bookkeeping. Every other option, one added later
# included, defines what is trained (networks, objective, batches, schedule): a checkpoint resumes
# only a run that gives it the checkpoint's value.
RESUMABLE_OPTIONS = ("epochs", "save", "resume", "dataroot", "nthread", "gpu_id", "note", "checkpoint_every",
                     "checkpoint_interval", "deterministic", "eval_batch_size", "amp", "tf32", "channels_last",
                     "compile", "benchmark", "sync_bn")


@dataclass
class Position:
    """Where a run stands: `epoch` epochs completed, `step` steps trained into the next one, and
    that epoch's partial meter (training.EpochMeter, summed over the ranks) and training seconds."""
    epoch: int = 0
    step: int = 0
    meter: Optional[training.EpochMeter] = None
    train_time: float = 0.0


class CheckpointError(Exception):
    """A checkpoint, or a --save folder, that cannot serve this run: the message says why and what to do."""


class DiskFull(Exception):
    """A file of the run (`path`) did not fit on its device; `needed` and `free` are bytes, free
    measured once the partial file was removed."""

    def __init__(self, path, needed):
        self.path, self.needed = path, needed
        self.free = shutil.disk_usage(os.path.dirname(path) or ".").free
        super().__init__(f"no space left on the device of {path}: writing it needs about {size_words(needed)}, "
                         f"{size_words(self.free)} free")

    def fix(self, resume_command):
        """What to do, in words: continue with `resume_command` from the checkpoint beside the file,
        which is intact (its position read without its tensors, memory-mapped), or start again."""
        folder = os.path.dirname(self.path) or "."
        path = os.path.join(folder, CHECKPOINT)
        if not os.path.isfile(path):
            return f"{folder} holds no {CHECKPOINT} yet: free some space, then remove {folder} and start the run again"
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        where = f"step {state['step']} of epoch {state['epoch'] + 1}" if state["step"] else f"epoch {state['epoch']}"
        return f"{path} ({where}) is intact: free some space, then continue with: {resume_command}"


class RankFailed(Exception):
    """Rank 0 failed to write a file of the run (write_on_rank0): raised on the other ranks, rank 0 says why."""


def size_words(count):
    """`count` bytes in words: '12.2 MB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def out_of_space(error):
    """Whether `error`, or an error it arose from, says the device or the user's quota is full
    (torch.save reports the OSError of its write as the context of a RuntimeError of its own)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def atomic_save(obj, path):
    """torch.save(obj, path) so that `path` is always either the old file or the whole new one, and
    no temporary file is left. Raises DiskFull where the new file did not fit."""
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
            # About its size: torch.save writes each tensor's storage, and little else.
            needed = sum(leaf.untyped_storage().nbytes() for leaf in tree_leaves(obj) if isinstance(leaf, torch.Tensor))
            raise DiskFull(path, needed) from None
        raise
    fsync_folder(os.path.dirname(path) or ".")


def fsync_folder(folder):
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rng_states():
    """The generators the run draws from: torch's on the host and on each GPU (the batches are
    drawn from generators of their own, seeded by (seed, epoch))."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    """Restore the generators rng_states() saved; `states` as loaded onto the host (their tensors on the CPU)."""
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        # Those of the GPUs this process sees: a run of several processes may resume in one.
        torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])


def save_checkpoint(opt, position, step, optimizer):
    """SAVE/checkpoint.pt: the run at `position` (a Position), with the size log.txt has now, whose
    lines after it a resume cuts off. Returns the file's size in bytes."""
    net1, net2 = step.nets
    log = os.path.join(opt.save, LOG)
    state = {
        "epoch": position.epoch,
        "step": position.step,
        "epoch_meter": position.meter.state_dict() if position.step else None,
        "epoch_train_time": position.train_time,
        "net1": net1.state_dict(),
        "net2": net2.state_dict(),
        "optimizer": optimizer.state_dict(),
        "grad_scaler": step.scaler.state_dict(),  # empty unless --amp fp16
        "options": vars(opt),
        "world_size": step.group.size,  # the processes that shared each batch (BN's batches without --sync_bn)
        "rng_states": rng_states(),
        "log_bytes": os.path.getsize(log) if os.path.exists(log) else 0,
    }
    path = os.path.join(opt.save, CHECKPOINT)
    atomic_save(state, path)
    return os.path.getsize(path)


def mismatched_options(opt, saved_options):
    """'--NAME SAVED (not GIVEN)' for every option outside RESUMABLE_OPTIONS whose value differs
    from the checkpoint's (options.parse_options spells each value one way: '[60,120,160]', 0.1)."""
    return [f"--{name} {saved_options.get(name)} (not {value})" for name, value in vars(opt).items()
            if name not in RESUMABLE_OPTIONS and saved_options.get(name) != value]


def bn_slices(world_size, sync_bn):
    """Into how many slices of the global batch BN computes its statistics: each process's slice
    without --sync_bn, the whole batch in one process or with --sync_bn."""
    return world_size if world_size > 1 and not sync_bn else 1


def processes(count, sync_bn):
    return f"{count} process{'es' if count != 1 else ''}" + (" with --sync_bn" if sync_bn and count > 1 else "")


def check_bn_batches(path, saved_world_size, saved_sync_bn, world_size, sync_bn):
    """Refuse to resume a run with a process count and --sync_bn that give BN other batches than
    the checkpoint's run had (the recipe would change mid-run); raise CheckpointError naming both."""
    if bn_slices(saved_world_size, saved_sync_bn) == bn_slices(world_size, sync_bn):
        return
    if bn_slices(saved_world_size, saved_sync_bn) == 1:
        fix = "add --sync_bn, or resume in one process"
        saved_batches = "the whole batch"
    else:
        fix = f"resume it with {saved_world_size} processes in all and without --sync_bn"
        saved_batches = f"each process's 1/{saved_world_size} of the batch"
    raise CheckpointError(f"--resume {path} was trained by {processes(saved_world_size, saved_sync_bn)}, BN "
                          f"normalising by {saved_batches}; {processes(world_size, sync_bn)} would change that "
                          f"mid-run: {fix}")


def load_checkpoint(opt, path, step, optimizer, device):
    """Restore the checkpoint at `path` into the networks, the optimizer, the loss scaler and the
    RNGs; return (its Position, whose partial meter is on `device`, the training device; the size
    log.txt had when it was written)."""
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign pickle: the error below says it
            warnings.simplefilter("ignore")
            # Onto the host, whatever the training device: the RNG states and the Python numbers
            # are used there, and load_state_dict moves the networks' and the optimizer's tensors
            # to their parameters' device.
            state = torch.load(path, map_location="cpu", weights_only=True)
        saved_options = state["options"]
    except Exception as error:  # truncated, corrupt, or needing arbitrary unpickling (refused unrun)
        raise CheckpointError(f"--resume {path} is not a checkpoint this script can load safely "
                              f"({type(error).__name__}): it is truncated, corrupt, or holds objects that only "
                              f"arbitrary unpickling would load, which is refused; give another file") from None
    mismatched = mismatched_options(opt, saved_options)
    if mismatched:
        raise CheckpointError(f"--resume {path} belongs to another run: it was trained with {', '.join(mismatched)}; "
                              f"rerun with the run's own flags")
    check_bn_batches(path, state["world_size"], saved_options["sync_bn"], step.group.size, opt.sync_bn)
    net1, net2 = step.nets
    try:
        net1.load_state_dict(state["net1"])
        net2.load_state_dict(state["net2"])
    except RuntimeError:
        raise CheckpointError(f"--resume {path} holds networks of another shape (trained by the other folder, "
                              f"wrn/ or wrn_mobi/?); resume it where it was trained") from None
    optimizer.load_state_dict(state["optimizer"])
    match_parameter_layouts(optimizer)
    if step.scaler.is_enabled() and state["grad_scaler"]:
        step.scaler.load_state_dict(state["grad_scaler"])
    set_rng_states(state["rng_states"])
    meter = None
    if state["epoch_meter"] is not None:
        meter = training.EpochMeter()
        meter.load_state_dict(state["epoch_meter"], device)
        if not step.group.is_main:  # rank 0 holds the sums of all ranks; the others go on from zero
            meter.clear_sums()
    return Position(state["epoch"], state["step"], meter, state["epoch_train_time"]), state["log_bytes"]


def write_on_rank0(group, write, *args):
    """write(*args) on rank 0 alone, every rank waiting for it (collective, on distributed.Group's
    CPU control group). A failure there (DiskFull, or any other) is raised on rank 0, and as
    RankFailed on every other rank: all leave together instead of waiting for rank 0 in the next
    collective until a timeout."""
    failure = None
    if group.is_main:
        try:
            write(*args)
        except BaseException as error:  # a second Ctrl-C too: the other ranks must not wait for rank 0
            failure = error
    if group.any(failure is not None):
        raise failure or RankFailed("rank 0 failed to write a file of the run")


def match_parameter_layouts(optimizer):
    """Give every per-parameter state tensor of `optimizer` (SGD's momentum_buffer) its parameter's
    memory layout. load_state_dict keeps the saved layout, and a resume may change --channels_last:
    the fused SGD walks a parameter and its momentum as flat arrays in memory order, so on a CPU
    an NCHW momentum would be applied to the weights of an NHWC parameter in another order (CUDA's
    fused SGD refuses the mismatched strides)."""
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                param_state[key] = torch.empty_like(param).copy_(value)  # empty_like keeps param's strides


def export_networks(opt, nets):
    """SAVE/net1.pt, SAVE/net2.pt: state dicts without the auxiliary classifiers, loadable into
    models.wrn(..., aux=False) / models.mobilenet(..., aux=False)."""
    for index, net in enumerate(nets, start=1):
        # contiguous(): the same plain NCHW tensors whether or not the run trained in channels_last.
        backbone = {key: value.cpu().contiguous() for key, value in net.state_dict().items()
                    if not key.startswith(AUX_PREFIXES)}
        atomic_save(backbone, os.path.join(opt.save, f"net{index}.pt"))
