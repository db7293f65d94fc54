"""End-to-end tests of main.py: real (tiny) training runs in a subprocess on the CPU, in both folders.

Training runs are expensive, so each one is made once per module by a fixture and shared by the
tests that read it. All runs pass --nthread 1: two OpenMP threads fighting another process for
2 cores can be 10x slower than one thread, and a run's numbers depend (slightly) on the thread
count, so runs that are compared with each other must use the same one.
"""
import shutil

import pytest
import torch

from conftest import FOLDERS, load_folder, read_log, run_main, write_cifar100, write_fashion_mnist

OPTION_KEYS = ("save", "depth", "width", "dataset", "dataroot", "batch_size", "lr", "epochs", "weight_decay",
               "epoch_step", "lr_decay_ratio", "seed", "nthread", "resume", "note", "gpu_id", "method", "links")
REFERENCE_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "epoch", "num_classes", "n_parameters",
                  "train_time", "test_time")
TIME_KEYS = ("train_time", "test_time", "checkpoint_time", "checkpoint_bytes")  # and what checkpoints cost
# Images per split of the tiny CIFAR-100 sets; sizes that are not multiples of the batch size make
# the last batch partial, so that accuracies must be counted per image, not averaged per batch.
WRN_TRAIN, WRN_TEST = 120, 50
MOBI_TRAIN, MOBI_TEST = 48, 20
BATCH = 32


def wrn16_args(save, dataroot, *extra):
    return ("--save", save, "--dataroot", dataroot, "--depth", 16, "--width", 1, "--batch_size", BATCH,
            "--nthread", 1, *extra)


def run_ok(folder, *args, **kwargs):
    result = run_main(folder, *args, **kwargs)
    assert result.returncode == 0, f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def numbers_without_times(record):
    """The record's measured numbers: everything but wall-clock times and the options."""
    return {key: value for key, value in record.items() if key not in TIME_KEYS + OPTION_KEYS}


def error_line(result):
    """The single `error: ...` line of a run that must stop with a usage error (exit code 2)."""
    assert result.returncode == 2, f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def load_weights(path):
    # weights_only=True: the files must be plain tensors and containers, loadable without trusting pickles.
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the shared runs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wrn_cifar(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("wrn_cifar"), WRN_TRAIN, WRN_TEST)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, wrn_cifar):
    """wrn/: DCM, 2 epochs in one go."""
    save = tmp_path_factory.mktemp("run_a") / "save"
    result = run_ok("wrn", *wrn16_args(save, wrn_cifar, "--epochs", 2, "--method", "dcm", "--note", "run A"))
    return dict(folder="wrn", save=save, result=result, records=read_log(save), epochs=2, dataroot=wrn_cifar,
                num_train=WRN_TRAIN, num_test=WRN_TEST, note="run A")


@pytest.fixture(scope="module")
def mobi_run(tmp_path_factory):
    """wrn_mobi/: DCM, 1 epoch on a very small set (the MobileNet with aux branches is heavy on a CPU)."""
    root = write_cifar100(tmp_path_factory.mktemp("mobi_cifar"), MOBI_TRAIN, MOBI_TEST)
    save = tmp_path_factory.mktemp("mobi_run") / "save"
    result = run_ok("wrn_mobi", *wrn16_args(save, root, "--epochs", 1, "--method", "dcm", "--note", "mobi run"))
    return dict(folder="wrn_mobi", save=save, result=result, records=read_log(save), epochs=1, dataroot=root,
                num_train=MOBI_TRAIN, num_test=MOBI_TEST, note="mobi run")


@pytest.fixture(scope="module", params=FOLDERS)
def dcm_run(request):
    return request.getfixturevalue({"wrn": "run_a", "wrn_mobi": "mobi_run"}[request.param])


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, wrn_cifar):
    """Run B: run A's command for 1 epoch, then again with --epochs 2 --resume. Run C: --resume PATH
    from B's epoch-1 checkpoint into a new folder (made before B continues)."""
    base = tmp_path_factory.mktemp("resume")
    b_save, c_save = base / "b", base / "c"
    b_args = wrn16_args(b_save, wrn_cifar, "--method", "dcm", "--note", "run A")
    first = run_ok("wrn", *b_args, "--epochs", 1)
    checkpoint_epoch1 = (b_save / "checkpoint.pt").read_bytes()
    log_epoch1 = (b_save / "log.txt").read_text()
    c = run_ok("wrn", *wrn16_args(c_save, wrn_cifar, "--method", "dcm", "--note", "run A", "--epochs", 2,
                                  "--resume", b_save / "checkpoint.pt"))
    checkpoint_after_c = (b_save / "checkpoint.pt").read_bytes()
    resumed = run_ok("wrn", *b_args, "--epochs", 2, "--resume")
    return dict(b_save=b_save, c_save=c_save, first=first, resumed=resumed, c=c, log_epoch1=log_epoch1,
                checkpoint_epoch1=checkpoint_epoch1, checkpoint_after_c=checkpoint_after_c)


@pytest.fixture(scope="module")
def b_epoch1_checkpoint(tmp_path_factory, resume_runs):
    """A copy of B's epoch-1 checkpoint (a DCM checkpoint) that error tests may point at."""
    path = tmp_path_factory.mktemp("b_checkpoint") / "checkpoint.pt"
    path.write_bytes(resume_runs["checkpoint_epoch1"])
    return path


# --- 1. a real DCM run in each folder: the log -------------------------------------------------------

def test_dcm_run_logs_one_json_stats_line_per_epoch(dcm_run):
    lines = (dcm_run["save"] / "log.txt").read_text().splitlines()
    assert len(lines) == dcm_run["epochs"]
    assert all(line.startswith("json_stats: {") for line in lines)
    assert [record["epoch"] for record in dcm_run["records"]] == list(range(1, dcm_run["epochs"] + 1))


def test_dcm_log_records_hold_every_option_with_its_value(dcm_run):
    expected = {"save": str(dcm_run["save"]), "depth": 16, "width": 1, "dataset": "CIFAR100",
                "dataroot": str(dcm_run["dataroot"]), "batch_size": BATCH, "epochs": dcm_run["epochs"],
                "nthread": 1, "method": "dcm", "links": "dense", "seed": 1, "note": dcm_run["note"]}
    for record in dcm_run["records"]:
        assert set(OPTION_KEYS) <= set(record), set(OPTION_KEYS) - set(record)
        assert {key: record[key] for key in expected} == expected
        assert not record["resume"]


def test_dcm_log_records_hold_reference_and_per_classifier_keys(dcm_run):
    per_classifier = [f"{split}_acc_{net}{aux}" for split in ("train", "test") for net in ("net1", "net2")
                      for aux in ("", "_aux1", "_aux2")]
    for record in dcm_run["records"]:
        logged = ("epoch_lr", "architecture", "net1", "net2", "train_loss_terms", "test_loss_terms")
        missing = set(REFERENCE_KEYS + logged + tuple(per_classifier)) - set(record)
        assert not missing
        assert record["num_classes"] == 100
        assert record["epoch_lr"] == pytest.approx(0.1)
        # The pair, so that tools read it instead of guessing it: the folder and its models.pair_names.
        assert record["architecture"] == dcm_run["folder"]
        models = load_folder(dcm_run["folder"]).models
        assert (record["net1"], record["net2"]) == models.pair_names(record["depth"], record["width"])
        assert record["train_time"] > 0 and record["test_time"] > 0
        # The published code's test protocol is logged for wrn_mobi's MobileNet alone (test_published_protocol).
        assert any(key.endswith("_batchstats") for key in record) == (dcm_run["folder"] == "wrn_mobi")


def test_dcm_log_has_6_cross_entropy_and_18_kl_terms(dcm_run):
    for record in dcm_run["records"]:
        for split in ("train", "test"):
            terms = record[f"{split}_loss_terms"]
            assert sum(name.startswith("ce_") for name in terms) == 6, terms
            assert sum(name.startswith("kl_") for name in terms) == 18, terms
            assert len(terms) == 24
            assert all(value >= 0 for value in terms.values())


def test_dcm_logged_loss_is_the_sum_of_its_terms(dcm_run):
    for record in dcm_run["records"]:
        for split in ("train", "test"):
            assert record[f"{split}_loss"] == pytest.approx(sum(record[f"{split}_loss_terms"].values()), rel=1e-5)


def test_dcm_logged_accuracies_are_whole_image_counts_in_0_100(dcm_run):
    for record in dcm_run["records"]:
        assert record["test_acc"] == record["test_acc_net1"]
        assert record["train_acc"] == record["train_acc_net1"]
        for split, count in (("train", dcm_run["num_train"]), ("test", dcm_run["num_test"])):
            accuracies = {key: value for key, value in record.items()
                          if key.startswith(f"{split}_acc") and not key.endswith("_batchstats")}
            assert len(accuracies) == 8  # train_acc / test_acc + 6 classifiers + the ensemble
            for key, value in accuracies.items():
                assert 0 <= value <= 100, key
                # Counted over every image, partial last batch included.
                assert value * count / 100 == pytest.approx(round(value * count / 100), abs=1e-6), (key, value)


def test_dcm_logged_parameter_count_is_both_networks_with_aux(dcm_run):
    models = load_folder(dcm_run["folder"]).models
    net2 = models.wrn(16, 1, 100, aux=True) if dcm_run["folder"] == "wrn" else models.mobilenet(100, aux=True)
    expected = sum(p.numel() for net in (models.wrn(16, 1, 100, aux=True), net2) for p in net.parameters())
    assert all(record["n_parameters"] == expected for record in dcm_run["records"])


def test_dcm_run_prints_one_summary_per_epoch(dcm_run):
    stdout = dcm_run["result"].stdout
    for epoch in range(1, dcm_run["epochs"] + 1):
        assert f"epoch {epoch}/{dcm_run['epochs']}" in stdout, stdout


# --- 2. the exported networks and the checkpoint ---------------------------------------------------

def test_exported_nets_have_no_aux_keys_and_load_strictly(dcm_run):
    models = load_folder(dcm_run["folder"]).models
    fresh = {"net1": models.wrn(16, 1, 100, aux=False),
             "net2": models.wrn(16, 1, 100, aux=False) if dcm_run["folder"] == "wrn" else models.mobilenet(100, aux=False)}
    for name, net in fresh.items():
        state = load_weights(dcm_run["save"] / f"{name}.pt")
        assert isinstance(state, dict)
        assert not [key for key in state if key.startswith("aux")]
        net.load_state_dict(state, strict=True)
        assert net(torch.zeros(2, 3, 32, 32))[-1].shape == (2, 100)


def test_exported_nets_are_the_final_checkpoint_without_aux(dcm_run):
    checkpoint = load_weights(dcm_run["save"] / "checkpoint.pt")
    for name in ("net1", "net2"):
        exported = load_weights(dcm_run["save"] / f"{name}.pt")
        backbone = {key: value for key, value in checkpoint[name].items() if not key.startswith("aux")}
        assert exported.keys() == backbone.keys()
        assert all(torch.equal(exported[key], backbone[key]) for key in backbone), name


def test_checkpoint_is_a_plain_dict_of_the_full_training_state(dcm_run):
    checkpoint = load_weights(dcm_run["save"] / "checkpoint.pt")
    assert type(checkpoint) is dict
    assert {"epoch", "step", "net1", "net2", "optimizer", "options", "log_bytes"} <= set(checkpoint)
    assert checkpoint["epoch"] == dcm_run["epochs"]
    for name in ("net1", "net2"):
        assert any(key.startswith("aux1.") for key in checkpoint[name])
        assert any(key.startswith("aux2.") for key in checkpoint[name])
    assert checkpoint["options"]["method"] == "dcm" and checkpoint["options"]["depth"] == 16
    assert checkpoint["optimizer"]["state"], "the momentum buffers must be saved"


# --- 3. FashionMNIST (idx files), baselines ind and dml ------------------------------------------------

@pytest.fixture(scope="module")
def ind_run(tmp_path_factory):
    root = write_fashion_mnist(tmp_path_factory.mktemp("fmnist_ind"), 96, 40)
    save = tmp_path_factory.mktemp("ind") / "save"
    run_ok("wrn", "--save", save, "--dataroot", root, "--dataset", "FashionMNIST", "--method", "ind",
           "--depth", 10, "--width", 1, "--batch_size", BATCH, "--epochs", 1, "--nthread", 1)
    return save


@pytest.fixture(scope="module")
def dml_run(tmp_path_factory):
    root = write_fashion_mnist(tmp_path_factory.mktemp("fmnist_dml"), 96, 40)
    save = tmp_path_factory.mktemp("dml") / "save"
    run_ok("wrn", "--save", save, "--dataroot", root, "--dataset", "FashionMNIST", "--method", "dml",
           "--depth", 10, "--width", 1, "--batch_size", BATCH, "--epochs", 2, "--nthread", 1,
           "--epoch_step", "[2]", "--lr_decay_ratio", 0.5)
    return save


def test_ind_run_on_fashion_mnist_has_10_classes_no_aux_and_only_cross_entropy(ind_run):
    record, = read_log(ind_run)
    assert record["num_classes"] == 10 and record["method"] == "ind"
    assert not [key for key in record if "aux" in key]
    for split in ("train", "test"):
        terms = record[f"{split}_loss_terms"]
        assert sorted(terms) == ["ce_net1_final", "ce_net2_final"]
        assert record[f"{split}_loss"] == pytest.approx(sum(terms.values()), rel=1e-5)
    for name in ("net1", "net2"):
        load_folder("wrn").models.wrn(10, 1, 10, aux=False).load_state_dict(load_weights(ind_run / f"{name}.pt"))


def test_dml_run_distils_between_the_two_final_classifiers(dml_run):
    records = read_log(dml_run)
    assert [record["epoch"] for record in records] == [1, 2]
    for record in records:
        assert record["num_classes"] == 10
        assert "test_acc_net1_aux1" not in record
        terms = record["train_loss_terms"]
        assert sum(name.startswith("ce_") for name in terms) == 2
        assert sorted(name for name in terms if name.startswith("kl_")) == [
            "kl_net1_final_from_net2_final", "kl_net2_final_from_net1_final"]


def test_wrn_mobi_trains_on_fashion_mnist_idx_files(tmp_path):
    root = write_fashion_mnist(tmp_path / "data", 32, 16)
    save = tmp_path / "save"
    run_ok("wrn_mobi", "--save", save, "--dataroot", root, "--dataset", "FashionMNIST", "--method", "ind",
           "--depth", 10, "--width", 1, "--batch_size", 16, "--epochs", 1, "--nthread", 1)
    record, = read_log(save)
    assert record["num_classes"] == 10 and record["dataset"] == "FashionMNIST"
    assert sorted(record["test_loss_terms"]) == ["ce_net1_final", "ce_net2_final"]
    load_folder("wrn_mobi").models.mobilenet(10, aux=False).load_state_dict(load_weights(save / "net2.pt"))


def test_lr_drops_at_the_start_of_the_epoch_step_epochs(dml_run):
    records = read_log(dml_run)
    assert [record["epoch_lr"] for record in records] == pytest.approx([0.1, 0.05])
    assert [record["lr"] for record in records] == [0.1, 0.1]  # the --lr option, as given


# --- 4. the synthetic dataset, with the default --save ---------------------------------------------

def test_synthetic_run_learns_and_saves_under_the_default_folder(tmp_path):
    run_ok("wrn", "--dataset", "synthetic", "--depth", 10, "--width", 1, "--method", "ind", "--epochs", 1,
           "--nthread", 1, cwd=tmp_path)
    saves = list((tmp_path / "logs").glob("*_ind_seed1"))
    assert len(saves) == 1, list((tmp_path / "logs").iterdir())
    record, = read_log(saves[0])
    assert record["num_classes"] == 10 and record["dataset"] == "synthetic"
    # Chance is 10%; one epoch on the 2048 synthetic images reaches ~45% on the training batches.
    assert record["train_acc_net1"] > 20 and record["train_acc_net2"] > 20, record
    assert (saves[0] / "net1.pt").is_file() and (saves[0] / "net2.pt").is_file()


# --- 5. resume ---------------------------------------------------------------------------------------

def test_resume_continues_at_the_next_epoch_and_appends_to_the_log(resume_runs):
    b_save = resume_runs["b_save"]
    assert [record["epoch"] for record in read_log(b_save)] == [1, 2]
    log = (b_save / "log.txt").read_text()
    assert log.startswith(resume_runs["log_epoch1"]), "the epoch-1 line must be kept as it was"
    stdout = resume_runs["resumed"].stdout
    assert "epoch 2/2" in stdout and "epoch 1/2" not in stdout, stdout
    assert load_weights(b_save / "checkpoint.pt")["epoch"] == 2


def test_resumed_run_matches_the_uninterrupted_run(run_a, resume_runs):
    a2, b2 = run_a["records"][1], read_log(resume_runs["b_save"])[1]
    assert b2["resume"] is True and b2["epoch"] == 2
    # Exact on the CPU with the same thread count: same weights, momentum, rng and batches.
    assert numbers_without_times(b2) == numbers_without_times(a2)


def test_resumed_run_exports_the_same_networks_as_the_uninterrupted_run(run_a, resume_runs):
    for name in ("net1", "net2"):
        a, b = load_weights(run_a["save"] / f"{name}.pt"), load_weights(resume_runs["b_save"] / f"{name}.pt")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_resume_from_a_checkpoint_path_continues_into_another_folder(run_a, resume_runs):
    c_save = resume_runs["c_save"]
    c_records = read_log(c_save)
    assert [record["epoch"] for record in c_records] == [2]
    assert numbers_without_times(c_records[0]) == numbers_without_times(run_a["records"][1])
    assert resume_runs["checkpoint_after_c"] == resume_runs["checkpoint_epoch1"], "the source checkpoint changed"
    net1_a, net1_c = load_weights(run_a["save"] / "net1.pt"), load_weights(c_save / "net1.pt")
    assert all(torch.equal(net1_a[key], net1_c[key]) for key in net1_a)


# --- 7. determinism ----------------------------------------------------------------------------------

def test_same_seed_gives_the_same_numbers(run_a, resume_runs):
    # Runs A and B share their first epoch's command (only --save and --epochs differ).
    a1, b1 = run_a["records"][0], read_log(resume_runs["b_save"])[0]
    assert numbers_without_times(b1) == numbers_without_times(a1)


def test_another_seed_gives_another_training_loss(tmp_path, run_a):
    save = tmp_path / "seed2"
    run_ok("wrn", *wrn16_args(save, run_a["dataroot"], "--method", "dcm", "--epochs", 1, "--seed", 2))
    record, = read_log(save)
    assert record["seed"] == 2
    assert record["train_loss"] != pytest.approx(run_a["records"][0]["train_loss"], rel=1e-6)


# --- 6. errors a user can act on: exit code 2, one `error:` line, no traceback, nothing destroyed --------

def test_new_run_into_a_folder_holding_a_run_is_refused_and_keeps_its_files(tmp_path, run_a):
    save = tmp_path / "existing"
    shutil.copytree(run_a["save"], save)
    before = {name: (save / name).read_bytes() for name in ("log.txt", "checkpoint.pt")}
    result = run_main("wrn", *wrn16_args(save, run_a["dataroot"], "--epochs", 1))
    line = error_line(result)
    assert str(save) in line and "--resume" in line
    assert {name: (save / name).read_bytes() for name in before} == before


def test_resume_without_a_checkpoint_in_save_is_refused(tmp_path, wrn_cifar):
    line = error_line(run_main("wrn", *wrn16_args(tmp_path / "empty", wrn_cifar, "--epochs", 1, "--resume")))
    assert "--resume" in line and "checkpoint.pt" in line


def test_resume_from_a_corrupt_checkpoint_is_refused(tmp_path, wrn_cifar):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint\xff" * 10)
    result = run_main("wrn", *wrn16_args(tmp_path / "save", wrn_cifar, "--epochs", 2, "--resume", garbage))
    assert str(garbage) in error_line(result)
    assert garbage.read_bytes() == b"\x00not a checkpoint\xff" * 10
    assert not (tmp_path / "save" / "log.txt").exists()


def test_resume_with_another_method_is_refused(tmp_path, wrn_cifar, b_epoch1_checkpoint):
    before = b_epoch1_checkpoint.read_bytes()
    result = run_main("wrn", *wrn16_args(tmp_path / "save", wrn_cifar, "--epochs", 2, "--method", "ind",
                                         "--resume", b_epoch1_checkpoint))
    line = error_line(result)
    assert "--method" in line and "dcm" in line
    assert b_epoch1_checkpoint.read_bytes() == before
    assert not (tmp_path / "save" / "log.txt").exists()


def test_options_are_logged_and_compared_on_resume_by_value(folder):
    modules = load_folder(folder)
    options, checkpoint = modules.options, modules.checkpoint
    opt = options.parse_options(["--epoch_step", "[60, 120, 160]", "--lr", "1e-1"])
    assert opt.epoch_step == "[60,120,160]" and opt.lr == 0.1  # one spelling in log.txt and checkpoints
    saved = vars(options.parse_options(["--lr=0.10"]))
    assert checkpoint.mismatched_options(opt, saved) == []
    # --epochs may grow, and speed or bookkeeping options may change; any other option may not.
    resumed = options.parse_options(["--epochs", "300", "--nthread", "1", "--amp", "bf16", "--tf32", "--note", "x",
                                  "--compile", "--eval_batch_size", "100", "--checkpoint_every", "10", "--dataroot", "/d"])
    assert checkpoint.mismatched_options(resumed, saved) == []
    changed = options.parse_options(["--weight_decay", "1e-4", "--epoch_step", "[60, 120]"])
    assert checkpoint.mismatched_options(changed, saved) == [
        "--weight_decay 0.0005 (not 0.0001)", "--epoch_step [60,120,160] (not [60,120])"]


def test_corrupt_cifar_file_is_refused_by_name(tmp_path):
    root = write_cifar100(tmp_path / "data", 8, 8)
    corrupt = root / "cifar-100-python" / "train"
    corrupt.write_bytes(b"this is not a pickle")
    # The other files are valid and present, so nothing triggers a download.
    result = run_main("wrn", *wrn16_args(tmp_path / "save", root, "--epochs", 1))
    assert str(corrupt) in error_line(result)
    assert corrupt.read_bytes() == b"this is not a pickle"


def test_save_pointing_at_a_file_is_refused_and_the_file_kept(tmp_path, wrn_cifar):
    path = tmp_path / "results.txt"
    path.write_text("precious")
    line = error_line(run_main("wrn", *wrn16_args(path, wrn_cifar, "--epochs", 1)))
    assert str(path) in line
    assert path.read_text() == "precious"


def test_argparse_errors_exit_with_code_2(tmp_path):
    result = run_main("wrn", "--save", tmp_path / "save", "--method", "foo")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr and "--method" in result.stderr
    assert not (tmp_path / "save").exists()
