import os

import pytest
import torch

from qviz.models import ModelNotAvailableError, load_model


def test_missing_model_offline_says_so_and_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(
        ModelNotAvailableError, match=r"no-such-org/no-such-model.*not in the local cache.*download"
    ):
        load_model("no-such-org/no-such-model")


def test_unknown_architecture_from_a_local_dir(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    from qviz.models import get_adapter

    model = BertLMHeadModel(
        BertConfig(
            vocab_size=30,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            is_decoder=True,
        )
    )
    with pytest.raises(NotImplementedError, match="supported model types"):
        get_adapter(model)


def test_local_directory_round_trip(tmp_path):
    from tests.conftest import tiny_llama

    model = tiny_llama()
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(
        models.WordLevel({f"w{i}": i for i in range(97)} | {"[UNK]": 0}, unk_token="[UNK]")
    )
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), device="cpu")
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


# caches that cannot lie ------------------------------------------------------------------------
# Every test works on a COPY of the user's cache (QVIZ_CACHE in a tmp dir): the shared cache is
# only read.
PROMPT = "The capital of France is"


def _fake_folder(path, files):
    """A converted folder of small files with its hash record and completion mark."""
    import hashlib
    import json

    from qviz.models.load import HASHES

    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    record = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    (path / HASHES).write_text(json.dumps(record))
    (path / ".complete").write_text("x\n")
    return path


def test_check_converted_fails_on_every_kind_of_damage(tmp_path):
    from qviz.models.load import HASHES, _check_converted

    files = {"model.safetensors": bytes(range(256)) * 64, "config.json": b"{}"}
    ok = _fake_folder(tmp_path / "ok", files)
    assert _check_converted(ok) is None
    bad = _fake_folder(tmp_path / "overwritten", files)
    with open(bad / "model.safetensors", "r+b") as f:  # same size, other bytes
        f.seek(4096)
        f.write(b"\0" * 4096)
    assert "model.safetensors: sha256" in _check_converted(bad)
    cut = _fake_folder(tmp_path / "truncated", files)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert "size 1000 bytes" in _check_converted(cut)
    gone = _fake_folder(tmp_path / "missing", files)
    (gone / "config.json").unlink()
    assert "config.json is missing" in _check_converted(gone)
    old = _fake_folder(tmp_path / "old", files)
    (old / HASHES).unlink()
    assert "no hash record" in _check_converted(old)
    half = _fake_folder(tmp_path / "half", files)
    (half / ".complete").unlink()
    assert "not complete" in _check_converted(half)


def test_an_interrupted_rebuild_never_leaves_a_folder_that_passes(tmp_path, monkeypatch):
    """Killed while the rebuilt files are renamed into place: the folder fails the check."""
    import qviz.models.load as load

    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    monkeypatch.setattr(load, "fetch_embedded", lambda name: tmp_path / "x.gguf")
    out = load._converted_dir(load.EMBEDDED_NAME)
    _fake_folder(out, {"model.safetensors": b"old weights", "config.json": b"{}"})

    def convert(gguf, dest):
        _fake_folder(dest, {"model.safetensors": b"new weights", "config.json": b"{}"})
        (dest / ".complete").unlink()

    monkeypatch.setattr(load, "_convert", convert)
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed between two renames
        real_replace(src, dst)

    (out / "model.safetensors").write_bytes(b"old weightz")  # corrupt: a rebuild starts
    monkeypatch.setattr(load.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        load.ensure_embedded()
    assert load._check_converted(out) == "conversion not complete"
    assert not list(out.parent.glob("*.tmp-*"))  # the temporary folder is cleaned up
    monkeypatch.setattr(load.os, "replace", real_replace)
    assert load.ensure_embedded() == out and load._check_converted(out) is None
    assert (out / "model.safetensors").read_bytes() == b"new weights"


@pytest.fixture(scope="module")
def cache_copy(tmp_path_factory):
    """A copy of the user's embedded-model cache without its hash record, as an older qviz left
    it, verified (rebuilt) once; yields (cache root, stderr of that first load, clean logits)."""
    import contextlib
    import io
    import shutil

    from qviz.models.load import EMBEDDED_NAME, HASHES, _converted_dir, fetch_embedded

    src_gguf = fetch_embedded()  # the shared cache: only read
    src_dir = _converted_dir(EMBEDDED_NAME)
    root = tmp_path_factory.mktemp("qviz-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QVIZ_CACHE", str(root))
        dst_dir = _converted_dir(EMBEDDED_NAME)
        dst_dir.parent.mkdir(parents=True)
        shutil.copy2(src_gguf, dst_dir.parent / src_gguf.name)
        if (src_dir / ".complete").exists():
            shutil.copytree(src_dir, dst_dir)
        (dst_dir / HASHES).unlink(missing_ok=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            model, tok = load_model(EMBEDDED_NAME, device="cpu")
        ids = tok(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        yield root, err.getvalue(), ids, logits


def test_a_cache_without_hash_record_is_rebuilt_once(cache_copy, capfd, monkeypatch):
    import json

    from qviz.models.load import EMBEDDED_NAME, HASHES, _converted_dir, ensure_embedded

    root, first_stderr, _, logits = cache_copy
    assert "no hash record" in first_stderr and "rebuilding from the GGUF" in first_stderr
    assert torch.isfinite(logits).all()
    monkeypatch.setenv("QVIZ_CACHE", str(root))
    out = _converted_dir(EMBEDDED_NAME)
    record = json.loads((out / HASHES).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(record)
    capfd.readouterr()
    assert ensure_embedded() == out  # verified, not rebuilt again
    assert "rebuilding" not in capfd.readouterr().err


@pytest.mark.parametrize("damage", ["overwrite 4 KiB", "truncate"])
def test_a_damaged_cached_model_is_rebuilt_not_loaded(cache_copy, damage, capfd, monkeypatch):
    from qviz.models.load import EMBEDDED_NAME, _check_converted, _converted_dir

    root, _, ids, clean = cache_copy
    monkeypatch.setenv("QVIZ_CACHE", str(root))
    path = _converted_dir(EMBEDDED_NAME) / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        else:  # same size, 4 KiB of other bytes in the middle of the weights
            f.seek(size // 2)
            f.write(b"\xff" * 4096)
    assert path.stat().st_size == (size // 2 if damage == "truncate" else size)
    assert _check_converted(path.parent) is not None
    capfd.readouterr()
    model, _ = load_model(EMBEDDED_NAME, device="cpu")
    err = capfd.readouterr().err
    assert "qviz: cached model.safetensors failed its check (" in err
    assert "rebuilding from the GGUF" in err
    with torch.no_grad():
        assert torch.equal(model(ids).logits, clean)
    assert path.stat().st_size == size and _check_converted(path.parent) is None
