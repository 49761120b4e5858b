"""The decode cache of image folders: same items, same pixels and same crops as decoding per access;
built once, invalidated by any file change, atomic, capped with a clear message, worker-safe."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fdino.data import BadImageError, ImageFolder, MultiCrop, build_dataset, small_image_multicrop
from fdino.data import decoded_cache as dc
from fdino.data.augment import as_uint8_chw
from fdino.data.decoded_cache import DecodeCacheOptions, DecodeCacheTooLargeError, DecodedImageFolder
from fdino.data.loader import MultiCropLoader

OFF = DecodeCacheOptions(mode="off")


def _save(path, pixels, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)


@pytest.fixture
def folder(tmp_path):
    """Two classes of PNGs and JPEGs of several sizes and modes, an EXIF-rotated JPEG, a loose image
    (label -1) and an undecodable file."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        for i in range(4):
            h, w = (20, 28) if i % 2 else (24, 24)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            _save(root / name / f"{i}.{'jpg' if (i + c) % 2 else 'png'}", pixels)
    _save(root / "cat" / "gray.jpg", rng.integers(0, 256, (18, 22), dtype=np.uint8))
    _save(root / "dog" / "alpha.png", rng.integers(0, 256, (16, 16, 4), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: load_rgb turns it upright, so the cache must hold the upright pixels
    _save(root / "dog" / "rotated.jpg", rng.integers(0, 256, (12, 30, 3), dtype=np.uint8), exif=exif)
    _save(root / "loose.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    (root / "cat" / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture
def on(tmp_path):
    return DecodeCacheOptions(mode="on", directory=str(tmp_path / "cache"))


@pytest.fixture
def decodes(monkeypatch):
    """The paths `dc._decode` was called with (threads append; list.append is atomic)."""
    calls, decode = [], dc._decode

    def counted(path):
        calls.append(path)
        return decode(path)

    monkeypatch.setattr(dc, "_decode", counted)
    return calls


def _item(dataset, i):
    """``(uint8 [3, H, W], label)``, or the BadImageError message."""
    try:
        image, label = dataset[i]
    except BadImageError as e:
        return str(e)
    return as_uint8_chw(image), label


def _assert_same_items(a, b):
    assert len(a) == len(b) and a.paths == b.paths and a.labels == b.labels and a.classes == b.classes
    for i in range(len(a)):
        x, y = _item(a, i), _item(b, i)
        if isinstance(x, str):
            assert x == y
        else:
            assert y[1] == x[1] and y[0].dtype == torch.uint8 and torch.equal(x[0], y[0]), a.paths[i]


def test_cached_items_are_bitwise_the_per_access_decode(folder, on):
    plain = build_dataset(folder, decode_cache=OFF)
    cached = build_dataset(folder, decode_cache=on)
    assert type(plain.dataset) is ImageFolder and type(cached.dataset) is DecodedImageFolder
    assert (cached.classes, cached.name, cached.split) == (plain.classes, plain.name, plain.split)
    _assert_same_items(plain.dataset, cached.dataset)
    rotated = cached.dataset.paths.index(str(folder / "dog" / "rotated.jpg"))
    assert cached.dataset[rotated][0].shape == (3, 30, 12)  # upright
    with pytest.raises(BadImageError, match="broken.jpg"):
        cached.dataset[cached.dataset.paths.index(str(folder / "cat" / "broken.jpg"))]
    assert torch.equal(cached.dataset[-1][0], cached.dataset[len(cached) - 1][0])
    with pytest.raises(IndexError):
        cached.dataset[len(cached)]


def test_a_second_build_reads_the_cache_without_decoding(folder, on, decodes):
    first = build_dataset(folder, decode_cache=on).dataset
    assert sorted(decodes) == sorted(first.paths)
    decodes.clear()
    second = build_dataset(folder, decode_cache=on).dataset
    assert decodes == [] and second.cache == first.cache
    _assert_same_items(first, second)


@pytest.mark.parametrize("change", ["mtime", "content"])
def test_a_changed_file_gives_a_new_cache(folder, on, decodes, change):
    first = build_dataset(folder, decode_cache=on).dataset
    target = folder / "cat" / "0.png"
    if change == "mtime":
        st = os.stat(target)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:
        _save(target, np.full((9, 11, 3), 7, np.uint8))
    decodes.clear()
    second = build_dataset(folder, decode_cache=on).dataset
    assert second.cache != first.cache and len(decodes) == len(first)
    _assert_same_items(build_dataset(folder, decode_cache=OFF).dataset, second)


def test_the_auto_policy_caches_small_image_sizes_only(folder, tmp_path):
    auto = DecodeCacheOptions(mode="auto", directory=str(tmp_path / "cache"))
    assert type(build_dataset(folder, image_size=64, decode_cache=auto).dataset) is DecodedImageFolder
    assert type(build_dataset(folder, image_size=96, decode_cache=auto).dataset) is ImageFolder
    forced = DecodeCacheOptions(mode="on", directory=str(tmp_path / "cache"))
    assert type(build_dataset(folder, image_size=224, decode_cache=forced).dataset) is DecodedImageFolder


def test_a_cache_over_the_cap_is_a_clear_error_or_an_auto_warning(folder, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DecodeCacheTooLargeError) as e:
        build_dataset(folder, decode_cache=DecodeCacheOptions(mode="on", directory=str(cache), max_bytes=5000))
    message = str(e.value)
    assert "needs about" in message and "cap of 5.0 kB" in message
    for fix in ("FDINO_DECODE_CACHE_MAX_GB=", "shrink the files on disk", "FDINO_DECODE_CACHE=off"):
        assert fix in message
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]  # nothing written
    auto = DecodeCacheOptions(mode="auto", directory=str(cache), max_bytes=5000)
    with pytest.warns(UserWarning, match="decoding every image on every access"):
        assert type(build_dataset(folder, decode_cache=auto).dataset) is ImageFolder


def test_an_unwritable_cache_folder_falls_back_in_auto_and_fails_when_on(folder, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    auto = DecodeCacheOptions(mode="auto", directory=str(not_a_folder / "cache"))
    with pytest.warns(UserWarning, match="decoding every image on every access"):
        assert type(build_dataset(folder, decode_cache=auto).dataset) is ImageFolder
    with pytest.raises(OSError):
        build_dataset(folder, decode_cache=DecodeCacheOptions(mode="on", directory=str(not_a_folder / "cache")))


def test_the_message_names_the_exact_need_when_every_header_was_counted():
    message = dc.too_large_message("/data", 1000, 12_288_000, 1000, 10**7, 32)
    assert "needs 12.3 MB, more than the decode cache's cap of 10.0 MB" in message
    assert "FDINO_DECODE_CACHE_MAX_GB=0.1" in message and "(32 px)" in message
    short_disk = dc.too_large_message("/data", 1000, 12_288_000, 1000, 10**9, 32, free=10**6)
    assert "disk has 1.0 MB free" in short_disk and "FDINO_DECODE_CACHE_DIR" in short_disk


def test_a_killed_decode_leaves_nothing_that_is_read(folder, on, monkeypatch):
    key = dc.cache_key(*_key_inputs(folder))
    cache = on.resolved_directory()
    decode = dc._decode

    def dies_midway(path):
        if path.endswith("dog/1.png"):
            raise KeyboardInterrupt  # as a Ctrl-C in the middle of the decode
        return decode(path)

    monkeypatch.setattr(dc, "_decode", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(folder, decode_cache=on)
    assert not (cache / key).exists()
    # A SIGKILL leaves its partial folder behind: the next build ignores it and removes it.
    (cache / f".partial-{key}-deadbeef").mkdir()
    (cache / f".partial-{key}-deadbeef" / "pixels.u8").write_bytes(b"\0" * 10)
    monkeypatch.setattr(dc, "_decode", decode)
    cached = build_dataset(folder, decode_cache=on).dataset
    assert cached.cache == str(cache / key) and not list(cache.glob(".partial-*"))
    _assert_same_items(build_dataset(folder, decode_cache=OFF).dataset, cached)


def test_a_truncated_cache_file_is_rebuilt(folder, on, decodes):
    first = build_dataset(folder, decode_cache=on).dataset
    pixels = os.path.join(first.cache, "pixels.u8")
    os.truncate(pixels, os.path.getsize(pixels) // 2)
    decodes.clear()
    second = build_dataset(folder, decode_cache=on).dataset
    assert len(decodes) == len(first)
    _assert_same_items(build_dataset(folder, decode_cache=OFF).dataset, second)


def _key_inputs(folder):
    paths = ImageFolder(folder).paths
    return paths, dc._file_stats(paths), dc._codec_versions()


def test_pickles_carry_the_file_name_not_the_pixels(folder, on):
    cached = build_dataset(folder, decode_cache=on).dataset
    cached[0]  # maps the file in this process
    payload = pickle.dumps(cached)
    assert len(payload) < os.path.getsize(os.path.join(cached.cache, "pixels.u8")) / 4
    _assert_same_items(cached, pickle.loads(payload))


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_two_workers_give_the_batches_of_the_per_access_path(folder, on):
    transform = MultiCrop(small_image_multicrop(global_crop_size=8, local_crop_size=4, n_local_crops=2))

    def epoch(dataset, workers):
        loader = MultiCropLoader(dataset, transform, batch_size=3, seed=5, num_workers=workers)
        return list(loader.epoch(1))

    plain = epoch(build_dataset(folder, decode_cache=OFF).dataset, 0)
    cached = epoch(build_dataset(folder, decode_cache=on).dataset, 2)
    assert len(plain) == len(cached) == len(ImageFolder(folder)) // 3
    for (crops_a, labels_a), (crops_b, labels_b) in zip(plain, cached, strict=True):
        assert torch.equal(labels_a, labels_b)
        assert all(torch.equal(a, b) for a, b in zip(crops_a, crops_b, strict=True))


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, DecodeCacheOptions()),
        ({"FDINO_DECODE_CACHE": "0"}, DecodeCacheOptions(mode="off")),
        ({"FDINO_DECODE_CACHE": " ON "}, DecodeCacheOptions(mode="on")),
        (
            {"FDINO_DECODE_CACHE_DIR": "/x", "FDINO_DECODE_CACHE_MAX_GB": "0.5"},
            DecodeCacheOptions(directory="/x", max_bytes=500_000_000),
        ),
    ],
)
def test_options_from_the_environment(env, expected):
    assert DecodeCacheOptions.from_env(env) == expected


@pytest.mark.parametrize(
    "env, match",
    [
        ({"FDINO_DECODE_CACHE": "maybe"}, "FDINO_DECODE_CACHE='maybe' is invalid"),
        ({"FDINO_DECODE_CACHE_MAX_GB": "-1"}, "FDINO_DECODE_CACHE_MAX_GB='-1' is invalid"),
        ({"FDINO_DECODE_CACHE_MAX_GB": "nan"}, "FDINO_DECODE_CACHE_MAX_GB='nan' is invalid"),
        ({"FDINO_DECODE_CACHE_MAX_GB": "lots"}, "FDINO_DECODE_CACHE_MAX_GB='lots' is invalid"),
    ],
)
def test_bad_environment_values_are_named(env, match):
    with pytest.raises(ValueError, match=match):
        DecodeCacheOptions.from_env(env)


def test_eval_commands_cache_a_folder_only_when_their_model_sees_small_images(folder):
    # fdino knn/linear/viz load the data at the model's image size: a 224 px model's folder is not cached.
    import argparse
    from types import SimpleNamespace

    from fdino.eval.cli import _split

    args = argparse.Namespace(data=str(folder), data_root=None, download=False, img_size=None)
    assert isinstance(_split(args, "memory", SimpleNamespace(image_size=32)).dataset, DecodedImageFolder)
    assert not isinstance(_split(args, "memory", SimpleNamespace(image_size=224)).dataset, DecodedImageFolder)
    assert isinstance(_split(args, "memory").dataset, DecodedImageFolder)  # no model: raw pixels at 32
