"""Who is asking: HTTP Basic users (from --auth and --auth-file) on both APIs, bearer tokens on the native one.
Passwords are kept as PBKDF2 hashes and compared in constant time; the one place every route's user comes from."""
import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from stablediff.errors import UserError

ITERATIONS = 200_000
LOCAL = "local"  # the user of a server started without authentication (loopback only)


@dataclass(frozen=True)
class User:
    name: str
    admin: bool = False


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """pbkdf2_sha256$ITERATIONS$SALT$HASH (base64), the form --auth-file takes."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "$".join(("pbkdf2_sha256", str(iterations), base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def _check(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, expected = stored.split("$")
        assert scheme == "pbkdf2_sha256"
        got = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), base64.b64decode(salt), int(iterations))
    except (ValueError, AssertionError):
        return False
    return hmac.compare_digest(got, base64.b64decode(expected))


class Users:
    """The server's users: name -> (password hash, admin). Empty: no authentication (the server is loopback-only)."""

    def __init__(self, entries: dict[str, tuple[str, bool]]):
        self.entries = entries
        self._dummy = hash_password("", iterations=ITERATIONS)
        self._verified: dict[tuple[str, str], bool] = {}  # (user, sha256 of a right password): polling stays cheap

    @classmethod
    def from_options(cls, auth: list[str], auth_file: str | None, admins: list[str]) -> "Users":
        """--auth USER:PASS (the password may hold ':'), --auth-file F (lines USER:HASH[:admin]), --admin USER."""
        entries = {}
        for given in auth:
            name, sep, password = given.partition(":")
            if not sep or not name or not password:
                raise UserError(f"--auth {name or given!r}...: give USER:PASSWORD")
            entries[name] = (hash_password(password), False)
        if auth_file:
            try:
                lines = Path(auth_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"--auth-file {auth_file}: cannot be read ({e})") from None
            for i, line in enumerate(lines, 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                name, _, rest = line.strip().partition(":")
                stored, _, role = rest.partition(":")
                if not name or not stored.startswith("pbkdf2_sha256$") or role not in ("", "admin"):
                    raise UserError(f"--auth-file {auth_file}, line {i}: expected USER:pbkdf2_sha256$...[:admin] "
                                    "(make the hash with `stablediff serve --hash-password`)")
                entries[name] = (stored, role == "admin")
        for name in admins:
            if name not in entries:
                raise UserError(f"--admin {name}: no such user (give it with --auth or --auth-file)")
            entries[name] = (entries[name][0], True)
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def basic(self, name: str, password: str) -> User | None:
        """The user whose name and password these are, else None (in about the same time either way)."""
        key = (name, hashlib.sha256(password.encode("utf-8")).hexdigest())
        if key not in self._verified:  # only right answers are kept: a wrong one costs the full hash every time
            stored, _ = self.entries.get(name, (self._dummy, False))
            if not (_check(password, stored) and name in self.entries):
                return None
            self._verified[key] = True
        return User(name, self.entries[name][1])

    def user(self, name: str) -> User | None:
        return User(name, self.entries[name][1]) if name in self.entries else None


def parse_basic(header: str) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic ...` header's value."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        name, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (name, password) if sep else None


def token_digest(token: str) -> str:
    """Tokens are stored as their SHA-256 only."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "sdt_" + secrets.token_urlsafe(32)
