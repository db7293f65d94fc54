"""The machine a run uses: the training device, the CPU allocator and threads, timing and memory.

Every function here is about the process and the hardware, not about DCM; main.py and
benchmark.py call them. This file is identical in wrn/ and wrn_mobi/.
"""
import ctypes
import os
import resource
import sys

import torch

import distributed

# glibc's mallopt() parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_EVERYTHING = 2 ** 31 - 1


def keep_freed_memory():
    """Make glibc's malloc keep freed memory in the process instead of handing it back to the OS.

    By default glibc serves every large block (a CPU activation or gradient of a training step)
    with a fresh mmap and unmaps it when freed, so each step faults every page of its tensors
    in again: the MobileNet pair on a CPU spent about half its time in page faults. With mmap
    disabled and trimming off, freed blocks are reused from the heap by the next step. The
    process keeps its peak memory, which a training run reaches every step anyway. Returns
    whether the setting took effect (False where the C library is not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): no such tuning to do
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_EVERYTHING))


class DeviceError(Exception):
    """--gpu_id names a GPU this machine does not show: the message says what to do instead."""


def available_cores():
    """The CPU cores this process may run on (its affinity mask, which a cluster's job limits),
    shared by the processes torchrun started on this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity mask
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def select_device(opt):
    """(the training device, {"gpu_id": ..., "nthread": ...}: the GPU and the CPU thread count it
    uses, in --gpu_id's and --nthread's terms, for the log); sets the visible GPU and the thread
    count first. Under torchrun each process trains on GPU LOCAL_RANK of those its launcher left
    visible, or on the CPU with --gpu_id ''. Without --gpu_id: GPU 0 of the visible ones, or the
    CPU when there is none (said in one line); a --gpu_id naming a GPU that is not there raises
    DeviceError."""
    single_process = distributed.launched_ranks() == 1
    if opt.gpu_id is not None and (single_process or opt.gpu_id == ""):
        # Must run before CUDA is initialised; like the reference, --gpu_id picks the visible GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = opt.gpu_id
    torch.set_num_threads(min(opt.nthread, os.cpu_count() or 1) if opt.nthread else available_cores())
    nthread = torch.get_num_threads()
    if opt.deterministic:
        # On CUDA this makes cuDNN choose deterministic convolution algorithms (some of its fastest
        # backward ones accumulate with atomic adds, in an order that varies); cuBLAS needs the
        # workspace setting for reproducible results. An op without a deterministic CUDA kernel
        # warns instead of stopping the run (the global average pool is none: adaptive_avg_pool2d
        # to 1x1 runs as a mean); preflight.py measures how exact a GPU's reruns come out.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if not torch.cuda.is_available():
        if opt.gpu_id:
            raise DeviceError(f"--gpu_id {opt.gpu_id}: this machine shows no such GPU (torch.cuda.is_available() "
                              f"is False); drop --gpu_id to train on the CPU, or check CUDA_VISIBLE_DEVICES")
        if opt.gpu_id is None:  # on stderr: --benchmark's stdout is its one result line
            distributed.print_on_rank0(f"no GPU found: training on the CPU ({threads(nthread)})")
        return torch.device("cpu"), {"gpu_id": "", "nthread": nthread}
    torch.backends.cudnn.benchmark = not opt.deterministic  # autotuning may pick another kernel per run
    if single_process:
        return torch.device("cuda"), {"gpu_id": opt.gpu_id or "0", "nthread": nthread}
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device, {"gpu_id": str(device.index), "nthread": nthread}


def set_fp32_precision(tf32):
    """fp32 convolutions (cuDNN) and matmuls (cuBLAS) in IEEE fp32, or with TF32 tensor cores
    (inputs rounded to a 10-bit mantissa, accumulation in fp32) when `tf32` is True; on GPUs
    before Ampere there is no TF32, and the CPU's (oneDNN's) are IEEE fp32 either way.

    PyTorch's own defaults differ between the two (cuDNN TF32 on, cuBLAS off), so that a plain
    fp32 run on an Ampere or newer GPU would convolve in TF32; both are set here, whatever the
    device, so that the run's precision is the one its options say. torch 2.9 and later keep a
    precision per backend and operation (fp32_precision) beside the older settings, and their
    readers raise when they find the two disagree: get_float32_matmul_precision() (inductor's
    max-autotune calls it) after a user's set_float32_matmul_precision("high") and the old
    cuBLAS flag alone set to False, cudnn.allow_tf32 after the new settings alone. So every
    setting of both kinds is set here, each to the same precision.
    """
    # cuBLAS's matmuls and the global matmul precision (on torch 2.9 and later oneDNN's matmuls too).
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    if hasattr(torch.backends, "fp32_precision"):  # torch 2.9 and later
        precision = "tf32" if tf32 else "ieee"
        # Explicit, not inherited from torch.backends.fp32_precision; RNNs as convolutions, which
        # the old cudnn.allow_tf32 reader compares.
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision = precision
        torch.backends.mkldnn.matmul.fp32_precision = torch.backends.mkldnn.conv.fp32_precision = "ieee"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {threads(torch.get_num_threads())}"


def threads(count):
    return f"{count} thread" + ("s" if count != 1 else "")


def synchronize(device):
    """Wait for the device, so that a wall-clock time covers the work queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """(bytes, what they measure): the tensors' peak on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU memory"
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss * (1 if sys.platform == "darwin" else 1024), "process RSS"


def cuda_bf16_support():
    """Whether the current CUDA GPU computes in bfloat16 natively (Ampere, sm 8.0, and newer; every
    ROCm GPU torch supports). torch.cuda.is_bf16_supported() also says yes where bf16 tensors merely
    work, emulated and slower than fp32 (Volta, Turing), unless asked with including_emulation=False
    (torch 2.4 and later, pytorch PR 129288)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_bf16_support():
    """(kind, words) of bfloat16 support on this CPU: 'native' (AVX512_BF16 or AMX instructions),
    'avx512' (no bf16 instructions, but oneDNN's bf16 kernels run on AVX-512) or 'none'
    (AVX2 and older: bf16 falls back to slow reference kernels; a WRN-10-1 pair trained 11.9x
    slower under --amp bf16 than in fp32 on an AMD EPYC limited to AVX2, docs/speed.md)."""
    capability = torch.backends.cpu.get_cpu_capability()
    native = cpu_bf16_instructions()
    if native:
        return "native", f"{capability}, bf16 instructions ({' and '.join(native)})"
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "avx512", f"{capability}, bf16 emulated on AVX-512 by oneDNN (no bf16 instructions)"
    return "none", f"{capability}, no bf16 instructions"


CPUINFO = "/proc/cpuinfo"
# The bf16 instructions: their names, torch.cpu's probe and Linux's CPU flag for each.
BF16_INSTRUCTIONS = (("AVX512_BF16", "_is_avx512_bf16_supported", "avx512_bf16"),
                     ("AMX", "_is_amx_tile_supported", "amx_bf16"))


def cpu_bf16_instructions():
    """The names of this CPU's bf16 instructions (AVX512_BF16, AMX), as torch.cpu's probes find
    them; PyTorch 2.4 has no such probes, and there the CPU flags Linux lists in /proc/cpuinfo
    answer (none elsewhere)."""
    if all(hasattr(torch.cpu, probe) for _, probe, _ in BF16_INSTRUCTIONS):
        return [name for name, probe, _ in BF16_INSTRUCTIONS if getattr(torch.cpu, probe)()]
    try:
        with open(CPUINFO) as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:  # not Linux
        return []
    return [name for name, _, flag in BF16_INSTRUCTIONS if flag in flags]


def warn_slow_cpu_bf16(opt, device):
    """One line on stderr when --amp bf16 is asked of a CPU without bf16 support: it trains, but
    about 10x slower than fp32."""
    if opt.amp != "bf16" or device.type != "cpu":
        return
    support, words = cpu_bf16_support()
    if support == "none":
        distributed.print_on_rank0(f"warning: --amp bf16 on this CPU ({words}) runs about 10x slower than fp32; "
                                   f"drop --amp on it")
