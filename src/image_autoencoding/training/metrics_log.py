"""metrics.csv: one row per epoch, appended as each epoch ends, never a duplicate epoch."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def keep_epochs_up_to(self, epoch: int) -> None:
        """On resume: drop rows written after the checkpoint we continue from."""
        rows = [row for row in self.rows() if int(row["epoch"]) <= epoch]
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        self._write(list(rows[0].keys()), rows)

    def append(self, row: dict[str, float | int]) -> None:
        formatted = {key: _format(value) for key, value in row.items()}
        existing = self.rows()
        if existing and list(existing[0].keys()) != list(formatted.keys()):
            # A column was added since the file was started: rewrite with the union of columns.
            fields = list(dict.fromkeys([*existing[0].keys(), *formatted.keys()]))
            self._write(fields, [*existing, formatted])
            return
        new_file = not existing
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(formatted.keys()))
            if new_file:
                writer.writeheader()
            writer.writerow(formatted)

    def _write(self, fields: list[str], rows: list[dict[str, str]]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)


def _format(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
