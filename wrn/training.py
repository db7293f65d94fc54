"""The training step and the evaluation pass of the two networks, and the epoch loops around them.
Without speed settings (docs/speed.md) the step is the reference's IEEE fp32 eager one. Same in wrn/ and wrn_mobi/."""
import copy
import functools
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from dcm_loss import SMOOTHING, loss_terms

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepSettings:
    """What one training step computes and how fast: main.py's options of the same names (from_options)."""
    links: str = "dense"  # dcm_loss.LINKS: which classifier pairs distil each other
    temperature: float = 1.0
    kd_weight: float = 1.0  # the KL weight once any --kd_warmup is over; test batches use it
    kl_eps: float = SMOOTHING
    amp: str = "none"  # a key of AMP_DTYPES
    tf32: bool = False  # process-wide: main.build_training_step sets it
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_options(cls, opt, links):
        values = {field.name: getattr(opt, field.name) for field in fields(cls)}
        return cls(**{**values, "links": links})


class TrainingStep:
    """Both networks with their StepSettings. `nets` stay the plain modules (checkpoints and exports hold
    their state dicts); training runs them under DistributedDataParallel when `group` has several ranks."""

    def __init__(self, nets, settings, device, group=None):
        self.nets, self.settings, self.device = nets, settings, device
        self.group = group or distributed.Group()
        amp_dtype = AMP_DTYPES[settings.amp]
        self.autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        for net in nets:
            net.to(memory_format=self.memory_format)
        # --compile: each network and the loss apart, DDP around the compiled network (PyTorch's "Where to
        # apply torch.compile"); dynamic=False: one graph per batch shape, each compiled once.
        self.run_nets = [torch.compile(net, dynamic=False) for net in nets] if settings.compile else nets
        self.trained_nets = [self.group.wrap(net, device) for net in self.run_nets]
        self.loss = torch.compile(self.eager_loss, dynamic=False) if settings.compile else self.eager_loss
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
        # The KL weight as a 0-dim tensor (a compiled step takes a warm-up's every weight), made once per value.
        self.kd_weight_tensor = functools.lru_cache(maxsize=1)(lambda value: torch.full((), value, device=device))

    def forward_and_loss(self, images, targets, kd_weight, training=True, eager=False):
        """(outputs of net 1, outputs of net 2, every loss term, their sum) for one batch under autocast, the
        KL terms weighted by `kd_weight`. Evaluation runs without DDP, whose forward pass is a collective that
        ranks testing shards of different sizes cannot all join; `eager`: the plain modules and loss."""
        nets = self.nets if eager else self.trained_nets if training else self.run_nets
        images = images.contiguous(memory_format=self.memory_format)
        with self.autocast():
            outputs_net1, outputs_net2 = nets[0](images), nets[1](images)
            terms, total = (self.eager_loss if eager else self.loss)(outputs_net1, outputs_net2, targets, kd_weight)
        return outputs_net1, outputs_net2, terms, total

    def eager_loss(self, outputs_net1, outputs_net2, targets, kd_weight):
        s = self.settings
        terms = loss_terms(outputs_net1, outputs_net2, targets, s.links, s.temperature, kd_weight, s.kl_eps)
        return terms, sum(terms.values())

    def train(self, images, targets, optimizer, kd_weight, loss_weight=1.0):
        """One SGD step; (outputs of net 1, of net 2, loss terms). `loss_weight` scales the gradient (Group.shard)."""
        *outputs, terms, loss = self.forward_and_loss(images, targets, self.kd_weight_tensor(kd_weight))
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * loss_weight).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        return (*outputs, terms)

    def set_mode(self, training):
        for net in self.nets:
            net.train(training)

    def parameters(self):
        return [p for net in self.nets for p in net.parameters()]

    def describe_settings(self):
        """The speed settings in words, e.g. 'amp bf16, channels_last, compile' or 'fp32, eager'."""
        s = self.settings
        fp32 = "tf32" if s.tf32 and self.device.type == "cuda" else "fp32"  # CPUs have no TF32
        words = [f"amp {s.amp}" if s.amp != "none" else fp32, "channels_last" if s.channels_last else "",
                 "compile" if s.compile else "eager"]
        return ", ".join(filter(None, words))


class EpochMeter:
    """Sums of every loss term and correct counts of every classifier and of the pair's ensemble, kept on
    the device (training never waits for the host), and each term's first non-finite step (1-based)."""
    NEVER = 2 ** 62  # the first non-finite step of a term that stayed finite

    def __init__(self):
        self.num_classifiers = self.term_names = self.term_sums = self.correct = self.first_nonfinite = None
        self.count = self.steps = 0

    def update(self, terms, outputs_net1, outputs_net2, targets):
        term_values = torch.stack([value.detach().float() for value in terms.values()])
        # The pair's ensemble: the two final classifiers' softmax averaged, as in deep ensembles
        # (Lakshminarayanan et al., NeurIPS 2017), which online-distillation papers report.
        probs_1, probs_2 = (F.softmax(outputs[-1].detach().float(), dim=1) for outputs in (outputs_net1, outputs_net2))
        predictions = torch.stack([logits.detach().argmax(dim=1) for logits in outputs_net1 + outputs_net2]
                                  + [((probs_1 + probs_2) / 2).argmax(dim=1)])
        correct = (predictions == targets).sum(dim=1)
        if self.term_sums is None:
            self.num_classifiers = (len(outputs_net1), len(outputs_net2))
            self.term_names = list(terms)
            self.term_sums, self.correct = torch.zeros_like(term_values), torch.zeros_like(correct)
            self.first_nonfinite = torch.full_like(term_values, self.NEVER, dtype=torch.long)
        self.term_sums += term_values * targets.numel()
        self.correct += correct
        self.count += targets.numel()
        self.steps += 1
        this_step = torch.where(torch.isfinite(term_values), self.NEVER, self.steps)  # on the device: no wait
        self.first_nonfinite = torch.minimum(self.first_nonfinite, this_step)

    def loss(self):
        return self.term_sums.sum().item() / self.count

    def accuracies(self):
        """Top-1 accuracy (%) of every classifier, net 1's then net 2's, shallow to deep, then of the ensemble."""
        return (self.correct.double() * 100 / self.count).tolist()

    def terms(self):
        return dict(zip(self.term_names, (self.term_sums / self.count).tolist()))

    def nonfinite(self):
        """None, or (step, names of the terms) of the first step whose loss was not finite."""
        first = self.first_nonfinite.tolist() if self.steps else []
        step = min(first, default=self.NEVER)
        return None if step == self.NEVER else (step, [name for name, at in zip(self.term_names, first) if at == step])

    def summed_over(self, group):
        """Every rank's sums added, each term's first non-finite step the earliest on any rank (collective)."""
        if group.size == 1:
            return self
        total = copy.copy(self)
        sums = group.all_reduce(torch.cat([self.term_sums.double(), self.correct.double(),
                                           torch.tensor([self.count], dtype=torch.double, device=self.correct.device)]))
        total.term_sums = sums[:len(self.term_sums)].float()
        total.correct = sums[len(self.term_sums):-1].long()
        total.count = int(sums[-1].item())
        total.first_nonfinite = group.all_reduce(self.first_nonfinite.clone(), "min")
        return total

    def clear_sums(self):
        """Zero the sums, keep the steps: a resumed epoch's sums come back on rank 0 alone (counted once)."""
        self.term_sums, self.correct, self.count = torch.zeros_like(self.term_sums), torch.zeros_like(self.correct), 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state, device):
        """The meter of state_dict(), its tensors moved to `device`, where the epoch goes on adding to them."""
        vars(self).update({key: value.to(device) if torch.is_tensor(value) else value for key, value in state.items()})


def train_epoch(step, optimizer, batches, total_batches, description, kd_weight_at, meter=None, after_step=None):
    """Train on `batches`; the epoch's meter summed over the ranks. `meter` continues an epoch resumed part-way;
    `kd_weight_at(index)`: the KL weight of step `index` (0-based); `after_step(meter)` ends the epoch if True."""
    step.set_mode(training=True)
    meter = meter or EpochMeter()
    for images, targets in tqdm(batches, initial=meter.steps, total=total_batches, desc=description, leave=False,
                                dynamic_ncols=True, disable=not sys.stdout.isatty()):
        images, targets, loss_weight = step.group.shard(images, targets)
        *outputs, terms = step.train(images, targets, optimizer, kd_weight_at(meter.steps), loss_weight)
        meter.update(terms, *outputs, targets)
        if after_step is not None and after_step(meter):
            break
    return meter.summed_over(step.group)


@torch.no_grad()
def batch_statistics_accuracies(step, index, batches):
    """Top-1 accuracy (%) of every classifier of network `index` (0: net 1, 1: net 2), on a copy, with BN
    normalising each test batch by its own statistics: the published code's protocol for a network in train mode."""
    net, correct, count = copy.deepcopy(step.nets[index]), 0, 0
    for norm in net.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            # BatchNorm2d's own forward for --sync_bn's global BN too: rank 0 runs this alone.
            norm.train()
            norm.track_running_stats = False
            norm.forward = functools.partial(torch.nn.BatchNorm2d.forward, norm)
    with step.autocast():
        for images, targets in batches:
            outputs = net(images.contiguous(memory_format=step.memory_format))
            correct = correct + torch.stack([(logits.argmax(dim=1) == targets).sum() for logits in outputs])
            count += targets.numel()
    return (correct.double() * 100 / count).tolist()


@torch.no_grad()
def evaluate(step, batches):
    """The meter of `batches` (this rank's test shard) summed over the ranks, KL terms weighted by the full --kd_weight.
    BN in eval mode, with rank 0's running statistics (those saved) on every rank, however the test set is cut."""
    step.group.broadcast_buffers(step.nets)
    step.set_mode(training=False)
    meter = EpochMeter()
    for images, targets in tqdm(batches, desc="testing", leave=False, dynamic_ncols=True,
                                disable=not sys.stdout.isatty()):
        *outputs, terms, _ = step.forward_and_loss(images, targets, step.settings.kd_weight, training=False)
        meter.update(terms, *outputs, targets)
    return meter.summed_over(step.group)
