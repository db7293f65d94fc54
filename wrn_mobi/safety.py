"""Keeping a run safe to interrupt: a --save folder that holds no other run, stop signals, when to checkpoint,
and the guard against a non-finite loss; under torchrun the ranks decide together and rank 0 writes. The rules
and their reasons: docs/interrupting.md. Identical in wrn/ and wrn_mobi/."""
import os
import shlex
import signal
import sys
import time

import distributed
from checkpoint import CHECKPOINT, LOG, CheckpointError, resume_command, save_checkpoint, write_on_rank0

# The signals that stop a run, and its exit code for each (SLURM's --signal warns with USR1 or USR2).
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 143, signal.SIGUSR2: 143}
FINITE_CHECK_EVERY = 20  # steps; the check waits for the device, so it is not made after every step


class NonFiniteLoss(Exception):
    """The loss stopped being finite: the message names where, and what to do."""


def ignore_stop_signals():
    """Ignore every stop signal from here on: the run is leaving, its exit code decided (a handler would print
    a traceback from atexit callbacks, the default action replace the exit code); a pending Ctrl-C still raises."""
    for signum in EXIT_CODES:
        signal.signal(signum, signal.SIG_IGN)


def interrupt_at_once(signum=signal.SIGINT, frame=None):
    """Ctrl-C's handler before the training loop, and the second Ctrl-C in it: quit at once (exit 130)."""
    ignore_stop_signals()
    raise KeyboardInterrupt


class StopRequest:
    """Set by SIGINT, SIGTERM, SIGUSR1 or SIGUSR2; the training loop asks agreed() after every step."""

    def __init__(self, group):
        self.signal, self.group = None, group

    def install(self, early_signals=()):
        """Handle the stop signals from here on; the first of `early_signals` (main.py's) counts as if it came now."""
        for signum in EXIT_CODES:
            signal.signal(signum, self.handle)
        self.signal = self.signal or (early_signals[0] if early_signals else None)

    def handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            interrupt_at_once()  # the second Ctrl-C: stop now
        self.signal = signum
        distributed.print_on_rank0(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a "
                                   f"checkpoint (Ctrl-C again to quit at once)")

    def agreed(self):
        """Whether a stop was requested on any rank (collective), so that all stop at the same step."""
        if self.group.any(self.signal is not None) and self.signal is None:
            self.signal = signal.SIGTERM
        return self.signal is not None

    def report(self, opt, argv, before_training=False):
        """Say how to go on: from the checkpoint, or from the start `before_training`; return the exit code."""
        ignore_stop_signals()
        name = signal.Signals(self.signal).name
        distributed.print_on_rank0(
            f"stopped by {name} before training began; nothing new to save. Start it again with\n  "
            f"{shlex.join(['python', sys.argv[0], *argv])}" if before_training else
            f"stopped by {name}: {CHECKPOINT} in {opt.save} holds the run; continue it with\n  {resume_command(argv)}")
        return EXIT_CODES[self.signal]


def check_save_dir(opt):
    """Refuse a --save that cannot hold this run; return the checkpoint to resume, or None. Creates nothing."""
    existing = os.path.abspath(opt.save)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointError(f"--save {opt.save}: {existing} is a file, not a folder; choose another --save")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"--save {opt.save}: {existing} is not writable by you; choose another --save")
    checkpoint = os.path.join(opt.save, CHECKPOINT) if opt.resume is True else opt.resume
    if checkpoint and not os.path.isfile(checkpoint):
        raise CheckpointError(f"--resume: there is no {checkpoint}; give a checkpoint: --resume PATH, or --resume "
                              f"alone with the run's --save (or the flags that name its default folder)")
    if not checkpoint and any(os.path.exists(os.path.join(opt.save, f)) for f in (LOG, CHECKPOINT)):
        raise CheckpointError(f"{opt.save} already holds a run ({LOG} / {CHECKPOINT}); continue it with --resume, "
                              f"or choose another --save")
    return checkpoint or None


def finished_already(opt, position):
    """Whether the run resumed at `position` (a checkpoint.Position) is trained and exported (then it says so;
    a run not exported yet goes on, to export). Raises CheckpointError for a checkpoint past --epochs."""
    epochs_begun = position.epoch + (position.step > 0)
    if epochs_begun > opt.epochs:
        raise CheckpointError(f"--resume: the checkpoint has begun epoch {epochs_begun}, past --epochs {opt.epochs}; "
                              f"pass --epochs {epochs_begun} or more to go on")
    if position.epoch < opt.epochs or not all(os.path.isfile(os.path.join(opt.save, f"net{k}.pt")) for k in (1, 2)):
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{opt.save}: already finished (epoch {position.epoch} of {opt.epochs}); nothing changed. Pass a "
              f"larger --epochs to extend it", flush=True)
    return True


def check_finite(meter, epoch, lr, save):
    """Raise NonFiniteLoss where the loss of `meter` (summed over the ranks) stopped being finite in 1-based `epoch`."""
    if bad := meter.nonfinite():
        step, terms = bad
        raise NonFiniteLoss(f"the loss is not finite at epoch {epoch}, step {step}: {', '.join(terms)} went bad "
                            f"(lr {lr:g}). The run stopped before saving anything after it: checkpoint.pt in {save} "
                            f"holds the last good state. Start again with a lower --lr (or without --amp fp16), or "
                            f"--resume as it is if the cause was transient")


class Checkpoints:
    """When a run is checkpointed (rank 0 writes, every rank waits): at the end of the first epoch a process
    trains, of the last, and of an epoch after which the next would end --checkpoint_interval minutes or more
    after the last checkpoint; every --checkpoint_every steps inside an epoch. Why two rules: docs/interrupting.md."""

    def __init__(self, opt, step):
        self.opt, self.step = opt, step
        self.epochs_ended = 0
        # Rank 0's: when it last wrote a checkpoint (or started), and what they cost since cost().
        self.last_written = time.time()
        self.seconds, self.bytes = 0.0, 0

    def due(self, epoch, epoch_seconds):
        """Whether the end of 1-based `epoch`, `epoch_seconds` long with testing, is checkpointed (collective)."""
        group = self.step.group
        self.epochs_ended += 1
        interval_passes = time.time() - self.last_written + epoch_seconds >= self.opt.checkpoint_interval * 60
        return self.epochs_ended == 1 or epoch == self.opt.epochs or group.any(group.is_main and interval_passes)

    def due_in_epoch(self, steps):
        return bool(self.opt.checkpoint_every) and steps % self.opt.checkpoint_every == 0

    def save(self, position, optimizer):
        def write():
            start = time.time()
            self.bytes += save_checkpoint(self.opt, position, self.step, optimizer)
            self.last_written = time.time()
            self.seconds += self.last_written - start
        write_on_rank0(self.step.group, write)

    def cost(self):
        """What the checkpoints written since the last call cost (rank 0's figures; log.txt's keys)."""
        cost = {"checkpoint_time": self.seconds, "checkpoint_bytes": self.bytes}
        self.seconds, self.bytes = 0.0, 0
        return cost
