"""A sweep's rows: one per cell, streamed to JSONL or Parquet as they finish, read back."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from qviz.sweep.grid import KEY_COLUMNS, Cell


def _row(cell: Cell, values: dict, error: str | None = None, seconds: float = 0.0) -> dict:
    row = {k: getattr(cell, k) for k in KEY_COLUMNS}
    row.update({m: values.get(m) for m in cell.metrics})
    row.update(
        plan_label=cell.plan_label,
        key=cell.key,
        error=error,
        seconds=round(seconds, 3),
        worker=f"{os.uname().nodename}:{os.getpid()}",
    )
    return row


# output ---------------------------------------------------------------------------------------
def read_rows(out: str | os.PathLike) -> list[dict]:
    """The rows of a sweep's output file (a torn last JSONL line, from a kill, is skipped)."""
    path = Path(out)
    if not path.exists():
        return []
    if path.suffix == ".parquet":
        return pd.read_parquet(path).to_dict("records")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RowWriter:
    """Appends each finished row to ``path`` at once: a JSONL line (flushed and fsynced), or the
    whole Parquet file rewritten through a temporary file and an atomic rename."""

    def __init__(self, path: str | os.PathLike | None, keep: list[dict]) -> None:
        self.path = None if path is None else Path(path)
        self.rows = list(keep)
        if self.path is not None:
            if self.path.suffix == ".parquet":
                try:
                    import pyarrow  # noqa: F401
                except ImportError:
                    raise ValueError(
                        f"--out {self.path}: Parquet output needs pyarrow (pip install "
                        "pyarrow); or name a .jsonl file"
                    ) from None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.path.suffix == ".parquet":
            pd.DataFrame(self.rows).to_parquet(tmp, index=False)
        else:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is None:
            return
        if self.path.suffix == ".parquet":
            self._rewrite()
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _clean(row: dict) -> dict:
    """JSON-safe values (NaN perplexity -> None)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    return {**row, **dict.fromkeys(bad)}
