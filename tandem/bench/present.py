"""How benchmark figures are presented, shared by every section of the report: number formats,
Markdown tables, PNG figures, and a performance target's row (PASS, FAIL with how far off,
UNSTABLE when its interleaved rounds straddle the threshold, NOT RUN)."""

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


COMPARE = {">=": lambda v, t: v >= t, ">": lambda v, t: v > t, "<=": lambda v, t: v <= t}


def judge(value: float, threshold: float, comparison: str, spread: tuple[float, float] | None = None) -> str:
    """PASS or FAIL for a single figure; for a ratio measured in rounds, PASS only when its whole
    spread passes, FAIL only when its whole spread fails, UNSTABLE when the spread straddles the
    threshold (the rounds disagree, so this run cannot say)."""
    ok = COMPARE[comparison]
    if spread is None:
        return "PASS" if ok(value, threshold) else "FAIL"
    low, high = spread
    passes = [ok(low, threshold), ok(high, threshold), ok(value, threshold)]
    if all(passes):
        return "PASS"
    if not any(passes):
        return "FAIL"
    return "UNSTABLE"


@dataclass
class Target:
    id: str
    description: str
    threshold: float
    comparison: str  # ">=", ">" or "<="
    unit: str  # "x" (ratio), "%" or "" (a count)
    value: float | None = None  # a ratio measured in rounds: the median of the round ratios
    status: str = "NOT RUN"  # PASS | FAIL | UNSTABLE | NOT RUN
    detail: str = ""
    spread: tuple[float, float] | None = None  # 10-90% interval of the round ratios (rounds only)
    rounds: int | None = None  # how many interleaved rounds gave the ratio
    round_seconds: float | None = None  # the wall time those rounds took
    unstable: str = ""  # why an UNSTABLE target gives no verdict (how many rounds passed)
    spread_of: str = ""  # what the spread is over, when not interleaved rounds (e.g. a bootstrap)

    def evaluate(self, value, detail: str, missing: str = "") -> "Target":
        """``value``: a figure, a :class:`tandem.bench.rounds.Ratio` (judged on its spread) or None
        (NOT RUN, ``missing`` says why)."""
        from tandem.bench.rounds import Ratio

        self.detail = detail if value is not None else missing
        if value is None:
            self.status = "NOT RUN"
            return self
        per_round: list[float] = []
        if isinstance(value, Ratio):
            self.spread, self.rounds, self.round_seconds = (value.low, value.high), value.rounds, value.wall_s
            per_round, value = value.per_round, value.median
        self.value = float(value)
        self.status = judge(self.value, self.threshold, self.comparison, self.spread)
        if self.status == "UNSTABLE":
            passing = sum(COMPARE[self.comparison](v, self.threshold) for v in per_round)
            self.unstable = (
                f"{passing} of {len(per_round)} rounds on the passing side: the spread straddles the threshold, so this run "
                "gives no verdict: the figure is within its round-to-round noise of the threshold. More rounds do not "
                "narrow a 10-90% interval of rounds, a quieter host does; a figure that stays this close needs the "
                "code to move it, not another run"
            )
        return self

    def _scaled(self, v: float) -> str:
        scale = 100.0 if self.unit == "%" else 1.0
        return f"{v * scale:.2f}{self.unit}"

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

    @property
    def measured(self) -> str:
        """The figure as a line shows it: ``1.23x``, or ``1.23x median of 8 rounds (10-90%: 1.10-1.35x, 12.3 s)``."""
        if self.value is None:
            return "-"
        if self.spread is None:
            return self._scaled(self.value)
        if self.spread_of:
            return f"{self._scaled(self.value)} (10-90% over {self.spread_of}: {self._scaled(self.spread[0])}-{self._scaled(self.spread[1])})"
        rounds = self.rounds or 0
        return (
            f"{self._scaled(self.value)} median of {rounds} round{'s' * (rounds != 1)} (10-90%: "
            f"{self._scaled(self.spread[0])}-{self._scaled(self.spread[1])}"
            + (f", {self.round_seconds:.1f} s" if self.round_seconds is not None else "") + ")"
        )

    def line(self) -> str:
        scale = 100.0 if self.unit == "%" else 1.0
        suffix = self.unit
        head = f"**{self.status}** {self.description}: {self.measured} (target {self.comparison} {self.threshold * scale:g}{suffix})"
        tail = "; ".join(x for x in (self.shortfall, self.unstable if self.status == "UNSTABLE" else "", self.detail) if x)
        return f"{head}. {tail}" if tail else head

    def as_dict(self) -> dict:
        """As results.json and `--json` carry it: a ``%`` target's value and threshold in percent, as
        displayed (0.5 of the roofline is ``"value": 50.0, "unit": "%"``); ratios and counts as they are."""
        data = {**asdict(self), "shortfall": self.shortfall, "line": self.line()}
        data["median"] = self.value if self.spread is not None else None
        data["spread"] = list(self.spread) if self.spread is not None else None
        if self.unit == "%":
            pct = lambda v: None if v is None else round(v * 100, 4)  # noqa: E731
            data["value"], data["median"] = pct(self.value), pct(data["median"])
            data["threshold"] = round(self.threshold * 100, 4)
            data["spread"] = [pct(v) for v in self.spread] if self.spread is not None else None
        return data

    def not_judged(self, why: str) -> "Target":
        """NOT RUN: measured, but not in a way this target can be judged on (its figure kept in the detail)."""
        if self.value is not None:
            why += f" (measured {self.measured}, not judged)"
        self.value, self.status, self.spread, self.round_seconds = None, "NOT RUN", None, None
        self.detail = f"{why}; {self.detail}" if self.detail else why
        return self
