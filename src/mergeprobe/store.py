"""The signature store: a plain directory that many runs, on many machines, read and write.

Layout: ``<store>/signatures/<name>.safetensors`` (tensors) and ``<name>.json`` (metadata,
with the checksum of the tensor file). Each file is written to a temporary name and renamed
into place (atomic on POSIX), tensors first, so a reader sees an old entry or a new one,
never half of one; a pair caught mid-update fails its checksum and is retried. Distinct
entries never touch the same file, so any number of processes can write at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .exceptions import CorruptSignatureError, InvalidParameterError
from .signature import Signature

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def sanitize_name(text: str) -> str:
    """A store-safe entry name made from any text (runs of other characters become '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-._")
    return name[:200] or "run"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class SignatureStore:
    """A directory of signatures, created on first use.

    Args:
        path: the store directory (created if missing).

    Example:
        ```python
        store = SignatureStore("runs/store")
        for name in store.names():
            print(name, store.load(name).probes[-1].fraction)
        ```
    """

    def __init__(self, path: str | os.PathLike) -> None:
        if path is None or str(path) == "":
            raise InvalidParameterError(
                "The 'path' parameter of SignatureStore must be a directory path. Got None instead."
            )
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise InvalidParameterError(
                f"The 'path' parameter of SignatureStore must be a directory; {str(self.path)!r} is a file."
            )
        self._dir = self.path / "signatures"
        self._dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"SignatureStore({str(self.path)!r})"

    def __contains__(self, name: str) -> bool:
        return (self._dir / f"{name}.json").is_file()

    def __len__(self) -> int:
        return len(self.names())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        """Names of all entries, sorted (corrupt ones included; ``list`` reports those)."""
        return sorted(p.stem for p in self._dir.glob("*.json") if not p.name.startswith("."))

    # -- reading -------------------------------------------------------------------------

    def _read(self, name: str) -> tuple[bytes, dict[str, Any]]:
        meta_path = self._dir / f"{name}.json"
        try:
            document = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeyError(
                f"no signature named {name!r} in {self}; it has {self.names()}"
            ) from None
        except (OSError, ValueError) as exc:
            raise CorruptSignatureError(f"signature {name!r}: unreadable metadata ({exc})") from exc
        if not isinstance(document, dict):
            raise CorruptSignatureError(f"signature {name!r}: metadata is not a JSON object")
        try:
            blob = (self._dir / f"{name}.safetensors").read_bytes()
        except OSError as exc:
            raise CorruptSignatureError(f"signature {name!r}: missing tensor file ({exc})") from exc
        return blob, document

    def load(self, name: str) -> Signature:
        """Load one signature; raises ``KeyError`` if absent, ``CorruptSignatureError`` if broken."""
        for attempt in range(3):
            blob, document = self._read(name)
            try:
                return Signature.from_bytes(blob, document)
            except CorruptSignatureError:
                # A writer may have replaced one file between our two reads: retry briefly.
                if attempt == 2:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def metadata(self, name: str) -> dict[str, Any]:
        """The JSON metadata of one entry, without loading its tensors."""
        return self._read(name)[1]

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every readable entry; corrupt entries are reported and skipped."""
        entries = []
        for name in self.names():
            try:
                document = json.loads((self._dir / f"{name}.json").read_text(encoding="utf-8"))
                if not isinstance(document, dict) or "schema" not in document:
                    raise ValueError("not a signature document")
                entries.append(document)
            except (OSError, ValueError) as exc:
                self._report(name, exc)
        return entries

    def load_all(self) -> list[Signature]:
        """Every readable signature; corrupt entries are reported and skipped."""
        signatures = []
        for name in self.names():
            try:
                signatures.append(self.load(name))
            except (CorruptSignatureError, KeyError) as exc:
                self._report(name, exc)
        return signatures

    def verify(self) -> dict[str, str]:
        """Problems by entry name (empty when every entry loads)."""
        problems = {}
        for name in self.names():
            try:
                self.load(name)
            except (CorruptSignatureError, KeyError) as exc:
                problems[name] = str(exc)
        return problems

    def _report(self, name: str, exc: BaseException) -> None:
        message = f"mergeprobe: skipping corrupt store entry {name!r} in {self.path}: {exc}"
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # -- writing -------------------------------------------------------------------------

    def save(self, signature: Signature) -> Path:
        """Write (or replace) one entry atomically; returns the metadata file's path."""
        if not _NAME.match(signature.name or ""):
            raise InvalidParameterError(
                f"The signature name must match {_NAME.pattern} (letters, digits, '.', '_', '-'). "
                f"Got {signature.name!r} instead; sanitize_name() makes one from any text."
            )
        blob, document = signature.to_bytes()
        meta_path = self._dir / f"{signature.name}.json"
        _atomic_write(self._dir / f"{signature.name}.safetensors", blob)
        _atomic_write(meta_path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
        return meta_path

    def delete(self, name: str) -> None:
        """Remove one entry (metadata first, so it disappears from listings at once)."""
        for suffix in (".json", ".safetensors"):
            with contextlib.suppress(FileNotFoundError):
                (self._dir / f"{name}{suffix}").unlink()

    def add_adapter(self, adapter, **kwargs) -> Signature:
        """Compute and store the signature of a finished PEFT adapter, without training it.

        ``adapter`` is an adapter directory (with ``adapter_config.json``) or a ``PeftModel``.
        Keyword arguments are those of :func:`mergeprobe.signature_of_adapter`.
        """
        from .probe import signature_of_adapter

        signature = signature_of_adapter(adapter, **kwargs)
        self.save(signature)
        return signature
