"""The DCM training objective (Yao & Sun, ECCV 2020) with lambda = 1 and temperature 1.

    loss = sum over every classifier c of both nets of CE(c)
         + sum over linked cross-network pairs (i of one net, j of the other), both directions,
           of KL(p_j.detach() || p_i)

Each network learns from the other's predictions as fixed targets; no pair lies inside one
network. The link sets of the paper's ablation pick which pairs (i, j) are linked:
dense (all), same (stage k <-> stage k), cross (k <-> l, k != l), final (final <-> final),
none (cross-entropy only: independent training and deep supervision).
Every term is computed from fp32 logits, so the loss keeps full precision under --amp.
"""
import torch.nn.functional as F

SMOOTHING = 1e-8
LINKS = ("dense", "same", "cross", "final", "none")


def smoothed_log_probs(logits):
    """log p' where p' = (softmax(logits) + 1e-8) / (1 + C * 1e-8): finite logs, still a distribution."""
    num_classes = logits.shape[1]
    probs = F.softmax(logits.float(), dim=1)
    return ((probs + SMOOTHING) / (1 + num_classes * SMOOTHING)).log()


def kl_divergence(logits_p, logits_q):
    """Batch mean of KL(p || q), p and q the smoothed softmax of logits_p and logits_q."""
    log_p = smoothed_log_probs(logits_p)
    log_q = smoothed_log_probs(logits_q)
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


def loss_terms(outputs_1, outputs_2, targets, links="dense"):
    """Every term of the objective by name: ce_net1_aux1, ..., kl_net1_aux1_from_net2_final, ...

    `kl_netA_X_from_netB_Y` is KL(p_B,Y.detach() || p_A,X): classifier X of net A learning from
    classifier Y of net B. Their sum is dcm_loss().
    """
    names_1, names_2 = classifier_names(len(outputs_1)), classifier_names(len(outputs_2))
    terms = {}
    for net, names, outputs in (("net1", names_1, outputs_1), ("net2", names_2, outputs_2)):
        for name, logits in zip(names, outputs):
            terms[f"ce_{net}_{name}"] = F.cross_entropy(logits.float(), targets)
    for i, j in linked_pairs(len(outputs_1), len(outputs_2), links):
        terms[f"kl_net1_{names_1[i]}_from_net2_{names_2[j]}"] = kl_divergence(outputs_2[j].detach(), outputs_1[i])
        terms[f"kl_net2_{names_2[j]}_from_net1_{names_1[i]}"] = kl_divergence(outputs_1[i].detach(), outputs_2[j])
    return terms


def dcm_loss(outputs_1, outputs_2, targets, links="dense"):
    """The total training loss of the two networks as a scalar tensor."""
    return sum(loss_terms(outputs_1, outputs_2, targets, links).values())
