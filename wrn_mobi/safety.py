"""Keeping a run safe to interrupt: a --save folder that holds no other run, stop requests
(SIGINT, SIGTERM, SIGUSR1, SIGUSR2), when to checkpoint (about every --checkpoint_interval minutes at
the end of an epoch, every --checkpoint_every steps inside one), and the guard against a loss that
is no longer finite.

SIGINT (Ctrl-C), SIGTERM (a launcher, a cluster preempting the job) or SIGUSR1/SIGUSR2 (a
cluster's warning before the time limit) lets the current step finish; the run then writes a
checkpoint, prints the command that resumes it, and exits with 130 (SIGINT) or 143 (the others).
A second Ctrl-C exits at once (the last checkpoint on disk stays whole). A stop signal that came
before the training loop listened (main.py records them from its first line) stops the run before
its first step, with nothing written and the same exit code. Once the run leaves, every
later stop signal is ignored, so that none changes its exit code or prints a traceback. A loss that
stops being finite ends the run before anything is saved after it, so checkpoint.pt keeps the last
good state.
Under torchrun every rank takes these decisions together (distributed.Group.any), and rank 0
alone writes and prints.
This file is identical in wrn/ and wrn_mobi/.
"""
import os
import shlex
import signal
import sys
import time

import distributed
from checkpoint import CHECKPOINT, LOG, CheckpointError, save_checkpoint, write_on_rank0

# The signals that stop a run, and its exit code for each. SLURM's --signal warns with USR1 or USR2
# before the time limit, and on some clusters it signals every process of the job, main.py too.
# Windows has no USR signals.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143,
              **{getattr(signal, name): 143 for name in ("SIGUSR1", "SIGUSR2") if hasattr(signal, name)}}
FINITE_CHECK_EVERY = 20  # steps; the check waits for the device, so it is not made after every step


class NonFiniteLoss(Exception):
    """The loss stopped being finite: the message names where, and what to do."""


def ignore_stop_signals():
    """Ignore every stop signal from here on: the run is leaving, with its exit code decided. A
    Python handler would still run while the interpreter exits, inside its atexit callbacks, where
    a KeyboardInterrupt prints a traceback; and the interpreter's last step restores the default
    actions, which would kill the process by the signal (exit -2 for SIGINT) instead of its exit
    code. An ignored signal does neither. A signal already pending runs its handler first (Python
    checks before changing a handler): a second Ctrl-C then raises KeyboardInterrupt from here."""
    for signum in EXIT_CODES:
        signal.signal(signum, signal.SIG_IGN)


def interrupt_at_once(signum=signal.SIGINT, frame=None):
    """Ctrl-C's handler where it quits at once (main.py installs it before the training loop, and
    a StopRequest calls it on the second Ctrl-C): raises KeyboardInterrupt, which main.py turns
    into exit 130, after ignoring every later stop signal."""
    ignore_stop_signals()
    raise KeyboardInterrupt


class StopRequest:
    """Set by SIGINT, SIGTERM, SIGUSR1 or SIGUSR2; the training loop asks agreed() after every step."""

    def __init__(self, group):
        self.signal = None
        self.group = group

    def install(self, early_signals=()):
        """Handle the stop signals from here on; a stop signal main.py recorded before
        (`early_signals`, in the order they came) counts as if it came now."""
        for signum in EXIT_CODES:
            signal.signal(signum, self.handle)
        if early_signals and self.signal is None:
            self.signal = early_signals[0]

    def handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            interrupt_at_once()  # the second Ctrl-C: stop now
        self.signal = signum
        distributed.print_on_rank0(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a "
                                   f"checkpoint (Ctrl-C again to quit at once)")

    def agreed(self):
        """Whether a stop was requested on any rank (collective), so that all stop at the same step.
        torchrun sends a signal to every rank; a rank whose signal has not arrived yet takes
        SIGTERM's exit code."""
        if self.group.any(self.signal is not None) and self.signal is None:
            self.signal = signal.SIGTERM
        return self.signal is not None

    def report(self, opt, argv):
        """Say how to continue the stopped run; return the exit code its signal calls for. The
        checkpoint is written: from here on the run is leaving, and stop signals are ignored."""
        ignore_stop_signals()
        distributed.print_on_rank0(f"stopped by {signal.Signals(self.signal).name}: checkpoint.pt in {opt.save} "
                                   f"holds the run; continue it with\n  {resume_command(argv)}")
        return EXIT_CODES[self.signal]

    def report_before_training(self, argv):
        """Say that the run stopped before it trained a step (it wrote nothing), and how to start it
        again; return the exit code its signal calls for."""
        ignore_stop_signals()
        distributed.print_on_rank0(f"stopped by {signal.Signals(self.signal).name} before training began; nothing "
                                   f"new to save. Start it again with\n  {shlex.join(['python', sys.argv[0], *argv])}")
        return EXIT_CODES[self.signal]


def check_save_dir(opt):
    """Refuse a --save that cannot hold this run (a file, unwritable, or holding another run
    without --resume); return the checkpoint to resume, or None. Creates nothing."""
    existing = os.path.abspath(opt.save)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointError(f"--save {opt.save}: {existing} is a file, not a folder; choose another --save")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"--save {opt.save}: {existing} is not writable by you; choose another --save")
    holds_run = any(os.path.exists(os.path.join(opt.save, f)) for f in (LOG, CHECKPOINT))
    if opt.resume is True:
        checkpoint = os.path.join(opt.save, CHECKPOINT)
        if not os.path.isfile(checkpoint):
            raise CheckpointError(f"--resume: there is no {CHECKPOINT} in {opt.save}; check --save (and the flags "
                                  f"that name the default folder), or give the checkpoint: --resume PATH")
    elif opt.resume:
        checkpoint = opt.resume
        if not os.path.isfile(checkpoint):
            raise CheckpointError(f"--resume {checkpoint}: no such file")
    else:
        checkpoint = None
        if holds_run:
            raise CheckpointError(f"{opt.save} already holds a run ({LOG} / {CHECKPOINT}); continue it "
                                  f"with --resume, or choose another --save")
    return checkpoint


def finished_already(opt, position):
    """Whether the resumed checkpoint (at `position`, a checkpoint.Position) ends the run: --epochs
    epochs trained and net1.pt, net2.pt exported in --save. Then it says so, and main.py returns
    without writing anything. Raises CheckpointError for a checkpoint that has gone past --epochs.
    A finished run that was not exported yet goes on: main.py exports it."""
    epochs_begun = position.epoch + (position.step > 0)
    if epochs_begun > opt.epochs:
        where = (f"is at step {position.step} of epoch {epochs_begun}" if position.step
                 else f"has finished epoch {position.epoch}")
        raise CheckpointError(f"--resume: the checkpoint {where}, past --epochs {opt.epochs}; pass --epochs "
                              f"{epochs_begun} or more to go on")
    exported = all(os.path.isfile(os.path.join(opt.save, f"net{k}.pt")) for k in (1, 2))
    if position.epoch < opt.epochs or not exported:
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{opt.save}: already finished (epoch {position.epoch} of {opt.epochs}); nothing changed. Pass a "
              f"larger --epochs to extend it", flush=True)
    return True


def resume_command(argv):
    """The command line that continues this run: its own arguments, --resume instead of any --resume."""
    kept, skip_next = [], False
    for index, argument in enumerate(argv):
        if skip_next:
            skip_next = False
        elif argument == "--resume":
            # --resume takes an optional PATH: the next argument, unless it is another option.
            skip_next = index + 1 < len(argv) and not argv[index + 1].startswith("--")
        elif not argument.startswith("--resume="):
            kept.append(argument)
    return shlex.join(["python", sys.argv[0], *kept, "--resume"])


def check_finite(meter, epoch, lr, save):
    """Raise NonFiniteLoss where the loss of `meter` (summed over the ranks) stopped being finite in
    1-based `epoch`, trained at `lr`, before anything after it is saved in the folder `save`."""
    bad = meter.nonfinite()
    if bad is not None:
        step, terms = bad
        raise NonFiniteLoss(f"the loss is not finite at epoch {epoch}, step {step}: {', '.join(terms)} went bad "
                            f"(lr {lr:g}). The run stopped before saving anything after it: checkpoint.pt in {save} "
                            f"holds the last good state. Start again with a lower --lr (or without --amp fp16), or "
                            f"--resume as it is if the cause was transient")


class Checkpoints:
    """When a run is checkpointed, and the checkpoints, written by rank 0 while every rank waits.

    At the end of an epoch when the next epoch would end --checkpoint_interval minutes or more
    after the last checkpoint (judged by the epoch just ended), so that checkpoints are at most an
    interval apart and a crash loses at most an interval, or one epoch where an epoch is longer
    (then --checkpoint_every N steps bounds the loss). Always at the end of the first epoch a
    process trains (it shows at once that writing to --save works, and a crash soon after the start
    loses one epoch) and of the last; main.py adds a stop request. The interval, not every epoch: a
    checkpoint costs what its size and the storage make it cost, whatever an epoch takes, so per
    epoch it costs a share of the run that grows with the speed of the GPU; every 10 minutes, a
    write of w seconds costs at most w / 600 of the run beyond the first and the last (1% for
    6 s). Ends of epochs, not any step: there the log line is written, so a resume drops no line
    the checkpoint knows, and the ranks agree on rank 0's clock once per epoch, not with a
    collective after every step. Both rules count from the last checkpoint of either kind."""

    def __init__(self, opt, step):
        self.opt, self.step = opt, step
        self.epochs_ended = 0
        # Rank 0's: when its last checkpoint was written (the state the process started from is the
        # run's start, or the checkpoint it resumed), and what checkpoints cost since cost() was asked.
        self.last_written = time.time()
        self.seconds, self.bytes = 0.0, 0

    def due(self, epoch, epoch_seconds):
        """Whether the end of 1-based `epoch`, which took `epoch_seconds` (training and testing), is
        checkpointed. Collective: every rank takes rank 0's answer."""
        group = self.step.group
        self.epochs_ended += 1
        return (self.epochs_ended == 1 or epoch == self.opt.epochs
                or group.any(group.is_main and self.interval_would_pass(epoch_seconds)))

    def due_in_epoch(self, steps):
        """Whether the epoch's step `steps` (1-based) is checkpointed: every --checkpoint_every steps."""
        return bool(self.opt.checkpoint_every) and steps % self.opt.checkpoint_every == 0

    def interval_would_pass(self, epoch_seconds):
        """Whether another epoch as long as the last one would end --checkpoint_interval minutes or
        more after the last checkpoint."""
        return time.time() - self.last_written + epoch_seconds >= self.opt.checkpoint_interval * 60

    def save(self, position, optimizer):
        """Write the checkpoint of `position` (a checkpoint.Position) on rank 0; every rank waits."""
        write_on_rank0(self.step.group, self.write, position, optimizer)

    def write(self, position, optimizer):
        start = time.time()
        self.bytes += save_checkpoint(self.opt, position, self.step, optimizer)
        self.last_written = time.time()
        self.seconds += self.last_written - start

    def cost(self):
        """What the checkpoints written since the last call cost (rank 0's figures; log.txt's keys)."""
        cost = {"checkpoint_time": self.seconds, "checkpoint_bytes": self.bytes}
        self.seconds, self.bytes = 0.0, 0
        return cost
