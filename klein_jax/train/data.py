"""The training data: a folder of images with same-named .txt captions, checked whole before training starts,
aspect buckets, and the data order (a pure function of seed and epoch, so a resumed run sees the same batches).

Edit pairs (diffusers' train_dreambooth_lora_flux2_klein_img2img.py: image, cond_image, caption): a second folder
holds one reference (input) image per training image under the same stem (refs/cat.jpg for cat.png + cat.txt);
the reference is resized and cropped to its target's bucket."""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np
import PIL.Image
import PIL.ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ASPECTS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 16 / 9, 2)  # width / height of the buckets


@dataclasses.dataclass(frozen=True)
class Example:
    """One training image, its caption and its bucket (width, height) in pixels."""

    image: pathlib.Path
    caption: str
    bucket: tuple[int, int]
    reference: pathlib.Path | None = None  # the edit pair's input image


def bucket_sizes(resolution: int, multiple: int) -> tuple[tuple[int, int], ...]:
    """(width, height) buckets of about resolution^2 pixels, sides multiples of `multiple`, one per aspect."""
    sizes = []
    for aspect in ASPECTS:
        width = max(multiple, round(resolution * math.sqrt(aspect) / multiple) * multiple)
        height = max(multiple, round(resolution / math.sqrt(aspect) / multiple) * multiple)
        sizes.append((width, height))
    return tuple(dict.fromkeys(sizes))


def nearest_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log scale) to width / height."""
    return min(buckets, key=lambda b: abs(math.log(width / height) - math.log(b[0] / b[1])))


def _image_size(image: pathlib.Path) -> tuple[tuple[int, int] | None, str | None]:
    try:
        with PIL.Image.open(image) as opened:
            opened.verify()
        with PIL.Image.open(image) as opened:
            return PIL.ImageOps.exif_transpose(opened).size, None
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
        return None, f"{image.name}: cannot be read as an image ({e})"


def _check_pair(image: pathlib.Path) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(caption, size, problem) of one image file."""
    caption_path = image.with_suffix(".txt")
    if not caption_path.is_file():
        return None, None, f"{image.name}: no caption file {caption_path.name}"
    try:
        caption = caption_path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        return None, None, f"{caption_path.name}: not UTF-8 text"
    if not caption:
        return None, None, f"{caption_path.name}: empty caption"
    size, problem = _image_size(image)
    return caption, size, problem


def _images(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _reference(image: pathlib.Path, references: dict[str, pathlib.Path]) -> tuple[pathlib.Path | None, str | None]:
    reference = references.get(image.stem)
    if reference is None:
        return None, f"{image.name}: no reference image {image.stem}.* in the reference folder"
    _, problem = _image_size(reference)
    return reference, problem and f"reference {problem}"


def scan_dataset(folder: str | pathlib.Path, resolution: int, multiple: int,
                 references: str | pathlib.Path | None = None) -> list[Example]:
    """Every image of `folder` with its caption, bucket (and reference image of the same stem in `references`);
    one ValueError naming every bad file."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"training data folder not found: {folder}")
    if references is not None and not pathlib.Path(references).is_dir():
        raise ValueError(f"reference image folder not found: {references}")
    images = _images(folder)
    problems = [f"{p.name}: a caption without an image" for p in sorted(folder.glob("*.txt"))
                if not any(p.with_suffix(s).exists() or p.with_suffix(s.upper()).exists() for s in IMAGE_SUFFIXES)]
    by_stem = {} if references is None else {p.stem: p for p in _images(pathlib.Path(references))}
    stems = {p.stem for p in images}
    problems += [f"reference {p.name}: no training image {stem}.*" for stem, p in by_stem.items() if stem not in stems]
    buckets, examples = bucket_sizes(resolution, multiple), []
    for image in images:
        caption, size, problem = _check_pair(image)
        reference = None
        if references is not None and not problem:
            reference, problem = _reference(image, by_stem)
        if problem:
            problems.append(problem)
        else:
            examples.append(Example(image, caption, nearest_bucket(*size, buckets), reference))
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... ({len(problems) - 20} more)" if len(problems) > 20 else "")
        raise ValueError(f"{folder}: {len(problems)} bad training files: {shown}")
    if not examples:
        raise ValueError(f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)}) with .txt captions")
    return examples


def load_pixels(path: pathlib.Path, size: tuple[int, int]) -> np.ndarray:
    """An image resized to cover `size` (width, height), centre-cropped, as float32 (h, w, 3) in [-1, 1]."""
    width, height = size
    with PIL.Image.open(path) as opened:
        image = PIL.ImageOps.exif_transpose(opened).convert("RGB")
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           PIL.Image.Resampling.BILINEAR)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    pixels = np.asarray(resized.crop((left, top, left + width, top + height)), np.float32)
    return pixels / 127.5 - 1.0


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(batches, batch_size) example indices of one epoch: shuffled within each bucket (a small bucket repeats
    to fill its last batch), then the batches shuffled; the same seed and epoch give the same order."""
    rng = np.random.default_rng([seed, epoch])
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, example in enumerate(examples):
        by_bucket.setdefault(example.bucket, []).append(i)
    batches = []
    for bucket in sorted(by_bucket):
        order = rng.permutation(by_bucket[bucket])
        count = math.ceil(len(order) / batch_size) * batch_size
        order = np.resize(order, count)  # repeats from the start to fill the last batch
        batches += list(order.reshape(-1, batch_size))
    return np.stack(batches)[rng.permutation(len(batches))]
