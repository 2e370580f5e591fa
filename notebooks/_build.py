"""Generate the qviz notebooks from the Python source below.

    .venv/bin/python notebooks/_build.py      # rewrites notebooks/0*.ipynb, outputs empty

Each notebook is a list of ("md" | "code", text) cells. Edit the text here, not the .ipynb
files, then re-run this script; the notebooks are saved without outputs and with
execution_count null, the way they are kept in git. Cells with ``assert`` check real behaviour
and run under ``pytest --nbval-lax notebooks/``.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

KERNEL = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}

# Shared snippets --------------------------------------------------------------------------

BOKEH_SETUP = """\
# Bokeh draws the figures. INLINE puts BokehJS into the notebook itself: no CDN, works offline.
from bokeh.io import output_notebook, show
from bokeh.resources import INLINE

output_notebook(resources=INLINE, hide_banner=True)"""

# 01 quickstart ----------------------------------------------------------------------------

QUICKSTART = [
    (
        "md",
        """\
        # qviz quickstart: one model, one prompt, one quantization plan

        qviz compares a language model with a quantized copy of itself, layer by layer. This
        notebook takes the shortest path: load the embedded model, quantize its weights to
        2 bits, ask it one factual question and read the diagnosis.

        The embedded model is SmolLM2-135M-Instruct (30 decoder layers). The first run fetches
        it into qviz's cache; afterwards it loads offline in about a second.""",
    ),
    (
        "code",
        """\
        import qviz

        lab = qviz.Lab.load("smollm2-135m")
        lab.n_layers""",
    ),
    (
        "md",
        """\
        A **plan** says how each decoder layer is quantized. Here every Linear weight gets
        2-bit codes, round-to-nearest (RTN), with one scale and one zero point per group of
        128 weights (asymmetric, like GGUF's Q4_1 format but with 2 bits).""",
    ),
    (
        "code",
        """\
        cfg = qviz.QuantConfig(bits=2, group_size=128, symmetric=False, method="rtn")
        plan = qviz.QuantPlan.uniform(cfg)
        plan.label""",
    ),
    (
        "md",
        """\
        `compare` runs the prompt twice, once with the original weights and once with the
        plan's weights swapped in (the originals come back, bit for bit, when it is done), and
        measures every diagnostic of the study on both runs.""",
    ),
    (
        "code",
        """\
        cmp = lab.compare("The capital city of France is", target=" Paris", plan=plan)
        cmp.verdict""",
    ),
    (
        "md",
        """\
        `to_frame()` gives one row per decoder layer. The columns to read first:

        - `cka_diag`: how similar the quantized layer's representation is to the same layer of
          the original model (1 = same geometry, 0 = unrelated);
        - `lens_rank_quant`: where " Paris" ranks if we read the answer off this layer
          (1 = the model would say it);
        - `gate_flip_rate`: share of MLP gate activations whose sign flipped;
        - `attn_entropy_quant`: how spread out attention is (1 = uniform, i.e. looking nowhere).""",
    ),
    (
        "code",
        """\
        frame = cmp.to_frame()
        frame.round(3)""",
    ),
    (
        "code",
        """\
        # What does each model answer? The last lens row is the model's real output.
        ref_top1 = cmp.lens.reference.top_tokens[-1][0]
        quant_top1 = cmp.lens.quantized.top_tokens[-1][0]
        print(f"original model: {ref_top1!r}   2-bit model: {quant_top1!r}")
        print("verdict:", cmp.verdict.mode)

        # Checks that run in CI (pytest --nbval-lax): the original knows the answer, 2 bits lose it.
        assert ref_top1 == " Paris"
        assert quant_top1 != " Paris"
        assert cmp.verdict.mode == "computation collapse"
        assert len(frame) == lab.n_layers
        assert frame["cka_diag"].between(-1e-6, 1 + 1e-6).all()""",
    ),
    (
        "md",
        """\
        Next: `02_failure_modes.ipynb` walks through 8, 4, 3 and 2 bits and what each
        diagnostic shows; `05_memory_vs_accuracy.ipynb` weighs memory against accuracy.""",
    ),
    (
        "md",
        """\
        ## The dashboard

        The same diagnostics, live: move the bit slider, type another prompt, click a layer in
        any view to select it everywhere. `extension()` loads Panel with its JavaScript inline
        (works offline) and, in any Jupyter kernel (JupyterLab, Notebook, Voila), sends the
        dashboard as one ipywidget, so it keeps updating while later cells run.""",
    ),
    (
        "code",
        """\
        from qviz.views import Dashboard, extension

        extension()
        dashboard = Dashboard(lab)
        dashboard""",
    ),
    (
        "code",
        """\
        # Moving the slider from code works too; the views update in place when it lands.
        dashboard.state.bits = 2
        dashboard.controller.wait()
        shown = dashboard.state.comparison
        assert shown.plan_label.startswith("rtn2")
        assert shown.verdict.mode == "computation collapse", shown.verdict
        shown.verdict.mode""",
    ),
]

# 02 failure modes -------------------------------------------------------------------------

FAILURE_MODES = [
    (
        "md",
        """\
        # Two ways to break a model: signal degradation and computation collapse

        The study *From Signal Degradation to Computation Collapse* (Zhou et al., arXiv
        2604.19884) looked inside 7-9B models quantized to 4 and 2 bits and found two different
        kinds of damage:

        - at **4 bits** the model still computes the same thing, only with noise added: its
          layers keep their structure, the right answer still forms in the middle-to-late layers,
          just a little weaker (*signal degradation*);
        - at **2 bits** the computation itself breaks: layer representations no longer resemble
          the original ones, the answer never forms, MLP gates flip sign, attention goes diffuse
          (*computation collapse*).

        This notebook repeats that story on the small embedded model (SmolLM2-135M) with plain
        round-to-nearest (RTN) at 8, 4, 3 and 2 bits, group size 128, asymmetric. A small model
        with RTN is more fragile than the study's 8B models with GPTQ, so expect the failures to
        arrive earlier; the *kind* of failure is what to compare.""",
    ),
    (
        "code",
        """\
        import numpy as np
        import pandas as pd

        import qviz

        lab = qviz.Lab.load("smollm2-135m")
        BITS = [8, 4, 3, 2]
        plans = {
            b: qviz.QuantPlan.uniform(qviz.QuantConfig(bits=b, group_size=128, symmetric=False))
            for b in BITS
        }""",
    ),
    ("code", BOKEH_SETUP),
    (
        "md",
        """\
        ## One question, several prompts

        The logit lens and the verdict follow one question, "The capital city of France is"
        → " Paris". CKA, attention and MLP statistics are pooled over the tokens of a few more
        factual prompts, because a similarity measured on six tokens alone would be noisy.

        `drop_first=True` leaves the first token of each prompt out of the pooled statistics.
        That token acts as an *attention sink*: its hidden state is huge and almost the same
        whatever the weights, and linear CKA is dominated by large vectors, so keeping it makes
        every map look brighter than the rest of the tokens justify (compare the two numbers
        printed below).""",
    ),
    (
        "code",
        """\
        from qviz.data import load_facts

        facts = load_facts()
        prompts = ["The capital city of France is"] + [f["prompt"] for f in facts[25::50]]
        print(len(prompts), "prompts, e.g.", prompts[:3])

        comparisons = {
            b: lab.compare(prompts, target=" Paris", plan=plans[b], drop_first=True) for b in BITS
        }
        print("tokens pooled for CKA:", comparisons[8].cka.n_samples)

        # Same activations (cached), first token kept: the 2-bit diagonal looks much healthier.
        with_sink = lab.compare(prompts, target=" Paris", plan=plans[2], isolation=False)
        print("2-bit mean CKA diagonal, first token dropped: "
              f"{comparisons[2].cka.diagonal[1:].mean():.3f}; kept: "
              f"{with_sink.cka.diagonal[1:].mean():.3f}")""",
    ),
    (
        "md",
        """\
        ## 1. CKA: does each layer still look like itself?

        Centered kernel alignment (CKA) compares two sets of representations of the same tokens
        and is 1 when they have the same geometry (up to rotation and scale), near 0 when they
        are unrelated. The map below puts the original model's layers on the vertical axis and
        the quantized model's layers on the horizontal one.

        **What to look at:** a bright diagonal means layer *i* of the quantized model still
        represents what layer *i* of the original did. The study saw a clear diagonal at 4 bits
        and an almost completely dark map at 2 bits. Off-diagonal brightness is normal:
        neighbouring layers of a residual network are similar to each other.""",
    ),
    (
        "code",
        """\
        from bokeh.layouts import gridplot
        from bokeh.models import ColorBar, LinearColorMapper
        from bokeh.palettes import Viridis256
        from bokeh.plotting import figure

        mapper = LinearColorMapper(palette=Viridis256, low=0.0, high=1.0)


        def cka_map(cmp, title):
            \"\"\"A heatmap of cmp.cka.values: x = quantized layer, y = reference layer.\"\"\"
            n = cmp.cka.values.shape[0]
            p = figure(title=title, width=260, height=250, x_range=(0, n), y_range=(0, n),
                       x_axis_label="quantized layer", y_axis_label="reference layer",
                       toolbar_location=None)
            p.image(image=[cmp.cka.values], x=0, y=0, dw=n, dh=n, color_mapper=mapper)
            return p


        figs = [cka_map(comparisons[b], f"{b}-bit") for b in BITS]
        figs[-1].add_layout(ColorBar(color_mapper=mapper, width=8), "right")
        show(gridplot([figs], toolbar_location=None))""",
    ),
    (
        "code",
        """\
        diag = pd.DataFrame({f"{b}-bit": comparisons[b].cka.diagonal for b in BITS})
        diag.index.name = "layer"
        print("mean CKA diagonal (decoder layers 1..L):")
        print(diag.iloc[1:].mean().round(3).to_string())
        diag.iloc[::5].round(3)""",
    ),
    (
        "code",
        """\
        # The diagonal darkens as bits drop: 8-bit is indistinguishable, 2-bit is far below.
        means = diag.iloc[1:].mean()
        assert means["8-bit"] > 0.95, means
        assert means["8-bit"] >= means["4-bit"] >= means["2-bit"], means
        assert means["2-bit"] < means["4-bit"] - 0.3, means""",
    ),
    (
        "md",
        """\
        ## 2. Logit lens: where does the answer form?

        The logit lens reads each layer's hidden state through the model's final norm and
        unembedding, as if the model stopped there. For each layer we ask: at which rank is
        " Paris" among the ~49k tokens of the vocabulary? (Rank 1 = it would be the answer.)

        **What to look at:** in the original model the rank falls from thousands to 1 through the
        middle and late layers: that is the fact being recalled. Signal degradation keeps that
        descent, a little later or weaker. Computation collapse never makes the descent: the rank
        stays in the hundreds or thousands up to the last layer.""",
    ),
    (
        "code",
        """\
        ranks = pd.DataFrame(
            {"original": comparisons[8].lens.reference.rank}
            | {f"{b}-bit": comparisons[b].lens.quantized.rank for b in BITS}
        )
        ranks.index.name = "layer"
        top1 = {"original": comparisons[8].lens.reference.top_tokens[-1][0]}
        top1 |= {f"{b}-bit": comparisons[b].lens.quantized.top_tokens[-1][0] for b in BITS}
        print("final answer (top-1 token):", top1)
        ranks.iloc[list(range(0, lab.n_layers + 1, 3)) + [lab.n_layers]].drop_duplicates()""",
    ),
    (
        "code",
        """\
        from bokeh.palettes import Category10

        colors = dict(zip(ranks.columns, ["black"] + list(Category10[4])))
        p = figure(title='Logit-lens rank of " Paris" (1 = top)', width=640, height=300,
                   y_axis_type="log", x_axis_label="layer", y_axis_label="rank (log)")
        for name in ranks.columns:
            p.line(ranks.index, ranks[name], legend_label=name, color=colors[name], line_width=2)
        p.y_range.flipped = True  # better ranks (1) at the top
        p.legend.location = "bottom_left"
        show(p)""",
    ),
    (
        "code",
        """\
        # The original and the 8-bit model answer " Paris"; 2 bits do not, and the answer sinks.
        assert top1["original"] == " Paris" and top1["8-bit"] == " Paris", top1
        assert top1["2-bit"] != " Paris", top1
        assert ranks["2-bit"].iloc[-1] > 100, ranks["2-bit"].iloc[-1]""",
    ),
    (
        "md",
        """\
        ## 3. MLP gates: do the memories still switch on?

        The study reads the MLP blocks as key-value memories: the gate decides which "memory"
        neurons fire for a token. If a gate's pre-activation changes sign, that neuron switches
        from on to off (or back) — a different memory is being read, not a noisier version of
        the same one. The study calls a flip rate above 30% severe.

        **What to look at:** the flip rate per layer. Noise makes a few near-zero gates flip;
        collapse flips a large share of them, in many layers.""",
    ),
    (
        "code",
        """\
        flips = pd.DataFrame({f"{b}-bit": comparisons[b].ffn.flip_rate for b in BITS})
        flips.index.name = "decoder layer"
        p = figure(title="Gate sign flip rate per layer", width=640, height=280,
                   x_axis_label="decoder layer", y_axis_label="share of gates flipped")
        for name, color in zip(flips.columns, Category10[4]):
            p.line(flips.index, flips[name], legend_label=name, color=color, line_width=2)
        p.line([0, lab.n_layers - 1], [0.3, 0.3], color="gray", line_dash="dashed",
               legend_label="30% (severe)")
        p.legend.location = "top_left"
        show(p)
        flips.agg(["mean", "max"]).round(3)""",
    ),
    (
        "code",
        """\
        # Fewer bits, more flipped gates.
        mean_flip = flips.mean()
        assert mean_flip["8-bit"] < mean_flip["4-bit"] < mean_flip["3-bit"] < mean_flip["2-bit"]
        assert flips["8-bit"].max() < 0.05, flips["8-bit"].max()""",
    ),
    (
        "md",
        """\
        ## 4. Attention entropy: is attention still focused?

        Normalized attention entropy is 0 when a head attends to a single token and 1 when it
        spreads evenly over all of them. The study saw middle-layer heads above 0.8 at 2 bits:
        heads that no longer pick out the subject of the question. The Jensen-Shannon (JS)
        divergence says more directly how far each head's pattern moved from the original one
        (0 = same pattern).

        **What to look at:** the quantized curves against the original (black). On this small
        model the entropy barely moves, even at 2 bits (the middle-third mean stays near 0.5,
        far from the study's 0.8), while the JS divergence shows the patterns do change. Here
        attention is re-aimed rather than smeared out, and the MLPs break first, in line with
        the study's finding that MLPs are more fragile than attention.""",
    ),
    (
        "code",
        """\
        ent = pd.DataFrame(
            {"original": comparisons[8].attention.ref_entropy.mean(1)}
            | {f"{b}-bit": comparisons[b].attention.quant_entropy.mean(1) for b in BITS}
        )
        ent.index.name = "decoder layer"
        p = figure(title="Mean normalized attention entropy per layer", width=640, height=280,
                   x_axis_label="decoder layer", y_axis_label="entropy (0 focused, 1 uniform)")
        for name in ent.columns:
            p.line(ent.index, ent[name], legend_label=name, color=colors[name], line_width=2)
        n = lab.n_layers
        p.varea(x=[n // 3, 2 * n // 3], y1=[0, 0], y2=[1, 1], fill_alpha=0.08, color="gray")
        p.legend.location = "bottom_right"
        show(p)
        mid = slice(n // 3, 2 * n // 3)
        js = pd.Series({f"{b}-bit": comparisons[b].attention.js.mean() for b in BITS})
        pd.DataFrame({"middle-third entropy": ent.iloc[mid].mean(), "mean JS": js}).round(4)""",
    ),
    (
        "code",
        """\
        # 8 bits leave attention where it was; fewer bits move the patterns further.
        mid_mean = ent.iloc[mid].mean()
        assert abs(mid_mean["8-bit"] - mid_mean["original"]) < 0.02, mid_mean
        assert js["8-bit"] < js["4-bit"] < js["2-bit"], js
        assert js["2-bit"] > 0.1, js""",
    ),
    (
        "md",
        """\
        ## 5. The verdict per bit-width

        qviz turns these figures into one word with a rule written after the study
        (`qviz/metrics/verdict.py`): **computation collapse** when at least two of the four
        collapse signs show (mean CKA diagonal below 0.5, answer rank at least 1000, gate flips
        above 30% somewhere, middle-layer attention entropy above 0.8); **signal degradation**
        when the answer loses rank or the mean CKA diagonal drops below 0.95; **healthy**
        otherwise. The `isolation_*` columns add a perfect-input test: each quantized layer is
        fed the original model's input, and a layer whose update then points elsewhere
        (cosine below 0.5) is broken on its own, not just passing on damage from below.""",
    ),
    (
        "code",
        """\
        verdicts = pd.DataFrame(
            [{"bits": b, "verdict": comparisons[b].verdict.mode, "top1": top1[f"{b}-bit"],
              **comparisons[b].verdict.evidence} for b in BITS]
        ).set_index("bits")
        verdicts.round(3)""",
    ),
    (
        "code",
        """\
        mode = verdicts["verdict"]
        print(mode.to_string())
        assert mode[8] == "healthy"
        assert mode[2] == "computation collapse"
        assert mode[4] in ("healthy", "signal degradation")""",
    ),
    (
        "md",
        """\
        ## What this shows, and what it does not

        - The two failure modes differ in kind, not only in size. Degradation leaves every
          layer recognisable and the answer on its way; collapse breaks the layers themselves,
          so nothing downstream can recover the answer. That is why the study's repairs
          (protecting the first layers, amplifying the peak signal) help at 4 bits and do
          nothing at 2 bits.
        - 3 bits is where this small model turns: look at which signs it already shows.
        - The "original" here is not FP16: the embedded model's weights come from a Q4_1 GGUF
          file (4-bit codes, groups of 32, about 5 bits per weight). 8-bit RTN at group 128 sits
          on top of that and changes almost nothing; 4-bit at group 128 uses a coarser grid
          than the file's own and so adds real noise.
        - One prompt and a 135M model with RTN: enough to see the shape, not to rank methods.
          For your own model, use `qviz.Lab.load("<hf id or dir>")` and more prompts.""",
    ),
]

# 03 causal tracing ------------------------------------------------------------------------

TRACING = [
    (
        "md",
        """\
        # Causal tracing: can clean activations rescue a quantized model?

        The study patched full-precision activations into the quantized model and asked whether
        the right answer comes back. At **4 bits** it does: the computation still works and only
        its inputs are noisy (*signal degradation*). At **2 bits** it does not: the layers
        themselves are broken, so clean inputs are wasted on them (*computation collapse*).

        This notebook repeats the experiment on the embedded model (SmolLM2-135M, 30 layers,
        RTN, asymmetric, group 128) with one fact: "The Eiffel Tower is located in the city of"
        → " Paris". `lab.trace` gives a grid over (decoder layer, token position):

        - **restore**: the quantized run, with one cell replaced by the original model's
          activation; colour = *recovery* = (p − p_quantized) / (p_reference − p_quantized),
          0 = no help, 1 = the original probability of " Paris" is back;
        - **corrupt**: the original run with one cell replaced by the quantized activation;
          1 = that cell's damage is harmless, 0 = that cell alone destroys the answer.

        `component` picks what is patched: `"resid"` (the residual stream entering the layer),
        `"attn"` or `"mlp"` (that block's output).""",
    ),
    (
        "code",
        """\
        import numpy as np
        import pandas as pd

        import qviz

        lab = qviz.Lab.load("smollm2-135m")
        PROMPT, TARGET = "The Eiffel Tower is located in the city of", " Paris"
        BITS = [4, 2]
        plans = {
            b: qviz.QuantPlan.uniform(qviz.QuantConfig(bits=b, group_size=128, symmetric=False))
            for b in BITS
        }""",
    ),
    ("code", BOKEH_SETUP),
    (
        "md",
        """\
        ## 1. The residual stream, both directions, 4 and 2 bits

        Four grids, about 4 s each on a CPU. The heatmaps reuse qviz's own dashboard figure
        (`qviz.views.plots.patch_plot`): token on the horizontal axis, decoder layer on the
        vertical one; hover a cell for its value.""",
    ),
    (
        "code",
        """\
        grids = {
            (b, "resid", d): lab.trace(PROMPT, TARGET, plans[b], component="resid", direction=d)
            for b in BITS
            for d in ("restore", "corrupt")
        }
        g = grids[4, "resid", "restore"]
        print("tokens:", g.tokens)
        for b in BITS:
            print(f"{b}-bit: p_reference={g.p_reference:.3f}  "
                  f"p_quantized={grids[b, 'resid', 'restore'].p_quantized:.2e}")""",
    ),
    (
        "code",
        """\
        from bokeh.layouts import gridplot

        from qviz.views.plots import patch_plot


        def heatmap(grid, title=None):
            fig = patch_plot(grid, height=320, width=430).root
            fig.toolbar_location = None
            if title:
                fig.title.text = title
            return fig


        show(gridplot([[heatmap(grids[b, "resid", d], f"{b}-bit, resid, {d}")
                        for d in ("restore", "corrupt")] for b in BITS]))""",
    ),
    (
        "md",
        """\
        **What to look at.**

        - *Restore, 4 bits*: a single restored cell brings back part of the answer in many
          layers — at the last token from the middle layers on, and weakly at the first
          tokens of the subject ("The", "iffel") in layers 12-21. The computation downstream
          still knows what to do with a clean signal.
        - *Restore, 2 bits*: the grid is dark everywhere except the top-right corner. Only when
          the clean state is handed over at the **last token in the last few layers** does the
          answer come back; there, almost nothing quantized is left to run. One clean cell
          anywhere earlier is destroyed by the broken layers that follow.
        - *Corrupt*: at 4 bits one noisy cell costs part of the answer, mostly at the last
          token in late layers. At 2 bits whole rows go black: a single 2-bit state at the
          first token (the attention sink), at the subject token "iffel" or at the last token
          is enough to erase " Paris" from the original model.

        The single best cell of a restore grid is therefore a poor summary: it sits in that
        top-right corner at both bit-widths. Two better ones are printed below: each layer's
        best cell averaged over layers (`mean_best_recovery`), and the best cell away from
        the last token.""",
    ),
    (
        "code",
        """\
        def summary(grid):
            rec = grid.recovery
            return {
                "best cell": grid.best_recovery,
                "at (layer, token)": grid.best_cell,
                "mean of per-layer best": grid.mean_best_recovery,
                "best before last token": float(rec[:, :-1].max()),
                "worst cell": float(rec.min()),
            }


        resid = pd.DataFrame({f"{b}-bit {d}": summary(grids[b, "resid", d])
                              for b in BITS for d in ("restore", "corrupt")}).T
        resid""",
    ),
    (
        "code",
        """\
        r4, r2 = grids[4, "resid", "restore"], grids[2, "resid", "restore"]
        # Clean activations help the 4-bit model far more than the 2-bit one ...
        assert r4.mean_best_recovery > 2 * r2.mean_best_recovery, resid
        # ... and, away from the last token, a clean cell does nothing at 2 bits.
        assert r4.recovery[:, :-1].max() > 0.05 > r2.recovery[:, :-1].max(), resid
        # Corrupting one cell with 2-bit states can erase the answer; with 4-bit ones, less so.
        c4, c2 = grids[4, "resid", "corrupt"], grids[2, "resid", "corrupt"]
        assert c2.recovery.min() < 0.05, resid
        assert (c2.recovery < 0.1).sum() > (c4.recovery < 0.1).sum(), resid""",
    ),
    (
        "md",
        """\
        ## 2. Attention and MLP outputs: restore only

        Restoring one block's output is a narrower patch than restoring the whole stream. The
        study expects the same split: a clean attention or MLP output helps a degraded model a
        little, a collapsed one not at all.""",
    ),
    (
        "code",
        """\
        for comp in ("attn", "mlp"):
            for b in BITS:
                grids[b, comp, "restore"] = lab.trace(PROMPT, TARGET, plans[b], component=comp)
        show(gridplot([[heatmap(grids[b, comp, "restore"], f"{b}-bit, {comp}, restore")
                        for b in BITS] for comp in ("attn", "mlp")]))
        blocks = pd.DataFrame({f"{b}-bit {c}": summary(grids[b, c, "restore"])
                               for c in ("attn", "mlp") for b in BITS}).T
        blocks""",
    ),
    (
        "code",
        """\
        for comp in ("attn", "mlp"):
            best4 = grids[4, comp, "restore"].best_recovery
            best2 = grids[2, comp, "restore"].best_recovery
            print(f"{comp}: best recovery 4-bit {best4:.3f}, 2-bit {best2:.3f}")
            assert best4 > 0.05 and best2 < 0.02 and best4 > best2, (comp, best4, best2)""",
    ),
    (
        "md",
        """\
        ## 3. When recovery has no meaning

        Recovery divides by p_reference − p_quantized. For a plan that does not change the
        target's probability — here the empty plan, full precision — that gap is zero and there
        is nothing to recover. qviz then returns no recovery grid, says why in
        `recovery_note`, and the heatmap falls back to plain p(" Paris").""",
    ),
    (
        "code",
        """\
        fp = lab.trace(PROMPT, TARGET, qviz.QuantPlan.none())
        print(fp.recovery_note)
        show(heatmap(fp))
        assert not fp.defined and fp.recovery is None
        assert fp.best_cell is None and np.isnan(fp.best_recovery)
        assert "undefined" in fp.recovery_note""",
    ),
    (
        "md",
        """\
        ## 4. Layer isolation: broken, or only fed noise?

        Tracing asks whether clean inputs help. Isolation asks the sharper question layer by
        layer: feed **every** quantized layer the original model's input for that layer and
        compare its update (output minus input) with the original layer's update. A layer that
        gets a perfect input and still writes something else is itself broken; one whose update
        stays close only suffered from the noise of the layers below it. qviz calls a layer
        broken when its update cosine is below 0.5.""",
    ),
    (
        "code",
        """\
        from bokeh.palettes import Category10
        from bokeh.plotting import figure

        iso = {b: lab.isolate(PROMPT, plans[b]) for b in BITS}
        p = figure(title="Isolation: cosine of each layer's update on a perfect input",
                   width=640, height=280, x_axis_label="decoder layer",
                   y_axis_label="update cosine vs original", y_range=(0, 1.05))
        for b, color in zip(BITS, Category10[3]):
            p.line(np.arange(lab.n_layers), iso[b].delta_cosine, color=color, line_width=2,
                   legend_label=f"{b}-bit")
        p.line([0, lab.n_layers - 1], [0.5, 0.5], color="gray", line_dash="dashed",
               legend_label="broken below 0.5")
        p.legend.location = "bottom_left"
        show(p)
        for b in BITS:
            print(f"{b}-bit: broken layers {iso[b].broken} ({len(iso[b].broken)} of "
                  f"{lab.n_layers}), mean update cosine {iso[b].delta_cosine.mean():.3f}")
        pd.concat({f"{b}-bit": iso[b].to_frame().set_index("layer") for b in BITS},
                  axis=1).iloc[::3].round(3)""",
    ),
    (
        "code",
        """\
        assert len(iso[2].broken) >= len(iso[4].broken)
        assert len(iso[2].broken) > 0, "2-bit layers should fail the perfect-input test"
        assert iso[4].delta_cosine.mean() > iso[2].delta_cosine.mean() + 0.3""",
    ),
    (
        "md",
        """\
        ## What this shows

        - **4 bits, signal degradation**: clean activations partly bring the answer back, and
          every layer still does (nearly) the right thing on a perfect input — the damage is
          noise accumulated on the way.
        - **2 bits, computation collapse**: a clean activation is useless unless it arrives
          at the very end, and many layers write the wrong update even when handed the perfect
          input. Repairs that clean up or boost the signal (notebook 04) cannot help there.
        - Caveats: one prompt, a 135M model, RTN rather than the study's GPTQ, and a reference
          that is itself Q4_1 (see the README). The study's own recovery metric is not public;
          qviz's is the normalized one defined above. Recovery above 1 in corrupt grids
          means the patched run beat the reference slightly: single-cell patches are noisy.""",
    ),
]

# 04 repairs -------------------------------------------------------------------------------

REPAIR = [
    (
        "md",
        """\
        # Repairs: what works at 4 bits, and why nothing works at 2 bits

        The study tried two cheap repairs on the prompts its 4-bit model got wrong but the
        full-precision model got right (the **Failure Subset**, so the baseline is 0 by
        construction):

        - **source protection**: keep the first layers at 8 bits (the study: first 2 layers
          for Llama-3.1-8B and Mistral-7B, about 4.25 bits on average);
        - **peak signal amplification**: multiply the residual stream leaving the layer where
          the answer signal peaks by a factor alpha, so later (noisy) layers cannot drown it.

        And one test: the **domino test** quantizes only the first k layers, to see whether
        early damage alone can bring the whole model down.

        `lab.repair_report(plan, prompts=...)` runs all of it. To keep this notebook near two
        minutes on a CPU it uses every 8th bundled fact (50 of 400), three alphas and three
        domino depths; drop `prompts=` and the `alphas`/`domino` arguments for the full table.""",
    ),
    (
        "code",
        """\
        import numpy as np
        import pandas as pd

        import qviz
        from qviz.data import load_facts

        lab = qviz.Lab.load("smollm2-135m")
        facts = load_facts()[::8]
        BITS = [4, 2]
        plans = {
            b: qviz.QuantPlan.uniform(qviz.QuantConfig(bits=b, group_size=128, symmetric=False))
            for b in BITS
        }
        reports = {
            b: lab.repair_report(plans[b], prompts=facts, alphas=(1, 3, 9), domino=(1, 2, 6))
            for b in BITS
        }
        for b in BITS:
            r = reports[b]
            print(f"{b}-bit: Failure Subset {r.n_failures} of {len(facts)}, Robust Subset "
                  f"{r.n_robust}, peak layer {r.peak_layer}")""",
    ),
    (
        "code",
        """\
        reports[4].to_frame().round(3)""",
    ),
    (
        "code",
        """\
        reports[2].to_frame().round(3)""",
    ),
    (
        "code",
        """\
        for b in BITS:
            frame = reports[b].to_frame()
            acc = frame["accuracy"].dropna()
            assert acc.between(0, 1).all(), frame
            assert reports[b].baseline == 0.0  # the Failure Subset's definition
        assert reports[2].n_failures > 0, "2 bits should break some facts the reference knows"
        assert reports[2].n_failures > reports[4].n_failures
        assert reports[4].protected >= reports[2].protected""",
    ),
    (
        "md",
        """\
        ## The study's table next to this one

        The study's numbers are for Llama-3.1-8B with GPTQ on ParaRel; ours for SmolLM2-135M
        with RTN on qviz's bundled facts. Accuracies on each plan's own Failure Subset, in %.""",
    ),
    (
        "code",
        """\
        def best_protected_amp(r):
            return max(r.protected_amplification.values(), default=float("nan"))


        rows = [
            {"source": "study, Llama-3.1-8B, GPTQ", "bits": 4, "baseline": 0.0,
             "+ source protection": 67.91, "+ peak amplification": 75.19},
            {"source": "study, Llama-3.1-8B, GPTQ", "bits": 2, "baseline": 0.0,
             "+ source protection": "no help", "+ peak amplification": "no help"},
        ]
        for b in BITS:
            r = reports[b]
            rows.append({"source": "qviz, SmolLM2-135M, RTN g128", "bits": b,
                         "baseline": 100 * r.baseline,
                         "+ source protection": round(100 * r.protected, 1),
                         "+ peak amplification": round(100 * best_protected_amp(r), 1),
                         "amplification alone": round(100 * r.amplified, 1),
                         "Failure Subset size": r.n_failures})
        table = pd.DataFrame(rows)
        table""",
    ),
    (
        "md",
        """\
        **Reading the table honestly.**

        - *2 bits*: as in the study, nothing comes back — neither keeping the first two layers
          at 8 bits nor boosting the peak signal. Notebook 03 shows why: the layers themselves
          are broken, so there is no intact signal to protect or amplify.
        - *4 bits*: the repairs help far less here than in the study. Several reasons, none of
          them settled by this notebook: the model is 60 times smaller, with less redundancy
          to lean on; RTN is much cruder than GPTQ, so the 4-bit damage is spread over every
          layer rather than concentrated in the first ones that source protection covers; the
          "full-precision" reference is itself Q4_1 (about 5 bits per weight, see the README),
          so 4-bit g128 is a small step from it and its Failure Subset holds the few facts
          that sit on a knife-edge; and the Failure Subset here has only a handful of prompts,
          so one fact moves the percentage a lot. The study does not publish how it picked
          its peak layer; qviz's rule (documented in `Lab.repair_report`) is its own.
        - The "+ peak amplification" column is cumulative, as in the study (amplification on
          top of source protection, best alpha); alpha = 1 is in the sweep, so it can never
          score below protection alone.""",
    ),
    (
        "md",
        """\
        ## The domino test

        Quantize only the first k layers and leave the rest at full precision. The study's
        Llama-3.1-8B (accuracy on Robust / Failure subsets, 2 bits): layer 0 only 65.47 /
        15.03; layers 0-1 41.65 / 5.29; layers 0-5 2.51 / 0.38 — a few broken early layers
        are enough to take the whole model down (an early-layer bottleneck).""",
    ),
    (
        "code",
        """\
        domino = pd.DataFrame({
            f"{b}-bit {subset}": {k: 100 * v for k, v in getattr(reports[b], attr).items()}
            for b in BITS
            for subset, attr in (("Robust", "domino_robust"), ("Failure", "domino"))
        })
        domino.index.name = "first k layers quantized"
        study = pd.DataFrame({"study 2-bit Robust": {1: 65.47, 2: 41.65, 6: 2.51},
                              "study 2-bit Failure": {1: 15.03, 2: 5.29, 6: 0.38}})
        domino.join(study).round(1)""",
    ),
    (
        "code",
        """\
        for b in BITS:
            for d in (reports[b].domino, reports[b].domino_robust):
                assert all(0 <= v <= 1 for v in d.values() if not np.isnan(v)), d""",
    ),
    (
        "md",
        """\
        **What to look at.** Compare the 2-bit rows with the study's: does quantizing one, two,
        six early layers already cost most of the answers? If accuracy stays high until many
        layers are quantized, the collapse on this model is spread over the depth of the
        network rather than set off by an early bottleneck (the study saw an early bottleneck
        in Llama-3.1-8B and Mistral-7B, uniform degradation in Qwen3-8B and Gemma2-9B). With
        50 facts and a small Failure Subset, read differences of one or two prompts as noise.
        Measured once on all 400 facts (180 failures at 2 bits, group 128): quantizing only
        layer 0 leaves 20.6% of the Failure Subset answered, layers 0-1 5.0%, layers 0-2 0.6%,
        close to the study's Llama-3.1-8B (15.03 / 5.29): an early-layer bottleneck here too.""",
    ),
]

# 05 memory vs accuracy --------------------------------------------------------------------

MEMORY = [
    (
        "md",
        """\
        # Memory is linear in bits; accuracy is not

        Halving the bits halves the memory of the quantized weights, plus a small fixed
        overhead for the scales and zero points. Accuracy follows a different curve: nearly flat
        from 8 down to 4 bits, then a cliff. This notebook measures both on the embedded model
        (SmolLM2-135M, RTN, asymmetric) at 8, 4, 3 and 2 bits and group sizes 32 and 128, and
        asks the practical question: **for a given memory budget, which configuration wins?**""",
    ),
    (
        "code",
        """\
        import pandas as pd

        import qviz

        lab = qviz.Lab.load("smollm2-135m")
        BITS = [8, 4, 3, 2]
        GROUPS = [32, 128]
        configs = [(b, g) for b in BITS for g in GROUPS]
        plans = {
            (b, g): qviz.QuantPlan.uniform(qviz.QuantConfig(bits=b, group_size=g, symmetric=False))
            for b, g in configs
        }
        plans[(16, None)] = qviz.QuantPlan.none()  # the reference, stored as FP16""",
    ),
    (
        "md",
        """\
        ## 1. The memory side: arithmetic

        `qviz.footprint` counts the bits each weight matrix needs under a plan: `bits` per
        weight for the codes plus a 16-bit scale and a 16-bit zero point per group. Smaller
        groups follow the weights more closely but store more scales: group 32 costs
        32 / 32 = 1 extra bit per weight, group 128 a quarter bit.

        The token embedding (28 M of the model's 135 M weights, shared with the output layer)
        stays at FP16 unless a plan asks otherwise, so the whole-model figure shrinks less than
        the decoder figure.""",
    ),
    (
        "code",
        """\
        rows = []
        for (b, g), plan in plans.items():
            fp = qviz.footprint(lab.model, plan)
            dec = fp.to_frame().query("layer >= 0")
            rows.append({
                "bits": b, "group": g or "-",
                "decoder_bits_per_weight": dec.bytes.sum() * 8 / dec.params.sum(),
                "model_MiB": fp.bytes / 2**20,
                "model_bits_per_weight": fp.effective_bits,
                "vs_fp16": fp.bytes / fp.fp16_bytes,
            })
        mem = pd.DataFrame(rows).sort_values("model_MiB", ascending=False, ignore_index=True)
        mem.round(3)""",
    ),
    (
        "code",
        """\
        # Fewer bits, fewer bytes; smaller groups, a few more bytes for their scales.
        mib = {(r.bits, r.group): r.model_MiB for r in mem.itertuples()}
        for g in GROUPS:
            series = [mib[(16, "-")]] + [mib[(b, g)] for b in BITS]
            assert all(a > b for a, b in zip(series, series[1:])), (g, series)
        for b in BITS:
            assert mib[(b, 32)] > mib[(b, 128)]
        # decoder overhead: exactly 16+16 bits per group on top of the codes
        dec = mem.set_index(["bits", "group"])["decoder_bits_per_weight"]
        assert abs(dec[(4, 32)] - 5.0) < 1e-9, dec[(4, 32)]""",
    ),
    (
        "md",
        """\
        ## 2. The accuracy side: measurement

        Two measures, both on text bundled with qviz:

        - **fact accuracy**: share of factual prompts ("The capital city of France is") whose
          answer's first token is the model's top-1 next token. To keep this notebook quick we
          use every 10th of the 400 bundled facts (40 prompts), so one fact is worth 2.5
          points: differences of a few points are noise. `lost` counts the facts the reference
          gets right and the quantized model gets wrong (the study's Failure Subset).
        - **perplexity** on prose bundled with qviz: how surprised the model is by each next
          token (lower is better). It reacts to damage long before top-1 answers change. We use
          the first 1,024 tokens of the text (two windows of 512); `lab.perplexity(plan)` with
          no `text` reads all ~6,300 tokens.""",
    ),
    (
        "code",
        """\
        from qviz.data import load_facts, load_text

        subset = load_facts()[::10]
        excerpt = lab.tokenizer.decode(lab.tokenizer(load_text()).input_ids[:1025])
        print(len(subset), "facts;", len(lab.tokenizer(excerpt).input_ids), "tokens of prose")

        results = []
        for (b, g), plan in plans.items():
            row = {"bits": b, "group": g or "-",
                   "perplexity": lab.perplexity(plan, text=excerpt, window=512)}
            if not plan.is_full_precision:  # evaluate() runs the reference on the subset too
                ev = lab.evaluate(plan, prompts=subset)
                row |= {"accuracy": ev.accuracy, "lost": len(ev.failure_subset),
                        "reference_accuracy": ev.reference_accuracy}
            results.append(row)
        acc = pd.DataFrame(results).merge(mem, on=["bits", "group"])
        is_ref = acc.bits == 16  # the reference: its accuracy is every evaluation's reference
        acc.loc[is_ref, ["accuracy", "lost"]] = [acc.reference_accuracy.iloc[0], 0]
        acc.loc[is_ref, "reference_accuracy"] = acc.reference_accuracy.iloc[0]
        table = acc[["bits", "group", "model_MiB", "accuracy", "lost", "perplexity"]]
        table.sort_values("model_MiB", ascending=False).round(3)""",
    ),
    (
        "code",
        """\
        # 8 bits are close to the reference; 2 bits are far worse at both group sizes.
        res = acc.set_index(["bits", "group"])
        ref = res.loc[(16, "-")]
        for g in GROUPS:
            assert res.loc[(2, g), "accuracy"] < res.loc[(8, g), "accuracy"]
            assert res.loc[(2, g), "perplexity"] > 2 * res.loc[(8, g), "perplexity"]
            assert abs(res.loc[(8, g), "perplexity"] / ref.perplexity - 1) < 0.02
        assert (acc.reference_accuracy == ref.accuracy).all()  # same reference in every run""",
    ),
    (
        "md",
        """\
        ### A caveat particular to this model: its reference is already 4-bit

        The embedded model ships as a GGUF file in Q4_1 format: 4-bit codes with a 16-bit
        scale and minimum per block of 32 weights. qviz's "full precision" reference is those
        codes dequantized to float32. Asymmetric 4-bit RTN at group 32 is the same format on
        the same blocks, so it finds exactly the original codes again: **4-bit g32 is lossless
        here only because the model was 4-bit g32 to begin with.** (8-bit g32 lands on the
        same points too, in every block that uses the full 0..15 code range: 255 = 17 × 15.)

        What follows:

        - nothing here can measure what 4 or 8 bits cost a real FP16 model: the 16 → 5 bit
          loss already happened when the file was made;
        - the "FP16" row is a storage format, not an information content: this model's weights
          carry about 5 bits each, which is why 8-bit and even 4-bit g32 change nothing;
        - damage at 3 and 2 bits, and 4 bits at group 128, is damage on top of Q4_1 — still a
          faithful picture of how a coarser grid breaks a model.""",
    ),
    (
        "code",
        """\
        exact = res.loc[(4, 32)]
        print(f"4-bit g32: perplexity {exact.perplexity:.4f} vs reference {ref.perplexity:.4f}; "
              f"accuracy {exact.accuracy:.3f} vs {ref.accuracy:.3f}")
        assert abs(exact.perplexity / ref.perplexity - 1) < 1e-4
        assert exact.accuracy == ref.accuracy""",
    ),
    (
        "md",
        """\
        ## 3. The Pareto view: what wins for a given budget?

        Each configuration is a point (memory, perplexity). A configuration is on the **Pareto
        front** when no other one is both smaller and better. For a memory budget, the answer
        is the best front point that fits under it. Read the chart from right to left: memory
        drops steadily, while perplexity stays flat and then shoots up.""",
    ),
    (
        "code",
        """\
        from bokeh.io import output_notebook, show
        from bokeh.models import ColumnDataSource, LabelSet
        from bokeh.plotting import figure
        from bokeh.resources import INLINE

        output_notebook(resources=INLINE, hide_banner=True)  # offline: BokehJS inside the notebook

        pts = acc.assign(label=[f"{b}b" + (f" g{g}" if g != "-" else " fp16")
                                for b, g in zip(acc.bits, acc.group)])
        pts = pts.sort_values("model_MiB", ignore_index=True)
        TOL = 1e-3  # perplexities within 0.1% count as equal (4b g32 reproduces the reference)
        best = float("inf")
        front = []
        for r in pts.itertuples():  # increasing memory: on the front if better than all smaller
            front.append(r.perplexity < best * (1 - TOL))
            best = min(best, r.perplexity)
        pts["pareto"] = front

        p = figure(title="Memory vs perplexity (SmolLM2-135M, RTN)", width=640, height=340,
                   y_axis_type="log", x_axis_label="model size (MiB, embeddings at FP16)",
                   y_axis_label="perplexity (log)")
        src = ColumnDataSource(pts)
        p.scatter("model_MiB", "perplexity", source=src, size=9, color="steelblue")
        front_pts = pts[pts.pareto]
        p.line(front_pts.model_MiB, front_pts.perplexity, color="firebrick", line_width=2,
               legend_label="Pareto front")
        p.add_layout(LabelSet(x="model_MiB", y="perplexity", text="label", source=src,
                              x_offset=5, y_offset=3, text_font_size="9pt"))
        show(p)
        pts[["label", "model_MiB", "perplexity", "accuracy", "pareto"]].round(3)""",
    ),
    (
        "code",
        """\
        def best_under(budget_mib):
            \"\"\"The smallest config with the (near-)lowest perplexity within budget_mib.\"\"\"
            fits = pts[pts.model_MiB <= budget_mib]
            if fits.empty:
                return None
            good = fits[fits.perplexity <= fits.perplexity.min() * (1 + TOL)]
            return good.sort_values("model_MiB").label.iloc[0]


        for budget in (300, 120, 110, 100, 90, 80):
            print(f"budget {budget:>4} MiB -> {best_under(budget)}")

        # The full-size model is never the answer once a 4-bit g32 copy (identical here) fits.
        assert best_under(pts.model_MiB.max()) != "16b fp16"
        assert not pts.set_index("label").loc["16b fp16", "pareto"]""",
    ),
    (
        "md",
        """\
        ## Caveats: measure your own

        - These curves belong to this model, this method (RTN) and these texts. Larger models
          tolerate low bits better; GPTQ (`QuantConfig(method="gptq")`) or AWQ move the cliff
          to fewer bits; a different task can fall off earlier or later.
        - Perplexity and fact accuracy disagree in detail: perplexity sees every token, the
          fact test only the top-1 answer on 40 prompts.
        - The Pareto question worth asking in practice is often across models: a larger model
          at 4 bits can beat a smaller one at 8 bits in the same memory. Put your own model in
          `qviz.Lab.load(...)`, your own prompts in `lab.evaluate(plan, prompts=...)`, and
          re-run this notebook.""",
    ),
]

# 09 prescription --------------------------------------------------------------------------

PRESCRIPTION = [
    (
        "md",
        """\
        # Prescription: the per-layer plan for a bits-per-weight budget

        `lab.prescribe(budget_bits)` answers "so what should I ship?". It measures how much each
        decoder layer hurts when it alone is quantized with each option -- a bit-width **and** a
        group size (the KL divergence of the next-token distribution from full precision, on
        the first third of the bundled prose only; each variant runs from the stored input of
        its layer, so only the layers after it are recomputed). Then it solves the allocation
        exactly: one option per layer, total stored bits (scales and zeros included, as
        `qviz.footprint` counts them) within the budget, least summed KL. It checks the result
        with the verdict and scores it against uniform and protect-first-k plans on text it
        never saw. Because layers interact, the summed KL only proposes: the allocation's plan
        and every uniform plan that fits are then measured whole, and a short local search
        (``refine_passes`` whole-plan forwards, 16 here) keeps the change of one or two layers
        that lowers the measured KL most. The table is cached per model, options and
        calibration, so a second budget (a slider) costs only that search.""",
    ),
    (
        "code",
        """\
        import pandas as pd

        import qviz
        from qviz.studies.prescribe import split_text

        lab = qviz.Lab.load("smollm2-135m")
        BUDGETS = [2.5, 3.0, 3.5, 4.0, 5.0]
        # small for the notebook: 3 bit-widths x 2 group sizes, 128 calibration tokens, 16 moves
        OPTS = dict(
            candidates=(2, 3, 4), group_size=(64, 128), n_calib_tokens=128, refine_passes=16
        )
        FAST = dict(OPTS, eval_chars=4000, n_facts=40, greedy=False)
        first = lab.prescribe(BUDGETS[0], baselines=False, **FAST)
        print("options:", first.options)
        print("sensitivity forward passes:", first.forward_passes)
        first.sensitivity.round(4).head(8)""",
    ),
    (
        "md",
        """\
        ## 1. Which layers are sensitive

        Each row is a decoder layer, each column an option; the value is the KL increase when
        only that layer is quantized. The same (cached) table serves every budget.""",
    ),
    (
        "code",
        """\
        sens = first.sensitivity
        top = sens["rtn2-g128"].sort_values(ascending=False).head(5)
        print("most sensitive layers at 2 bits g128:", list(top.index))
        rx = {b: lab.prescribe(b, baselines=(b == 3.5), **FAST) for b in BUDGETS}
        for b, r in rx.items():
            fp = qviz.footprint(lab.model, r.plan, include_embeddings=False)
            assert fp.effective_bits <= b + 1e-12, (b, fp.effective_bits)
            assert r.sensitivity is sens  # the cached table: no new sensitivity passes
            print(b, round(fp.effective_bits, 4), r.verdict.mode, " ".join(r.choice))""",
    ),
    (
        "md",
        """\
        ## 2. The plans: bits per layer

        More budget buys bits (and smaller groups) first where the sensitivity table says they
        matter most. The bar height is the layer's stored bits per weight, scales included.""",
    ),
    ("code", BOKEH_SETUP),
    (
        "code",
        """
        from bokeh.layouts import column
        from bokeh.plotting import figure

        def stored_bits(option):  # e.g. "rtn3-g64" -> 3 + 32 / 64 (16-bit scale and zero)
            bits, group = option.removeprefix("rtn").split("-g")
            return int(bits) + 32 / int(group)

        figs = []
        for b, r in rx.items():
            f = figure(height=160, width=700, title=f"budget {b} bits/weight: {r.verdict.mode}",
                       y_range=(0, 5), x_axis_label="decoder layer",
                       y_axis_label="bits/weight")
            f.vbar(x=list(range(len(r.choice))), top=[stored_bits(c) for c in r.choice],
                   width=0.8)
            figs.append(f)
        show(column(*figs))""",
    ),
    (
        "md",
        """\
        ## 3. Against the baselines at 3.5 bits (held-out prose and facts)

        Every uniform plan (candidate bits x group sizes 32, 64, 128 and per channel) and
        every protect-first-k plan that fits the same budget. `ppl_ratio_vs_prescribed` > 1
        means the prescription has the lower perplexity. The greedy one-layer-at-a-time KL
        search is left out here to keep the notebook short (about 30 forward passes per raise,
        over a hundred raises at this budget); pass `greedy=True` (or `greedy_top_k=1`, a
        bounded variant), or run `qviz bench prescribe`.""",
    ),
    (
        "code",
        """\
        print(rx[3.5].summary())
        cmp = rx[3.5].comparison()
        cmp.drop(columns="plan").round(4)""",
    ),
    (
        "code",
        """\
        # at 3.5 bits the prescription has a lower calibration KL than every uniform plan that
        # fits; on held-out prose it is close to the best one, rtn3-g64 (these small settings:
        # 128 calibration tokens, 2 group sizes), and far below rtn3-g128
        me = cmp.iloc[0]
        uniform = cmp[cmp.kind == "uniform"]
        assert me.effective_bits <= 3.5 and (me.calib_kl < uniform.calib_kl).all(), uniform
        u3 = cmp[cmp.plan == "rtn3-g128"].iloc[0]
        assert me.perplexity < u3.perplexity, (me, u3)""",
    ),
    (
        "md",
        """\
        ## 4. Which layers get the bits, and why

        The perfect-input test (`lab.isolate`: each layer fed the reference input, one batched
        pass) on the cheapest plan: layers whose own update is most damaged at 2 bits are the
        ones the allocation raises first.""",
    ),
    (
        "code",
        """\
        iso = lab.isolate("The capital city of France is",
                          qviz.QuantPlan.uniform(qviz.QuantConfig(2, 128)))
        why = pd.DataFrame({
            "option at 3.5": rx[3.5].choice,
            "KL alone at rtn2-g128": sens["rtn2-g128"].to_numpy(),
            "update cosine at 2 bits": iso.delta_cosine,
        })
        why.round(4).sort_values("KL alone at rtn2-g128", ascending=False).head(10)""",
    ),
    (
        "md",
        """\
        ## 5. The frontier: held-out perplexity against bits per weight""",
    ),
    (
        "code",
        """\
        held = split_text()[1][:4000]
        rows = []
        for b, r in rx.items():
            rows.append({"kind": "prescribed", "bits": r.effective_bits,
                         "perplexity": lab.perplexity(r.plan, text=held)})
        for bits in (2, 3, 4):
            for group in (64, 128):
                plan = qviz.QuantPlan.uniform(qviz.QuantConfig(bits, group))
                fp = qviz.footprint(lab.model, plan, include_embeddings=False)
                rows.append({"kind": "uniform", "bits": fp.effective_bits,
                             "perplexity": lab.perplexity(plan, text=held)})
        front = pd.DataFrame(rows)
        f = figure(height=300, width=600, x_axis_label="decoder bits per weight",
                   y_axis_label="held-out perplexity", y_axis_type="log")
        for kind, color in (("prescribed", "firebrick"), ("uniform", "navy")):
            d = front[front.kind == kind].sort_values("bits")
            f.line(d.bits, d.perplexity, color=color, legend_label=kind)
            f.scatter(d.bits, d.perplexity, color=color, size=7)
        show(f)
        front.round(3)""",
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_failure_modes.ipynb": FAILURE_MODES,
    "03_causal_tracing.ipynb": TRACING,
    "04_repair.ipynb": REPAIR,
    "05_memory_vs_accuracy.ipynb": MEMORY,
    "09_prescription.ipynb": PRESCRIPTION,
}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook(metadata=KERNEL)
    for kind, text in cells:
        text = dedent(text).strip("\n")
        nb.cells.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i:02d}"  # stable ids: rebuilding gives the same file, so diffs stay small
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
