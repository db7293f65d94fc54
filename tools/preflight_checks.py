"""The checks of tools/preflight.py, one per process: `python tools/preflight_checks.py CHECK CONFIG_JSON`.

Each check prints its results as lines `PREFLIGHT {json}`, one per row of the preflight table, as
soon as it knows them: a check stopped at its time limit still reports the rows it finished. A row
is {"check", "figure", "verdict": "pass" | "fail" | "skipped", "why", "data"}; `data` holds the
numbers preflight.py decides with (img/s, peak memory, ...). Whatever a check writes goes to a
temporary folder that it removes; the repository is never written to.

The numerics, projection and memory figures come from the training code itself (main.py's
build_training_step and create_optimizer, training.train_epoch and evaluate, dataset.py's
batches); torchrun and resume run main.py as a user would.
"""
import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, TEST_IMAGES, EPOCHS, SEEDS = 50_000, 10_000, 200, 5  # CIFAR-100, the reference schedule, the table
NUM_CLASSES = 100
# Relative difference of the first step's loss from fp32's that a speed setting may have: float
# rounding in another kernel order (TF32 on a GPU) for fp32 layouts and compile, and the 8-bit
# (bf16) or 11-bit (fp16) mantissa of the activations under --amp.
LOSS_TOLERANCE = {"fp32": 1e-3, "bf16": 1e-2, "fp16": 1e-2}
EXTRA_STEPS = 3  # steps after the first, each on another batch: all must stay finite
# torchrun with --sync_bn against one process, at lr 1e-5 where the steps are well-conditioned
# (tests/test_distributed.py explains why): relative difference of each network's update.
UPDATE_TOLERANCE = {"cpu": 1e-3, "cuda": 1e-2}


def emit(check, figure, verdict, why="", **data):
    print("PREFLIGHT " + json.dumps({"check": check, "figure": figure, "verdict": verdict, "why": why, "data": data}),
          flush=True)


def setting_flags(setting):
    """main.py's flags of a setting name such as 'bf16+cl+compile'."""
    dtype, *extras = setting.split("+")
    return ((["--amp", dtype] if dtype != "fp32" else []) + (["--channels_last"] if "cl" in extras else [])
            + (["--compile"] if "compile" in extras else []))


def import_folder(folder):
    """wrn/'s or wrn_mobi/'s modules, imported by their plain names as main.py imports them."""
    sys.path.insert(0, str(ROOT / folder))
    import dataset
    import distributed
    import hardware
    import main
    import training
    return dataset, distributed, hardware, main, training


def training_device(config):
    torch.set_num_threads(min(config["nthread"], os.cpu_count() or 1))
    if config["device"] == "cuda":
        torch.backends.cudnn.benchmark = True  # as main.py does without --deterministic
        return torch.device("cuda", 0)
    return torch.device("cpu")


def device_seconds(device, work):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


# --- 1. environment -------------------------------------------------------------------------------

def environment(config):
    dataset, distributed, hardware, main, training = import_folder("wrn")
    versions = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda or '-'}",
                f"cuDNN {torch.backends.cudnn.version() or '-'}"]
    try:
        nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    except (AttributeError, RuntimeError):  # a build without NCCL
        nccl = None
    versions.append(f"NCCL {'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl or '-'}")
    try:
        import triton
        versions.append(f"Triton {triton.__version__}")
    except ImportError:
        versions.append("Triton -")
    emit("environment: software", ", ".join(versions), "pass")

    bf16_kind, bf16_words = hardware.cpu_bf16_support()
    cpu_model = cpu_model_name()
    emit("environment: CPU", f"{cpu_model}, {os.cpu_count()} cores, {bf16_words}", "pass",
         cpu_model=cpu_model, cpu_bf16=bf16_kind)

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            gpus.append({"name": properties.name, "memory": properties.total_memory,
                         "capability": f"{properties.major}.{properties.minor}"})
        driver = nvidia_driver()
        names = ", ".join(f"{gpu['name']} ({gpu['memory'] / 2 ** 30:.1f} GiB, sm {gpu['capability']})" for gpu in gpus)
        emit("environment: GPUs", f"{len(gpus)}: {names}; driver {driver}", "pass", gpus=gpus, driver=driver,
             bf16=hardware.cuda_bf16_support())
    else:
        emit("environment: GPUs", "none", "skipped", "no CUDA GPU visible", gpus=[])


def cpu_model_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def nvidia_driver():
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        return result.stdout.split()[0] if result.returncode == 0 and result.stdout.split() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


# --- 2. numerics of every speed setting -------------------------------------------------------------

def numerics(config):
    """One SGD step of the freshly initialised pair on one batch in every setting, against fp32's
    loss on the same batch from the same initialisation; then more steps that must stay finite."""
    dataset, distributed, hardware, main, training = import_folder(config["folder"])
    device = training_device(config)
    data = dataset.random_image_data(config["batch_size"] * (1 + EXTRA_STEPS), NUM_CLASSES, device, seed=1)
    batches = list(dataset.train_batches(data, config["batch_size"], seed=1, epoch=1))
    reference = None
    for setting in ["fp32", *(setting for setting in config["settings"] if setting != "fp32")]:
        opt = main.parse_options(["--depth", str(config["depth"]), "--width", str(config["width"]),
                                  "--batch_size", str(config["batch_size"]), *setting_flags(setting)])
        step = main.build_training_step(opt, NUM_CLASSES, device, distributed.Group())
        optimizer = main.create_optimizer(opt, step.parameters(), main.lr_at_epoch(opt, 1))
        initial_scale = step.scaler.get_scale() if step.scaler.is_enabled() else None
        first_seconds, terms = device_seconds(device, lambda: step.train(*batches[0], optimizer)[2])
        loss = float(sum(value.detach().float() for value in terms.values()))
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in step.parameters() if p.grad is not None)
        # fp16's loss scaler starts high on purpose: a first step whose gradients overflow is
        # skipped and the scale halved, as designed; the later steps must then be finite.
        scaler_skipped = initial_scale is not None and step.scaler.get_scale() < initial_scale
        later = [float(sum(v.detach().float() for v in step.train(images, targets, optimizer)[2].values()))
                 for images, targets in batches[1:1 + EXTRA_STEPS]]
        if setting == "fp32":  # the reference, computed first in every process
            reference = loss
            if "fp32" not in config["settings"]:
                continue
        dtype = setting.split("+")[0]
        difference = abs(loss - reference) / abs(reference)
        problems = ([f"loss {loss:.5g} is {difference:.1e} from fp32's {reference:.5g} (tolerance "
                     f"{LOSS_TOLERANCE[dtype]:g})"] if not difference <= LOSS_TOLERANCE[dtype] else [])
        problems += [] if grads_finite or scaler_skipped else ["a gradient of the first step is not finite"]
        problems += [] if all(np.isfinite(later)) else [f"a loss of steps 2-{1 + EXTRA_STEPS} is not finite: {later}"]
        figure = (f"first-step loss {loss:.5f} (fp32 {reference:.5f}, rel. diff {difference:.1e} <= "
                  f"{LOSS_TOLERANCE[dtype]:g}), gradients "
                  + (f"overflowed at loss scale {initial_scale:g}: step skipped by the scaler, as designed"
                     if scaler_skipped else "finite") + f", {EXTRA_STEPS} more steps finite"
                  + (f"; first step {first_seconds:.0f} s (compiling)" if "compile" in setting else ""))
        emit(f"numerics {config['folder']}/ {setting}", figure if not problems else "; ".join(problems),
             "fail" if problems else "pass", setting=setting, folder=config["folder"])
        del step, optimizer
        torch._dynamo.reset()  # every setting compiles afresh, as its own run would, within dynamo's cache limit
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --- 4 and 7. one real epoch per method: the projection, and the peak memory ------------------------

def projection(config):
    """img/s of one training epoch of each method through the real epoch code (dataset.py's
    augmentation on an in-memory CIFAR-shaped set, training.train_epoch), plus one evaluation pass
    over a test set; minutes of a 200-epoch run; the device's peak memory of each method."""
    dataset, distributed, hardware, main, training = import_folder(config["folder"])
    device = training_device(config)
    data = dataset.random_image_data(config["images"], NUM_CLASSES, device, seed=1)
    test = dataset.random_image_data(config["test_images"], NUM_CLASSES, device, seed=2)
    data.test_images, data.test_labels = test.train_images, test.train_labels
    batch = config["batch_size"]
    total = dataset.num_batches(config["images"], batch)
    for method in config["methods"]:
        opt = main.parse_options(["--depth", str(config["depth"]), "--width", str(config["width"]), "--method", method,
                                  "--batch_size", str(batch), *setting_flags(config["setting"])])
        step = main.build_training_step(opt, NUM_CLASSES, device, distributed.Group())
        optimizer = main.create_optimizer(opt, step.parameters(), main.lr_at_epoch(opt, 1))
        # Warm-up on every batch shape the epoch meets (full, last partial, evaluation): cuDNN's
        # algorithm search and compilation happen once per run, not once per epoch.
        warmup = list(itertools.islice(dataset.train_batches(data, batch, opt.seed, epoch=0), 1))
        if config["images"] % batch:
            warmup += dataset.train_batches(data, batch, opt.seed, epoch=0, first_batch=total - 1)
        training.train_epoch(step, optimizer, warmup, len(warmup), "warm-up")
        training.evaluate(step, dataset.test_batches(data, opt.eval_batch_size, 0, min(opt.eval_batch_size,
                                                                                       config["test_images"])))
        hardware.synchronize(device)
        hardware.reset_peak_memory(device)
        train_seconds, _ = device_seconds(device, lambda: training.train_epoch(
            step, optimizer, dataset.train_batches(data, batch, opt.seed, epoch=1), total, "epoch").loss())
        test_seconds, _ = device_seconds(device, lambda: training.evaluate(
            step, dataset.test_batches(data, opt.eval_batch_size)).loss())
        memory, memory_kind = hardware.peak_memory(device)
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else memory
        images_per_second = config["images"] / train_seconds
        # A real epoch: 50,000 training images at the measured rate, 10,000 test images at theirs.
        epoch_seconds = TRAIN_IMAGES / images_per_second + test_seconds * TEST_IMAGES / config["test_images"]
        minutes = EPOCHS * epoch_seconds / 60
        emit(f"projection {config['folder']}/ {method}",
             f"{images_per_second:.0f} img/s training, {config['test_images'] / test_seconds:.0f} img/s testing; "
             f"{minutes:.0f} min per {EPOCHS}-epoch run", "pass", folder=config["folder"], method=method,
             images_per_second=images_per_second, minutes=minutes, memory=memory, reserved=reserved,
             memory_kind=memory_kind)
        del step, optimizer
        torch._dynamo.reset()  # each method's graphs as in its own run, within dynamo's cache limit
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --- 5. torchrun ----------------------------------------------------------------------------------------

def write_cifar100(root, num_train, num_test):
    """root/cifar-100-python/{train,test,meta}: random images in the real pickle format."""
    directory = Path(root) / "cifar-100-python"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", num_train), ("test", num_test)):
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                         b"fine_labels": rng.integers(0, NUM_CLASSES, count).tolist()}, f)
    with open(directory / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"class%d" % k for k in range(NUM_CLASSES)]}, f)
    return root


def run_command(command, timeout, cwd=ROOT / "wrn", env=None):
    """(exit code or None when stopped at `timeout`, output) of a command and every process it
    starts: torchrun's workers are stopped with it, so a hung collective cannot outlive the check."""
    process = subprocess.Popen([str(part) for part in command], cwd=cwd, env={**os.environ, **(env or {})},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output
    finally:  # also when this check is stopped: nothing it started outlives it
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def last_line(output):
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def main_args(config, save, dataroot, *extra):
    return [ROOT / "wrn" / "main.py", "--save", save, "--dataroot", dataroot, "--depth", config["depth"],
            "--width", config["width"], "--batch_size", config["batch_size"], "--epochs", config["epochs"],
            "--nthread", config["nthread"], *extra]


def network_weights(save):
    state = torch.load(Path(save) / "checkpoint.pt", map_location="cpu", weights_only=True)
    return [{key: value.float() for key, value in state[net].items() if value.is_floating_point()}
            for net in ("net1", "net2")]


def torchrun(config):
    """NCCL on GPUs, gloo on the CPU: 2 processes with --sync_bn against one process where 2
    devices exist; with 1 GPU, NCCL's process group with 1 process and one epoch under torchrun."""
    backend = "nccl" if config["device"] == "cuda" else "gloo"
    processes = 2 if config["device"] == "cpu" or config["gpus"] >= 2 else 1
    gpu_id = ["--gpu_id", ""] if config["device"] == "cpu" else []
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    work = Path(tempfile.mkdtemp(prefix="preflight_torchrun_"))
    try:
        dataroot = write_cifar100(work / "data", config["train_images"], config["test_images"])
        if processes == 1:
            probe = ("import torch, torch.distributed as dist; torch.cuda.set_device(0); "
                     "dist.init_process_group('nccl'); t = torch.ones(1, device='cuda'); dist.all_reduce(t); "
                     "torch.cuda.synchronize(); assert t.item() == 1; dist.destroy_process_group(); print('nccl ok')")
            code, output = run_command([*launcher, "--no-python", sys.executable, "-c", probe], config["timeout"])
            if code != 0:
                emit("torchrun", "NCCL process group with 1 process", "fail",
                     "no answer within the time limit (a hung NCCL?)" if code is None else last_line(output))
                return
            started = time.time()
            code, output = run_command([*launcher, *main_args(config, work / "one", dataroot, "--gpu_id",
                                                              config["gpu_ids"][0])], config["timeout"])
            emit("torchrun", f"NCCL process group started (1 process, all_reduce checked); one epoch under torchrun "
                 f"in {time.time() - started:.0f} s", "pass" if code == 0 else "fail",
                 "" if code == 0 else "no result within the time limit" if code is None else last_line(output))
            return
        lr = ["--lr", "1e-5", "--sync_bn"] + (["--deterministic"] if config["device"] == "cpu" else [])
        env = {} if config["device"] == "cpu" else {"CUDA_VISIBLE_DEVICES": ",".join(config["gpu_ids"][:2])}
        single_gpu = ["--gpu_id", ""] if config["device"] == "cpu" else ["--gpu_id", config["gpu_ids"][0]]
        started = time.time()
        code, output = run_command([sys.executable, *main_args(config, work / "single", dataroot, *lr, *single_gpu)],
                                   config["timeout"])
        if code != 0:
            emit("torchrun", "one process (the reference)", "fail",
                 "no result within the time limit" if code is None else last_line(output))
            return
        code, output = run_command([*launcher, *main_args(config, work / "ranks", dataroot, *lr, *gpu_id)],
                                   config["timeout"], env=env)
        seconds = time.time() - started
        if code != 0:
            emit("torchrun", f"{processes} processes ({backend}, --sync_bn)", "fail",
                 "no answer within the time limit (a hung collective?)" if code is None else last_line(output))
            return
        emit_update_comparison(config, work, backend, processes, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def emit_update_comparison(config, work, backend, processes, seconds):
    """Each network's update (trained minus initial weights) of 2 processes against 1 process's."""
    sys.path.insert(0, str(ROOT / "wrn"))
    import models
    torch.manual_seed(1)  # main.build_training_step's seed: the same initial weights
    initial = [{key: value.float() for key, value in net.state_dict().items() if value.is_floating_point()}
               for net in models.build_pair(config["depth"], config["width"], NUM_CLASSES, True)]
    differences = []
    for start, single, ranks in zip(initial, network_weights(work / "single"), network_weights(work / "ranks")):
        update_single = torch.cat([(single[key] - start[key]).flatten() for key in start])
        update_ranks = torch.cat([(ranks[key] - start[key]).flatten() for key in start])
        differences.append(float((update_ranks - update_single).norm() / update_single.norm()))
    tolerance = UPDATE_TOLERANCE[config["device"]]
    worst = max(differences)
    emit("torchrun", f"{processes} processes ({backend}, --sync_bn) against 1 process, {config['epochs']} epoch(s) of "
         f"{config['train_images']} images: update rel. diff {worst:.1e} (<= {tolerance:g}); {seconds:.0f} s",
         "pass" if worst <= tolerance else "fail",
         "" if worst <= tolerance else f"the 2-process run's update differs by {worst:.1e} > {tolerance:g}")


# --- 6. interrupt and resume -----------------------------------------------------------------------------

def checkpoint_step(save):
    """(epoch, step) of SAVE/checkpoint.pt, or None while there is none."""
    path = Path(save) / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["epoch"], state["step"]
    except Exception:  # being replaced right now
        return None


def resume(config):
    """SIGTERM in the middle of epoch 1, --resume, and the final weights against the uninterrupted
    run's: bit-exact on a CPU with --deterministic; on CUDA within what two uninterrupted runs
    differ by (kernels without a deterministic backward: adaptive average pooling)."""
    gpu = ["--gpu_id", ""] if config["device"] == "cpu" else ["--gpu_id", config["gpu_ids"][0]]
    flags = ["--deterministic", "--checkpoint_every", "1", *gpu]
    work = Path(tempfile.mkdtemp(prefix="preflight_resume_"))
    deadline = time.time() + config["timeout"]
    try:
        dataroot = write_cifar100(work / "data", config["train_images"], config["test_images"])
        references = ["reference"] + (["reference2"] if config["device"] == "cuda" else [])
        for name in references:
            code, output = run_command([sys.executable, *main_args(config, work / name, dataroot, *flags)],
                                       deadline - time.time())
            if code != 0:
                emit("interrupt and resume", "uninterrupted run", "fail",
                     "no result within the time limit" if code is None else last_line(output))
                return
        save = work / "stopped"
        process = subprocess.Popen([sys.executable, *map(str, main_args(config, save, dataroot, *flags))],
                                   cwd=ROOT / "wrn", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None and checkpoint_step(save) is None and time.time() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=max(deadline - time.time(), 1))
        stopped_at = checkpoint_step(save)
        if process.returncode != 143 or stopped_at is None or stopped_at[1] == 0:
            emit("interrupt and resume", f"SIGTERM: exit code {process.returncode}, checkpoint at {stopped_at}", "fail",
                 f"expected exit code 143 and a checkpoint inside epoch 1: {last_line(output)}")
            return
        code, output = run_command([sys.executable, *main_args(config, save, dataroot, *flags, "--resume")],
                                   deadline - time.time())
        if code != 0:
            emit("interrupt and resume", "resumed run", "fail",
                 "no result within the time limit" if code is None else last_line(output))
            return
        reference = network_weights(work / "reference")
        difference = max_difference(reference, network_weights(save))
        where = f"stopped at epoch {stopped_at[0] + 1} step {stopped_at[1]}, resumed"
        if config["device"] == "cpu":
            exact = all((work / "reference" / name).read_bytes() == (save / name).read_bytes()
                        for name in ("net1.pt", "net2.pt"))
            outcome = "bit-exact" if exact else f"differ by {difference:.1e}"
            emit("interrupt and resume", f"{where}: final weights {outcome} (--deterministic)",
                 "pass" if exact else "fail", "" if exact else "not bit-exact on the CPU")
            return
        noise = max_difference(reference, network_weights(work / "reference2"))
        tolerance = max(10 * noise, 1e-6)
        verdict = "pass" if difference <= tolerance else "fail"
        kind = "bit-exact" if difference == 0 else f"max |diff| {difference:.1e}"
        emit("interrupt and resume", f"{where}: {kind} against the uninterrupted run; two uninterrupted runs differ by "
             f"{noise:.1e} (CUDA kernels without a deterministic backward), tolerance {tolerance:.1e}", verdict,
             "" if verdict == "pass" else "the resumed run drifted further than two uninterrupted runs do")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def max_difference(weights_a, weights_b):
    return max(float((a[key] - b[key]).abs().max()) for a, b in zip(weights_a, weights_b) for key in a)


CHECKS = {"environment": environment, "numerics": numerics, "projection": projection, "torchrun": torchrun,
          "resume": resume}

if __name__ == "__main__":
    CHECKS[sys.argv[1]](json.loads(sys.argv[2]))
