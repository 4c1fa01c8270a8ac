"""How benchmark figures are presented, shared by every section of the report: number formats,
Markdown tables, PNG figures, and a performance target's row (PASS, FAIL with how far off, NOT RUN)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tandem.util import atomic_write_path


def fmt(value, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def sig(value, unit: str = "") -> str:
    """Three significant figures, for quantities spanning many orders of magnitude."""
    return "-" if value is None else f"{value:.3g}{unit}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


@dataclass
class Target:
    id: str
    description: str
    threshold: float
    comparison: str  # ">=", ">" or "<="
    unit: str  # "x" (ratio), "%" or "" (a count)
    value: float | None = None
    status: str = "NOT RUN"  # PASS | FAIL | NOT RUN
    detail: str = ""

    def evaluate(self, value: float | None, detail: str, missing: str = "") -> "Target":
        self.detail = detail if value is not None else missing
        if value is None:
            self.status = "NOT RUN"
            return self
        self.value = float(value)
        ok = {">=": value >= self.threshold, ">": value > self.threshold, "<=": value <= self.threshold}[self.comparison]
        self.status = "PASS" if ok else "FAIL"
        return self

    @property
    def shortfall(self) -> str:
        """How far a FAIL is from the threshold, in the target's own terms."""
        if self.status != "FAIL" or self.value is None:
            return ""
        scale = 100.0 if self.unit == "%" else 1.0
        got, need = self.value * scale, self.threshold * scale
        suffix = self.unit
        if not self.threshold:
            return f"{got:g}{suffix} against {need:g}{suffix}"
        if self.comparison in (">=", ">"):
            rel = (self.threshold - self.value) / self.threshold * 100
            return f"missed by {need - got:.2f}{suffix} ({rel:.0f}% short of {need:g}{suffix})"
        rel = (self.value - self.threshold) / self.threshold * 100
        return f"missed by {got - need:.2f}{suffix} ({rel:.0f}% over {need:g}{suffix})"

    def line(self) -> str:
        scale = 100.0 if self.unit == "%" else 1.0
        suffix = self.unit
        value = f"{self.value * scale:.2f}{suffix}" if self.value is not None else "-"
        head = f"**{self.status}** {self.description}: {value} (target {self.comparison} {self.threshold * scale:g}{suffix})"
        tail = "; ".join(x for x in (self.shortfall, self.detail) if x)
        return f"{head}. {tail}" if tail else head

    def as_dict(self) -> dict:
        """As results.json and `--json` carry it: a ``%`` target's value and threshold in percent, as
        displayed (0.5 of the roofline is ``"value": 50.0, "unit": "%"``); ratios and counts as they are."""
        data = {**asdict(self), "shortfall": self.shortfall, "line": self.line()}
        if self.unit == "%":
            data["value"] = None if self.value is None else round(self.value * 100, 4)
            data["threshold"] = round(self.threshold * 100, 4)
        return data

    def not_judged(self, why: str) -> "Target":
        """NOT RUN: measured, but not in a way this target can be judged on (its figure kept in the detail)."""
        if self.value is not None:
            scale = 100.0 if self.unit == "%" else 1.0
            why += f" (measured {self.value * scale:.2f}{self.unit}, not judged)"
        self.value, self.status = None, "NOT RUN"
        self.detail = f"{why}; {self.detail}" if self.detail else why
        return self
