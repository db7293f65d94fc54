"""The checks of tools/preflight.py, each in a process of its own:

    python tools/preflight_checks.py worker '{"folder": "wrn"}'   # one folder's checks, commands on stdin
    python tools/preflight_checks.py one_rank CONFIG_JSON          # under torchrun: see one_rank()

A check prints its results as lines `PREFLIGHT {json}`, one per row of the preflight table, as soon
as it knows them: a check stopped at its time limit still reports the rows it finished. A row is
{"check", "figure", "verdict": "pass" | "fail" | "skipped", "why", "data"}; `data` holds the
numbers preflight.py decides with (img/s, peak memory, ...).

A worker keeps one folder's training steps alive between the commands preflight.py sends it on
stdin (one JSON object a line; numerics, then speed, projection, ...), so that a compiled graph
is compiled once and timed by every check that uses it; it ends each command with a line
`PREFLIGHT-DONE {json}` that counts the graphs Dynamo compiled for it. Whatever a check writes
goes to a temporary folder that it removes; the repository is never written to.

The figures come from the training code itself (main.py's build_training_step and
create_optimizer, training.train_epoch and evaluate, dataset.py's batches); resume and torchrun
run main.py as a user would.
"""
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

from preflight import TOOLS, setting_flags

ROOT = TOOLS.parent
TRAIN_IMAGES, TEST_IMAGES, EPOCHS = 50_000, 10_000, 200  # CIFAR-100 and the reference schedule
NUM_CLASSES = 100
# Relative difference of the first step's loss from IEEE fp32's that a setting may have: float
# rounding in another kernel order for fp32 layouts and compile, the 10-bit mantissa of TF32's
# inputs and the 8-bit (bf16) or 11-bit (fp16) mantissa of the activations under --amp.
LOSS_TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 1e-2, "fp16": 1e-2}
EXTRA_STEPS = 3  # steps after the first, each on another batch: all must stay finite
# torchrun with --sync_bn against one process, at lr 1e-5 where the steps are well-conditioned
# (tests/test_distributed.py explains why): relative difference of each network's update.
UPDATE_TOLERANCE = {"cpu": 1e-3, "cuda": 1e-2}


def emit(check, figure, verdict, why="", **data):
    print("PREFLIGHT " + json.dumps({"check": check, "figure": figure, "verdict": verdict, "why": why, "data": data}),
          flush=True)


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


def compiled_graphs():
    """Graphs Dynamo has compiled in this process so far (each shape, each piece between graph breaks)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def steps_words(count):
    return f"{count} step{'s' if count != 1 else ''}"


def graphs_words(count):
    return f"{count} graph{'s' if count != 1 else ''} compiled"


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
        # TF32 tensor cores came with Ampere (sm 8.0), as bf16 ones did; emulated bf16 is no speed setting.
        emit("environment: GPUs", f"{len(gpus)}: {names}; driver {driver}", "pass", gpus=gpus, driver=driver,
             bf16=hardware.cuda_bf16_support(), tf32=torch.cuda.get_device_capability(0) >= (8, 0))
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


# --- 2, 4, 5 and 7: one folder's training steps, kept between the checks ---------------------------

class Worker:
    """One folder's training steps, one per (setting, method), built once and kept: the numerics
    check builds and compiles them, speed and projection time the same steps (no second compile),
    the sharing check times the chosen one beside the other folder's worker.

    The wrn/ worker also runs the checks that need no steps (environment, resume, torchrun), so
    that they do not pay for a process of their own."""

    def __init__(self, folder):
        self.folder = folder
        self.dataset, self.distributed, self.hardware, self.main, self.training = import_folder(folder)
        self.steps = {}  # (setting, method) -> (TrainingStep, optimizer)
        self.test_minutes = 0.0  # of a 200-epoch run, once an evaluation pass is timed
        self.reference_loss = None  # IEEE fp32's first-step loss, the numerics' reference

    def setup(self, **config):
        """config: device, nthread, depth, width, batch_size; `method` (default dcm) of the numerics
        and speed steps; `backend` replaces torch.compile's default backend (tests count Dynamo's
        graphs with 'eager', which generates no code)."""
        self.config = config
        self.device = training_device(config)
        self.batch = config["batch_size"]
        self.method = config.get("method", "dcm")
        if config.get("backend"):
            compile_with_default = torch.compile
            torch.compile = lambda model, **options: compile_with_default(model, **{"backend": config["backend"],
                                                                                    **options})

    def environment(self, **config):
        environment(config)

    def resume(self, **config):
        resume(config)

    def torchrun(self, **config):
        torchrun(config)

    def has_tf32_option(self):
        return "--tf32" in self.main.option_parser()._option_string_actions

    def use(self, setting):
        """TF32 is process-wide: on for a tf32 setting, explicitly off for every other (IEEE fp32
        is the reference, whatever PyTorch's default)."""
        self.hardware.set_fp32_precision("tf32" in setting.split("+"))

    def options(self, setting, method):
        return self.main.parse_options(["--depth", str(self.config["depth"]), "--width", str(self.config["width"]),
                                        "--method", method, "--batch_size", str(self.batch), *setting_flags(setting)])

    def step(self, setting, method=None):
        """(step, optimizer) of `setting` and `method`, built from main.py's seed the first time."""
        key = (setting, method or self.method)
        if key not in self.steps:
            self.use(setting)
            opt = self.options(setting, key[1])
            step = self.main.build_training_step(opt, NUM_CLASSES, self.device, self.distributed.Group())
            self.steps[key] = step, self.main.create_optimizer(opt, step.parameters(), self.main.lr_at_epoch(opt, 1))
        return self.steps[key]

    def release(self, keep=()):
        """Free every step but those in `keep`, so that memory peaks measure one run's step."""
        for key in [key for key in self.steps if key not in keep]:
            del self.steps[key]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def images(self, count, seed=1):
        return self.dataset.random_image_data(count, NUM_CLASSES, self.device, seed=seed)

    # --- numerics ---

    def numerics(self, settings, keep=True):
        """One SGD step of the freshly initialised pair on one batch in every setting, against IEEE
        fp32's loss on the same batch from the same initialisation; then more steps that must stay
        finite. The fp32 row is the default setting's own check. With `keep`, the steps stay for
        the speed check."""
        data = self.images(self.batch * (1 + EXTRA_STEPS))
        batches = list(self.dataset.train_batches(data, self.batch, seed=1, epoch=1))
        reference = self.reference_loss
        for setting in (["fp32"] if reference is None or "fp32" in settings else []) + [
                setting for setting in settings if setting != "fp32"]:
            title = f"numerics {self.folder}/ {setting}"
            if "tf32" in setting.split("+") and not self.has_tf32_option():
                emit(title, "", "skipped", "this main.py has no --tf32")
                continue
            graphs = compiled_graphs()
            self.steps.pop((setting, self.method), None)  # from main.py's initialisation, not a trained step
            step, optimizer = self.step(setting)
            self.use(setting)
            initial_scale = step.scaler.get_scale() if step.scaler.is_enabled() else None
            first_seconds, terms = device_seconds(self.device, lambda: step.train(*batches[0], optimizer)[2])
            loss = float(sum(value.detach().float() for value in terms.values()))
            grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in step.parameters() if p.grad is not None)
            # fp16's loss scaler starts high on purpose: a first step whose gradients overflow is
            # skipped and the scale halved, as designed; the later steps must then be finite.
            scaler_skipped = initial_scale is not None and step.scaler.get_scale() < initial_scale
            later = [float(sum(v.detach().float() for v in step.train(images, targets, optimizer)[2].values()))
                     for images, targets in batches[1:1 + EXTRA_STEPS]]
            if setting == "fp32":
                reference = self.reference_loss = loss
            dtype = setting.split("+")[0]
            difference = abs(loss - reference) / abs(reference)
            problems = ([f"loss {loss:.5g} is {difference:.1e} from fp32's {reference:.5g} (tolerance "
                         f"{LOSS_TOLERANCE[dtype]:g})"] if not difference <= LOSS_TOLERANCE[dtype] else [])
            problems += [] if grads_finite or scaler_skipped else ["a gradient of the first step is not finite"]
            problems += [] if all(np.isfinite(later)) else [f"a loss of steps 2-{1 + EXTRA_STEPS} is not finite: {later}"]
            graphs = compiled_graphs() - graphs
            figure = ("IEEE fp32 (TF32 off), the reference: " if setting == "fp32" else "") + (
                f"first-step loss {loss:.5f} (fp32 {reference:.5f}, rel. diff {difference:.1e} <= "
                f"{LOSS_TOLERANCE[dtype]:g}), gradients "
                + (f"overflowed at loss scale {initial_scale:g}: step skipped by the scaler, as designed"
                   if scaler_skipped else "finite") + f", {EXTRA_STEPS} more steps finite"
                + (f"; first step {first_seconds:.1f} s ({graphs_words(graphs)})" if step.compiled else ""))
            emit(title, figure if not problems else "; ".join(problems), "fail" if problems else "pass",
                 setting=setting, folder=self.folder, first_seconds=first_seconds if step.compiled else 0)
            if setting not in settings or not keep:  # the reference of other rows only, or not timed later
                self.release(keep=[key for key in self.steps if key != (setting, self.method)])

    # --- speed ---

    def time_steps(self, step, optimizer, steps, seconds):
        """img/s of the real epoch code (dataset.py's augmented batches, training.train_epoch) over
        up to `steps` full batches, fewer if `seconds` run out, after one warm-up batch; the
        device's peak memory counts from the timed steps on."""
        data = self.images(self.batch * min(steps, 8), seed=2)
        self.training.train_epoch(step, optimizer, [next(self.dataset.train_batches(data, self.batch, 1, epoch=0))],
                                  1, "warm-up")
        self.hardware.synchronize(self.device)
        self.hardware.reset_peak_memory(self.device)
        done = 0
        start = time.perf_counter()

        def batches():
            nonlocal done
            for epoch in range(1, steps + 1):
                for batch in self.dataset.train_batches(data, self.batch, 1, epoch):
                    yield batch
                    done += 1
                    if done >= steps or time.perf_counter() - start > seconds:
                        return

        self.training.train_epoch(step, optimizer, batches(), steps, "timing").loss()  # .loss() waits for the device
        return done * self.batch / (time.perf_counter() - start), done

    def speed(self, settings, passed, steps, seconds):
        """Each setting whose numerics passed, timed on the step the numerics check built."""
        for setting in settings:
            title = f"speed {self.folder}/ {setting}"
            if setting not in passed:
                emit(title, "", "skipped", "its numerics check did not pass or did not run")
                continue
            graphs = compiled_graphs()
            step, optimizer = self.step(setting)
            self.use(setting)
            images_per_second, done = self.time_steps(step, optimizer, steps, seconds)
            emit(title, f"{images_per_second:.1f} img/s, real epoch code, {steps_words(done)} at batch {self.batch}; "
                        f"{graphs_words(compiled_graphs() - graphs)}", "pass",
                 setting=setting, images_per_second=images_per_second)

    # --- projection and memory ---

    def projection(self, setting, methods, steps, seconds, test_images):
        """Steady-state img/s of each method's training steps with `setting` (the step the earlier
        checks compiled, where they built it), minutes of a 200-epoch run's training, and the peak
        memory of each method's step. An eager setting's evaluation is timed too; a compiled one's
        needs more graphs, which extra_compiles() measures once."""
        self.release(keep=[(setting, method) for method in methods])
        self.use(setting)
        for method in sorted(methods, key=lambda method: (setting, method) in self.steps):  # a kept step last
            graphs = compiled_graphs()
            # A new step's memory is what it adds to the kept one's; a kept step is alone by then.
            kept = (setting, method) in self.steps
            baseline_allocated, baseline_reserved = (0, 0) if kept else self.memory_now()
            step, optimizer = self.step(setting, method)
            images_per_second, done = self.time_steps(step, optimizer, steps, seconds)
            memory, memory_kind = self.hardware.peak_memory(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else memory
            train_minutes = EPOCHS * TRAIN_IMAGES / images_per_second / 60
            test = "" if step.compiled else self.test_words(step, test_images)
            minutes = train_minutes + (self.test_minutes if not step.compiled else 0)
            emit(f"projection {self.folder}/ {method}",
                 f"{images_per_second:.0f} img/s training ({steps_words(done)} at batch {self.batch}, steady state): "
                 f"{train_minutes:.0f} min of training per {EPOCHS}-epoch run{test}; peak {memory_kind} "
                 f"{(memory - baseline_allocated) / 2 ** 30:.2f} GiB; {graphs_words(compiled_graphs() - graphs)}", "pass",
                 folder=self.folder, method=method, images_per_second=images_per_second, minutes=minutes,
                 tested=not step.compiled, memory=memory - baseline_allocated,
                 reserved=reserved - baseline_reserved, memory_kind=memory_kind)
            if method != self.method:
                self.release(keep=[(setting, self.method)])

    def memory_now(self):
        """(allocated, reserved) bytes of the device's tensors now: what other kept steps hold."""
        if self.device.type != "cuda":
            return 0, 0
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)

    def test_words(self, step, test_images):
        """Times one evaluation pass over `test_images` images; ', testing: ...' for the row."""
        data = self.images(1)
        test = self.images(test_images, seed=4)
        data.test_images, data.test_labels = test.train_images, test.train_labels
        eval_batch = self.main.option_parser().get_default("eval_batch_size")
        self.training.evaluate(step, self.dataset.test_batches(data, eval_batch, 0, min(eval_batch, test_images)))
        seconds, _ = device_seconds(self.device, lambda: self.training.evaluate(
            step, self.dataset.test_batches(data, eval_batch)).loss())
        self.test_minutes = EPOCHS * seconds * TEST_IMAGES / test_images / 60
        return f" + {self.test_minutes:.0f} min of testing ({test_images / seconds:.0f} img/s)"

    def extra_compiles(self, setting, test_images):
        """The graphs a real run compiles besides the full batch's, counted once for the folder:
        the last partial batch of the 50,000 training images and the evaluation batch; then the
        evaluation's speed with its graph."""
        title = f"projection {self.folder}/: the rest of a run"
        step, optimizer = self.step(setting)
        self.use(setting)
        if not step.compiled:
            emit(title, "an eager setting compiles nothing; its rows above include testing", "pass", seconds=0,
                 test_minutes=0)
            return
        graphs = compiled_graphs()
        partial = TRAIN_IMAGES % self.batch or self.batch
        data = self.images(partial, seed=5)
        partial_seconds, _ = device_seconds(self.device, lambda: self.training.train_epoch(
            step, optimizer, self.dataset.train_batches(data, partial, 1, epoch=0), 1, "partial batch").loss())
        eval_batch = self.main.option_parser().get_default("eval_batch_size")
        batch = self.images(1)
        test = self.images(eval_batch, seed=4)
        batch.test_images, batch.test_labels = test.train_images, test.train_labels
        eval_seconds, _ = device_seconds(self.device, lambda: self.training.evaluate(
            step, self.dataset.test_batches(batch, eval_batch)).loss())
        graphs = compiled_graphs() - graphs
        test = self.test_words(step, test_images)
        emit(title, f"{graphs_words(graphs)} once per run: the last partial batch ({partial} images) "
                    f"{partial_seconds:.1f} s, the evaluation batch ({eval_batch}) {eval_seconds:.1f} s; "
                    f"testing every epoch{test.replace(' + ', ': ')}", "pass",
             seconds=partial_seconds + eval_seconds, test_minutes=self.test_minutes)

    # --- two runs on one device ---

    def share(self, setting, seconds):
        """img/s of the kept step, timed for `seconds` while the other folder's worker does the same."""
        step, optimizer = self.step(setting)
        self.use(setting)
        images_per_second, done = self.time_steps(step, optimizer, 10 ** 6, seconds)
        emit(f"sharing {self.folder}/", f"{images_per_second:.0f} img/s beside the other run", "pass",
             folder=self.folder, images_per_second=images_per_second)


def worker(config):
    """Commands from stdin, one JSON object a line: {"check": "numerics", ...its arguments}."""
    folder_worker = Worker(config["folder"])
    for line in sys.stdin:
        command = json.loads(line)
        graphs = compiled_graphs()
        getattr(folder_worker, command.pop("check"))(**command)
        print("PREFLIGHT-DONE " + json.dumps({"graphs": compiled_graphs() - graphs}), flush=True)


# --- 3. interrupt and resume -----------------------------------------------------------------------------

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


def start_command(command, cwd=ROOT / "wrn", env=None):
    return subprocess.Popen([str(part) for part in command], cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish_command(process, timeout):
    """(exit code or None when stopped at `timeout`, output) of a started command and every
    process it started: torchrun's workers are stopped with it, so a hung collective cannot
    outlive the check."""
    try:
        output, _ = process.communicate(timeout=max(timeout, 1))
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output
    finally:  # also when this check is stopped: nothing it started outlives it
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def run_command(command, timeout, cwd=ROOT / "wrn", env=None):
    return finish_command(start_command(command, cwd, env), timeout)


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


def same_bytes(save_a, save_b):
    return all((Path(save_a) / name).read_bytes() == (Path(save_b) / name).read_bytes() for name in ("net1.pt", "net2.pt"))


def resume(config):
    """SIGTERM in the middle of epoch 1, --resume, and the final weights against the uninterrupted
    run's: bit-exact with --deterministic on a CPU; on CUDA within what two uninterrupted runs
    differ by. Those two runs also say whether --deterministic is bit-exact on this device. The
    uninterrupted runs and the run to be stopped start together."""
    gpu = ["--gpu_id", ""] if config["device"] == "cpu" else ["--gpu_id", config["gpu_ids"][0]]
    flags = ["--deterministic", "--checkpoint_every", "1", *gpu]
    work = Path(tempfile.mkdtemp(prefix="preflight_resume_"))
    deadline = time.time() + config["timeout"]
    try:
        dataroot = write_cifar100(work / "data", config["train_images"], config["test_images"])
        names = ["reference"] + (["reference2"] if config["device"] == "cuda" else [])
        references = {name: start_command([sys.executable, *main_args(config, work / name, dataroot, *flags)])
                      for name in names}
        save = work / "stopped"
        process = subprocess.Popen([sys.executable, *map(str, main_args(config, save, dataroot, *flags))],
                                   cwd=ROOT / "wrn", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None and checkpoint_step(save) is None and time.time() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=max(deadline - time.time(), 1))
        stopped_at = checkpoint_step(save)
        for name, reference in references.items():
            code, reference_output = finish_command(reference, deadline - time.time())
            if code != 0:
                emit("interrupt and resume", "uninterrupted run", "fail",
                     "no result within the time limit" if code is None else last_line(reference_output))
                return
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
            exact = same_bytes(work / "reference", save)
            outcome = "bit-exact" if exact else f"differ by {difference:.1e}"
            emit("interrupt and resume", f"{where}: final weights {outcome} (--deterministic)",
                 "pass" if exact else "fail", "" if exact else "not bit-exact on the CPU")
            emit("--deterministic", "exact on this CPU: the resumed run's net1.pt and net2.pt equal the "
                 "uninterrupted run's byte for byte" if exact else f"not exact: two runs differ by {difference:.1e}",
                 "pass" if exact else "fail", "" if exact else "--deterministic runs differ on the CPU")
            return
        noise = max_difference(reference, network_weights(work / "reference2"))
        tolerance = max(10 * noise, 1e-6)
        verdict = "pass" if difference <= tolerance else "fail"
        kind = "bit-exact" if difference == 0 else f"max |diff| {difference:.1e}"
        emit("interrupt and resume", f"{where}: {kind} against the uninterrupted run; two uninterrupted runs differ by "
             f"{noise:.1e}, tolerance {tolerance:.1e}", verdict,
             "" if verdict == "pass" else "the resumed run drifted further than two uninterrupted runs do")
        exact = same_bytes(work / "reference", work / "reference2")
        emit("--deterministic", ("exact on this GPU: two runs' net1.pt and net2.pt are equal byte for byte" if exact
                                 else f"not exact on this GPU: two runs' weights differ by up to {noise:.1e}"),
             "pass", deterministic_exact=exact)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def max_difference(weights_a, weights_b):
    return max(float((a[key] - b[key]).abs().max()) for a, b in zip(weights_a, weights_b) for key in a)


# --- 6. torchrun ----------------------------------------------------------------------------------------

def torchrun(config):
    """NCCL on GPUs, gloo on the CPU: 2 processes with --sync_bn against one process where 2
    devices exist; with 1 GPU, one rank (see one_rank) under torchrun."""
    backend = "nccl" if config["device"] == "cuda" else "gloo"
    processes = 2 if config["device"] == "cpu" or config["gpus"] >= 2 else 1
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    if processes == 1:
        code, output = run_command([*launcher, Path(__file__), "one_rank", json.dumps(config)], config["timeout"],
                                   cwd=ROOT)
        rows = [line for line in output.splitlines() if line.startswith("PREFLIGHT ")]
        if code != 0 or not rows:
            emit("torchrun", "one NCCL rank", "fail",
                 "no answer within the time limit (a hung NCCL?)" if code is None else last_line(output))
        for row in rows:
            print(row, flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="preflight_torchrun_"))
    try:
        dataroot = write_cifar100(work / "data", config["train_images"], config["test_images"])
        lr = ["--lr", "1e-5", "--sync_bn"] + (["--deterministic"] if config["device"] == "cpu" else [])
        env = {} if config["device"] == "cpu" else {"CUDA_VISIBLE_DEVICES": ",".join(config["gpu_ids"][:2])}
        single_gpu = ["--gpu_id", ""] if config["device"] == "cpu" else ["--gpu_id", config["gpu_ids"][0]]
        ranks_gpu = ["--gpu_id", ""] if config["device"] == "cpu" else []
        started = time.time()
        # The reference and the ranks run at once: neither is timed.
        single = start_command([sys.executable, *main_args(config, work / "single", dataroot, *lr, *single_gpu)])
        ranks = start_command([*launcher, *main_args(config, work / "ranks", dataroot, *lr, *ranks_gpu)], env=env)
        code, output = finish_command(single, config["timeout"])
        if code != 0:
            finish_command(ranks, 0)
            emit("torchrun", "one process (the reference)", "fail",
                 "no result within the time limit" if code is None else last_line(output))
            return
        code, output = finish_command(ranks, config["timeout"] - (time.time() - started))
        if code != 0:
            emit("torchrun", f"{processes} processes ({backend}, --sync_bn)", "fail",
                 "no answer within the time limit (a hung collective?)" if code is None else last_line(output))
            return
        emit_update_comparison(config, work, backend, processes, time.time() - started)
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


def one_rank(config):
    """Under torchrun with one process: main.py's own code joins the process group (NCCL on a GPU,
    gloo on a CPU), converts the pair's BN for --sync_bn and wraps both networks in DDP, as it does
    for several ranks (a single process skips all three), then trains 2 steps and evaluates. Two
    NCCL ranks cannot share one GPU, so the collectives between ranks (gradient averaging, the
    global BN statistics) are not exercised: the row says so."""
    dataset, distributed, hardware, main, training = import_folder("wrn")
    device = training_device(config)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    opt = main.parse_options(["--depth", str(config["depth"]), "--width", str(config["width"]), "--sync_bn",
                              "--batch_size", str(config["batch_size"])])
    distributed.launched_ranks = lambda: 2  # take start()'s torchrun branch, which a world of one skips
    group = distributed.start(device)

    class OneRankAsSeveral(distributed.Group):
        """This rank's Group, whose --sync_bn conversion and DDP wrapping are those of several ranks."""

        def sync_batchnorm(self, net, *arguments):
            return distributed.Group(0, 2).sync_batchnorm(net, *arguments)

        def wrap(self, net, device):
            return distributed.Group(0, 2).wrap(net, device)

    group = OneRankAsSeveral(group.rank, group.size, group.control)
    step = main.build_training_step(opt, NUM_CLASSES, device, group)
    optimizer = main.create_optimizer(opt, step.parameters(), main.lr_at_epoch(opt, 1))
    data = dataset.random_image_data(2 * opt.batch_size, NUM_CLASSES, device, seed=1)
    data.test_images, data.test_labels = data.train_images, data.train_labels
    meter = training.train_epoch(step, optimizer, dataset.train_batches(data, opt.batch_size, 1, epoch=1), 2, "one rank")
    accuracy = training.evaluate(step, dataset.test_batches(data, opt.eval_batch_size))
    norms = sorted({type(module).__name__ for net in step.nets for module in net.modules() if "Norm" in type(module).__name__})
    wrapped = sorted({type(net).__name__ for net in step.trained_nets})
    finite = np.isfinite(meter.loss()) and np.isfinite(accuracy.loss())
    emit("torchrun", f"{'1 GPU: ' if device.type == 'cuda' else ''}one rank under torchrun; main.py's code built the {torch.distributed.get_backend()} "
         f"process group, {', '.join(norms)} and {', '.join(wrapped)}, trained 2 steps and evaluated. Not covered: "
         f"collectives between ranks (2 NCCL ranks cannot share one GPU; the gloo path is tested on the CPU)",
         "pass" if finite else "fail", "" if finite else "a loss was not finite")
    distributed.finish()


CHECKS = {"worker": worker, "one_rank": one_rank}

if __name__ == "__main__":
    CHECKS[sys.argv[1]](json.loads(sys.argv[2]))
