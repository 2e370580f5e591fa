"""Memory across models: bits per byte against plain transformers, the Pareto front against brute
force, one row per (model, plan), models loaded here freed, clear errors, the CLI."""

from __future__ import annotations

import gc
import json
import math
import threading
import weakref

import numpy as np
import pytest
import torch

import qviz
from qviz import Lab, QuantConfig, QuantPlan
from qviz.cancel import Cancelled
from qviz.cli import main
from qviz.studies.frontier import (
    COLUMNS,
    VERDICT_PROMPT,
    VERDICT_PROMPTS,
    bigger_vs_smaller,
    bits_per_byte,
    held_out_text,
    memory_frontier,
    pareto_mask,
    verdict_prompt,
)
from tests.conftest import CharTokenizer, tiny_gpt2, tiny_llama

PLANS = [
    QuantPlan.none(),
    QuantPlan.uniform(QuantConfig(8, 32)),
    QuantPlan.uniform(QuantConfig(2, 32)),
]


class BosCharTokenizer(CharTokenizer):
    bos_token_id = 0
    eos_token_id = 96


def tiny_lab(kind: str = "llama", seed: int = 0) -> Lab:
    model = tiny_llama(seed) if kind == "llama" else tiny_gpt2(seed)
    return Lab(model, BosCharTokenizer(), name=f"tiny-{kind}")


def reference_bpb(model, ids: list[int], text: str, window: int) -> float:
    """Plain transformers: token j >= 1 predicted from ids[k*window : j], k = (j-1)//window, one
    forward per token; NLL in bits over the UTF-8 bytes of ``text``."""
    nll = 0.0
    for j in range(1, len(ids)):
        start = (j - 1) // window * window
        with torch.no_grad():
            logits = model(torch.tensor([ids[start:j]])).logits[0, -1].double()
        nll -= torch.log_softmax(logits, -1)[ids[j]].item()
    return nll / math.log(2) / len(text.encode("utf-8"))


def test_bits_per_byte_equals_plain_logits_on_a_tiny_model():
    lab = tiny_lab()
    text = "Measures came from the body: a pace, a span, a foot. é!"  # a 2-byte character
    ids = [0] + lab.tokenizer(text, add_special_tokens=False).input_ids
    for window in (7, 64):
        got = bits_per_byte(lab, QuantPlan.none(), text, window=window)
        assert got["n_tokens"] == len(ids) - 1 and got["n_bytes"] == len(text) + 1
        want = reference_bpb(lab.model, ids, text, window)
        assert got["bits_per_byte"] == pytest.approx(want, rel=1e-5)


def test_bits_per_byte_equals_plain_logits_on_the_embedded_model(lab):
    """SmolLM2 and its tokenizer, at full precision and 4 bits: one plain forward of BOS + text."""
    text = held_out_text(400)
    tok = lab.tokenizer
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids])
    for plan in (QuantPlan.none(), QuantPlan.uniform(QuantConfig(4))):
        with qviz.quantized(lab.model, plan), torch.no_grad():
            logits = lab.model(ids).logits[0, :-1].double()
        nll = -torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum().item()
        want = nll / math.log(2) / len(text.encode())
        got = bits_per_byte(lab, plan, text)
        assert got["bits_per_byte"] == pytest.approx(want, rel=1e-5)
        assert 0.5 < got["bits_per_byte"] < 3  # English prose, a real model


def brute_front(mem, loss) -> np.ndarray:
    n = len(mem)
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        if math.isnan(mem[i]) or math.isnan(loss[i]):
            continue
        out[i] = not any(
            mem[j] <= mem[i] and loss[j] <= loss[i] and (mem[j] < mem[i] or loss[j] < loss[i])
            for j in range(n)
            if not (math.isnan(mem[j]) or math.isnan(loss[j]))
        )
    return out


def test_pareto_mask_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 12))
        mem = rng.integers(0, 6, n).astype(float)  # few values: many ties
        loss = rng.integers(0, 6, n).astype(float)
        if trial % 3 == 0:
            mem[rng.integers(0, n)] = np.nan
        np.testing.assert_array_equal(pareto_mask(mem, loss), brute_front(mem, loss))
    assert pareto_mask([], []).tolist() == []


def test_frontier_has_a_row_per_model_and_plan_and_marks_the_front():
    labs = [tiny_lab("llama"), tiny_lab("gpt2")]
    seen = []
    frame = memory_frontier(
        labs, PLANS, max_chars=120, n_facts=6, window=32, on_progress=lambda *a: seen.append(a)
    )
    assert list(frame.columns) == COLUMNS
    assert list(zip(frame["model"], frame["plan"], strict=True)) == [
        (lab.name, p.label) for lab in labs for p in PLANS
    ]
    assert [s[:2] for s in seen] == [(i, 6) for i in range(1, 7)]
    assert frame["bits"].tolist() == [16, 8, 2] * 2
    assert frame["method"].tolist() == ["fp", "rtn", "rtn"] * 2
    for lab, (_, rows) in zip(labs, frame.groupby("model", sort=False), strict=True):
        for p, mib in zip(PLANS, rows["weight_mib"], strict=True):
            assert mib == qviz.footprint(lab.model, p).bytes / 2**20
    np.testing.assert_array_equal(
        frame["pareto"], brute_front(frame["weight_mib"].values, frame["bits_per_byte"].values)
    )
    assert frame["n_facts"].eq(6).all() and frame["fact_accuracy"].between(0, 1).all()
    # the same text for every row, and a Lab handed in keeps its engine (it is not freed)
    assert frame["n_bytes"].nunique() == 1 and frame["n_bytes"].iloc[0] <= 120
    assert labs[0].engine is qviz.quant.engine.engine_for(labs[0].model)


def test_models_loaded_by_name_are_freed_before_the_next():
    alive = []

    def load(name, device=None):
        for ref in alive:  # the model before this one is gone already
            gc.collect()
            assert ref() is None, "the previous model is still alive"
        lab = tiny_lab("gpt2" if alive else "llama")
        alive.append(weakref.ref(lab.model))
        return lab

    from qviz.models import EMBEDDED

    names = list(EMBEDDED)[:2]
    frame = memory_frontier(names, PLANS[1:], load=load, max_chars=60, n_facts=0)
    assert frame["model"].tolist() == [n for n in names for _ in PLANS[1:]]
    assert frame["fact_accuracy"].isna().all()
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_cancel_stops_the_frontier():
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled, match="tiny-llama"):
        memory_frontier([tiny_lab()], PLANS, max_chars=60, cancel=stop)


@pytest.mark.parametrize(
    ("models", "plans", "needles"),
    [
        (["smollm2-135m", "nope-1b"], PLANS, ["'nope-1b'", "smollm2-135m", "gemma3-270m"]),
        ([], PLANS, ["models", "qwen2.5-coder-0.5b"]),
        ("smollm2-135m", PLANS, ["list", "'smollm2-135m'"]),
        (["smollm2-135m"], [], ["plans is empty", "QuantPlan"]),
        (["smollm2-135m"], [QuantConfig(4)], ["QuantConfig", "QuantPlan.uniform"]),
    ],
)
def test_bad_input_names_the_value_and_the_choices(models, plans, needles):
    with pytest.raises(ValueError) as err:
        qviz.memory_frontier(models, plans)
    for needle in needles:
        assert needle in str(err.value)


def test_bigger_vs_smaller_pairs_by_parameters():
    import pandas as pd

    frame = pd.DataFrame(
        {
            "model": ["s", "s", "b", "b"],
            "plan": ["rtn8", "rtn4", "rtn8", "rtn4"],
            "bits": [8, 4, 8, 4],
            "params": [10, 10, 30, 30],
            "weight_mib": [2.0, 1.0, 6.0, 3.0],
            "bits_per_byte": [1.2, 1.5, 1.0, 1.1],
            "fact_accuracy": [0.5, 0.4, 0.7, 0.6],
        }
    )
    pairs = bigger_vs_smaller(frame)
    assert pairs[["big", "small", "big_plan", "small_plan"]].values.tolist() == [
        ["b", "s", "rtn4", "rtn8"]
    ]
    row = pairs.iloc[0]
    assert not row["less_memory"] and row["better_bpb"] and row["better_facts"]


def test_cli_frontier(capsys):
    assert main(["frontier", "--models", "smollm2-135m,nope", "--bits", "8"]) == 2
    assert "'nope'" in capsys.readouterr().err
    code = main(
        ["frontier", "--models", "smollm2-135m", "--bits", "8,3", "--chars", "200", "--facts",
         "4", "--fp", "--json"]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["plan"] for r in out["rows"]] == ["fp", "rtn8-g128", "rtn3-g128"]
    assert out["rows"][2]["pareto"]  # the least memory is always on the front
    assert out["rows"][2]["bits_per_byte"] > out["rows"][0]["bits_per_byte"]
    assert out["bigger_at_4_vs_smaller_at_8"] == []
    code = main(["frontier", "--models", "smollm2-135m", "--bits", "8,2", "--chars", "200"]
                + ["--facts", "0", "--verdict"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "verdict" in text and "healthy" in text and "computation collapse" in text


def test_verdict_column_is_compare_s_mode_per_cell():
    prompt = "The capital of France is"
    fresh = tiny_lab()  # an independent Lab (own caches) on the same weights
    with torch.no_grad():
        target = int(fresh.model(fresh.encode(prompt)).logits[0, -1].argmax())
    want = [fresh.compare(prompt, target, p, cka_context=0).verdict.mode for p in PLANS]
    frame = memory_frontier([tiny_lab()], PLANS, max_chars=60, n_facts=0, verdict=(prompt, target))
    assert list(frame.columns) == COLUMNS + ["verdict"]
    assert frame["verdict"].tolist() == want
    assert want[0] == "healthy"  # full precision predicts its own top-1 target
    # a mapping model name -> pair; True: each embedded model's own pair, else VERDICT_PROMPT
    frame = memory_frontier(
        [tiny_lab()], PLANS[:1], max_chars=60, n_facts=0, verdict={"tiny-llama": (prompt, target)}
    )
    assert frame["verdict"].tolist() == want[:1]
    assert verdict_prompt("gemma3-270m", True) == VERDICT_PROMPTS["gemma3-270m"]
    assert verdict_prompt("tiny-llama", True) == VERDICT_PROMPT
    assert verdict_prompt("tiny-llama", {"x": ("a", "b")}) == VERDICT_PROMPT
    with pytest.raises(ValueError, match="pair"):
        memory_frontier([tiny_lab()], PLANS[:1], max_chars=60, verdict=("only a prompt",))
