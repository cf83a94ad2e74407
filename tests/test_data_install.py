"""`spikeprune data fashion-mnist`: a wheel user gets Fashion-MNIST where `--data fashion-mnist`
finds it, from a folder (--from) or from the Debian package (here a package built by the test and
handed out by a stand-in `apt-get`, so no network is needed); the files are checked first, and a
failure leaves nothing behind."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from spikeprune import data
from spikeprune.cli import main
from spikeprune.data_install import installed_fashion_mnist, install_fashion_mnist
from spikeprune.errors import SpikepruneError

REAL = installed_fashion_mnist()
needs_real = pytest.mark.skipif(REAL is None, reason="Fashion-MNIST is not installed here "
                                                     "(`spikeprune data fashion-mnist` installs it)")


@pytest.fixture
def user_data(tmp_path, monkeypatch):
    """An empty user data folder, and no system-wide copy, so the lookup sees only what the test installs."""
    monkeypatch.setenv("SPIKEPRUNE_DATA", str(tmp_path / "user"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(data, "SOURCE_ROOT", tmp_path / "no-source")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "user" / "fashion-mnist"


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


@needs_real
def test_from_a_folder_into_the_user_folder_then_found(user_data, capsys):
    assert installed_fashion_mnist() is None
    assert main(["data", "fashion-mnist", "--from", str(REAL)]) == 0
    out = capsys.readouterr().out
    assert f"installed in {user_data}" in out and "--data fashion-mnist\n" in out
    assert _same_files(REAL, user_data) and installed_fashion_mnist() == user_data
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in user_data.iterdir())
    assert len(data.load_dataset("fashion-mnist", "test", max_images=20)) == 20
    # a second call finds it and changes nothing
    assert main(["data", "fashion-mnist"]) == 0 and "is already in" in capsys.readouterr().out


@needs_real
def test_from_the_debian_package(user_data, tmp_path, monkeypatch, capsys):
    """The default route: `apt-get download` then `dpkg -x`, with a package built here from the real files."""
    if shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None:
        pytest.skip("no dpkg here")
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: dataset-fashion-mnist\nVersion: 1\nArchitecture: all\n"
                                            "Maintainer: test <t@t>\nDescription: test\n")
    shutil.copytree(REAL, pkg / "usr/share/datasets/fashion-mnist")
    deb = tmp_path / "dataset-fashion-mnist_1_all.deb"
    subprocess.run(["dpkg-deb", "-Znone", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\ncp {deb} .\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["data", "fashion-mnist"]) == 0
    assert "installed in" in capsys.readouterr().out and _same_files(REAL, user_data)
    assert [p.name for p in user_data.parent.iterdir()] == ["fashion-mnist"]  # the work folder is gone


def test_without_apt_the_error_names_the_folder_route(user_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(SpikepruneError, match="no apt-get or dpkg on this machine.*--from DIR"):
        install_fashion_mnist()
    assert not user_data.exists()


def test_a_failing_apt_get_is_one_line_and_leaves_nothing(user_data, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package dataset-fashion-mnist' >&2\nexit 100\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SpikepruneError, match="Unable to locate package.*apt-get update"):
        install_fashion_mnist()
    assert not user_data.exists() and list(user_data.parent.iterdir()) == []


def test_a_folder_without_the_files_is_refused_and_nothing_is_written(user_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "fashion-mnist", "--from", str(tmp_path / "empty")]) == 2
    assert "does not hold the four Fashion-MNIST files" in capsys.readouterr().err
    assert not user_data.exists()


def test_files_of_the_wrong_size_are_refused(user_data, tmp_path):
    """IDX files that read fine but are not Fashion-MNIST (e.g. a 2-image set) are refused by count."""
    from test_data_idx import fake_idx_folder

    fake_idx_folder(tmp_path / "small", seed=0)
    with pytest.raises(SpikepruneError, match="Fashion-MNIST's train split has 60000"):
        install_fashion_mnist(source=tmp_path / "small")
    assert not user_data.exists()


def test_an_output_that_is_something_else_needs_force(user_data, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(SpikepruneError, match="exists and is not a Fashion-MNIST folder.*--force"):
        install_fashion_mnist(output=other, source=tmp_path)
    assert (other / "notes.txt").read_text() == "keep"
