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
        ## Dashboard (placeholder)

        **TODO:** the interactive dashboard cell is added here when `qviz.views` lands.""",
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

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_failure_modes.ipynb": FAILURE_MODES,
    "05_memory_vs_accuracy.ipynb": MEMORY,
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
