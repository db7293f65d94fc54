"""tools/preflight.py: on this CPU end to end (every check's row, the compile count, the rows kept and
the unfinished checks named when SIGTERM stops it, nothing left running or written where it is
started); a compile past --minutes reported as slow, not failed, after it had the time left; the
GPU-only arithmetic of the projection and the recommended command; main.py's one-line warning
about --amp bf16 on a CPU without bf16 support. A stand-in compile (tests/standin_compile, on
PYTHONPATH) makes a compile slow on purpose; the tool has no hook for it.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, load_folder

STANDIN = ROOT / "tests" / "standin_compile"


def load_preflight(name="preflight"):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
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


def start_preflight(tmp_path, arguments, compile_seconds):
    """The preflight on the CPU (one compiled candidate, wrn/ only, WRN-16-1 at batch 2), in a
    process of its own, with the stand-in compile taking `compile_seconds` per graph in each script."""
    cwd, pids = tmp_path / "cwd", tmp_path / "pids"
    cwd.mkdir(), pids.mkdir()
    env = {**os.environ, "PYTHONPATH": str(STANDIN), "STANDIN_PIDS": str(pids), "CUDA_VISIBLE_DEVICES": "",
           "STANDIN_COMPILE": json.dumps(compile_seconds)}
    command = [sys.executable, str(ROOT / "tools" / "preflight.py"), "--quick", "--nthread", "1", "--folders",
               "wrn", "--settings", "fp32+cl+compile", "--out", str(tmp_path / "out"), *arguments]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), pids


def running(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_the_preflight_on_a_cpu_and_stopped_by_sigterm_in_a_compile(tmp_path):
    # Every check passes on this CPU; the compiled candidate's numerics compile and count their graphs;
    # its speed check compiles for ever, and SIGTERM stops the preflight there.
    process, pids = start_preflight(tmp_path, [], {"preflight_checks.py": 0.1, "main.py": 3600})
    deadline = time.time() + 600
    while not list(pids.glob("main.py.*")) and process.poll() is None:
        assert time.time() < deadline, "the compiled speed check never started"
        time.sleep(0.2)
    compiling = {int(pid.suffix[1:]) for pid in pids.glob("main.py.*")}
    process.send_signal(signal.SIGTERM)
    output, errors = process.communicate(timeout=60)
    assert process.returncode == 143, output + errors
    rows = table_rows(output)
    verdicts = {check: verdict for check, (_, verdict) in rows.items()}
    passes = ["environment: software", "environment: CPU", "numerics wrn/ fp32", "numerics wrn/ fp32+cl+compile",
              "speed wrn/ fp32", "interrupt and resume", "torchrun", "projection wrn/", "memory wrn/",
              "projection: the table"]
    assert {check: verdicts.get(check) for check in passes} == {check: "pass" for check in passes}, output
    assert verdicts["environment: GPUs"] == "skipped: no CUDA GPU visible"
    assert rows["numerics wrn/ fp32"][0].startswith("IEEE fp32 (TF32 off), the reference")
    # The row counts the graphs the (stand-in) compiler compiled in the numerics check's process.
    compiled, = [len(path.read_text().splitlines()) for path in pids.glob("preflight_checks.py.*")]
    assert compiled >= 2 and f"{compiled} graph(s) compiled" in rows["numerics wrn/ fp32+cl+compile"][0]
    assert "bit-exact" in rows["interrupt and resume"][0] and "gloo" in rows["torchrun"][0]
    # The speed row is main.py --benchmark's line; the projection is its epoch-code img/s.
    speed = rows["speed wrn/ fp32"][0]
    epoch_images = float(speed.split(" img/s in the epoch code")[0].split()[-1])
    run_hours = float(rows["projection wrn/"][0].split(" h per 200-epoch run")[0].split()[-1])
    assert run_hours == pytest.approx(200 * 50_000 / epoch_images / 3600, rel=0.01)
    table = rows["projection: the table"][0]
    assert table.startswith("15 runs (wrn) of WRN-16-1 pairs, ") and " h on this CPU, one run at a time" in table
    assert float(table.split(" run-hours")[0].split()[-1]) == pytest.approx(15 * run_hours, rel=0.01)
    assert "speed wrn/ fp32+cl+compile" not in rows
    lines = output.splitlines()
    assert "preflight: stopped by SIGTERM; did not finish: speed wrn/ fp32+cl+compile" in lines
    assert "  python tools/sweep.py --folders wrn --gpus '' --dataroot DATA" in lines
    assert lines[0] == f"preflight: one compile cache for every check, kept for your runs: {tmp_path / 'out' / 'compile'}"
    assert not [pid for pid in compiling if running(pid)], "a check's process outlived the preflight"
    assert list((tmp_path / "cwd").iterdir()) == [], "the preflight must not write where it is started"


def test_a_compile_past_the_minutes_is_a_slow_compile_that_had_every_second_left(tmp_path):
    minutes = 0.3
    started = time.time()
    process, _ = start_preflight(tmp_path, ["--checks", "numerics", "--minutes", str(minutes)],
                                 {"preflight_checks.py": 3600})
    output, errors = process.communicate(timeout=300)
    seconds = time.time() - started
    assert process.returncode == 0, output + errors
    rows = table_rows(output)
    assert rows["numerics wrn/ fp32"][1] == "pass"
    figure, verdict = rows["numerics wrn/ fp32+cl+compile"]
    assert verdict.startswith("slow: slow compile: not finished in the ") and verdict.endswith(
        f" s left of --minutes {minutes:g}; a longer --minutes finishes it (the compile cache keeps what was compiled)")
    # It was stopped at the end of --minutes, not at a share of it.
    assert 60 * minutes - 1 <= seconds <= 60 * minutes + 30, seconds
    assert "Slow compile, not timed: numerics wrn/ fp32+cl+compile; a longer --minutes times it." in output


def test_the_gpu_rows_project_the_table_and_recommend_each_folders_fastest_setting(capsys, monkeypatch):
    preflight = load_preflight()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    run = preflight.Preflight(preflight.parse_options([]), {})
    run.mode, run.gpus = preflight.MODES["cuda", False], [{"name": "NVIDIA H100", "memory": 80 * 2 ** 30}] * 2
    for folder, setting, epoch_images in [("wrn", "bf16+cl", 1000.0), ("wrn", "bf16+cl+compile", 2000.0),
                                          ("wrn_mobi", "tf32+cl", 5000.0), ("wrn_mobi", "bf16+cl", 4000.0)]:
        run.add(f"speed {folder}/ {setting}", "", "pass", setting=setting, epoch_images=epoch_images,
                memory="peak GPU memory 30 GiB")
    run.add("speed wrn_mobi/ bf16+cl+compile", "", "slow", "slow compile")
    assert preflight.conclude(run) == 0
    rows = table_rows(capsys.readouterr().out)
    # 200 epochs of 50,000 images: 1.39 h at 2000 img/s, 0.56 h at 5000; 15 runs each on 2 GPUs.
    assert rows["projection wrn/"][0].startswith("bf16+cl+compile, the fastest: 1.4 h per 200-epoch run")
    assert rows["memory wrn_mobi/"][0] == "tf32+cl: peak GPU memory 30 GiB of a GPU's 80 GiB"
    assert rows["projection: the table"][0].startswith("30 runs (wrn, wrn_mobi) of WRN-28-10 pairs, 29.2 run-hours: "
                                                       "about 14.6 h on 2 x NVIDIA H100, one run per GPU")
    assert preflight.recommended_commands({"wrn": "bf16+cl+compile", "wrn_mobi": "tf32+cl"}, run.gpus) == [
        "python tools/sweep.py --folders wrn --gpus 2,3 --dataroot DATA --amp bf16 --channels_last --compile",
        "python tools/sweep.py --folders wrn_mobi --gpus 2,3 --dataroot DATA --tf32 --channels_last"]
    assert preflight.recommended_commands({"wrn": "bf16+cl", "wrn_mobi": "bf16+cl"}, run.gpus) == [
        "python tools/sweep.py --gpus 2,3 --dataroot DATA --amp bf16 --channels_last"]
    assert preflight.candidate_settings("cuda", False, bf16=False, tf32=False) == ["fp16+cl", "fp16+cl+compile"]


@pytest.mark.parametrize("kernels, amp, warned", [(False, "bf16", True), (True, "bf16", False), (False, "none", False)])
def test_main_warns_in_one_line_about_bf16_on_a_cpu_without_bf16_support(monkeypatch, capsys, kernels, amp, warned):
    hardware = load_folder("wrn").hardware
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: kernels)
    hardware.warn_slow_cpu_bf16(SimpleNamespace(amp=amp), torch.device("cpu"))
    lines = capsys.readouterr().err.splitlines()
    assert lines == (["warning: --amp bf16 on this CPU (AVX2, no bf16 instructions) runs about 10x slower than fp32; "
                      "drop --amp on it"] if warned else [])


def test_cpu_bf16_support_names_the_capability_and_the_bf16_instructions(monkeypatch):
    checks = load_preflight("preflight_checks")
    kind, words = checks.cpu_bf16_support()
    assert kind in ("native", "avx512", "none")
    assert words.startswith(torch.backends.cpu.get_cpu_capability())
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: True)
    assert checks.cpu_bf16_support() == (
        "native", f"{torch.backends.cpu.get_cpu_capability()}, bf16 instructions (AVX512_BF16 and AMX)")
