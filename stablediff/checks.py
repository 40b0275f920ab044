"""Checks of user input that need no torch, shared by the Python API and the command line: seeds, sizes, prompts."""
import random
import unicodedata

from stablediff.errors import UserError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_PIXELS = 2048 * 2048  # per image, unless raised (--max-pixels, StableDiffusion.max_pixels)


def seeds(seed: int | None, count: int, what: str = "seed") -> list[int]:
    """`count` seeds from `seed` on (None or -1: a random one, as in AUTOMATIC1111), each within torch's range."""
    if seed is None or seed == -1:
        seed = random.randrange(2**32)
    if not 0 <= seed <= SEED_MAX - (count - 1):
        raise UserError(f"{what} {seed} is out of range: give 0 to {SEED_MAX - (count - 1)} for {count} image(s), "
                        "or -1 for a random one")
    return [seed + i for i in range(count)]


def check_seed_list(values: list[int], what: str = "seed") -> list[int]:
    for value in values:
        if not 0 <= value <= SEED_MAX:
            raise UserError(f"{what} {value} is out of range: seeds go from 0 to {SEED_MAX}")
    return values


def check_pixels(width: int, height: int, limit: int = MAX_PIXELS, flag: str = "--max-pixels") -> None:
    """A size within the pixel limit, before any memory is asked for."""
    if width * height > limit:
        default = " (2048x2048)" if limit == MAX_PIXELS else ""
        raise UserError(f"{width}x{height} is {width * height:,} pixels, over the limit of {limit:,}{default}; "
                        f"raise it with {flag} if this machine has the memory")


def check_name(name: str, what: str) -> str:
    """A file's name from a user (a LoRA's in <lora:name>): a name alone, so it cannot reach outside its folder."""
    if not name or name in (".", "..") or any(c in name for c in "/\\*?[]"):
        raise UserError(f"{what}: a file is named by its name alone (no folders, no wildcards)")
    return name


def _unwanted(c: str) -> bool:
    """Control characters (NUL, escape, ...) and other unprintables; line breaks and tabs are text."""
    return c not in "\n\t" and unicodedata.category(c) in ("Cc", "Cs")


def clean_prompt(text: str) -> tuple[str, int]:
    """The prompt without control characters (no prompt needs them, and PNG text may not hold NUL) and how many were
    removed; a line break in the middle of a prompt stays."""
    kept = "".join(c for c in text if not _unwanted(c))
    return kept, len(text) - len(kept)


def check_prompt(text: str, what: str = "prompt") -> str:
    """The prompt as it is, or a UserError naming its first control character."""
    bad = next((i for i, c in enumerate(text) if _unwanted(c)), None)
    if bad is not None:
        raise UserError(f"{what} has the control character U+{ord(text[bad]):04X} at position {bad}; remove it "
                        "(prompts are text: line breaks and tabs are fine)")
    return text


def guidance_interval(value, where: str) -> tuple[float, float]:
    """[low, high] sigmas, low < high (high may be .inf) -> (low, high); else a UserError that begins with `where`."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] < value[1]):
        raise UserError(f"{where} {value!r}; give two sigmas, low then high, 0 <= low < high (high may be inf)")
    return float(value[0]), float(value[1])
