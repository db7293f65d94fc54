"""The DCM training objective (Yao & Sun, ECCV 2020); the published one has lambda = 1, temperature 1.

    loss = sum over every classifier c of both nets of CE(c)
         + kd_weight * T^2 * sum over linked cross-network pairs (i of one net, j of the other),
           both directions, of KL(p_j.detach() || p_i),   p = softmax(logits / T) (smoothed, see below)

Each network learns from the other's predictions as fixed targets; no pair lies inside one network.
The paper's ablation links pairs (i, j): dense (all), same (stage k <-> stage k), cross (k <-> l, k != l),
final (final <-> final), none (cross-entropy only: independent training and deep supervision). The
published values are T = 1, kd_weight = 1 and the smoothing eps = 1e-8. T^2 keeps the KL gradient at the
cross-entropy's scale whatever T (Hinton, Vinyals & Dean 2015, section 2); the cross-entropy stays at
T = 1. Every term is computed from fp32 logits, so the loss keeps full precision under --amp.
"""
import math

import torch.nn.functional as F

SMOOTHING = 1e-8
LINKS = ("dense", "same", "cross", "final", "none")


def smoothed_log_probs(logits, temperature=1.0, eps=SMOOTHING):
    """log p' where p = softmax(logits / T) and p' = (p + eps) / (1 + C * eps): finite logs, still a
    distribution. The published eps = 1e-8 bounds every log ratio by log(1 / eps) = 18.4 nats; eps = 0
    gives the plain log-softmax (no bound). logits: (N, C); returns (N, C) in fp32."""
    scaled = logits.float() / temperature
    if eps == 0:
        return F.log_softmax(scaled, dim=1)
    num_classes = logits.shape[1]
    probs = F.softmax(scaled, dim=1)
    return ((probs + eps) / (1 + num_classes * eps)).log()


def kl_divergence(logits_p, logits_q, temperature=1.0, eps=SMOOTHING):
    """Batch mean of KL(p || q) in nats, p and q the softmax of logits_p / T and logits_q / T (both
    (N, C)), smoothed by eps as in smoothed_log_probs (eps = 0: exact KL). A scalar tensor; the T^2
    factor of the distillation term is the caller's (loss_terms)."""
    log_p = smoothed_log_probs(logits_p, temperature, eps)
    log_q = smoothed_log_probs(logits_q, temperature, eps)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def classifier_names(num_classifiers):
    """['aux1', 'aux2', 'final'] for a network with auxiliary classifiers, ['final'] without."""
    return [f"aux{k + 1}" for k in range(num_classifiers - 1)] + ["final"]


def linked_pairs(num_classifiers_1, num_classifiers_2, links):
    """Index pairs (i, j): classifier i of net 1 and classifier j of net 2 that distil each other."""
    if links not in LINKS:
        raise ValueError(f"links must be one of {LINKS}, got {links!r}")
    if links == "same" and num_classifiers_1 != num_classifiers_2:
        raise ValueError("links='same' needs the same number of classifiers in both networks")
    last_1, last_2 = num_classifiers_1 - 1, num_classifiers_2 - 1
    is_linked = {
        "dense": lambda i, j: True,
        "same": lambda i, j: i == j,
        "cross": lambda i, j: i != j,
        "final": lambda i, j: i == last_1 and j == last_2,
        "none": lambda i, j: False,
    }[links]
    return [(i, j) for i in range(num_classifiers_1) for j in range(num_classifiers_2) if is_linked(i, j)]


def loss_terms(outputs_1, outputs_2, targets, links="dense", temperature=1.0, kd_weight=1.0, eps=SMOOTHING):
    """Every term of the objective by name, as it enters the loss: ce_net1_aux1, ...,
    kl_net1_aux1_from_net2_final, ... Their sum is dcm_loss().

    `kl_netA_X_from_netB_Y` is kd_weight * T^2 * KL(p_B,Y.detach() || p_A,X): classifier X of net A
    learning from classifier Y of net B, p = softmax(logits / T) smoothed by eps. outputs_1,
    outputs_2: lists of (N, C) logits, shallow to deep; targets: (N,) class indices. kd_weight may
    be a float or a 0-dim tensor (the warm-up's weight of this step, without recompiling).
    """
    names_1, names_2 = classifier_names(len(outputs_1)), classifier_names(len(outputs_2))
    terms = {f"ce_{net}_{name}": F.cross_entropy(logits.float(), targets)
             for net, names, outputs in (("net1", names_1, outputs_1), ("net2", names_2, outputs_2))
             for name, logits in zip(names, outputs)}
    # At the published values the scale is exactly 1: multiplying by it leaves every bit as it was.
    scale = kd_weight * temperature ** 2
    for i, j in linked_pairs(len(outputs_1), len(outputs_2), links):
        terms[f"kl_net1_{names_1[i]}_from_net2_{names_2[j]}"] = scale * kl_divergence(
            outputs_2[j].detach(), outputs_1[i], temperature, eps)
        terms[f"kl_net2_{names_2[j]}_from_net1_{names_1[i]}"] = scale * kl_divergence(
            outputs_1[i].detach(), outputs_2[j], temperature, eps)
    return terms


def dcm_loss(outputs_1, outputs_2, targets, links="dense", temperature=1.0, kd_weight=1.0, eps=SMOOTHING):
    """The total training loss of the two networks as a scalar tensor (see loss_terms)."""
    return sum(loss_terms(outputs_1, outputs_2, targets, links, temperature, kd_weight, eps).values())


def kd_weight_at(kd_weight, kd_warmup, epoch, step, steps_per_epoch):
    """The KL weight of step `step` (0-based) of 1-based `epoch`: kd_weight exp(-5 (1 - t)^2), t = min(1, epochs
    done / kd_warmup) counted per step, the sigmoid-shaped ramp-up of temporal ensembling (Laine & Aila, ICLR 2017,
    section 3.1); kd_weight throughout for kd_warmup = 0 (the published DCM). It depends on (epoch, step) only, so
    a run resumed part-way through an epoch continues the ramp exactly."""
    if kd_warmup <= 0:
        return kd_weight
    t = min(1.0, ((epoch - 1) + step / steps_per_epoch) / kd_warmup)
    return kd_weight * math.exp(-5.0 * (1.0 - t) ** 2)
