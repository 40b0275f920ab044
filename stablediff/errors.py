"""The one exception type users see (its message is a complete one-line explanation), and the one line for an
allocation that failed, or for a job that failed on something else."""
import logging
import re
import traceback
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, never a traceback. `field`: the request parameter it
    is about, where one is (the server's JSON error names it, and the page shows the message beside that field)."""

    field: str | None = None


@contextmanager
def about(field: str):
    """A UserError raised inside is about this parameter (unless it already names one)."""
    try:
        yield
    except UserError as e:
        if e.field is None:
            e.field = field
        raise


def out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (torch's CPU and CUDA allocators, Python's), else None."""
    text = str(e)
    asked = re.search(r"tried to allocate (\d+) bytes", text) or re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in text):
        return None
    size = asked and (f"{int(asked.group(1)) / 2**30:.1f} GiB" if asked.group(1).isdigit() else asked.group(1))
    return (f"out of memory{f': one allocation of {size} was asked for' if size else ''}; try a smaller --H/--W, "
            "--n_samples or --max-pixels")


def failure(e: Exception) -> str:
    """One line for a job (of the server, of a batch) that failed on something other than its request; the
    traceback goes to the log."""
    line = out_of_memory(e) if isinstance(e, (MemoryError, RuntimeError)) else None
    if line is None:
        logging.getLogger("stablediff.server").error("a job failed:\n%s", "".join(traceback.format_exception(e)))
        line = f"internal error ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else 'no message'})"
    return line
