"""The keystore: one owner-only folder holding a user's secret keys.

Default `~/.trustgen/keys`, overridden by `$TRUSTGEN_KEYSTORE` or a CLI flag. Each watermark key
is 32 random bytes in `watermark-<key id>.key`; the key id (a hash of the key, see
`watermark.text.key_id`) is public and is all that outputs, manifests and logs ever show.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from trustgen.errors import TrustgenError
from trustgen.safety.watermark.text import key_id

ENV_VAR = "TRUSTGEN_KEYSTORE"
KEY_BYTES = 32


def default_keystore() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".trustgen" / "keys")


@dataclass(frozen=True)
class WatermarkKey:
    key_id: str
    secret: bytes

    def __repr__(self) -> str:  # never print the secret, even by accident
        return f"WatermarkKey(key_id={self.key_id!r})"


class Keystore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_keystore()

    def init(self) -> WatermarkKey:
        """Create the folder (owner-only) and a watermark key if there is none yet."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, stat.S_IRWXU)
        existing = self._watermark_files()
        if existing:
            return self.watermark_key()
        secret = secrets.token_bytes(KEY_BYTES)
        target = self.path / f"watermark-{key_id(secret)}.key"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
            f.flush()
            os.fsync(f.fileno())
        return WatermarkKey(key_id(secret), secret)

    def has_watermark_key(self) -> bool:
        return bool(self._watermark_files())

    def _watermark_files(self) -> list[Path]:
        return sorted(self.path.glob("watermark-*.key")) if self.path.is_dir() else []

    def watermark_key(self, wanted: str | None = None) -> WatermarkKey:
        """The watermark key with id `wanted`, or the only/first one."""
        files = self._watermark_files()
        if not files:
            raise TrustgenError(f"there is no watermark key in {self.path}; run: trustgen keys init")
        for path in files:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise TrustgenError(f"{path} is readable by other users; run: chmod 600 {path}")
            secret = path.read_bytes()
            if len(secret) != KEY_BYTES or path.stem != f"watermark-{key_id(secret)}":
                raise TrustgenError(f"{path} is not a trustgen watermark key (corrupt or renamed).")
            if wanted is None or key_id(secret) == wanted:
                return WatermarkKey(key_id(secret), secret)
        raise TrustgenError(f"no watermark key with id {wanted} in {self.path}.")
