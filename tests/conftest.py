"""Shared helpers: import the tools and either folder's modules, run main.py, write tiny datasets.

wrn/ and wrn_mobi/ each import their own `models`, `dcm_loss`, `dataset` by plain name, so the
two folders are loaded as tools/common.load_folder loads them, under separate namespaces.
"""
import importlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("wrn", "wrn_mobi")

# Unit-test tensors are tiny: one thread avoids threads spin-waiting for a busy core.
torch.set_num_threads(1)


def import_tools(*names):
    """tools/NAME.py modules; they import each other by plain name, as when run as scripts."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(ROOT / "tools"))


# The modules of wrn/ or wrn_mobi/ as a namespace: .models, .dcm_loss, .dataset, .main, ...
load_folder = import_tools("common")[0].load_folder


@pytest.fixture(params=FOLDERS)
def folder(request):
    """Runs a test once for each folder; the value is the folder's name."""
    return request.param


def run_main(folder, *args, cwd=None, timeout=240):
    """`python main.py ARGS` in wrn/ or wrn_mobi/ on the CPU; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # An empty --gpu_id hides every GPU (main.py sets CUDA_VISIBLE_DEVICES from it); ARGS may override.
    return subprocess.run([sys.executable, str(ROOT / folder / "main.py"), "--gpu_id", "", *map(str, args)],
                          cwd=cwd or ROOT / folder, env=env, capture_output=True, text=True, timeout=timeout)


def read_log(save_dir):
    """The json_stats records of SAVE/log.txt, in order."""
    lines = (Path(save_dir) / "log.txt").read_text().splitlines()
    assert all(line.startswith("json_stats: ") for line in lines), lines
    return [json.loads(line[len("json_stats: "):]) for line in lines]


def learnable_images(count, num_classes, seed, channels=3, size=32):
    """uint8 images whose class is visible in their mean brightness, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, count)
    base = (labels * (200 // max(num_classes - 1, 1)) + 20).astype(np.int16)
    noise = rng.integers(-20, 21, (count, channels, size, size))
    images = np.clip(base[:, None, None, None] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_cifar100(root, num_train=256, num_test=128, num_classes=100):
    """root/cifar-100-python/{train,test,meta} in the real pickle format (tiny)."""
    directory = Path(root) / "cifar-100-python"
    directory.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", num_train, 0), ("test", num_test, 1)):
        images, labels = learnable_images(count, num_classes, seed)
        batch = {b"filenames": [b"img%d.png" % i for i in range(count)], b"batch_label": name.encode(),
                 b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(),
                 b"data": images.reshape(count, -1)}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)
    meta = {b"fine_label_names": [b"class%d" % i for i in range(num_classes)],
            b"coarse_label_names": [b"super%d" % i for i in range(20)]}
    with open(directory / "meta", "wb") as f:
        pickle.dump(meta, f)
    return Path(root)


def write_fashion_mnist(root, num_train=256, num_test=128):
    """The four FashionMNIST idx files (28x28 uint8), unpacked in root/FashionMNIST/raw, tiny."""
    directory = Path(root) / "FashionMNIST" / "raw"
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", num_train, 0), ("t10k", num_test, 1)):
        images, labels = learnable_images(count, 10, seed, channels=1, size=28)
        (directory / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">HBBIII", 0, 8, 3, count, 28, 28) +
                                                                images.tobytes())
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 8, 1, count) +
                                                                labels.astype(np.uint8).tobytes())
    return Path(root)
