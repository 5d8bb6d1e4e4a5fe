"""The signature store: a plain directory that many runs, on many machines, read and write.

Layout: ``<store>/signatures/<name>.json`` (metadata) and ``<name>.<sha>.safetensors``
(tensors, named by the first 16 hex digits of their SHA-256). The metadata names its tensor
file and carries its checksum, so renaming the metadata into place is the one commit point of
a save: a reader sees the old entry or the new one, never half of each, even when several
writers save the same entry at once. Distinct entries never touch the same file and there is
no index, so any number of processes can write at once without losing each other's work.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._util import atomic_write, clean_json
from .exceptions import CorruptSignatureError, InvalidParameterError
from .signature import Signature

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_TENSOR_FILE = re.compile(r"^(?P<name>.+)\.(?P<digest>[0-9a-f]{16})\.safetensors$")
# Tensor files no metadata points to (a writer that lost a race, a crash between the two
# renames) are removed once they are this old, so that a save in flight is never touched.
_ORPHAN_AGE_S = 600.0


def sanitize_name(text: str) -> str:
    """A store-safe entry name made from any text (runs of other characters become '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-._")
    return name[:200] or "run"


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

    def __contains__(self, name: object) -> bool:
        return (
            isinstance(name, str)
            and bool(_NAME.match(name))
            and (self._dir / f"{name}.json").is_file()
        )

    def __len__(self) -> int:
        return len(self.names())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        """Names of all entries, sorted (corrupt ones included; ``list`` reports those)."""
        return sorted(p.stem for p in self._dir.glob("*.json") if not p.name.startswith("."))

    # -- reading -------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidParameterError(
                f"A signature name must match {_NAME.pattern} (letters, digits, '.', '_', '-'). "
                f"Got {name!r} instead; sanitize_name() makes one from any text."
            )

    def _read_document(self, name: str) -> dict[str, Any]:
        """The parsed metadata of one entry (``KeyError`` if absent)."""
        self._check_name(name)
        try:
            document = json.loads((self._dir / f"{name}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeyError(
                f"no signature named {name!r} in {self}; it has {self.names()}"
            ) from None
        except (OSError, ValueError) as exc:
            raise CorruptSignatureError(f"signature {name!r}: unreadable metadata ({exc})") from exc
        if not isinstance(document, dict) or "schema" not in document:
            raise CorruptSignatureError(f"signature {name!r}: metadata is not a signature document")
        return document

    def _read(self, name: str) -> tuple[bytes, dict[str, Any]]:
        document = self._read_document(name)
        try:
            blob = self._tensor_path(name, document).read_bytes()
        except OSError as exc:
            raise CorruptSignatureError(f"signature {name!r}: missing tensor file ({exc})") from exc
        return blob, document

    def _tensor_path(self, name: str, document: dict[str, Any]) -> Path:
        """The tensor file a metadata document names (only a bare file name of this entry)."""
        file_name = document.get("tensors_file")
        match = _TENSOR_FILE.match(file_name) if isinstance(file_name, str) else None
        if match is None or match.group("name") != name:
            raise CorruptSignatureError(
                f"signature {name!r}: metadata names no valid tensor file ({file_name!r})"
            )
        return self._dir / file_name

    @staticmethod
    def _check_header(path: Path) -> None:
        """Parse a safetensors header without reading the tensors (cheap, for listings)."""
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise ValueError("not a safetensors file")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("not a safetensors header")

    def load(self, name: str) -> Signature:
        """Load one signature; raises ``KeyError`` if absent, ``CorruptSignatureError`` if broken."""
        for attempt in range(3):
            try:
                return Signature.from_bytes(*self._read(name))
            except CorruptSignatureError:
                # A writer may have committed a new version between our reads of the metadata
                # and of the tensor file (and removed the old one): read again.
                if attempt == 2:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def metadata(self, name: str) -> dict[str, Any]:
        """The JSON metadata of one entry, without reading its tensor file."""
        return self._read_document(name)

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every readable entry; corrupt entries are reported and skipped.

        Cheap: it reads each metadata file and the header of its tensor file, not the tensors
        (``verify`` also checks every checksum).
        """
        entries = []
        for name in self.names():
            try:
                document = self._read_document(name)
                self._check_header(self._tensor_path(name, document))
                entries.append(document)
            except (OSError, ValueError, KeyError, CorruptSignatureError) as exc:
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
        self._check_name(signature.name)
        name = signature.name
        blob, document = signature.to_bytes()
        document["tensors_file"] = f"{name}.{document['tensors_sha256'][:16]}.safetensors"
        meta_path = self._dir / f"{name}.json"
        previous = self._referenced_tensor_file(name)
        atomic_write(self._dir / document["tensors_file"], blob)
        text = json.dumps(clean_json(document), indent=2, sort_keys=True, allow_nan=False)
        atomic_write(meta_path, (text + "\n").encode())
        if previous is not None and previous.name != document["tensors_file"]:
            # A reader holding the old metadata retries and finds the new entry.
            with contextlib.suppress(FileNotFoundError):
                previous.unlink()
        self._remove_orphans(name)
        return meta_path

    def _referenced_tensor_file(self, name: str) -> Path | None:
        try:
            return self._tensor_path(name, self._read_document(name))
        except (KeyError, CorruptSignatureError):
            return None

    def _remove_orphans(self, name: str, min_age_s: float = _ORPHAN_AGE_S) -> None:
        keep = self._referenced_tensor_file(name)
        now = time.time()
        for path in self._dir.glob(f"{glob.escape(name)}.*.safetensors"):
            match = _TENSOR_FILE.match(path.name)
            if match is None or match.group("name") != name or path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime >= min_age_s:
                    path.unlink()

    def delete(self, name: str) -> None:
        """Remove one entry (metadata first, so it disappears from listings at once)."""
        self._check_name(name)
        tensors = self._referenced_tensor_file(name)
        with contextlib.suppress(FileNotFoundError):
            (self._dir / f"{name}.json").unlink()
        if tensors is not None:
            with contextlib.suppress(FileNotFoundError):
                tensors.unlink()
        # Older orphans go too; a file a concurrent save has just written is left alone.
        self._remove_orphans(name)

    def add_adapter(self, adapter, **kwargs) -> Signature:
        """Compute and store the signature of a finished PEFT adapter, without training it.

        ``adapter`` is an adapter directory (with ``adapter_config.json``) or a ``PeftModel``.
        Keyword arguments are those of :func:`mergeprobe.signature_of_adapter`.
        """
        from .probe import signature_of_adapter

        signature = signature_of_adapter(adapter, **kwargs)
        self.save(signature)
        return signature
