"""The machine a run uses (main.py, benchmark.py): the device, the CPU allocator and threads, timing, memory."""
import ctypes
import os
import resource
import sys

import torch

import distributed


def keep_freed_memory():
    """Make glibc's malloc keep freed memory, which training needs again every step: else each large block (a
    CPU step's activations, gradients) is a fresh mmap, faulted in every step (half the MobileNet pair's CPU time)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return
    mallopt(-4, 0)  # M_MMAP_MAX (malloc.h): large blocks from the heap, not fresh mmaps
    mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: freed memory stays in the heap


class DeviceError(Exception):
    """--gpu_id names a GPU this machine does not show: the message says what to do instead."""


def available_cores():
    """The CPU cores this process may use (its affinity mask), shared by torchrun's processes on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def select_device(opt):
    """(the device, the {"gpu_id", "nthread"} used, for the log): under torchrun GPU LOCAL_RANK (the CPU with
    --gpu_id ''); else --gpu_id's, or GPU 0, or the CPU where there is none. DeviceError for a GPU not there."""
    single_process = distributed.launched_ranks() == 1
    if opt.gpu_id is not None and (single_process or opt.gpu_id == ""):
        # Must run before CUDA is initialised; like the reference, --gpu_id picks the visible GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = opt.gpu_id
    torch.set_num_threads(min(opt.nthread, os.cpu_count() or 1) if opt.nthread else available_cores())
    nthread = torch.get_num_threads()
    if opt.deterministic:
        # Deterministic cuDNN algorithms, cuBLAS sums (in this workspace); an op without one warns.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if not torch.cuda.is_available():
        if opt.gpu_id:
            raise DeviceError(f"--gpu_id {opt.gpu_id}: this machine shows no such GPU (torch.cuda.is_available() "
                              f"is False); drop --gpu_id to train on the CPU, or check CUDA_VISIBLE_DEVICES")
        if opt.gpu_id is None:  # on stderr: --benchmark's stdout is its one result line
            distributed.print_on_rank0("no GPU found: training on the CPU")
        return torch.device("cpu"), {"gpu_id": "", "nthread": nthread}
    torch.backends.cudnn.benchmark = not opt.deterministic  # autotuning may pick another kernel per run
    if single_process:
        return torch.device("cuda"), {"gpu_id": opt.gpu_id or "0", "nthread": nthread}
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device, {"gpu_id": str(device.index), "nthread": nthread}


def set_fp32_precision(tf32):
    """cuDNN's convolutions and cuBLAS's matmuls in TF32 (Ampere+) if `tf32`, else IEEE fp32; oneDNN's in IEEE
    fp32. torch 2.9's per-backend precisions and the older flags all set: their readers raise if they differ."""
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    if hasattr(torch.backends, "fp32_precision"):  # torch 2.9 and later
        # RNNs as convolutions: the old cudnn.allow_tf32 reader compares the two.
        torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.mkldnn.matmul.fp32_precision = torch.backends.mkldnn.conv.fp32_precision = "ieee"


def device_name(device):
    return (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} thread" + ("s" if torch.get_num_threads() != 1 else ""))


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024), "process RSS"


def warn_slow_cpu_bf16(opt, device):
    """One line on stderr for --amp bf16 on a CPU without oneDNN's bf16 kernels (11.9x slower: docs/speed.md)."""
    if opt.amp == "bf16" and device.type == "cpu" and not (
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        distributed.print_on_rank0(f"warning: --amp bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, "
                                   f"no bf16 instructions) runs about 10x slower than fp32; drop --amp on it")
