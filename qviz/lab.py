"""The Lab: the one object users script. Orchestration only; the studies live in qviz.studies."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from qviz.metrics.tracing import RECOVERY_EPS
from qviz.models.arch import get_adapter
from qviz.models.load import load_model
from qviz.probes.capture import Capture
from qviz.quant.config import QuantPlan
from qviz.quant.engine import engine_for
from qviz.results import (
    Comparison,
    Evaluation,
    Isolation,
    PatchGrid,
    Prescription,
    RepairReport,
)
from qviz.studies import compare as _compare
from qviz.studies import evaluate as _evaluate
from qviz.studies import repair as _repair
from qviz.studies import tracing as _tracing

ACTS_BUDGET = int(os.environ.get("QVIZ_ACTS_BYTES", 1 << 30))  # Lab activation cache, bytes
MAX_PROMPT_TOKENS = 1024
# bundled prompts pooled with the user's for the CKA map (first position left out) by the
# dashboard, ``qviz diagnose`` and the report: with one prompt and every token, linear CKA stays
# bright even at 2 bits (issue 12, README)
CKA_CONTEXT = 32


def nbytes(obj) -> int:
    """Bytes held by the tensors and arrays in ``obj``, walking dataclasses, lists, tuples and
    dicts (the size of a cached result for ``ByteLRU``)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray) or isinstance(getattr(obj, "nbytes", None), int):
        return obj.nbytes  # (an object that says its size, e.g. a GramSide)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if isinstance(obj, str):
        return len(obj)
    return 0


class ByteLRU:
    """A thread-safe LRU mapping bounded by the bytes of its values (``size(value)``) and,
    optionally, by a number of entries. The most recent entry is always kept."""

    def __init__(
        self,
        budget_bytes: int | None = None,
        size: Callable[[object], int] = lambda v: 0,
        max_items: int | None = None,
    ) -> None:
        self.budget_bytes, self.size, self.max_items = budget_bytes, size, max_items
        self._data: OrderedDict[Hashable, object] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._data[key] = value
            self._sizes[key] = int(self.size(value))
            self._data.move_to_end(key)
            while len(self._data) > 1 and (
                (self.budget_bytes is not None and self.nbytes > self.budget_bytes)
                or (self.max_items is not None and len(self._data) > self.max_items)
            ):
                old, _ = self._data.popitem(last=False)
                del self._sizes[old]

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()


class Lab:
    """Compare a model under quantization plans with its full-precision self.

    Thread-safe: one forward at a time per model (the engine's lock); callers never see another
    caller's plan. Cache layers, from the weights up:
    - the engine's LRU of materialized plans (``QVIZ_CACHE_BYTES``, 4 GiB; GPTQ also keeps a
      verified disk cache), shared by every Lab on the model;
    - ``_acts``: captured activations per (prompt, plan), logit lenses and isolation tests per
      (prompt, plan), whole comparisons per (prompts, target, plan, options) and the CKA context
      prompts' residual states per plan, every entry valid only for the weights it was computed
      on (``studies.compare.weights_key``): an LRU bounded by ``acts_budget_bytes``
      (``QVIZ_ACTS_BYTES``, 1 GiB);
    - ``_ref_stats``: full-precision next-token results per prompt set (at most 16 sets).
    ``max_prompt_tokens``: longer prompts raise ValueError before any forward (default 1024).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        name: str | None = None,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
        acts_budget_bytes: int = ACTS_BUDGET,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = get_adapter(model)
        self.engine = engine_for(model)
        if self.engine.tokenizer is None:
            self.engine.tokenizer = tokenizer  # GPTQ calibrates on text tokenized like the prompts
        self.name = name or getattr(model.config, "name_or_path", "model")
        self.max_prompt_tokens = int(max_prompt_tokens)
        self._acts = ByteLRU(acts_budget_bytes, size=nbytes)
        self._ref_stats = ByteLRU(max_items=16)

    @classmethod
    def load(cls, name_or_path: str = "smollm2-135m", **kw) -> Lab:
        """``Lab.load("smollm2-135m")``; any HF id or local directory (see ``load_model``)."""
        model, tok = load_model(name_or_path, **kw)
        return cls(model, tok, name=name_or_path)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @property
    def acts_budget_bytes(self) -> int:
        """Byte budget of the activation cache (settable; the newest entry is always kept)."""
        return self._acts.budget_bytes

    @acts_budget_bytes.setter
    def acts_budget_bytes(self, value: int) -> None:
        self._acts.budget_bytes = int(value)

    @contextmanager
    def quantized(self, plan: QuantPlan):
        """The engine's context manager: ``plan``'s weights swapped in for the block."""
        with self.engine.quantized(plan) as m:
            yield m

    def check(self, plan: QuantPlan) -> None:
        """Refuse ``plan`` before any work (ValueError naming the layer, value and what would
        fit): layers the model lacks, group sizes or settings a Linear's method cannot take."""
        self.engine.check(plan)

    # inputs -----------------------------------------------------------------------------------
    def encode(self, prompt: str) -> torch.Tensor:
        """input_ids [1, T] on the model's device; ValueError for an empty prompt or one longer
        than ``max_prompt_tokens``."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] > self.max_prompt_tokens:
            raise ValueError(
                f"the prompt is {ids.shape[1]} tokens long, over the limit of "
                f"{self.max_prompt_tokens} tokens (Lab.max_prompt_tokens); shorten it"
            )
        return ids.to(self.model.device)

    def target_id(self, target: str | int) -> int:
        """The token id of a single-token ``target``; ValueError showing how it tokenizes."""
        if isinstance(target, (int, np.integer)):
            if not 0 <= int(target) < self.model.config.vocab_size:
                raise ValueError(f"target id {target} is outside the vocabulary")
            return int(target)
        if not isinstance(target, str) or not target:
            raise ValueError(
                f"target must be one token of text (e.g. ' Paris', with its leading space) or a "
                f"token id, got {target!r}"
            )
        ids = self.tokenizer(target, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise ValueError(
                f"target {target!r} must encode to exactly one token, but it is {len(ids)}: "
                f"{pieces}; pass its first piece {pieces[0] if pieces else ''!r} or a token id"
            )
        return ids[0]

    # the study's diagnostics ----------------------------------------------------------------
    def activations(self, prompt: str, plan: QuantPlan) -> Capture:
        """Captured activations of ``prompt`` under ``plan`` (cached; see
        ``qviz.studies.compare.activations``)."""
        return _compare.activations(self, prompt, plan)

    def compare(
        self,
        prompt: str | Sequence[str],
        target: str | int,
        plan: QuantPlan,
        cka_estimator: str = "biased",
        drop_first: bool = False,
        isolation: bool = True,
        cka_context: int = 0,
        cancel: threading.Event | None = None,
    ) -> Comparison:
        """Every diagnostic of ``plan`` against full precision.

        ``prompt``: one prompt or a list, pooled for CKA, attention and FFN statistics (tokens as
        samples); the logit lens and the verdict's ranks use the first prompt and ``target``.
        ``isolation``: also run the perfect-input test (``isolate``) on the first prompt (one
        more forward) and add it to the verdict's evidence. ``cka_context``: pool the CKA with
        this many bundled fact prompts (their activations cached per plan), every prompt's
        first (attention-sink) position left out; ``cmp.cka.reference`` is the reference's own
        CKA map on the same samples. Results are cached per (prompts, target, plan, options)
        and for the model's current weights (each call returns its own copy); the activations,
        logit lens and isolation of each (prompt, plan) are reused by other targets and prompt
        sets. ``cancel`` is checked before each forward pass.
        """
        return _compare.compare(
            self, prompt, target, plan, cka_estimator, drop_first, isolation, cka_context, cancel
        )

    def compare_many(
        self,
        prompts: Sequence[str],
        targets: str | int | Sequence[str | int],
        plan: QuantPlan,
        cka_estimator: str = "biased",
        drop_first: bool = False,
        isolation: bool = True,
        cka_context: int = 0,
        cancel: threading.Event | None = None,
    ) -> list[Comparison]:
        """``[compare(p, t, plan, ...) for p, t in zip(prompts, targets)]`` (``targets``: one
        for every prompt or one each), equal to those calls up to float rounding, with every
        prompt's forwards, logit lens and isolation test run in left-padded batches: one
        forward per plan for up to 512 padded tokens."""
        return _compare.compare_many(
            self,
            prompts,
            targets,
            plan,
            cancel,
            cka_estimator=cka_estimator,
            drop_first=drop_first,
            isolation=isolation,
            cka_context=cka_context,
        )

    # task level -------------------------------------------------------------------------------
    def _facts(self, prompts: list[dict] | None) -> tuple[list[dict], list[str], list[int]]:
        return _evaluate.facts_of(self, prompts)

    def _next_token_stats(self, prompts, targets, scale=None, max_tokens: int = 4096):
        """Top-1 correctness and rank of each target (see ``studies.evaluate``)."""
        return _evaluate.next_token_stats(self, prompts, targets, scale, max_tokens)

    def evaluate(
        self,
        plan: QuantPlan,
        prompts: list[dict] | None = None,
        cancel: threading.Event | None = None,
    ) -> Evaluation:
        """Fact-recall accuracy: the answer's first token is the top-1 next token.

        ``prompts``: dicts with "prompt" and "answer" (default: the bundled facts). Prompts run
        in left-padded batches; the reference run is cached per prompt set. ``cancel`` is
        checked before each batch.
        """
        return _evaluate.evaluate(self, plan, prompts, cancel)

    def perplexity(
        self,
        plan: QuantPlan,
        text: str | None = None,
        window: int = 512,
        cancel: threading.Event | None = None,
    ) -> float:
        """Perplexity of ``text`` (default: the bundled prose) in non-overlapping windows;
        ``cancel`` is checked before each window."""
        return _evaluate.perplexity(self, plan, text, window, cancel)

    # causal tracing, isolation, repairs ------------------------------------------------------
    def trace(
        self,
        prompt: str,
        target: str | int,
        plan: QuantPlan,
        component: str = "resid",
        direction: str = "restore",
        window: int = 1,
        eps: float = RECOVERY_EPS,
        method: str = "batched",
        max_tokens: int = 4096,
        cancel: threading.Event | None = None,
        mode: str = "exact",
        top: int = 32,
    ) -> PatchGrid:
        """Causal tracing of ``target`` after ``prompt`` over every (decoder layer, position).

        ``direction="restore"``: the quantized run with the reference activation patched in at
        one cell; ``"corrupt"``: the reference run with the quantized activation patched in.
        ``component``: "resid" (input of layer l), "attn" or "mlp" (outputs of layer l);
        ``window``: layers patched together, centred on l. Returns a PatchGrid with prob [L, T]
        and recovery [L, T] (None, with ``recovery_note``, when the plan does not move the
        target's probability by ``eps``). ``method="per_cell"`` is the slow one-forward-per-cell
        baseline. ``cancel`` is checked before each chunk of cells.

        ``mode="fast"``: attribution patching first estimates every cell (one forward and one
        backward of the base run: (source - base) . dP/d activation), then patches exactly the
        ``top`` cells of largest estimated effect and each layer's best cell by estimate; the
        grid's ``exact`` [L, T] says which cells are exact, ``estimate`` holds the estimate.
        """
        return _tracing.trace(
            self,
            prompt,
            target,
            plan,
            component,
            direction,
            window,
            eps,
            method,
            max_tokens,
            cancel,
            mode,
            top,
        )

    def isolate(self, prompt: str, plan: QuantPlan) -> Isolation:
        """The "perfect input" test: every quantized decoder layer fed the reference input.

        One forward under ``plan`` in which each layer's input is replaced by the reference
        run's input of that layer; its output is compared with the reference layer's output
        (cosine, relative L2 error [L]) and so is its update, output minus input
        (``delta_cosine``, ``delta_rel_error`` [L]). A layer whose update is wrong on a perfect
        input is itself broken (computation collapse); one that is right is only fed noise.
        """
        return _tracing.isolate(self, prompt, plan)

    def peak_layer(
        self, plan: QuantPlan, calibration: list[dict] | None = None, n_max: int = 32
    ) -> int:
        """The decoder layer whose output carries the most answer probability under ``plan``.

        Calibration: ``calibration`` facts (default: the bundled facts), at most ``n_max`` of them
        evenly spaced; the logit-lens probability of each one's answer at the last position is
        averaged over prompts and the best decoder layer is returned, the last layer excluded
        (see ``qviz.metrics.tracing.peak_layer``). One choice per plan: never per evaluated prompt.
        """
        return _tracing.peak_layer(self, plan, calibration, n_max)

    def repair_report(
        self,
        plan: QuantPlan,
        prompts: list[dict] | None = None,
        alphas: Sequence[float] = (1, 2, 3, 5, 7, 9),
        protect_n: int = 2,
        protect_bits: int = 8,
        domino: Sequence[int] = (1, 2, 3, 4, 5, 6),
        calibration: list[dict] | None = None,
    ) -> RepairReport:
        """The study's repair table: accuracy on ``plan``'s Failure Subset under each repair.

        Failure Subset: the ``prompts`` (default: bundled facts) the reference answers right and
        ``plan`` wrong. Repairs: source protection (``QuantPlan.protect_first``), peak signal
        amplification (the residual stream leaving ``peak_layer`` times each alpha, on ``plan``
        and on top of protection) and the domino test (``QuantPlan.only_layers(cfg, range(k))``,
        also on the Robust Subset). Calibration facts for the peak layer are never scored:
        ``calibration`` if given, else the prompts outside the Failure Subset. The procedure and
        its reasons are written out in ``qviz.studies.repair``.
        """
        return _repair.repair_report(
            self, plan, prompts, alphas, protect_n, protect_bits, domino, calibration
        )

    # dashboard support ------------------------------------------------------------------------
    def prepare(self, plan: QuantPlan, cancel=None, on_progress=None) -> None:
        """Materialize ``plan``'s weights now (cached by the engine); ``on_progress(done, total)``
        per decoder layer of calibrated methods; a set ``cancel`` raises qviz.cancel.Cancelled."""
        self.engine.materialize(plan, cancel=cancel, on_progress=on_progress)

    def prefetch(
        self,
        plans: Sequence[QuantPlan],
        cancel: threading.Event | None = None,
        then: Callable[[QuantPlan], object] | None = None,
        delay: float = 0.0,
    ) -> threading.Thread:
        """Materialize ``plans`` in the background (e.g. the neighbouring bit-widths while the
        dashboard is idle) within the engine's budget (``QVIZ_CACHE_BYTES``), evicting for
        them only plans used before the one in use; returns the started thread at once. Set
        ``cancel`` to stop it before its next plan. ``then(plan)``: more work in that thread
        once a plan's weights are cached, e.g. ``lambda p: lab.compare(prompt, target, p,
        cancel=cancel)`` to have the whole comparison ready; ``delay``: seconds to wait first
        (an idle pause). See ``QuantEngine.prefetch``."""
        return self.engine.prefetch(plans, cancel=cancel, then=then, delay=delay)

    def memory_table(self, plans, n_facts: int = 0, cancel=None):
        """MemoryTable: weight MiB, effective bits and (``n_facts`` > 0) accuracy per plan."""
        from qviz.studies.memory import memory_table

        return memory_table(self, plans, n_facts=n_facts, cancel=cancel)

    # prescription -------------------------------------------------------------------------------
    def uniform_within(
        self, budget: float, method: str = "rtn", group_sizes=(128,)
    ) -> tuple[QuantPlan, float] | None:
        """(plan, decoder bits/weight): the uniform plan with the most bits per weight within
        ``budget`` (the one a prescription is shown beside); None when none fits."""
        from qviz.studies.prescribe import uniform_within

        return uniform_within(self, budget, method=method, group_sizes=group_sizes)

    def prescribe(self, budget_bits: float, **kw) -> Prescription:
        """Prescription: the least-KL per-layer plan within ``budget_bits`` decoder bits/weight.
        Keywords: methods=("rtn",), candidates=(2, 3, 4, 8), objective="kl",
        group_size=(32, 64, 128) (one size or several), cancel=None, progress=None (called
        with (done, total)), refine_passes=64 (the local search on the joint calibration KL)
        and the search/baseline options of ``qviz.studies.prescribe.prescribe``. Never worse on
        the calibration KL than a uniform plan of its options that fits. Cached: the same call
        again returns at once; a new budget re-runs only the allocation and the refinement (a
        slider: ``baselines=False``)."""
        from qviz.studies.prescribe import prescribe

        return prescribe(self, budget_bits, **kw)
