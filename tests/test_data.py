"""Dataset specs and loaders: digits, fake, CIFAR batches made here, ImageFolder trees made here."""

import pickle

import numpy as np
import pytest
import torch

from gaborprune.data import DataError, DataSpec, TensorData, load_data


def test_spec_parsing_and_errors():
    assert DataSpec.parse("fake:100:3") == DataSpec("fake", samples=100, classes=3)
    assert str(DataSpec.parse("fake:50")) == "fake:50:10"
    assert DataSpec.parse("cifar10:/data/c") == DataSpec("cifar10", path="/data/c")
    with pytest.raises(DataError, match="unknown dataset 'mnist'; known: cifar10:DIR"):
        DataSpec.parse("mnist")
    with pytest.raises(DataError, match="needs a folder: cifar100:DIR"):
        DataSpec.parse("cifar100")
    with pytest.raises(DataError, match="is not fake:N"):
        DataSpec.parse("fake:abc")


def test_digits_are_real_fixed_and_stratified():
    train, test = load_data("digits", (3, 32, 32))
    assert len(train) + len(test) == 1797 and 355 <= len(test) <= 365
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey replicated
    assert torch.bincount(test.labels).min() >= 35  # every class in the test split
    again, _ = load_data("digits", (3, 32, 32))
    assert torch.equal(again.labels, train.labels)
    assert not train.flip and train.crop_padding == 0  # flips would turn digits into other shapes
    x, y = next(train.batches(len(train), train=False))
    assert x.mean().abs() < 1e-4 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3  # normalised by train stats


def test_batches_shard_over_ranks_and_cover_everything():
    data = TensorData(torch.arange(10, dtype=torch.uint8)[:, None, None, None].expand(10, 1, 2, 2).contiguous(),
                      torch.arange(10), torch.zeros(1), torch.ones(1), 10)
    g = torch.Generator().manual_seed(0)
    seen = []
    for rank in range(2):
        g.manual_seed(0)  # every rank draws the same permutation
        seen += [int(v) for _, y in data.batches(3, train=True, generator=g, rank=rank, world=2) for v in y]
    assert sorted(seen) == list(range(10))
    odd = TensorData(data.images[:9], data.labels[:9], data.mean, data.std, 10)
    shards = []
    for rank in range(2):
        g.manual_seed(0)
        shards.append([int(v) for _, y in odd.batches(4, train=True, generator=g, rank=rank, world=2) for v in y])
    assert [len(s) for s in shards] == [4, 4] and not set(shards[0]) & set(shards[1])  # same step count on every rank
    evaluated = [int(v) for rank in range(2) for _, y in odd.batches(4, train=False, rank=rank, world=2) for v in y]
    assert sorted(evaluated) == list(range(9))  # evaluation sees every sample once


def test_random_crop_and_flip_match_a_per_image_oracle():
    n, p = 6, 2
    images = torch.randint(0, 255, (n, 3, 5, 7), dtype=torch.uint8)
    data = TensorData(images, torch.zeros(n, dtype=torch.int64), torch.zeros(3), torch.ones(3), 2, crop_padding=p, flip=True)
    g = torch.Generator().manual_seed(3)
    (x, _), = data.batches(n, train=True, generator=g)
    g.manual_seed(3)
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * p + 1, (2, n), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    for i in range(n):
        padded = torch.nn.functional.pad(images[order[i]].float() / 255, (p, p, p, p))
        want = padded[:, offsets[0, i]:offsets[0, i] + 5, offsets[1, i]:offsets[1, i] + 7]
        torch.testing.assert_close(x[i], want.flip(2) if flips[i] else want)


def write_cifar(root, n_train=20, n_test=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar_batches(tmp_path):
    folder = write_cifar(tmp_path)
    train, test = load_data(f"cifar10:{tmp_path}", (3, 32, 32))
    assert (len(train), len(test), train.num_classes) == (100, 10, 10)
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(test.images[3], torch.from_numpy(raw["data"][3].reshape(3, 32, 32)))
    assert train.crop_padding == 4 and train.flip and not test.flip
    assert load_data(f"cifar10:{folder}", (3, 32, 32))[1].images.shape == (10, 3, 32, 32)  # the batches folder itself


def test_missing_cifar_says_what_goes_where(tmp_path):
    with pytest.raises(DataError, match=r"lacks data_batch_1, .* test_batch; expected the python-version batches .*cifar-10-python.tar.gz"):
        load_data(f"cifar10:{tmp_path}", (3, 32, 32))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    folder = write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match="is not a cifar10 batch"):
        load_data(f"cifar10:{tmp_path}", (3, 32, 32))


def test_image_folder(tmp_path):
    from PIL import Image

    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((40, 50, 3), 60 * i, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    train, val = load_data(f"imagefolder:{tmp_path}", (3, 24, 24))
    assert (len(train), len(val), train.num_classes) == (8, 4, 2)
    x, y = next(val.batches(4, train=False))
    assert x.shape == (4, 3, 24, 24) and sorted(y.tolist()) == [0, 0, 1, 1]
    import shutil

    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError, match="lacks val/; expected .*/train/CLASS/"):
        load_data(f"imagefolder:{tmp_path}", (3, 24, 24))
