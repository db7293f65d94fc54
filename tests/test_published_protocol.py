"""The published code's test protocol for the MobileNet (BN with each test batch's own statistics),
logged in wrn_mobi/ as test_acc_net2*_batchstats next to the proper (eval-mode) accuracies."""
import copy

import pytest
import torch

from conftest import load_folder, read_log, run_main, write_cifar100

NUM_TRAIN, NUM_TEST, BATCH = 24, 20, 8  # 20 test images: batches of 8, 8 and 4
BATCHSTATS_KEYS = {"test_acc_net2_batchstats", "test_acc_net2_aux1_batchstats", "test_acc_net2_aux2_batchstats"}


def run_ok(folder, *args):
    result = run_main(folder, *args)
    assert result.returncode == 0, f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("protocol_data"), NUM_TRAIN, NUM_TEST)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """One epoch of DCM in wrn_mobi/ on tiny data; {folder: save folder} (test_main checks that wrn/'s
    logs hold no batchstats key)."""
    save = tmp_path_factory.mktemp("protocol") / "wrn_mobi"
    run_ok("wrn_mobi", "--save", save, "--dataroot", tiny_data, "--depth", 16, "--width", 1,
           "--batch_size", BATCH, "--epochs", 1, "--nthread", 1)
    return {"wrn_mobi": save}


def test_batchstats_keys_are_logged_for_the_mobilenet_only(runs):
    mobi_record, = read_log(runs["wrn_mobi"])
    assert BATCHSTATS_KEYS <= set(mobi_record)
    assert not [key for key in mobi_record if "net1" in key and "batchstats" in key]
    for key in BATCHSTATS_KEYS:
        assert 0 <= mobi_record[key] <= 100
        assert mobi_record[key] * NUM_TEST / 100 == pytest.approx(round(mobi_record[key] * NUM_TEST / 100))


def test_batchstats_equal_an_independent_train_mode_evaluation_of_the_saved_mobilenet(runs, tiny_data):
    modules = load_folder("wrn_mobi")
    record, = read_log(runs["wrn_mobi"])
    checkpoint = torch.load(runs["wrn_mobi"] / "checkpoint.pt", weights_only=True)
    mobilenet = modules.models.mobilenet(100, aux=True)
    mobilenet.load_state_dict(checkpoint["net2"])
    mobilenet.train()  # as the published code leaves it: BN normalises with each batch's statistics
    data = modules.dataset.load_dataset("CIFAR100", str(tiny_data), torch.device("cpu"))
    correct = torch.zeros(3)
    with torch.no_grad():
        for images, targets in modules.dataset.test_batches(data, BATCH):
            correct += torch.tensor([(logits.argmax(1) == targets).sum().item() for logits in mobilenet(images)])
    expected = dict(zip(["test_acc_net2_aux1_batchstats", "test_acc_net2_aux2_batchstats", "test_acc_net2_batchstats"],
                        (correct.double() * 100 / NUM_TEST).tolist()))
    assert {key: record[key] for key in expected} == pytest.approx(expected, abs=1e-9)


@pytest.fixture
def trained_mobi_step():
    """wrn_mobi's pair after two training steps (BN running statistics away from their start)."""
    modules = load_folder("wrn_mobi")
    device = torch.device("cpu")
    data = modules.dataset.random_image_data(16, 10, device, seed=5)
    data.test_images, data.test_labels = data.train_images[:10], data.train_labels[:10]
    torch.manual_seed(0)
    step = modules.training.TrainingStep(modules.models.build_pair(16, 1, 10, aux=True),
                                         modules.training.StepSettings("dense"), device)
    optimizer = torch.optim.SGD(step.parameters(), 0.1)
    modules.training.train_epoch(step, optimizer, modules.dataset.train_batches(data, 8, 1, 1), 2, "train",
                                 lambda index: 1.0)
    return modules, step, data


def test_batchstats_evaluation_changes_nothing_the_training_or_the_proper_evaluation_sees(trained_mobi_step):
    modules, step, data = trained_mobi_step
    def modes():
        return [(m.training, getattr(m, "track_running_stats", None)) for net in step.nets for m in net.modules()]

    states = [copy.deepcopy(net.state_dict()) for net in step.nets]
    proper_before = modules.training.evaluate(step, modules.dataset.test_batches(data, 4))
    for training_mode in (False, True):  # as after evaluate(), and as during training
        step.set_mode(training=training_mode)
        modes_before = modes()
        accuracies = modules.training.batch_statistics_accuracies(step, 1, modules.dataset.test_batches(data, 4))
        assert len(accuracies) == 3
        assert modes() == modes_before

    for net, state in zip(step.nets, states):
        assert net.state_dict().keys() == state.keys()
        assert all(torch.equal(value, state[key]) for key, value in net.state_dict().items())
    proper_after = modules.training.evaluate(step, modules.dataset.test_batches(data, 4))
    assert proper_after.accuracies() == proper_before.accuracies()
    assert proper_after.loss() == proper_before.loss()

