"""Image datasets held whole (CIFAR is 150 MB) as uint8 tensors on the training device, where each
training batch is augmented in one gather (reflect-pad 4, random flip, random 32x32 crop, drawn per
sample on the CPU: the same (seed, epoch) gives the same batches on any device) and normalised."""
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
# Of the 60000 training images zero-padded 28x28 -> 32x32 as the networks see them (the real files:
# 0.218996, 0.331811); the unpadded images' (0.2860, 0.3530) would feed inputs of mean -0.19, std 0.94.
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
    if name == "synthetic":
        return random_image_data(2048, NUM_CLASSES[name], device, num_test=512)
    if name in CIFAR_FILES:
        arrays, mean, std = read_cifar(name, root), CIFAR_MEAN, CIFAR_STD
    else:  # FashionMNIST (--dataset admits no other name), zero-padded 28 -> 32, in 3 channels
        arrays, mean, std = [], FASHION_MNIST_MEAN, FASHION_MNIST_STD
        for split in from_torchvision(name, root, os.path.join(root, name, "raw")):
            arrays += [torch.nn.functional.pad(split.data, (2, 2, 2, 2))[:, None].repeat(1, 3, 1, 1), split.targets]
    mean, std = (torch.tensor(values, device=device).view(1, -1, 1, 1) for values in (mean, std))
    return ImageData(*(torch.as_tensor(array).to(device) for array in arrays), NUM_CLASSES[name], mean, std)


def read_cifar(name, root):
    """[train images, train labels, test images, test labels] of CIFAR-10/100's pickles in torchvision's
    layout (root/cifar-100-python/train, ...): its reader refuses files of another md5, the tests' too."""
    folder, *splits, label_key = CIFAR_FILES[name]
    splits = [[os.path.join(root, folder, filename) for filename in files] for files in splits]
    if not all(os.path.isfile(path) for path in splits[0] + splits[1]):
        print(f"{name} not found in {root}: downloading it there with torchvision")
        from_torchvision(name, root, os.path.join(root, folder))
    arrays = []
    for paths in splits:
        images, labels = [], []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    content = pickle.load(f, encoding="bytes")
                images.append(np.asarray(content[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(content[label_key], dtype=np.int64))
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
                raise DatasetError(f"{path} is not a readable CIFAR file ({type(error).__name__}: {error}); delete "
                                   f"its folder to download it again, or replace it") from None
        arrays += [np.concatenate(images), np.concatenate(labels)]
    return arrays


def from_torchvision(name, root, expected):
    """[training set, test set] of torchvision's dataset `name`, downloaded into `root` where missing; if
    that fails, DatasetError says where to put the files by hand, and the folders it created go."""
    try:  # imported where needed (slow); one built for another torch dies here: `torchvision::nms does not exist`
        import torchvision
    except (ImportError, RuntimeError) as error:
        version = next((d.version for d in importlib.metadata.distributions(name="torchvision")), "(not installed)")
        release, _, build = torch.__version__.partition("+")  # +cpu, +cu126, +rocm6.2: PyTorch's own index
        index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
        raise DatasetError(f"torchvision {version} does not import with torch {torch.__version__} "
                           f"({type(error).__name__}: {' '.join(str(error).split())}): they must be builds for each "
                           f"other; reinstall both from one index: pip install --force-reinstall torch=={release} "
                           f"torchvision{index}") from None
    source = getattr(torchvision.datasets, name)
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


def random_image_data(num_train, num_classes, device, seed=0, num_test=0):
    """ImageData of 32x32 images drawn on the CPU from `seed`, a smooth random colour pattern per class
    plus pixel noise: --dataset synthetic's, and the batches timed without a dataset."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, 4, 4, generator=generator) * 255
    patterns = torch.nn.functional.interpolate(patterns, size=32, mode="bilinear", align_corners=False)

    def sample(count):
        labels = torch.randint(num_classes, (count,), generator=generator)
        noise = torch.randn(count, 3, 32, 32, generator=generator) * 40
        return (patterns[labels] + noise).clamp(0, 255).round().to(torch.uint8).to(device), labels.to(device)

    mean, std = (torch.full((1, 3, 1, 1), value, device=device) for value in (0.5, 0.25))
    return ImageData(*sample(num_train), *sample(num_test), num_classes, mean, std)


def training_subset(data, size, seed):
    """`data` with `size` training images chosen by `seed`, classes as even as the training set allows
    (counts differ by at most one while every class has images left); DatasetError if it holds fewer."""
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
    """Reflect-pad 4, flip where `flips`, crop at `offsets` (y, x) in [0, 8], in one gather: pixel (r, c) of
    sample b is the image's at row reflect(y_b + r - 4), column reflect(x_b + c - 4) (mirrored if flipped)."""
    batch, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    steps = torch.arange(size, device=images.device)
    rows, cols = offsets[:, :1] + steps, offsets[:, 1:] + steps  # (B, size), coordinates in the padded image
    cols = torch.where(flips[:, None], size + 2 * PAD - 1 - cols, cols)
    rows, cols = reflect(rows - PAD, size), reflect(cols - PAD, size)
    return images[torch.arange(batch, device=images.device)[:, None, None, None],
                  torch.arange(channels, device=images.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def train_batches(data, batch_size, seed, epoch, first_batch=0):
    """Shuffled, augmented, normalised (images, labels) batches of one training epoch, from batch
    `first_batch` on (the same batches as the whole epoch's, for a run resumed mid-epoch)."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    count, device = len(data.train_labels), data.train_images.device
    order = torch.randperm(count, generator=generator).to(device)
    flips = (torch.rand(count, generator=generator) < 0.5).to(device)
    offsets = torch.randint(0, 2 * PAD + 1, (count, 2), generator=generator).to(device)
    for start in range(first_batch * batch_size, count, batch_size):
        index = order[start:start + batch_size]
        images = augment(data.train_images[index], flips[start:start + batch_size], offsets[start:start + batch_size])
        yield normalize(images, data.mean, data.std), data.train_labels[index]


def test_batches(data, batch_size, start=0, stop=None):
    """Test images [start, stop) (all, or a process's shard under torchrun) in order, normalised, not augmented."""
    images, labels = data.test_images[start:stop], data.test_labels[start:stop]
    for first in range(0, len(labels), batch_size):
        yield normalize(images[first:first + batch_size], data.mean, data.std), labels[first:first + batch_size]
