"""The checks of tools/preflight.py that need torch, one per process: `python tools/preflight_checks.py CHECK
CONFIG_JSON` (CHECK: environment, numerics, resume, torchrun) prints each row as soon as it knows it, as a line
`PREFLIGHT {"check", "figure", "verdict", "why", ...}` (verdict: pass, fail or skipped; the other keys: the
numbers preflight.py decides with). Checks write under TMPDIR, which preflight.py removes at its end."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from common import ROOT, load_folder

NUM_CLASSES = 100  # the numerics' random CIFAR-100-shaped batches
# Relative difference of the first step's loss from IEEE fp32's that a setting may have: another kernel order for
# fp32 layouts and compile, TF32's 10-bit input mantissa, the 8-bit (bf16) or 11-bit (fp16) one of --amp's activations.
LOSS_TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 1e-2, "fp16": 1e-2}
EXTRA_STEPS = 3  # steps after the first, each on another batch: all must stay finite
# Resume and torchrun train a small pair on main.py's synthetic dataset (10 classes).
SMALL = ["--dataset", "synthetic", "--depth", "16", "--width", "1", "--batch_size", "8"]
# torchrun's update (one step) against one process's, relative: float rounding in another order.
UPDATE_TOLERANCE = {"cpu": 1e-3, "cuda": 1e-2}


def emit(check, figure, verdict, why="", **data):
    print("PREFLIGHT " + json.dumps({"check": check, "figure": figure, "verdict": verdict, "why": why, **data}),
          flush=True)


# --- environment ---------------------------------------------------------------------------------

def environment(config):
    nccl = read_or_dash(lambda: ".".join(map(str, torch.cuda.nccl.version())))
    emit("environment: software", f"torch {torch.__version__}, CUDA {torch.version.cuda or '-'}, cuDNN "
         f"{torch.backends.cudnn.version() or '-'}, NCCL {nccl}, Triton {read_or_dash(lambda: version('triton'))}",
         "pass")
    bf16_kind, bf16_words = cpu_bf16_support()
    cpu = read_or_dash(lambda: next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                    if line.startswith("model name")))
    emit("environment: CPU", f"{cpu}, {os.cpu_count()} cores, {bf16_words}", "pass", bf16=bf16_kind != "none")
    if not torch.cuda.is_available():
        return emit("environment: GPUs", "none", "skipped", "no CUDA GPU visible", gpus=[])
    gpus = [torch.cuda.get_device_properties(index) for index in range(torch.cuda.device_count())]
    names = ", ".join(f"{gpu.name} ({gpu.total_memory / 2 ** 30:.1f} GiB, sm {gpu.major}.{gpu.minor})" for gpu in gpus)
    driver = read_or_dash(lambda: subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                                 capture_output=True, text=True, timeout=30).stdout.split()[0])
    # TF32 tensor cores came with Ampere (sm 8.0), as bf16 ones did; emulated bf16 is no speed setting.
    emit("environment: GPUs", f"{len(gpus)}: {names}; driver {driver}", "pass",
         gpus=[{"name": gpu.name, "memory": gpu.total_memory} for gpu in gpus],
         bf16=torch.cuda.is_bf16_supported(including_emulation=False), tf32=gpus[0].major >= 8)


def read_or_dash(read):  # no NCCL in this build, no Triton, no nvidia-smi, no /proc
    try:
        return read()
    except Exception:
        return "-"


def cpu_bf16_support():
    """(kind, words): 'native' (AVX512_BF16 or AMX instructions), 'avx512' (oneDNN emulates bf16) or 'none'."""
    capability = torch.backends.cpu.get_cpu_capability()
    native = [name for name, probe in (("AVX512_BF16", torch.cpu._is_avx512_bf16_supported),
                                       ("AMX", torch.cpu._is_amx_tile_supported)) if probe()]
    if native:
        return "native", f"{capability}, bf16 instructions ({' and '.join(native)})"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "avx512", f"{capability}, bf16 emulated on AVX-512 by oneDNN (no bf16 instructions)"
    return "none", f"{capability}, no bf16 instructions"


# --- numerics ------------------------------------------------------------------------------------

def numerics(config):
    """One SGD step of the freshly initialised pair on one batch in each setting of config["settings"]
    ({name: main.py flags}) against IEEE fp32's loss from the same initialisation on the same batch,
    then EXTRA_STEPS steps that must stay finite. A compiled setting's row counts the graphs Dynamo
    compiled and the seconds of its first step, the compile included."""
    from torch._dynamo.utils import counters
    folder = load_folder(config["folder"])
    # Dynamo imports the modules of the code it traces by their names (torch 2.11), as main.py has them.
    sys.modules.update(vars(folder))
    dataset, distributed, hardware, main = folder.dataset, folder.distributed, folder.hardware, folder.main
    torch.set_num_threads(config["nthread"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = dataset.random_image_data(config["batch_size"] * (1 + EXTRA_STEPS), NUM_CLASSES, device, seed=1)
    batches = list(dataset.train_batches(data, config["batch_size"], seed=1, epoch=1))
    reference = None
    for name, flags in {"fp32": [], **config["settings"]}.items():
        # Each step is built just before it trains: building sets the process's fp32 precision (TF32 or not).
        opt = folder.options.parse_options(["--depth", str(config["depth"]), "--width", str(config["width"]),
                                  "--batch_size", str(config["batch_size"]), *flags])
        step = main.build_training_step(opt, NUM_CLASSES, device, distributed.Group())
        optimizer = main.create_optimizer(opt, step.parameters(), opt.lr)
        scale = step.scaler.get_scale() if step.scaler.is_enabled() else None
        graphs, start = counters["stats"]["unique_graphs"], time.perf_counter()
        loss = float(sum(term.float() for term in step.train(*batches[0], optimizer, opt.kd_weight)[2].values()))
        hardware.synchronize(device)
        first_seconds, graphs = time.perf_counter() - start, counters["stats"]["unique_graphs"] - graphs
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in step.parameters() if p.grad is not None)
        # fp16's loss scale starts high on purpose: a first step whose gradients overflow is skipped
        # and the scale halved, as designed; the later steps must then be finite.
        skipped = scale is not None and step.scaler.get_scale() < scale
        later = [float(sum(term.float() for term in step.train(*batch, optimizer, opt.kd_weight)[2].values()))
                 for batch in batches[1:]]
        reference = loss if reference is None else reference
        if name not in config["settings"]:
            continue  # the reference of the others only
        dtype = name.split("+")[0]
        difference = abs(loss - reference) / abs(reference)
        problems = ([f"loss {loss:.5g} is {difference:.1e} from fp32's {reference:.5g} (tolerance "
                     f"{LOSS_TOLERANCE[dtype]:g})"] if not difference <= LOSS_TOLERANCE[dtype] else [])
        problems += [] if grads_finite or skipped else ["a gradient of the first step is not finite"]
        problems += [] if all(map(torch.isfinite, torch.tensor(later))) else [f"a later loss is not finite: {later}"]
        figure = ("IEEE fp32 (TF32 off), the reference: " if name == "fp32" else "") + (
            f"first-step loss {loss:.5f} (fp32 {reference:.5f}, rel. diff {difference:.1e} <= "
            f"{LOSS_TOLERANCE[dtype]:g}), gradients " + ("overflowed at the first loss scale: step skipped, as designed"
                                                         if skipped else "finite") + f", {len(later)} more steps finite"
            + (f"; first step {first_seconds:.1f} s, {graphs} graph(s) compiled" if opt.compile else ""))
        emit(f"numerics {config['folder']}/ {name}", "; ".join(problems) or figure, "fail" if problems else "pass",
             setting=name, first_seconds=first_seconds, graphs=graphs)


# --- resume and torchrun: main.py as a user runs it -------------------------------------------------

def main_py(config, save, *flags):
    return [sys.executable, str(ROOT / "wrn" / "main.py"), "--save", str(save), "--nthread", str(config["nthread"]),
            *SMALL, *flags]


def finish(process):
    output, _ = process.communicate()
    lines = [line for line in (output or "").splitlines() if line.strip()]
    return process.returncode, lines[-1] if lines else "no output"


def start(command):
    return subprocess.Popen(command, cwd=ROOT / "wrn", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def weights(save):
    state = torch.load(Path(save) / "checkpoint.pt", map_location="cpu", weights_only=True)
    return [{key: value.float() for key, value in state[net].items() if value.is_floating_point()}
            for net in ("net1", "net2")]


def resume(config):
    """SIGTERM inside the run's one epoch, --resume, and the final weights against an uninterrupted
    run's (both --deterministic): bit for bit on a CPU; on a GPU the row says how far apart they are."""
    device = config["device"]
    flags = ["--subset", "64", "--epochs", "1", "--deterministic", "--checkpoint_every", "1",
             *(["--gpu_id", ""] if device == "cpu" else [])]  # on a GPU: the first visible one
    work = Path(tempfile.mkdtemp(prefix="resume_"))
    reference, stopped = (start(main_py(config, work / name, *flags)) for name in ("reference", "stopped"))
    while stopped.poll() is None and not (work / "stopped" / "checkpoint.pt").exists():
        time.sleep(0.01)
    stopped.send_signal(signal.SIGTERM)
    (code, last), (reference_code, reference_last) = finish(stopped), finish(reference)
    state = torch.load(work / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True) if code == 143 else {}
    if reference_code != 0 or code != 143 or state.get("epoch") != 0:
        why = (f"the uninterrupted run: {reference_last}" if reference_code != 0 else
               f"SIGTERM in epoch 1 gave exit code {code} and a checkpoint after epoch {state.get('epoch')} "
               f"(expected 143, inside epoch 1): {last}")
        return emit("interrupt and resume", "", "fail", why)
    code, last = finish(start(main_py(config, work / "stopped", *flags, "--resume")))
    if code != 0:
        return emit("interrupt and resume", "", "fail", f"the resumed run: {last}")
    difference = max(float((a[key] - b[key]).abs().max()) for a, b in zip(weights(work / "reference"),
                                                                          weights(work / "stopped")) for key in a)
    exact = difference == 0  # required on a CPU; how exact --deterministic is on a GPU is what the row says there
    emit("interrupt and resume", f"stopped at epoch 1 step {state['step']} by SIGTERM (exit code 143), resumed: final "
         f"weights {'bit-exact' if exact else f'differ by up to {difference:.1e}'} (--deterministic)",
         "pass" if exact or device == "cuda" else "fail", "" if exact or device == "cuda" else "not bit-exact on a CPU")


def torchrun(config):
    """2 processes under torchrun with --sync_bn make one step's update as 1 process does: NCCL on 2
    GPUs, else gloo on the CPU (2 NCCL ranks cannot share one GPU)."""
    nccl = config["device"] == "cuda" and config["gpus"] >= 2
    work = Path(tempfile.mkdtemp(prefix="torchrun_"))
    flags = ["--subset", "8", "--epochs", "1", "--sync_bn"]  # one step of one batch
    flags += [] if nccl else ["--gpu_id", ""]  # with NCCL: the first visible GPU, the first two under torchrun
    single = start(main_py(config, work / "single", *flags))
    ranks = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   *main_py(config, work / "ranks", *flags)[1:]])
    for name, (code, last) in (("1 process", finish(single)), ("2 processes", finish(ranks))):
        if code != 0:
            return emit("torchrun", "", "fail", f"{name}: exit code {code}: {last}")
    distributed, main = load_folder("wrn").distributed, load_folder("wrn").main
    opt = load_folder("wrn").options.parse_options([*SMALL, "--subset", "8"])
    initial = [{key: value.float() for key, value in net.state_dict().items() if value.is_floating_point()}
               for net in main.build_training_step(opt, 10, torch.device("cpu"), distributed.Group()).nets]
    worst = 0.0
    for before, one, two in zip(initial, weights(work / "single"), weights(work / "ranks")):
        one, two = (torch.cat([(after[key] - before[key]).flatten() for key in before]) for after in (one, two))
        worst = max(worst, float((two - one).norm() / one.norm()))
    tolerance = UPDATE_TOLERANCE["cuda" if nccl else "cpu"]
    figure = (f"2 processes ({'nccl' if nccl else 'gloo'}, --sync_bn) against 1 process, one step: update rel. diff "
              f"{worst:.1e} (<= {tolerance:g})" + ("" if nccl or config["device"] == "cpu" else
                                                    "; NCCL not covered: 2 NCCL ranks cannot share this one GPU"))
    emit("torchrun", figure, "pass" if worst <= tolerance else "fail",
         "" if worst <= tolerance else "2 processes update the networks otherwise than 1 process")


if __name__ == "__main__":
    {"environment": environment, "numerics": numerics, "resume": resume, "torchrun": torchrun}[sys.argv[1]](
        json.loads(sys.argv[2]))
