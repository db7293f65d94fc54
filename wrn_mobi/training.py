"""The training step and the evaluation pass of the two networks, and the epoch loops around them.

The speed settings live here and change nothing else in the program:
  --amp bf16 / fp16   autocast the networks (the loss is always computed in fp32); fp16 scales the
                      loss with a GradScaler so that small gradients do not underflow
  --tf32              fp32 convolutions and matmuls on TF32 tensor cores (Ampere and newer GPUs;
                      a process-wide setting: main.build_training_step sets it with
                      hardware.set_fp32_precision, StepSettings.tf32 names it in the run's words)
  --channels_last     NHWC memory layout for the networks and their input batches
  --compile           torch.compile of the forward pass of each network and of the loss; autograd
                      compiles the backward pass with it
With none of them (the default) the step is the reference's plain IEEE fp32 eager step. The distillation
settings (--temperature, --kd_weight and its warm-up, --kl_eps) go to dcm_loss.loss_terms. Under torchrun
each rank trains on its slice of the global batch and the meters are summed over the ranks
(distributed.py).
This file is identical in wrn/ and wrn_mobi/.
"""
import contextlib
import functools
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from dcm_loss import SMOOTHING, loss_terms

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BAR_SECONDS = 2.0  # how often the progress bar's loss and accuracies are refreshed


@dataclass(frozen=True)
class StepSettings:
    """What one training step computes (the distillation of dcm_loss.loss_terms) and how fast (the
    speed settings); main.py fills it from its options of the same names."""
    links: str = "dense"  # dcm_loss.LINKS: which classifier pairs distil each other
    temperature: float = 1.0
    kd_weight: float = 1.0  # the KL weight once any --kd_warmup is over; test batches use it
    kl_eps: float = SMOOTHING
    amp: str = "none"  # a key of AMP_DTYPES
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_options(cls, opt, links):
        return cls(links, opt.temperature, opt.kd_weight, opt.kl_eps, opt.amp, opt.tf32, opt.channels_last,
                   opt.compile)


class TrainingStep:
    """Both networks with their StepSettings: train() makes one SGD step on a batch, evaluate() one
    forward pass in eval mode, both through forward_and_loss(). `nets` stay the plain modules
    (checkpoints and exports hold their state dicts, whatever the number of ranks); training runs
    them under DistributedDataParallel when `group` has several ranks."""

    def __init__(self, nets, settings, device, group=None):
        self.nets, self.settings, self.device = nets, settings, device
        self.group = group or distributed.Group()
        self.amp_dtype = AMP_DTYPES[settings.amp]
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self._kd_weight = None  # (value, its 0-dim tensor on the device) of the last training step
        for net in nets:
            net.to(memory_format=self.memory_format)
        # --compile compiles each network and the loss apart, and DistributedDataParallel wraps the
        # compiled network: compiled around DDP, Dynamo breaks the graph in DDP's forward pass (its
        # hooks and buffer broadcast), while DDP around a compiled network runs its own part eagerly
        # and lets Dynamo split the network's graph at the gradient buckets, so that the backward
        # pass overlaps with the gradient all-reduce (PyTorch's "Where to apply torch.compile").
        # dynamic=False: one graph per batch shape (the full batch, the last partial one, the
        # evaluation batch), each compiled once, rather than slower shape-generic kernels.
        self.run_nets = [torch.compile(net, dynamic=False) for net in nets] if settings.compile else nets
        self.trained_nets = [self.group.wrap(net, device) for net in self.run_nets]
        self.loss = torch.compile(self.eager_loss, dynamic=False) if settings.compile else self.eager_loss
        # A disabled scaler passes the loss and the optimizer step through unchanged.
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def forward_and_loss(self, images, targets, kd_weight, training=True, eager=False):
        """(outputs of net 1, outputs of net 2, every loss term, their sum) for one batch, the KL
        terms weighted by `kd_weight` (a number or a 0-dim tensor), under autocast. Training runs the
        networks as they train (compiled under --compile, under DDP with several ranks); evaluation
        runs them without DDP, whose forward pass is a collective (it broadcasts the BN buffers)
        that ranks testing shards of different sizes cannot all join; `eager` runs the plain
        modules and loss, uncompiled: the step whose FLOPs benchmark.py counts."""
        nets = self.nets if eager else self.trained_nets if training else self.run_nets
        loss = self.eager_loss if eager else self.loss
        images = images.contiguous(memory_format=self.memory_format)
        with self.autocast():
            outputs_net1, outputs_net2 = nets[0](images), nets[1](images)
            terms, total = loss(outputs_net1, outputs_net2, targets, kd_weight)
        return outputs_net1, outputs_net2, terms, total

    def eager_loss(self, outputs_net1, outputs_net2, targets, kd_weight):
        """(every loss term, their sum) of the two networks' outputs."""
        s = self.settings
        terms = loss_terms(outputs_net1, outputs_net2, targets, s.links, s.temperature, kd_weight, s.kl_eps)
        return terms, sum(terms.values())

    def train(self, images, targets, optimizer, kd_weight, loss_weight=1.0):
        """One SGD step on the batch, the KL terms weighted by `kd_weight` (this step's, in a
        warm-up); `loss_weight` scales its gradient (distributed.Group.shard)."""
        outputs_net1, outputs_net2, terms, loss = self.forward_and_loss(images, targets,
                                                                        self.kd_weight_tensor(kd_weight))
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * loss_weight).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        return outputs_net1, outputs_net2, terms

    def kd_weight_tensor(self, value):
        """`value` as a 0-dim tensor on the device, so that a compiled step takes every weight of the
        warm-up without recompiling; made on the device (no host-to-device copy to wait for), and
        only when the weight changes (every step of a warm-up, once otherwise)."""
        if self._kd_weight is None or self._kd_weight[0] != value:
            self._kd_weight = value, torch.full((), value, device=self.device)
        return self._kd_weight[1]

    @torch.no_grad()
    def evaluate(self, images, targets):
        """Outputs and loss terms of a test batch; the KL terms are weighted by the full --kd_weight
        (the objective the warm-up leads to)."""
        outputs_net1, outputs_net2, terms, _ = self.forward_and_loss(images, targets, self.settings.kd_weight,
                                                                     training=False)
        return outputs_net1, outputs_net2, terms

    def set_mode(self, training):
        for net in self.nets:
            net.train(training)

    def parameters(self):
        return [p for net in self.nets for p in net.parameters()]

    def describe_settings(self):
        """The speed settings in words, e.g. 'amp bf16, channels_last, compile', 'tf32, eager' or
        'fp32, eager' (IEEE fp32). CPUs have no TF32: their fp32 stays fp32."""
        s = self.settings
        tf32 = s.tf32 and self.device.type == "cuda"
        words = [f"amp {s.amp}" if s.amp != "none" else "tf32" if tf32 else "fp32"]
        words += ["channels_last"] if s.channels_last else []
        words += ["compile"] if s.compile else ["eager"]
        return ", ".join(words)


class EpochMeter:
    """Sums of every loss term and correct counts of every classifier and of the pair's ensemble
    (the two final classifiers' softmax averaged), kept on the device so that
    training never waits for the host; read once at the end of the epoch. It also remembers the
    first step whose loss terms were not finite, and which terms they were."""

    def __init__(self):
        self.num_classifiers = None  # (net 1, net 2)
        self.term_names = None
        self.term_sums = None
        self.correct = None
        self.count = 0
        self.steps = 0
        self.nonfinite_step = None  # 0 until a step's loss is not finite, then that step (1-based)
        self.nonfinite_terms = None  # which terms were not finite at that step

    def update(self, terms, outputs_net1, outputs_net2, targets):
        batch = targets.numel()
        term_values = torch.stack([value.detach().float() for value in terms.values()])
        predictions = torch.stack([logits.detach().argmax(dim=1) for logits in outputs_net1 + outputs_net2]
                                  + [ensemble_predictions(outputs_net1[-1], outputs_net2[-1])])
        correct = (predictions == targets).sum(dim=1)
        if self.term_sums is None:
            self.num_classifiers = (len(outputs_net1), len(outputs_net2))
            self.term_names = list(terms)
            self.term_sums, self.correct = torch.zeros_like(term_values), torch.zeros_like(correct)
            self.nonfinite_step = torch.zeros((), dtype=torch.long, device=correct.device)
            self.nonfinite_terms = torch.zeros_like(term_values, dtype=torch.bool)
        self.term_sums += term_values * batch
        self.correct += correct
        self.count += batch
        self.steps += 1
        # Recorded on the device, without waiting for it; nonfinite() reads it.
        finite = torch.isfinite(term_values)
        first = (self.nonfinite_step == 0) & ~finite.all()
        self.nonfinite_step = torch.where(first, self.steps, self.nonfinite_step)
        self.nonfinite_terms = torch.where(first, ~finite, self.nonfinite_terms)

    def loss(self):
        return self.term_sums.sum().item() / self.count

    def accuracies(self):
        """Top-1 accuracy (%) of every classifier, net 1's then net 2's, shallow to deep, then of the
        ensemble of the two final classifiers."""
        return (self.correct.double() * 100 / self.count).tolist()

    def terms(self):
        return dict(zip(self.term_names, (self.term_sums / self.count).tolist()))

    def nonfinite(self):
        """None, or (step, names of the terms) of the first step whose loss was not finite."""
        if self.nonfinite_step is None or self.nonfinite_step.item() == 0:
            return None
        names = [name for name, bad in zip(self.term_names, self.nonfinite_terms.tolist()) if bad]
        return self.nonfinite_step.item(), names

    def summed_over(self, group):
        """The meter of the global batches: every rank's sums added, the first step that was not
        finite on any rank and the terms that were not finite there (collective; in a single
        process, this meter)."""
        if group.size == 1:
            return self
        total = EpochMeter()
        total.num_classifiers, total.term_names, total.steps = self.num_classifiers, self.term_names, self.steps
        sums = group.all_reduce(torch.cat([self.term_sums.double(), self.correct.double(),
                                           torch.tensor([self.count], dtype=torch.double, device=self.correct.device)]))
        total.term_sums = sums[:len(self.term_sums)].float()
        total.correct = sums[len(self.term_sums):-1].long()
        total.count = int(sums[-1].item())
        never = self.steps + 1
        first = group.all_reduce(torch.where(self.nonfinite_step == 0, never, self.nonfinite_step), "min")
        total.nonfinite_step = torch.where(first == never, 0, first)
        here = self.nonfinite_terms & (self.nonfinite_step == first)
        total.nonfinite_terms = group.all_reduce(here.long(), "max").bool()
        return total

    def clear_sums(self):
        """Keep the step count, zero the sums: a resumed epoch's sums come back on rank 0 only, so
        that summing over the ranks counts them once."""
        self.term_sums, self.correct, self.count = torch.zeros_like(self.term_sums), torch.zeros_like(self.correct), 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state, device):
        """The meter of state_dict(), its sums moved to `device`, where the epoch goes on adding to them."""
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            setattr(self, key, tuple(value) if key == "num_classifiers" else value)


def ensemble_predictions(final_logits_1, final_logits_2):
    """The class of highest average probability of the two networks' final classifiers (N, C) -> (N,):
    the pair as an ensemble, probabilities averaged as in deep ensembles (Lakshminarayanan et al.,
    NeurIPS 2017), the ensemble online-distillation papers report next to each network."""
    probs_1, probs_2 = (F.softmax(logits.detach().float(), dim=1) for logits in (final_logits_1, final_logits_2))
    return ((probs_1 + probs_2) / 2).argmax(dim=1)


def train_epoch(step, optimizer, batches, total_batches, description, kd_weight_at, meter=None, after_step=None):
    """Train on `batches`; return the epoch's meter. `meter` continues an epoch resumed part-way;
    `after_step(meter)` runs after every step and ends the epoch early by returning True;
    `kd_weight_at(index)` is the KL weight of the epoch's step `index` (0-based). Each rank trains
    on its slice of every batch and meters it; the meter returned
    is summed over the ranks."""
    step.set_mode(training=True)
    meter = meter or EpochMeter()
    progress = tqdm(batches, initial=meter.steps, total=total_batches, desc=description, leave=False,
                    dynamic_ncols=True, disable=not sys.stdout.isatty())
    if step.settings.compile and not progress.disable:
        progress.set_postfix_str("compiling the step")
    shown = None  # when the bar's numbers were last read
    for images, targets in progress:
        images, targets, loss_weight = step.group.shard(images, targets)
        outputs_net1, outputs_net2, terms = step.train(images, targets, optimizer, kd_weight_at(meter.steps),
                                                       loss_weight)
        meter.update(terms, outputs_net1, outputs_net2, targets)
        # Reading the meter waits for the device: done every BAR_SECONDS, not every step. The bar
        # (rank 0's) shows rank 0's slices.
        if not progress.disable and (shown is None or time.monotonic() - shown >= BAR_SECONDS):
            shown = time.monotonic()
            accuracies = meter.accuracies()
            progress.set_postfix(loss=f"{meter.loss():.3f}", acc_net1=f"{accuracies[len(outputs_net1) - 1]:.1f}",
                                 acc_net2=f"{accuracies[len(outputs_net1) + len(outputs_net2) - 1]:.1f}")
        if after_step is not None and after_step(meter):
            break
    return meter.summed_over(step.group)


@contextlib.contextmanager
def batch_statistics(net):
    """Inside, every BN of `net` normalises a batch with the batch's own statistics, as in train
    mode, but updates no running statistic (tracking off); on exit each BN is as it was. A BN
    that --sync_bn made global normalises by the batch alone too (BatchNorm2d's own forward), as
    the published single-GPU code did: rank 0 runs this protocol by itself."""
    norms = [module for module in net.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(norm.training, norm.track_running_stats) for norm in norms]
    for norm in norms:
        norm.train()
        norm.track_running_stats = False
        norm.forward = functools.partial(torch.nn.BatchNorm2d.forward, norm)
    try:
        yield
    finally:
        for norm, (training, tracking) in zip(norms, saved):
            norm.train(training)
            norm.track_running_stats = tracking
            del norm.forward


@torch.no_grad()
def batch_statistics_accuracies(step, index, batches):
    """Top-1 accuracy (%) of every classifier of network `index` (0: net 1, 1: net 2) with BN
    normalising each test batch by its own statistics: the published code's test protocol for a
    network it never switched to eval mode. Changes no parameter or buffer."""
    net, correct, count = step.nets[index], 0, 0
    with batch_statistics(net), step.autocast():
        for images, targets in batches:
            outputs = net(images.contiguous(memory_format=step.memory_format))
            correct = correct + torch.stack([(logits.argmax(dim=1) == targets).sum() for logits in outputs])
            count += targets.numel()
    return (correct.double() * 100 / count).tolist()


def evaluate(step, batches):
    """The meter of `batches` (each rank's shard of the test set), summed over the ranks."""
    # BN uses its running statistics (eval mode) for both networks, so the numbers do not depend
    # on how the test set is cut into batches or shards; every rank tests with rank 0's statistics,
    # those of the network that is checkpointed and exported.
    step.group.broadcast_buffers(step.nets)
    step.set_mode(training=False)
    meter = EpochMeter()
    for images, targets in tqdm(batches, desc="testing", leave=False, dynamic_ncols=True,
                                disable=not sys.stdout.isatty()):
        outputs_net1, outputs_net2, terms = step.evaluate(images, targets)
        meter.update(terms, outputs_net1, outputs_net2, targets)
    return meter.summed_over(step.group)
