"""The studies beyond the paper's table: --temperature, --kd_weight, --kd_warmup, --kl_eps and the
pair's ensemble accuracy. Their defaults train exactly what the published objective trains (bit for
bit); the warm-up's weight at its first, middle and last step and across a mid-epoch resume; the
logged ensemble against the exported networks; the options in resume, summarize and the sweep.
The loss itself is checked against closed forms in test_loss.py.
"""
import copy
import csv
import dataclasses
import io
import math
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, load_folder, read_log, run_main, write_cifar100
from test_tools import call, log_record, markdown_rows, summarize, sweep, write_log, write_run

DISTILLATION_FLAGS = ("--temperature", "--kd_weight", "--kd_warmup", "--kl_eps")


# --- the warm-up schedule ----------------------------------------------------------------------------

def test_warmup_weight_at_its_first_middle_and_last_step(folder):
    kd_weight_at = load_folder(folder).dcm_loss.kd_weight_at
    # kd_weight 2, 3 epochs of warm-up, 10 steps an epoch: t = ((epoch - 1) + step / 10) / 3.
    assert kd_weight_at(2.0, 3.0, 1, 0, 10) == pytest.approx(2.0 * math.exp(-5.0), rel=1e-12)  # t = 0
    assert kd_weight_at(2.0, 3.0, 2, 5, 10) == pytest.approx(2.0 * math.exp(-5.0 * 0.5 ** 2), rel=1e-12)  # t = 1/2
    assert kd_weight_at(2.0, 3.0, 3, 9, 10) == pytest.approx(2.0 * math.exp(-5.0 * (0.1 / 3) ** 2), rel=1e-12)
    assert kd_weight_at(2.0, 3.0, 4, 0, 10) == 2.0  # t = 1: the whole weight from then on
    assert kd_weight_at(2.0, 3.0, 50, 7, 10) == 2.0
    weights = [kd_weight_at(2.0, 3.0, epoch, step, 10) for epoch in range(1, 5) for step in range(10)]
    assert weights == sorted(weights) and len(set(weights[:30])) == 30  # rises at every step of the ramp


def test_no_warmup_is_the_plain_weight_at_every_step(folder):
    kd_weight_at = load_folder(folder).dcm_loss.kd_weight_at
    assert {kd_weight_at(0.25, 0.0, epoch, step, 7) for epoch in (1, 2, 200) for step in range(7)} == {0.25}


def test_main_py_defaults_are_the_published_values(folder):
    modules = load_folder(folder)
    opt = modules.options.parse_options([])
    published = {"temperature": 1.0, "kd_weight": 1.0, "kd_warmup": 0.0, "kl_eps": 1e-8}
    assert {name: getattr(opt, name) for name in published} == published


def test_a_new_step_setting_takes_the_option_of_its_name():
    # A new knob is its option, its StepSettings field and its use in the loss: nothing passes it on.
    modules = load_folder("wrn")
    settings = dataclasses.make_dataclass("WithKnob", [("kl_knob", float, 0.0)], bases=(modules.training.StepSettings,),
                                          frozen=True)
    opt = modules.options.parse_options(["--temperature", "2", "--amp", "bf16"])
    opt.kl_knob = 0.5
    assert settings.from_options(opt, "same") == settings(links="same", temperature=2.0, amp="bf16", kl_knob=0.5)


# --- the defaults train what the published objective trains, bit for bit ----------------------------

def published_objective(dcm_loss, outputs_1, outputs_2, targets, links):
    """The DCM loss as written before the distillation options: CE on every classifier of both nets,
    then KL(p_j.detach() || p_i) with the 1e-8 smoothing over the linked pairs, both directions,
    summed in that order."""
    def smoothed_log_probs(logits):
        probs = F.softmax(logits.float(), dim=1)
        return ((probs + 1e-8) / (1 + logits.shape[1] * 1e-8)).log()

    def kl(logits_p, logits_q):
        log_p, log_q = smoothed_log_probs(logits_p), smoothed_log_probs(logits_q)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()

    terms = [F.cross_entropy(logits.float(), targets) for logits in outputs_1 + outputs_2]
    for i, j in dcm_loss.linked_pairs(len(outputs_1), len(outputs_2), links):
        terms += [kl(outputs_2[j].detach(), outputs_1[i]), kl(outputs_1[i].detach(), outputs_2[j])]
    return sum(terms)


def sgd(nets):
    return torch.optim.SGD([p for net in nets for p in net.parameters()], 0.1, momentum=0.9, weight_decay=5e-4)


def trained_with_training_py(modules, nets, links, batches, **distillation):
    """The nets after main.py's training path (TrainingStep, train_epoch, the warm-up's weights)."""
    settings = modules.training.StepSettings(links, **{
        key: distillation[key] for key in ("temperature", "kd_weight", "kl_eps") if key in distillation})
    step = modules.training.TrainingStep(nets, settings, torch.device("cpu"))
    kd_weight_at = lambda index: modules.dcm_loss.kd_weight_at(  # noqa: E731
        settings.kd_weight, distillation.get("kd_warmup", 0.0), 1, index, len(batches))
    modules.training.train_epoch(step, sgd(nets), batches, len(batches), "test", kd_weight_at)
    return nets


@pytest.mark.parametrize("depth, aux, links", [(16, True, "dense"), (10, False, "final")], ids=["dcm", "dml"])
def test_default_options_train_bit_identical_weights_to_the_published_objective(depth, aux, links):
    modules = load_folder("wrn")
    torch.manual_seed(0)
    initial = modules.models.build_pair(depth, 1, 10, aux)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator))
               for _ in range(2)]

    reference = copy.deepcopy(initial)
    optimizer = sgd(reference)
    for net in reference:
        net.train()
    for images, targets in batches:
        loss = published_objective(modules.dcm_loss, reference[0](images), reference[1](images), targets, links)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    ours = trained_with_training_py(modules, copy.deepcopy(initial), links, batches)
    tempered = trained_with_training_py(modules, copy.deepcopy(initial), links, batches, temperature=2.0)
    for net_ref, net_ours, net_tempered in zip(reference, ours, tempered):
        state_ref, state_ours, state_tempered = net_ref.state_dict(), net_ours.state_dict(), net_tempered.state_dict()
        assert all(torch.equal(state_ref[key], state_ours[key]) for key in state_ref)
        # The comparison can fail: another temperature trains other weights.
        assert not all(torch.equal(state_ref[key], state_tempered[key]) for key in state_ref)


# --- a real run with every option away from its default ----------------------------------------------

NUM_TRAIN, NUM_TEST, NUM_LABELS, BATCH, EPOCHS = 128, 40, 10, 16, 2  # 8 steps an epoch
KNOBS = ("--temperature", 2, "--kd_weight", 0.5, "--kd_warmup", 1.5, "--kl_eps", 0)


def run_args(save, dataroot, *extra):
    return ["--nthread", 1, "--save", save, "--dataroot", dataroot, "--depth", 16, "--width", 1,
            "--batch_size", BATCH, "--epochs", EPOCHS, "--deterministic", "--checkpoint_every", 1, *extra]


def start(args):
    command = [sys.executable, str(ROOT / "wrn" / "main.py"), "--gpu_id", "", *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT / "wrn", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("distillation_data"), NUM_TRAIN, NUM_TEST, num_classes=NUM_LABELS)


@pytest.fixture(scope="module")
def knob_run(tmp_path_factory, data):
    """wrn/: DCM with T 2, weight 0.5, 1.5 epochs of warm-up and the plain KL, 2 epochs in one go."""
    save = tmp_path_factory.mktemp("knob_run") / "save"
    result = run_main("wrn", *run_args(save, data, *KNOBS))
    assert result.returncode == 0, result.stderr
    return save


def test_the_options_are_logged_with_the_warmup_weight_of_each_epochs_last_step(knob_run):
    records = read_log(knob_run)
    for record in records:
        assert (record["temperature"], record["kd_weight"], record["kd_warmup"], record["kl_eps"]) == (2, 0.5, 1.5, 0)
    # The last of 8 steps: t = (7/8) / 1.5 in epoch 1; past the warm-up in epoch 2.
    assert records[0]["train_kd_weight"] == pytest.approx(0.5 * math.exp(-5 * (1 - 7 / 8 / 1.5) ** 2), rel=1e-12)
    assert records[1]["train_kd_weight"] == 0.5


def test_the_logged_ensemble_accuracy_is_that_of_the_exported_networks(knob_run, data):
    modules = load_folder("wrn")
    last = read_log(knob_run)[-1]
    test_set = modules.dataset.load_dataset("CIFAR100", str(data), torch.device("cpu"))
    images = torch.cat([batch for batch, _ in modules.dataset.test_batches(test_set, NUM_TEST)])
    labels = test_set.test_labels
    probabilities = []
    for index in (1, 2):
        net = modules.models.wrn(16, 1, num_classes=test_set.num_classes, aux=False)
        net.load_state_dict(torch.load(knob_run / f"net{index}.pt", map_location="cpu", weights_only=True))
        with torch.no_grad():
            probabilities.append(torch.softmax(net.eval()(images)[-1].double(), dim=1))
        own = (probabilities[-1].argmax(dim=1) == labels).double().mean().item() * 100
        assert own == pytest.approx(last[f"test_acc_net{index}"], abs=1e-9)
    ensemble = ((probabilities[0] + probabilities[1]) / 2).argmax(dim=1)
    assert (ensemble == labels).double().mean().item() * 100 == pytest.approx(last["test_acc_ensemble"], abs=1e-9)
    for record in read_log(knob_run):
        for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
            correct = record[f"{split}_acc_ensemble"] * count / 100
            assert 0 <= correct <= count and correct == pytest.approx(round(correct), abs=1e-6), (split, record)


def test_a_mid_epoch_resume_continues_the_warmup_exactly(tmp_path, knob_run, data):
    """Killed part-way through epoch 1 (inside the warm-up) and resumed: the uninterrupted run's weights."""
    save = tmp_path / "killed"
    for attempt in range(3):
        process = start(run_args(save, data, *KNOBS, *(["--resume"] if (save / "checkpoint.pt").exists() else [])))
        before = (save / "checkpoint.pt").stat().st_mtime_ns if (save / "checkpoint.pt").exists() else 0
        while process.poll() is None and not ((save / "checkpoint.pt").exists()
                                              and (save / "checkpoint.pt").stat().st_mtime_ns != before):
            time.sleep(0.001)
        process.kill()
        process.wait()
        state = torch.load(save / "checkpoint.pt", map_location="cpu", weights_only=True)
        if state["step"] > 0 and state["epoch"] + 1 < 1.5 + 1:  # in an epoch, inside the warm-up
            break
    assert state["step"] > 0 and state["epoch"] == 0, (state["epoch"], state["step"])
    result = run_main("wrn", *run_args(save, data, *KNOBS, "--resume"))
    assert result.returncode == 0, result.stderr
    for name in ("net1.pt", "net2.pt"):
        assert (save / name).read_bytes() == (knob_run / name).read_bytes(), name
    assert [r["train_kd_weight"] for r in read_log(save)] == [r["train_kd_weight"] for r in read_log(knob_run)]


def test_resume_with_another_temperature_is_refused(tmp_path, knob_run, data):
    other = [*KNOBS[:1], 3, *KNOBS[2:]]
    result = run_main("wrn", *run_args(tmp_path / "other", data, *other, "--resume", knob_run / "checkpoint.pt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--temperature 2.0 (not 3.0)" in result.stderr
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("args, words", [
    (["--method", "ds", "--kd_weight", "0.5", "--kl_eps", "0"], ["--method ds has no KL", "--kd_weight, --kl_eps"]),
    (["--temperature", "0"], ["--temperature: must be > 0, got 0"]),
    (["--kd_warmup", "-1"], ["--kd_warmup: must be >= 0, got -1"]),
    (["--kl_eps", "nan"], ["--kl_eps: must be >= 0, got nan"]),
])
def test_bad_distillation_options_are_usage_errors(folder, args, words):
    modules = load_folder(folder)
    with pytest.raises(modules.main.UsageError) as error:
        modules.options.parse_options(args)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_a_distillation_option_for_a_method_without_kl_exits_2_before_anything_is_written(tmp_path):
    result = run_main("wrn", "--save", tmp_path / "run", "--dataset", "synthetic", "--depth", 10, "--width", 1,
                      "--method", "ind", "--temperature", 4)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--method ind has no KL term: drop --temperature" in result.stderr
    assert not (tmp_path / "run").exists()


# --- summarize and the sweep ------------------------------------------------------------------------

def test_summarize_gives_the_options_their_own_rows_and_paper_values_only_at_the_published_ones(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path / "published", "wrn", "dcm", seed, (16.0 + seed, 16.5))  # logs without the options
        write_run(tmp_path / "explicit", "wrn", "dcm", seed + 2, (16.0, 16.5), temperature=1.0, kd_weight=1.0,
                  kd_warmup=0.0, kl_eps=1e-8)
        write_run(tmp_path / "hot", "wrn", "dcm", seed, (15.0 + seed, 15.5), temperature=4.0)
    code, out, err = call(summarize.main, tmp_path, "--csv")
    assert code == 0, err
    cells = {(row["temperature"], row["net"]): row for row in csv.DictReader(io.StringIO(out))}
    assert set(cells) == {("1.0", "1"), ("1.0", "2"), ("4.0", "1"), ("4.0", "2")}
    assert cells["1.0", "1"]["runs"] == "4" and cells["1.0", "1"]["paper_mean"] == "16.61"  # one row, paper beside
    assert cells["4.0", "1"]["runs"] == "2" and cells["4.0", "1"]["paper_mean"] == ""
    assert "temperature 4.0 (the paper's: 1.0)" in err


def test_summarize_ensemble_adds_a_column_per_method(tmp_path):
    for seed, ensemble_error in ((1, 14.0), (2, 15.0), (3, None)):
        record = log_record(200, 16.0, 16.5, seed=seed)
        if ensemble_error is not None:
            record[summarize.ENSEMBLE_KEY] = 100 - ensemble_error
        write_log(tmp_path / f"dcm{seed}", [record])
    code, out, err = call(summarize.main, tmp_path, "--ensemble")
    assert code == 0, err
    header, *rows = markdown_rows(out)
    assert header[-3:] == ["DCM 1", "DCM 2", "DCM ensemble"]
    assert rows[0][-1] == "14.50 ± 0.71 (n=2)" and rows[1][-1] == ""  # no paper value for the ensemble
    assert f"lacks {summarize.ENSEMBLE_KEY}" in err
    code, out, _ = call(summarize.main, tmp_path)
    assert "ensemble" not in markdown_rows(out)[0][-1]


def test_sweep_names_the_distillation_options_only_away_from_their_defaults():
    defaults = ["--temperature", "1", "--kd_weight=1.0", "--kd_warmup", "0", "--kl_eps", "1e-8"]
    assert sweep.run_name("wrn", "dcm", 1, defaults) == "wrn-28-10_wrn-28-10_dcm_seed1"
    assert (sweep.run_name("wrn", "dcm", 1, ["--temperature", "4", "--kd_warmup", "5", "--kl_eps=0"])
            == "wrn-28-10_wrn-28-10_dcm_seed1_kd_warmup-5.0_kl_eps-0.0_temperature-4.0")
