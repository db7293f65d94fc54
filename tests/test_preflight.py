"""tools/preflight.py: `--quick` on this CPU end to end (every check runs or says why not, the
table's verdicts, the exit code, nothing written), a check that hangs or breaks fails its row,
and main.py's one-line warning about --amp bf16 on a CPU without bf16 support. No test is timed.
"""
import importlib.util
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


def table_rows(stdout):
    """{check: (figure, verdict)} of the preflight's Markdown table."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| check |"):
            check, figure, verdict = (cell.strip() for cell in line.strip("|").split(" | "))
            rows[check] = (figure, verdict)
    return rows


@pytest.fixture(scope="module")
def quick_cpu_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preflight")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "preflight.py"), "--quick", "--cpu", "--nthread", "1"],
                            cwd=folder, capture_output=True, text=True, timeout=900)
    return folder, result


def test_quick_preflight_on_a_cpu_passes_every_check_that_runs_there(quick_cpu_run):
    folder, result = quick_cpu_run
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    verdicts = {check: verdict.split(":")[0] for check, (_, verdict) in rows.items()}
    assert "FAIL" not in verdicts.values(), result.stdout
    expected_passes = ["environment: software", "environment: CPU", "projection: default sweep", "torchrun",
                       "interrupt and resume"]
    for folder_name in ("wrn", "wrn_mobi"):
        expected_passes += [f"numerics {folder_name}/ {setting}" for setting in
                            ("fp32", "fp32+cl", "bf16", "bf16+cl")]
    expected_passes += [f"speed wrn/ {setting}" for setting in ("fp32", "fp32+cl", "bf16+cl")]
    expected_passes += [f"speed wrn_mobi/ {setting}" for setting in ("fp32", "bf16+cl")]
    for folder_name in ("wrn", "wrn_mobi"):
        expected_passes += [f"projection {folder_name}/ {method}" for method in ("ind", "dml", "dcm")]
    assert {check: verdicts.get(check) for check in expected_passes} == {check: "pass" for check in expected_passes}
    # What a CPU cannot check says why.
    assert rows["environment: GPUs"][1] == "skipped: no CUDA GPU visible"
    assert rows["memory"][1].startswith("skipped: no CUDA GPU")
    assert rows["numerics wrn/ +compile"][1].startswith("skipped: --quick on a CPU")
    assert rows["numerics wrn_mobi/ fp16"][1].startswith("skipped: --quick on a CPU (no fp16 arithmetic")
    # The figures a user plans with.
    assert "torch " in rows["environment: software"][0] and "bf16" in rows["environment: CPU"][0]
    assert "min per 200-epoch run" in rows["projection wrn/ dcm"][0] and "WRN-16-1" in rows["projection wrn/ dcm"][0]
    assert "30 runs" in rows["projection: default sweep"][0] and " h on this CPU" in rows["projection: default sweep"][0]
    assert "gloo" in rows["torchrun"][0] and "bit-exact" in rows["interrupt and resume"][0]
    assert "Every check passed." in result.stdout
    assert "python tools/sweep.py --gpus '' --dataroot DATA --depth 16 --width 1" in result.stdout
    assert list(folder.iterdir()) == [], "the preflight must not write where it is started"


def test_a_check_past_its_time_limit_or_broken_fails_its_row():
    preflight = load_preflight()
    row, = preflight.run_check("environment", {"nthread": 1, "device": "cpu"}, 0.01, {"CUDA_VISIBLE_DEVICES": ""})
    assert row["verdict"] == "fail" and "no result within its time limit" in row["why"]
    row, = preflight.run_check("numerics", {"nthread": 1}, 60, {"CUDA_VISIBLE_DEVICES": ""})  # a config without a folder
    assert row["verdict"] == "fail" and row["why"].startswith("exit code 1: KeyError")


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


def test_gpu_rows_project_the_sweep_per_gpu_and_say_whether_two_runs_fit():
    # The arithmetic of the GPU-only rows, on measurements as a GPU's projection check reports them.
    preflight = load_preflight()
    gib = 2 ** 30
    projection = [{"check": f"projection {folder}/ {method}", "verdict": "pass", "figure": "", "why": "",
                   "data": {"folder": folder, "method": method, "minutes": 60.0, "memory": 10 * gib,
                            "reserved": (12 if folder == "wrn" else 40) * gib}}
                  for folder in ("wrn", "wrn_mobi") for method in ("ind", "dml", "dcm")]
    summary = preflight.projection_summary(projection, 2, "2 x NVIDIA H100 80GB HBM3")
    assert summary["verdict"] == "pass"
    assert summary["figure"].startswith("30 runs, 30.0 run-hours: about 15.0 h on 2 x NVIDIA H100 80GB HBM3")
    rows = {row["check"]: row["figure"] for row in preflight.memory_rows(projection, 80 * gib)}
    assert rows["memory wrn/ dcm"].endswith("2 runs fit on one GPU (tools/sweep.py --jobs_per_gpu 2)")
    assert rows["memory wrn_mobi/ dcm"].endswith("2 runs do not fit on one GPU")  # 2 x (40 + 1) GiB > 80 GiB
    assert preflight.projection_summary(projection[:-1], 2, "2 GPUs")["verdict"] == "skipped"
    assert preflight.recommended_command({"wrn": "bf16+cl+compile", "wrn_mobi": "bf16+cl+compile"}, "cuda",
                                         ["0", "1"]) == [
        "python tools/sweep.py --gpus 0,1 --dataroot DATA --amp bf16 --channels_last --compile"]
    assert preflight.recommended_command({"wrn": "bf16+cl+compile", "wrn_mobi": "fp32"}, "cuda", ["3"]) == [
        "python tools/sweep.py --folders wrn --gpus 3 --dataroot DATA --amp bf16 --channels_last --compile",
        "python tools/sweep.py --folders wrn_mobi --gpus 3 --dataroot DATA"]
