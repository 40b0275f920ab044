"""Writing files so that none is ever half-written or overwritten: to a temporary name in the same folder, then
renamed (or linked, which fails rather than replace a file that is there)."""
import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from stablediff.errors import UserError


def default_mode(folder: bool = False) -> int:
    """The permissions open() or mkdir() would give a new file or folder under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def _written(folder: Path, name: str, write: Callable[[str], None]) -> str:
    """A complete temporary file in `folder`, filled by write(tmp_name), with a new file's permissions."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}-", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, default_mode())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _sync(path) -> None:
    """Flush a file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[str], None], durable: bool = False) -> None:
    """write(tmp_name) fills a temporary file beside `path`, which is then renamed into place (replacing it).
    durable: the file and its name are on the disk when this returns, so a power cut keeps them too (the server's
    results, which its queue then records as done)."""
    tmp = _written(path.parent, path.name, write)
    try:
        if durable:
            _sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    if durable and os.name == "posix":
        _sync(path.parent)


def next_number(folder: Path, pattern: str) -> int:
    """One past the highest number among files named like `pattern` (a regex with one group)."""
    numbers = [int(m.group(1)) for f in folder.iterdir() if (m := re.fullmatch(pattern, f.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def _claim(tmp: str, path: Path) -> None:
    """Give the complete file `tmp` the name `path` unless that name exists (FileExistsError)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name empty, then replace it whole
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, default_mode()))
        os.replace(tmp, path)


def write_numbered(folder: Path, name: str, write: Callable[[str], None]) -> Path:
    """Write a new file `name` (a format with one number, e.g. "{:05d}.png") at the first free number past the
    highest in `folder`, claimed at the moment it appears: the complete file is hard-linked to its name, which fails
    where another process took that number first, and then the next is tried. Never overwrites, never half-written."""
    regex = re.escape(name).replace(re.escape(name[name.index("{"):name.index("}") + 1]), r"(\d+)")
    tmp = _written(folder, name.format(0), write)
    try:
        number = next_number(folder, regex)
        while True:
            path = folder / name.format(number)
            try:
                _claim(tmp, path)
                return path
            except FileExistsError:
                number = max(number + 1, next_number(folder, regex))
    finally:
        with contextlib.suppress(FileNotFoundError):  # linked, or renamed by _claim's fallback
            os.unlink(tmp)


def load_image(path, mode: str = "RGB"):
    """An image file as a PIL image in `mode`, or a one-line error saying what is wrong with it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: refused: {e}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not an image Pillow can read ({e})") from None


def _png_info(parameters: str | None):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    return info


def png_bytes(image, parameters: str | None) -> bytes:
    """The PNG write_png writes, as bytes."""
    import io

    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=_png_info(parameters))
    return out.getvalue()


def write_png(image, path: Path | None, parameters: str | None, folder: Path | None = None, name: str = "",
              durable: bool = False) -> Path:
    """A PNG with its generation parameters, written whole: to `path` (replacing it; durable: see write_atomic), or at
    the next free number of `name` in `folder` (never overwriting). Pillow writes the text as iTXt where it is not
    Latin-1."""
    info = _png_info(parameters)

    def write(tmp):
        image.save(tmp, format="PNG", pnginfo=info)
    if path is None:
        return write_numbered(folder, name, write)
    write_atomic(path, write, durable)
    return path
