"""A small fake Omniglot in the official zip layout, for tests.

`write_fake_omniglot(folder)` writes images_background.zip and
images_evaluation.zip: by default 2 + 2 alphabets with 3 characters each,
20 drawers per character, real 105 x 105 one-bit PNGs (synthetic glyphs, so
classes are tell-apart-able), global ids IIII numbered 0001.. without gaps,
background first, as in the real files. Other tests may import it.

`REAL` is where the real zips lie when this machine has them, and
`NEEDS_REAL` the marks of a test module that reads them (skipped otherwise).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eicl_cli.data.synthetic import synthetic_raw

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
NEEDS_REAL = [
    pytest.mark.real_data,
    pytest.mark.skipif(not (REAL / "images_background.zip").is_file()
                       or not (REAL / "images_evaluation.zip").is_file(),
                       reason=f"real Omniglot zips not in {REAL}"),
]


@dataclass(frozen=True)
class FakeOmniglot:
    folder: Path
    background_zip: Path
    evaluation_zip: Path
    images: np.ndarray  # (N, 105, 105) uint8 {0,1}, rows sorted by (class id, drawer)
    image_class: np.ndarray  # (N,) class id = IIII - 1
    image_drawer: np.ndarray  # (N,) 1..20
    alphabets: list[str]  # background alphabets, then evaluation ones
    n_background_classes: int
    n_classes: int

    def expected(self) -> dict[str, tuple[int, str]]:
        """Size and sha256 of each zip, in the shape of the official table."""
        return {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in (self.background_zip, self.evaluation_zip)}


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.astype(bool)).save(buf, format="PNG")  # mode "1", as the originals
    return buf.getvalue()


def write_fake_omniglot(folder: Path, alphabets: tuple[int, int] = (2, 2), chars_per_alphabet: int = 3,
                        seed: int = 0, extracted: bool = False) -> FakeOmniglot:
    """Write the two zips (or, with extracted=True, the two folders) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_bg, n_ev = alphabets[0] * chars_per_alphabet, alphabets[1] * chars_per_alphabet
    n = n_bg + n_ev
    raw = synthetic_raw(n, 20, 105, seed)
    names = [f"Fake_Background_{i + 1}" for i in range(alphabets[0])] + \
            [f"Fake_Evaluation_{i + 1}" for i in range(alphabets[1])]
    paths = {}
    for set_name, first, count, alpha in (("images_background", 0, n_bg, names[:alphabets[0]]),
                                          ("images_evaluation", n_bg, n_ev, names[alphabets[0]:])):
        members: list[tuple[str, bytes | None]] = [(f"{set_name}/", None)]
        for a, alphabet in enumerate(alpha):
            members.append((f"{set_name}/{alphabet}/", None))
            for k in range(chars_per_alphabet):
                cid = first + a * chars_per_alphabet + k
                char_dir = f"{set_name}/{alphabet}/character{k + 1:02d}/"
                members.append((char_dir, None))
                for d in range(1, 21):
                    members.append((f"{char_dir}{cid + 1:04d}_{d:02d}.png",
                                    png_bytes(raw.images[cid * 20 + d - 1])))
        if extracted:
            for name, data in members:
                p = folder / name
                if data is None:
                    p.mkdir(parents=True, exist_ok=True)
                else:
                    p.write_bytes(data)
            paths[set_name] = folder / set_name
        else:
            path = folder / f"{set_name}.zip"
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in members:
                    # A fixed timestamp makes the zip's bytes, and so its sha256, repeatable.
                    info = zipfile.ZipInfo(name, date_time=(2015, 12, 10, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, b"" if data is None else data)
            paths[set_name] = path
    return FakeOmniglot(folder=folder, background_zip=paths["images_background"],
                        evaluation_zip=paths["images_evaluation"], images=raw.images,
                        image_class=raw.image_class, image_drawer=raw.image_drawer,
                        alphabets=names, n_background_classes=n_bg, n_classes=n)
