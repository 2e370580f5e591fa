"""The sweep results view: a ``qviz sweep --out`` file (JSONL or Parquet) as the heatmaps and
the memory-quality Pareto chart of :mod:`qviz.views.sweep_plots`, in a Panel tab.

A missing, unreadable or corrupt file is a message in the page, never a traceback.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pandas as pd
import panel as pn

from qviz.views.sweep_plots import sweep_heatmaps, sweep_pareto

# the columns every row of a sweep has (qviz.sweep.KEY_COLUMNS; the views floor sits below it)
REQUIRED = ("model", "method", "bits", "group_size", "plan")
QUALITIES = ("perplexity", "facts", "cka")
DEFAULT_OUT = os.environ.get("QVIZ_SWEEP_OUT", "sweep.jsonl")


class SweepFileError(ValueError):
    """A sweep results file that cannot be shown; the message names the file and the fault."""


def load_sweep(path: str | os.PathLike) -> pd.DataFrame:
    """The rows of a sweep's ``--out`` file as a frame (one row per cell).

    JSONL (one object per line; a torn last line, from a killed run, is skipped) or Parquet
    (``.parquet``). Raises SweepFileError naming the file and what is wrong: missing, a folder,
    empty, a line that is not a JSON object, an unreadable Parquet file, missing columns.
    """
    p = Path(str(path).strip()).expanduser()
    if not str(path).strip():
        raise SweepFileError("no file given: type the path of a `qviz sweep --out` file")
    if not p.exists():
        raise SweepFileError(f"{p}: no such file (write one with `qviz sweep --out {p.name}`)")
    if p.is_dir():
        raise SweepFileError(f"{p} is a folder: give the JSONL or Parquet file inside it")
    if p.suffix == ".parquet":
        try:
            frame = pd.read_parquet(p)
        except ImportError:
            raise SweepFileError(
                f"{p}: not a readable Parquet file here: reading Parquet needs pyarrow "
                "(pip install pyarrow), or write the sweep as .jsonl"
            ) from None
        except Exception as err:
            raise SweepFileError(
                f"{p}: not a readable Parquet file ({type(err).__name__}: {err})"
            ) from None
    else:
        frame = pd.DataFrame(_jsonl_rows(p))
    if frame.empty:
        raise SweepFileError(f"{p}: no rows (an empty sweep file)")
    missing = [c for c in REQUIRED if c not in frame]
    if missing:
        raise SweepFileError(
            f"{p}: not a qviz sweep file: no column {', '.join(map(repr, missing))} "
            f"(a sweep row has {', '.join(REQUIRED)} and one column per metric)"
        )
    if "error" not in frame:
        frame["error"] = None
    try:
        frame["bits"] = frame["bits"].astype(int)
    except (TypeError, ValueError):
        raise SweepFileError(f"{p}: the bits column holds non-integers") from None
    return frame


def _jsonl_rows(p: Path) -> list[dict]:
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SweepFileError(f"{p}: not a text file (JSONL expected, or a .parquet name)") from None
    rows = []
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    for k, (i, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(numbered) - 1 and rows:  # a torn last line: the run was killed
                break
            raise SweepFileError(f"{p}: line {i} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise SweepFileError(f"{p}: line {i} is not a JSON object")
        rows.append(row)
    return rows


def summary(frame: pd.DataFrame, path: str | os.PathLike) -> str:
    """One line: the file, cells, errors, models and methods."""
    errors = int(frame["error"].notna().sum())
    models = ", ".join(dict.fromkeys(frame["model"]))
    methods = ", ".join(dict.fromkeys(frame["method"]))
    return f"{Path(path).name}: {len(frame)} cells ({errors} errors); models {models}; {methods}"


class FileTab(pn.viewable.Viewer):
    """A results file's tab: a path box, a Load button and a message line above what the file
    shows. ``load`` reads it (``read``), draws it (``show``) and says ``summary``, or says why
    not (the reader's ``file_error`` as it words it, anything else as "cannot show") and
    ``clear``s. Subclasses build their own widgets, then call ``load_if_there``."""

    file_error: type[Exception] = ValueError

    def __init__(self, path: str | None, default: str, label: str, css: str, **params) -> None:
        super().__init__(**params)
        self.frame: pd.DataFrame | None = None
        self.path_input = pn.widgets.TextInput(
            name=label, value=path or default, width=420, css_classes=[f"{css}-path"]
        )
        self.load_button = pn.widgets.Button(name="Load", button_type="primary", align="end")
        self.load_button.on_click(lambda _e: self.load())
        self.path_input.param.watch(lambda _e: self.load(), "enter_pressed")
        self.message = pn.pane.HTML("", css_classes=[f"{css}-message"], width=900)

    def load_if_there(self) -> None:
        """Load the path in the box if it names a file (the default output, say)."""
        if Path(self.path_input.value).expanduser().is_file():
            self.load()

    def load(self, path: str | None = None) -> bool:
        """Read ``path`` (else the typed one) and show it; False (and a message) when it fails."""
        if path is not None:
            self.path_input.value = path
        path = self.path_input.value
        try:
            self.frame = self.read(path)
            self.show(self.frame)
        except self.file_error as err:
            return self._fail(str(err))
        except Exception as err:  # anything else the reader or the figures raise: a message
            return self._fail(f"{path}: cannot show ({type(err).__name__}: {err})")
        self.message.object = _line(self.summary(self.frame, path), "qviz-sweep-summary")
        return True

    def _fail(self, msg: str) -> bool:
        self.frame = None
        self.message.object = _line(msg, "qviz-sweep-error")
        self.clear()
        return False

    def read(self, path: str) -> pd.DataFrame:
        raise NotImplementedError

    def show(self, frame: pd.DataFrame) -> None:
        raise NotImplementedError

    def summary(self, frame: pd.DataFrame, path: str) -> str:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError


class SweepTab(FileTab):
    """Load a sweep results file; show its heatmaps (one model, one plan) and Pareto chart."""

    file_error = SweepFileError

    def __init__(self, path: str | None = None, **params) -> None:
        label = "Sweep results file (qviz sweep --out)"
        super().__init__(path, DEFAULT_OUT, label, "qviz-sweep", **params)
        w = pn.widgets
        self.model_select = w.Select(name="Model (heatmaps)", options=[], width=200)
        self.plan_select = w.Select(name="Plan (heatmaps)", options=[], width=200)
        self.quality_select = w.Select(name="Quality (Pareto)", options=[], width=200)
        for sel in (self.model_select, self.plan_select, self.quality_select):
            sel.param.watch(lambda _e: self.render(), "value")
        self.heatmaps = pn.Column()
        self.pareto = pn.Column()
        self._rendering = False
        self.load_if_there()

    read = staticmethod(load_sweep)
    summary = staticmethod(summary)

    def show(self, frame: pd.DataFrame) -> None:
        """Set the pickers to the frame's models, plans and qualities (keeping valid choices),
        then draw once."""
        self._rendering = True  # one render after the selectors are set
        try:
            for sel, options in (
                (self.model_select, list(dict.fromkeys(frame["model"]))),
                (self.plan_select, list(dict.fromkeys(frame["plan"]))),
                (self.quality_select, [q for q in QUALITIES if q in frame]),
            ):
                keep = sel.value if sel.value in options else None
                sel.options = options
                sel.value = keep if keep is not None else (options[0] if options else None)
        finally:
            self._rendering = False
        self.render()

    def render(self) -> None:
        """Draw the figures of the loaded frame for the selected model, plan and quality."""
        if self._rendering or self.frame is None:
            return
        frame = self.frame
        one = frame[frame["model"] == self.model_select.value] if self.model_select.value else frame
        try:
            self.heatmaps[:] = [pn.pane.Bokeh(sweep_heatmaps(one, self.plan_select.value))]
        except Exception as err:
            self.heatmaps[:] = [_alert(f"heatmaps: {type(err).__name__}: {err}")]
        quality = self.quality_select.value
        if quality is None:
            self.pareto[:] = [_alert("no quality column (perplexity, facts or cka) to chart")]
            return
        try:
            self.pareto[:] = [pn.pane.Bokeh(sweep_pareto(frame, quality=quality))]
        except ValueError as err:  # e.g. the sweep has no mib column
            self.pareto[:] = [_alert(f"Pareto chart: {err}")]

    def clear(self) -> None:
        self.heatmaps[:] = []
        self.pareto[:] = []

    def __panel__(self):
        controls = pn.Row(self.path_input, self.load_button)
        pickers = pn.Row(self.model_select, self.plan_select, self.quality_select)
        return pn.Column(controls, self.message, pickers, self.heatmaps, self.pareto)


def _line(msg: str, css: str) -> str:
    style = (
        "color:#842029;background:#f8d7da;border:1px solid #f5c2c7;padding:8px;border-radius:4px"
        if css == "qviz-sweep-error"
        else ""
    )
    return f'<div class="{css}" style="{style};white-space:pre-wrap">{html.escape(msg)}</div>'


def _alert(msg: str):
    return pn.pane.HTML(_line(msg, "qviz-sweep-error"))
