"""Atomic file writes: write under a temporary name in the destination folder, then ``os.replace``,
so that a crash or a kill never leaves a half-written file under the final name (a reader sees the
old file or the new one, never a mix)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _temporary(path: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{path.stem}_", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_atomic(path: str | os.PathLike, text: str | None = None, figure=None, dpi: int = 110) -> Path:
    """Write ``text``, or a matplotlib ``figure`` (format from the suffix, PNG by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, path.suffix)
    try:
        if figure is not None:
            figure.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
        else:
            tmp.write_text(text if text is not None else "")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(obj, path: str | os.PathLike, indent: int = 4) -> None:
    """JSON (NaN allowed, as nnU-Net writes it) written atomically."""
    write_atomic(path, json.dumps(obj, indent=indent, allow_nan=True))
