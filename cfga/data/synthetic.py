"""Deterministic synthetic fine-grained datasets, written in the exact formats of the real archives.

Every class shares one object type (a bird for CUB, a car for Cars) and differs from the others
only in small details: the colour of a patch, the number of stripes, the proportions of two parts.
Objects sit at varied positions and scales on cluttered backgrounds; image sizes straddle 256 px
on the short side; a few JPEGs are grayscale ('L') and a few CMYK, as in CUB.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from cfga.data.archives import DatasetError
from cfga.files import atomic_path
from cfga.registry.datasets import FORMATS

__all__ = [
    "ImageFactory",
    "write_cub_tgz",
    "write_cars_files",
    "write_cub_archive",
    "write_cars_archives",
    "synthesize",
    "render_image",
    "class_params",
    "cub_class_names",
    "cars_class_names",
]

# (class index 0-based, image index within class, global image index) -> (JPEG bytes, bbox x,y,w,h)
ImageFactory = Callable[[int, int, int], tuple[bytes, tuple[float, float, float, float]]]

_MTIME = 1_300_000_000  # fixed member mtime: same seed -> byte-identical archives
_PATCH_COLOURS = [(200, 30, 40), (240, 170, 20), (120, 200, 40), (20, 160, 160), (60, 60, 200), (160, 50, 190)]
_COLOUR_WORDS = ["Crimson", "Amber", "Lime", "Teal", "Indigo", "Violet"]
_KIND_CODE = {"cub": 1, "cars": 2}
_N_COMBOS = 6 * 4 * 2 * 2  # patch colour x stripes (0-3) x part proportion x body proportion


# --------------------------------------------------------------------------------------------
# class attributes and names


def class_params(n_classes: int, seed: int) -> list[dict]:
    """Distinct attribute combinations per class (first _N_COMBOS unique; beyond that, reused
    with a shifted patch hue).

    Patch colours go round-robin over the classes (class i has colour i mod 6), so any six
    consecutive classes — the test half of a small dataset, too — differ in colour, and the train
    half shows every colour that the test half uses: a cue a metric-learning head can learn on the
    train classes and carry to the test classes. Stripes and proportions are drawn at random.
    """
    rng = np.random.default_rng([seed, 0xC1A55])
    order = [int(c) for c in rng.permutation(_N_COMBOS)]
    used: set[int] = set()
    out = []
    for i in range(n_classes):
        cycle = i // _N_COMBOS
        if i % _N_COMBOS == 0:
            used = set()
        combo = next(c for c in order if c % 6 == i % 6 and c not in used)
        used.add(combo)
        colour = np.array(_PATCH_COLOURS[combo % 6], dtype=float)
        if cycle:
            colour = np.clip(colour + 35 * cycle * np.array([1, -1, 1]), 0, 255)
        out.append(
            {
                "combo": combo,
                "cycle": cycle,
                "colour_idx": combo % 6,
                "patch": tuple(int(c) for c in colour),
                "stripes": (combo // 6) % 4,
                "part": (combo // 24) % 2,  # beak length (bird) / cabin height (car)
                "body": (combo // 48) % 2,  # body slender vs round (bird) / long vs compact (car)
            }
        )
    return out


def cub_class_names(params: Sequence[dict]) -> list[str]:
    """Folder names like the real ones: 'NNN.Crimson_Two_barred_Long_billed_Warbler'."""
    stripe = ["Plain", "One_barred", "Two_barred", "Three_barred"]
    beak = ["Short_billed", "Long_billed"]
    body = ["Finch", "Warbler"]
    names = []
    for i, p in enumerate(params, 1):
        n = f"{_COLOUR_WORDS[p['colour_idx']]}_{stripe[p['stripes']]}_{beak[p['part']]}_{body[p['body']]}"
        if p["cycle"]:
            n += f"_{p['cycle'] + 1}"
        names.append(f"{i:03d}.{n}")
    return names


def cars_class_names(params: Sequence[dict]) -> list[str]:
    """Names like the real ones: 'Make Model Type Year'."""
    makes = ["Acme", "Borealis", "Corvane", "Dynamo", "Ember", "Fjord"]
    models = ["Alto", "Brio", "Cielo", "Duetto"]
    types = [["Hatchback", "Coupe"], ["SUV", "Sedan"]]
    names = []
    for p in params:
        year = 2001 + p["combo"] % 12 + 12 * p["cycle"]
        names.append(f"{makes[p['colour_idx']]} {models[p['stripes']]} {types[p['part']][p['body']]} {year}")
    return names


# --------------------------------------------------------------------------------------------
# rendering


def _image_size(rng: np.random.Generator, index: int) -> tuple[int, int]:
    # Alternate short sides below / above 256 so even tiny datasets have both (the resize
    # protocols behave differently on either side).
    short = int(rng.integers(120, 256)) if index % 2 == 0 else int(rng.integers(257, 401))
    aspect = float(rng.uniform(0.6, 1.8))  # width / height
    if aspect >= 1:
        return int(round(short * aspect)), short
    return short, int(round(short / aspect))


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Gradient + faint low-frequency noise + a few clutter shapes, RGB."""
    c0, c1 = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    ang = rng.uniform(0, 2 * np.pi)
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    t = x * np.cos(ang) + y * np.sin(ang)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    base = c0[None, None, :] + t[..., None] * (c1 - c0)[None, None, :]
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    noise = Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)
    # Light clutter: enough that the background is not a flat colour, little enough that a
    # few hundred training steps can learn to look past it (heavier clutter left the offline
    # backbones and DML heads at chance on the test classes).
    img = Image.blend(img, noise, float(rng.uniform(0.05, 0.12)))
    d = ImageDraw.Draw(img)
    s = min(w, h)
    for _ in range(int(rng.integers(2, 6))):
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.03, 0.18, 2) * s
        kind = int(rng.integers(0, 3))
        if kind == 0:
            d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=col)
        elif kind == 1:
            d.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=col)
        else:
            d.line([cx - rx, cy - ry, cx + rx, cy + ry], fill=col, width=int(rng.integers(1, 6)))
    return img


def _draw_bird(d: ImageDraw.ImageDraw, rng: np.random.Generator, p: dict, w: int, h: int):
    s = float(rng.uniform(0.3, 0.6)) * min(w, h)  # body length, px
    bh = s * (0.58 if p["body"] == 0 else 0.38)  # body height: round finch vs slender warbler
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.35, 0.7) * h
    flip = -1.0 if rng.random() < 0.5 else 1.0
    X = lambda dx: cx + flip * dx  # noqa: E731  mirrored x for left/right-facing birds
    jitter = rng.integers(-20, 21, 3)
    body_col = tuple(int(c) for c in np.clip(np.array([125, 100, 75]) + jitter, 0, 255))
    dark = (35, 30, 25)
    # tail, legs, body, head, beak, eye, wing patch, stripes
    d.polygon([(X(-0.45 * s), cy), (X(-0.85 * s), cy - 0.25 * bh), (X(-0.85 * s), cy + 0.25 * bh)], fill=body_col)
    for lx in (-0.1, 0.1):
        d.line([(X(lx * s), cy + 0.4 * bh), (X(lx * s), cy + 0.9 * bh)], fill=dark, width=max(1, int(s / 60)))
    d.ellipse([min(X(-0.5 * s), X(0.5 * s)), cy - bh / 2, max(X(-0.5 * s), X(0.5 * s)), cy + bh / 2], fill=body_col)
    hr = 0.2 * s
    hx, hy = X(0.45 * s), cy - 0.45 * bh
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=body_col)
    beak = (0.12 if p["part"] == 0 else 0.32) * s  # beak length: the fine-grained part ratio
    d.polygon([(X(0.6 * s), hy - 0.25 * hr), (X(0.6 * s + beak), hy), (X(0.6 * s), hy + 0.25 * hr)], fill=(210, 180, 60))
    er = max(1.5, 0.05 * s)
    d.ellipse([X(0.5 * s) - er, hy - 0.3 * hr - er, X(0.5 * s) + er, hy - 0.3 * hr + er], fill=(10, 10, 10))
    d.ellipse(
        [min(X(-0.25 * s), X(0.2 * s)), cy - 0.3 * bh, max(X(-0.25 * s), X(0.2 * s)), cy + 0.15 * bh], fill=p["patch"]
    )
    for k in range(p["stripes"]):
        sx = X((-0.38 + 0.09 * k) * s)
        d.line([(sx, cy - 0.35 * bh), (sx, cy + 0.35 * bh)], fill=dark, width=max(2, int(s / 35)))
    xs = [X(-0.85 * s), X(0.6 * s + beak)]
    return min(xs), hy - hr, max(xs), cy + 0.9 * bh


def _draw_car(d: ImageDraw.ImageDraw, rng: np.random.Generator, p: dict, w: int, h: int):
    L = float(rng.uniform(0.4, 0.8)) * min(w, h) * (1.15 if p["body"] == 0 else 1.0)
    bh = L * (0.22 if p["body"] == 0 else 0.3)  # long low body vs compact tall body
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.4, 0.7) * h
    jitter = int(rng.integers(-30, 31))
    body_col = tuple(int(np.clip(c + jitter, 0, 255)) for c in (150, 155, 165))
    x0, x1 = cx - L / 2, cx + L / 2
    top = cy - bh / 2
    ch = bh * (0.6 if p["part"] == 0 else 1.0)  # cabin height: the fine-grained part ratio
    d.polygon([(x0 + 0.22 * L, top), (x0 + 0.32 * L, top - ch), (x0 + 0.68 * L, top - ch), (x0 + 0.8 * L, top)], fill=body_col)
    d.polygon(
        [(x0 + 0.27 * L, top), (x0 + 0.35 * L, top - 0.8 * ch), (x0 + 0.65 * L, top - 0.8 * ch), (x0 + 0.75 * L, top)],
        fill=p["patch"],  # tinted windows: the class colour
    )
    d.rounded_rectangle([x0, top, x1, cy + bh / 2], radius=max(1, int(bh / 4)), fill=body_col)
    for k in range(p["stripes"]):
        yy = top + bh * (0.3 + 0.17 * k)
        d.line([(x0 + 0.05 * L, yy), (x1 - 0.05 * L, yy)], fill=(25, 25, 30), width=max(2, int(L / 70)))
    r = 0.11 * L
    for fx in (0.2, 0.8):
        wx, wy = x0 + fx * L, cy + bh / 2
        d.ellipse([wx - r, wy - r, wx + r, wy + r], fill=(20, 20, 20))
        d.ellipse([wx - r / 2, wy - r / 2, wx + r / 2, wy + r / 2], fill=(180, 180, 180))
    d.ellipse([x1 - 0.06 * L, top + 0.15 * bh, x1 - 0.01 * L, top + 0.4 * bh], fill=(250, 240, 170))
    return x0, top - ch, x1, cy + bh / 2 + r


def _mode_for(index: int) -> str:
    # A few grayscale and CMYK JPEGs, as in CUB; fixed indices so small datasets have both.
    if index % 11 == 1:
        return "L"
    if index % 13 == 2:
        return "CMYK"
    return "RGB"


def render_image(kind: str, params: dict, seed: int, class_index: int, k: int, index: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """One synthetic image (mode RGB, L or CMYK) and the object's bbox (x, y, w, h) in pixels."""
    rng = np.random.default_rng([seed, _KIND_CODE[kind], class_index, k])
    w, h = _image_size(rng, index)
    img = _background(rng, w, h)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (_draw_bird if kind == "cub" else _draw_car)(d, rng, params, w, h)
    # one small occluder in front now and then
    if rng.random() < 0.3:
        ox, oy, orad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.08) * min(w, h)
        d.ellipse([ox - orad, oy - orad, ox + orad, oy + orad], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    x0, x1 = max(0.0, x0), min(float(w - 1), x1)
    y0, y1 = max(0.0, y0), min(float(h - 1), y1)
    mode = _mode_for(index)
    if mode != "RGB":
        img = img.convert(mode)
    return img, (round(x0, 1), round(y0, 1), round(max(x1 - x0, 1.0), 1), round(max(y1 - y0, 1.0), 1))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _factory(kind: str, params: Sequence[dict], seed: int) -> ImageFactory:
    def make(ci: int, k: int, index: int):
        img, bbox = render_image(kind, params[ci], seed, ci, k, index)
        return _jpeg(img), bbox

    return make


# --------------------------------------------------------------------------------------------
# archive writers (deterministic bytes)


class _TgzWriter:
    """Deterministic .tgz: fixed gzip header (no name, mtime 0) and fixed member metadata."""

    def __init__(self, fh):
        self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=6)
        self.tf = tarfile.open(fileobj=self.gz, mode="w", format=tarfile.GNU_FORMAT)

    def _info(self, name: str, is_dir: bool, size: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = _MTIME, 0, 0, "", ""
        ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        ti.mode = 0o755 if is_dir else 0o644
        ti.size = size
        return ti

    def dir(self, name: str) -> None:
        self.tf.addfile(self._info(name.rstrip("/") + "/", True))

    def file(self, name: str, data: bytes) -> None:
        self.tf.addfile(self._info(name, False, len(data)), io.BytesIO(data))

    def close(self) -> None:
        self.tf.close()
        self.gz.close()


def _file_stem(folder: str) -> str:
    # '001.Black_footed_Albatross' -> 'Black_Footed_Albatross', as in the real file names
    return "_".join(w[:1].upper() + w[1:] for w in folder.split(".", 1)[1].split("_"))


def write_cub_tgz(path: str | os.PathLike, class_names: Sequence[str], counts: Sequence[int], image_factory: ImageFactory) -> None:
    """Write a CUB_200_2011.tgz-format archive (atomically).

    ``class_names``: folder names 'NNN.Name' for class ids 1..C; ``counts[c]``: images of class
    c+1. Ids run in class order like the real images.txt. Member order follows the real archive
    closely enough: an ignored top-level file, metadata, images/, then images.txt (so readers
    must scan past the images).
    """
    assert len(class_names) == len(counts)
    lines = {n: [] for n in ("images", "labels", "split", "bbox")}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        w = _TgzWriter(fh)
        w.file("attributes.txt", b"1 has_bill_shape::curved_(up_or_down)\n")
        w.dir("CUB_200_2011")
        w.dir("CUB_200_2011/images")
        iid = 0
        for ci, (folder, n) in enumerate(zip(class_names, counts)):
            w.dir(f"CUB_200_2011/images/{folder}")
            stem = _file_stem(folder)
            for k in range(n):
                iid += 1
                data, (x, y, bw, bh) = image_factory(ci, k, iid - 1)
                rel = f"{folder}/{stem}_{k + 1:04d}_{(7919 * iid) % 100000}.jpg"
                w.file(f"CUB_200_2011/images/{rel}", data)
                lines["images"].append(f"{iid} {rel}")
                lines["labels"].append(f"{iid} {ci + 1}")
                lines["split"].append(f"{iid} {(k + ci) % 2}")  # ignored by readers (method.md S17)
                lines["bbox"].append(f"{iid} {x:.1f} {y:.1f} {bw:.1f} {bh:.1f}")
        txt = lambda ls: ("\n".join(ls) + "\n").encode()  # noqa: E731
        w.file("CUB_200_2011/bounding_boxes.txt", txt(lines["bbox"]))
        w.file("CUB_200_2011/classes.txt", txt([f"{i} {n}" for i, n in enumerate(class_names, 1)]))
        w.file("CUB_200_2011/image_class_labels.txt", txt(lines["labels"]))
        w.file("CUB_200_2011/images.txt", txt(lines["images"]))
        w.file("CUB_200_2011/README", b"Synthetic CUB-200-2011-format data written by cfga.synthetic.\n")
        w.file("CUB_200_2011/train_test_split.txt", txt(lines["split"]))
        w.close()


_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 1970"
_CARS_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def write_cars_files(
    images_archive: str | os.PathLike,
    annotations_mat: str | os.PathLike,
    class_names: Sequence[str],
    counts: Sequence[int],
    image_factory: ImageFactory,
) -> None:
    """Write car_ims.tgz + cars_annos.mat (atomically) with the real structure.

    Images are numbered 000001... in .mat order, sorted by class like the real file.
    ``annotations``: 1xN struct (relative_im_path char, bbox_* uint16 1x1 (1-based px), class
    uint8 1x1 (1-based), test uint8 1x1); ``class_names``: 1xC cell of char.
    """
    import scipy.io

    assert len(class_names) == len(counts)
    total = int(sum(counts))
    ann = np.empty((1, total), dtype=[(f, object) for f in _CARS_FIELDS])
    cls_dtype = np.uint8 if len(class_names) <= 255 else np.uint16
    with atomic_path(images_archive) as tmp, open(tmp, "wb") as fh:
        w = _TgzWriter(fh)
        w.dir("car_ims")
        i = 0
        for ci, n in enumerate(counts):
            for k in range(n):
                data, (x, y, bw, bh) = image_factory(ci, k, i)
                rel = f"car_ims/{i + 1:06d}.jpg"
                w.file(rel, data)
                ann["relative_im_path"][0, i] = rel
                for f, v in zip(_CARS_FIELDS[1:5], (x + 1, y + 1, x + bw, y + bh)):
                    ann[f][0, i] = np.array([[int(round(v))]], dtype=np.uint16)
                ann["class"][0, i] = np.array([[ci + 1]], dtype=cls_dtype)
                ann["test"][0, i] = np.array([[(k + ci) % 2]], dtype=np.uint8)  # ignored by readers
                i += 1
        w.close()
    names = np.empty((1, len(class_names)), dtype=object)
    for j, n in enumerate(class_names):
        names[0, j] = n
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"annotations": ann, "class_names": names}, format="5", do_compression=False)
    raw = bytearray(buf.getvalue())
    raw[:116] = _MAT_HEADER.ljust(116, b" ")  # savemat stamps the time here; fix it for determinism
    with atomic_path(annotations_mat) as tmp:
        tmp.write_bytes(bytes(raw))


# --------------------------------------------------------------------------------------------
# entry points


def write_cub_archive(path: str | os.PathLike, classes: int, images_per_class: int, seed: int) -> None:
    """Synthetic CUB_200_2011.tgz: ``classes`` bird classes x ``images_per_class`` images."""
    params = class_params(classes, seed)
    write_cub_tgz(path, cub_class_names(params), [images_per_class] * classes, _factory("cub", params, seed))


def write_cars_archives(
    images_archive: str | os.PathLike, annotations_mat: str | os.PathLike, classes: int, images_per_class: int, seed: int
) -> None:
    """Synthetic car_ims.tgz + cars_annos.mat: ``classes`` car classes x ``images_per_class``."""
    params = class_params(classes, seed)
    write_cars_files(
        images_archive, annotations_mat, cars_class_names(params), [images_per_class] * classes, _factory("cars", params, seed)
    )


def synthesize(cfg: Mapping, out_dir: str | os.PathLike) -> dict:
    """Write the archive(s) for ``{format: cub|cars, synthetic: {classes, images_per_class, seed}}``
    into ``out_dir``; return the ingest cfg pointing at them."""
    fmt = cfg.get("format")
    syn = cfg.get("synthetic") or {}
    try:
        classes, per, seed = int(syn["classes"]), int(syn["images_per_class"]), int(syn["seed"])
    except (KeyError, TypeError, ValueError):
        raise DatasetError(
            "synthetic dataset config needs integers synthetic: {classes, images_per_class, seed}."
        ) from None
    # >= 2 classes so both halves exist; >= 2 images so no test class has a single image.
    if classes < 2 or per < 2:
        raise DatasetError("synthetic dataset config: need classes >= 2 and images_per_class >= 2.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "cub":
        archive = out / FORMATS["cub"].files["archive"]
        write_cub_archive(archive, classes, per, seed)
        return {"format": "cub", "archive": str(archive)}
    if fmt == "cars":
        files = FORMATS["cars"].files
        images, annos = out / files["images_archive"], out / files["annotations"]
        write_cars_archives(images, annos, classes, per, seed)
        return {"format": "cars", "images_archive": str(images), "annotations": str(annos)}
    raise DatasetError(f"synthetic dataset config: unknown format {fmt!r}; use 'cub' or 'cars'.")
