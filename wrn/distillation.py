"""The distillation settings of dml and dcm beyond the published DCM: their published values, and the
KL weight of every training step (--kd_weight, ramped up over the first --kd_warmup epochs).

The ramp is the sigmoid-shaped ramp-up of temporal ensembling (Laine & Aila, "Temporal Ensembling
for Semi-Supervised Learning", ICLR 2017, section 3.1: w(t) = exp(-5 (1 - t)^2)), in the form of
the mean-teacher code's sigmoid_rampup (Tarvainen & Valpola, NeurIPS 2017), which online
distillation methods took over for their distillation weight:

    weight = kd_weight * exp(-5 (1 - t)^2),   t = min(1, epochs done / kd_warmup)

with "epochs done" counted per step: (epoch - 1) + step / steps_per_epoch before that step. The first
step trains with exp(-5) = 0.7% of --kd_weight, t = 1/2 with 29% of it, and every step from epoch
kd_warmup on with all of it. The weight depends only on (epoch, step), so a run resumed part-way
through an epoch continues the ramp exactly. --kd_warmup 0 (the default, the published DCM) is the
plain --kd_weight from the first step. This file is identical in wrn/ and wrn_mobi/.
"""
import math

# The published DCM's values (T = 1, weight 1, no warm-up, the 1e-8 smoothing): main.py's defaults.
PUBLISHED = {"temperature": 1.0, "kd_weight": 1.0, "kd_warmup": 0.0, "kl_eps": 1e-8}
RAMP_SHARPNESS = 5.0  # Laine & Aila's exp(-5 (1 - t)^2)


def changed_options(opt):
    """The distillation flags of `opt` that differ from the published values, e.g. ['--temperature']."""
    return [f"--{name}" for name, value in PUBLISHED.items() if getattr(opt, name) != value]


def option_error(opt, has_kl):
    """What is wrong with the distillation options of `opt` in one line, or None. `has_kl`: whether
    the method has KL terms (ind and ds have none, so these options would change nothing)."""
    if not (opt.temperature > 0 and math.isfinite(opt.temperature)):
        return f"--temperature must be a positive number, got {opt.temperature}"
    for name in ("kd_weight", "kd_warmup", "kl_eps"):
        if not (getattr(opt, name) >= 0 and math.isfinite(getattr(opt, name))):
            return f"--{name} must be >= 0, got {getattr(opt, name)}"
    if not has_kl and changed_options(opt):
        return f"--method {opt.method} has no KL term: drop {', '.join(changed_options(opt))} (or use dml or dcm)"
    return None


def kd_weight_at(kd_weight, kd_warmup, epoch, step, steps_per_epoch):
    """The KL weight of step `step` (0-based) of 1-based `epoch`, with `steps_per_epoch` steps in an
    epoch and the ramp `kd_warmup` epochs long (0: no ramp)."""
    if kd_warmup <= 0:
        return kd_weight
    t = min(1.0, ((epoch - 1) + step / steps_per_epoch) / kd_warmup)
    return kd_weight * math.exp(-RAMP_SHARPNESS * (1.0 - t) ** 2)
