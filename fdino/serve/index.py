"""A folder of images embedded once, cached on disk, and refreshed incrementally when files change.

Every image file under the folder (recursively; hidden files and folders skipped) is identified by
``(relative path, size, mtime_ns)`` and the SHA-256 of its bytes. The cache holds one feature row
per file together with both, so a refresh re-embeds only files that are new or whose size,
modification time or content changed, drops rows of deleted files, and does nothing at all when
the folder's fingerprint (a hash of every triple) is unchanged. The content hash is checked for
every cached row on the first refresh of an index (a folder copied or restored with preserved
times can repeat sizes and mtimes with other bytes; that costs one read of every file at start);
afterwards, within the process, an unchanged triple is trusted. Files that cannot be decoded are
remembered with their triple and not retried until it changes. Symlinks that lead outside the
folder are not indexed (counted in ``outside``), and `FolderIndex.file` checks containment again
each time a file is served. Names that are not valid UTF-8 are indexed as Python lists them
(surrogate escapes, see `fdino.serve.paths`). A refresh builds the new rows aside and swaps them in
with one assignment, so searches running meanwhile (the service refreshes on a background thread)
see either the old index or the new one, never a mix.

Cache file: the `fdino embed` format (`fdino.eval.embed.save_embeddings`, safetensors): tensor
``features`` float32 ``[N, D]`` (raw backbone features, not normalized), ``labels`` (-1), absolute
``paths``, and in ``info``: ``format``, ``model_key`` (a hash of the weights and preprocessing:
another model never reuses these rows), ``model`` (source, arch, which: so ``fdino search CACHE
query.png`` works on it), ``root``, ``files`` (``[path, size, mtime_ns]`` per row), ``sha256``
(hex digest per row) and ``skipped`` (``{path: [size, mtime_ns, reason]}``). Written atomically.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..data.images import has_image_extension
from .paths import contained, name_bytes, within

FORMAT = "fdino-serve-index-v2"  # v2: rows carry the SHA-256 of their file (v1 caches are rebuilt)


class FileStat(NamedTuple):
    """An indexed file: path relative to the root (POSIX separators), size in bytes, mtime in ns."""

    path: str
    size: int
    mtime_ns: int


def scan_folder(root: str | Path) -> list[FileStat]:
    """Image files under ``root`` (by extension), sorted by path; hidden entries and symlinks that
    lead outside ``root`` are skipped."""
    return _scan(root)[0]


def _scan(root: str | Path) -> tuple[list[FileStat], list[str]]:
    """``(scan_folder(root), names of symlinks skipped because they lead outside root)``."""
    root = Path(root)
    root_real = os.path.realpath(root)
    found, outside = [], []
    for directory, dirs, files in os.walk(root):  # directory symlinks are not followed
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or not has_image_extension(name):
                continue
            full = Path(directory) / name
            try:
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    real = os.path.realpath(full, strict=True)
                    if not within(root_real, real):
                        outside.append(full.relative_to(root).as_posix())
                        continue
                    st = os.stat(real)
            except OSError:  # vanished between listing and stat, or a broken link
                continue
            found.append(FileStat(full.relative_to(root).as_posix(), int(st.st_size), int(st.st_mtime_ns)))
    return sorted(found), sorted(outside)


def fingerprint(stats: list[FileStat]) -> str:
    """Hash of every (path, size, mtime_ns): changes whenever a file is added, removed or modified."""
    h = hashlib.sha256()
    for s in stats:
        h.update(name_bytes(f"{s.path}\0{s.size}\0{s.mtime_ns}\n"))  # names may hold surrogate escapes
    return h.hexdigest()


def content_hash(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_key(backbone: torch.nn.Module, *extra: object) -> str:
    """Hash of a backbone's weights and buffers (and ``extra``, e.g. the preprocessing)."""
    h = hashlib.sha256(repr(extra).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class _Rows(NamedTuple):
    """One consistent state of the index (replaced as a whole by a refresh)."""

    files: list[FileStat]
    digests: list[str]
    features: torch.Tensor
    skipped: dict[str, tuple[int, int, str]]
    by_path: dict[str, int]


_EMPTY = _Rows([], [], torch.zeros(0, 0), {}, {})


class RefreshResult(NamedTuple):
    """What a refresh changed."""

    added: int
    """Files embedded because they were new or changed."""
    removed: int
    """Rows dropped because their file was deleted or changed."""
    skipped: int
    """Undecodable files found in this refresh."""
    reused: int
    """Rows kept (from memory or the disk cache)."""


@dataclass
class FolderIndex:
    """Feature rows for the images of ``root``; call `refresh` to (re)build, `search` to query.

    Files are embedded with `fdino.eval.embed.embed_paths` (evaluation view: resize + center crop
    to ``image_size``, normalized with ``mean`` / ``std``). `refresh` must not run twice at once
    (the service serializes it); `search`, `file` and the row attributes may be read meanwhile.
    """

    root: Path
    backbone: torch.nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_key: str
    """Identifies the weights and preprocessing (see `model_key`); cached rows of another key are ignored."""
    cache_path: Path | None = None
    model_info: dict = field(default_factory=dict)
    """Stored as ``info["model"]`` (``source``, ``arch``, ``which``) so `fdino search` can reload the model."""
    batch_size: int = 64

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"images folder {str(self.root)!r} is not a directory")
        self._rows = _EMPTY
        self.outside: list[str] = []
        """Symlinks skipped by the last scan because they lead outside the folder."""
        self._fingerprint: str | None = None
        self._verified = False  # whether the rows' content hashes were checked against the files
        self._load_cache()

    @property
    def files(self) -> list[FileStat]:
        """The indexed files, sorted by path."""
        return self._rows.files

    @property
    def digests(self) -> list[str]:
        """SHA-256 of each row's file (`content_hash`), parallel to ``files``."""
        return self._rows.digests

    @property
    def features(self) -> torch.Tensor:
        """``[N, D]`` raw backbone features, parallel to ``files``."""
        return self._rows.features

    @property
    def skipped(self) -> dict[str, tuple[int, int, str]]:
        """Undecodable files: ``{path: (size, mtime_ns, reason)}``."""
        return self._rows.skipped

    # --- queries ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.files)

    def file(self, rel: str) -> Path | None:
        """Resolved path of an indexed file that is still a regular file inside the folder, else None
        (only indexed files are ever served, and never through a symlink leading outside)."""
        return contained(self.root, rel) if rel in self._rows.by_path else None

    def search(self, query: torch.Tensor, k: int) -> list[tuple[FileStat, float]]:
        """The ``k`` indexed images most similar to ``query`` ``[D]`` (cosine), best first."""
        from ..eval.embed import search  # noqa: PLC0415

        rows = self._rows  # one snapshot: a refresh may swap in new rows meanwhile
        if not rows.files:
            return []
        sims, idx = search(query.reshape(1, -1).float(), rows.features, k)
        return [(rows.files[i], float(s)) for s, i in zip(sims[0].tolist(), idx[0].tolist())]

    # --- refresh ---------------------------------------------------------------------------------
    def refresh(self) -> RefreshResult:
        """Re-scan the folder; embed new/changed files, drop deleted ones, save the cache if changed."""
        stats, self.outside = _scan(self.root)
        fp = fingerprint(stats)
        if fp == self._fingerprint:
            return RefreshResult(0, 0, 0, len(self.files))
        current = {s.path: s for s in stats}
        keep = [i for i, f in enumerate(self.files) if current.get(f.path) == f]
        if not self._verified:  # rows from the disk cache: same stat does not prove the same bytes
            keep = [i for i in keep if self._same_content(i)]
        removed = len(self.files) - len(keep)
        have = {self.files[i].path for i in keep}
        skipped = {p: v for p, v in self.skipped.items() if p in current and tuple(v[:2]) == current[p][1:]}
        todo = [s for s in stats if s.path not in have and s.path not in skipped]
        new_files, new_digests, new_rows, bad = self._embed(todo)
        skipped.update(bad)
        files = [self.files[i] for i in keep] + new_files
        digests = [self.digests[i] for i in keep] + new_digests
        rows = ([self.features[keep]] if keep else []) + ([new_rows] if len(new_files) else [])
        features = torch.cat(rows) if rows else torch.zeros(0, self.features.shape[-1])
        order = sorted(range(len(files)), key=lambda i: files[i].path)
        files = [files[i] for i in order]
        self._rows = _Rows(  # one assignment: readers see the old rows or the new ones
            files,
            [digests[i] for i in order],
            features[order] if order else features,
            skipped,
            {f.path: i for i, f in enumerate(files)},
        )
        self._fingerprint, self._verified = fp, True
        self._save_cache()
        return RefreshResult(len(new_files), removed, len(bad), len(keep))

    def _same_content(self, row: int) -> bool:
        try:
            return content_hash(self.root / self.files[row].path) == self.digests[row]
        except OSError:  # vanished or unreadable since the scan: dropped, retried on the next refresh
            return False

    def _embed(self, todo: list[FileStat]) -> tuple[list[FileStat], list[str], torch.Tensor, dict]:
        """``(embedded files, their SHA-256, their features [M, D], {path: (size, mtime_ns, reason)} unreadable)``.

        Files are hashed before they are embedded: if one changes in between, its row carries the old
        digest and its newer mtime shows up on the next refresh, so it is re-embedded then."""
        from ..eval.embed import embed_paths  # noqa: PLC0415

        if not todo:
            return [], [], torch.zeros(0, 0), {}
        digests, readable = {}, []
        for s in todo:
            try:
                digests[s.path] = content_hash(self.root / s.path)
                readable.append(s)
            except OSError:  # vanished since the scan: not indexed (it is not in the next scan either)
                continue
        todo = readable
        if not todo:
            return [], [], torch.zeros(0, 0), {}
        paths = [str(self.root / s.path) for s in todo]
        device = next(self.backbone.parameters()).device
        try:
            feats, kept, bad = embed_paths(
                self.backbone,
                paths,
                image_size=self.image_size,
                mean=self.mean,
                std=self.std,
                batch_size=self.batch_size,
                device=device,
            )
        except ValueError:  # embed_paths: "none of the N images could be read"
            feats, kept, bad = torch.zeros(0, 0), [], {p: "cannot be decoded as an image" for p in paths}
        by_full = dict(zip(paths, todo))
        unreadable = {by_full[p].path: (by_full[p].size, by_full[p].mtime_ns, reason) for p, reason in bad.items()}
        files = [todo[i] for i in kept]
        return files, [digests[f.path] for f in files], feats, unreadable

    # --- disk cache ------------------------------------------------------------------------------
    def _load_cache(self) -> None:
        if self.cache_path is None or not self.cache_path.exists():
            return
        from ..eval.embed import load_embeddings  # noqa: PLC0415

        try:
            emb = load_embeddings(self.cache_path)
            info = emb.info
            if (info.get("format"), info.get("model_key"), info.get("root")) != (
                FORMAT,
                self.model_key,
                str(self.root),
            ):
                return  # another model or folder: rebuilt (and overwritten) on refresh
            files = [FileStat(str(p), int(s), int(m)) for p, s, m in info["files"]]
            digests = [str(d) for d in info["sha256"]]
            skipped = {p: (int(v[0]), int(v[1]), str(v[2])) for p, v in info["skipped"].items()}
        except Exception:  # noqa: BLE001 - a corrupt or foreign cache is only a cache: rebuild it
            return
        if not len(files) == len(digests) == emb.features.shape[0]:
            return
        self._rows = _Rows(files, digests, emb.features, skipped, {f.path: i for i, f in enumerate(files)})

    def _save_cache(self) -> None:
        if self.cache_path is None:
            return
        from ..eval.embed import Embeddings, save_embeddings  # noqa: PLC0415

        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "format": FORMAT,
            "model_key": self.model_key,
            "model": dict(self.model_info),
            "root": str(self.root),
            "files": [list(f) for f in self.files],
            "sha256": list(self.digests),
            "skipped": {p: list(v) for p, v in self.skipped.items()},
            "image_size": int(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "n_last_blocks": 1,
            "avgpool": False,
        }
        features = self.features if self.features.ndim == 2 else torch.zeros(0, 0)
        emb = Embeddings(
            features.contiguous(),
            [str(self.root / f.path) for f in self.files],
            torch.full((len(self.files),), -1, dtype=torch.int64),
            info,
        )
        # Same folder and suffix as the target, so the final rename is atomic.
        tmp = self.cache_path.with_name(f".tmp-{os.getpid()}-{self.cache_path.name}")
        try:
            save_embeddings(tmp, emb)
            os.replace(tmp, self.cache_path)
        finally:
            tmp.unlink(missing_ok=True)


def default_cache_path(root: str | Path, model: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir>/index-<hash of folder and model>.safetensors``; default cache_dir
    ``$XDG_CACHE_HOME/fdino/serve`` (``~/.cache/fdino/serve``): nothing is written into the images folder."""
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = Path(base) / "fdino" / "serve"
    key = hashlib.sha256(name_bytes(f"{Path(root).resolve()}\0{model}")).hexdigest()[:20]
    return Path(cache_dir) / f"index-{key}.safetensors"


__all__ = [
    "FileStat",
    "FolderIndex",
    "RefreshResult",
    "scan_folder",
    "fingerprint",
    "content_hash",
    "model_key",
    "default_cache_path",
    "FORMAT",
]
