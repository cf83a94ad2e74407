"""The IDX readers (fashion-mnist, mnist) on small files written here, gzipped and raw; every way
such a file can be broken; the fixed splits on a full-size synthetic label set; the image cap
(`max_images`); the empty-class-folder warning; and one test on the real Fashion-MNIST files."""
import gzip
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import spikeprune.data as data
from spikeprune.data import (FASHION_MNIST_CLASSES, capped_positions, dataset_for_model, fashion_mnist_dirs,
                             load_dataset, read_idx, stratified_split)
from spikeprune.errors import SpikepruneError

NAMES = {"train-images": "train-images-idx3-ubyte", "train-labels": "train-labels-idx1-ubyte",
         "test-images": "t10k-images-idx3-ubyte", "test-labels": "t10k-labels-idx1-ubyte"}


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: magic 0x000008NN, NN big-endian int32 sizes, the values."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x08 << 8) | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path, array, gz: bool, magic: int | None = None):
    raw = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_idx_folder(root, train_per_class=20, test_per_class=3, side=6, gz=True, sep="-", seed=0):
    """The four IDX files of a small balanced set (classes interleaved, random pixels); returns
    {role: (path, array)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), side, side), dtype=np.uint8)
        for kind, array in (("images", images), ("labels", labels)):
            role = f"{part}-{kind}"
            name = NAMES[role].replace("-idx", f"{sep}idx") + (".gz" if gz else "")
            out[role] = (write_idx(root / name, array, gz), array)
    return out


def pixels(ds, indices):
    """The stored uint8 pixels of a (non-augmented, unresized) dataset's images."""
    x, _ = ds.batch(list(indices))
    return torch.round((x * ds.std + ds.mean) * 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_idx_round_trip(tmp_path, gz):
    files = fake_idx_folder(tmp_path, gz=gz)
    spec = f"fashion-mnist:{tmp_path}"
    train, calib, test = (load_dataset(spec, s, img_size=6) for s in ("train", "calib", "test"))
    assert (len(train), len(calib), len(test)) == (180, 20, 30)
    assert (test.num_classes, test.in_channels, test.classes) == (10, 1, FASHION_MNIST_CLASSES)
    test_images, test_labels = files["test-images"][1], files["test-labels"][1]
    assert torch.equal(pixels(test, range(30))[:, 0], torch.from_numpy(test_images))  # test = the t10k files, in order
    assert test.labels.tolist() == test_labels.tolist()
    train_images, train_labels = files["train-images"][1], files["train-labels"][1]
    # train and calib are views of the training files: each image keeps its own label.
    for ds in (train, calib):
        assert torch.equal(pixels(ds, range(len(ds)))[:, 0], torch.from_numpy(train_images[ds.index.numpy()]))
        assert ds.labels.tolist() == train_labels[ds.index.numpy()].tolist()
    assert sorted(train.index.tolist() + calib.index.tolist()) == list(range(200))


def test_mnist_idx_reader_and_dotted_names(tmp_path):
    # Some mirrors name the files train-images.idx3-ubyte; the mnist spec reads those the same way.
    files = fake_idx_folder(tmp_path, gz=False, sep=".")
    ds = load_dataset(f"mnist:{tmp_path}", "test", img_size=6)
    assert ds.classes == [str(c) for c in range(10)] and ds.labels.tolist() == files["test-labels"][1].tolist()
    assert load_dataset(f"mnist:{tmp_path}", "test")[0][0].shape == (1, 28, 28)  # resized to the default size


def test_idx_set_is_cached_and_a_replaced_file_is_read_again(tmp_path):
    files = fake_idx_folder(tmp_path)
    spec = f"mnist:{tmp_path}"
    load_dataset(spec, "test")
    hits = data._decode_idx_set.cache_info().hits
    load_dataset(spec, "calib")
    assert data._decode_idx_set.cache_info().hits == hits + 1
    path, labels = files["test-labels"]
    changed = (labels + 1) % 10
    write_idx(path, changed, gz=True)
    assert load_dataset(spec, "test").labels.tolist() == changed.tolist()


def test_fashion_mnist_augmentation_shifts_without_flip(tmp_path):
    fake_idx_folder(tmp_path, side=28)
    aug = load_dataset(f"fashion-mnist:{tmp_path}", "train", augment=True)
    ops = [type(op).__name__ for op in aug._augmentation().children()]
    assert ops == ["RandomCrop"]  # shifts only; the docstring says why there is no flip
    batch, _ = aug.batch(list(range(8)))
    assert batch.shape == (8, 1, 28, 28) and not torch.equal(batch, load_dataset(
        f"fashion-mnist:{tmp_path}", "train").batch(list(range(8)))[0])


# ------------------------------------------------------------------------------------------------
# Broken files: each a one-line error naming the file
# ------------------------------------------------------------------------------------------------
def _break_wrong_magic(files):
    path, array = files["train-images"]
    write_idx(path, array, gz=True, magic=0x12345678)
    return path, "magic number 0x12345678, expected 0x00000803"


def _break_labels_as_images(files):
    path, _ = files["test-images"]
    write_idx(path, files["test-labels"][1], gz=True)
    return path, "IDX file with 1 dimensions"


def _break_count_mismatch(files):
    path, labels = files["train-labels"]
    write_idx(path, labels[:-1], gz=True)
    return path, "199 labels; the two files do not belong together"


def _break_truncated_body(files):
    path, array = files["test-images"]
    path.write_bytes(gzip.compress(idx_bytes(array)[:-5]))
    return path, "truncated: its header declares 30 x 6 x 6 = 1080 bytes of images but 1075 follow"


def _break_trailing_bytes(files):
    path, array = files["test-labels"]
    path.write_bytes(gzip.compress(idx_bytes(array) + b"\0\0"))
    return path, "2 bytes beyond"


def _break_short_header(files):
    path, _ = files["train-labels"]
    path.write_bytes(gzip.compress(b"\0\0\x08"))
    return path, "shorter than 4 bytes"


def _break_truncated_header(files):
    path, _ = files["train-images"]
    path.write_bytes(gzip.compress(b"\0\0\x08\x03\0\0"))
    return path, "shorter than its 16-byte IDX header"


def _break_not_gzip(files):
    path, _ = files["train-images"]
    path.write_bytes(b"this is not gzip data")
    return path, "named .gz but is not a gzip file"


def _break_truncated_gzip(files):
    path, _ = files["train-images"]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path, "corrupt or truncated gzip file"


def _break_corrupt_gzip(files):
    path, _ = files["test-images"]
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # the CRC-32 of the trailer
    path.write_bytes(bytes(raw))
    return path, "corrupt or truncated gzip file"


def _break_label_range(files):
    path, labels = files["test-labels"]
    bad = labels.copy()
    bad[0] = 10
    write_idx(path, bad, gz=True)
    return path, "label 10 is outside 0..9"


BREAKS = [_break_wrong_magic, _break_labels_as_images, _break_count_mismatch, _break_truncated_body,
          _break_trailing_bytes, _break_short_header, _break_truncated_header, _break_not_gzip,
          _break_truncated_gzip, _break_corrupt_gzip, _break_label_range]


@pytest.mark.parametrize("breaker", BREAKS, ids=[b.__name__[len("_break_"):] for b in BREAKS])
def test_broken_idx_file_is_a_one_line_error_naming_it(tmp_path, breaker):
    files = fake_idx_folder(tmp_path)
    path, message = breaker(files)
    with pytest.raises(SpikepruneError) as caught:
        load_dataset(f"fashion-mnist:{tmp_path}", "test")
    text = str(caught.value)
    assert message in text and str(path.name) in text and "\n" not in text


def test_raw_idx_file_with_wrong_magic(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(SpikepruneError, match=r"x-idx1-ubyte is not an IDX label file: magic number 0x89504e47"):
        read_idx(path, 1)
    with pytest.raises(SpikepruneError, match="cannot read IDX file"):
        read_idx(tmp_path / "missing-idx1-ubyte", 1)


def test_missing_files_and_folders(tmp_path):
    fake_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SpikepruneError, match=r"lacks t10k-labels-idx1-ubyte\[.gz\]"):
        load_dataset(f"fashion-mnist:{tmp_path}")
    with pytest.raises(SpikepruneError, match="does not exist"):
        load_dataset(f"mnist:{tmp_path / 'nope'}")
    with pytest.raises(SpikepruneError, match="is not a folder"):
        load_dataset(f"mnist:{tmp_path / 't10k-images-idx3-ubyte.gz'}")


@pytest.mark.parametrize("spec, message", [
    ("mnist", "needs a folder: --data mnist:DIR"),
    ("fashion", "unknown dataset 'fashion'"),
])
def test_idx_specs(spec, message):
    with pytest.raises(SpikepruneError, match=message):
        load_dataset(spec)


# ------------------------------------------------------------------------------------------------
# Where fashion-mnist is looked for
# ------------------------------------------------------------------------------------------------
def test_fashion_mnist_lookup_order(tmp_path, monkeypatch):
    debian, source, cwd = tmp_path / "debian", tmp_path / "source", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)
    monkeypatch.setattr(data, "SOURCE_ROOT", source)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SPIKEPRUNE_DATA", str(tmp_path / "user"))
    assert fashion_mnist_dirs() == [debian, tmp_path / "user" / "fashion-mnist", source / "data" / "fashion-mnist",
                                    cwd / "data" / "fashion-mnist"]
    with pytest.raises(SpikepruneError, match="Fashion-MNIST is not installed .* run `spikeprune data fashion-mnist`"):
        load_dataset("fashion-mnist")
    # Each place found in turn; an earlier one wins (the sets differ by their seed, so by labels).
    expected = {}
    for seed, folder in enumerate(reversed(fashion_mnist_dirs())):
        expected[folder] = fake_idx_folder(folder, seed=seed)["test-labels"][1].tolist()
        assert load_dataset("fashion-mnist", "test", img_size=6).labels.tolist() == expected[folder]
    assert expected[debian] != expected[cwd / "data" / "fashion-mnist"]


# ------------------------------------------------------------------------------------------------
# Splits at full size (tiny images, so this stays fast)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_size_set(tmp_path_factory):
    """60,000 training and 10,000 test images of 2x2 pixels, 10 balanced classes, as on Fashion-MNIST."""
    root = tmp_path_factory.mktemp("full")
    files = fake_idx_folder(root, train_per_class=6000, test_per_class=1000, side=2)
    return f"fashion-mnist:{root}", files


def test_full_size_splits_are_the_documented_ones(full_size_set):
    spec, files = full_size_set
    sets = {s: load_dataset(spec, s, img_size=2) for s in ("train", "calib", "test")}
    per_class = {"train": 5500, "calib": 500, "test": 1000}
    for s, ds in sets.items():
        assert ds.labels.bincount(minlength=10).tolist() == [per_class[s]] * 10
    assert not set(sets["train"].index.tolist()) & set(sets["calib"].index.tolist())
    train_labels = files["train-labels"][1].astype(np.int64)
    assert np.array_equal(sets["calib"].index.numpy(), stratified_split(train_labels, {"calib": 5000})["calib"])
    assert sets["test"].index.tolist() == list(range(60000, 70000))


# ------------------------------------------------------------------------------------------------
# max_images
# ------------------------------------------------------------------------------------------------
def test_max_images_is_a_stratified_deterministic_subset(full_size_set):
    spec, _ = full_size_set
    calib = load_dataset(spec, "calib", img_size=2)
    capped = load_dataset(spec, "calib", img_size=2, max_images=1000)
    assert capped.max_images == 1000 and calib.max_images is None
    assert capped.labels.bincount(minlength=10).tolist() == [100] * 10
    assert set(capped.index.tolist()) <= set(calib.index.tolist())
    assert torch.equal(capped.index, load_dataset(spec, "calib", img_size=2, max_images=1000).index)
    # A cap that does not divide by the classes still gives exactly N, shared as evenly as can be.
    odd = load_dataset(spec, "test", img_size=2, max_images=1003).labels.bincount(minlength=10)
    assert odd.sum() == 1003 and odd.max() - odd.min() <= 1
    assert len(load_dataset(spec, "calib", img_size=2, max_images=10**6)) == len(calib)


def test_max_images_on_every_kind_of_source(tmp_path, tiny_model):
    digits = dataset_for_model("digits", tiny_model(), "calib", max_images=30)
    assert len(digits) == 30 and digits.labels.bincount(minlength=10).tolist() == [3] * 10
    assert len(load_dataset("mnist5k", "train", max_images=50)) == 50
    root = tmp_path / "folder"
    for part, n in (("train", 10), ("val", 4)):
        for c in ("a", "b"):
            (root / part / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((4, 4), i * 20, np.uint8)).save(root / part / c / f"{i}.png")
    folder = load_dataset(f"imagefolder:{root}", "test", img_size=4, max_images=4)
    assert len(folder) == 4 and folder.labels.tolist() == [0, 0, 1, 1]
    assert len(folder.paths) == 4


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100"])
def test_max_images_must_be_a_positive_whole_number(bad):
    with pytest.raises(SpikepruneError, match="max_images must be a positive whole number"):
        load_dataset("digits", "calib", max_images=bad)


def test_capped_positions_keeps_class_shares():
    labels = np.array([0] * 80 + [1] * 20)
    keep = capped_positions(labels, 10)
    assert np.bincount(labels[keep]).tolist() == [8, 2] and np.all(np.diff(keep) > 0)
    assert capped_positions(labels, None).tolist() == list(range(100))


# ------------------------------------------------------------------------------------------------
# imagefolder: an empty class folder is warned about, by name, once
# ------------------------------------------------------------------------------------------------
def test_empty_class_folder_is_warned_about_once(tmp_path):
    for c in ("full", "empty"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "val" / c).mkdir(parents=True)
    for part in ("train", "val"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / part / "full" / "0.png")
    spec = f"imagefolder:{tmp_path}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_dataset(spec, "train", img_size=4)
        load_dataset(spec, "test", img_size=4)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2  # train/empty and val/empty, not again on the second load
    assert str(tmp_path / "train" / "empty") in messages[0] and "holds no images" in messages[0]
    assert str(tmp_path / "val" / "empty") in messages[1]


# ------------------------------------------------------------------------------------------------
# The real files
# ------------------------------------------------------------------------------------------------
def _installed_fashion_mnist():
    return next((d for d in fashion_mnist_dirs() if data._idx_files(d) is not None), None)


@pytest.mark.skipif(_installed_fashion_mnist() is None,
                    reason="Fashion-MNIST is not installed here (`spikeprune data fashion-mnist` installs it)")
def test_real_fashion_mnist_files():
    sets = {s: load_dataset("fashion-mnist", s) for s in ("train", "calib", "test")}
    per_class = {"train": 5500, "calib": 500, "test": 1000}
    for s, ds in sets.items():
        assert ds.labels.bincount(minlength=10).tolist() == [per_class[s]] * 10
        assert (ds.img_size, ds.in_channels, ds.classes) == (28, 1, FASHION_MNIST_CLASSES)
    # The labels are the file's, read independently of the library.
    folder = _installed_fashion_mnist()
    labels_file = data._idx_files(folder)["test-labels"]
    raw = labels_file.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    assert sets["test"].labels.tolist() == list(raw[8:])
    x, _ = sets["test"].batch(list(range(256)))
    stored = x * sets["test"].std + sets["test"].mean
    assert stored.min() >= -1e-5 and stored.max() <= 1 + 1e-5 and stored.max() > 0.99
