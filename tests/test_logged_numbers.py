"""Every test number main.py logs belongs to the networks it exports, measured as its column says.

For each way a run can be launched (one process; torchrun with 2 processes, with and without
--sync_bn; --amp bf16 and fp16; --channels_last; --compile; a run stopped mid-epoch and resumed),
the last log line's test accuracy and test loss of both final classifiers must equal an
evaluation of the exported net1.pt / net2.pt written here from scratch (BN in eval mode, the
run's autocast), and tools/evaluate.py must reproduce them.

Tiny runs: WRN-10-1 pairs (--method ind: each network's final classifier is its only one, so the
test loss is the sum of their two cross-entropies), 1 epoch on 136 images of a 10-class
CIFAR-100-format set in batches of 64 (the last one holds 8, split 4 + 4 by two processes), 50
test images; options that need no run of their own share one. Accuracies must match exactly
(whole image counts), losses to float rounding: a test pass with other BN statistics or another
precision misses them by percents.
"""
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, load_folder, read_log, run_main, write_cifar100

NUM_TRAIN, NUM_TEST, NUM_CLASSES = 136, 50, 10
TINY = ["--depth", "10", "--width", "1", "--method", "ind", "--epochs", "1", "--batch_size", "64", "--nthread", "1"]
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TIMEOUT = 300
# config -> (processes, extra flags). "one_process_resumed" is stopped by SIGTERM mid-epoch (9
# steps, a checkpoint after each), then resumed. --compile builds one graph per batch shape, each
# slow on a CPU: there, one training batch shape (2 x 68) and one test batch (50).
CONFIGS = {
    "one_process_resumed": (1, ["--batch_size", "16", "--checkpoint_every", "1"]),
    "torchrun": (2, []),
    "torchrun_sync_bn_channels_last": (2, ["--sync_bn", "--channels_last"]),
    "amp_bf16": (1, ["--amp", "bf16"]),
    "amp_fp16": (1, ["--amp", "fp16"]),
    "compile": (1, ["--compile", "--batch_size", "68"]),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("logged_numbers_data"), NUM_TRAIN, NUM_TEST, NUM_CLASSES)


def run(config, save, data, tmp_path):
    """Train `config` into `save`; the exit status is checked here."""
    processes, extra = CONFIGS[config]
    args = [*TINY, "--save", str(save), "--dataroot", str(data), *extra]
    if processes > 1:
        (tmp_path / "torchrun_tmp").mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone",
                   str(ROOT / "wrn" / "main.py"), "--gpu_id", "", *args]
        result = subprocess.run(command, cwd=ROOT / "wrn", capture_output=True, text=True, timeout=TIMEOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path / "torchrun_tmp")})
    elif config == "one_process_resumed":
        process = subprocess.Popen([sys.executable, str(ROOT / "wrn" / "main.py"), "--gpu_id", "", *args],
                                   cwd=ROOT / "wrn", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while process.poll() is None and not (save / "checkpoint.pt").exists():  # training is under way
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=TIMEOUT)
        assert "stopped by SIGTERM" in stderr, stderr
        state = torch.load(save / "checkpoint.pt", weights_only=True)
        assert (state["epoch"], state["step"] > 0) == (0, True), "the stop did not land mid-epoch"
        result = run_main("wrn", *args, "--resume")
    else:
        result = run_main("wrn", *args, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]


@torch.no_grad()
def exported_network_numbers(save, data, amp):
    """(accuracy %, mean cross-entropy) of net1.pt and net2.pt, each alone: BN in eval mode, the
    test set normalised as main.py does, under autocast to `amp`."""
    modules = load_folder("wrn")
    test_data = modules.dataset.load_dataset("CIFAR100", str(data), torch.device("cpu"))
    images = modules.dataset.normalize(test_data.test_images, test_data.mean, test_data.std)
    numbers = []
    for name in ("net1.pt", "net2.pt"):
        network = modules.models.wrn(10, 1, test_data.num_classes, aux=False)
        network.load_state_dict(torch.load(save / name, weights_only=True))
        with torch.autocast("cpu", dtype=AMP_DTYPES[amp], enabled=amp != "none"):
            logits = network.eval()(images)[-1].float()
        accuracy = (logits.argmax(dim=1) == test_data.test_labels).double().mean().item() * 100
        numbers.append((accuracy, F.cross_entropy(logits, test_data.test_labels).item()))
    return numbers


def evaluate_tool():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import evaluate
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return evaluate


@pytest.mark.parametrize("config", CONFIGS)
def test_last_logged_test_numbers_are_those_of_the_exported_networks(tmp_path, data, config, monkeypatch):
    save = tmp_path / "save"
    run(config, save, data, tmp_path)
    record = read_log(save)[-1]
    assert record["epoch"] == 1 and record["world_size"] == CONFIGS[config][0]
    logged = [(record[f"test_acc_net{k}"], record["test_loss_terms"][f"ce_net{k}_final"]) for k in (1, 2)]
    assert record["test_loss"] == pytest.approx(logged[0][1] + logged[1][1], rel=1e-6)

    for (accuracy, loss), (logged_accuracy, logged_loss) in zip(exported_network_numbers(save, data, record["amp"]),
                                                                logged):
        assert accuracy == pytest.approx(logged_accuracy, abs=1e-9)
        assert loss == pytest.approx(logged_loss, rel=1e-5)

    evaluate = evaluate_tool()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    opt = SimpleNamespace(dataset=None, amp=None, dataroot=str(data), batch_size=500)
    for k, (logged_accuracy, logged_loss) in enumerate(logged, start=1):
        numbers = evaluate.measure(str(save / f"net{k}.pt"), opt, torch.device("cpu"), {})
        assert numbers["accuracy"] == pytest.approx(logged_accuracy, abs=1e-9)
        assert numbers["loss"] == pytest.approx(logged_loss, rel=1e-5)
