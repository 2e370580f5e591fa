"""The pure plot functions on hand-built results: data shapes, in-place updates, selection."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from qviz.results import (
    AttentionStats,
    Comparison,
    FFNStats,
    LayerMap,
    LensCurve,
    LensTrajectory,
    PatchGrid,
    ResidualStats,
    Verdict,
)
from qviz.views import plots
from qviz.views.components import Worker


def make_comparison(n_layers: int = 4, n_heads: int = 2, seed: int = 0, mode: str = "healthy"):
    rng = np.random.default_rng(seed)
    s = n_layers + 1
    curve = LensCurve(
        prob=rng.random(s), rank=rng.integers(1, 5000, s), logit=rng.random(s),
        top_tokens=[[" a", " b"] for _ in range(s)],
    )  # fmt: skip
    return Comparison(
        plan_label=f"rtn{seed + 2}-g128",
        prompts=["p"],
        cka=LayerMap(rng.random((s, s)), n_samples=7, estimator="biased"),
        lens=LensTrajectory(curve, curve, " Paris"),
        attention=AttentionStats(
            rng.random((n_layers, n_heads)),
            rng.random((n_layers, n_heads)),
            rng.random((n_layers, n_heads)),
        ),  # fmt: skip
        ffn=FFNStats(np.linspace(0.1, 0.5, n_layers), rng.random(n_layers), rng.random(n_layers)),
        residual=ResidualStats(rng.random(s), rng.random(s)),
        verdict=Verdict(mode, {"cka_diag_mean": 0.5, "sign_cka_dark": True, "quant_rank": 3}),
    )


def make_grid(n_layers: int = 4, tokens=("The", " cap", " is"), defined: bool = True):
    prob = np.linspace(0, 1, n_layers * len(tokens)).reshape(n_layers, len(tokens))
    return PatchGrid(
        prob=prob,
        recovery=prob * 2 - 0.5 if defined else None,
        recovery_note="" if defined else "plan does not move the target",
        p_reference=0.8,
        p_quantized=0.1,
        tokens=list(tokens),
        target=" Paris",
        component="resid",
        direction="restore",
        window=1,
        plan_label="rtn2-g128",
    )


def test_cka_data_is_long_form_with_diagonal_flag():
    cmp = make_comparison(n_layers=3)
    data = plots.cka_data(cmp.cka)
    assert len(data["cka"]) == 16
    assert data["diag"].sum() == 4
    i = 1 * 4 + 2  # ref 1, quant 2
    assert (data["ref"][i], data["quant"][i]) == (1, 2)
    assert data["cka"][i] == cmp.cka.values[1, 2]


def test_cka_plot_updates_the_same_source_in_place():
    plot = plots.cka_plot()
    src, fig = plot.sources["cka"], plot.root
    assert len(src.data["cka"]) == 0 and src.name == "qviz_cka"
    plots.update_cka(plot, make_comparison(n_layers=3).cka)
    assert plot.sources["cka"] is src and plot.root is fig
    assert len(src.data["cka"]) == 16
    assert (fig.x_range.start, fig.x_range.end) == (-0.5, 3.5)
    plots.update_cka(plot, make_comparison(n_layers=5, seed=1).cka)
    assert len(src.data["cka"]) == 36 and fig.y_range.end == 5.5
    assert any(type(m).__name__ == "ColorBar" for m in fig.right)


def test_selection_marks_state_views_one_later_than_layer_views():
    cka, ffn = plots.cka_plot(), plots.ffn_plot()
    plots.select(cka, 2)
    plots.select(ffn, 2)
    assert [s.location for s in cka.markers] == [3, 3]
    assert all(s.visible for s in cka.markers)
    assert [s.location for s in ffn.markers] == [2]
    plots.select(ffn, None)
    assert not ffn.markers[0].visible


def test_layer_from_tap_maps_clicks_to_decoder_layers():
    assert plots.layer_from_tap("cka", 3.2, 1.0) == 2
    assert plots.layer_from_tap("lens", 0.1, None) == 0
    assert plots.layer_from_tap("ffn", 2.6, 0.1) == 3
    assert plots.layer_from_tap("patch", 1.0, 2.4) == 2
    assert plots.layer_from_tap("pareto", 1.0, 2.0) is None


def test_lens_plot_uses_a_log_rank_axis_and_names_the_target():
    cmp = make_comparison()
    plot = plots.lens_plot(cmp.lens)
    assert type(plot.extra["rank"].y_scale).__name__ == "LogScale"
    assert plot.extra["rank"].y_range.start > plot.extra["rank"].y_range.end  # rank 1 on top
    assert "' Paris'" in plot.extra["prob"].title.text
    assert len(plot.sources["lens"].data["p_quant"]) == 5


def test_attention_and_ffn_data():
    cmp = make_comparison(n_layers=4, n_heads=3)
    att = plots.attention_data(cmp.attention)
    assert len(att["entropy"]) == 12
    np.testing.assert_allclose(
        att["delta"], (cmp.attention.quant_entropy - cmp.attention.ref_entropy).ravel()
    )
    ffn = plots.ffn_data(cmp.ffn)
    assert ffn["color"][-1] == plots.SELECT_COLOR and ffn["color"][0] != plots.SELECT_COLOR
    plot = plots.ffn_plot(cmp.ffn)
    assert any(getattr(r, "location", None) == 0.30 for r in plot.root.center)


@pytest.mark.parametrize("defined", [True, False])
def test_patch_plot_shows_recovery_or_probability(defined):
    grid = make_grid(defined=defined)
    plot = plots.patch_plot()
    assert "not run" in plot.root.title.text
    plots.update_patch(plot, grid)
    data = plot.sources["patch"].data
    assert len(data["value"]) == 12
    expected = grid.recovery if defined else grid.prob
    np.testing.assert_allclose(data["value"], expected.ravel())
    assert ("recovery undefined" in plot.root.title.text) is (not defined)
    assert plot.root.xaxis[0].major_label_overrides == {0: "The", 1: " cap", 2: " is"}


def test_pareto_marks_unmeasured_points_and_the_current_bits():
    rows = [
        {"bits": 2, "mib": 80.0, "effective_bits": 5.0, "accuracy": float("nan")},
        {"bits": 4, "mib": 100.0, "effective_bits": 6.0, "accuracy": 0.5},
    ]
    plot = plots.pareto_plot()
    plots.update_pareto(plot, rows, current_bits=4)
    data = plot.sources["pareto"].data
    assert list(data["fill"]) == ["white", plots.QUANT_COLOR]
    assert plot.sources["current"].data["mib"] == [100.0]


def test_verdict_html_escapes_and_shows_evidence():
    cmp = make_comparison(mode="computation collapse")
    text = plots.verdict_html(cmp.verdict, "<plan>", plots.layer_summary(cmp, 1))
    assert "computation collapse" in text and "&lt;plan&gt;" in text
    assert "sign_cka_dark" not in text and "CKA goes dark" in text and "layer 1:" in text
    assert cmp.verdict.sentence.split(":")[0] in text  # the rule's own sentence, not keys
    assert "threshold" in text and "seen" in text
    assert "no result" in plots.verdict_html(None)


def test_worker_delivers_only_the_latest_request():
    got, gate = [], threading.Event()
    w = Worker(lambda r, e, t: got.append((r, e)), lambda fn: fn())
    w.submit(lambda: gate.wait(5) and "first")
    w.submit(lambda: "second")
    w.submit(lambda: "third")
    gate.set()
    assert w.wait(10)
    assert got == [("third", None)]
    w.submit(lambda: 1 / 0)
    assert w.wait(10)
    assert isinstance(got[-1][1], ZeroDivisionError)


def test_import_qviz_does_not_import_panel():
    code = "import qviz, sys; assert 'panel' not in sys.modules; qviz.views; print('ok')"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr


def test_stale_mark_goes_on_the_top_figure_and_clears_in_place():
    plot = plots.lens_plot()
    plots.mark_stale(plot, "stale: showing rtn4-g128, asked rtn2-g128")
    badge = plot.extra["stale"]
    assert badge in plot.extra["prob"].above and badge.visible
    assert plot.root.styles == {"opacity": "0.45"}
    plots.mark_stale(plot, "")
    assert plot.extra["stale"] is badge and not badge.visible
    assert plot.root.styles == {"opacity": "1"}


def test_difference_views_show_quantized_minus_reference():
    import numpy as np

    from qviz.results import AttentionStats, LayerMap

    ref = np.eye(3) * 0.5 + 0.5
    cka = LayerMap(ref - 0.25, n_samples=10, estimator="biased", reference=ref, n_prompts=32,
                   drop_first=True)  # fmt: skip
    plot = plots.cka_diff_plot(cka)
    np.testing.assert_allclose(plot.sources["diff"].data["diff"], np.full(9, -0.25))
    assert plot.extra["mapper"].low == -0.25 and plot.extra["mapper"].high == 0.25
    cka_plot = plots.cka_plot(cka)
    assert cka_plot.extra["how"].text.startswith("linear CKA: pooled over 32 prompts, first token")
    att = AttentionStats(np.zeros((2, 4)), np.full((2, 4), 0.1), np.zeros((2, 4)))
    a = plots.attention_diff_plot(att)
    np.testing.assert_allclose(a.sources["diff"].data["diff"], np.full(8, 0.1))
    plots.update_attention_diff(a, None)
    assert len(a.sources["diff"].data["diff"]) == 0 and "(no reference)" in a.root.title.text
