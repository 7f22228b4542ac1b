"""Omniglot from its sources: the official zips (downloaded or local), the
extracted folders, or TensorFlow Datasets. Each reader returns a `RawSet`
and refuses bad input with a one-line EiclError naming the file.

Facts (docs/experiment.md §2): files `images_background/<Alphabet>/characterNN/IIII_DD.png`
(and `images_evaluation/...`); class id = IIII - 1; drawer = DD; 105 x 105
one-bit PNGs, white (1) background.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import EiclError, first_line
from .cache import RawSet, sha256_file

IMAGE_SIZE = 105
N_DRAWERS = 20
SETS = ("images_background", "images_evaluation")
OFFICIAL_BASE = "https://github.com/brendenlake/omniglot/raw/master/python/"
# (size in bytes, sha256) of the official files, as TFDS records them.
OFFICIAL_FILES: dict[str, tuple[int, str]] = {
    "images_background.zip": (9_464_212, "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640"),
    "images_evaluation.zip": (6_462_886, "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee"),
}
URL_ENV = {"images_background.zip": "EICL_OMNIGLOT_URL_BACKGROUND",
           "images_evaluation.zip": "EICL_OMNIGLOT_URL_EVALUATION"}
_PATH = re.compile(r"^(images_background|images_evaluation)/([^/]+)/character(\d{2})/(\d{4})_(\d{2})\.png$")

# progress(done, total) after each decoded image batch
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Entry:
    set_name: str
    alphabet: str
    character: int  # NN of characterNN
    class_id: int  # IIII - 1
    drawer: int  # DD
    where: str  # file name for messages
    key: str  # member name in the zip, or file path


# ---------------------------------------------------------------- decoding

def decode_png(data: bytes, where: str) -> np.ndarray:
    """One PNG -> (105, 105) uint8 in {0, 1}, 1 = white."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise EiclError(f"{where}: not a decodable image ({e})") from None
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise EiclError(f"{where}: image is {img.size[0]} x {img.size[1]}, not "
                        f"{IMAGE_SIZE} x {IMAGE_SIZE}")
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8)
    # Grey or colour copies: white stays 1, ink 0, as the original's
    # convert_image_dtype + rgb_to_grayscale gives for these black/white images.
    return (np.asarray(img.convert("L"), dtype=np.uint8) >= 128).astype(np.uint8)


def _parse(name: str, where: str) -> _Entry | None:
    """A PNG path inside a source -> entry; None for folders and non-PNG files."""
    if name.endswith("/") or not name.lower().endswith(".png"):
        return None
    m = _PATH.match(name)
    if not m:
        raise EiclError(f"{where}: unexpected path {name!r}; expected "
                        "images_background|images_evaluation/<Alphabet>/characterNN/IIII_DD.png")
    set_name, alphabet, nn, iiii, dd = m.groups()
    return _Entry(set_name, alphabet, int(nn), int(iiii) - 1, int(dd), f"{where}: {name}", name)


def _validate(entries: list[_Entry], where: str, origin: dict[str, str]) -> None:
    """Layout checks that hold for Omniglot and for any faithful subset of it.
    `origin` names the file or folder each set came from, for messages."""
    if not entries:
        raise EiclError(f"{where}: no Omniglot PNG files found")
    folders: dict[tuple[str, str, int], set[int]] = {}
    drawers: dict[tuple[str, str, int], list[int]] = {}
    owner: dict[int, tuple[str, str, int]] = {}
    for e in entries:
        folder = (e.set_name, e.alphabet, e.character)
        folders.setdefault(folder, set()).add(e.class_id)
        drawers.setdefault(folder, []).append(e.drawer)
        if owner.setdefault(e.class_id, folder) != folder:
            raise EiclError(f"{e.where}: class {e.class_id + 1:04d} also appears in "
                            f"{'/'.join(map(str, owner[e.class_id]))}")
    for folder, ids in folders.items():
        name = f"{origin.get(folder[0], where)}: {folder[0]}/{folder[1]}/character{folder[2]:02d}"
        if len(ids) != 1:
            raise EiclError(f"{name} mixes character ids {sorted(i + 1 for i in ids)}")
        if sorted(drawers[folder]) != list(range(1, N_DRAWERS + 1)):
            raise EiclError(f"{name} has drawers {sorted(drawers[folder])}, "
                            f"expected 01..{N_DRAWERS} once each")
    ids = np.array(sorted(owner))
    if ids[0] != 0 or ids[-1] != len(ids) - 1:
        raise EiclError(f"{where}: character ids are not 0001..{len(ids):04d} without gaps "
                        f"(found {ids[0] + 1:04d}..{ids[-1] + 1:04d} for {len(ids)} characters)")


def _assemble(entries: list[_Entry], read: Callable[[_Entry], bytes], where: str,
              source: str, source_sha256: str, progress: Progress | None,
              origin: dict[str, str] | None = None) -> RawSet:
    _validate(entries, where, origin or {})
    entries = sorted(entries, key=lambda e: (e.class_id, e.drawer))
    n = len(entries)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, e in enumerate(entries):
        images[i] = decode_png(read(e), e.where)
        if progress is not None and (i % 500 == 499 or i == n - 1):
            progress(i + 1, n)
    # Alphabets in the order of their first character id, background first.
    first: dict[tuple[str, str], int] = {}
    for e in entries:
        first.setdefault((e.set_name, e.alphabet), e.class_id)
    order = sorted(first, key=lambda k: (SETS.index(k[0]), first[k]))
    alpha_index = {k: i for i, k in enumerate(order)}
    n_classes = entries[-1].class_id + 1
    character_names = [""] * n_classes
    for e in entries:
        character_names[e.class_id] = f"{e.alphabet}/character{e.character:02d}"
    return RawSet(
        images=images,
        image_class=np.array([e.class_id for e in entries], np.int32),
        image_drawer=np.array([e.drawer for e in entries], np.int8),
        image_alphabet=np.array([alpha_index[(e.set_name, e.alphabet)] for e in entries], np.int16),
        image_background=np.array([e.set_name == SETS[0] for e in entries], bool),
        alphabet_names=[a for _, a in order],
        character_names=character_names,
        kind="omniglot",
        source=source,
        source_sha256=source_sha256,
    )


# ---------------------------------------------------------------- local sources

def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise EiclError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise EiclError(f"{path}: not a readable zip file ({e}); corrupt or truncated?") from None
    return zf


def _zip_reader(zf: zipfile.ZipFile, path: Path) -> Callable[[_Entry], bytes]:
    def read(e: _Entry) -> bytes:
        try:
            return zf.read(e.key)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as err:
            raise EiclError(f"{path}: cannot read {e.key} ({err}); corrupt or truncated zip?") from None
    return read


def find_local(source: Path) -> dict[str, Path]:
    """Resolve a local source to {set name: zip file or folder}. Accepts a
    folder holding the two zips or the two extracted folders, or one of the
    zips (its partner is looked for beside it)."""
    source = Path(source).expanduser()
    if not source.exists():
        raise EiclError(f"--source {source}: no such file or folder (give the official zips, "
                        f"a folder holding them or their extracted folders, 'tfds' or "
                        f"'synthetic')")
    source = source.resolve()  # the cache records where it came from, wherever it is read
    folder = source.parent if source.is_file() else source
    if source.is_file() and source.name not in OFFICIAL_FILES:
        raise EiclError(f"{source}: expected images_background.zip or images_evaluation.zip, "
                        "or a folder holding both")
    found = {}
    for s in SETS:
        z, d = folder / f"{s}.zip", folder / s
        if d.is_dir():
            found[s] = d
        elif z.is_file():
            found[s] = z
        else:
            raise EiclError(f"{folder}: missing {s}.zip (or an extracted {s}/ folder)")
    return found


def local_fingerprint(parts: dict[str, Path]) -> str:
    """Identity of a local source: the zips' sha256, or a digest of every PNG's
    path and bytes for extracted folders."""
    out = {}
    for s, p in parts.items():
        if p.is_file():
            out[p.name] = sha256_file(p)
        else:
            h = hashlib.sha256()
            for f in sorted(p.rglob("*.png")):
                h.update(str(f.relative_to(p.parent)).encode() + b"\0" + f.read_bytes())
            out[f"{s}/"] = h.hexdigest()
    return json.dumps(out, sort_keys=True)


def read_local(parts: dict[str, Path], fingerprint: str, progress: Progress | None = None) -> RawSet:
    entries: list[_Entry] = []
    readers: dict[str, Callable[[_Entry], bytes]] = {}
    zips = []
    try:
        for s, p in parts.items():
            if p.is_file():
                zf = _open_zip(p)
                zips.append(zf)
                names = zf.namelist()
                got = [e for e in (_parse(n, str(p)) for n in names) if e is not None]
                readers[s] = _zip_reader(zf, p)
            else:
                got = []
                for f in sorted(p.rglob("*")):
                    rel = f.relative_to(p.parent).as_posix()
                    e = _parse(rel, str(p.parent)) if f.is_file() else None
                    if e is not None:
                        got.append(_Entry(e.set_name, e.alphabet, e.character, e.class_id,
                                          e.drawer, str(f), str(f)))
                readers[s] = _file_reader
            wrong = [e for e in got if e.set_name != s]
            if wrong:
                raise EiclError(f"{wrong[0].where}: found inside {p.name}, which should hold {s}/ only")
            if not got:
                raise EiclError(f"{p}: no {s}/<Alphabet>/characterNN/IIII_DD.png files inside")
            entries += got
        where = str(next(iter(parts.values())).parent)
        source = ", ".join(str(p) for p in parts.values())
        return _assemble(entries, lambda e: readers[e.set_name](e), where, source,
                         fingerprint, progress, {s: str(p) for s, p in parts.items()})
    finally:
        for zf in zips:
            zf.close()


def _file_reader(e: _Entry) -> bytes:
    try:
        return Path(e.key).read_bytes()
    except OSError as err:
        raise EiclError(f"{e.key}: cannot read ({err})") from None


# ---------------------------------------------------------------- download

def official_urls(overrides: dict[str, str | None] | None = None) -> dict[str, str]:
    """URL per file: explicit override, else $EICL_OMNIGLOT_URL_*, else the official one."""
    overrides = overrides or {}
    return {name: overrides.get(name) or os.environ.get(URL_ENV[name]) or OFFICIAL_BASE + name
            for name in OFFICIAL_FILES}


def download(url: str, dest: Path, size: int, sha256: str,
             progress: Progress | None = None, timeout: float = 60.0) -> None:
    """Fetch url to dest.part, check byte count and sha256, then rename to dest.
    Any failure removes the partial file, and the folders made for it if
    they are still empty, and raises an EiclError naming it."""
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # deepest first
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EiclError(f"cannot create the data folder {dest.parent}: {e.strerror or e}") from None
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    got = 0
    done = False
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
                while block := r.read(1 << 16):
                    f.write(block)
                    h.update(block)
                    got += len(block)
                    if got > size:  # not the file we want; stop early
                        break
                    if progress is not None:
                        progress(got, size)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise EiclError(f"download of {dest.name} from {url} failed after {got} bytes: {reason} "
                            f"(offline: give the official zips with --source PATH)") from None
        if got != size:
            raise EiclError(f"download of {dest.name} from {url} is {got} bytes, expected {size}: "
                            "incomplete or not the official file")
        if h.hexdigest() != sha256:
            raise EiclError(f"download of {dest.name} from {url} has sha256 {h.hexdigest()}, "
                            f"expected {sha256}: refusing it")
        part.replace(dest)
        done = True
    finally:
        part.unlink(missing_ok=True)
        for folder in made if not done else ():
            try:
                folder.rmdir()  # only an empty one: never what another process put there
            except OSError:
                break


def fetch_official(data_dir: Path, urls: dict[str, str],
                   expected: dict[str, tuple[int, str]] = OFFICIAL_FILES,
                   progress: Callable[[str], Progress] | None = None) -> dict[str, Path]:
    """The two zips in data_dir, downloaded unless a copy with the expected
    size and sha256 is already there. `expected` is the official table; only
    tests pass another (the CLI has no way to change it)."""
    out = {}
    for name, (size, sha) in expected.items():
        dest = Path(data_dir) / name
        if not (dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha):
            download(urls[name], dest, size, sha, progress(name) if progress else None)
        out[name.removesuffix(".zip")] = dest
    return out


# ---------------------------------------------------------------- TFDS

def read_tfds(progress: Progress | None = None) -> RawSet:
    """Convert TFDS `omniglot` (train = background, test = evaluation) into
    the cache the zips give: same class ids, alphabet numbering and character
    names. TFDS keeps no drawer number, so drawers are numbered 1..20 in the
    order TFDS yields a class's images; that order is what the original code's
    `single` and `separated` exemplar modes see (its first image per class),
    not drawer 01 (see the README)."""
    try:
        import tensorflow_datasets as tfds  # optional extra
    except ImportError:
        raise EiclError("tensorflow-datasets is not installed; pip install 'eicl[tfds]' "
                        "or use --source PATH") from None
    try:
        builder = tfds.builder("omniglot")
        builder.download_and_prepare()
        alphabets = list(builder.info.features["alphabet"].names)
        version = str(builder.info.version)
        images, classes, alpha, char_id, bg = [], [], [], [], []
        total = sum(builder.info.splits[s].num_examples for s in ("train", "test"))
        for split in ("train", "test"):
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
                rgb = ex["image"]
                if rgb.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
                    raise EiclError(f"TFDS omniglot/{split}: image of shape {rgb.shape}, "
                                    f"expected {IMAGE_SIZE} x {IMAGE_SIZE}")
                images.append((rgb.reshape(IMAGE_SIZE, IMAGE_SIZE, -1).mean(-1) >= 128).astype(np.uint8))
                classes.append(int(ex["label"]))
                alpha.append(int(ex["alphabet"]))
                char_id.append(int(ex["alphabet_char_id"]))
                bg.append(split == "train")
                if progress is not None and (len(images) % 500 == 0 or len(images) == total):
                    progress(len(images), total)
    except EiclError:
        raise
    except Exception as e:  # TFDS and TF raise many kinds
        raise EiclError(f"TFDS omniglot could not be loaded: {first_line(e)}") from None
    cls = np.array(classes, np.int32)
    order = np.argsort(cls, kind="stable")
    # Drawer = rank of the image within its class, in TFDS order.
    ranks = np.empty(len(cls), np.int64)
    ranks[order] = np.arange(len(cls)) - np.searchsorted(cls[order], cls[order])
    n_classes = int(cls.max()) + 1
    # TFDS sorts alphabets by name; the zips' reader numbers them by their
    # first class id. Renumber so both sources give the same cache.
    alpha_tfds = np.array(alpha, np.int64)
    first_class = np.full(len(alphabets), n_classes)
    np.minimum.at(first_class, alpha_tfds, cls)
    present = np.flatnonzero(first_class < n_classes)
    by_first = present[np.argsort(first_class[present], kind="stable")]
    renumber = np.zeros(len(alphabets), np.int64)
    renumber[by_first] = np.arange(len(by_first))
    alphabet_names = [alphabets[a] for a in by_first]
    alpha_new = renumber[alpha_tfds]
    a_of_c = np.zeros(n_classes, np.int64)
    a_of_c[cls] = alpha_new
    k_of_c = np.zeros(n_classes, np.int64)
    k_of_c[cls] = char_id  # TFDS's alphabet_char_id is characterNN - 1
    character_names = [f"{alphabet_names[a_of_c[c]]}/character{k_of_c[c] + 1:02d}"
                       for c in range(n_classes)]
    return RawSet(
        images=np.stack(images),
        image_class=cls,
        image_drawer=(ranks + 1).astype(np.int8),
        image_alphabet=alpha_new.astype(np.int16),
        image_background=np.array(bg, bool),
        alphabet_names=alphabet_names,
        character_names=character_names,
        kind="omniglot",
        source=f"tfds omniglot {version}",
        source_sha256=f"tfds:omniglot:{version}",
    )
