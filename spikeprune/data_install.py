"""`spikeprune data fashion-mnist`: put Fashion-MNIST where `--data fashion-mnist` finds it, for a
user who installed the wheel and has no checkout (and so no `make data`).

Two sources, nothing else downloaded:
  --from DIR   a folder holding the four original IDX files (gzipped or not), checked and copied;
  (default)    the Debian package dataset-fashion-mnist (30 MB), fetched with `apt-get download`
               (no root needed) and unpacked with `dpkg -x`.
The files land in `data.user_data_dir()/fashion-mnist` unless `-o DIR` says otherwise; they are
checked (IDX headers, sizes, image / label counts) before the folder is moved into place, so a
failed or interrupted install leaves nothing behind.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .data import IDX_PARTS, _idx_files, fashion_mnist_dirs, read_idx, user_data_dir
from .errors import SpikepruneError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
PACKAGE_FOLDER = Path("usr/share/datasets/fashion-mnist")  # where the package keeps the files
SIZES = {"train": 60_000, "test": 10_000}


def installed_fashion_mnist() -> Path | None:
    """The first folder `--data fashion-mnist` would read, or None."""
    return next((d for d in fashion_mnist_dirs() if d.is_dir() and _idx_files(d) is not None), None)


def _check(folder: Path) -> dict[str, Path]:
    """The four files of `folder`, each read and checked; a one-line error if one is missing or wrong."""
    files = _idx_files(folder)
    if files is None:
        wanted = ", ".join(f"{stem}-idx{ndim}-ubyte[.gz]" for stem, ndim in IDX_PARTS.values())
        raise SpikepruneError(f"{folder} does not hold the four Fashion-MNIST files ({wanted})")
    for split, n in SIZES.items():
        images, labels = read_idx(files[f"{split}-images"], 3), read_idx(files[f"{split}-labels"], 1)
        if len(images) != n or len(labels) != n or images.shape[1:] != (28, 28):
            raise SpikepruneError(f"{files[f'{split}-images']} holds {len(images)} images of {images.shape[1:]} and "
                                  f"{len(labels)} labels; Fashion-MNIST's {split} split has {n} of 28x28")
    return files


def _unpack_debian_package(work: Path) -> Path:
    """Fetch the Debian package into `work` and unpack it there; the folder holding the files."""
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise SpikepruneError(f"cannot fetch the Debian package {DEBIAN_PACKAGE}: no {' or '.join(missing)} on this "
                              "machine; download the four Fashion-MNIST files "
                              "(https://github.com/zalandoresearch/fashion-mnist) and run "
                              "`spikeprune data fashion-mnist --from DIR`")
    for cmd in (["apt-get", "download", "-qq", DEBIAN_PACKAGE], None):
        if cmd is None:
            debs = glob.glob(str(work / f"{DEBIAN_PACKAGE}_*.deb"))
            if len(debs) != 1:
                raise SpikepruneError(f"`apt-get download {DEBIAN_PACKAGE}` left {len(debs)} package files, expected 1")
            cmd = ["dpkg", "-x", debs[0], str(work / "root")]
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise SpikepruneError(f"`{' '.join(cmd[:3])}` failed ({why}); run `apt-get update` if the package is "
                                  "unknown, or give the four files with `spikeprune data fashion-mnist --from DIR`")
    return work / "root" / PACKAGE_FOLDER


def install_fashion_mnist(output=None, source=None, overwrite: bool = False) -> Path:
    """Put Fashion-MNIST's four IDX files into `output` (default: the user's data folder, which
    `--data fashion-mnist` reads) from `source` (a folder) or the Debian package. Returns the folder."""
    output = Path(output).expanduser() if output is not None else user_data_dir() / "fashion-mnist"
    if output.exists() and not overwrite:
        if output.is_dir() and _idx_files(output) is not None:
            _check(output)
            return output
        raise SpikepruneError(f"{output} exists and is not a Fashion-MNIST folder; remove it, pick another -o, "
                              "or pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fashion-mnist-", dir=output.parent) as tmp:
        work = Path(tmp)
        found = Path(source).expanduser() if source is not None else _unpack_debian_package(work)
        if not found.is_dir():
            raise SpikepruneError(f"{found} is not a folder; give the folder that holds the four Fashion-MNIST files")
        files = _check(found)
        staged = work / "fashion-mnist"
        staged.mkdir()
        for path in files.values():
            shutil.copyfile(path, staged / path.name)
            os.chmod(staged / path.name, 0o644)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() and not output.is_symlink() else output.unlink()
        os.replace(staged, output)
    return output


def register_cli(subparsers) -> None:
    """Add `spikeprune data NAME` (cli.py calls this when it builds its parser)."""
    p = subparsers.add_parser(
        "data", help="install a data set that is not bundled (fashion-mnist) where --data finds it",
        description="Install Fashion-MNIST where `--data fashion-mnist` finds it: from the Debian package "
                    f"{DEBIAN_PACKAGE} (fetched with `apt-get download`, no root needed, 30 MB) or from a folder "
                    "holding the four original IDX files (--from). The files are checked before they are moved "
                    f"into place. Default folder: {user_data_dir() / 'fashion-mnist'} ($SPIKEPRUNE_DATA sets the "
                    "parent). mnist5k and digits ship with the package and need no install.")
    p.add_argument("name", choices=["fashion-mnist"], help="the data set")
    p.add_argument("--from", dest="source", type=Path, default=None, metavar="DIR",
                   help="copy the four IDX files from DIR (default: fetch the Debian package)")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="DIR",
                   help="install into DIR (then read it with --data fashion-mnist:DIR); default: the user's "
                        "data folder, which --data fashion-mnist reads")
    p.add_argument("--force", action="store_true", help="replace what is in the output folder")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    already = installed_fashion_mnist() if args.output is None and args.source is None and not args.force else None
    folder = already or install_fashion_mnist(args.output, args.source, overwrite=args.force)
    if not args.quiet:
        spec = "fashion-mnist" if folder in fashion_mnist_dirs() else f"fashion-mnist:{folder}"
        print(f"Fashion-MNIST {'is already' if already else 'installed'} in {folder}; use it with --data {spec}")
    return 0
