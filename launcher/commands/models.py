"""`segjobs models`: every registered variant and its parameter count."""

from __future__ import annotations

import json

import torch

import models


def model_table() -> list[dict[str, int | str]]:
    """One row per variant; models are built on the meta device, so no memory is allocated."""
    rows = []
    for entry in models.entries():
        with torch.device("meta"):
            model = entry.build()
        rows.append(models.parameter_counts(entry.name, model))
    return rows


def show(as_json: bool) -> int:
    rows = model_table()
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="segjobs models")
    for column in ("name", "family", "params", "backbone", "head"):
        table.add_column(column, justify="right" if column not in ("name", "family") else "left")
    for row in rows:
        extra = [f"{row[k]:,}" if k in row else "" for k in ("backbone_params", "head_params")]
        table.add_row(str(row["name"]), str(row["family"]), f"{row['params']:,}", *extra)
    Console().print(table)
    return 0
