"""The quantization engine: check a plan, materialize and cache its weights, swap them in, restore.

Original tensors are never modified: a plan's dequantized weights are new tensors, swapped in
by pointing each Parameter's ``.data`` at them and pointed back at the very same original
tensors on exit (so every parameter is ``torch.equal`` -- indeed identical -- to before).

Dispatch goes through ``qviz.quant.METHODS``: a plan's targets are grouped by method; the
uncalibrated methods materialize theirs first, then each calibrated method gets the others'
results (to run the plan's other layers as the plan says).

Locking. ``engine.lock`` (an RLock) guards the swap and every forward under ``quantized()``. A
plan of uncalibrated methods (RTN) is computed under it (fast). A plan with a calibrated method
(GPTQ, minutes) holds it only to take a *private copy* of the model: a structural deep copy whose
parameters share the original weight tensors (no weight memory is copied; buffers are copied),
built from the originals even inside another plan's block. The run then goes on in a
``SharedJob`` worker thread on that copy, without the lock, so other sessions keep computing and
using RTN plans; a second request for the same plan joins the running job (one computation), and
the job stops at its next layer once every requester has cancelled or left. Its result enters
the cache under the lock; nothing is cached if it was cancelled or if the originals changed
while it ran.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from qviz.cancel import Cancelled
from qviz.models.arch import Adapter, get_adapter, weight_layout
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.jobs import SharedJob
from qviz.quant.methods import METHODS, Method, Request, apply

DEFAULT_BUDGET = int(os.environ.get("QVIZ_CACHE_BYTES", 4 << 30))


@dataclass(frozen=True)
class Target:
    """A quantizable weight: dotted name, parameter, layout, decoder layer (-1: embeddings)."""

    name: str
    param: nn.Parameter
    layout: str
    layer: int

    @property
    def in_features(self) -> int:
        shape = self.param.shape
        return shape[0] if self.layout == "in_out" else shape[1]


def targets(
    model: nn.Module, adapter: Adapter, plan: QuantPlan
) -> list[tuple[Target, QuantConfig]]:
    """Every weight ``plan`` quantizes, with its config (deduplicated for tied weights)."""
    layers = adapter.decoder_layers(model)
    plan.check_layers(len(layers))
    out, seen = [], set()
    for i, layer in enumerate(layers):
        cfg = plan.config_for(i)
        if cfg is None:
            continue
        for rel in adapter.linears:
            mod = layer.get_submodule(rel)
            out.append(
                (Target(f"{adapter.layers}.{i}.{rel}", mod.weight, weight_layout(mod), i), cfg)
            )
            seen.add(id(mod.weight))
    if plan.embeddings:
        for path in (adapter.embed, adapter.unembed):
            mod = model.get_submodule(path)
            if id(mod.weight) not in seen:
                layout = "out_in"  # embeddings [vocab, d] and unembeddings [vocab, d] alike
                out.append((Target(path, mod.weight, layout, -1), plan.default))
                seen.add(id(mod.weight))
    return out


def quantize_weight(w: torch.Tensor, layout: str, cfg: QuantConfig, name: str) -> torch.Tensor:
    """Quantize one weight along its input dimension, whatever its layout, with an uncalibrated
    method (a calibrated one raises NotImplementedError: use ``QuantEngine.materialize``)."""
    return apply(METHODS.get_method(cfg.method), w, layout, cfg, name)


def _stamp(t: Target, w: torch.Tensor) -> tuple[int, int]:
    """An O(1) fingerprint of an original weight: its storage and its parameter's version
    (bumped by in-place edits such as ``with torch.no_grad(): p.mul_(2)``)."""
    return w.data_ptr(), t.param._version


def by_method(items) -> dict[Method, list]:
    """The plan's (target, config, original) items grouped by method, uncalibrated ones first."""
    groups: dict[Method, list] = {}
    for item in items:
        groups.setdefault(METHODS.get_method(item[1].method), []).append(item)
    return dict(sorted(groups.items(), key=lambda kv: kv[0].calibrated))


class QuantEngine:
    """Checks, materializes and caches plans for one model; swaps them in under a per-model lock.

    ``budget_bytes`` bounds the LRU cache of materialized plans (``QVIZ_CACHE_BYTES``, 4 GiB by
    default). The most recently used plan is always kept, even when it alone is over budget.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter | None = None,
        budget_bytes: int = DEFAULT_BUDGET,
        tokenizer=None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer  # for calibration; found from the model's path if None
        self.adapter = adapter or get_adapter(model)
        self.budget_bytes = int(budget_bytes)
        self.lock = threading.RLock()
        self.progress = True  # tqdm bars for calibrated methods
        self._cache: OrderedDict[QuantPlan, dict[str, torch.Tensor]] = OrderedDict()
        self._sizes: dict[QuantPlan, int] = {}
        self._stamp: dict[str, tuple[int, int]] = {}
        self._targets: dict[QuantPlan, list[tuple[Target, QuantConfig]]] = {}
        self._checked: set[QuantPlan] = set()
        self._active: list[dict[str, torch.Tensor]] = []  # originals saved by each open block
        self._jobs: dict[QuantPlan, SharedJob] = {}  # running calibrated plans
        self._jobs_lock = threading.Lock()
        self.materializations = 0

    # checks -----------------------------------------------------------------------------------
    def check(self, plan: QuantPlan) -> None:
        """Raise ValueError if ``plan`` cannot run on this model: a layer it names that the model
        lacks, a group size a Linear's method cannot use (naming the Linear, the value and what
        would fit), configs of one method that cannot share a run. Cheap (no tensor work, done
        once per plan): call it when a plan is selected; ``materialize`` calls it first."""
        if plan in self._checked:
            return
        by_method: dict[Method, list[QuantConfig]] = {}
        for t, cfg in self.targets(plan):
            method = METHODS.get_method(cfg.method)
            method.check_group_size(cfg, t.in_features, t.name)
            by_method.setdefault(method, []).append(cfg)
        for method, cfgs in by_method.items():
            method.check_plan(cfgs)
        self._checked.add(plan)

    # cache ------------------------------------------------------------------------------------
    def _original(self, name: str, param: nn.Parameter) -> torch.Tensor:
        for saved in self._active:  # the outermost block that swapped it saved the original
            if name in saved:
                return saved[name]
        return param.data

    def _originals(self, plan: QuantPlan) -> list[tuple[Target, QuantConfig, torch.Tensor]]:
        return [(t, c, self._original(t.name, t.param)) for t, c in self.targets(plan)]

    def targets(self, plan: QuantPlan) -> list[tuple[Target, QuantConfig]]:
        """``targets(model, adapter, plan)``, memoized per plan (the module tree is fixed)."""
        if plan not in self._targets:
            self._targets[plan] = targets(self.model, self.adapter, plan)
        return self._targets[plan]

    def _check_stamps(self, items) -> None:
        """Drop every cached plan if an original weight was replaced or changed in place."""
        for t, _, w in items:
            stamp = _stamp(t, w)
            if self._stamp.setdefault(t.name, stamp) != stamp:
                self.clear()
                self._stamp = {t.name: _stamp(t, w) for t, _, w in items}
                return

    def materialize(
        self,
        plan: QuantPlan,
        cancel: threading.Event | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The plan's dequantized weights {name: tensor}, from the cache or computed now.

        ``check(plan)`` runs first. A plan with a calibrated method (GPTQ) runs off the lock
        (see the module docstring); ``on_progress(done, total)`` hears it from done=0 on, per
        decoder layer. Once ``cancel`` is set the call raises the method's ``Cancelled``
        (``GPTQCancelled``) at once and the run stops at its next layer unless another request
        still waits for it; a cancelled run caches nothing.
        """
        self.check(plan)
        while True:
            with self.lock:
                items = self._originals(plan)
                self._check_stamps(items)
                if plan in self._cache:
                    self._cache.move_to_end(plan)
                    self._evict()
                    return self._cache[plan]
                groups = by_method(items)
                if not any(m.calibrated for m in groups):
                    weights = {}
                    for method, its in groups.items():
                        weights.update(method.materialize(self._request(plan, its)))
                    return self._store(plan, weights, items)
                with self._jobs_lock:
                    job = self._jobs.get(plan)
                    if job is None or (job.finished and job.error is not None):
                        job = self._jobs[plan] = self._start_job(plan, items, groups)
                token = job.join(cancel, on_progress)
            try:
                weights = job.wait(token)  # off the lock
            except Cancelled:
                if cancel is not None and cancel.is_set():
                    raise
                continue  # cancelled by others just as we joined: run it again for us
            with self.lock:
                return self._store(plan, weights, items)

    def _request(self, plan, items, model=None, done=None, cancel=None, on_progress=None):
        return Request(
            model=self.model if model is None else model,
            adapter=self.adapter,
            plan=plan,
            items=items,
            done=done or {},
            tokenizer=self.tokenizer,
            cancel=cancel,
            on_progress=on_progress,
            progress=self.progress,
        )

    def _start_job(self, plan: QuantPlan, items, groups) -> SharedJob:
        """Under the lock: a private copy of the model, then the job that runs on it."""
        private = self._private_model()
        self._calibration_tokenizer()
        slow = [m for m in groups if m.calibrated]

        def work(cancel, progress) -> dict[str, torch.Tensor]:
            weights: dict[str, torch.Tensor] = {}
            for method, its in groups.items():
                req = self._request(plan, its, private, dict(weights), cancel, progress)
                weights.update(method.materialize(req))
            return weights

        def cancelled(last):
            where = f" before decoder layer {last[0]} of {last[1]}" if last else ""
            return slow[0].cancelled(f"{'+'.join(m.name for m in slow)} cancelled{where}")

        def abandon():
            with self._jobs_lock:
                if self._jobs.get(plan) is job:
                    del self._jobs[plan]

        job = SharedJob(work, cancelled, abandon, name=f"qviz {plan.label}")
        job.start()
        return job

    def _store(self, plan: QuantPlan, weights: dict[str, torch.Tensor], items):
        """Under the lock: cache ``weights`` (unless the originals changed since ``items``)."""
        with self._jobs_lock:
            self._jobs.pop(plan, None)
        if plan in self._cache:
            return self._cache[plan]
        if any(
            _stamp(t, w) != _stamp(t2, w2)
            for (t, _, w), (t2, _, w2) in zip(items, self._originals(plan), strict=True)
        ):
            return weights  # computed from weights that have since changed: not cached
        self.materializations += 1
        self._cache[plan] = weights
        self._sizes[plan] = sum(w.numel() * w.element_size() for w in weights.values())
        self._evict()
        return weights

    def _evict(self) -> None:
        """Drop least recently used plans while over budget (the newest one always stays)."""
        while len(self._cache) > 1 and sum(self._sizes.values()) > self.budget_bytes:
            old, _ = self._cache.popitem(last=False)
            del self._sizes[old]

    def _private_model(self) -> nn.Module:
        """A deep copy of the model whose parameters are new Parameters on the *original* weight
        tensors (shared, never copied: nobody writes to them); buffers and config are copied."""
        originals: dict[int, torch.Tensor] = {id(p): p.data for p in self.model.parameters()}
        for saved in reversed(self._active):  # the outermost block's saved tensors win
            for name, w in saved.items():
                originals[id(self.model.get_submodule(name).weight)] = w
        memo = {}
        for p in self.model.parameters():
            memo[id(p)] = nn.Parameter(originals[id(p)], requires_grad=p.requires_grad)
        return copy.deepcopy(self.model, memo)

    def clear(self) -> None:
        """Forget every materialized plan."""
        with self.lock:
            self._cache.clear()
            self._sizes.clear()

    def _calibration_tokenizer(self):
        from qviz.quant.calibrated import model_tokenizer

        self.tokenizer = model_tokenizer(self.model, self.tokenizer)
        return self.tokenizer

    # prefetch ---------------------------------------------------------------------------------
    def plan_bytes(self, plan: QuantPlan) -> int:
        """Bytes of ``plan``'s materialized weights (one tensor like each original it replaces)."""
        return sum(t.param.numel() * t.param.element_size() for t, _ in self.targets(plan))

    def prefetch(
        self,
        plans: Sequence[QuantPlan],
        cancel: threading.Event | None = None,
        then: Callable[[QuantPlan], object] | None = None,
        delay: float = 0.0,
    ) -> threading.Thread:
        """Materialize ``plans`` in order in a background thread and return it at once (started),
        after ``delay`` seconds (an idle pause: a ``cancel`` set meanwhile ends it at once).

        Speculative and polite: a plan is skipped if it fails ``check`` or has a calibrated
        method (GPTQ: minutes of every core). To make room within ``budget_bytes`` it evicts
        least recently used plans, never the plan in use (the most recently used one with
        weights when the thread starts) nor the ones this thread prefetched; it stops at the
        first plan that would not fit even so, and as soon as ``cancel`` is set (checked before
        each plan).
        Each plan is computed under the lock (one RTN plan: tens of ms) and enters the cache as
        its *least* recently used entry: a later plan evicts prefetched ones before the plan in
        use. ``then(plan)`` (optional) runs in the thread, outside the lock, after each plan
        whose weights are cached (already or now): more speculative work on those weights (e.g.
        the dashboard's comparison); a ``qviz.cancel.Cancelled`` from it ends the thread
        quietly. An error ends the thread quietly (``thread.error``); the plan is computed
        again on use.
        """
        plans = list(plans)
        keep: set[QuantPlan] = set()  # the plan in use, then the ones prefetched

        def room(nbytes: int) -> bool:
            """Evict old plans (none of ``keep``) until ``nbytes`` more fit; False: cannot."""
            free = self.budget_bytes - sum(self._sizes.values())
            old = [p for p in self._cache if p not in keep and self._sizes.get(p, 0) > 0]
            if free + sum(self._sizes[p] for p in old) < nbytes:
                return False
            for p in old:  # least recently used first
                if free >= nbytes:
                    break
                free += self._sizes.pop(p)
                del self._cache[p]
            return True

        def ready(plan: QuantPlan) -> bool | None:
            """Whether ``plan``'s weights are cached now; None: stop the thread."""
            try:
                self.check(plan)
            except ValueError:
                return False
            with self.lock:
                if any(METHODS.get_method(c.method).calibrated for _, c in self.targets(plan)):
                    return False
                keep.add(plan)
                if plan in self._cache:
                    return True
                if not room(self.plan_bytes(plan)):
                    return None
                self.materialize(plan)
                if plan in self._cache:
                    self._cache.move_to_end(plan, last=False)
                return plan in self._cache

        def work() -> None:
            if delay > 0 and (cancel or threading.Event()).wait(delay):
                return
            with self.lock:  # taken here, never in the caller's (e.g. a UI) thread
                keep.update([p for p in self._cache if self._sizes.get(p)][-1:])
            for plan in plans:
                if cancel is not None and cancel.is_set():
                    return
                try:
                    got = ready(plan)
                    if got is None:
                        return
                    if got and then is not None:
                        then(plan)
                except Cancelled:
                    return
                except Exception as err:  # noqa: BLE001 - speculative work: report, stop
                    thread.error = err
                    return

        thread = threading.Thread(target=work, name="qviz prefetch", daemon=True)
        thread.error = None
        thread.start()
        return thread

    @property
    def cached_plans(self) -> list[QuantPlan]:
        return list(self._cache)

    # swap -------------------------------------------------------------------------------------
    @contextmanager
    def quantized(self, plan: QuantPlan) -> Iterator[nn.Module]:
        """Swap ``plan``'s weights in for the block; restore the previous tensors on exit.

        The plan is materialized before the lock is taken, so a slow method's run does not
        block other threads (unless this thread already holds the lock)."""
        self.materialize(plan)
        with self.lock:
            weights = self.materialize(plan)
            params = {t.name: t.param for t, _ in self.targets(plan)}
            saved = {name: p.data for name, p in params.items()}
            self._active.append(saved)
            try:
                for name, p in params.items():
                    p.data = weights[name]
                yield self.model
            finally:
                for name, p in params.items():
                    p.data = saved[name]
                self._active.pop()


_ENGINES: weakref.WeakKeyDictionary[nn.Module, QuantEngine] = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(model: nn.Module) -> QuantEngine:
    """The one engine (and lock and cache) of ``model``."""
    with _ENGINES_LOCK:
        if model not in _ENGINES:
            _ENGINES[model] = QuantEngine(model)
        return _ENGINES[model]


@contextmanager
def quantized(model: nn.Module, plan: QuantPlan) -> Iterator[nn.Module]:
    """``with quantized(model, plan):`` runs the block on the quantized weights."""
    with engine_for(model).quantized(plan) as m:
        yield m


def release(model: nn.Module) -> None:
    """Forget ``model``'s shared engine and its cached plans, so the model can be freed (the
    engine holds the model, so the weak registry alone would keep it alive for ever)."""
    with _ENGINES_LOCK:
        engine = _ENGINES.pop(model, None)
    if engine is not None:
        engine.clear()
