"""Image files without torch: folders → samples, the one image loader, and the resize every embedding uses.

Kept free of torch and torchvision so that a search through the ONNX backend starts without importing them.
Every image, whatever its format or mode (RGBA, palette, grayscale, 16-bit TIFF), is loaded as 8-bit RGB by
:func:`load_image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from cbir.errors import CbirError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm"}

# A truncated JPEG is an unreadable file, not a half-grey image: let PIL raise on it.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(CbirError):
    """An image file that exists but cannot be decoded."""


@dataclass(frozen=True)
class Sample:
    path: str
    class_name: str

    def load(self, *, draft_size: int | None = None) -> Image.Image:
        """The image as 8-bit RGB (a slide tile overrides this to read its region of the slide)."""
        return load_image(self.path, draft_size=draft_size)

    def load_prepared(self, input_size: int) -> np.ndarray:
        """The image as the uint8 array the encoders take (see :func:`prepare`)."""
        return prepare(self.load(draft_size=input_size), input_size)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_samples(root: str | Path, classes: list[str] | None = None) -> list[Sample]:
    """Every image of a class-folder data set, sorted, as (path, class) samples.

    ``classes`` keeps only those class folders (used by the generalisation splits).
    """
    root = Path(root)
    if not root.is_dir():
        raise CbirError(f"data folder {root} does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is not None:
        wanted = set(classes)
        class_dirs = [d for d in class_dirs if d.name in wanted]
    samples = [
        Sample(str(path), class_dir.name)
        for class_dir in class_dirs
        for path in sorted(class_dir.rglob("*"))
        if is_image_file(path)
    ]
    if not samples:
        raise CbirError(f"no images found under {root}: expected one sub-folder per class holding image files")
    return samples


def list_images(path: str | Path) -> list[Sample]:
    """Samples from a single image, a class-folder data set, or a flat folder of images (class = folder name)."""
    path = Path(path)
    if path.is_file():
        return [Sample(str(path), path.parent.name)]
    if not path.is_dir():
        raise CbirError(f"{path} does not exist")
    if any(d.is_dir() for d in path.iterdir()):
        return list_samples(path)
    samples = [Sample(str(p), path.name) for p in sorted(path.iterdir()) if is_image_file(p)]
    if not samples:
        raise CbirError(f"no images found in {path}")
    return samples


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: stretch the actual range to 0–255; a plain convert("L") would clip them white.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        # Transparent areas become white, as a slide background, not black.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").split()[-1])
        return background
    return image.convert("RGB")


def load_image(path: str | Path, *, draft_size: int | None = None) -> Image.Image:
    """Any image file as 8-bit RGB; :class:`UnreadableImage` (one line) when it cannot be decoded.

    ``draft_size``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least
    this long, several times cheaper than decoding it whole and then shrinking it.
    """
    try:
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            return _to_8bit_rgb(image)
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None



def prepare(image: Image.Image, input_size: int) -> np.ndarray:
    """An RGB image as the (input_size, input_size, 3) uint8 array the encoders take.

    The same bilinear, antialiased resize as torchvision's ``Resize`` on a PIL image (it calls PIL's), so vectors
    match those of the training transform; normalisation happens inside the encoder.
    """
    if image.size != (input_size, input_size):
        image = image.resize((input_size, input_size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_prepared(path: str | Path, input_size: int) -> np.ndarray:
    """:func:`load_image` then :func:`prepare`; a JPEG larger than twice the size is decoded at reduced scale."""
    return prepare(load_image(path, draft_size=input_size), input_size)
