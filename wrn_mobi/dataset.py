"""Image datasets held as uint8 tensors on the training device, and batched augmentation there.

The whole dataset (CIFAR is 150 MB) is loaded once onto the device; every training batch is
augmented in one gather (reflect-pad 4, random horizontal flip, random 32x32 crop, each drawn per
sample) and normalised on the device. No worker processes, and the same (seed, epoch) gives the
same batches on any device, because the random draws are made on the CPU.
"""
import gzip
import importlib.metadata
import os
import pickle
import shutil
import struct
from dataclasses import dataclass, replace

import numpy as np
import torch

PAD = 4
CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
# Pixel mean and std of what the networks are fed: the 60000 FashionMNIST training images after
# zero-padding 28x28 -> 32x32 (to_rgb32), the same for the 3 replicated channels. Measured on the
# real files (Debian's dataset-fashion-mnist: mean 0.218996, std 0.331811). The often quoted
# (0.2860, 0.3530) are those of the unpadded 28x28 images: with them the padded inputs came out
# at mean -0.19, std 0.94.
FASHION_MNIST_MEAN = (0.2190,) * 3
FASHION_MNIST_STD = (0.3318,) * 3
NUM_CLASSES = {"CIFAR100": 100, "CIFAR10": 10, "FashionMNIST": 10, "synthetic": 10}
DATASETS = tuple(NUM_CLASSES)

CIFAR_LAYOUT = {  # folder inside --dataroot, training files, test files, label key, meta file, class-names key
    "CIFAR100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], ["test_batch"], b"labels",
                "batches.meta", b"label_names"),
}
CIFAR_ARCHIVES = {"CIFAR100": "cifar-100-python.tar.gz", "CIFAR10": "cifar-10-python.tar.gz"}
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DatasetError(Exception):
    """A dataset that cannot be found, downloaded or read: the message says how to fix it."""


@dataclass
class ImageData:
    train_images: torch.Tensor  # uint8 (N, 3, 32, 32) on the device
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # per-channel, (1, 3, 1, 1) on the device
    std: torch.Tensor


def load_dataset(name, root, device):
    """Read dataset `name` from `root` (downloading it there through torchvision if it is missing)."""
    if name in CIFAR_LAYOUT:
        arrays, num_classes = read_cifar(name, root)
        mean, std = CIFAR_MEAN, CIFAR_STD
    elif name == "FashionMNIST":
        arrays, num_classes = read_fashion_mnist(root), 10
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    elif name == "synthetic":
        arrays, num_classes = make_synthetic(), 10
        mean, std = (0.5,) * 3, (0.25,) * 3
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    train_images, train_labels, test_images, test_labels = (torch.as_tensor(a).to(device) for a in arrays)
    mean, std = (torch.tensor(values, device=device).view(1, -1, 1, 1) for values in (mean, std))
    return ImageData(train_images, train_labels.long(), test_images, test_labels.long(), num_classes, mean, std)


# --- CIFAR: the python pickles of cifar-10/100 ---------------------------------------------------

def read_cifar(name, root):
    """The four arrays (train images, train labels, test images, test labels) and the class count."""
    folder, train_files, test_files, label_key, meta_file, names_key = CIFAR_LAYOUT[name]
    directory = os.path.join(root, folder)
    if not all(os.path.isfile(os.path.join(directory, f)) for f in train_files + test_files + [meta_file]):
        download_with_torchvision(name, root, expected=directory)
    train = [read_cifar_pickle(os.path.join(directory, f), [b"data", label_key]) for f in train_files]
    test = [read_cifar_pickle(os.path.join(directory, f), [b"data", label_key]) for f in test_files]
    class_names, = read_cifar_pickle(os.path.join(directory, meta_file), [names_key])
    arrays = []
    for part in (train, test):
        try:
            images = np.concatenate([np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32) for data, _ in part])
            labels = np.concatenate([np.asarray(labels, dtype=np.int64) for _, labels in part])
        except ValueError as error:  # pixel data that is not a whole number of 3x32x32 images
            raise DatasetError(f"{directory} holds malformed image data ({error}); replace the files") from None
        if len(images) == 0 or len(images) != len(labels) or labels.min() < 0 or labels.max() >= len(class_names):
            raise DatasetError(f"{directory} holds {len(images)} images with {len(labels)} labels for "
                               f"{len(class_names)} classes: the files do not belong together; replace them")
        arrays += [images, labels]
    return arrays, len(class_names)


def read_cifar_pickle(path, keys):
    """The values of `keys` in one CIFAR pickle (data batch or meta file)."""
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="bytes")
        return [content[key] for key in keys]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as error:
        raise DatasetError(f"{path} is not a readable CIFAR file ({type(error).__name__}: {error}); delete "
                           f"the folder to download it again, or replace it by hand") from None


def import_torchvision():
    """torchvision, imported here only (it is slow to import, and a run on files already there needs
    none of it). Raises DatasetError naming both versions and the fix where it does not import: a
    torchvision built for another torch (installed from another wheel index) dies deep inside its
    import with `RuntimeError: operator torchvision::nms does not exist`."""
    try:
        import torchvision
    except (ImportError, RuntimeError) as error:
        try:
            version = importlib.metadata.version("torchvision")
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed)"
        raise DatasetError(f"torchvision {version} does not import with torch {torch.__version__} "
                           f"({type(error).__name__}: {' '.join(str(error).split())}): they must be builds for each "
                           f"other; reinstall both from one index: {reinstall_command()}") from None
    return torchvision


def reinstall_command():
    """pip's command that installs this torch again with the torchvision built for it, from the
    wheel index of its build: PyTorch's for a +cpu, +cuXYZ or +rocmX build, PyPI's otherwise."""
    release, _, build = torch.__version__.partition("+")
    index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
    return f"pip install --force-reinstall torch=={release} torchvision{index}"


def download_with_torchvision(name, root, expected):
    """Let torchvision download and verify (md5) the archive, then read the files ourselves."""
    torchvision = import_torchvision()

    print(f"{name} not found in {root}: downloading it there with torchvision")
    # What exists before, so that a failed download leaves no folder or partial file behind.
    missing_top = os.path.abspath(root)
    while not os.path.exists(os.path.dirname(missing_top)):
        missing_top = os.path.dirname(missing_top)
    entries_before = set(os.listdir(root)) if os.path.isdir(root) else None
    try:
        getattr(torchvision.datasets, name)(root, train=True, download=True)
        getattr(torchvision.datasets, name)(root, train=False, download=True)
    except Exception as error:  # network errors, checksum failures, a read-only root, ...
        if entries_before is None:
            shutil.rmtree(missing_top, ignore_errors=True)
        else:
            for entry in set(os.listdir(root)) - entries_before:
                path = os.path.join(root, entry)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        if corrupt_archive(name, root):
            raise DatasetError(
                f"{os.path.join(root, CIFAR_ARCHIVES[name])} fails torchvision's md5 checksum: it is a partial or "
                f"corrupted "
                f"download, or another file of that name. Delete it (a run then downloads it again) or replace "
                f"it by the original archive, then run again with --dataroot {root}") from None
        raise DatasetError(f"{name} is not in {root} and its download failed ({type(error).__name__}: "
                           f"{' '.join(str(error).split())}). {by_hand(name, root, expected)}") from None


def by_hand(name, root, expected):
    """How to put dataset `name` into `root` without torchvision's download: from where, and where to."""
    # torchvision knows the addresses; its dataset modules hold the classes that download.
    from torchvision.datasets import cifar, mnist

    source = getattr(cifar if name in CIFAR_LAYOUT else mnist, name)
    if name in CIFAR_LAYOUT:
        return (f"Put it there by hand: download {source.url} and unpack it in {root}, so that {expected} exists; "
                f"then run again with --dataroot {root}")
    files = ", ".join(filename for filename, _ in source.resources)
    return (f"Put it there by hand: download {files} from {source.mirrors[0]} into {root} or {expected} (the .gz "
            f"files as they are); then run again with --dataroot {root}")


def corrupt_archive(name, root):
    """Whether root holds the CIFAR archive of `name` with another md5 than torchvision's: torchvision
    then tries to download it again, and that failure would hide the real problem."""
    from torchvision.datasets import cifar
    from torchvision.datasets.utils import check_integrity

    if name not in CIFAR_ARCHIVES or not os.path.isfile(os.path.join(root, CIFAR_ARCHIVES[name])):
        return False
    return not check_integrity(os.path.join(root, CIFAR_ARCHIVES[name]), getattr(cifar, name).tgz_md5)


# --- FashionMNIST: idx files, as in torchvision's layout or a plain folder -----------------------

def read_fashion_mnist(root):
    """FashionMNIST padded 28 -> 32 with zeros and replicated to 3 channels."""
    paths = [find_idx_file(root, name) for name in FASHION_MNIST_FILES]
    if None in paths:
        download_with_torchvision("FashionMNIST", root, expected=os.path.join(root, "FashionMNIST", "raw"))
        paths = [find_idx_file(root, name) for name in FASHION_MNIST_FILES]
    train_images, train_labels, test_images, test_labels = (read_idx(path) for path in paths)
    return (to_rgb32(train_images), train_labels.astype(np.int64), to_rgb32(test_images), test_labels.astype(np.int64))


def find_idx_file(root, name):
    for folder in (os.path.join(root, "FashionMNIST", "raw"), root):
        for filename in (name, name + ".gz"):
            if os.path.isfile(os.path.join(folder, filename)):
                return os.path.join(folder, filename)
    return None


def read_idx(path):
    """An idx file (uint8 data, big-endian header), gzipped or not, as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            content = f.read()
        zero, dtype_code, num_dims = struct.unpack(">HBB", content[:4])
        shape = struct.unpack(f">{num_dims}I", content[4:4 + 4 * num_dims])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not a uint8 idx file")
        return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)
    except (OSError, EOFError, struct.error, ValueError) as error:
        raise DatasetError(f"{path} is not a readable idx file ({error}); replace it") from None


def to_rgb32(images):
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[:, None], 3, axis=1)


# --- synthetic: a small learnable dataset for smoke runs -----------------------------------------

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


# --- a short run: a fixed class-balanced subset of the training set ------------------------------

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


# --- batches -------------------------------------------------------------------------------------

def normalize(images, mean, std):
    """uint8 (B, 3, H, W) -> float32 normalised with the per-channel mean and std (sequences or tensors)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def reflect(index, size):
    """Map coordinates in [-size+1, 2*size-2] into [0, size) by mirroring without repeating the edge."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def augment(images, flips, offsets):
    """Reflect-pad 4, flip the padded image where flips is True, crop at offsets (y, x) in [0, 8].

    One gather for the whole batch: for output pixel (r, c) of sample b, the source pixel of the
    unpadded image is row reflect(y_b + r - 4), column reflect(x_b + c - 4) (or the mirrored
    column of the padded image when flipped).
    """
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
