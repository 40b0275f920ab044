"""What CompVis' txt2img script does to an image besides sampling, the parts that need no torch (the server's front
reads them): the words for an image the safety checker flagged, and the invisible watermark (invisible-watermark's
dwtDct, an optional extra)."""
import numpy as np
from PIL import Image

from stablediff.errors import UserError

FLAGGED = "flagged by the safety checker"
WATERMARK = "StableDiffusionV1"  # CompVis' scripts/txt2img.py
WATERMARK_METHOD = "dwtDct"
WATERMARK_MIN_PIXELS = 256 * 256  # the library refuses smaller images
NO_LIBRARY = "the watermark needs the invisible-watermark library: pip install 'stablediff[watermark]'"


def with_info(new: Image.Image, old: Image.Image) -> Image.Image:
    """`new` carrying `old`'s info (its infotext and what the checks found)."""
    new.info.update(old.info)
    return new


def watermark_library():
    """invisible-watermark's encoder and decoder classes, or a one-line error saying how to install it."""
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        raise UserError(NO_LIBRARY) from None
    return WatermarkEncoder, WatermarkDecoder


def check_watermark_text(text: str) -> None:
    """A watermark text that can be embedded, and the library to embed it."""
    watermark_library()
    if not text:
        raise UserError("the watermark text is empty: give some text, or leave the watermark out")


def check_watermark_size(width: int, height: int) -> None:
    if width * height < WATERMARK_MIN_PIXELS:
        raise UserError(f"the invisible watermark needs images of at least {WATERMARK_MIN_PIXELS:,} pixels (256x256); "
                        f"this one is {width}x{height}: make it larger, or leave the watermark out")


def stamp(image: Image.Image, text: str) -> Image.Image:
    """The image with `text` embedded invisibly, as CompVis' script does (dwtDct on the BGR pixels)."""
    encoder_cls, _ = watermark_library()
    check_watermark_size(*image.size)
    encoder = encoder_cls()
    encoder.set_watermark("bytes", text.encode("utf-8"))
    return with_info(Image.fromarray(_flip(encoder.encode(_flip(np.asarray(image.convert("RGB"))), WATERMARK_METHOD))),
                     image)


def read_watermark(image: Image.Image, length: int) -> bytes:
    """The `length` bytes embedded in the image (garbage where nothing was)."""
    _, decoder_cls = watermark_library()
    check_watermark_size(*image.size)
    return decoder_cls("bytes", length * 8).decode(_flip(np.asarray(image.convert("RGB"))), WATERMARK_METHOD)


def _flip(pixels: np.ndarray) -> np.ndarray:
    """RGB <-> BGR (OpenCV's order, which the library works in), contiguous as OpenCV wants it."""
    return np.ascontiguousarray(pixels[:, :, ::-1])
