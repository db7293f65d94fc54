"""Image datasets held as uint8 tensors on the training device, and batched augmentation there.

The whole dataset (CIFAR is 150 MB) is loaded once onto the device; every training batch is
augmented in one gather (reflect-pad 4, random horizontal flip, random 32x32 crop, each drawn per
sample) and normalised there. No worker processes, and the same (seed, epoch) gives the same
batches on any device, because the random draws are made on the CPU.
"""
import importlib.metadata
import os
import pickle
import shutil
from dataclasses import dataclass, replace

import numpy as np
import torch

PAD = 4
CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
# Those of the 60000 FashionMNIST training images zero-padded 28x28 -> 32x32, as the networks see
# them (measured on the real files: 0.218996, 0.331811); the unpadded images' (0.2860, 0.3530)
# would feed inputs of mean -0.19, std 0.94.
FASHION_MNIST_MEAN = (0.2190,) * 3
FASHION_MNIST_STD = (0.3318,) * 3
NUM_CLASSES = {"CIFAR100": 100, "CIFAR10": 10, "FashionMNIST": 10, "synthetic": 10}
DATASETS = tuple(NUM_CLASSES)
CIFAR_FILES = {  # torchvision's folder in --dataroot, the training files, the test files, the label key
    "CIFAR100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], ["test_batch"], b"labels")}


class DatasetError(Exception):
    """A dataset that cannot be found, downloaded or read: the message says how to fix it."""


@dataclass
class ImageData:
    train_images: torch.Tensor  # uint8 (N, 3, 32, 32) on the device
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # float32 (1, 3, 1, 1) on the device
    std: torch.Tensor


def load_dataset(name, root, device):
    """Dataset `name` from `root`, downloaded there through torchvision where it is missing."""
    if name in CIFAR_FILES:
        arrays, mean, std = read_cifar(name, root), CIFAR_MEAN, CIFAR_STD
    elif name == "FashionMNIST":
        arrays, mean, std = read_fashion_mnist(root), FASHION_MNIST_MEAN, FASHION_MNIST_STD
    elif name == "synthetic":
        arrays, mean, std = make_synthetic(), (0.5,) * 3, (0.25,) * 3
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    train_images, train_labels, test_images, test_labels = (torch.as_tensor(a).to(device) for a in arrays)
    mean, std = (torch.tensor(values, device=device).view(1, -1, 1, 1) for values in (mean, std))
    return ImageData(train_images, train_labels.long(), test_images, test_labels.long(), NUM_CLASSES[name], mean, std)


def read_cifar(name, root):
    """[train images, train labels, test images, test labels] from CIFAR-10/100's python pickles in
    torchvision's layout (root/cifar-100-python/train, ...). Read here: torchvision's reader refuses
    every file whose md5 is not the original's, the tests' tiny ones too."""
    folder, *splits, label_key = CIFAR_FILES[name]
    splits = [[os.path.join(root, folder, filename) for filename in files] for files in splits]
    if not all(os.path.isfile(path) for path in splits[0] + splits[1]):
        print(f"{name} not found in {root}: downloading it there with torchvision")
        from_torchvision(name, root, os.path.join(root, folder))
    arrays = []
    for paths in splits:
        images, labels = zip(*(read_cifar_file(path, label_key) for path in paths))
        arrays += [np.concatenate(images), np.concatenate(labels)]
    return arrays


def read_cifar_file(path, label_key):
    """(uint8 images (N, 3, 32, 32), int64 labels (N,)) of one CIFAR pickle; DatasetError if it is none."""
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="bytes")
        return (np.asarray(content[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32),
                np.asarray(content[label_key], dtype=np.int64))
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{path} is not a readable CIFAR file ({type(error).__name__}: {error}); delete "
                           f"its folder to download it again, or replace it") from None


def read_fashion_mnist(root):
    """FashionMNIST as torchvision reads it from its layout (the four unpacked idx files in
    root/FashionMNIST/raw), padded 28 -> 32 with zeros and replicated to 3 channels."""
    arrays = []
    for split in from_torchvision("FashionMNIST", root, os.path.join(root, "FashionMNIST", "raw")):
        arrays += [torch.nn.functional.pad(split.data, (2, 2, 2, 2))[:, None].repeat(1, 3, 1, 1), split.targets]
    return arrays


def from_torchvision(name, root, expected):
    """[training set, test set] of torchvision's dataset `name` in `root`, downloaded there where
    missing (torchvision checks the md5 of what it fetches). Where that fails, the folders the
    download created go, and DatasetError says where to put the files by hand."""
    source = getattr(import_torchvision().datasets, name)
    top = os.path.abspath(root)  # the outermost folder that a download creates, if any
    while not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    created = not os.path.exists(top)
    try:
        return [source(root, train=train, download=True) for train in (True, False)]
    except Exception as error:  # no network, a failed checksum, a read-only root, unreadable files, ...
        if created:
            shutil.rmtree(top, ignore_errors=True)
        by_hand = (f"{source.url} and unpack it in {root}, so that {expected} exists" if name in CIFAR_FILES else
                   f"{', '.join(f for f, _ in source.resources)} from {source.mirrors[0]}, gunzipped, into {expected}")
        raise DatasetError(f"torchvision could neither read nor download {name} in {root} ({type(error).__name__}: "
                           f"{' '.join(str(error).split())}). Put it there by hand: download {by_hand}; then run "
                           f"again with --dataroot {root}") from None


def import_torchvision():
    """torchvision, imported only where a dataset needs it (it is slow to import). One built for
    another torch dies inside its import (`RuntimeError: operator torchvision::nms does not exist`):
    DatasetError names both versions and pip's command that installs both from torch's wheel index."""
    try:
        import torchvision
    except (ImportError, RuntimeError) as error:
        version = next((d.version for d in importlib.metadata.distributions(name="torchvision")), "(not installed)")
        release, _, build = torch.__version__.partition("+")  # +cpu, +cu126, +rocm6.2: PyTorch's own index
        index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
        raise DatasetError(f"torchvision {version} does not import with torch {torch.__version__} "
                           f"({type(error).__name__}: {' '.join(str(error).split())}): they must be builds for each "
                           f"other; reinstall both from one index: pip install --force-reinstall torch=={release} "
                           f"torchvision{index}") from None
    return torchvision


def make_synthetic(num_train=2048, num_test=512, num_classes=10):
    """Deterministic 32x32 images: a smooth random colour pattern per class plus pixel noise."""
    generator = torch.Generator().manual_seed(0)
    patterns = torch.rand(num_classes, 3, 4, 4, generator=generator) * 255
    patterns = torch.nn.functional.interpolate(patterns, size=32, mode="bilinear", align_corners=False)

    def sample(count):
        labels = torch.randint(num_classes, (count,), generator=generator)
        noise = torch.randn(count, 3, 32, 32, generator=generator) * 40
        return (patterns[labels] + noise).clamp(0, 255).round().to(torch.uint8).numpy(), labels.numpy()

    return (*sample(num_train), *sample(num_test))


def random_image_data(num_train, num_classes, device, seed=0):
    """Uniform random uint8 images and labels made on `device`, for timing the pipeline without a dataset."""
    generator = torch.Generator(device).manual_seed(seed)
    images = torch.randint(0, 256, (num_train, 3, 32, 32), generator=generator, device=device, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (num_train,), generator=generator, device=device)
    mean, std = (torch.tensor(values, device=device).view(1, -1, 1, 1) for values in (CIFAR_MEAN, CIFAR_STD))
    return ImageData(images, labels, images[:0], labels[:0], num_classes, mean, std)


def training_subset(data, size, seed):
    """`data` with `size` training images only: the same for every epoch of a run, chosen by
    `seed`, with every class as evenly represented as the training set allows (counts differ by
    at most one while every class has images left). The test set stays whole. Raises
    DatasetError when the training set holds fewer than `size` images."""
    labels = data.train_labels.cpu()
    if size > len(labels):
        raise DatasetError(f"--subset {size}: the training set holds only {len(labels)} images; "
                           f"give at most {len(labels)}, or drop --subset to train on all of them")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    # Rank of each image among those of its class, in the shuffled order; then take round by round
    # (every class's first image, then every class's second, ...) until `size` are taken.
    shuffled = labels[order]
    rank = torch.zeros_like(order)
    for label in shuffled.unique():
        in_class = shuffled == label
        rank[in_class] = torch.arange(int(in_class.sum()))
    taken = order[torch.argsort(rank * len(labels) + torch.arange(len(labels)))[:size]].sort().values
    taken = taken.to(data.train_images.device)
    return replace(data, train_images=data.train_images[taken], train_labels=data.train_labels[taken])


def normalize(images, mean, std):
    """uint8 (B, 3, H, W) -> float32 normalised with ImageData's mean and std ((1, 3, 1, 1))."""
    return (images.float() / 255 - mean) / std


def reflect(index, size):
    """Map coordinates in [-size+1, 2*size-2] into [0, size) by mirroring without repeating the edge."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def augment(images, flips, offsets):
    """Reflect-pad 4, flip the padded image where flips is True, crop at offsets (y, x) in [0, 8];
    in one gather: output pixel (r, c) of sample b is the unpadded image's pixel at row
    reflect(y_b + r - 4), column reflect(x_b + c - 4) (of the mirrored column when flipped)."""
    batch, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    steps = torch.arange(size, device=images.device)
    rows = offsets[:, :1] + steps  # (B, size), coordinates in the padded image
    cols = offsets[:, 1:] + steps
    cols = torch.where(flips[:, None], size + 2 * PAD - 1 - cols, cols)
    rows, cols = reflect(rows - PAD, size), reflect(cols - PAD, size)
    return images[torch.arange(batch, device=images.device)[:, None, None, None],
                  torch.arange(channels, device=images.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def epoch_generator(seed, epoch):
    """The CPU generator of one epoch: shuffling and augmentation depend only on (seed, epoch)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def train_batches(data, batch_size, seed, epoch, first_batch=0):
    """Shuffled, augmented, normalised (images, labels) batches of one training epoch, from batch
    `first_batch` on (the same batches as the whole epoch's, for a run resumed mid-epoch)."""
    generator = epoch_generator(seed, epoch)
    count, device = len(data.train_labels), data.train_images.device
    order = torch.randperm(count, generator=generator).to(device)
    flips = (torch.rand(count, generator=generator) < 0.5).to(device)
    offsets = torch.randint(0, 2 * PAD + 1, (count, 2), generator=generator).to(device)
    for start in range(first_batch * batch_size, count, batch_size):
        index = order[start:start + batch_size]
        images = augment(data.train_images[index], flips[start:start + batch_size], offsets[start:start + batch_size])
        yield normalize(images, data.mean, data.std), data.train_labels[index]


def test_batches(data, batch_size, start=0, stop=None):
    """The test set in order, normalised, not augmented; images [start, stop) only (a process's
    shard under torchrun) when given."""
    stop = len(data.test_labels) if stop is None else stop
    for first in range(start, stop, batch_size):
        last = min(first + batch_size, stop)
        yield normalize(data.test_images[first:last], data.mean, data.std), data.test_labels[first:last]


def num_batches(count, batch_size):
    return (count + batch_size - 1) // batch_size
