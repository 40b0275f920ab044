"""Writing files so that none is ever half-written: to a temporary name in the same folder, then renamed."""
import os
import tempfile
from pathlib import Path
from typing import Callable


def default_mode(folder: bool = False) -> int:
    """The permissions open() or mkdir() would give a new file or folder under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp_name) fills a temporary file beside `path`, which is then renamed into place with the
    permissions a newly created file would have (mkstemp's are owner-only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
