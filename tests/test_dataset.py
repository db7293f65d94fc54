"""dataset.py against SPEC §4 (Data): augmentation, batching, normalisation, the dataset readers."""
import os
import pickle
import re
import struct
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_folder, write_cifar100, write_fashion_mnist

CPU = torch.device("cpu")
ALL_CROPS = [(flip, oy, ox) for flip in (False, True) for oy in range(9) for ox in range(9)]


def reference_augment(image, flip, oy, ox):
    """Reflect-pad 4 (no edge repeat), flip horizontally, crop 32x32 at (oy, ox)."""
    padded = F.pad(image.float()[None], (4, 4, 4, 4), mode="reflect")[0]
    if flip:
        padded = padded.flip(-1)
    return padded[:, oy:oy + 32, ox:ox + 32]


def random_images(count, seed):
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def image_data(dataset, train_images, train_labels, num_classes, mean=None, std=None):
    mean = torch.tensor(dataset.CIFAR_MEAN if mean is None else mean).view(1, 3, 1, 1)
    std = torch.tensor(dataset.CIFAR_STD if std is None else std).view(1, 3, 1, 1)
    return dataset.ImageData(train_images, train_labels, train_images.clone(), train_labels.clone(), num_classes,
                             mean, std)


def coordinate_images(count):
    """Channel 0 holds the row index, channel 1 the column index: a crop shows where it was taken."""
    steps = torch.arange(32, dtype=torch.uint8)
    image = torch.stack([steps[:, None].expand(32, 32), steps[None, :].expand(32, 32),
                         torch.zeros(32, 32, dtype=torch.uint8)])
    return image[None].expand(count, 3, 32, 32).contiguous()


def decode_crop(augmented):
    """(flip, oy, ox) of augmented coordinate images, from their pixel (4, 4), which no reflection reaches."""
    rows, cols = augmented[:, 0, 4, 4].round().long(), augmented[:, 1, 4, 4].round().long()
    flips = cols >= 23  # unflipped: column ox in [0, 8]; flipped: column 31 - ox in [23, 31]
    return flips, rows, torch.where(flips, 31 - cols, cols)


def identity_normalisation(dataset, images, labels):
    """ImageData whose normalisation maps pixel values to themselves (mean 0, std 1/255)."""
    return image_data(dataset, images, labels, 10, mean=(0.0,) * 3, std=(1 / 255,) * 3)


# --- augment and reflect -------------------------------------------------------------------------

def test_augment_matches_pad_flip_crop_for_every_offset_and_flip(folder):
    dataset = load_folder(folder).dataset
    images = random_images(len(ALL_CROPS), seed=0)
    flips = torch.tensor([flip for flip, _, _ in ALL_CROPS])
    offsets = torch.tensor([[oy, ox] for _, oy, ox in ALL_CROPS])
    augmented = dataset.augment(images, flips, offsets)
    assert augmented.shape == images.shape and augmented.dtype == torch.uint8
    for index, (flip, oy, ox) in enumerate(ALL_CROPS):
        expected = reference_augment(images[index], flip, oy, ox)
        assert torch.equal(augmented[index].float(), expected), (flip, oy, ox)


def test_augment_with_centre_crop_and_no_flip_is_the_identity(folder):
    dataset = load_folder(folder).dataset
    images = random_images(3, seed=1)
    augmented = dataset.augment(images, torch.zeros(3, dtype=torch.bool), torch.full((3, 2), 4))
    assert torch.equal(augmented, images)
    flipped = dataset.augment(images, torch.ones(3, dtype=torch.bool), torch.full((3, 2), 4))
    assert torch.equal(flipped, images.flip(-1))


def test_reflect_mirrors_without_repeating_the_edge(folder):
    dataset = load_folder(folder).dataset
    index = torch.arange(-4, 36)
    expected = np.pad(np.arange(32), 4, mode="reflect")
    assert dataset.reflect(index, 32).tolist() == expected.tolist()
    assert dataset.reflect(torch.tensor([-1, 0, 31, 32]), 32).tolist() == [1, 0, 31, 30]


# --- train_batches --------------------------------------------------------------------------------

def batches_as_tensors(batches):
    batches = list(batches)
    return [images for images, _ in batches], [labels for _, labels in batches]


def test_train_batches_depend_only_on_seed_and_epoch(folder):
    dataset = load_folder(folder).dataset
    data = image_data(dataset, random_images(40, seed=2), torch.arange(40) % 10, 10)
    first_images, first_labels = batches_as_tensors(dataset.train_batches(data, 16, seed=1, epoch=3))
    again_images, again_labels = batches_as_tensors(dataset.train_batches(data, 16, seed=1, epoch=3))
    assert all(torch.equal(a, b) for a, b in zip(first_images, again_images))
    assert all(torch.equal(a, b) for a, b in zip(first_labels, again_labels))
    for seed, epoch in ((1, 4), (2, 3)):
        other_images, _ = batches_as_tensors(dataset.train_batches(data, 16, seed=seed, epoch=epoch))
        assert not torch.equal(torch.cat(first_images), torch.cat(other_images)), (seed, epoch)


def test_train_batches_shuffle_differently_each_epoch(folder):
    dataset = load_folder(folder).dataset
    data = image_data(dataset, random_images(40, seed=3), torch.arange(40), 40)
    orders = [torch.cat(batches_as_tensors(dataset.train_batches(data, 16, seed=1, epoch=epoch))[1])
              for epoch in (1, 2)]
    assert not torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[0], torch.arange(40))


def test_augmentation_is_drawn_per_sample(folder):
    dataset = load_folder(folder).dataset
    # Every training image is the same: any variety within a batch comes from per-sample draws.
    images = random_images(1, seed=4).expand(64, 3, 32, 32).contiguous()
    data = image_data(dataset, images, torch.zeros(64, dtype=torch.long), 10)
    batch, _ = next(dataset.train_batches(data, 64, seed=1, epoch=1))
    distinct = {tuple(image.flatten().tolist()) for image in batch}
    assert len(distinct) >= 32  # ~53 expected from 64 draws of 162 crops


def test_an_epoch_visits_every_image_once_with_its_label_and_a_partial_last_batch(folder):
    dataset = load_folder(folder).dataset
    count = 50
    # Uniform images (augmentation leaves them unchanged) whose pixel value identifies them.
    values = torch.arange(count, dtype=torch.uint8)
    images = torch.stack([values * 3, values * 3 + 1, values * 5]).T[:, :, None, None].expand(count, 3, 32, 32)
    data = image_data(dataset, images.contiguous(), torch.arange(count), count)
    batches = list(dataset.train_batches(data, 16, seed=1, epoch=1))
    assert [len(labels) for _, labels in batches] == [16, 16, 16, 2]
    labels = torch.cat([labels for _, labels in batches])
    assert sorted(labels.tolist()) == list(range(count))
    for batch_images, batch_labels in batches:
        assert batch_images.dtype == torch.float32 and batch_images.shape[1:] == (3, 32, 32)
        expected = (data.train_images[batch_labels].float() / 255 - data.mean) / data.std
        torch.testing.assert_close(batch_images, expected, rtol=0, atol=0)
        pixels = (batch_images * data.std + data.mean) * 255
        torch.testing.assert_close(pixels, data.train_images[batch_labels].float(), rtol=0, atol=1e-3)


def test_test_batches_are_normalised_in_order_without_augmentation(folder):
    dataset = load_folder(folder).dataset
    data = dataset.load_dataset("synthetic", None, CPU)
    count = len(data.test_labels)
    batches = list(dataset.test_batches(data, 100))
    assert [len(labels) for _, labels in batches] == [100] * (count // 100) + ([count % 100] if count % 100 else [])
    images = torch.cat([images for images, _ in batches])
    assert images.dtype == torch.float32
    assert torch.equal(torch.cat([labels for _, labels in batches]), data.test_labels)
    expected = (data.test_images.float() / 255 - data.mean) / data.std
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    mean, std = torch.tensor([0.5] * 3).view(1, 3, 1, 1), torch.tensor([0.25] * 3).view(1, 3, 1, 1)
    torch.testing.assert_close(data.mean, mean)
    torch.testing.assert_close(data.std, std)


def test_cifar_normalisation_constants(folder):
    dataset = load_folder(folder).dataset
    assert dataset.CIFAR_MEAN == pytest.approx([125.3 / 255, 123.0 / 255, 113.9 / 255])
    assert dataset.CIFAR_STD == pytest.approx([63.0 / 255, 62.1 / 255, 66.7 / 255])


def test_fashion_mnist_is_normalised_with_the_statistics_of_the_padded_images(folder):
    # Zero-padding 28x28 -> 32x32 keeps the pixel sum and the sum of squares: from the 28x28
    # training images' mean 0.286041 and std 0.353024 (the real files), the padded images' follow.
    dataset = load_folder(folder).dataset
    kept = 28 * 28 / (32 * 32)
    mean = 0.286041 * kept
    std = ((0.353024 ** 2 + 0.286041 ** 2) * kept - mean ** 2) ** 0.5
    assert dataset.FASHION_MNIST_MEAN == pytest.approx((mean,) * 3, abs=1e-4)
    assert dataset.FASHION_MNIST_STD == pytest.approx((std,) * 3, abs=1e-4)


def test_flips_and_offsets_are_uniform_and_independent(folder):
    dataset = load_folder(folder).dataset
    count = 3600
    data = identity_normalisation(dataset, coordinate_images(count), torch.zeros(count, dtype=torch.long))
    flips, rows, cols = [], [], []
    for images, _ in dataset.train_batches(data, 600, seed=1, epoch=1):
        batch_flips, batch_rows, batch_cols = decode_crop(images)
        # Both flips and several offsets inside every single batch.
        assert 0 < batch_flips.sum() < len(batch_flips)
        assert len(set(batch_rows.tolist())) == 9 and len(set(batch_cols.tolist())) == 9
        flips.append(batch_flips), rows.append(batch_rows), cols.append(batch_cols)
    flips, rows, cols = torch.cat(flips), torch.cat(rows), torch.cat(cols)
    assert 0.45 < flips.float().mean().item() < 0.55
    for offsets in (rows, cols):
        assert offsets.min() >= 0 and offsets.max() <= 8
        frequencies = torch.bincount(offsets, minlength=9).float() / count
        assert ((frequencies > 0.8 / 9) & (frequencies < 1.2 / 9)).all(), frequencies
    # Independent draws for rows and columns: they agree about 1 time in 9.
    assert (rows == cols).float().mean().item() < 0.2


def test_decode_crop_reads_back_every_crop(folder):
    # Guards the decoder that the distribution test relies on.
    dataset = load_folder(folder).dataset
    images = coordinate_images(len(ALL_CROPS))
    flips = torch.tensor([flip for flip, _, _ in ALL_CROPS])
    offsets = torch.tensor([[oy, ox] for _, oy, ox in ALL_CROPS])
    decoded_flips, decoded_rows, decoded_cols = decode_crop(dataset.augment(images, flips, offsets).float())
    assert torch.equal(decoded_flips, flips)
    assert torch.equal(torch.stack([decoded_rows, decoded_cols], 1), offsets)


# --- readers ---------------------------------------------------------------------------------------

def read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_cifar100_reader_returns_the_pickled_pixels_and_labels(folder, tmp_path):
    dataset = load_folder(folder).dataset
    write_cifar100(tmp_path, num_train=24, num_test=12)
    data = dataset.load_dataset("CIFAR100", tmp_path, CPU)
    assert data.num_classes == 100
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        content = read_pickle(tmp_path / "cifar-100-python" / split)
        assert images.dtype == torch.uint8 and images.shape == (len(content[b"fine_labels"]), 3, 32, 32)
        assert np.array_equal(images.numpy(), np.asarray(content[b"data"]).reshape(-1, 3, 32, 32))
        assert labels.dtype == torch.int64
        assert labels.tolist() == content[b"fine_labels"]
    torch.testing.assert_close(data.mean.flatten(), torch.tensor(dataset.CIFAR_MEAN))


def read_idx_file(path):
    content = path.read_bytes()
    num_dims = content[3]
    shape = struct.unpack(f">{num_dims}I", content[4:4 + 4 * num_dims])
    return np.frombuffer(content[4 + 4 * num_dims:], dtype=np.uint8).reshape(shape)


def test_fashion_mnist_reader_pads_to_32_and_replicates_channels(folder, tmp_path):
    dataset = load_folder(folder).dataset
    write_fashion_mnist(tmp_path, num_train=20, num_test=10)
    data = dataset.load_dataset("FashionMNIST", tmp_path, CPU)
    assert data.num_classes == 10
    for prefix, images, labels in (("train", data.train_images, data.train_labels),
                                   ("t10k", data.test_images, data.test_labels)):
        raw_images = read_idx_file(tmp_path / "FashionMNIST" / "raw" / f"{prefix}-images-idx3-ubyte")
        raw_labels = read_idx_file(tmp_path / "FashionMNIST" / "raw" / f"{prefix}-labels-idx1-ubyte")
        assert images.dtype == torch.uint8 and images.shape == (len(raw_images), 3, 32, 32)
        for channel in range(3):
            assert np.array_equal(images[:, channel, 2:30, 2:30].numpy(), raw_images)
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert images[:, :, border].eq(0).all()
        assert labels.dtype == torch.int64 and labels.tolist() == raw_labels.tolist()


def pixels_not_whole_images(content):
    batch = pickle.loads(content)
    return pickle.dumps({**batch, b"data": batch[b"data"].reshape(-1)[:-5]})


@pytest.mark.parametrize("damage", [lambda content: b"not a pickle at all", lambda content: b"",
                                    lambda content: content[:500], pixels_not_whole_images],
                         ids=["not_a_pickle", "empty", "truncated", "pixels_not_whole_images"])
def test_a_damaged_cifar_file_is_named_in_a_dataset_error(folder, tmp_path, damage):
    dataset = load_folder(folder).dataset
    write_cifar100(tmp_path, num_train=8, num_test=4)
    train_file = tmp_path / "cifar-100-python" / "train"
    train_file.write_bytes(damage(train_file.read_bytes()))
    with pytest.raises(dataset.DatasetError, match=f"^{re.escape(str(train_file))} is not a readable CIFAR file"):
        dataset.load_dataset("CIFAR100", tmp_path, CPU)


def test_a_damaged_fashion_mnist_file_raises_a_dataset_error(folder, tmp_path):
    dataset = load_folder(folder).dataset
    write_fashion_mnist(tmp_path, num_train=8, num_test=4)
    (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(dataset.DatasetError, match="could neither read nor download FashionMNIST"):
        dataset.load_dataset("FashionMNIST", tmp_path, CPU)


def refuse_download(url, download_root, *args, **kwargs):
    os.makedirs(download_root, exist_ok=True)  # as torchvision's download does before it connects
    raise urllib.error.URLError("network is unreachable")


@pytest.mark.parametrize("name,expected_folder", [
    ("CIFAR100", ("cifar-100-python",)), ("CIFAR10", ("cifar-10-batches-py",)),
    ("FashionMNIST", ("FashionMNIST", "raw"))])
def test_a_failed_download_says_where_to_put_the_files_and_leaves_no_folder(folder, tmp_path, monkeypatch,
                                                                            name, expected_folder):
    from torchvision.datasets import cifar, mnist  # a requirement; imported here because it is slow to import
    dataset = load_folder(folder).dataset
    for module in (cifar, mnist):
        monkeypatch.setattr(module, "download_and_extract_archive", refuse_download)
    root = tmp_path / "new" / "data"
    with pytest.raises(dataset.DatasetError) as error:
        dataset.load_dataset(name, str(root), CPU)
    message = str(error.value)
    assert os.path.join(str(root), *expected_folder) in message
    assert "network is unreachable" in message
    assert re.search(r"download .*https?://", message) and "\n" not in message  # from where, on one line
    assert list(tmp_path.iterdir()) == []
