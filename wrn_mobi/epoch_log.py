"""What an epoch leaves behind: its `json_stats: {...}` line in SAVE/log.txt (the reference's keys, extended:
docs/output.md) and its summary on stdout. This file is identical in wrn/ and wrn_mobi/."""
import errno
import json
import os

import dataset
import models
import training
from checkpoint import AUX_PREFIXES, LOG, DiskFull, out_of_space
from dcm_loss import classifier_names


def accuracy_stats(prefix, accuracies, suffix=""):
    """{prefix}{suffix} for the final classifier, {prefix}_aux{k}{suffix} for the auxiliary ones."""
    names = classifier_names(len(accuracies))
    return {(prefix if name == "final" else f"{prefix}_{name}") + suffix: acc for name, acc in zip(names, accuracies)}


def meter_stats(split, meter):
    """The meter's {split}_* keys; {split}_acc is the reference's key, net 1's final classifier."""
    accuracies, count_net1 = meter.accuracies(), meter.num_classifiers[0]
    return {f"{split}_loss": meter.loss(), **accuracy_stats(f"{split}_acc_net1", accuracies[:count_net1]),
            **accuracy_stats(f"{split}_acc_net2", accuracies[count_net1:-1]), f"{split}_acc_ensemble": accuracies[-1],
            f"{split}_acc": accuracies[count_net1 - 1], f"{split}_loss_terms": meter.terms()}


def published_protocol_stats(step, data, batch_size):
    """test_acc_net{k}[_aux{j}]_batchstats of the nets the published code tested with test-batch BN statistics."""
    stats = {}
    for index, uses_batch_statistics in enumerate(models.PUBLISHED_TEST_USES_BATCH_STATISTICS):
        if uses_batch_statistics and step.group.is_main:
            accuracies = training.batch_statistics_accuracies(step, index, dataset.test_batches(data, batch_size))
            stats.update(accuracy_stats(f"test_acc_net{index + 1}", accuracies, suffix="_batchstats"))
    return stats


def run_info(nets, num_classes, world_size):
    """The numbers every line repeats: n_parameters counts everything trained (aux included),
    n_parameters_net{k} the network alone (as exported); world_size, the processes sharing each batch."""
    alone = [sum(p.numel() for name, p in net.named_parameters() if not name.startswith(AUX_PREFIXES)) for net in nets]
    trained = sum(p.numel() for net in nets for p in net.parameters())
    return {"num_classes": num_classes, "world_size": world_size, "n_parameters": trained,
            "n_parameters_net1": alone[0], "n_parameters_net2": alone[1]}


def log_epoch(opt, stats):
    """Append the epoch's line to SAVE/log.txt durably; where it does not fit, cut it back and raise DiskFull."""
    net1, net2 = models.pair_names(opt.depth, opt.width)
    architecture = os.path.basename(os.path.dirname(os.path.abspath(__file__)))  # this folder: whose models.py
    pair = {"architecture": architecture, "net1": net1, "net2": net2}
    line = ("json_stats: " + json.dumps({**vars(opt), **pair, **stats}) + "\n").encode()
    path = os.path.join(opt.save, LOG)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
    """Cut SAVE/log.txt back to the resumed checkpoint's `size` bytes (no fsync: every resume cuts again)."""
    path = os.path.join(opt.save, LOG)
    if os.path.exists(path) and os.path.getsize(path) > size:
        os.truncate(path, size)


def print_summary(stats, epochs):
    line = ("epoch {epoch}/{epochs}  lr {epoch_lr:.4g}  train: loss {train_loss:.3f}, acc net 1 {train_acc_net1:.2f}%, "
            "net 2 {train_acc_net2:.2f}%  test: loss {test_loss:.3f}, acc net 1 {test_acc_net1:.2f}%, net 2 "
            "{test_acc_net2:.2f}%  ({train_time:.0f} s training, {test_time:.0f} s testing)")
    print(line.format(**stats, epochs=epochs), flush=True)
