"""The textbook DCM training step, timed: the baseline that `main.py --benchmark` is measured against.

    python tools/plain_step.py --folder wrn --depth 16 --width 1 --steps 20

Builds the folder's pair with models.build_pair, and times `dcm_loss(net1(x), net2(x), y)`,
`backward()` and a default `torch.optim.SGD` step in eager fp32 on one batch made in advance, in
a process that leaves the C allocator at its defaults. Prints one line: img/s and ms/step.
"""
import argparse
import os
import time

import torch

from common import FOLDERS, load_folder

WARMUP_STEPS = 3


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=FOLDERS[0], choices=FOLDERS)
    parser.add_argument("--depth", default=28, type=int)
    parser.add_argument("--width", default=10, type=int)
    parser.add_argument("--num_classes", default=100, type=int)
    parser.add_argument("--batch_size", default=128, type=int)
    parser.add_argument("--steps", default=20, type=int)
    parser.add_argument("--nthread", default=None, type=int, help="default: the cores this process may use")
    parser.add_argument("--gpu_id", default=None, type=str, help="'' for the CPU (default: GPU 0, or the CPU)")
    return parser.parse_args(argv)


def main(argv=None):
    opt = parse_options(argv)
    if opt.gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = opt.gpu_id
    folder = load_folder(opt.folder)
    hardware, models, dcm_loss = folder.hardware, folder.models, folder.dcm_loss.dcm_loss

    torch.set_num_threads(opt.nthread or hardware.available_cores())
    hardware.set_fp32_precision(False)  # IEEE fp32 convolutions, as main.py's default
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(1)
    net1, net2 = (net.to(device) for net in models.build_pair(opt.depth, opt.width, opt.num_classes, True))
    optimizer = torch.optim.SGD(list(net1.parameters()) + list(net2.parameters()), 0.1, momentum=0.9,
                                weight_decay=5e-4)
    images = torch.randn(opt.batch_size, 3, 32, 32, device=device)
    targets = torch.randint(0, opt.num_classes, (opt.batch_size,), device=device)

    def train_step():
        loss = dcm_loss(net1(images), net2(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(opt.steps):
        train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds_per_step = (time.perf_counter() - start) / opt.steps
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    pair = " + ".join(models.pair_names(opt.depth, opt.width))
    print(" | ".join(["plain step", pair, "dcm (dense links)", f"batch {opt.batch_size}", "fp32, eager, textbook",
                      device_name, f"{opt.batch_size / seconds_per_step:.1f} img/s",
                      f"{seconds_per_step * 1e3:.2f} ms/step"]), flush=True)


if __name__ == "__main__":
    main()
