"""The served app's model registry and selector on tiny in-process models (no browser): one
shared Lab per model, least recently used models dropped, loads that block no other session,
settings carried across a switch, and another model's result never shown as current."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import qviz
from qviz.views.models import LOADING, READY, LabRegistry, ModelPage, RegistryFull
from tests.conftest import CharTokenizer

JOIN = 120  # seconds; only detects a deadlock
SETTINGS = {"target": "a", "group_size": 32}  # one character: one token of CharTokenizer


def llama(n_layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


DEPTH = {"deep": 4, "shallow": 2, "other": 3, "third": 3}


class Loader:
    """Builds a tiny Lab per name and counts loads; names in ``gates`` wait for their event."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}

    def __call__(self, name: str):
        self.calls.append(name)
        self.started.setdefault(name, threading.Event()).set()
        if name in self.gates:
            assert self.gates[name].wait(JOIN)
        if name == "broken":
            raise OSError("no weights for 'broken'")
        return qviz.Lab(llama(DEPTH[name]), CharTokenizer(), name=name)


def page(reg, model, **kw) -> ModelPage:
    p = ModelPage(reg, model, choices=list(DEPTH), settings=SETTINGS, **kw)
    assert p.dashboard is None or p.dashboard.wait(JOIN)
    return p


def test_two_sessions_on_one_model_share_one_lab_and_one_load():
    load = Loader()
    reg = LabRegistry(load, max_resident=2)
    a, b = page(reg, "deep"), page(reg, "deep")
    assert load.calls == ["deep"]
    assert a.dashboard.backend.lab is b.dashboard.backend.lab is reg.entry("deep").lab
    assert a.dashboard.state is not b.dashboard.state and reg.users("deep") == 2
    assert a.dashboard.state.shown[0] == "rtn4-g32" and a.dashboard.state.error == ""


def test_the_least_recently_used_idle_model_is_dropped_and_collected():
    load = Loader()
    reg = LabRegistry(load, max_resident=2)
    p = page(reg, "deep")
    p.switch("other")  # deep: idle now, but still resident
    assert p.dashboard.wait(JOIN) and reg.resident() == ["deep", "other"]
    ref = weakref.ref(reg.entry("deep").lab)
    q = page(reg, "shallow")  # a third model: deep is the idle one, so it goes
    assert reg.dropped == ["deep"] and sorted(reg.resident()) == ["other", "shallow"]
    for _ in range(3):
        gc.collect()
    assert ref() is None, "the dropped Lab is still referenced"
    # every place in use: a fourth model is refused, in the page, and nothing is dropped
    r = page(reg, "third")
    assert r.dashboard is None and "QVIZ_SERVE_MODELS" in r.body[0].object
    assert sorted(reg.resident()) == ["other", "shallow"] and reg.dropped == ["deep"]
    with pytest.raises(RegistryFull, match="'third'"):
        reg.request("third")
    q.close()  # shallow idle: now third fits, and shallow (not other, used by p) is dropped
    r.switch("shallow")
    r.switch("third")
    assert r.dashboard.wait(JOIN) and reg.dropped == ["deep", "shallow"]
    assert load.calls == ["deep", "other", "shallow", "third"]


def test_a_loading_model_blocks_no_other_session():
    load = Loader()
    load.gates["shallow"] = threading.Event()
    reg = LabRegistry(load, max_resident=2)
    a = page(reg, "deep")
    b = page(reg, "deep", background=True)
    b.switch("shallow")  # returns at once: the load runs on the registry's thread
    assert load.started["shallow"].wait(JOIN)
    assert b.dashboard is None and b.poll() is False
    assert "loading shallow" in b.message.object and b.progress.visible
    a.dashboard.state.bits = 3  # the other session keeps working meanwhile
    assert a.dashboard.wait(JOIN) and a.dashboard.state.shown[0] == "rtn3-g32"
    assert reg.entry("shallow").status == LOADING
    load.gates["shallow"].set()
    assert reg.entry("shallow").done.wait(JOIN) and reg.entry("shallow").status == READY
    assert b.poll() is True and b.dashboard is not None and b.dashboard.wait(JOIN)
    assert b.dashboard.backend.name == "shallow" and b.dashboard.state.shown[0] == "rtn4-g32"


def test_a_switch_keeps_settings_clamps_the_layer_and_never_shows_the_old_result():
    load = Loader()
    load.gates["shallow"] = threading.Event()
    reg = LabRegistry(load, max_resident=2)
    p = page(reg, "deep", background=True)
    assert reg.entry("deep").done.wait(JOIN) and p.poll()
    old = p.dashboard
    assert old is not None and old.wait(JOIN)
    old.state.param.update(bits=2, symmetric=True, selected_layer=3, prompt="xyz")
    assert old.wait(JOIN) and old.state.shown == ("rtn2-g32-sym", "xyz", "a")
    assert len(old.state.comparison.ffn.flip_rate) == 4
    p.switch("shallow")
    assert p.dashboard is None and old.controller._closed  # the old work is cancelled
    assert "Loading shallow" in p.body[0].object  # no old figure while the new model loads
    load.gates["shallow"].set()
    assert reg.entry("shallow").done.wait(JOIN) and p.poll()
    new = p.dashboard
    seen = []
    new.state.param.watch(lambda e: seen.append(e.new), "comparison")
    assert new.state.comparison is None  # nothing of deep's carried over
    assert new.wait(JOIN)
    s = new.state
    assert (s.bits, s.symmetric, s.group_size, s.prompt, s.target) == (2, True, 32, "xyz", "a")
    assert s.selected_layer == 1  # clamped to the 2 layers of the new model
    assert s.shown == ("rtn2-g32-sym", "xyz", "a") and s.error == ""
    assert seen and all(len(c.ffn.flip_rate) == 2 for c in seen)  # only shallow's results
    assert reg.users("deep") == 0 and reg.users("shallow") == 1


def test_a_failed_load_is_a_message_and_a_retry_is_possible():
    load = Loader()
    reg = LabRegistry(load, max_resident=1)
    p = page(reg, "broken")
    assert p.dashboard is None and "no weights for 'broken'" in p.body[0].object
    assert reg.resident() == []  # a failure holds no place
    p.switch("deep")
    assert p.dashboard is not None and p.dashboard.wait(JOIN)
    with pytest.raises(RegistryFull, match="'broken'"):  # deep is in use, the one place
        reg.get("broken")
    p.close()
    with pytest.raises(RuntimeError, match="could not load model 'broken'"):  # tried again
        reg.get("broken")
    assert load.calls == ["broken", "deep", "broken"] and reg.dropped == ["deep"]


def test_the_served_page_has_the_selector_and_a_notebook_dashboard_has_none(monkeypatch):
    from qviz import app
    from qviz.views import Dashboard

    load = Loader()
    monkeypatch.setattr(app, "_REGISTRY", LabRegistry(load, max_resident=2))
    root = app.create_app("deep")
    assert load.calls == ["deep"] and app.shared_lab("deep") is app.registry().entry("deep").lab
    header, tabs = root.objects
    select = header.objects[1]
    assert select.value == "deep" and {"smollm2-135m", "gemma3-270m"} <= set(select.options)
    assert tabs._names == ["Diagnostics", "Sweep results", "Memory frontier"]
    d = Dashboard(app.shared_lab("deep"))
    css = [c for o in d.__panel__().select() for c in (getattr(o, "css_classes", None) or [])]
    assert "qviz-bits" in css and "qviz-model" not in css  # the Lab was given: no selector
    assert "qviz-model" in select.css_classes
