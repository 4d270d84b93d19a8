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
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.permutation(np.arange(n) % 10)]}  # every class
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


def write_cifar_tree(root, batches_folder, classes=10):
    """The batches under `batches_folder` exported as a PNG tree (lossless), CLASS/NNNN.png per split,
    each class's images in batch order: the layout CIFAR exports use."""
    from PIL import Image

    names = [f"class{c:02d}" for c in range(classes)]
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        counts = [0] * classes
        for name in files:
            with open(batches_folder / name, "rb") as f:
                batch = pickle.load(f)
            for row, label in zip(batch["data"], batch["labels"]):
                folder = root / split / names[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).save(folder / f"{counts[label]:04d}.png")
                counts[label] += 1


def _by_label(data):
    """Images and labels in label order, each label's images in their original order."""
    order = torch.sort(data.labels, stable=True).indices
    return data.images[order], data.labels[order]


def test_cifar_image_tree_loads_the_same_tensors_as_the_batches(tmp_path):
    batches = write_cifar(tmp_path / "batches")
    write_cifar_tree(tmp_path / "tree", batches)
    for a, b in zip(load_data(f"cifar10:{tmp_path / 'batches'}", (3, 32, 32)), load_data(f"cifar10:{tmp_path / 'tree'}", (3, 32, 32))):
        for x, y in zip(_by_label(a), _by_label(b)):
            assert torch.equal(x, y)
        assert (a.crop_padding, a.flip, a.num_classes) == (b.crop_padding, b.flip, b.num_classes)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)


def test_the_tree_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    from PIL import Image

    from gaborprune.data import tree

    monkeypatch.setenv("GABORPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    write_cifar_tree(tmp_path / "tree", write_cifar(tmp_path / "batches"))
    root = tmp_path / "tree"
    first, hit = tree.load_tree(root, 10)
    assert not hit and len(list((tmp_path / "cache").glob("tree-*.npz"))) == 1
    again, hit = tree.load_tree(root, 10)
    assert hit and all(np.array_equal(first[s][0], again[s][0]) for s in ("train", "test"))
    decoded = []
    monkeypatch.setattr(tree, "_decode", lambda path: decoded.append(path) or np.zeros((3, 32, 32), np.uint8))
    tree.load_tree(root, 10)
    assert not decoded  # the cache answered: no image was decoded
    image = next((root / "test").rglob("*.png"))
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(image)  # rewritten: new size or mtime
    _, hit = tree.load_tree(root, 10)
    assert not hit and len(decoded) == 10 + 100  # every image decoded again
    monkeypatch.undo()
    monkeypatch.setenv("GABORPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    for cached in (tmp_path / "cache").glob("tree-*.npz"):
        cached.write_bytes(b"not a zip")
    rebuilt, hit = tree.load_tree(root, 10)  # a corrupt cache file is decoded anew, not trusted
    assert not hit and rebuilt["test"][0].shape == (10, 3, 32, 32)
    assert tree.load_tree(root, 10)[1]  # and written again


def test_a_corrupt_image_in_a_tree_is_one_line_naming_the_file(tmp_path):
    write_cifar_tree(tmp_path / "tree", write_cifar(tmp_path / "batches"))
    bad = sorted((tmp_path / "tree" / "train").rglob("*.png"))[5]
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=rf"cannot read image '{bad}'.*; remove or replace it"):
        load_data(f"cifar10:{tmp_path / 'tree'}", (3, 32, 32))


def test_a_tree_image_of_the_wrong_size_or_a_fifo_is_refused(tmp_path):
    import os

    from PIL import Image

    write_cifar_tree(tmp_path / "tree", write_cifar(tmp_path / "batches"))
    big = sorted((tmp_path / "tree" / "test").rglob("*.png"))[0]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(big)
    with pytest.raises(DataError, match=r"is 40x40, not CIFAR's 32x32; load trees of other sizes as imagefolder:DIR"):
        load_data(f"cifar10:{tmp_path / 'tree'}", (3, 32, 32))
    big.unlink()
    os.mkfifo(big)  # a FIFO named like an image would block the decoder forever
    with pytest.raises(DataError, match="is not a regular file"):
        load_data(f"cifar10:{tmp_path / 'tree'}", (3, 32, 32))


def test_image_folder_takes_test_when_there_is_no_val(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(tmp_path / split / cls / "0.png")
    train, held_out = load_data(f"imagefolder:{tmp_path}", (3, 24, 24))
    assert held_out.dataset.root.endswith("test") and len(held_out) == 2


def test_sample_draws_distinct_unaugmented_images_across_classes():
    images = torch.arange(40, dtype=torch.uint8)[:, None, None, None].expand(40, 1, 4, 4).contiguous()
    data = TensorData(images, torch.arange(40) // 10, torch.zeros(1), torch.ones(1), 4, crop_padding=2, flip=True)
    sample = data.sample(12, seed=1)
    assert len(sample) == 12 and len(set(sample.images[:, 0, 0, 0].tolist())) == 12
    assert len(set(sample.labels.tolist())) > 1 and sample.crop_padding == 0 and not sample.flip
    assert torch.equal(data.sample(12, seed=1).images, sample.images) and len(data.sample(100)) == 40


def test_calibration_batches_are_seeded_augmented_training_images():
    from gaborprune.data import calibration_batches

    images = torch.randint(0, 255, (30, 3, 8, 8), dtype=torch.uint8)
    data = TensorData(images, torch.zeros(30, dtype=torch.int64), torch.zeros(3), torch.ones(3), 2, crop_padding=2, flip=True)
    batches = calibration_batches(data, 20, 8, seed=3)
    assert [len(x) for x in batches] == [8, 8, 4]
    want = [x for x, _ in data.batches(8, train=True, generator=torch.Generator().manual_seed(3))]  # the training pass's own draw
    assert all(torch.equal(a, b[: len(a)]) for a, b in zip(batches, want))
    plain = torch.cat([x for x, _ in data.batches(30, train=False)])
    assert not any(torch.equal(batches[0][0], p) for p in plain)  # cropped or flipped: not a plain image
    assert len(torch.cat(calibration_batches(data, 100, 8))) == 30  # at most the whole split
