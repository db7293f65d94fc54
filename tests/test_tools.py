"""Tests of tools/sweep.py, summarize.py, plot.py and evaluate.py.

Real tiny runs of main.py (WRN-10-1 pairs, 2 epochs on 64 images of a 10-class CIFAR-100-format set,
one thread) are made once per module by a real sweep (two passes of one command, a run failing in
the first) and shared, and so are evaluate.py's measurements of them; the table's arithmetic and the
paper's columns are checked on hand-written logs with known numbers. The tools run in this process
(their main(argv) returns the exit code) except where the exit code of the script itself is tested.
"""
import contextlib
import csv
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, import_tools, load_folder, read_log, run_main, write_cifar100

summarize, sweep, plot, evaluate, common, paper = import_tools("summarize", "sweep", "plot", "evaluate", "common",
                                                               "paper")

TINY = ["--depth", "10", "--width", "1", "--epochs", "2", "--batch_size", "16", "--nthread", "1"]
TINY_SUFFIX = "_batch_size-16_epochs-2"  # what TINY adds to a run's folder name (--nthread does not)
SEEDS, METHODS = (1, 2), ("ind", "dml")


def call(main, *args):
    """(exit code, stdout, stderr) of a tool's main(argv) run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in args])
    return code, out.getvalue(), err.getvalue()


def error_line(code, err):
    """The one `error: ...` line of a tool that stopped on a usage error."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def markdown_rows(text):
    """The cells of every line of a Markdown table, header included, separator left out."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- the shared real runs ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    # 10 learnable classes, so that accuracies differ between seeds and methods.
    return write_cifar100(tmp_path_factory.mktemp("cifar"), 64, 40, num_classes=10)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cifar):
    """A real sweep: wrn/ x ind, dml x seeds 1, 2, two runs at a time on the CPU, in two passes of
    the same command. In the first, dml seed 1's folder holds a checkpoint.pt that is no
    checkpoint: that run fails (main.py refuses to resume from it) and the others go on. The file
    removed, the second pass starts that run alone and skips the finished ones."""
    logdir = tmp_path_factory.mktemp("sweep") / "logs"
    args = ["--folders", "wrn", "--methods", *METHODS, "--seeds", *SEEDS, "--logdir", logdir, "--gpus", "",
            "--jobs_per_gpu", 2, *TINY, "--dataroot", cifar]
    saves = {(method, seed): logdir / f"wrn-10-1_wrn-10-1_{method}_seed{seed}{TINY_SUFFIX}"
             for method in METHODS for seed in SEEDS}
    broken = saves["dml", 1] / "checkpoint.pt"
    broken.parent.mkdir(parents=True)
    broken.write_text("not a checkpoint")
    first_pass = dict(zip(("code", "out", "err"), call(sweep.main, *args)))
    first_pass["finished"] = {key: read_log(save)[-1]["epoch"] for key, save in saves.items()
                              if (save / "log.txt").exists()}
    broken.unlink()
    code, out, err = call(sweep.main, *args)
    return dict(logdir=logdir, args=args, code=code, out=out, err=err, saves=saves, first_pass=first_pass)


@pytest.fixture(scope="module")
def mobi_run(tmp_path_factory):
    """wrn_mobi/: WRN-10-1 and the MobileNet trained alone, 1 epoch on 16 images."""
    root = write_cifar100(tmp_path_factory.mktemp("mobi_cifar"), 16, 20, num_classes=10)
    save = tmp_path_factory.mktemp("mobi") / "wrn-10-1_mobilenet_ind_seed1"
    result = run_main("wrn_mobi", "--save", save, "--dataroot", root, "--method", "ind", "--depth", 10, "--width", 1,
                      "--epochs", 1, "--batch_size", 16, "--nthread", 1)
    assert result.returncode == 0, result.stderr
    return dict(save=save, dataroot=root)


@pytest.fixture(scope="module")
def real_logs(tmp_path_factory, swept, mobi_run):
    """The logs of the sweep and of the MobileNet run, with dml seed 2 cut after its first epoch
    (what a run stopped during epoch 2 leaves)."""
    base = tmp_path_factory.mktemp("real_logs")
    for save in [*swept["saves"].values(), mobi_run["save"]]:
        (base / save.name).mkdir()
        shutil.copy(save / "log.txt", base / save.name / "log.txt")
    unfinished = base / swept["saves"]["dml", 2].name / "log.txt"
    unfinished.write_text(unfinished.read_text().splitlines(keepends=True)[0])
    return base


def final_errors(save, net):
    return 100 - read_log(save)[-1][f"test_acc_net{net}"]


# --- sweep -------------------------------------------------------------------------------------

def test_sweep_runs_every_run_to_the_end_in_its_own_folder(swept):
    assert swept["code"] == 0, swept["out"] + swept["err"]
    # The second pass started the run that failed in the first, and only that one.
    started = re.findall(r"^\[\d+/\d+\] \w+ .*$", swept["out"], re.M)
    assert started == [f"[1/1] start {swept['saves']['dml', 1]} on the CPU"]
    assert sorted(path.name for path in swept["logdir"].iterdir()) == sorted(s.name for s in swept["saves"].values())
    for (method, seed), save in swept["saves"].items():
        records = read_log(save)
        assert [r["epoch"] for r in records] == [1, 2]
        assert (records[-1]["method"], records[-1]["seed"], records[-1]["depth"]) == (method, seed, 10)
        assert (save / "net1.pt").is_file() and (save / "net2.pt").is_file()
        assert "epoch 2/2" in (save / "stdout.txt").read_text()
    assert "sweep: 4 of 4 runs finished" in swept["out"]


def test_sweep_run_names_hold_option_values_not_spellings():
    plain = sweep.run_name("wrn", "dcm", 1, [])
    for args in (["--lr", "0.1"], ["--lr", "1e-1"], ["--lr=0.10"], ["--epoch_step", "[60, 120, 160]"],
                 ["--weight_decay", "5e-4"], ["--nthread", "1", "--compile", "--dataroot", "x"]):
        assert sweep.run_name("wrn", "dcm", 1, args) == plain, args  # defaults, or what does not change training
    spellings = (["--epoch_step", "[60, 120]", "--lr", "5e-2"], ["--epoch_step=[60,120]", "--lr", "0.050"])
    names = {sweep.run_name("wrn_mobi", "ind", 2, args) for args in spellings}
    assert names == {"wrn-28-10_mobilenet_ind_seed2_epoch_step-60-120_lr-0.05"}
    assert sweep.run_name("wrn", "dcm", 1, ["--sync_bn", "--amp", "bf16", "--weight_decay", "1e-4"]) == (
        plain + "_amp-bf16_sync_bn_weight_decay-0.0001")
    assert sweep.run_name("wrn", "dcm", 1, ["--tf32"]) == plain + "_tf32"  # changes the numerics


def test_sweep_refuses_a_value_main_py_would_refuse(tmp_path):
    line = error_line(*call(sweep.main, "--logdir", tmp_path / "logs", "--lr", "fast")[::2])
    assert "--lr" in line and "'fast'" in line
    assert not (tmp_path / "logs").exists()


def test_sweep_again_skips_every_finished_run(swept):
    outputs = {save: (save / "stdout.txt").read_text() for save in swept["saves"].values()}
    code, out, _ = call(sweep.main, *swept["args"])
    assert code == 0
    assert out.count("# skipped: ") == 4 and "4 of 4 runs finished" in out
    assert {save: (save / "stdout.txt").read_text() for save in outputs} == outputs, "a finished run was started"


def test_dry_run_lists_exactly_the_runs_to_start_and_resume(swept, tmp_path):
    logdir = tmp_path / "logs"
    shutil.copytree(swept["logdir"], logdir)
    # ind seed 3 was stopped after epoch 1: its log is unfinished and its checkpoint.pt is there.
    stopped = logdir / f"wrn-10-1_wrn-10-1_ind_seed3{TINY_SUFFIX}"
    shutil.copytree(swept["saves"]["ind", 1], stopped)
    (stopped / "log.txt").write_text((stopped / "log.txt").read_text().splitlines(keepends=True)[0])
    before = files_under(logdir)
    code, out, _ = call(sweep.main, "--dry_run", "--folders", "wrn", "--methods", "ind", "dml",
                        "--seeds", 1, 2, 3, "--logdir", logdir, "--gpus", "", *TINY, "--dataroot", "DATA")
    assert code == 0
    main_py = os.path.relpath(ROOT / "wrn" / "main.py")
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    seed3 = {method: str(logdir / f"wrn-10-1_wrn-10-1_{method}_seed3{TINY_SUFFIX}") for method in METHODS}
    assert commands == [[sys.executable, main_py, "--save", seed3[method], "--method", method, "--seed", "3", *TINY,
                         "--dataroot", "DATA", *resume] for method, resume in (("ind", ["--resume"]), ("dml", []))]
    skipped = [line for line in out.splitlines() if line.startswith("# skipped: ")]
    assert sorted(line.split()[2] for line in skipped) == sorted(str(logdir / save.name)
                                                                 for save in swept["saves"].values())
    # dcm with other links is --method dcm --links LINKS (on WRN-28-10: WRN-10 carries no auxiliary classifiers).
    code, out, _ = call(sweep.main, "--dry_run", "--folders", "wrn", "--methods", "dcm-same", "--seeds", 2,
                        "--logdir", logdir, "--gpus", "", "--dataroot", "DATA")
    assert code == 0
    assert [shlex.split(line) for line in out.splitlines() if not line.startswith("#")] == [
        [sys.executable, main_py, "--save", str(logdir / "wrn-28-10_wrn-28-10_dcm-same_seed2"), "--method", "dcm",
         "--links", "same", "--seed", "2", "--dataroot", "DATA"]]
    assert files_under(logdir) == before, "a dry run must not write"


def test_default_dry_run_lists_the_30_runs_of_the_papers_table_seed_by_seed(tmp_path, monkeypatch):
    code, out, _ = call(sweep.main, "--dry_run", "--logdir", tmp_path / "logs", "--gpus", "0,1,2,3")
    assert code == 0
    saves = [shlex.split(line)[3] for line in out.splitlines() if not line.startswith("#")]
    assert saves == [str(tmp_path / "logs" / f"wrn-28-10_{net2}_{method}_seed{seed}") for seed in range(1, 6)
                     for net2 in ("wrn-28-10", "mobilenet") for method in ("ind", "dml", "dcm")]
    assert "4 at a time on GPU 0, GPU 1, GPU 2, GPU 3" in out.splitlines()[0]
    assert not (tmp_path / "logs").exists()


def test_sweep_blocks_a_folder_with_a_log_but_no_checkpoint(swept, tmp_path):
    logdir = tmp_path / "logs"
    save = logdir / f"wrn-10-1_wrn-10-1_ind_seed1{TINY_SUFFIX}"
    save.mkdir(parents=True)
    (save / "log.txt").write_text((swept["saves"]["ind", 1] / "log.txt").read_text().splitlines(keepends=True)[0])
    code, out, _ = call(sweep.main, "--dry_run", "--folders", "wrn", "--methods", "ind", "--seeds", 1,
                        "--logdir", logdir, *TINY)
    assert code == 1
    assert f"# BLOCKED: {save}" in out and "checkpoint.pt" in out


def test_sweep_reports_a_failed_run_by_its_output_and_runs_the_others(swept):
    # The first pass: dml seed 1 resumed from a checkpoint.pt that is no checkpoint, which main.py refuses.
    code, out = swept["first_pass"]["code"], swept["first_pass"]["out"]
    failed = swept["saves"]["dml", 1]
    assert code == 1
    assert f"FAILED {failed}" in out and str(failed / "stdout.txt") in out
    assert re.search(r"exit code 2: error: .*checkpoint\.pt", out)  # the run's own message, from its output
    assert "3 of 4 runs finished, 1 failed" in out
    assert swept["first_pass"]["finished"] == {("ind", 1): 2, ("ind", 2): 2, ("dml", 2): 2}


@pytest.mark.parametrize("args, words", [
    (["--seed", "3"], ["--seed", "--seeds"]),
    (["--save", "x"], ["--save", "--logdir"]),
    (["--links=same"], ["--links", "--methods"]),
    (["--gpus", "0,a"], ["--gpus", "'0,a'"]),
    (["--gpus", "0,0"], ["--gpus", "--jobs_per_gpu"]),
    (["--jobs_per_gpu", "0"], ["--jobs_per_gpu"]),
    # Values main.py's own checks refuse, in every run or in some method's or seed's.
    (["--epochs", "0"], ["main.py would refuse", "--epochs: must be > 0, got 0"]),
    (["--folders", "wrn", "--methods", "ind", "ds", "--depth", "10"], ["--method ds", "--depth 10 is too shallow"]),
    (["--seeds", "2", "-1"], ["--seed -1", "--seed: must be >= 0, got -1"]),
    (["--slurm", "--gpus_per_run", "4", "--batch_size", "130"], ["--batch_size 130", "4 processes"]),
], ids=["seed", "save", "links", "gpus_not_ids", "gpus_twice", "jobs_per_gpu_0", "epochs_0", "depth_10_with_ds",
        "seed_negative", "batch_over_slurm_gpus"])
def test_sweep_refuses_bad_options_before_writing(tmp_path, args, words):
    for dry_run in (["--dry_run"], []):  # the dry run says what the sweep would: it stops before any run
        code, _, err = call(sweep.main, *dry_run, "--logdir", tmp_path / "logs", "--gpus", "", *args)
        line = error_line(code, err)
        assert all(word in line for word in words), line
        assert not (tmp_path / "logs").exists()


# --- summarize: real logs ----------------------------------------------------------------------

def test_summarize_real_logs_cells_are_mean_and_sample_std_over_finished_seeds(swept, real_logs):
    code, out, err = call(summarize.main, real_logs, "--csv")
    assert code == 0, err
    cells = {(row["net2"], row["method"], row["net"]): row for row in csv.DictReader(io.StringIO(out))}
    assert set(cells) == {(net2, method, net) for net2, methods in (("wrn-10-1", METHODS), ("mobilenet", ["ind"]))
                          for method in methods for net in ("1", "2")}
    for net in (1, 2):
        ind = [final_errors(swept["saves"]["ind", seed], net) for seed in SEEDS]
        cell = cells["wrn-10-1", "ind", str(net)]
        assert (cell["runs"], cell["unfinished"], cell["seeds"]) == ("2", "0", "1 2")
        assert float(cell["mean"]) == pytest.approx(np.mean(ind))
        assert float(cell["std"]) == pytest.approx(np.std(ind, ddof=1))
        # dml seed 2 is unfinished: left out, and counted as such.
        dml = cells["wrn-10-1", "dml", str(net)]
        assert (dml["runs"], dml["unfinished"], dml["std"]) == ("1", "1", "")
        assert float(dml["mean"]) == pytest.approx(final_errors(swept["saves"]["dml", 1], net))
    assert "unfinished, left out" in err and str(real_logs / swept["saves"]["dml", 2].name / "log.txt") in err


def test_summarize_real_logs_markdown_has_the_papers_layout(swept, mobi_run, real_logs):
    code, out, _ = call(summarize.main, real_logs)
    assert code == 0
    header, *rows = markdown_rows(out)
    # The MobileNet run trained 1 epoch, the sweep 2: the option that differs becomes a column; the
    # MobileNet gets a second line, measured with the published code's test protocol.
    assert header == ["Net 1", "Net 2", "epochs", "", "Ind 1", "Ind 2", "DML 1", "DML 2"]
    assert [row[:4] for row in rows] == [["WRN-10-1", "WRN-10-1", "2", "ours"], ["WRN-10-1", "MobileNet", "1", "ours"],
                                         ["", "", "", "ours, test-batch BN (published protocol)"]]
    ind_net2 = [final_errors(swept["saves"]["ind", seed], 2) for seed in SEEDS]
    assert rows[0][5] == f"{np.mean(ind_net2):.2f} ± {np.std(ind_net2, ddof=1):.2f} (n=2)"
    assert rows[0][6] == f"{final_errors(swept['saves']['dml', 1], 1):.2f} (n=1, +1 unfinished)"
    assert rows[1][5] == f"{final_errors(mobi_run['save'], 2):.2f} (n=1)"
    assert rows[1][6:] == ["", ""]  # no dml run of that pair
    batchstats_error = 100 - read_log(mobi_run["save"])[-1][BATCHSTATS_KEY]
    assert rows[2][4:] == ["", f"{batchstats_error:.2f} (n=1)", "", ""]


# --- summarize: hand-written logs with known numbers ------------------------------------------------

# What main.py logs with its defaults (the paper's recipe), read off its own parser.
REFERENCE_OPTIONS = vars(load_folder("wrn").options.option_parser().parse_args([]))
ARCHITECTURES = {"wrn": "wrn", "mobi": "wrn_mobi", "third": "wrn_third"}  # a pair's training folder
BATCHSTATS_KEY = "test_acc_net2_batchstats"
# (pair, method) -> final errors of net 1 and net 2 over seeds 1, 2, 3.
KNOWN_ERRORS = {
    ("wrn", "ind"): ([19.0, 18.5, 19.1], [18.9, 18.4, 18.6]),
    ("wrn", "dml"): ([18.0, 17.8, 17.9], [18.1, 17.9, 17.7]),
    ("wrn", "dcm"): ([16.0, 16.5, 17.0], [16.6, 16.7, 16.8]),
    ("mobi", "ind"): ([18.8, 18.6, 18.9], [26.0, 26.5, 26.4]),
    ("mobi", "dml"): ([17.2, 17.3, 17.1], [24.0, 23.8, 23.9]),
    ("mobi", "dcm"): ([16.9, 16.8, 16.7], [21.5, 21.4, 21.2]),
}
EARLIER_GAIN = 0.3  # epoch 199 is this much better than the last one in the hand-written logs: the table takes the last
# The MobileNet's error with test-batch BN statistics (the published protocol) is this much higher
# than with BN in eval mode in the hand-written logs.
PUBLISHED_PROTOCOL_GAP = 1.8


def log_record(epoch, error1, error2, pair="wrn", epoch_lr=0.0008, **options):
    """One json_stats record as main.py writes it: the options, the pair (wrn: WRN-d-k twice, mobi:
    with the MobileNet, third: with a network of a third folder), then the epoch's numbers."""
    record = {**REFERENCE_OPTIONS, "world_size": 1, **options, "architecture": ARCHITECTURES[pair],
              "net1": f"wrn-{options.get('depth', 28)}-{options.get('width', 10)}"}
    record["net2"] = {"wrn": record["net1"], "mobi": "mobilenet", "third": "resnet-8"}[pair]
    if pair == "mobi":  # wrn_mobi/main.py logs its MobileNet under the published protocol too
        record[BATCHSTATS_KEY] = 100 - error2 - PUBLISHED_PROTOCOL_GAP
    return {**record, "train_loss": 1.0, "train_acc": 70.0, "test_loss": 0.8, "test_acc": 100 - error1,
            "train_acc_net1": 70.0, "train_acc_net2": 70.0, "test_acc_net1": 100 - error1,
            "test_acc_net2": 100 - error2, "epoch": epoch, "epoch_lr": epoch_lr, "train_time": 60.0,
            "test_time": 5.0, "num_classes": 100}


def write_log(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "log.txt").write_text("".join(f"json_stats: {json.dumps(record)}\n" for record in records))
    return path / "log.txt"


def write_run(base, pair, method, seed, errors, logged_epochs=(199, 200), **options):
    """A run whose last logged epoch has `errors` (net 1, net 2), the epoch before it EARLIER_GAIN less."""
    save = base / f"{pair}_{method}_seed{seed}"
    options = {"method": method, "seed": seed, "save": str(save), **options}
    records = [log_record(epoch, *(e - (0 if epoch == logged_epochs[-1] else EARLIER_GAIN) for e in errors), pair,
                          **options) for epoch in logged_epochs]
    return write_log(save, records)


@pytest.fixture
def added_options(monkeypatch):
    """added_options(NAME=DEFAULT, ...): the tools see main.py's parser as if it had gained these
    options; they learn of an option from the parser alone."""
    def add(**defaults):
        merged = {**REFERENCE_OPTIONS, **defaults}
        monkeypatch.setattr(common, "main_defaults", lambda: merged)
        monkeypatch.setattr(paper, "main_defaults", lambda: merged)
    return add


@pytest.fixture
def paper_logs(tmp_path):
    for (pair, method), (errors1, errors2) in KNOWN_ERRORS.items():
        for seed, errors in enumerate(zip(errors1, errors2), start=1):
            write_run(tmp_path, pair, method, seed, errors)
    return tmp_path


def test_paper_cells_are_mean_and_std_by_hand_beside_the_papers_values(paper_logs):
    code, out, _ = call(summarize.main, paper_logs)
    assert code == 0
    header, *rows = markdown_rows(out)
    assert header == ["Net 1", "Net 2", "", "Ind 1", "Ind 2", "DML 1", "DML 2", "DCM 1", "DCM 2"]
    comparison = [["", "", "paper"], ["", "", "ours - paper"]]
    published = ["", "", "ours, test-batch BN (published protocol)"]
    assert [row[:3] for row in rows] == [["WRN-28-10", "WRN-28-10", "ours"], *comparison,
                                         ["WRN-28-10", "MobileNet", "ours"], published, *comparison]
    # DCM net 1 of the WRN pair: 16.0, 16.5, 17.0 -> mean 16.5, sample std 0.5; the paper: 16.61 +/- 0.24.
    assert (rows[0][7], rows[1][7], rows[2][7]) == ("16.50 ± 0.50 (n=3)", "16.61 ± 0.24", "-0.11")
    assert rows[5][3:] == ["18.72 ± 0.24", "26.30 ± 0.35", "17.24 ± 0.13", "23.91 ± 0.22", "16.83 ± 0.07",
                           "21.43 ± 0.20"]
    for row, pair, paper_row in ((0, "wrn", 1), (3, "mobi", 5)):
        for column, (method, net) in enumerate([(m, n) for m in ("ind", "dml", "dcm") for n in (0, 1)], start=3):
            errors = np.array(KNOWN_ERRORS[pair, method][net])
            assert rows[row][column] == f"{np.mean(errors):.2f} ± {np.std(errors, ddof=1):.2f} (n=3)"
            if pair == "mobi" and net == 1:
                # The paper's MobileNet was tested with test-batch BN: compared with that line only.
                errors = errors + PUBLISHED_PROTOCOL_GAP
                assert rows[4][column] == f"{np.mean(errors):.2f} ± {np.std(errors, ddof=1):.2f} (n=3)"
            elif pair == "mobi":
                assert rows[4][column] == ""
            paper_mean = float(rows[paper_row][column].split(" ± ")[0])
            assert rows[paper_row + 1][column] == f"{np.mean(errors) - paper_mean:+.2f}"
    assert "the last epoch" in out
    assert "The paper's MobileNet values come from the published wrn_mobi" in out


def test_csv_parses_into_one_line_per_cell_with_the_papers_numbers(paper_logs):
    code, out, _ = call(summarize.main, paper_logs, "--csv")
    assert code == 0
    lines = list(csv.DictReader(io.StringIO(out)))
    assert len(lines) == 2 * 3 * 2 + 3  # and the MobileNet of each method under the published protocol
    mobilenet = {line["protocol"]: line for line in lines
                 if (line["net2"], line["method"], line["net"]) == ("mobilenet", "dcm", "2")}
    assert mobilenet["eval"]["paper_mean"] == "" and float(mobilenet["batchstats"]["paper_mean"]) == 21.43
    assert float(mobilenet["batchstats"]["difference"]) == pytest.approx(
        np.mean(KNOWN_ERRORS["mobi", "dcm"][1]) + PUBLISHED_PROTOCOL_GAP - 21.43)
    cell = next(line for line in lines if (line["net2"], line["method"], line["net"]) == ("wrn-28-10", "dcm", "1"))
    assert (cell["network"], cell["runs"], cell["seeds"], cell["epochs"], cell["lr"]) == ("wrn-28-10", "3", "1 2 3",
                                                                                          "200", "0.1")
    assert float(cell["mean"]) == pytest.approx(16.5) and float(cell["std"]) == pytest.approx(0.5)
    assert (float(cell["paper_mean"]), float(cell["paper_std"])) == (16.61, 0.24)
    assert float(cell["difference"]) == pytest.approx(16.5 - 16.61)


def test_runs_differing_only_in_seed_save_note_gpu_nthread_dataroot_share_a_cell(tmp_path):
    for seed, others in enumerate([dict(note="first", gpu_id="0", nthread=4, dataroot="/a"),
                                   dict(note="second", gpu_id="3", nthread=8, dataroot="/b", resume=True)], start=1):
        write_run(tmp_path, "wrn", "dcm", seed, (17.0 + seed, 17.0), **others)
    write_run(tmp_path / "longer", "wrn", "dcm", 1, (15.0, 15.0), logged_epochs=(299, 300), epochs=300)
    # A run stopped at epoch 100: it belongs to the same cell, unfinished.
    write_log(tmp_path / "stopped", [log_record(100, 25.0, 25.0, seed=3)])
    code, out, err = call(summarize.main, tmp_path)
    assert code == 0, err
    header, *rows = markdown_rows(out)
    assert header[:3] == ["Net 1", "Net 2", "epochs"]
    by_epochs = {row[2]: row for row in rows if row[2]}
    assert by_epochs["200"][header.index("DCM 1")] == "18.50 ± 0.71 (n=2, +1 unfinished)"
    assert by_epochs["300"][header.index("DCM 1")] == "15.00 (n=1)"
    assert "epoch 100 of 200" in err
    assert "no paper values beside a row whose recipe is not the paper's: epochs 300 (the paper's: 200)" in err


def test_the_mobilenets_paper_value_is_compared_with_our_published_protocol_error_either_way(paper_logs):
    # Eval-mode errors 21.5, 21.4, 21.2 (-0.06 against the paper's 21.43); with test-batch BN 1.8
    # higher, as the paper measured it: +1.74. --batchstats only swaps which line comes first.
    expected = f"{np.mean(KNOWN_ERRORS['mobi', 'dcm'][1]) + PUBLISHED_PROTOCOL_GAP - 21.43:+.2f}"
    for flags in ([], ["--batchstats"]):
        code, out, _ = call(summarize.main, paper_logs, *flags)
        assert code == 0
        header, *rows = markdown_rows(out)
        differences = [row for row in rows if row[2] == "ours - paper"]
        assert differences[1][header.index("DCM 2")] == expected == "+1.74"
        labels = [row[2] for row in rows if row[2].startswith("ours,")]
        assert labels == ["ours, BN in eval mode" if flags else "ours, test-batch BN (published protocol)"]


@pytest.mark.parametrize("options, reason", [
    (dict(amp="bf16"), 'amp "bf16" (the paper\'s: "none")'),
    (dict(tf32=True), "tf32 true (the paper's: false)"),
    (dict(world_size=8, sync_bn=False), "world_size 8 without sync_bn"),
    (dict(epoch_step="[60, 120]"), "epoch_step [60, 120] (the paper's: [60, 120, 160])"),
    (dict(kd_warmup=5.0), "kd_warmup 5.0 (the paper's: 0.0)"),
], ids=["amp_bf16", "tf32", "8_processes_without_sync_bn", "epoch_step", "kd_warmup"])
def test_a_row_off_the_papers_recipe_gets_no_paper_values_and_the_table_says_why(tmp_path, options, reason):
    for seed in (1, 2):
        write_run(tmp_path, "wrn", "dcm", seed, (17.0, 17.0), **options)
    code, out, err = call(summarize.main, tmp_path)
    assert code == 0, err
    header, *rows = markdown_rows(out)
    assert [row[2] for row in rows] == ["ours", "paper"]
    assert rows[1][header.index("DCM 1")].startswith("not comparable: ") and reason in rows[1][header.index("DCM 1")]
    assert "ours - paper" not in out and "16.61" not in out
    assert reason in err
    code, out, _ = call(summarize.main, tmp_path, "--csv")
    assert all(line["paper_mean"] == "" and reason in line["paper_note"] for line in csv.DictReader(io.StringIO(out)))


def test_processes_with_sync_bn_are_the_papers_recipe(tmp_path):
    write_run(tmp_path, "wrn", "dcm", 1, (17.0, 17.0), world_size=8, sync_bn=True)
    code, out, _ = call(summarize.main, tmp_path)
    assert code == 0
    header, *rows = markdown_rows(out)
    assert [row[2] for row in rows] == ["ours", "paper", "ours - paper"]
    assert rows[2][header.index("DCM 1")] == f"{17.0 - 16.61:+.2f}"


def test_options_are_grouped_by_value_not_by_spelling(tmp_path):
    write_run(tmp_path, "wrn", "dcm", 1, (17.0, 17.0), epoch_step="[60, 120, 160]")
    write_run(tmp_path, "wrn", "dcm", 2, (18.0, 17.0), epoch_step="[60,120,160]")
    code, out, err = call(summarize.main, tmp_path)
    assert code == 0, err
    header, *rows = markdown_rows(out)
    assert rows[0][header.index("DCM 1")] == "17.50 ± 0.71 (n=2)"
    assert [row[2] for row in rows] == ["ours", "paper", "ours - paper"]


def test_an_option_added_to_main_py_defines_rows_and_at_its_default_keeps_the_papers_values(tmp_path, added_options):
    added_options(kl_scale=1.0)
    for seed in (1, 2):
        write_run(tmp_path / "default", "wrn", "dcm", seed, (17.0, 17.0), kl_scale=1.0)
        write_run(tmp_path / "half", "wrn", "dcm", seed, (18.0, 18.0), kl_scale=0.5)
    code, out, err = call(summarize.main, tmp_path)
    assert code == 0, err
    header, *rows = markdown_rows(out)
    assert header[:4] == ["Net 1", "Net 2", "kl_scale", ""]
    assert [row[2:4] for row in rows] == [["0.5", "ours"], ["", "paper"], ["1.0", "ours"], ["", "paper"],
                                          ["", "ours - paper"]]
    assert "kl_scale 0.5 (the paper's: 1.0)" in rows[1][header.index("DCM 1")]
    assert rows[4][header.index("DCM 1")] == f"{17.0 - 16.61:+.2f}"


def test_the_networks_are_named_as_the_run_logged_them(tmp_path):
    # A pair of a third training folder: its own names, no paper values, no MobileNet protocol line.
    for seed in (1, 2):
        write_run(tmp_path, "third", "dcm", seed, (17.0, 20.0 + seed))
    code, out, err = call(summarize.main, tmp_path)
    assert code == 0, err
    header, *rows = markdown_rows(out)
    assert rows == [["WRN-28-10", "RESNET-8", "17.00 ± 0.00 (n=2)", "21.50 ± 0.71 (n=2)"]]
    code, out, _ = call(summarize.main, tmp_path, "--csv")
    assert {(line["architecture"], line["net2"], line["network"]) for line in csv.DictReader(io.StringIO(out))} == {
        ("wrn_third", "resnet-8", "wrn-28-10"), ("wrn_third", "resnet-8", "resnet-8")}


def test_the_lr_is_the_option_whatever_the_epochs_lr(tmp_path):
    # epoch_lr is the epoch's, from any schedule (here a cosine's); the row's lr is the --lr option.
    for seed in (1, 2):
        records = [log_record(epoch, 17.0, 17.0, seed=seed, save=str(tmp_path / str(seed)),
                              epoch_lr=0.05 * (1 + math.cos(math.pi * epoch / 200))) for epoch in (199, 200)]
        write_log(tmp_path / str(seed), records)
    code, out, err = call(summarize.main, tmp_path)
    assert code == 0, err
    header, *rows = markdown_rows(out)
    assert [row[2] for row in rows] == ["ours", "paper", "ours - paper"]  # the paper's recipe, lr 0.1
    assert "lr 0.1," in out


def write_repeated_seeds(base):
    """DCM runs of seeds 1, 2, 3 with seeds 1 and 3 found more than once: seed 1 finished in a/ and
    b/ (17.0 and 19.0) and stopped at epoch 100 in c/; seed 3 stopped in a/, finished in b/ (16.0).
    Counted once each, by the furthest epoch and then the first path: 17.0, 18.0, 16.0."""
    write_run(base / "a", "wrn", "dcm", 1, (17.0, 17.0))
    write_run(base / "b", "wrn", "dcm", 1, (19.0, 19.0))
    write_log(base / "c" / "wrn_dcm_seed1", [log_record(100, 25.0, 25.0, seed=1)])
    write_run(base / "a", "wrn", "dcm", 2, (18.0, 18.0))
    write_log(base / "a" / "wrn_dcm_seed3", [log_record(100, 30.0, 30.0, seed=3)])
    write_run(base / "b", "wrn", "dcm", 3, (16.0, 16.0))


def test_a_cell_counts_each_seed_once_and_says_which_runs_of_a_repeated_seed_it_left_out(tmp_path):
    write_repeated_seeds(tmp_path)
    code, out, err = call(summarize.main, tmp_path)
    assert code == 0, err
    header, *rows = markdown_rows(out)
    assert rows[0][header.index("DCM 1")] == "17.00 ± 1.00 (n=3, +3 repeated seed)"
    notes = err.splitlines()
    seed1, = [note for note in notes if "seed 1 has 3 runs" in note]
    counted, left_out = seed1.split("left out: ")
    assert str(tmp_path / "a" / "wrn_dcm_seed1" / "log.txt") in counted
    assert str(tmp_path / "b" / "wrn_dcm_seed1" / "log.txt") in left_out and "c/wrn_dcm_seed1" in left_out
    seed3, = [note for note in notes if "seed 3 has 2 runs" in note]
    assert f"{tmp_path / 'b' / 'wrn_dcm_seed3' / 'log.txt'} (epoch 200); left out: " in seed3
    assert "unfinished" not in out and "unfinished" not in err  # the stopped runs are not counted
    assert "n = seeds" in out
    code, out, _ = call(summarize.main, tmp_path, "--csv")
    cell = next(row for row in csv.DictReader(io.StringIO(out)) if row["net"] == "1")
    assert (cell["runs"], cell["repeated"], cell["seeds"], cell["unfinished"]) == ("3", "3", "1 2 3", "0")
    assert float(cell["mean"]) == pytest.approx(17.0) and float(cell["std"]) == pytest.approx(1.0)


def test_no_run_where_the_user_looked_names_the_runs_started_inside_wrn(tmp_path, monkeypatch):
    # main.py started inside wrn/ without --save writes to wrn/logs, not to the top folder's logs.
    repo = tmp_path / "repo"
    monkeypatch.setattr(summarize, "ROOT", repo)
    monkeypatch.chdir(repo.mkdir() or repo)
    for args in (["logs"], ["logs/*_seed1"]):
        assert "started inside" not in error_line(*call(summarize.main, *args)[::2])
    write_run(repo / "wrn" / "logs", "wrn", "dcm", 1, (17.0, 17.0))
    write_run(repo / "wrn" / "logs", "wrn", "dcm", 2, (17.0, 17.0))
    hint = "runs started inside wrn/ or wrn_mobi/ without --save are in that folder's logs/: wrn/logs (2 log.txt)"
    line = error_line(*call(summarize.main, "logs")[::2])
    assert line.startswith("error: logs: no such file or folder") and line.endswith(hint)
    (repo / "logs").mkdir()
    line = error_line(*call(summarize.main, "logs")[::2])
    assert line.startswith("error: no log.txt under logs") and line.endswith(hint)


def test_batchstats_takes_the_mobilenets_test_batch_statistics_where_logged(tmp_path):
    for seed, batchstats in ((1, 70.0), (2, 72.0), (3, None)):
        record = log_record(200, 17.0, 25.0, pair="mobi", seed=seed, method="ind")
        record[BATCHSTATS_KEY] = batchstats
        if batchstats is None:
            del record[BATCHSTATS_KEY]
        write_log(tmp_path / f"mobi{seed}", [record])
    write_log(tmp_path / "wrn", [log_record(200, 17.0, 19.0, method="ind")])
    code, out, err = call(summarize.main, tmp_path, "--batchstats", "--csv")
    assert code == 0
    cells = {(row["net2"], row["net"]): row for row in csv.DictReader(io.StringIO(out))
             if row["protocol"] == ("batchstats" if (row["net2"], row["net"]) == ("mobilenet", "2") else "eval")}
    assert (float(cells["mobilenet", "2"]["mean"]), cells["mobilenet", "2"]["runs"]) == (29.0, "2")
    assert cells["mobilenet", "1"]["runs"] == "3"  # net 1 is unaffected
    assert float(cells["wrn-28-10", "2"]["mean"]) == 19.0  # a WRN net 2 keeps its eval-mode accuracy
    assert f"lacks {BATCHSTATS_KEY}" in err and str(tmp_path / "mobi3" / "log.txt") in err


def test_batchstats_without_the_key_in_any_log_is_refused(tmp_path):
    write_run(tmp_path, "wrn", "dcm", 1, (17.0, 17.0))
    line = error_line(*call(summarize.main, tmp_path, "--batchstats")[::2])
    assert BATCHSTATS_KEY in line and "drop --batchstats" in line


PUBLISHED_LINE = ('json_stats: {"train_loss": 2.1, "train_acc": 40.0, "test_loss": 1.9, "test_acc": 45.0, '
                  '"epoch": 1, "num_classes": 100, "n_parameters": 100, "train_time": 1, "test_time": 1, "depth": 28}')


@pytest.mark.parametrize("content, words", [
    (PUBLISHED_LINE + "\n", ["lacks", "not written by this repository's main.py"]),
    ("epoch 1 loss 2.3\n", ["line 1", "json_stats"]),
    ('json_stats: {"epoch": 1, "tra\n', ["line 1", "cut off"]),
    ("", ["no epoch"]),
], ids=["published_code", "not_json_stats", "cut_off", "empty"])
def test_foreign_logs_are_refused_by_name(tmp_path, content, words):
    (tmp_path / "log.txt").write_text(content)
    line = error_line(*call(summarize.main, tmp_path / "log.txt")[::2])
    assert str(tmp_path / "log.txt") in line and all(word in line for word in words), line


def test_missing_path_and_empty_folder_are_refused(tmp_path):
    assert "no such file" in error_line(*call(summarize.main, tmp_path / "nope")[::2])
    assert "no log.txt" in error_line(*call(summarize.main, tmp_path)[::2])


def test_summarize_script_exits_2_on_a_foreign_log_without_traceback(tmp_path):
    (tmp_path / "log.txt").write_text(PUBLISHED_LINE + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "summarize.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stdout == ""


@pytest.mark.parametrize("tool", [sweep, summarize, plot, evaluate], ids=lambda tool: tool.__name__)
def test_help_works_and_shows_usage_examples(tool, capsys):
    # In this process: the scripts themselves run in the exit-code tests.
    with pytest.raises(SystemExit) as exit_:
        tool.parse_options(["--help"])
    assert exit_.value.code == 0
    assert f"python tools/{tool.__name__}.py" in capsys.readouterr().out


# --- plot --------------------------------------------------------------------------------------

def test_plot_writes_a_png_of_both_networks(real_logs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figure2.png"
    code, stdout, err = call(plot.main, real_logs, "--out", out)
    assert code == 0, err
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    assert f"wrote {out}" in stdout


def test_plot_without_matplotlib_says_how_to_install_it(real_logs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    line = error_line(*call(plot.main, real_logs, "--out", tmp_path / "figure2.png")[::2])
    assert "pip install matplotlib" in line
    assert not (tmp_path / "figure2.png").exists()


def plotted(monkeypatch, *args):
    """(exit code, stderr, the figure) of plot.py run in this process."""
    pyplot = pytest.importorskip("matplotlib.pyplot")
    figures = []
    monkeypatch.setattr(pyplot, "close", figures.append)  # keeps the figure that plot.py saved
    code, _, err = call(plot.main, *args)
    assert code == 0, err
    figure, = figures
    return err, figure


def test_plot_draws_each_seed_once_and_says_which_runs_it_left_out(tmp_path, monkeypatch):
    write_repeated_seeds(tmp_path / "logs")
    err, figure = plotted(monkeypatch, tmp_path / "logs", "--out", tmp_path / "figure.png")
    for ax in figure.axes:
        assert [text.get_text() for text in ax.get_legend().get_texts()] == ["DCM (n=3)"]
        line, = ax.get_lines()
        assert list(line.get_xdata()) == [199, 200] and line.get_ydata()[-1] == pytest.approx(17.0)
    assert "seed 1 has 3 runs" in err and "seed 3 has 2 runs" in err


def test_plot_draws_an_unfinished_run_as_far_as_it_got(tmp_path, monkeypatch):
    write_run(tmp_path, "wrn", "dcm", 1, (17.0, 17.0), logged_epochs=(1, 2))  # epoch 2 of 200
    _, figure = plotted(monkeypatch, tmp_path, "--out", tmp_path / "figure.png")
    line, = figure.axes[0].get_lines()
    assert list(line.get_xdata()) == [1, 2] and line.get_ydata()[-1] == pytest.approx(17.0)


def test_plot_titles_name_the_dataset_and_the_subset(tmp_path, monkeypatch):
    # One dataset in the figure: it is still named, so that a FashionMNIST figure cannot pass for a CIFAR one.
    write_run(tmp_path / "fashion", "wrn", "dcm", 1, (17.0, 17.0), dataset="FashionMNIST", subset=64, epochs=2,
              logged_epochs=(1, 2))
    _, figure = plotted(monkeypatch, tmp_path / "fashion", "--out", tmp_path / "fashion.png")
    assert [ax.get_title() for ax in figure.axes] == ["WRN-28-10 (net 1) with WRN-28-10\nFashionMNIST, subset 64",
                                                      "WRN-28-10 (net 2) with WRN-28-10\nFashionMNIST, subset 64"]
    # Two rows: each says its own, once; other differing settings follow.
    write_run(tmp_path / "cifar", "wrn", "dcm", 1, (17.0, 17.0), epochs=3, logged_epochs=(2, 3))
    _, figure = plotted(monkeypatch, tmp_path, "--out", tmp_path / "both.png")
    assert sorted(ax.get_title().split("\n")[1] for ax in figure.axes) == [
        "CIFAR100, all training images, epochs 3", "CIFAR100, all training images, epochs 3",
        "FashionMNIST, subset 64, epochs 2", "FashionMNIST, subset 64, epochs 2"]


def test_plot_refuses_an_unknown_format(real_logs, tmp_path):
    assert "png" in error_line(*call(plot.main, real_logs, "--out", tmp_path / "figure2.xyz")[::2])


# --- evaluate ----------------------------------------------------------------------------------

@pytest.fixture
def cpu_only(monkeypatch):
    # evaluate sets CUDA_VISIBLE_DEVICES from --gpu_id; keep that from leaking into later tests.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def evaluate_rows(*args):
    code, out, err = call(evaluate.main, *args, "--gpu_id", "", "--nthread", 1)
    assert code == 0, err
    header, *rows = markdown_rows(out)
    return [dict(zip(header, row)) for row in rows]


@pytest.fixture(scope="module")
def evaluated(swept, mobi_run):
    """{save: [row of net1.pt, row of net2.pt]} of two runs measured by one evaluate.py command,
    each file on the test set of the --dataroot its run logged (two different sets of one name)."""
    saves = [swept["saves"]["ind", 1], mobi_run["save"]]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # as cpu_only
        rows = evaluate_rows(*[save / f"net{net}.pt" for save in saves for net in (1, 2)])
    return {save: rows[2 * index:2 * index + 2] for index, save in enumerate(saves)}


def test_evaluate_reproduces_main_py_final_accuracy_and_parameter_count(evaluated, mobi_run):
    for save, rows in evaluated.items():
        record = read_log(save)[-1]
        for net, row in enumerate(rows, start=1):
            assert float(row["test acc (%)"]) == pytest.approx(record[f"test_acc_net{net}"], abs=1e-9)
            assert float(row["test error (%)"]) == pytest.approx(100 - record[f"test_acc_net{net}"], abs=1e-9)
            assert int(row["parameters"].replace(",", "")) == record[f"n_parameters_net{net}"]
        assert [row["network"] for row in rows] == ["WRN-10-1", "MobileNet" if save == mobi_run["save"] else "WRN-10-1"]


def test_evaluate_takes_the_logged_dataroot_unless_dataroot_is_given(evaluated, swept, mobi_run, cpu_only):
    assert [rows[0]["test set"] for rows in evaluated.values()] == ["CIFAR100 (40 images)", "CIFAR100 (20 images)"]
    row, = evaluate_rows(swept["saves"]["ind", 1] / "net1.pt", "--dataroot", mobi_run["dataroot"])
    assert row["test set"] == "CIFAR100 (20 images)"


def test_evaluate_refuses_a_dataroot_that_is_no_folder_here(swept, tmp_path, monkeypatch, cpu_only):
    # The run logged a relative --dataroot: started from elsewhere, it names no folder. Nothing is downloaded.
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(swept["saves"]["ind", 1] / "net1.pt", run / "net1.pt")
    records = [{**record, "dataroot": "data"} for record in read_log(swept["saves"]["ind", 1])]
    (run / "log.txt").write_text("".join(f"json_stats: {json.dumps(record)}\n" for record in records))
    monkeypatch.chdir(tmp_path)
    code, out, err = call(evaluate.main, run / "net1.pt", "--gpu_id", "", "--nthread", 1)
    line = error_line(code, err)
    assert str(run / "net1.pt") in line and "--dataroot data (relative to the folder the run was started in)" in line
    assert str(run / "log.txt") in line and line.endswith("give the dataset's folder with --dataroot")
    code, out, err = call(evaluate.main, run / "net1.pt", "--dataroot", tmp_path / "nope", "--gpu_id", "")
    assert f"--dataroot {tmp_path / 'nope'} is no folder" in error_line(code, err)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_evaluate_tests_in_the_fp32_precision_the_run_logged(swept, tmp_path, cpu_only):
    # TF32 is process-wide and PyTorch's default convolves in TF32 on Ampere and newer GPUs: evaluate
    # sets both flags from the run's --tf32, as main.py did, whatever they were before (the other
    # precision, set through the project's own setter, as is the default afterwards).
    hardware = load_folder("wrn").hardware
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(swept["saves"]["ind", 1] / "net1.pt", run / "net1.pt")
    records = read_log(swept["saves"]["ind", 1])
    try:
        for tf32 in (True, False):
            (run / "log.txt").write_text("".join(f"json_stats: {json.dumps({**record, 'tf32': tf32})}\n"
                                                 for record in records))
            hardware.set_fp32_precision(not tf32)
            row, = evaluate_rows(run / "net1.pt")
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (tf32, tf32)
            assert row["protocol"] == "fp32"  # on a CPU there is no TF32
    finally:
        hardware.set_fp32_precision(False)


def test_evaluate_counts_the_papers_forward_gflop(evaluated, mobi_run):
    # SPEC: the MobileNet costs 1.22 GFLOP per image without auxiliary classifiers (100 classes; 10 here).
    row = evaluated[mobi_run["save"]][1]
    assert float(row["GFLOP / image"]) == pytest.approx(1.22, abs=0.01)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, swept):
    """Files evaluate.py refuses, each as the net1.pt of a copy of a real run's folder (its log.txt
    beside it) unless its case is a missing log or a file named otherwise."""
    base = tmp_path_factory.mktemp("bad_files")
    save = swept["saves"]["dml", 1]
    models = load_folder("wrn").models
    net1 = torch.load(save / "net1.pt", weights_only=True)
    records = read_log(save)
    states = {"with_aux": models.wrn(16, 1, 10, aux=True).state_dict(),  # what a checkpoint holds under "net1"
              "missing_key": {key: value for key, value in net1.items() if key != "head.bn.weight"},
              "other_network": {"weight": torch.zeros(3)}, "no_log": net1}
    files = {"checkpoint": save / "checkpoint.pt", "missing": base / "missing" / "net1.pt",
             "text": base / "text" / "net1.pt", "renamed": base / "renamed" / "weights.pt"}
    files.update({name: base / name / "net1.pt" for name in states})
    for name, path in files.items():
        path.parent.mkdir(exist_ok=True)
        if name not in ("checkpoint", "missing", "no_log"):
            (path.parent / "log.txt").write_text("".join(f"json_stats: {json.dumps(r)}\n" for r in records))
    for name, state in states.items():
        torch.save(state, files[name])
    torch.save(net1, files["renamed"])
    files["text"].write_text("not weights")
    return files


@pytest.mark.parametrize("name, words", [
    ("checkpoint", ["not the state dict of a network", "net1.pt"]),
    ("with_aux", ["does not fit WRN-10-1", "Unexpected key(s)", "aux1."]),
    ("missing_key", ["does not fit WRN-10-1", "head.bn.weight"]),
    ("other_network", ["does not fit WRN-10-1", "Missing key"]),
    ("no_log", ["beside its run's log.txt", "--save folder"]),
    ("renamed", ["not a net1.pt or net2.pt"]),
    ("text", ["not a file of tensors"]),
    ("missing", ["no such file"]),
])
def test_evaluate_refuses_what_is_not_an_exported_network_of_this_dataset(bad_files, cifar, cpu_only, name, words):
    code, out, err = call(evaluate.main, bad_files[name], "--dataroot", cifar, "--gpu_id", "", "--nthread", 1)
    line = error_line(code, err)
    assert str(bad_files[name]) in line and all(word in line for word in words), line
    assert out == ""


def test_evaluate_script_exits_2_without_traceback(swept):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"),
                             str(swept["saves"]["ind", 1] / "checkpoint.pt"), "--gpu_id", "", "--nthread", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "not the state dict of a network" in result.stderr
