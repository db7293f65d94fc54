"""dcm_loss.py against SPEC §3-§4: the smoothed KL, which logits each term trains, the link sets; and the
temperature, distillation weight and smoothing beyond the published values, against closed forms."""
import itertools
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_folder

SMOOTHING = 1e-8
NAMES = ("aux1", "aux2", "final")
KL_NAME = re.compile(r"kl_(net[12])_(\w+)_from_(net[12])_(\w+)")


def reference_kl(logits_p, logits_q):
    """Batch mean of KL(p' || q') in float64 numpy, p' = (softmax + 1e-8) / (1 + C * 1e-8)."""
    def smoothed(logits):
        logits = np.asarray(logits, dtype=np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        return (p + SMOOTHING) / (1 + logits.shape[1] * SMOOTHING)

    p, q = smoothed(logits_p), smoothed(logits_q)
    return float(np.mean(np.sum(p * np.log(p / q), axis=1)))


def smoothed_probs(logits):
    p = F.softmax(logits.double(), dim=1)
    return (p + SMOOTHING) / (1 + logits.shape[1] * SMOOTHING)


def random_outputs(generator, batch=4, num_classes=5, count=3, requires_grad=False):
    return [torch.randn(batch, num_classes, generator=generator, requires_grad=requires_grad) for _ in range(count)]


def kl_term_names(terms):
    return {name for name in terms if name.startswith("kl_")}


def ce_term_names(terms):
    return {name for name in terms if name.startswith("ce_")}


# --- kl_divergence -------------------------------------------------------------------------------

def test_kl_divergence_matches_numpy_closed_form(folder):
    kl_divergence = load_folder(folder).dcm_loss.kl_divergence
    generator = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(6, 7, generator=generator) * 3, torch.randn(6, 7, generator=generator) * 3
    value = kl_divergence(logits_p, logits_q)
    assert value.dim() == 0
    assert value.item() == pytest.approx(reference_kl(logits_p.numpy(), logits_q.numpy()), rel=1e-5)


def test_kl_divergence_smooths_near_zero_probabilities(folder):
    kl_divergence = load_folder(folder).dcm_loss.kl_divergence
    # p puts all its mass where q has ~e^-100: unsmoothed KL is ~100, smoothed ~log(1e8) = 18.4.
    logits_p = torch.tensor([[0.0, -100.0], [5.0, 5.0]])
    logits_q = torch.tensor([[-100.0, 0.0], [5.0, 5.0]])
    value = kl_divergence(logits_p, logits_q).item()
    assert np.isfinite(value)
    assert value == pytest.approx(reference_kl(logits_p.numpy(), logits_q.numpy()), rel=1e-4)
    assert value == pytest.approx(np.log(1e8) / 2, rel=1e-3)


def test_kl_divergence_matches_torch_kl_div_batchmean(folder):
    kl_divergence = load_folder(folder).dcm_loss.kl_divergence
    generator = torch.Generator().manual_seed(1)
    logits_p, logits_q = torch.randn(5, 10, generator=generator), torch.randn(5, 10, generator=generator)
    p, q = smoothed_probs(logits_p), smoothed_probs(logits_q)
    expected = F.kl_div(q.log(), p, reduction="batchmean")
    assert kl_divergence(logits_p, logits_q).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_divergence_of_a_distribution_with_itself_is_zero(folder):
    kl_divergence = load_folder(folder).dcm_loss.kl_divergence
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(2)) * 4
    assert kl_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    # Shifting all logits leaves the softmax unchanged.
    assert kl_divergence(logits, logits + 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_divergence_is_positive_and_asymmetric(folder):
    kl_divergence = load_folder(folder).dcm_loss.kl_divergence
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits_p, logits_q = torch.randn(4, 6, generator=generator) * 2, torch.randn(4, 6, generator=generator) * 2
        assert kl_divergence(logits_p, logits_q).item() > 0
    logits_p = torch.tensor([[4.0, 0.0, 0.0]])
    logits_q = torch.tensor([[0.0, 0.0, 0.0]])
    forward, backward = kl_divergence(logits_p, logits_q).item(), kl_divergence(logits_q, logits_p).item()
    assert forward == pytest.approx(reference_kl(logits_p.numpy(), logits_q.numpy()), rel=1e-5)
    assert backward == pytest.approx(reference_kl(logits_q.numpy(), logits_p.numpy()), rel=1e-5)
    assert abs(forward - backward) > 0.1


# --- loss_terms: names, directions, gradient flow ------------------------------------------------

def test_cross_entropy_terms_name_every_classifier_of_both_nets(folder):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(4)
    outputs_1, outputs_2 = random_outputs(generator), random_outputs(generator)
    targets = torch.tensor([0, 1, 2, 3])
    terms = dcm.loss_terms(outputs_1, outputs_2, targets)
    ce_names = [name for name in terms if name.startswith("ce_")]
    assert ce_names == ["ce_net1_aux1", "ce_net1_aux2", "ce_net1_final",
                        "ce_net2_aux1", "ce_net2_aux2", "ce_net2_final"]
    for net, outputs in (("net1", outputs_1), ("net2", outputs_2)):
        for name, logits in zip(NAMES, outputs):
            assert terms[f"ce_{net}_{name}"].item() == pytest.approx(F.cross_entropy(logits, targets).item())


def assert_only_the_student_gets_a_gradient(term, logits, student_key, term_name):
    """The KL term `term` reaches the student's logits and no other classifier's (its teacher is detached)."""
    keys = list(logits)
    grads = torch.autograd.grad(term, [logits[key] for key in keys], retain_graph=True, allow_unused=True)
    for key, grad in zip(keys, grads):
        if key == student_key:
            assert grad is not None and grad.abs().sum() > 0, term_name
        else:
            assert grad is None or torch.count_nonzero(grad) == 0, (term_name, key)


def test_every_kl_term_trains_only_its_student_from_its_detached_teacher(folder):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(5)
    logits = {(net, name): torch.randn(4, 5, generator=generator, requires_grad=True)
              for net in ("net1", "net2") for name in NAMES}
    terms = dcm.loss_terms([logits["net1", name] for name in NAMES], [logits["net2", name] for name in NAMES],
                           torch.tensor([0, 1, 2, 3]))
    names = kl_term_names(terms)
    assert len(names) == 18
    for term_name in sorted(names):
        student_net, student, teacher_net, teacher = KL_NAME.fullmatch(term_name).groups()
        assert student_net != teacher_net, term_name
        expected = dcm.kl_divergence(logits[teacher_net, teacher].detach(), logits[student_net, student].detach())
        assert terms[term_name].item() == pytest.approx(expected.item(), rel=1e-6), term_name
        assert_only_the_student_gets_a_gradient(terms[term_name], logits, (student_net, student), term_name)


def test_each_cross_entropy_term_trains_only_its_classifier(folder):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(6)
    outputs_1 = random_outputs(generator, requires_grad=True)
    outputs_2 = random_outputs(generator, requires_grad=True)
    targets = torch.tensor([4, 3, 2, 1])
    for net, outputs in (("net1", outputs_1), ("net2", outputs_2)):
        for index, name in enumerate(NAMES):
            for tensor in outputs_1 + outputs_2:
                tensor.grad = None
            dcm.loss_terms(outputs_1, outputs_2, targets)[f"ce_{net}_{name}"].backward()
            for tensor in outputs_1 + outputs_2:
                if tensor is outputs[index]:
                    assert tensor.grad.abs().sum() > 0
                else:
                    assert tensor.grad is None


# --- link sets ---------------------------------------------------------------------------------------

def pair_set(terms):
    """{(student net, student classifier, teacher net, teacher classifier)} of the KL terms."""
    return {KL_NAME.fullmatch(name).groups() for name in kl_term_names(terms)}


def both_directions(pairs):
    """Pairs (i of net 1, j of net 2) as KL terms in both directions."""
    return ({("net1", i, "net2", j) for i, j in pairs} | {("net2", j, "net1", i) for i, j in pairs})


@pytest.mark.parametrize("links,count", [("dense", 18), ("same", 6), ("cross", 12), ("final", 2), ("none", 0)])
def test_number_of_kl_terms_per_link_set(folder, links, count):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(7)
    terms = dcm.loss_terms(random_outputs(generator), random_outputs(generator), torch.tensor([0, 1, 2, 3]), links)
    assert len(kl_term_names(terms)) == count
    assert len(ce_term_names(terms)) == 6


@pytest.mark.parametrize("links,pairs", [
    ("dense", set(itertools.product(NAMES, NAMES))),
    ("same", {("aux1", "aux1"), ("aux2", "aux2"), ("final", "final")}),
    ("cross", {(i, j) for i in NAMES for j in NAMES if i != j}),
    ("final", {("final", "final")}),
])
def test_link_sets_pick_the_paper_pairs(folder, links, pairs):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(8)
    terms = dcm.loss_terms(random_outputs(generator), random_outputs(generator), torch.tensor([0, 1, 2, 3]), links)
    assert pair_set(terms) == both_directions(pairs)


def test_unknown_link_set_is_rejected(folder):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(9)
    with pytest.raises(ValueError, match="links"):
        dcm.loss_terms(random_outputs(generator), random_outputs(generator), torch.tensor([0, 1, 2, 3]), "all")


@pytest.mark.parametrize("method,links,num_ce,num_kl", [
    ("dcm", "dense", 6, 18), ("dcm", "same", 6, 6), ("dcm", "cross", 6, 12), ("dcm", "final", 6, 2),
    ("dml", "dense", 2, 2), ("ds", "dense", 6, 0), ("ind", "dense", 2, 0)])
def test_terms_of_each_method(folder, method, links, num_ce, num_kl):
    modules = load_folder(folder)
    opt = SimpleNamespace(method=method, links=links)
    uses_aux = modules.options.METHODS[method].uses_aux
    num_classifiers = 3 if uses_aux else 1
    generator = torch.Generator().manual_seed(10)
    terms = modules.dcm_loss.loss_terms(random_outputs(generator, count=num_classifiers),
                                        random_outputs(generator, count=num_classifiers),
                                        torch.tensor([0, 1, 2, 3]), modules.options.distillation_links(opt))
    assert len(ce_term_names(terms)) == num_ce
    assert len(kl_term_names(terms)) == num_kl
    if method == "dml":
        assert pair_set(terms) == both_directions({("final", "final")})


def test_methods_use_aux_classifiers_as_in_the_paper(folder):
    options = load_folder(folder).options
    assert {name: method.uses_aux for name, method in options.METHODS.items()} == {
        "ind": False, "dml": False, "ds": True, "dcm": True}


# --- the total ------------------------------------------------------------------------------------

@pytest.mark.parametrize("links", ["dense", "same", "cross", "final", "none"])
def test_dcm_loss_is_the_sum_of_its_terms(folder, links):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(11)
    outputs_1, outputs_2 = random_outputs(generator), random_outputs(generator)
    targets = torch.tensor([0, 4, 2, 1])
    total = dcm.dcm_loss(outputs_1, outputs_2, targets, links)
    assert total.dim() == 0
    expected = sum(value.item() for value in dcm.loss_terms(outputs_1, outputs_2, targets, links).values())
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_dense_dcm_loss_matches_a_hand_computation(folder):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(12)
    outputs_1, outputs_2 = random_outputs(generator, num_classes=10), random_outputs(generator, num_classes=10)
    targets = torch.tensor([9, 0, 3, 3])
    cross_entropy = sum(F.cross_entropy(logits, targets).item() for logits in outputs_1 + outputs_2)
    kl = sum(reference_kl(p.numpy(), q.numpy()) + reference_kl(q.numpy(), p.numpy())
             for p, q in itertools.product(outputs_1, outputs_2))
    assert dcm.dcm_loss(outputs_1, outputs_2, targets).item() == pytest.approx(cross_entropy + kl, rel=1e-5)
    kl_from_module = sum(dcm.kl_divergence(p, q).item() + dcm.kl_divergence(q, p).item()
                         for p, q in itertools.product(outputs_1, outputs_2))
    assert kl_from_module == pytest.approx(kl, rel=1e-5)
    assert dcm.dcm_loss(outputs_1, outputs_2, targets, links="dense").item() == pytest.approx(
        cross_entropy + kl_from_module, rel=1e-6)


def test_dcm_loss_gradient_reaches_every_classifier(folder):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(13)
    outputs_1 = random_outputs(generator, requires_grad=True)
    outputs_2 = random_outputs(generator, requires_grad=True)
    dcm.dcm_loss(outputs_1, outputs_2, torch.tensor([0, 1, 2, 3])).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in outputs_1 + outputs_2)


# --- temperature, distillation weight, smoothing (beyond the published T = 1, weight 1, eps 1e-8) ---

def reference_kl_at(logits_p, logits_q, temperature, eps):
    """Batch mean of KL(p || q) in float64 numpy, p = softmax(logits_p / T) smoothed by eps (0: none)."""
    def probs(logits):
        logits = np.asarray(logits, dtype=np.float64) / temperature
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        return (p + eps) / (1 + logits.shape[1] * eps)

    p, q = probs(logits_p), probs(logits_q)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


@pytest.mark.parametrize("temperature, eps", [(3.0, 0.0), (0.5, 0.0), (2.5, 1e-8), (4.0, 1e-3)])
def test_kl_divergence_at_a_temperature_and_smoothing_matches_numpy(folder, temperature, eps):
    kl_divergence = load_folder(folder).dcm_loss.kl_divergence
    generator = torch.Generator().manual_seed(20)
    logits_p, logits_q = torch.randn(6, 7, generator=generator) * 3, torch.randn(6, 7, generator=generator) * 3
    value = kl_divergence(logits_p, logits_q, temperature=temperature, eps=eps).item()
    assert value == pytest.approx(reference_kl_at(logits_p.numpy(), logits_q.numpy(), temperature, eps), rel=1e-5)
    assert value != pytest.approx(reference_kl(logits_p.numpy(), logits_q.numpy()), rel=1e-3)


def test_eps_0_is_the_plain_kl_without_the_cap(folder):
    kl_divergence = load_folder(folder).dcm_loss.kl_divergence
    logits_p, logits_q = torch.tensor([[0.0, -100.0]]), torch.tensor([[-100.0, 0.0]])
    # KL(p || q) = sum p log(p / q) = (1 - e^-100) * 100 + e^-100 * (-100) = 100 up to e^-100.
    assert kl_divergence(logits_p, logits_q, eps=0).item() == pytest.approx(100.0, rel=1e-6)
    assert kl_divergence(logits_p, logits_q).item() == pytest.approx(np.log(1e8), rel=1e-3)  # the published cap


def test_the_published_smoothing_starves_the_gradient_of_a_network_far_from_its_target(folder):
    """At a logit gap of 25 the smoothed KL passes ~1e-3 of the plain KL's gradient (docs/methods.md)."""
    kl_divergence = load_folder(folder).dcm_loss.kl_divergence
    teacher = torch.zeros(1, 100)
    teacher[0, 0] = 25.0
    grads = {}
    for eps in (1e-8, 0.0):
        student = torch.zeros(1, 100)
        student[0, 1] = 25.0
        student.requires_grad_(True)
        kl_divergence(teacher, student, eps=eps).backward()
        grads[eps] = student.grad
    # The plain KL's gradient is softmax(student) - softmax(teacher), about e_1 - e_0.
    expected = F.softmax(student.detach().double(), dim=1) - F.softmax(teacher.double(), dim=1)
    assert torch.allclose(grads[0.0].double(), expected, atol=1e-6)
    assert grads[1e-8].norm() / grads[0.0].norm() < 1e-2


def test_kl_terms_are_weight_times_t_squared_times_the_kl_at_t_and_cross_entropy_stays_at_t_1(folder):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(21)
    outputs_1, outputs_2 = random_outputs(generator, num_classes=10), random_outputs(generator, num_classes=10)
    targets = torch.tensor([9, 0, 3, 3])
    temperature, kd_weight, eps = 4.0, 0.3, 0.0
    knobs = dict(temperature=temperature, kd_weight=kd_weight, eps=eps)
    terms = dcm.loss_terms(outputs_1, outputs_2, targets, "dense", **knobs)
    for net, outputs in (("net1", outputs_1), ("net2", outputs_2)):
        for name, logits in zip(NAMES, outputs):
            expected = F.cross_entropy(logits, targets).item()
            assert terms[f"ce_{net}_{name}"].item() == pytest.approx(expected, rel=1e-6)
    logits = {(net, name): tensor for net, outputs in (("net1", outputs_1), ("net2", outputs_2))
              for name, tensor in zip(NAMES, outputs)}
    for term_name in kl_term_names(terms):
        student_net, student, teacher_net, teacher = KL_NAME.fullmatch(term_name).groups()
        teacher_logits, student_logits = logits[teacher_net, teacher].numpy(), logits[student_net, student].numpy()
        expected = kd_weight * temperature ** 2 * reference_kl_at(teacher_logits, student_logits, temperature, eps)
        assert terms[term_name].item() == pytest.approx(expected, rel=1e-5), term_name
    total = dcm.dcm_loss(outputs_1, outputs_2, targets, "dense", **knobs)
    assert total.item() == pytest.approx(sum(value.item() for value in terms.values()), rel=1e-6)
    # The weight may be a 0-dim tensor (the warm-up's weight of a step): the same terms.
    tensor_terms = dcm.loss_terms(outputs_1, outputs_2, targets, temperature=temperature,
                                  kd_weight=torch.tensor(kd_weight), eps=eps)
    assert all(torch.equal(tensor_terms[name], terms[name]) for name in terms)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 8.0])
def test_the_kl_terms_gradient_is_weight_times_t_times_the_difference_of_tempered_softmaxes(folder, temperature):
    """d/dz_s of L T^2 KL(p_T(z_t) || p_T(z_s)) = L T (softmax(z_s / T) - softmax(z_t / T)) / N
    (Hinton, Vinyals & Dean 2015, eq. 2): the T^2 factor keeps it at the cross-entropy's scale."""
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(22)
    kd_weight = 0.7
    teacher = torch.randn(5, 10, generator=generator, dtype=torch.float64) * 3
    student = (torch.randn(5, 10, generator=generator, dtype=torch.float64) * 3).requires_grad_(True)
    terms = dcm.loss_terms([student], [teacher], torch.zeros(5, dtype=torch.long), "final",
                           temperature=temperature, kd_weight=kd_weight, eps=0)
    (grad,) = torch.autograd.grad(terms["kl_net1_final_from_net2_final"], [student])
    expected = kd_weight * temperature * (F.softmax(student.detach() / temperature, dim=1)
                                          - F.softmax(teacher / temperature, dim=1)) / 5
    assert torch.allclose(grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_at_a_high_temperature_the_kl_gradient_matches_logits_at_the_cross_entropys_scale(folder):
    """T -> infinity: the gradient tends to L (z_s - z_t) / (N C) for zero-mean logits (Hinton et
    al. 2015, eq. 3-4), independent of T."""
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(23)
    teacher, student = torch.randn(4, 10, generator=generator), torch.randn(4, 10, generator=generator)
    teacher, student = teacher - teacher.mean(1, keepdim=True), student - student.mean(1, keepdim=True)
    student.requires_grad_(True)
    grads = []
    for temperature in (50.0, 200.0):
        terms = dcm.loss_terms([student], [teacher], torch.zeros(4, dtype=torch.long), "final",
                               temperature=temperature, kd_weight=2.0, eps=0)
        grads.append(torch.autograd.grad(terms["kl_net1_final_from_net2_final"], [student])[0])
    expected = 2.0 * (student.detach() - teacher) / (4 * 10)
    for grad in grads:
        assert torch.allclose(grad, expected, rtol=5e-2, atol=1e-4)


def test_with_temperature_weight_and_eps_0_every_kl_term_still_trains_only_its_student(folder):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(24)
    logits = {(net, name): torch.randn(4, 5, generator=generator, requires_grad=True)
              for net in ("net1", "net2") for name in NAMES}
    terms = dcm.loss_terms([logits["net1", name] for name in NAMES], [logits["net2", name] for name in NAMES],
                           torch.tensor([0, 1, 2, 3]), temperature=3.0, kd_weight=0.5, eps=0)
    for term_name in sorted(kl_term_names(terms)):
        student_net, student, _, _ = KL_NAME.fullmatch(term_name).groups()
        assert_only_the_student_gets_a_gradient(terms[term_name], logits, (student_net, student), term_name)


def test_published_defaults_of_the_public_functions(folder):
    dcm = load_folder(folder).dcm_loss
    generator = torch.Generator().manual_seed(25)
    outputs_1, outputs_2 = random_outputs(generator), random_outputs(generator)
    targets = torch.tensor([0, 1, 2, 3])
    explicit = dcm.dcm_loss(outputs_1, outputs_2, targets, "dense", temperature=1.0, kd_weight=1.0, eps=1e-8)
    assert torch.equal(dcm.dcm_loss(outputs_1, outputs_2, targets), explicit)
    assert torch.equal(dcm.kl_divergence(outputs_1[0], outputs_2[0]),
                       dcm.kl_divergence(outputs_1[0], outputs_2[0], temperature=1.0, eps=1e-8))
