"""What an epoch leaves behind: its numbers as log.txt stats, its line in SAVE/log.txt, its summary.

log.txt holds one `json_stats: {...}` line per epoch: every option and the epoch's numbers (the
reference's keys, extended). This file is identical in wrn/ and wrn_mobi/.
"""
import errno
import json
import os

import dataset
import models
import training
from checkpoint import AUX_PREFIXES, LOG, DiskFull, out_of_space
from dcm_loss import classifier_names

# The training folder this file is in (wrn, wrn_mobi): which models.py built the pair. Logged, so
# that tools rebuild a run's networks from its own folder instead of guessing it.
ARCHITECTURE = os.path.basename(os.path.dirname(os.path.abspath(__file__)))


def accuracy_stats(prefix, accuracies, suffix=""):
    """{prefix}{suffix} for the final classifier, {prefix}_aux{k}{suffix} for the auxiliary ones."""
    names = classifier_names(len(accuracies))
    return {(prefix if name == "final" else f"{prefix}_{name}") + suffix: acc for name, acc in zip(names, accuracies)}


def meter_stats(split, meter):
    """{split}_loss, {split}_acc_net1/_net2 (final classifiers), {split}_acc_net{1,2}_aux{k},
    {split}_acc_ensemble (the two final classifiers' softmax averaged), {split}_acc (the reference's
    key: net 1's), {split}_loss_terms."""
    accuracies, count_net1 = meter.accuracies(), meter.num_classifiers[0]
    return {f"{split}_loss": meter.loss(),
            **accuracy_stats(f"{split}_acc_net1", accuracies[:count_net1]),
            **accuracy_stats(f"{split}_acc_net2", accuracies[count_net1:-1]),
            f"{split}_acc_ensemble": accuracies[-1],
            f"{split}_acc": accuracies[count_net1 - 1],
            f"{split}_loss_terms": meter.terms()}


def published_protocol_stats(step, data, batch_size):
    """test_acc_net{k}[_aux{j}]_batchstats for each network that the published code tested with
    test-batch BN statistics (models.py says which): its protocol, next to the proper one. Rank 0
    alone computes them, on the whole test set in order as a single process does (only it logs)."""
    stats = {}
    for index, uses_batch_statistics in enumerate(models.PUBLISHED_TEST_USES_BATCH_STATISTICS):
        if uses_batch_statistics and step.group.is_main:
            accuracies = training.batch_statistics_accuracies(step, index, dataset.test_batches(data, batch_size))
            stats.update(accuracy_stats(f"test_acc_net{index + 1}", accuracies, suffix="_batchstats"))
    return stats


def run_info(nets, num_classes, world_size):
    """The numbers every line repeats: n_parameters counts everything trained (aux included),
    n_parameters_net{k} the network alone (as exported); world_size, the processes that shared each
    batch (without --sync_bn, BN's batches are theirs)."""
    def count(net, with_aux=True):
        return sum(p.numel() for name, p in net.named_parameters() if with_aux or not name.startswith(AUX_PREFIXES))
    net1, net2 = nets
    return {"num_classes": num_classes, "world_size": world_size, "n_parameters": count(net1) + count(net2),
            "n_parameters_net1": count(net1, with_aux=False), "n_parameters_net2": count(net2, with_aux=False)}


def log_epoch(opt, stats):
    """Append one `json_stats: {...}` line (every option, the architecture and the names of its net1
    and net2, this epoch's numbers) to SAVE/log.txt, whole (one write) and durably. Where the line
    does not fit on the device, the log is cut back to its earlier lines (a full disk writes part of
    it) and DiskFull raised."""
    net1, net2 = models.pair_names(opt.depth, opt.width)
    pair = {"architecture": ARCHITECTURE, "net1": net1, "net2": net2}
    line = ("json_stats: " + json.dumps({**vars(opt), **pair, **stats}) + "\n").encode()
    path = os.path.join(opt.save, LOG)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        try:
            if os.write(descriptor, line) < len(line):  # what fitted: the device is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            os.fsync(descriptor)
        except OSError as error:
            os.ftruncate(descriptor, size)
            if out_of_space(error):
                raise DiskFull(path) from None
            raise
    finally:
        os.close(descriptor)


def drop_lines_after(opt, size):
    """Cut SAVE/log.txt back to `size` bytes: the lines written after the checkpoint being resumed
    belong to work that is about to be done again."""
    path = os.path.join(opt.save, LOG)
    if os.path.exists(path) and os.path.getsize(path) > size:
        with open(path, "r+b") as log:
            log.truncate(size)
            os.fsync(log.fileno())


def print_summary(stats, epochs):
    """The epoch's line on stdout: its lr, losses, accuracies and seconds."""
    line = ("epoch {epoch}/{epochs}  lr {epoch_lr:.4g}  train: loss {train_loss:.3f}, acc net 1 {train_acc_net1:.2f}%, "
            "net 2 {train_acc_net2:.2f}%  test: loss {test_loss:.3f}, acc net 1 {test_acc_net1:.2f}%, net 2 "
            "{test_acc_net2:.2f}%  ({train_time:.0f} s training, {test_time:.0f} s testing)")
    print(line.format(**stats, epochs=epochs), flush=True)
