"""tools/preflight.py: `--quick` on this CPU end to end (every check runs or says why not, the
table's verdicts, the results file, the exit code, nothing written where it is started); the
graphs each check compiles, counted on a tiny model; the budget's plan; a preflight stopped by a
signal keeps its rows; one torchrun rank built as for several; main.py's one-line warning about
--amp bf16 on a CPU without bf16 support. No test is timed: the end-to-end run gets a budget far
above what it needs.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, load_folder


def load_preflight():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec = importlib.util.spec_from_file_location("preflight", ROOT / "tools" / "preflight.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return module


def table_rows(text):
    """{check: (figure, verdict)} of the preflight's Markdown table rows."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| check |"):
            check, figure, verdict = (cell.strip() for cell in line.strip("|").split(" | "))
            rows[check] = (figure, verdict)
    return rows


@pytest.fixture(scope="module")
def quick_cpu_run(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("preflight"), tmp_path_factory.mktemp("preflight_out")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "preflight.py"), "--quick", "--cpu", "--nthread", "1",
                             "--budget", "60", "--out", str(out)], cwd=folder, capture_output=True, text=True,
                            timeout=1800)
    return folder, out, result


def test_quick_preflight_on_a_cpu_passes_every_check_that_runs_there(quick_cpu_run):
    folder, out, result = quick_cpu_run
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    verdicts = {check: verdict.split(":")[0] for check, (_, verdict) in rows.items()}
    assert "FAIL" not in verdicts.values(), result.stdout
    expected_passes = ["environment: software", "environment: CPU", "projection: default sweep", "torchrun",
                       "interrupt and resume", "--deterministic", "sharing: two runs per GPU"]
    for folder_name in ("wrn", "wrn_mobi"):
        expected_passes += [f"numerics {folder_name}/ {setting}" for setting in ("fp32", "fp32+cl", "bf16", "bf16+cl")]
        expected_passes += [f"speed {folder_name}/ {setting}" for setting in ("fp32", "fp32+cl", "bf16+cl")]
        expected_passes += [f"projection {folder_name}/ {method}" for method in ("ind", "dml", "dcm")]
        expected_passes += [f"projection {folder_name}/: the rest of a run"]
    assert {check: verdicts.get(check) for check in expected_passes} == {check: "pass" for check in expected_passes}
    # The default setting's reference is IEEE fp32; what a CPU cannot check says why.
    assert rows["numerics wrn/ fp32"][0].startswith("IEEE fp32 (TF32 off), the reference")
    assert rows["environment: GPUs"][1] == "skipped: no CUDA GPU visible"
    assert rows["memory"][1].startswith("skipped: no CUDA GPU")
    # Every check ran within its share and says how many graphs it compiled: none without --compile.
    times = {check: figure for check, (figure, _) in rows.items() if check.startswith("time: ")}
    assert len(times) == 16 and all(figure.endswith(", 0 graph(s) compiled") for figure in times.values()), times
    # The figures a user plans with, and which model they were measured on.
    assert "torch " in rows["environment: software"][0] and "bf16" in rows["environment: CPU"][0]
    assert "min of training per 200-epoch run" in rows["projection wrn/ dcm"][0]
    assert rows["projection: default sweep, every method"][0].startswith("30 runs of WRN-16-1 pairs")
    assert " h on this CPU" in rows["projection: default sweep"][0]
    assert "gloo" in rows["torchrun"][0] and "bit-exact" in rows["interrupt and resume"][0]
    assert "Every check passed." in result.stdout
    # The recommended command runs the paper's model, and the output says which model was measured.
    commands = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("python tools/sweep.py")]
    assert commands and all("--gpus '' --dataroot DATA" in command and "--depth" not in command for command in commands)
    assert "measured on WRN-16-1 pairs, not on the table's WRN-28-10 pairs (--quick)" in result.stdout
    # Every row is in the results file, next to the compile cache; nothing is written where it started.
    results, = out.glob("preflight-*.md")
    assert table_rows(results.read_text()) == rows
    assert (out / "compile" / "inductor").is_dir() and (out / "compile" / "triton").is_dir()
    assert f"compile cache for every check, kept for your runs: {out / 'compile'}" in result.stdout
    assert list(folder.iterdir()) == [], "the preflight must not write where it is started"


def test_each_check_compiles_a_graph_once_and_a_check_past_its_share_fails_its_row(tmp_path):
    # The checks' own worker on a tiny pair (WRN-10-1, ind) with --compile's graphs counted by
    # Dynamo's 'eager' backend: the step compiled for the numerics (its graphs for one batch shape)
    # is the one speed and projection time (no graph of their own), and a real run's two other
    # shapes (last partial batch, evaluation) are compiled once.
    preflight = load_preflight()
    run = preflight.Preflight(SimpleNamespace(), tmp_path / "results.md", {"CUDA_VISIBLE_DEVICES": ""})
    run.setup = {"device": "cpu", "nthread": 1, "depth": 10, "width": 1, "batch_size": 3, "method": "ind",
                 "backend": "eager"}
    worker = run.worker("wrn")
    try:
        graphs = [run.run("numerics", [(worker, {"check": "numerics", "settings": ["fp32", "fp32+compile"]})], 600),
                  run.run("speed", [(worker, {"check": "speed", "settings": ["fp32+compile"],
                                              "passed": ["fp32+compile"], "steps": 2, "seconds": 60})], 600),
                  run.run("projection", [(worker, {"check": "projection", "setting": "fp32+compile",
                                                   "methods": ["ind"], "steps": 2, "seconds": 60,
                                                   "test_images": 500})], 600),
                  run.run("rest", [(worker, {"check": "extra_compiles", "setting": "fp32+compile",
                                             "test_images": 500})], 600)]
        per_shape = graphs[0]
        assert per_shape >= 1 and graphs == [per_shape, 0, 0, 2 * per_shape], run.rows
        rows = {row["check"]: row for row in run.rows}
        assert rows["numerics wrn/ fp32+compile"]["verdict"] == "pass"
        assert f"({preflight_words(per_shape)})" in rows["numerics wrn/ fp32+compile"]["figure"]
        assert rows["projection wrn/: the rest of a run"]["figure"].startswith(
            f"{preflight_words(2 * per_shape)} once per run: the last partial batch (2 images)")
        assert rows["time: speed"]["figure"].endswith(", 0 graph(s) compiled")
        # A command past its share stops the worker and fails its row; the next command starts a new one.
        assert run.run("stuck", [(worker, {"check": "speed", "settings": ["fp32"], "passed": ["fp32"], "steps": 10 ** 6,
                                           "seconds": 10 ** 6})], 0.5) is None
        assert run.rows[-2]["verdict"] == "fail" and "no result within its share of" in run.rows[-2]["why"]
        assert worker.process.poll() is not None
        assert run.run("broken", [(run.worker("wrn"), {"check": "numerics", "no_such_argument": 1})], 600) is None
        assert run.rows[-2]["verdict"] == "fail" and run.rows[-2]["why"].startswith("exit code 1: TypeError")
    finally:
        run.stop_all()
    assert table_rows((tmp_path / "results.md").read_text()).keys() == {row["check"] for row in run.rows}


def test_the_budget_plans_the_documented_checks_and_shares_it_out():
    preflight = load_preflight()
    items = preflight.plan_items(preflight.PLANS["cuda", False]["planned"])
    preflight.split_budget(items, 8 * 60 - 20)  # the default budget, less the environment's time
    running = [item.key for item in items if item.share]
    assert running == ["numerics wrn", "numerics wrn_mobi", "resume", "speed wrn", "speed wrn_mobi", "projection wrn",
                       "projection wrn_mobi", "sharing", "torchrun", "other wrn", "other wrn_mobi"]
    assert sum(item.share for item in items if item.share) == pytest.approx(8 * 60 - 20)
    assert {item.key: item.not_run for item in items if not item.share} == {
        key: "planned 120 s, over the budget" for key in ("rest wrn", "rest wrn_mobi")} | {
        key: "planned 130 s, over the budget" for key in ("methods wrn", "methods wrn_mobi")}
    items = preflight.plan_items(preflight.PLANS["cuda", False]["planned"])
    preflight.split_budget(items, 16 * 60 - 20)
    assert all(item.share for item in items)
    # A check whose prerequisite does not fit does not run either, whatever its own cost.
    items = preflight.plan_items(preflight.PLANS["cuda", False]["planned"])
    preflight.split_budget(items, 160)
    shares = {item.key: item.share for item in items}
    assert shares["numerics wrn"] and not shares["numerics wrn_mobi"] and shares["resume"]
    assert next(item.not_run for item in items if item.key == "speed wrn_mobi") == (
        "needs numerics wrn_mobi, which does not run")


def preflight_words(graphs):
    return f"{graphs} graph{'s' if graphs != 1 else ''} compiled"


class FakeWorker:
    """A worker that answers each command with one row, without a process of its own."""

    def __init__(self, arguments, environment):
        self.folder = json.loads(arguments[1])["folder"]
        self.answers, self.unfinished = [], 0
        self.process = SimpleNamespace(poll=lambda: None, pid=None)

    def send(self, command):
        self.unfinished += 1
        if command["check"] == "environment":
            self.answers += [{"check": "environment: GPUs", "figure": "none", "verdict": "skipped", "why": "", "data": {}}]
        elif command["check"] == "resume":  # the caller's time limit strikes while resume runs
            os.kill(os.getpid(), signal.SIGTERM)
        elif command["check"] != "setup":
            self.answers += [{"check": f"{command['check']} {self.folder}/ fp32", "figure": "", "verdict": "pass",
                              "why": "", "data": {"setting": "fp32"}}]
        self.answers.append(None)

    def next_line(self, deadline):
        answer = self.answers.pop(0)
        return "PREFLIGHT-DONE {\"graphs\": 0}" if answer is None else "PREFLIGHT " + json.dumps(answer)

    def stop(self):
        pass


def test_a_preflight_stopped_by_a_signal_keeps_its_rows_and_says_what_did_not_finish(monkeypatch, tmp_path, capsys):
    preflight = load_preflight()
    monkeypatch.setattr(preflight, "CheckProcess", FakeWorker)
    assert preflight.main(["--quick", "--cpu", "--out", str(tmp_path)]) == 143
    results, = tmp_path.glob("preflight-*.md")
    text = results.read_text()
    assert text == capsys.readouterr().out
    assert {"numerics wrn/ fp32", "numerics wrn_mobi/ fp32"} <= table_rows(text).keys()
    assert text.splitlines()[-1] == (
        "preflight: stopped by SIGTERM; the rows above are every check that finished; did not finish: interrupt and "
        "resume; --deterministic, speed wrn/, speed wrn_mobi/, projection and memory wrn/ (dcm), projection and memory "
        "wrn_mobi/ (dcm), two runs on one device, torchrun, the rest of a run wrn/ (compiles, testing), the rest of a "
        "run wrn_mobi/ (compiles, testing), projection wrn/ ind and dml, projection wrn_mobi/ ind and dml, numerics "
        "wrn/ (other settings), numerics wrn_mobi/ (other settings)")


def test_one_torchrun_rank_builds_the_process_group_the_global_bn_and_ddp_through_main_py(tmp_path):
    # The one-GPU machine's torchrun row, with gloo standing in for NCCL: main.py's code on one rank
    # converts BN and wraps both networks as it does for several ranks.
    config = {"device": "cpu", "nthread": 1, "depth": 16, "width": 1, "batch_size": 4}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                             str(ROOT / "tools" / "preflight_checks.py"), "one_rank", json.dumps(config)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    row, = [json.loads(line[len("PREFLIGHT "):]) for line in result.stdout.splitlines() if line.startswith("PREFLIGHT ")]
    assert row["verdict"] == "pass"
    assert ("one rank under torchrun; main.py's code built the gloo process group, GlobalBatchNorm2d and "
             "DistributedDataParallel"
            in row["figure"]) and "Not covered: collectives between ranks" in row["figure"]


@pytest.mark.parametrize("support, amp, warned", [("none", "bf16", True), ("avx512", "bf16", False),
                                                  ("native", "bf16", False), ("none", "none", False)])
def test_main_warns_in_one_line_about_bf16_on_a_cpu_without_bf16_support(monkeypatch, capsys, support, amp, warned):
    hardware = load_folder("wrn").hardware
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: (support, "AVX2, no bf16 instructions"))
    hardware.warn_slow_cpu_bf16(SimpleNamespace(amp=amp), torch.device("cpu"))
    lines = capsys.readouterr().err.splitlines()
    assert lines == (["warning: --amp bf16 on this CPU (AVX2, no bf16 instructions) runs about 10x slower than fp32; "
                      "drop --amp on it"] if warned else [])


def test_cpu_bf16_support_names_the_capability():
    kind, words = load_folder("wrn").hardware.cpu_bf16_support()
    assert kind in ("native", "avx512", "none")
    assert words.startswith(torch.backends.cpu.get_cpu_capability())


@pytest.mark.parametrize("flags, native", [("avx512f avx512_bf16 amx_bf16 amx_tile", ["AVX512_BF16", "AMX"]),
                                           ("avx512f avx512_vnni", []), ("avx2 fma", [])])
def test_cpu_bf16_instructions_come_from_the_cpu_flags_where_torch_has_no_probe(monkeypatch, tmp_path, flags, native):
    # PyTorch 2.4's torch.cpu has no bf16 probes: there /proc/cpuinfo's flags name the instructions.
    hardware = load_folder("wrn").hardware
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(f"processor\t: {n}\nmodel name\t: a CPU\nflags\t\t: fpu sse {flags}\n\n" for n in (0, 1)))
    monkeypatch.setattr(hardware, "CPUINFO", str(cpuinfo), raising=False)
    kind, words = hardware.cpu_bf16_support()
    assert (kind == "native") == bool(native), words
    if native:
        assert words.endswith("bf16 instructions (AVX512_BF16 and AMX)")
    assert hardware.cpu_bf16_instructions() == native
    monkeypatch.setattr(hardware, "CPUINFO", str(tmp_path / "absent"))  # not Linux: nothing to read
    assert hardware.cpu_bf16_instructions() == []


def test_gpu_rows_project_the_sweep_and_recommend_two_runs_per_gpu_only_from_their_measured_throughput():
    # The arithmetic of the GPU-only rows, on measurements as a GPU's checks report them.
    preflight = load_preflight()
    gib = 2 ** 30
    projection = [{"folder": folder, "method": method, "minutes": 60.0, "tested": False, "images_per_second": 100.0,
                   "memory": 10 * gib, "reserved": (12 if folder == "wrn" else 40) * gib}
                  for folder in ("wrn", "wrn_mobi") for method in ("ind", "dml", "dcm")]
    summary = preflight.projection_summary(projection, {"wrn": 6.0, "wrn_mobi": 6.0}, 2, "2 x NVIDIA H100 80GB HBM3",
                                           "WRN-28-10 pairs")
    assert summary["figure"] == "30 runs of WRN-28-10 pairs, 33.0 run-hours: about 16.5 h on 2 x NVIDIA H100 80GB HBM3 (one run per GPU)"
    dcm_only = [data for data in projection if data["method"] == "dcm"]
    summary = preflight.projection_summary(dcm_only, {}, 1, "1 x H200", "WRN-28-10 pairs")
    assert summary["figure"].startswith("30 runs of WRN-28-10 pairs, 30.0 run-hours: about 30.0 h on 1 x H200 (one run "
                                        "per device at a time); ind and dml counted at dcm's speed")
    assert summary["figure"].endswith("compiled runs: training only (testing and compiling not timed in this budget)")
    assert preflight.projection_summary(projection[:2], {}, 2, "2 GPUs", "")["verdict"] == "skipped"
    memory = preflight.memory_rows(dcm_only, 80 * gib)
    assert [row["figure"].endswith("2 runs fit on one GPU") for row in memory] == [True, False]  # 2 x (40 + 1) > 80
    # Two runs per GPU: only where their measured throughput together beats one run at a time.
    fits = [{"data": {"two_fit": True}}]
    alone = {"wrn": 100.0, "wrn_mobi": 200.0}
    assert preflight.sharing_row({"wrn": 50.0, "wrn_mobi": 100.0}, alone, fits)["data"]["recommend"] is False
    row = preflight.sharing_row({"wrn": 70.0, "wrn_mobi": 140.0}, alone, fits)
    assert row["data"]["recommend"] and row["figure"].endswith("1.40x the work of one run at a time; recommended: "
                                                              "tools/sweep.py --jobs_per_gpu 2")
    assert not preflight.sharing_row({"wrn": 70.0, "wrn_mobi": 140.0}, alone, memory)["data"]["recommend"]
    # The command runs the paper's model (no --depth/--width), with each folder's setting.
    assert preflight.recommended_command({"wrn": "bf16+cl+compile", "wrn_mobi": "bf16+cl+compile"}, "cuda",
                                         ["0", "1"], jobs_per_gpu=2) == [
        "python tools/sweep.py --gpus 0,1 --jobs_per_gpu 2 --dataroot DATA --amp bf16 --channels_last --compile"]
    assert preflight.recommended_command({"wrn": "bf16+cl+compile", "wrn_mobi": "tf32+cl"}, "cuda", ["3"]) == [
        "python tools/sweep.py --folders wrn --gpus 3 --dataroot DATA --amp bf16 --channels_last --compile",
        "python tools/sweep.py --folders wrn_mobi --gpus 3 --dataroot DATA --tf32 --channels_last"]
    assert preflight.candidate_settings("cuda", False, bf16=True, tf32=True)[0] == ["tf32+cl", "bf16+cl",
                                                                                   "bf16+cl+compile"]
    assert preflight.candidate_settings("cuda", False, bf16=False, tf32=False)[0] == ["fp16+cl", "fp16+cl+compile"]
