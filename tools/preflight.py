"""Before the table's 30 runs: check that this machine runs every path of the code right, and project their hours.

    python tools/preflight.py            # on a GPU machine: the real WRN-28-10 pairs, about 8 minutes on one H100
    python tools/preflight.py --quick    # fewer settings and steps (below); on a CPU, tiny models, a few minutes
    python tools/preflight.py --cpu      # ignore the GPUs: check the CPU paths (gloo, CPU bf16, ...)

Each check runs in a process of its own with a time limit (a hung NCCL or compile cannot hang the
preflight; a check stopped at its limit fails with the rows it finished), in this order:

  1. environment   torch / CUDA / cuDNN / NCCL / Triton versions; the GPUs (name, memory, driver);
                   the CPU, its capability (AVX2 / AVX512 / ...) and whether it has bf16 instructions
  2. numerics      per folder, one SGD step of the pair on one batch from one initialisation in
                   fp32, bf16 and fp16, each with and without --channels_last and --compile: the
                   loss within 1e-3 (fp32 layouts, compile) or 1e-2 (bf16, fp16) of fp32's relative
                   to it, every gradient finite, then 3 more steps with a finite loss
  3. speed         tools/benchmark.py's table (fewer steps), for the settings that passed 2; the
                   fastest real-epoch speed is the setting chosen for each folder
  4. projection    with that setting, one real training epoch of each method (ind, dml, dcm:
                   dataset.py's batches of an in-memory CIFAR-shaped set, training.train_epoch) and
                   one test pass: img/s, minutes per 200-epoch run, hours for the default sweep
                   (2 folders x 3 methods x 5 seeds) on this machine's GPUs, one run per GPU
  5. torchrun      NCCL on GPUs, gloo on a CPU: 2 processes with --sync_bn train what 1 process
                   trains (where 2 GPUs exist, and always on a CPU); with 1 GPU, an NCCL process
                   group with 1 process and one epoch under torchrun
  6. resume        SIGTERM in the middle of an epoch, then --resume: the final weights equal the
                   uninterrupted run's, bit for bit on a CPU (--deterministic); on CUDA within what
                   two uninterrupted runs differ by (kernels without a deterministic backward)
  7. memory        (GPUs) peak GPU memory per folder and method at batch 128, measured during the
                   projection's epochs, and whether 2 runs fit on one GPU (tools/sweep.py --jobs_per_gpu 2)

It ends with one table (check, figure, verdict: pass / FAIL / skipped and why) and the recommended
command for this machine; the exit code is 1 if any check failed. Nothing is written to the
repository: the checks work in temporary folders and remove them.

Sizes and time limits (seconds; upper bounds that catch a hang, not the expected times) per mode:
  GPU           WRN-28-10 pairs, batch 128; numerics 6 eager + 6 compiled settings (limits 180 + 900
                per folder); speed: tools/benchmark.py's default rows, 10 steps (300 per row);
                projection: 50,000-image epochs (600 per folder); torchrun and resume on WRN-16-4
                pairs in wrn/ (300 each)
  GPU --quick   drops the compiled numerics except bf16+cl+compile (fp16+cl+compile on GPUs without
                bf16), times only fp32, bf16+cl and bf16+cl+compile, 5 steps, 10,000-image epochs
                (limits: compiled numerics 300, projection 300 per folder)
  CPU           WRN-16-1 pairs, batch 32; every numerics setting (compile takes minutes on a CPU);
                projection on 1,024-image epochs
  CPU --quick   WRN-16-1 pairs; drops --compile everywhere (it takes minutes to compile on a CPU;
                tests/test_speed.py covers it), fp16 (no fp16 arithmetic on a CPU: emulated, minutes
                for the MobileNet) and the memory check (no GPU); numerics at batch 4, speed rows
                fp32, fp32+cl, bf16+cl (wrn/) and fp32, bf16+cl (wrn_mobi/) at batch 8 with 2 steps,
                projection on 32-image epochs at batch 16, torchrun and resume on 64 images; about
                2 minutes on an idle 2-core CPU with --nthread 1 (2 to 3 minutes of CPU time), several
                times that on a busy one (14 minutes at load averages of 10 to 15)
`--depth` and `--width` change the WRN of numerics, speed and projection. On a CPU the projection
is that of the model it measured, not of WRN-28-10: the table says which.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchmark

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tools" / "preflight_checks.py"
FOLDERS = ("wrn", "wrn_mobi")
METHODS = ("ind", "dml", "dcm")
SEEDS, EPOCHS = 5, 200  # the default sweep: 2 folders x 3 methods x 5 seeds of 200 epochs
EAGER = ["fp32", "fp32+cl", "bf16", "bf16+cl", "fp16", "fp16+cl"]
COMPILED = [setting + "+compile" for setting in EAGER]
GIB = 2 ** 30
CUDA_CONTEXT = 1 * GIB  # what a process holds on a GPU besides its tensors' caching allocator, about

# What each mode runs: model sizes, settings, steps, set sizes, and each check's time limit (s).
PLANS = {
    ("cuda", False): dict(depth=28, width=10, batch_size=128, numerics_batch=128, eager=EAGER, compiled=COMPILED,
                          speed=None, steps=10, images=50_000, test_images=10_000, projection_batch=128,
                          small=dict(depth=16, width=4, batch_size=128, train_images=1024, test_images=512),
                          limits=dict(environment=60, numerics=180, compiled=900, speed_row=300, projection=600,
                                      torchrun=300, resume=300)),
    ("cuda", True): dict(depth=28, width=10, batch_size=128, numerics_batch=128, eager=EAGER,
                         compiled=["bf16+cl+compile"], steps=5,
                         speed=dict.fromkeys(FOLDERS, ["fp32", "bf16+cl", "bf16+cl+compile"]),
                         images=10_000, test_images=10_000, projection_batch=128,
                         small=dict(depth=16, width=4, batch_size=128, train_images=1024, test_images=512),
                         limits=dict(environment=60, numerics=180, compiled=300, speed_row=300, projection=300,
                                     torchrun=300, resume=300)),
    ("cpu", False): dict(depth=16, width=1, batch_size=32, numerics_batch=32, eager=EAGER, compiled=COMPILED,
                         speed=None, steps=5, images=1024, test_images=256, projection_batch=128,
                         small=dict(depth=16, width=1, batch_size=32, train_images=256, test_images=64),
                         limits=dict(environment=60, numerics=300, compiled=1200, speed_row=300, projection=900,
                                     torchrun=300, resume=300)),
    ("cpu", True): dict(depth=16, width=1, batch_size=8, numerics_batch=4, eager=["fp32", "fp32+cl", "bf16", "bf16+cl"],
                        compiled=[], speed={"wrn": ["fp32", "fp32+cl", "bf16+cl"], "wrn_mobi": ["fp32", "bf16+cl"]},
                        steps=2, images=32, test_images=32, projection_batch=16,
                        small=dict(depth=16, width=1, batch_size=16, train_images=64, test_images=32),
                        # On a CPU the limits only catch a hang: a CPU shared with other work is slow.
                        limits=dict(environment=300, numerics=600, compiled=0, speed_row=300, projection=600,
                                    torchrun=600, resume=600)),
}


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer settings, steps and images (see below)")
    parser.add_argument("--cpu", action="store_true", help="check the CPU even where GPUs are visible")
    parser.add_argument("--depth", type=int, help="WRN depth of numerics, speed and projection (default: the mode's)")
    parser.add_argument("--width", type=int, help="WRN width of numerics, speed and projection (default: the mode's)")
    parser.add_argument("--nthread", default=4, type=int, help="CPU threads of each check (capped at the cores)")
    opt = parser.parse_args(argv)
    if opt.depth is not None and (opt.depth < 16 or (opt.depth - 4) % 6):
        parser.error(f"--depth {opt.depth}: DCM's auxiliary classifiers need a WRN depth 6n+4 of at least 16")
    if (opt.width is not None and opt.width <= 0) or opt.nthread <= 0:
        parser.error("--width and --nthread must be positive")
    return opt


# --- running one check --------------------------------------------------------------------------

def run_check(name, config, limit, environment):
    """The rows a check reported, in its own process stopped (with anything it started) at `limit`
    seconds; a row saying what went wrong when it ended without its results."""
    started = time.time()
    # The check's temporary files go to a folder of its own, removed whatever happens to the check.
    scratch = tempfile.mkdtemp(prefix="preflight_")
    process = subprocess.Popen([sys.executable, str(CHECKS), name, json.dumps(config)], cwd=ROOT,
                               env={**os.environ, **environment, "PYTHONUNBUFFERED": "1", "TMPDIR": scratch},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit)
        problem = None if process.returncode == 0 else f"exit code {process.returncode}: {last_line(stderr)}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        problem = f"no result within its time limit of {limit} s"
    except KeyboardInterrupt:  # the check runs in its own session, out of reach of the terminal's Ctrl-C
        os.killpg(process.pid, signal.SIGKILL)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [json.loads(line[len("PREFLIGHT "):]) for line in stdout.splitlines() if line.startswith("PREFLIGHT ")]
    if problem:
        rows.append({"check": check_title(name, config), "figure": "", "verdict": "fail", "why": problem, "data": {}})
    print(f"  {check_title(name, config)}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def check_title(name, config):
    folder = f" {config['folder']}/" if "folder" in config else ""
    compiled = name == "numerics" and any("compile" in setting for setting in config.get("settings", []))
    return f"{name}{folder}" + (" (compiled)" if compiled else "")


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def skipped(check, why):
    return {"check": check, "figure": "", "verdict": "skipped", "why": why, "data": {}}


# --- the checks in order ------------------------------------------------------------------------------

def speed_rows(opt, plan, folder, gpu_id, passed):
    """tools/benchmark.py's rows for the settings whose numerics passed; each row a process of its own."""
    settings = (plan["speed"] or benchmark.DEFAULT_SETTINGS)[folder]
    rows, limit = [], plan["limits"]["speed_row"]
    bench_opt = benchmark.parse_options(["--gpu_id", gpu_id, "--nthread", str(opt.nthread), "--depth",
                                         str(plan["depth"]), "--width", str(plan["width"]), "--batch_size",
                                         str(plan["batch_size"]), "--steps", str(plan["steps"]), "--timeout", str(limit)])
    for setting in settings:
        title = f"speed {folder}/ {setting}"
        if setting not in passed:
            rows.append(skipped(title, "its numerics check did not pass"))
            continue
        started = time.time()
        cells, error = benchmark.run_row(bench_opt, folder, setting)
        print(f"  {title}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
        if error:
            rows.append({"check": title, "figure": "", "verdict": "fail", "why": error, "data": {}})
            continue
        epoch_speed = float(cells["img/s"]) * float(cells["pipeline efficiency"])
        figure = (f"{cells['img/s']} img/s bare step, {epoch_speed:.1f} img/s epoch code; {cells['TFLOP/s']} TFLOP/s "
                  f"({cells['% of matmul peak']}); peak {cells['peak memory']}")
        rows.append({"check": title, "figure": figure, "verdict": "pass", "why": "",
                     "data": {"setting": setting, "epoch_speed": epoch_speed}})
    return rows


def chosen_setting(rows):
    """The passing speed row with the fastest real-epoch speed, or None."""
    timed = [row["data"] for row in rows if row["verdict"] == "pass"]
    return max(timed, key=lambda data: data["epoch_speed"])["setting"] if timed else None


def projection_summary(rows, devices, device_words):
    """The default sweep's hours on this machine: each run at its measured speed, one per device."""
    minutes = {(row["data"]["folder"], row["data"]["method"]): row["data"]["minutes"] for row in rows
               if row["verdict"] == "pass" and "minutes" in row["data"]}
    if len(minutes) < len(FOLDERS) * len(METHODS):
        return skipped("projection: default sweep", "a projection above did not finish")
    hours = SEEDS * sum(minutes.values()) / 60
    return {"check": "projection: default sweep", "verdict": "pass", "why": "", "data": {},
            "figure": f"{len(FOLDERS) * len(METHODS) * SEEDS} runs, {hours:.1f} run-hours: about "
                      f"{hours / devices:.1f} h on {device_words} (one run per {'GPU' if devices > 1 else 'device'}"
                      f"{' at a time' if devices == 1 else ''})"}


def memory_rows(projection, gpu_memory):
    rows = []
    for row in projection:
        data = row["data"]
        if row["verdict"] != "pass" or "memory" not in data:
            continue
        need = data["reserved"] + CUDA_CONTEXT
        fits = 2 * need <= gpu_memory
        rows.append({"check": f"memory {data['folder']}/ {data['method']}", "verdict": "pass", "why": "", "data": data,
                     "figure": f"peak {data['memory'] / GIB:.1f} GiB allocated, {data['reserved'] / GIB:.1f} GiB "
                               f"reserved at batch 128, of {gpu_memory / GIB:.0f} GiB: 2 runs "
                               f"{'fit' if fits else 'do not fit'} on one GPU"
                               + (" (tools/sweep.py --jobs_per_gpu 2)" if fits else "")})
    return rows


def recommended_command(chosen, device, gpu_ids, depth=28, width=10):
    """The tools/sweep.py command(s) of the default sweep with each folder's chosen setting (and the
    measured WRN where it is not the table's WRN-28-10)."""
    gpus = ",".join(gpu_ids) if device == "cuda" else "''"
    model = f" --depth {depth} --width {width}" if (depth, width) != (28, 10) else ""
    commands = []
    if len(set(chosen.values())) == 1:
        groups = [(None, next(iter(chosen.values())))]
    else:
        groups = list(chosen.items())
    for folder, setting in groups:
        folders = f" --folders {folder}" if folder else ""
        flags = " ".join(benchmark.SETTINGS.get(setting) or [])
        commands.append(f"python tools/sweep.py{folders} --gpus {gpus} --dataroot DATA{model} {flags}".rstrip())
    return commands


def main(argv=None):
    opt = parse_options(argv)
    started = time.time()
    hide_gpus = {"CUDA_VISIBLE_DEVICES": ""} if opt.cpu else {}
    base = {"nthread": opt.nthread}
    print("preflight: every check in its own process, with a time limit", file=sys.stderr, flush=True)
    rows = run_check("environment", {**base, "device": "cpu"}, PLANS["cpu", True]["limits"]["environment"], hide_gpus)
    gpus = next((row["data"].get("gpus", []) for row in rows if row["check"] == "environment: GPUs"), [])
    device = "cuda" if gpus else "cpu"
    plan = dict(PLANS[device, opt.quick])
    plan["depth"], plan["width"] = opt.depth or plan["depth"], opt.width or plan["width"]
    limits = plan["limits"]
    if gpus and not next(row["data"]["bf16"] for row in rows if row["check"] == "environment: GPUs"):
        # Volta, Turing: no bf16 tensor cores, fp16 with loss scaling is their fast setting.
        plan["compiled"] = sorted(set(plan["compiled"]) | {"fp16+cl+compile"})
        plan["speed"] = {folder: [*(plan["speed"] or benchmark.DEFAULT_SETTINGS)[folder], "fp16+cl+compile"]
                         for folder in FOLDERS}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu_ids = ([gpu.strip() for gpu in visible.split(",") if gpu.strip()] if visible else
               [str(index) for index in range(len(gpus))])[:len(gpus)]
    # main.py's --gpu_id sets CUDA_VISIBLE_DEVICES; the checks' own processes see the first GPU.
    gpu_id = gpu_ids[0] if gpus else ""
    environment = {**hide_gpus, **({"CUDA_VISIBLE_DEVICES": gpu_id} if gpus else {})}
    base.update(device=device, depth=plan["depth"], width=plan["width"])

    chosen = {}
    for folder in FOLDERS:
        numerics = []
        for settings, limit in ((plan["eager"], limits["numerics"]), (plan["compiled"], limits["compiled"])):
            if settings:
                numerics += run_check("numerics", {**base, "folder": folder, "settings": settings,
                                                   "batch_size": plan["numerics_batch"]}, limit, environment)
        if not plan["compiled"]:
            numerics.append(skipped(f"numerics {folder}/ +compile", "--quick on a CPU (compiling takes minutes there)"))
        if "fp16" not in plan["eager"]:
            numerics.append(skipped(f"numerics {folder}/ fp16", "--quick on a CPU (no fp16 arithmetic there: "
                                                               "emulated, minutes for the MobileNet)"))
        rows += numerics
        passed = {row["data"]["setting"] for row in numerics if row["verdict"] == "pass" and "setting" in row["data"]}
        speed = speed_rows(opt, plan, folder, gpu_id, passed)
        rows += speed
        chosen[folder] = chosen_setting(speed) or "fp32"
        if not chosen_setting(speed):
            rows.append(skipped(f"speed {folder}/: chosen setting", "no speed row passed: fp32 assumed"))

    projection = []
    for folder in FOLDERS:
        projection += run_check("projection", {**base, "folder": folder, "setting": chosen[folder],
                                               "methods": list(METHODS), "images": plan["images"],
                                               "test_images": plan["test_images"],
                                               "batch_size": plan["projection_batch"]}, limits["projection"],
                                environment)
    for row in projection:
        if row["verdict"] == "pass":
            model = f"WRN-{plan['depth']}-{plan['width']}"
            row["figure"] += (f" ({chosen[row['data']['folder']]}, {model} "
                              f"{'pair' if row['data']['folder'] == 'wrn' else '+ MobileNet'}, batch "
                              f"{plan['projection_batch']}, measured on {plan['images']:,} images)")
    rows += projection
    device_words = (f"{len(gpus)} x {gpus[0]['name']}" if gpus else "this CPU")
    rows.append(projection_summary(projection, max(len(gpus), 1), device_words))

    small = {**base, **plan["small"], "gpus": len(gpus), "gpu_ids": gpu_ids}
    torchrun_environment = {**hide_gpus, **({"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)} if gpus else {})}
    rows += run_check("torchrun", {**small, "epochs": 1, "timeout": limits["torchrun"] - 10}, limits["torchrun"],
                      torchrun_environment)
    rows += run_check("resume", {**small, "epochs": 2, "timeout": limits["resume"] - 10}, limits["resume"],
                      torchrun_environment)
    if gpus:
        rows += memory_rows(projection, min(gpu["memory"] for gpu in gpus))
    else:
        rows.append(skipped("memory", "no CUDA GPU (a CPU run's peak RSS is in the speed rows)"))

    failed = [row for row in rows if row["verdict"] == "fail"]
    print_report(rows, plan, device, opt, time.time() - started, recommended_command(chosen, device, gpu_ids, plan["depth"], plan["width"]))
    return 1 if failed else 0


def print_report(rows, plan, device, opt, seconds, commands):
    mode = f"{'GPU' if device == 'cuda' else 'CPU'}{' --quick' if opt.quick else ''}"
    print(f"Preflight ({mode}, WRN-{plan['depth']}-{plan['width']} pairs; torchrun and resume on "
          f"WRN-{plan['small']['depth']}-{plan['small']['width']}) on {time.strftime('%Y-%m-%d')}: "
          f"{seconds:.0f} s in all.\n")
    print("| check | figure | verdict |\n|---|---|---|")
    for row in rows:
        verdict = {"pass": "pass", "fail": "FAIL", "skipped": "skipped"}[row["verdict"]]
        verdict += f": {row['why']}" if row["why"] else ""
        print(f"| {row['check']} | {row['figure'].replace('|', '/')} | {verdict.replace('|', '/')} |")
    failed = sum(row["verdict"] == "fail" for row in rows)
    print(f"\n{failed} check(s) failed." if failed else "\nEvery check passed.")
    print("Recommended command for this machine (the fastest setting that passed; --amp changes the numerics, "
          "see README's Speed section):")
    for command in commands:
        print(f"  {command}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\npreflight: interrupted; the check that was running is stopped", file=sys.stderr)
        sys.exit(130)
