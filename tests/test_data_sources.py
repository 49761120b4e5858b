"""Data sources: image folders, bad files, image modes, build_dataset, torchvision sets on test-made files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fdino.data import BadImageError, ImageFolder, build_dataset, load_rgb, scan_image_folder, to_rgb
from fdino.data.sources import resolve_split


def _png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def _rgb(seed, size=12):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# --- folder layouts --------------------------------------------------------------------------------------
def test_class_subfolders_give_labels_recursively(tmp_path):
    _png(tmp_path / "b_dog" / "x.png", _rgb(0))
    _png(tmp_path / "b_dog" / "deep" / "er" / "y.PNG", _rgb(1))  # nested, upper-case extension
    _png(tmp_path / "a_cat" / "z.jpg", _rgb(2))
    _png(tmp_path / "loose.png", _rgb(3))  # top-level file in a labeled folder: kept, label -1
    (tmp_path / "a_cat" / "notes.txt").write_text("ignored: not an image extension")
    _png(tmp_path / "a_cat" / ".hidden.png", _rgb(4))
    _png(tmp_path / ".cache" / "h.png", _rgb(5))
    paths, labels, classes = scan_image_folder(tmp_path)
    assert classes == ("a_cat", "b_dog")
    names = [os.path.relpath(p, tmp_path) for p in paths]
    assert names == ["loose.png", "a_cat/z.jpg", "b_dog/x.png", "b_dog/deep/er/y.PNG"]
    assert labels == [-1, 0, 1, 1]
    image, label = ImageFolder(tmp_path)[1]
    assert image.mode == "RGB" and image.size == (12, 12) and label == 0


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", _rgb(i))
    ds = ImageFolder(tmp_path)
    assert len(ds) == 3 and ds.classes == () and ds.labels == [-1, -1, -1]
    src = build_dataset(tmp_path)
    assert src.classes == () and len(src) == 3
    with pytest.raises(ValueError, match="no val/ or test/"):
        build_dataset(tmp_path, split="query")


def test_missing_empty_and_file_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}.*contains no images"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "only_text" / "cls").mkdir(parents=True)
    (tmp_path / "only_text" / "cls" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="contains no images"):
        ImageFolder(tmp_path / "only_text")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="file.png"):
        ImageFolder(tmp_path / "file.png")
    with pytest.raises(FileNotFoundError, match="neither a known data set"):
        build_dataset(tmp_path / "nope")


def test_split_subfolders_share_the_train_class_mapping(tmp_path):
    for split, classes in (("train", ("ant", "bee", "cow")), ("val", ("bee", "cow"))):
        for c in classes:
            _png(tmp_path / split / c / "0.png", _rgb(len(c)))
    train, memory, query = (build_dataset(tmp_path, split=s) for s in ("train", "memory", "query"))
    assert train.classes == memory.classes == query.classes == ("ant", "bee", "cow")
    assert (train.split, memory.split, query.split) == ("train", "train", "val")
    assert query.dataset.labels == [1, 2]  # bee, cow keep their train indices


# --- bad files -----------------------------------------------------------------------------------------------
def _bad_files(root):
    _png(root / "good.png", _rgb(0, 32))
    good = (root / "good.png").read_bytes()
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "corrupt.png").write_bytes(good[:100] + bytes(200) + good[300:])
    return ("zero.png", "text.png", "truncated.png", "corrupt.png")


@pytest.mark.parametrize(
    "name, reason",
    [
        ("zero.png", "zero bytes"),
        ("text.png", "UnidentifiedImageError"),
        ("truncated.png", "OSError"),
        ("corrupt.png", "OSError"),
    ],
)
def test_each_kind_of_bad_file_raises_bad_image_error_naming_the_file(tmp_path, name, reason):
    _bad_files(tmp_path)
    with pytest.raises(BadImageError, match=name) as info:
        load_rgb(tmp_path / name)
    assert reason in info.value.reason and info.value.path == str(tmp_path / name)
    assert load_rgb(tmp_path / "good.png").mode == "RGB"
    ds = ImageFolder(tmp_path)
    with pytest.raises(BadImageError):
        ds[ds.paths.index(str(tmp_path / name))]


def test_bad_image_error_survives_pickling():  # it crosses from DataLoader workers
    e = pickle.loads(pickle.dumps(BadImageError("/x/y.png", "zero bytes")))
    assert (e.path, e.reason) == ("/x/y.png", "zero bytes")


# --- image modes -------------------------------------------------------------------------------------------
def test_mode_conversions_to_rgb(tmp_path):
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    _png(tmp_path / "L.png", gray)
    out = np.asarray(load_rgb(tmp_path / "L.png"))
    assert out.shape == (2, 2, 3) and (out == gray[..., None]).all()

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "P.png")
    out = np.asarray(load_rgb(tmp_path / "P.png"))
    assert (out[0, 0] == [255, 0, 0]).all() and (out[0, 1] == [0, 0, 255]).all()

    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = [10, 20, 30, 255]  # opaque: its colour
    rgba[0, 1] = [10, 20, 30, 0]  # transparent: the white background
    _png(tmp_path / "RGBA.png", rgba)
    out = np.asarray(load_rgb(tmp_path / "RGBA.png"))
    assert (out[0, 0] == [10, 20, 30]).all() and (out[0, 1] == [255, 255, 255]).all()

    deep = np.array([[0, 257 * 128], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "I16.png")
    im = Image.open(tmp_path / "I16.png")
    assert im.mode in ("I;16", "I")
    out = np.asarray(load_rgb(tmp_path / "I16.png"))[..., 0]
    # rescaled, not saturated: PIL's own convert("RGB") would make 1000 and 32896 white (255)
    assert out.tolist() == [[0, 128], [255, 4]]
    assert np.asarray(to_rgb(Image.fromarray(deep.astype(np.int32), mode="I")))[0, 1, 0] == 128

    for mode in ("1", "LA", "CMYK", "F"):
        img = Image.fromarray(gray).convert(mode)
        assert to_rgb(img).mode == "RGB"
    assert np.asarray(to_rgb(Image.fromarray(gray).convert("F")))[..., 0].tolist() == gray.tolist()


# --- build_dataset ----------------------------------------------------------------------------------------------
def test_build_dataset_shapes10_roles_and_names():
    src = build_dataset(n=50)
    assert (src.name, src.split, src.num_classes, len(src)) == ("shapes10", "train", 10, 50)
    image, label = src.dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label < 10
    assert build_dataset("SHAPES10", split="query", n=20, image_size=48).dataset[0][0].shape == (3, 48, 48)
    assert resolve_split("stl10", "train") == "train+unlabeled" and resolve_split("stl10", "memory") == "train"
    assert resolve_split("cifar10", "query") == "test"
    with pytest.raises(ValueError, match="split='val' is invalid for cifar10"):
        resolve_split("cifar10", "val")


# --- torchvision data sets on test-made files -------------------------------------------------------------
@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks MD5s of the real archives; files made here only need to exist."""
    exists = lambda path, md5=None: os.path.isfile(path)  # noqa: E731
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", exists)


def _images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_test_made_files(tmp_path, no_md5, name):
    folder, label_key, files, meta, names_key = {
        "cifar10": (
            "cifar-10-batches-py",
            "labels",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            "batches.meta",
            "label_names",
        ),
        "cifar100": ("cifar-100-python", "fine_labels", ["train", "test"], "meta", "fine_label_names"),
    }[name]
    n_classes = 10 if name == "cifar10" else 100
    os.makedirs(tmp_path / folder)
    arrays = {}
    for k, fname in enumerate(files):
        x = _images(3, 32, k)
        arrays[fname] = x
        with open(tmp_path / folder / fname, "wb") as f:
            pickle.dump({"data": x.reshape(3, -1), label_key: [k % n_classes, 1, 2]}, f)
    with open(tmp_path / folder / meta, "wb") as f:
        pickle.dump({names_key: [f"c{i}" for i in range(n_classes)]}, f)
    train = build_dataset(name, root=tmp_path, split="train")
    query = build_dataset(name.upper().replace("CIFAR", "cifar-"), root=tmp_path, split="query")
    assert len(train) == 3 * (len(files) - 1) and len(query) == 3 and train.num_classes == n_classes
    image, label = query.dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == (len(files) - 1) % n_classes
    assert torch.equal(image, torch.from_numpy(arrays[files[-1]][0]))  # channel order and orientation kept


def test_stl10_from_test_made_files(tmp_path, no_md5):
    base = tmp_path / "stl10_binary"
    os.makedirs(base)
    x = {"train": _images(4, 96, 0), "unlabeled": _images(3, 96, 1), "test": _images(2, 96, 2)}
    for split, arr in x.items():  # STL-10 stores images column-major: write the transpose
        (base / f"{split}_X.bin").write_bytes(np.ascontiguousarray(arr.transpose(0, 1, 3, 2)).tobytes())
    (base / "train_y.bin").write_bytes(bytes([1, 2, 3, 10]))  # 1-based on disk
    (base / "test_y.bin").write_bytes(bytes([5, 6]))
    (base / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)))
    train, memory, query = (build_dataset("stl10", root=tmp_path, split=s) for s in ("train", "memory", "query"))
    assert (len(train), len(memory), len(query)) == (7, 4, 2)
    assert train.split == "train+unlabeled" and train.dataset.labels.tolist() == [0, 1, 2, 9, -1, -1, -1]
    assert train.classes[9] == "k9" and query.dataset.labels.tolist() == [4, 5]
    assert torch.equal(train.dataset[5][0], torch.from_numpy(x["unlabeled"][1]))


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {
        np.dtype("u1"): 0x08,
        np.dtype("i1"): 0x09,
        np.dtype(">i2"): 0x0B,
        np.dtype(">i4"): 0x0C,
        np.dtype(">f4"): 0x0D,
        np.dtype(">f8"): 0x0E,
    }[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def test_fashion_mnist_in_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    os.makedirs(raw)
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(imgs))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(5, dtype=np.uint8)))
    src = build_dataset("fashion-mnist", root=tmp_path, split="query")
    image, label = src.dataset[3]
    assert src.classes[0] == "T-shirt/top" and label == 3
    assert image.shape == (3, 28, 28) and all(torch.equal(image[c], torch.from_numpy(imgs[3])) for c in range(3))


def test_torchvision_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"cifar10 not found.*{tmp_path}.*download=True"):
        build_dataset("cifar10", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="fashion-mnist not found"):
        build_dataset("fashion-mnist", root=tmp_path)
