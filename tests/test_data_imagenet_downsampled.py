"""Downsampled ImageNet on files written here in the format of image-net.org's Imagenet32/64 zips:
pixel layout, 0-based labels, batch order, every pickle protocol and Python 2's, the .npz variant,
and a restricted unpickler that refuses code before it runs."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from fdino.data.arrays import ArrayDataset
from fdino.data.imagenet_downsampled import (
    DEFAULT_CLASSES,
    RefusedPickleError,
    _max_rows,
    find_batch_files,
    imagenet_downsampled,
    parse_batch,
    read_batch_file,
    restricted_unpickle,
    side_from_width,
)


def _hwc_images(n: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _rows(images: np.ndarray) -> np.ndarray:
    """How the authors' image2numpy scripts flatten an HWC image: R plane, G plane, B plane, each row-major."""
    return np.stack([np.concatenate([img[:, :, c].ravel() for c in range(3)]) for img in images])


def _batch(images: np.ndarray, labels: list[int], train: bool = True) -> dict:
    batch = {"data": _rows(images), "labels": labels}
    if train:
        batch["mean"] = batch["data"].mean(axis=0)
    return batch


def _write(path, obj, protocol: int = 2) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """What Python 2's cPickle writes at protocol 2 for ``{'data': data, 'labels': labels}``: numpy.core
    names and the array's bytes as a (byte) str, which Python 3 only reads back through latin-1."""

    def text(s: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(s)]) + s

    def int2(k: int) -> bytes:  # BININT2
        return b"M" + struct.pack("<H", k)

    dtype = b"cnumpy\ndtype\n" + text(b"u1") + b"\x89\x88\x87R"  # dtype('u1', False, True)
    dtype += b"(K\x03" + text(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # its __setstate__
    raw = data.tobytes()
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + text(b"b") + b"\x87R"
    array += b"(K\x01" + int2(data.shape[0]) + int2(data.shape[1]) + b"\x86" + dtype + b"\x89"
    array += b"T" + struct.pack("<I", len(raw)) + raw + b"tb"  # (1, shape, dtype, False, bytes) BUILD
    label_list = b"](" + b"".join(int2(k) for k in labels) + b"e"
    return b"\x80\x02}(" + text(b"data") + array + text(b"labels") + label_list + b"u."


# --- the format: layout, labels, order -------------------------------------------------------------------
def test_train_batches_in_numeric_order_with_pixels_and_labels_as_written(tmp_path):
    images = {k: _hwc_images(3, 32, k) for k in (1, 2, 10)}  # 10 must come after 2, not after 1
    labels = {1: [1, 2, 3], 2: [1000, 999, 500], 10: [7, 7, 1]}
    for k in images:
        _write(tmp_path / "Imagenet32_train" / f"train_data_batch_{k}", _batch(images[k], labels[k]))
    _write(tmp_path / "Imagenet32_val" / "val_data", _batch(images[2][:2], [4, 5], train=False))
    train = imagenet_downsampled(tmp_path, "train", image_size=32)
    assert isinstance(train, ArrayDataset) and train.images.shape == (9, 3, 32, 32)
    assert train.labels.tolist() == [0, 1, 2, 999, 998, 499, 6, 6, 0]  # 1-based on disk
    assert train.images.untyped_storage().nbytes() == 9 * 3 * 32 * 32  # one array, its spare tail given back
    expected = np.concatenate([images[1], images[2], images[10]])
    assert torch.equal(train.images.permute(0, 2, 3, 1), torch.from_numpy(expected))  # R, G, B planes row-major
    assert train.classes == DEFAULT_CLASSES and len(train.classes) == 1000
    val = imagenet_downsampled(tmp_path, "val")  # size taken from the files
    image, label = val[1]
    assert (
        image.dtype == torch.uint8
        and label == 4
        and torch.equal(image.permute(1, 2, 0), torch.from_numpy(images[2][1]))
    )


@pytest.mark.parametrize("protocol", range(6))
def test_every_pickle_protocol_loads_and_the_size_bound_holds(tmp_path, protocol):
    images = _hwc_images(4, 8, protocol)
    path = tmp_path / "train_data_batch_1"
    _write(path, _batch(images, [1, 2, 3, np.int64(4)]), protocol)  # a numpy integer in the list too
    data, labels = read_batch_file(path)
    assert np.array_equal(data, _rows(images)) and labels.tolist() == [0, 1, 2, 3] and labels.dtype == np.int64
    assert _max_rows(str(path), data.shape[1]) >= len(data)  # the preallocation never falls short


def test_python2_pickles_load(tmp_path):
    images = _hwc_images(2, 32, 0)
    (tmp_path / "val_data").write_bytes(_py2_pickle(_rows(images), [10, 1000]))
    ds = imagenet_downsampled(tmp_path, "val", image_size=32)
    assert ds.labels.tolist() == [9, 999] and torch.equal(ds.images.permute(0, 2, 3, 1), torch.from_numpy(images))


def test_npz_variant_and_a_batch_present_twice(tmp_path):
    images = _hwc_images(3, 64, 1)
    np.savez_compressed(tmp_path / "train_data_batch_1.npz", **_batch(images, [1, 2, 3]))
    _write(tmp_path / "train_data_batch_1", _batch(images[:1], [9]))  # same batch as a pickle: the .npz wins
    np.savez(tmp_path / "train_data_batch_2.npz", **_batch(images[:2], [4, 5]))
    assert [os.path.basename(p) for p in find_batch_files(tmp_path, "train")] == [
        "train_data_batch_1.npz",
        "train_data_batch_2.npz",
    ]
    ds = imagenet_downsampled(tmp_path, "train", image_size=64)
    assert ds.labels.tolist() == [0, 1, 2, 3, 4] and ds.images.shape == (5, 3, 64, 64)
    assert torch.equal(ds.images[3].permute(1, 2, 0), torch.from_numpy(images[0]))


def test_class_names_from_the_map_file(tmp_path):
    _write(tmp_path / "val_data", _batch(_hwc_images(1, 32, 0), [3], train=False))
    (tmp_path / "map_clsloc.txt").write_text("n01 1 kit_fox\nn03 3 ant\nn02 2 bee\n")
    assert imagenet_downsampled(tmp_path, "val").classes == ("n01", "n02", "n03")
    (tmp_path / "map_clsloc.txt").write_text("n01 1 kit_fox\nn03 3 ant\n")
    with pytest.raises(ValueError, match="class indices must be 1..2"):
        imagenet_downsampled(tmp_path, "val")


# --- the restricted unpickler ------------------------------------------------------------------------------
class _MakeDir:
    """A pickle payload: loading it calls os.mkdir(path) (the marker that code ran)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"data": np.zeros((1, 12), np.uint8), "labels": _MakeDir(str(marker))}, protocol=2)
    pickle.loads(payload)  # control: plain pickle runs it
    assert marker.is_dir()
    marker.rmdir()
    (tmp_path / "val_data").write_bytes(payload)
    with pytest.raises(RefusedPickleError, match=r"val_data: refused to unpickle: .*(posix|os)\.mkdir"):
        imagenet_downsampled(tmp_path, "val")
    assert not marker.exists()


def _global_call(module: str, name: str, argument: str) -> bytes:
    """A protocol 2 pickle of ``module.name(argument)``, as an attacker would write it by hand."""
    arg = argument.encode()
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(arg)) + arg + b"\x85R."


@pytest.mark.parametrize(
    "module, name, argument",
    [
        ("os", "system", "mkdir {marker}"),
        ("builtins", "eval", "__import__('os').mkdir({marker!r})"),
        ("builtins", "exec", "import os; os.mkdir({marker!r})"),
        ("collections", "OrderedDict", ""),  # harmless, but not part of the format
    ],
)
def test_any_global_outside_numpy_arrays_is_refused(tmp_path, module, name, argument):
    marker = str(tmp_path / "ran")
    path = tmp_path / "val_data"
    path.write_bytes(_global_call(module, name, argument.format(marker=marker)))
    with pytest.raises(
        RefusedPickleError, match=f"{path}: refused to unpickle: it references the global {module}.{name}"
    ):
        read_batch_file(path)
    assert not os.path.exists(marker)


def test_codecs_encode_is_admitted_for_latin1_only():
    bad = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(ValueError, match="admitted only as .*latin1"):
        restricted_unpickle(io.BytesIO(bad), "x")


# --- malformed files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch, message",
    [
        ([1, 2], "expected a dict with 'data' and 'labels', got list"),
        ({"data": np.zeros((2, 12), np.uint8)}, r"lacks \['labels'\]"),
        ({"data": np.zeros((2, 12), np.float32), "labels": [1, 2]}, "must be a uint8 array .* got float32"),
        ({"data": np.zeros((2, 3, 2, 2), np.uint8), "labels": [1, 2]}, r"got uint8 \(2, 3, 2, 2\)"),
        ({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}, "rows hold 100 values, which is 3\\*S\\*S for no"),
        ({"data": np.zeros((2, 12), np.uint8), "labels": [1]}, "'labels' must be 2 integers"),
        ({"data": np.zeros((2, 12), np.uint8), "labels": [1.0, 2.0]}, "'labels' must be 2 integers"),
        ({"data": np.zeros((2, 12), np.uint8), "labels": [0, 2]}, r"labels must lie in 1..1000 .* got 0..2"),
        ({"data": np.zeros((2, 12), np.uint8), "labels": [1, 1001]}, "got 1..1001"),
    ],
)
def test_malformed_batches_are_clear_errors(batch, message):
    with pytest.raises(ValueError, match=message):
        parse_batch(batch, "f")


def test_side_from_width():
    assert side_from_width(3072) == 32 and side_from_width(12288) == 64 and side_from_width(3 * 7 * 7) == 7
    for width in (0, 6, 100, 3073):
        with pytest.raises(ValueError, match="ImageNet32 rows hold 3072"):
            side_from_width(width)


def test_truncated_mixed_missing_and_wrong_size(tmp_path):
    good = pickle.dumps(_batch(_hwc_images(2, 32, 0), [1, 2]), protocol=4)
    (tmp_path / "val_data").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="val_data: not a readable pickle"):
        imagenet_downsampled(tmp_path, "val")
    _write(tmp_path / "train_data_batch_1", _batch(_hwc_images(1, 32, 0), [1]))
    _write(tmp_path / "train_data_batch_2", _batch(_hwc_images(1, 64, 0), [1]))
    with pytest.raises(ValueError, match="mixes image sizes"):
        imagenet_downsampled(tmp_path, "train")
    os.remove(tmp_path / "train_data_batch_1")
    with pytest.raises(ValueError, match="holds 64x64 images, not 32x32: use imagenet64"):
        imagenet_downsampled(tmp_path, "train", image_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no val_data .* download Imagenet32_val.zip from image-net.org"):
        imagenet_downsampled(tmp_path / "empty", "val", image_size=32)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        imagenet_downsampled(tmp_path / "nope", "val")
    with pytest.raises(ValueError, match="split='test' is invalid"):
        imagenet_downsampled(tmp_path, "test")


def test_image_size_picks_the_matching_subfolders(tmp_path):
    _write(tmp_path / "Imagenet32_val" / "val_data", _batch(_hwc_images(2, 32, 0), [1, 2], train=False))
    _write(tmp_path / "Imagenet64_val" / "val_data", _batch(_hwc_images(3, 64, 0), [1, 2, 3], train=False))
    assert len(imagenet_downsampled(tmp_path, "val", image_size=32)) == 2
    assert imagenet_downsampled(tmp_path, "val", image_size=64).images.shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="found 2 times"):
        imagenet_downsampled(tmp_path, "val")  # both sizes match when none is asked for
