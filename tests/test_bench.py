"""The attention benchmark runs end to end on small sizes (its numbers live in docs/, not here)."""

from __future__ import annotations

from sbm_transformer.bench import Case, Settings, measure_memory, run


def test_benchmark_smoke(tmp_path) -> None:
    out, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    rows = run(
        ["--sizes", "256", "512", "--edges-per-query", "8", "--densities", "0.05", "--rounds", "1",
         "--clusters", "8", "--no-memory", "--out", str(out), "--plot", str(plot)],
        log=lambda s: None,
    )  # fmt: skip
    assert len(rows) == 4
    assert all({"sparse", "sdpa", "dense", "sampling"} <= set(r.times) for r in rows)
    assert all(r.edges > 0 for r in rows)
    text = out.read_text()
    assert (
        "| 512 | 5% density |" in text
        and "## Targets" in text
        and "Density at initialisation" in text
    )
    assert plot.exists()


def test_memory_probe_measures_a_peak() -> None:
    peak = measure_memory(Case(512, density=0.1), Settings(clusters=8), "dense")
    assert peak > 512 * 512 * 2 * 4  # at least one dense (H, N, N) float32 tensor
