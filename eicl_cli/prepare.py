"""`eicl prepare-data`: turn a source (download, local files, TFDS or the
synthetic generator) into the one cache file the rest of eicl reads.

Nothing is written until the whole set has been read and checked; the cache
goes to a temporary name and is renamed, so a failure leaves no cache behind.
A cache is "up to date" only once its whole content matches the checksum it
was built with: a damaged or cut-short cache, or one an older eicl built
without a checksum, is rebuilt, and the summary says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .data import omniglot
from .data.cache import (FORMAT_VERSION, REBUILD, RawSet, cache_path, check_cache, checked,
                         read_metadata, unchecked_note, write_cache)
from .data.synthetic import synthetic_raw
from .errors import EiclError

# progress(task, done, total): task names one bar ("decode", "draw", a file name)
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    kind: str  # omniglot | synthetic
    skipped: bool  # the cache was already built from this source
    source: str
    n_alphabets: int
    n_classes: int
    n_background_classes: int
    n_evaluation_classes: int
    n_images: int
    bytes: int
    seconds: float
    synthetic: bool
    note: str = ""  # why a cache that was there was rebuilt, or why it cannot be checked


def _summary(path: Path, meta: dict[str, str], skipped: bool, seconds: float,
             note: str = "") -> PrepareResult:
    """Everything the summary table shows, from the cache header alone."""
    return PrepareResult(
        path=path, kind=meta["kind"], skipped=skipped, source=meta.get("source", ""),
        n_alphabets=int(meta["n_alphabets"]), n_classes=int(meta["n_classes"]),
        n_background_classes=int(meta["n_background_classes"]),
        n_evaluation_classes=int(meta["n_evaluation_classes"]),
        n_images=int(meta["n_images"]), bytes=path.stat().st_size, seconds=seconds,
        synthetic=meta.get("synthetic") == "true", note=note)


def _usable(path: Path, allow_unchecked: bool = False) -> tuple[dict[str, str] | None, str]:
    """(metadata, "") of a cache whose content matches its checksum; (None,
    why not) for one that is damaged, cut short or, unless allow_unchecked,
    carries no checksum; (None, "") when there is none."""
    if not path.is_file():
        return None, ""
    try:
        meta = check_cache(path)
    except EiclError as e:
        return None, str(e).removesuffix(f"; {REBUILD}")
    if not checked(meta) and not allow_unchecked:
        return None, f"{path} was built by an older eicl, without a checksum"
    return meta, ""


def _up_to_date(path: Path, fingerprint: str, force: bool) -> tuple[dict[str, str] | None, str]:
    """(metadata, "") when the cache is intact and was built from this very
    source, else (None, why an existing cache is rebuilt, or "")."""
    if force:
        return None, ""
    meta, problem = _usable(path)
    if meta is not None and meta.get("source_sha256") == fingerprint \
            and meta.get("format_version") == FORMAT_VERSION:
        return meta, ""
    return None, problem


def _current_omniglot(path: Path) -> tuple[dict[str, str] | None, str]:
    """(metadata, "") of an intact Omniglot cache in the current format, or
    of one that an older eicl built without a checksum; else (None, why an
    existing cache is rebuilt, or "")."""
    meta, problem = _usable(path, allow_unchecked=True)
    if meta is not None and meta.get("kind") == "omniglot" \
            and meta.get("format_version") == FORMAT_VERSION:
        return meta, ""
    return None, problem


def prepare_data(source: str | None, data_dir: Path, *, force: bool = False,
                 classes: int | None = None, seed: int = 0,
                 urls: dict[str, str | None] | None = None,
                 expected: dict[str, tuple[int, str]] | None = None,
                 progress: ProgressFn | None = None) -> PrepareResult:
    """Build (or find up to date) the cache for `source`:
    None = download the official zips, unless an Omniglot cache is already
    there (from any source; `force` downloads anyway); "synthetic"; "tfds";
    else a local path.
    `expected` replaces the official size/sha256 table for downloads (tests only)."""
    t0 = time.perf_counter()
    data_dir = Path(data_dir).expanduser()
    kind = "synthetic" if source == "synthetic" else "omniglot"
    if classes is not None and kind != "synthetic":
        raise EiclError(f"--classes {classes} only applies to --source synthetic")
    if classes is not None and not 1 <= classes <= 1623:
        raise EiclError(f"--classes {classes} is out of range; allowed: 1..1623")
    path = cache_path(data_dir, kind)
    problem = ""  # why a cache that is there gets rebuilt

    def bar(task: str):
        return (lambda done, total: progress(task, done, total)) if progress else None

    if kind == "synthetic":
        n = classes or 1623
        fingerprint = f"synthetic:v1:{n}:20:105:{seed}"
        reader = lambda: synthetic_raw(n, 20, 105, seed, progress=(
            (lambda done: progress("draw", done, n * 20)) if progress else None))
    elif source == "tfds":
        fingerprint = None  # known only once TFDS is imported
        reader = lambda: omniglot.read_tfds(bar("convert"))
    elif source is None:
        # No source named: an Omniglot cache already here, from whatever source
        # (local zips, TFDS, a download), is the data; re-running the
        # quickstart line offline must not try the network. That holds for a
        # cache without a checksum too: it is not known to be damaged, and
        # only its own source can rebuild it.
        if not force:
            meta, problem = _current_omniglot(path)
            if meta is not None:
                return _summary(path, meta, True, time.perf_counter() - t0,
                                "" if checked(meta) else unchecked_note(path, meta))
        table = expected or omniglot.OFFICIAL_FILES
        fingerprint = _json_fingerprint({n: sha for n, (_, sha) in table.items()})
        resolved = omniglot.official_urls(urls)

        def reader() -> RawSet:
            try:
                parts = omniglot.fetch_official(data_dir, resolved, table, bar)
            except EiclError as e:
                if problem:  # say why it went to the network at all
                    raise EiclError(f"{problem}; fetching the official zips to rebuild it "
                                    f"failed: {e}") from None
                raise
            return omniglot.read_local(parts, fingerprint, bar("decode"))
    else:
        parts = omniglot.find_local(Path(source))
        fingerprint = omniglot.local_fingerprint(parts)
        reader = lambda: omniglot.read_local(parts, fingerprint, bar("decode"))

    if fingerprint is not None:
        meta, problem = _up_to_date(path, fingerprint, force)
        if meta is not None:
            return _summary(path, meta, True, time.perf_counter() - t0)

    raw = reader()
    if raw.source_sha256 != fingerprint:
        meta, problem = _up_to_date(path, raw.source_sha256, force)
        if meta is not None:
            return _summary(path, meta, True, time.perf_counter() - t0)
    try:
        write_cache(raw, path)
    except OSError as e:
        raise EiclError(f"cannot write the cache {path}: {e.strerror or e}") from None
    meta = read_metadata(path)
    return _summary(path, meta, False, time.perf_counter() - t0, problem)


def _json_fingerprint(shas: dict[str, str]) -> str:
    import json
    return json.dumps(shas, sort_keys=True)
