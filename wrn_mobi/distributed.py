"""Training on the processes (ranks) torchrun launches (docs/torchrun.md): each rank draws the global batch and trains
on its slice under DDP; meters are summed over the ranks, stops decided together, rank 0 alone prints and writes."""
import datetime
import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.nn.functional

from dataset import DatasetError

# How long the other ranks wait for rank 0 to write a file (checkpoint.write_on_rank0): gigabytes fsynced
# to network storage can outlast the training collectives' timeout (NCCL's: 10 minutes), ending the run.
WRITE_WAIT = datetime.timedelta(minutes=60)


def launched_ranks():
    return int(os.environ.get("WORLD_SIZE", "1"))


def print_on_rank0(message):
    """`message` on stderr from rank 0 only: every rank meets the same errors, one line says so."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


class Group:
    """This process's place in the run: rank `rank` of `size` processes (0 of 1 without torchrun).
    Every method that says "collective" must be called by every rank at the same point."""

    def __init__(self, rank=0, size=1, control=None):
        self.rank, self.size, self.is_main = rank, size, rank == 0
        # gloo, for joint decisions and rank 0's writes: no wait for the GPU's queue, and a timeout of WRITE_WAIT.
        self.control = control

    def __str__(self):
        return "1 process" if self.size == 1 else f"{self.size} processes ({dist.get_backend()})"

    def bounds(self, count):
        """[start, stop) of this rank's contiguous part of `count` items, cut as numpy.array_split cuts."""
        base, extra = divmod(count, self.size)
        return self.rank * base + min(self.rank, extra), (self.rank + 1) * base + min(self.rank + 1, extra)

    def shard(self, images, targets):
        """This rank's slice of a global batch, and its (slice-mean) loss's weight, slice size * ranks /
        batch size: DDP's average of the gradients is then the global batch's, also for an uneven last batch."""
        start, stop = self.bounds(len(targets))
        return images[start:stop], targets[start:stop], (stop - start) * self.size / len(targets)

    def check_split(self, num_train, num_test, batch_size):
        """Refuse a dataset whose last batch or test set leaves a rank without images."""
        last_batch = min(num_train % batch_size or batch_size, num_train)
        if min(last_batch, num_test) < self.size:
            raise DatasetError(f"the training set's last batch holds {last_batch} images and the test set {num_test}, "
                               f"fewer than the {self.size} processes that share them; choose a --batch_size that "
                               f"leaves at least {self.size} images in the last batch, or use fewer processes")

    def sync_batchnorm(self, net, device, compiled=False):
        """`net` with BN statistics over the global batch (--sync_bn): SyncBatchNorm on GPUs in eager mode;
        GlobalBatchNorm2d in place on CPUs, where SyncBatchNorm refuses to run, and when `compiled` (Dynamo
        breaks the graph at every SyncBatchNorm, pytorch issues 107372, 161302; UsageError on an old torch)."""
        if self.size == 1:
            return net
        if device.type == "cuda" and not compiled:
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if compiled and not SUM_IS_DIFFERENTIABLE:
            from options import UsageError  # options imports this module
            raise UsageError(f"--compile --sync_bn needs a torch whose functional all_reduce has a gradient "
                             f"(this is {torch.__version__}); upgrade torch, or drop --compile")
        for norm in net.modules():
            if type(norm) is torch.nn.BatchNorm2d:
                norm.__class__, norm.rank, norm.ranks = GlobalBatchNorm2d, self.rank, self.size
        return net

    def wrap(self, net, device):
        if self.size == 1:
            return net
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)

    def broadcast_buffers(self, nets):
        """Rank 0's BN running statistics into every rank's `nets` (collective; DDP copies them only before a
        training forward): the test numbers are then those of the networks rank 0 saves."""
        if self.size > 1:
            for buffer in (buffer for net in nets for buffer in net.buffers()):
                dist.broadcast(buffer, src=0)

    def all_reduce(self, tensor, op="sum", group=None):
        """`tensor` reduced over the ranks in place, op "sum", "min" or "max" (collective)."""
        if self.size > 1:
            dist.all_reduce(tensor, getattr(dist.ReduceOp, op.upper()), group)
        return tensor

    def any(self, flag):
        """Whether `flag` holds on any rank (collective, on the control group)."""
        return bool(self.all_reduce(torch.tensor([int(flag)]), "max", self.control).item())


def start(device):
    """This process's Group, in torchrun's process group if any; stdout goes nowhere on ranks but 0 (stderr stays)."""
    if launched_ranks() == 1:
        return Group()
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return Group(dist.get_rank(), dist.get_world_size(), dist.new_group(backend="gloo", timeout=WRITE_WAIT))


def finish():
    """Leave the process group, if any, after freeing the DDP wrappers (only the garbage collector frees a
    TrainingStep, which refers to itself; else its gloo groups would go during the interpreter's shutdown)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# The functional all_reduce: Dynamo traces it, and its compiled backward sums the ranks' gradients (the in-place
# torch.distributed.nn.functional one's gives zeros on torch 2.11: pytorch issue 141111). Older torch: no gradient.
SUM_IS_DIFFERENTIABLE = torch._C._dispatch_has_kernel_for_dispatch_key("_c10d_functional::all_reduce", "Autograd")


def all_reduce_sum(tensor):
    """`tensor` summed over the ranks, out of place; autograd sums the ranks' gradients."""
    if SUM_IS_DIFFERENTIABLE:
        return funcol.all_reduce(tensor, "sum", dist.group.WORLD)
    return torch.distributed.nn.functional.all_reduce(tensor)


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d (affine, with a momentum) of rank `rank` among `ranks` with the global batch's training statistics.
    One all-reduce per layer each way: each rank's count, mean and sum of squared deviations (two passes, for accuracy)
    in its row of a [ranks, 2C+1] zero tensor, combined by Chan, Golub and LeVeque's parallel formula (1979)."""

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        x, channels, width = input.float(), (0, 2, 3), 2 * self.num_features + 1  # fp32 statistics, as BatchNorm2d
        local_mean = x.mean(channels)
        local_m2 = ((x - local_mean[None, :, None, None]) ** 2).sum(channels)
        row = torch.cat([x.new_full((1,), x.numel() // x.shape[1]), local_mean, local_m2])
        rows = torch.nn.functional.pad(row, (self.rank * width, (self.ranks - 1 - self.rank) * width))
        rows = all_reduce_sum(rows).view(self.ranks, width)
        counts, means, m2s = rows.split([1, self.num_features, self.num_features], dim=1)
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        with torch.no_grad():  # the unbiased variance, as BatchNorm2d
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(m2 / (count - 1), alpha=self.momentum)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(m2 / count + self.eps)[None, :, None, None]
        return (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(input.dtype)
