"""The two further embedded models (Qwen2.5-Coder-0.5B, gemma-3-270m): assembling their split
GGUF files (on fake parts), and the toolkit on the real weights."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest
import torch

from qviz import Lab, QuantConfig, QuantPlan, metrics
from qviz.models import load
from qviz.probes.capture import capture
from tests.conftest import hook_count
from tests.probes.test_patch import reference_grid


# assembling, on a fake three-part model ---------------------------------------------------------
def _fake(tmp_path, pieces: list[bytes]) -> tuple[load.EmbeddedModel, dict]:
    """A spec of ``pieces`` shipped one per fake wheel, and {part: wheel path}."""
    parts, wheels = [], {}
    for i, data in enumerate(pieces, start=1):
        part = load.WheelPart(
            f"fake-part{i}", "1.0", f"fake_part{i}/data/m.part{i}", _sha(data), len(data)
        )
        wheel = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, data)
        parts.append(part)
        wheels[part] = wheel
    whole = b"".join(pieces)
    return load.EmbeddedModel("fake.gguf", _sha(whole), len(whole), tuple(parts)), wheels


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rewrite(wheel, member: str, data: bytes) -> None:
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, data)


PIECES = [b"GGUF" + bytes(range(200)) * 50, bytes(range(256)) * 40, b"tail" * 333]


def test_assemble_concatenates_in_order(tmp_path):
    spec, wheels = _fake(tmp_path, PIECES)
    out = load.assemble(spec, wheels, tmp_path / "out.gguf")
    assert out.read_bytes() == b"".join(PIECES)


@pytest.mark.parametrize("damage", ["truncated", "tampered", "missing member"])
def test_bad_part_is_named_and_nothing_is_left(tmp_path, damage):
    spec, wheels = _fake(tmp_path, PIECES)
    bad = spec.parts[1]
    data = bytearray(PIECES[1])
    if damage == "truncated":
        _rewrite(wheels[bad], bad.member, bytes(data[:-7]))
    elif damage == "tampered":
        data[100] ^= 1
        _rewrite(wheels[bad], bad.member, bytes(data))
    else:
        _rewrite(wheels[bad], "other/file", bytes(data))
    dest = tmp_path / "out.gguf"
    with pytest.raises(load.ModelNotAvailableError, match=r"part 2 of 3 \(fake-part2==1\.0"):
        load.assemble(spec, wheels, dest)
    assert not dest.exists()


def test_fetch_never_poisons_the_cache(tmp_path, monkeypatch):
    """Through fetch_embedded with a fake download: a tampered part fails naming it and leaves
    no file under the cached name; once the index serves good parts, the fetch succeeds."""
    (tmp_path / "index").mkdir()
    spec, wheels = _fake(tmp_path / "index", PIECES)
    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(load.EMBEDDED, "fake", spec)
    calls = []

    def download(parts, dest):
        calls.append(parts)
        return {p: wheels[p] for p in parts}

    monkeypatch.setattr(load, "_download", download)
    good = PIECES[2]
    _rewrite(wheels[spec.parts[2]], spec.parts[2].member, good[:-1] + b"X")
    with pytest.raises(load.ModelNotAvailableError, match="part 3 of 3 .*tampered"):
        load.fetch_embedded("fake")
    target = tmp_path / "cache" / "fake" / "fake.gguf"
    assert not target.exists() and list(target.parent.iterdir()) == []
    _rewrite(wheels[spec.parts[2]], spec.parts[2].member, good)
    assert load.fetch_embedded("fake") == target
    assert target.read_bytes() == b"".join(PIECES) and len(calls) == 2
    assert load.fetch_embedded("fake") == target and len(calls) == 2  # cached: no download


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="gemma3-270m"):
        load.ensure_embedded("gemma-9000")


# the real models ---------------------------------------------------------------------------------
# name: (model_type, layers, parameters, prompt, answer it gives top-1 in full precision)
MODELS = {
    "qwen2.5-coder-0.5b": ("qwen2", 24, 630_167_424, "The capital of France is", " Paris"),
    # a small base model: it ranks " Paris" third after "The capital of France is"
    "gemma3-270m": ("gemma3_text", 18, 268_098_176, "Paris is the capital of", " France"),
}
# whether causal tracing reuses the key/value prefix (gemma3: per-type rotary, sliding layers)
FAST = {"qwen2.5-coder-0.5b": True, "gemma3-270m": False}
B8 = QuantPlan.uniform(QuantConfig(bits=8, group_size=128))
B2 = QuantPlan.uniform(QuantConfig(bits=2, group_size=128))


@pytest.fixture(scope="module", params=list(MODELS))
def real(request):
    """A Lab on each model, loaded by name with downloads and the hub both forbidden."""

    def no_download(parts, dest):
        raise AssertionError(f"tried to download {parts}: run `qviz fetch --all` first")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(load, "_download", no_download)
        lab = Lab.load(request.param, device="cpu")
    return request.param, lab


@pytest.mark.model
def test_loads_offline_by_name(real):
    name, lab = real
    model_type, n_layers, n_params, _, _ = MODELS[name]
    assert lab.model.config.model_type == model_type and lab.n_layers == n_layers
    assert sum(p.numel() for p in lab.model.parameters()) == n_params
    assert lab.adapter.model_type == model_type
    assert lab.adapter.fast_path(lab.model, 8) is FAST[name]


@pytest.mark.model
def test_lens_last_state_equals_the_models_logits(real):
    name, lab = real
    prompt, answer = MODELS[name][3:]
    ids = lab.encode(prompt)
    with lab.quantized(QuantPlan.none()), torch.no_grad():
        own = lab.model(ids).logits[0]  # plain transformers
        cap = capture(lab.model, lab.adapter, ids, ("resid",))
    norm, head = lab.adapter.unembedding(lab.model)
    with torch.no_grad():
        lens = metrics.logit_lens(cap.resid[-1], norm, head, lab.adapter.logit_softcap(lab.model))
    torch.testing.assert_close(lens, own, atol=1e-4, rtol=1e-4)
    assert lab.tokenizer.decode([int(own[-1].argmax())]) == answer


@pytest.mark.model
def test_answer_survives_8_bits_and_verdicts(real):
    name, lab = real
    prompt, answer = MODELS[name][3:]
    tid = lab.target_id(answer)
    with lab.quantized(B8), torch.no_grad():
        top5 = lab.model(lab.encode(prompt)).logits[0, -1].topk(5).indices.tolist()
    assert tid in top5
    c8 = lab.compare(prompt, answer, B8)
    with lab.quantized(QuantPlan.none()), torch.no_grad():
        own = lab.model(lab.encode(prompt)).logits[0, -1, tid]
    assert c8.lens.reference.logit[-1] == pytest.approx(float(own), abs=1e-3)
    assert c8.verdict.mode == "healthy", c8.verdict.sentence
    c2 = lab.compare(prompt, answer, B2)
    assert c2.verdict.mode == "computation collapse", c2.verdict.sentence


@pytest.mark.model
def test_batched_trace_equals_per_cell(real):
    name, lab = real
    prompt, answer = MODELS[name][3:]
    plan = B2  # already quantized by the verdict test (the engine caches it)
    grid = lab.trace(prompt, answer, plan, "resid", "restore")
    n, t_len = lab.n_layers, len(grid.tokens)
    cells = [(i, t) for i in (0, n // 2, n - 1) for t in (0, t_len - 1)]
    ref = reference_grid(lab, prompt, answer, plan, "resid", "restore", cells=cells)
    got = np.array([grid.prob[i, t] for i, t in cells])
    np.testing.assert_allclose(got, [ref[i, t] for i, t in cells], atol=1e-4, rtol=0)
    assert hook_count(lab.model) == 0


@pytest.mark.parametrize(
    "argv, names",
    [
        (["fetch"], ["smollm2-135m"]),
        (["fetch", "--model", "gemma3-270m"], ["gemma3-270m"]),
        (["fetch", "--all"], list(load.EMBEDDED)),
    ],
)
def test_cli_fetch_picks_the_models(argv, names, monkeypatch, capsys):
    from qviz import cli

    got = []
    monkeypatch.setattr(load, "ensure_embedded", lambda name: got.append(name) or name)
    assert cli.main(argv) == 0
    assert got == names and capsys.readouterr().out.split() == names


@pytest.mark.parametrize(
    "argv", [["fetch", "--model", "gemma-9000"], ["fetch", "--all", "--model", "gemma3-270m"]]
)
def test_cli_fetch_rejects_bad_arguments(argv, capsys):
    from qviz import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and "--model" in capsys.readouterr().err
