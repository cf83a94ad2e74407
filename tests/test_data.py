"""Datasets: fixed stratified splits, shapes and ranges, augmentation, the CIFAR pickle and
imagefolder readers on tiny fake folders, and every bad input."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from spikeprune.data import (_mnist5k, dataset_for_model, load_dataset, make_loader, stratified_split)
from spikeprune.errors import SpikepruneError


def _unnormalise(ds, x):
    return x * ds.std + ds.mean


# ------------------------------------------------------------------------------------------------
# Bundled sets
# ------------------------------------------------------------------------------------------------
def test_mnist5k_split_sizes_stratified_disjoint():
    sets = {s: load_dataset("mnist5k", s) for s in ("train", "calib", "test")}
    per_class = {"train": 350, "calib": 50, "test": 100}
    for s, ds in sets.items():
        assert len(ds) == 10 * per_class[s]
        assert ds.labels.bincount(minlength=10).tolist() == [per_class[s]] * 10
        assert (ds.name, ds.split, ds.num_classes, ds.in_channels, ds.img_size) == ("mnist5k", s, 10, 1, 28)
    everything = torch.cat([ds.index for ds in sets.values()])
    assert sorted(everything.tolist()) == list(range(5000))  # disjoint and complete


def test_mnist5k_split_is_fixed_and_cached():
    before = _mnist5k.cache_info().hits
    a, b = load_dataset("mnist5k", "calib"), load_dataset("mnist5k", "calib")
    assert _mnist5k.cache_info().hits >= before + 2  # decoded once per process
    assert torch.equal(a.index, b.index)
    # The split is drawn by stratified_split with the documented seed: recomputing it gives the same.
    images, labels, _ = _mnist5k()
    again = stratified_split(labels.numpy(), {"calib": 500, "test": 1000}, seed=0)
    assert np.array_equal(again["calib"], a.index.numpy())
    other = stratified_split(labels.numpy(), {"calib": 500, "test": 1000}, seed=1)
    assert not np.array_equal(other["calib"], again["calib"])


def test_mnist5k_images_shape_range_and_normalisation():
    ds = load_dataset("mnist5k", "test")
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    batch, labels = ds.batch(list(range(200)))
    pixels = _unnormalise(ds, batch)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.max() > 0.99
    assert abs(batch.mean().item()) < 0.2 and 0.8 < batch.std().item() < 1.2  # roughly standardised
    assert torch.equal(labels, ds.labels[:200])


def test_digits_split_resize_and_override():
    sets = {s: load_dataset("digits", s) for s in ("train", "calib", "test")}
    assert sum(len(d) for d in sets.values()) == 1797
    assert len(sets["calib"]) == round(0.1 * 1797) and len(sets["test"]) == round(0.2 * 1797)
    full = torch.cat([d.labels for d in sets.values()]).bincount().double()
    for name, frac in (("calib", 0.1), ("test", 0.2)):
        counts = sets[name].labels.bincount(minlength=10).double()
        assert (counts - frac * full).abs().max() <= 1.0  # proportional per class, up to rounding
    x, _ = sets["test"][0]
    assert x.shape == (1, 16, 16)
    assert load_dataset("digits", "test", img_size=24)[0][0].shape == (1, 24, 24)


def test_augmentation_changes_train_images_deterministically_and_no_flip_for_digits():
    plain = load_dataset("mnist5k", "train")
    aug = load_dataset("mnist5k", "train", augment=True)
    idx = list(range(32))
    torch.manual_seed(3)
    a, _ = aug.batch(idx)
    torch.manual_seed(3)
    b, _ = aug.batch(idx)
    assert torch.equal(a, b) and a.shape == plain.batch(idx)[0].shape
    assert not torch.equal(a, plain.batch(idx)[0])
    ops = [type(op).__name__ for op in aug._augmentation().children()]
    assert "RandomCrop" in ops and not any("Flip" in o for o in ops)
    # Evaluation transforms are deterministic.
    assert torch.equal(plain.batch(idx)[0], plain.batch(idx)[0])


def test_loader_order_depends_only_on_seed():
    ds = load_dataset("digits", "calib")

    def order(seed):
        return torch.cat([y for _, y in make_loader(ds, 50, shuffle=True, seed=seed)])

    assert torch.equal(order(1), order(1))
    assert not torch.equal(order(1), order(2))
    xs, ys = next(iter(make_loader(ds, 50)))
    assert xs.shape == (50, 1, 16, 16) and ys.dtype == torch.long
    assert len(make_loader(ds, 50, drop_last=True)) == len(ds) // 50


# ------------------------------------------------------------------------------------------------
# CIFAR, python-pickle format
# ------------------------------------------------------------------------------------------------
def _write_batch(path, data, labels, key="labels"):
    # As the official files: a dict with bytes keys holding a uint8 [N, 3072] array and a list.
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", key.encode(): list(map(int, labels)), b"data": data,
                     b"filenames": [b"x.png"] * len(labels)}, f, protocol=2)


def _fake_cifar10(root, per_class=2):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.repeat(np.arange(10), per_class)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        _write_batch(root / name, data, labels)
        batches[name] = (data, labels)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    return batches


def test_cifar10_reader_on_fake_folder(tmp_path):
    batches = _fake_cifar10(tmp_path / "cifar-10-batches-py")
    spec = f"cifar10:{tmp_path}"  # the parent of the extracted folder works too
    train, calib, test = (load_dataset(spec, s) for s in ("train", "calib", "test"))
    assert (len(train), len(calib), len(test)) == (90, 10, 20)
    assert calib.labels.bincount(minlength=10).tolist() == [1] * 10  # stratified, held out of train
    assert not set(train.index.tolist()) & set(calib.index.tolist())
    assert (test.num_classes, test.in_channels, test.img_size, test.classes[3]) == (10, 3, 32, "c3")
    x, y = test[0]
    expected = torch.from_numpy(batches["test_batch"][0][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(_unnormalise(test, x), expected, atol=1e-5) and y == batches["test_batch"][1][0]
    aug = load_dataset(spec, "train", augment=True)
    assert "RandomHorizontalFlip" in [type(op).__name__ for op in aug._augmentation().children()]
    assert aug.batch([0, 1, 2])[0].shape == (3, 3, 32, 32)


def test_cifar100_reader_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.arange(100).repeat(2)
    _write_batch(tmp_path / "train", rng.integers(0, 256, (200, 3072), dtype=np.uint8), labels, key="fine_labels")
    _write_batch(tmp_path / "test", rng.integers(0, 256, (100, 3072), dtype=np.uint8), np.arange(100),
                 key="fine_labels")
    ds = load_dataset(f"cifar100:{tmp_path}", "test", img_size=16)
    assert (len(ds), ds.num_classes, ds[0][0].shape) == (100, 100, (3, 16, 16))
    assert len(load_dataset(f"cifar100:{tmp_path}", "calib")) == 20


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpikepruneError, match="refusing to load global"):
        load_dataset(f"cifar10:{tmp_path}", "train")
    assert not (tmp_path / "pwned").exists()


def test_cifar_truncated_and_missing_files(tmp_path):
    _fake_cifar10(tmp_path)
    raw = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SpikepruneError, match="corrupt or truncated"):
        load_dataset(f"cifar10:{tmp_path}", "test")
    (tmp_path / "test_batch").unlink()
    with pytest.raises(SpikepruneError, match="lacks test_batch"):
        load_dataset(f"cifar10:{tmp_path}", "test")


# ------------------------------------------------------------------------------------------------
# imagefolder
# ------------------------------------------------------------------------------------------------
def _fake_imagefolder(root, classes=("cat", "dog", "owl"), n_train=6, n_val=2):
    rng = np.random.default_rng(0)
    for part, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            d = root / part / c
            d.mkdir(parents=True)
            for i in range(n):
                h, w = 20 + i, 30 - i  # varied sizes and aspect ratios
                mode = "L" if i == 0 else "RGB"  # a greyscale file among them
                arr = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr, mode).save(d / f"{i}.png")
    return root


def test_imagefolder_reader(tmp_path):
    spec = f"imagefolder:{_fake_imagefolder(tmp_path)}"
    train, calib, test = (load_dataset(spec, s, img_size=16) for s in ("train", "calib", "test"))
    assert len(train) + len(calib) == 18 and len(calib) == 2 and len(test) == 6
    assert not set(map(str, train.paths)) & set(map(str, calib.paths))
    assert train.classes == ["cat", "dog", "owl"] and test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x, _ = test[0]
    assert x.shape == (3, 16, 16)
    assert torch.equal(test[0][0], test[0][0])  # deterministic eval transform
    aug = load_dataset(spec, "train", img_size=16, augment=True)
    assert aug.batch([0, 1, 2, 3])[0].shape == (4, 3, 16, 16)


def test_imagefolder_bad_folders(tmp_path):
    with pytest.raises(SpikepruneError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(SpikepruneError, match="holds no images"):
        load_dataset(f"imagefolder:{tmp_path}")
    root = _fake_imagefolder(tmp_path / "ok", classes=("a", "b"), n_train=3, n_val=1)
    (root / "val" / "a" / "0.png").write_bytes(b"not a png")
    ds = load_dataset(f"imagefolder:{root}", "test", img_size=8)
    with pytest.raises(SpikepruneError, match="cannot decode image"):
        ds[0]


# ------------------------------------------------------------------------------------------------
# Bad input and model checks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, split, message", [
    ("mnist-digits", "test", "unknown dataset"),
    ("mnist", "test", "needs a folder"),
    ("", "test", "NAME"),
    ("mnist5k", "val", "unknown split"),
    ("cifar10", "test", "needs a folder"),
    ("mnist5k:/tmp", "test", "takes no path"),
    ("cifar100:/does/not/exist", "test", "does not exist"),
])
def test_bad_specs(spec, split, message):
    with pytest.raises(SpikepruneError, match=message):
        load_dataset(spec, split)


def test_empty_cifar_folder(tmp_path):
    with pytest.raises(SpikepruneError, match="lacks data_batch_1"):
        load_dataset(f"cifar10:{tmp_path}")


def test_dataset_for_model_checks_channels_and_classes(tiny_model):
    ds = dataset_for_model("digits", tiny_model(), "calib")
    assert ds.img_size == 16
    with pytest.raises(SpikepruneError, match="in_channels=1"):
        dataset_for_model("digits", tiny_model(in_channels=3), "calib")
    with pytest.raises(SpikepruneError, match="num_classes=10"):
        dataset_for_model("digits", tiny_model(num_classes=7), "calib")
    with pytest.raises(SpikepruneError, match="empty"):
        make_loader(torch.utils.data.TensorDataset(torch.zeros(0, 1)), 4)
