"""The issue's performance targets, evaluated on one run's figures: PASS, FAIL (with how far off)
or NOT RUN (with why). Ratios always compare figures measured in the same run."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Target:
    id: str
    description: str
    threshold: float
    comparison: str  # ">=" or "<="
    unit: str  # "x" (ratio) or "%"
    value: float | None = None
    status: str = "NOT RUN"  # PASS | FAIL | NOT RUN
    detail: str = ""

    def evaluate(self, value: float | None, detail: str, missing: str = "") -> "Target":
        self.detail = detail if value is not None else missing
        if value is None:
            self.status = "NOT RUN"
            return self
        self.value = float(value)
        ok = value >= self.threshold if self.comparison == ">=" else value <= self.threshold
        self.status = "PASS" if ok else "FAIL"
        return self

    @property
    def shortfall(self) -> str:
        """How far a FAIL is from the threshold, in the target's own terms."""
        if self.status != "FAIL" or self.value is None:
            return ""
        scale = 100.0 if self.unit == "%" else 1.0
        got, need = self.value * scale, self.threshold * scale
        suffix = "%" if self.unit == "%" else "x"
        if self.comparison == ">=":
            rel = (self.threshold - self.value) / self.threshold * 100
            return f"missed by {need - got:.2f}{suffix} ({rel:.0f}% short of {need:g}{suffix})"
        rel = (self.value - self.threshold) / self.threshold * 100
        return f"missed by {got - need:.2f}{suffix} ({rel:.0f}% over {need:g}{suffix})"

    def line(self) -> str:
        scale = 100.0 if self.unit == "%" else 1.0
        suffix = "%" if self.unit == "%" else "x"
        value = f"{self.value * scale:.2f}{suffix}" if self.value is not None else "-"
        head = f"**{self.status}** {self.description}: {value} (target {self.comparison} {self.threshold * scale:g}{suffix})"
        tail = "; ".join(x for x in (self.shortfall, self.detail) if x)
        return f"{head}. {tail}" if tail else head

    def as_dict(self) -> dict:
        return {**asdict(self), "shortfall": self.shortfall, "line": self.line()}


def _p50(results: dict, runtime: str, graph: str, batch: int = 1) -> float | None:
    try:
        return results["stages"][runtime][graph]["batches"][str(batch)]["p50_ms"]
    except KeyError:
        return None


def evaluate_targets(results: dict) -> list[Target]:
    targets = []

    for tid, graph, label, threshold in (
        ("ort_decode_speedup", "reasoning_decode", "decode step", 2.0),
        ("ort_refinement_speedup", "refinement", "refinement", 1.3),
    ):
        eager, ort = _p50(results, "torch", graph), _p50(results, "onnxruntime", graph)
        detail = f"p50 {eager:.3f} ms eager vs {ort:.3f} ms ONNX Runtime" if eager and ort else ""
        variant = _p50(results, "onnxruntime_all", graph)
        if detail and variant:
            detail += f" (with ORT_ENABLE_ALL at load, not shipped: {variant:.3f} ms, {eager / variant:.2f}x)"
        t = Target(tid, f"ONNX Runtime {label} vs eager PyTorch, batch 1", threshold, ">=", "x")
        targets.append(t.evaluate(eager / ort if eager and ort else None, detail, "needs both the torch and onnxruntime runtimes"))

    positions = results.get("decode_positions", {}).get("onnxruntime", {})
    t = Target("decode_flat", "decode cost per token at position 256 vs position 16 (ONNX Runtime)", 1.5, "<=", "x")
    if "p50_ms" in positions.get("256", {}) and "p50_ms" in positions.get("16", {}):
        a, b = positions["16"]["p50_ms"], positions["256"]["p50_ms"]
        t.evaluate(b / a, f"p50 {b:.3f} ms at 256 vs {a:.3f} ms at 16")
    else:
        t.evaluate(None, "", f"positions measured: {sorted(map(int, positions)) or 'none'} (max_len too small for 256?)")
    targets.append(t)

    served = results.get("served", {})
    ok = served.get("status") == "ok"
    inproc = served.get("inprocess", {}).get("latency", {}).get("p50_ms") if ok else None
    for protocol in ("http", "grpc"):
        levels = served.get("protocols", {}).get(protocol, {}) if ok else {}
        absent = f"not run: {protocol} not among the protocols measured" if ok and protocol not in served.get("protocols", {}) else None
        c1 = levels.get("1", {})
        p50 = c1.get("latency", {}).get("p50_ms")
        t = Target(
            f"served_overhead_{protocol}",
            f"served ensemble ({protocol.upper()}) vs in-process ONNX Runtime pipeline, concurrency 1, p50 latency",
            1.10,
            "<=",
            "x",
        )
        targets.append(
            t.evaluate(
                p50 / inproc if p50 and inproc else None,
                f"p50 {p50:.1f} ms served vs {inproc:.1f} ms in-process" if p50 and inproc else "",
                served.get("status", "not run") if not ok else absent or f"no {protocol} level at concurrency 1",
            )
        )
        c8 = levels.get("8", {})
        r1, r8 = c1.get("images_per_s"), c8.get("images_per_s")
        t = Target(
            f"served_scaling_{protocol}",
            f"served throughput ({protocol.upper()}) at concurrency 8 vs concurrency 1",
            2.5,
            ">=",
            "x",
        )
        targets.append(
            t.evaluate(
                r8 / r1 if r1 and r8 else None,
                f"{r8:.2f} vs {r1:.2f} images/s" if r1 and r8 else "",
                served.get("status", "not run") if not ok else absent or f"no {protocol} levels at concurrency 1 and 8",
            )
        )

    # CPU int8: the decode step's speed-up over fp32 in the same run, and the gate's token agreement.
    fp32, int8 = _p50(results, "onnxruntime", "reasoning_decode"), _p50(results, "onnxruntime_int8", "reasoning_decode")
    t = Target("cpu_int8_decode_speedup", "int8 decode step vs fp32 (ONNX Runtime CPU), batch 1, p50", 1.5, ">=", "x")
    targets.append(
        t.evaluate(
            fp32 / int8 if fp32 and int8 else None,
            f"p50 {fp32:.3f} ms fp32 vs {int8:.3f} ms int8" if fp32 and int8 else "",
            "needs the onnxruntime runtime and a cpu int8 build (tandem build --target cpu --precision int8)",
        )
    )
    generation = (results.get("precision", {}).get("onnxruntime_int8") or {}).get("generation") or {}
    t = Target("cpu_int8_token_agreement", "int8 greedy tokens equal to fp32's (held-out captions, teacher-forced positions)", 0.98, ">=", "%")
    targets.append(
        t.evaluate(
            generation.get("token_agreement"),
            f"{generation.get('agreeing_positions')} of {generation.get('positions')} positions over "
            f"{generation.get('captions')} captions (the build's precision gate)" if generation else "",
            "no cpu int8 build measured",
        )
    )

    best = results.get("roofline", {}).get("refinement_best")
    variant = results.get("roofline", {}).get("refinement_best_variant")
    t = Target("refinement_peak", "refinement achieved FLOP/s vs measured matmul peak", 0.5, ">=", "%")
    detail = ""
    if best:
        detail = (
            f"{best['achieved_gflops']:.1f} GFLOP/s ({best['runtime']}, batch {best['batch']}) vs "
            f"{best['peak_gflops']:.1f} GFLOP/s peak"
        )
        if variant:
            detail += (
                f" (not shipped: {variant['runtime']} reaches {100 * variant['fraction_of_matmul_peak']:.0f}% "
                f"at batch {variant['batch']})"
            )
    targets.append(t.evaluate(best["fraction_of_matmul_peak"] if best else None, detail, "roofline not measured"))
    return targets
