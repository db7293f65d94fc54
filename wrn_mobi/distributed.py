"""Training on several processes launched by torchrun: one process (rank) per GPU, on one node or
several; on CPUs with gloo (the tests do).

Every rank draws the same global batch of --batch_size images as a single process would (same
seed, same (seed, epoch) generator) and trains on its own contiguous slice of it. Both networks are
wrapped in DistributedDataParallel, which averages the gradients over the ranks; each rank's loss
is weighted by its share of the batch, so the SGD step is the single-process step on the global
batch. BN normalises each rank's slice by the slice's statistics, as the reference's DataParallel
did, unless --sync_bn makes the statistics those of the global batch. Meters and the sharded test
pass are summed over the ranks before anyone reads them; stop requests and the non-finite check
are decided together, so every rank stops at the same step. Rank 0 alone prints and writes files.

Without torchrun (WORLD_SIZE unset or 1) the run is one process: no process group is created and
every method here reduces to the single-process behaviour.
This file is identical in wrn/ and wrn_mobi/.
"""
import datetime
import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.nn.functional
from torch.nn.parallel import DistributedDataParallel

from dataset import DatasetError


# How long the other ranks wait for rank 0 to write a file (checkpoint.write_on_rank0's Group.any):
# gigabytes written and fsynced to network storage can take longer than the training collectives'
# timeout (NCCL's default: 10 minutes), which would end the run.
WRITE_WAIT = datetime.timedelta(minutes=60)


def launched_ranks():
    """How many processes torchrun started for this run; 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank():
    return int(os.environ.get("RANK", "0"))


def local_rank():
    """This process's index among the processes of its node: the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def print_on_rank0(message):
    """`message` on stderr, from rank 0 only: every rank meets the same errors and stop requests,
    and one line says so, not one per rank."""
    if launched_rank() == 0:
        print(message, file=sys.stderr, flush=True)


class Group:
    """This process's place in the run: rank `rank` of `size` processes (0 of 1 without torchrun).
    Every method that says "collective" must be called by every rank at the same point."""

    def __init__(self, rank=0, size=1, control=None):
        self.rank, self.size = rank, size
        # A gloo group for the decisions every rank takes together and for waiting on rank 0's
        # writes: a CPU flag reduced there does not wait for the GPU, which keeps queuing the next
        # step's work, and its collectives time out after WRITE_WAIT.
        self.control = control

    @property
    def is_main(self):
        return self.rank == 0

    def __str__(self):
        return "1 process" if self.size == 1 else f"{self.size} processes ({dist.get_backend()})"

    def bounds(self, count):
        """[start, stop) of this rank's contiguous part of `count` items; the parts differ by at
        most one item (as numpy.array_split cuts them) and together hold each item once."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + int(self.rank < extra)

    def shard(self, images, targets):
        """This rank's slice of a global batch, and the weight of its (slice-mean) loss. DDP
        averages the ranks' gradients, so weighting each by slice size * ranks / batch size makes
        the average the gradient of the global batch's mean loss, also for a last partial batch
        that the ranks do not divide evenly. The weight is 1.0 when they do."""
        start, stop = self.bounds(len(targets))
        return images[start:stop], targets[start:stop], (stop - start) * self.size / len(targets)

    def check_split(self, num_train, num_test, batch_size):
        """Refuse a dataset whose batches or test set leave a rank without images."""
        last_batch = num_train % batch_size or batch_size
        if min(last_batch, num_train) < self.size:
            raise DatasetError(f"the training set's last batch holds {min(last_batch, num_train)} images, fewer "
                               f"than the {self.size} processes that share it; choose a --batch_size that leaves "
                               f"at least {self.size} images in the last batch, or fewer processes")
        if num_test < self.size:
            raise DatasetError(f"the test set holds {num_test} images, fewer than the {self.size} processes "
                               f"that share it; use fewer processes")

    def sync_batchnorm(self, net, device, compiled=False):
        """`net` (on `device`) with BN statistics computed over the global batch (--sync_bn): torch's
        SyncBatchNorm (fused CUDA kernels) on GPUs in eager mode; GlobalBatchNorm2d on CPUs, where
        SyncBatchNorm refuses to run, and when the network is `compiled`, since Dynamo breaks the
        graph at every SyncBatchNorm (pytorch issues 107372, 161302) while it traces
        GlobalBatchNorm2d's all-reduce into the graph. Unchanged in a single process. Raises
        UsageError for `compiled` on a torch whose functional all_reduce has no gradient."""
        if self.size == 1:
            return net
        if device.type == "cuda" and not compiled:
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if compiled and not SUM_IS_DIFFERENTIABLE:
            from options import UsageError  # options imports this module
            raise UsageError(f"--compile --sync_bn needs a torch whose functional all_reduce has a gradient "
                             f"(this is {torch.__version__}); upgrade torch, or drop --compile")
        return GlobalBatchNorm2d.convert(net, self.rank, self.size)

    def wrap(self, net, device):
        """`net` under DistributedDataParallel (gradients averaged over the ranks at each
        backward, rank 0's BN running statistics broadcast at each training forward pass), or
        `net` itself in a single process."""
        if self.size == 1:
            return net
        return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)

    def broadcast_buffers(self, nets):
        """Rank 0's buffers (BN running statistics) copied into every rank's `nets` (collective).
        Without --sync_bn each rank's last training step updated its own BN statistics with its own
        slice, and DDP broadcasts rank 0's only before the next training forward pass: evaluating
        without this would test each shard with another network than the one checkpointed and
        exported (rank 0's)."""
        if self.size > 1:
            for net in nets:
                for buffer in net.buffers():
                    dist.broadcast(buffer, src=0)

    def sum(self, tensor):
        """`tensor`, summed over the ranks in place (collective)."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def min(self, tensor):
        """`tensor`, its minimum over the ranks in place (collective)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def max(self, tensor):
        """`tensor`, its maximum over the ranks in place (collective)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def any(self, flag):
        """Whether `flag` holds on any rank (collective): a decision every rank takes together."""
        if self.size == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control)
        return bool(value.item())


def start(device):
    """Join the process group torchrun set up, NCCL on GPUs and gloo on CPUs, and return this
    process's Group; without torchrun, the Group of a single process. Ranks other than 0 send
    their standard output nowhere: rank 0 alone prints (errors still reach stderr)."""
    if launched_ranks() == 1:
        return Group()
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    control = dist.new_group(backend="gloo", timeout=WRITE_WAIT)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return Group(dist.get_rank(), dist.get_world_size(), control)


def finish():
    """Leave the process group, if this process joined one. The DDP wrappers still holding it are
    freed first, while the group and the interpreter are whole: a TrainingStep refers to itself
    (through its loss method), so only the garbage collector frees it, and otherwise it would
    release its gloo groups during the interpreter's shutdown."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# torch.distributed's differentiable all_reduce (sum) that Dynamo traces into the graph: out of place,
# so the compiled backward sums the ranks' gradients as eager autograd does. The in-place dist.all_reduce
# inside an autograd.Function (torch.distributed.nn.functional.all_reduce) gives a compiled backward
# whose gradients are zeros on torch 2.11 (pytorch issue 141111). Older torch releases have no
# gradient for the functional all_reduce.
SUM_IS_DIFFERENTIABLE = torch._C._dispatch_has_kernel_for_dispatch_key("_c10d_functional::all_reduce", "Autograd")


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch: --sync_bn on CPUs,
    where torch's SyncBatchNorm refuses to run, and under --compile (Group.sync_batchnorm), whose
    graph holds its collective. One all-reduce per layer in the forward pass and one (its gradient)
    in the backward pass: each rank writes its slice's count, mean and sum of squared deviations
    from that mean (two-pass, for accuracy) into its own row of a [ranks, 2C+1] zero tensor, the
    sum over the ranks gathers all rows, and Chan et al.'s parallel formula combines them ("Updating
    formulae and a pairwise algorithm for computing sample variances", 1979). Running statistics
    are updated as BatchNorm2d updates them (unbiased variance, momentum or cumulative average); in
    eval mode it is BatchNorm2d."""

    def __init__(self, *args, rank=0, ranks=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.ranks = rank, ranks

    @classmethod
    def convert(cls, net, rank, ranks):
        """`net` with every BatchNorm2d replaced by a GlobalBatchNorm2d of rank `rank` among `ranks`
        processes, holding the same parameters and buffers (the state dict keeps its keys)."""
        for name, child in net.named_children():
            if type(child) is torch.nn.BatchNorm2d:
                norm = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                           device=child.weight.device, rank=rank, ranks=ranks)
                norm.load_state_dict(child.state_dict())
                setattr(net, name, norm)
            else:
                cls.convert(child, rank, ranks)
        return net

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        x = input.float()  # statistics in fp32 under autocast, as BatchNorm2d keeps them
        channels, width = (0, 2, 3), 2 * self.num_features + 1
        local_mean = x.mean(channels)
        local_m2 = ((x - local_mean[None, :, None, None]) ** 2).sum(channels)
        row = torch.cat([x.new_full((1,), x.numel() // x.shape[1]), local_mean, local_m2])
        rows = torch.nn.functional.pad(row, (self.rank * width, (self.ranks - 1 - self.rank) * width))
        rows = all_reduce_sum(rows).view(self.ranks, width)
        counts, means, m2s = rows[:, :1], rows[:, 1:width - self.num_features], rows[:, width - self.num_features:]
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        if self.track_running_stats:
            self.update_running_stats(mean.detach(), m2.detach() / (count - 1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(m2 / count + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(input.dtype)

    @torch.no_grad()
    def update_running_stats(self, mean, unbiased_var):
        self.num_batches_tracked += 1
        momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)


def all_reduce_sum(tensor):
    """`tensor` summed over the ranks, out of place; autograd sums the ranks' gradients (on a torch
    without SUM_IS_DIFFERENTIABLE in eager mode only: Group.sync_batchnorm refuses to compile it)."""
    if SUM_IS_DIFFERENTIABLE:
        return funcol.all_reduce(tensor, "sum", dist.group.WORLD)
    return torch.distributed.nn.functional.all_reduce(tensor)
