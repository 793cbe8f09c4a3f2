"""The attention benchmark runs end to end on small sizes (its numbers live in docs/, not here)."""

from __future__ import annotations

import pytest

from sbm_transformer.bench import Case, Settings, measure_memory, measure_scaling, run, time_case


def test_benchmark_smoke(tmp_path) -> None:
    out, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    rows = run(
        ["--sizes", "256", "512", "--edges-per-query", "8", "--densities", "0.05", "--rounds", "1",
         "--min-time", "0", "--clusters", "8", "--no-memory", "--out", str(out), "--plot",
         str(plot)],
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


def test_fast_cases_get_more_rounds_up_to_the_cap() -> None:
    """Rounds continue past the minimum until they took --min-time, never past --max-rounds."""
    case = Case(256, density=0.05)
    fixed = time_case(case, Settings(clusters=8, rounds=2, min_time=0.0), ["sdpa"], lambda s: None)
    assert fixed.rounds == 2
    capped = Settings(clusters=8, rounds=2, min_time=60.0, max_rounds=6)
    more = time_case(case, capped, ["sdpa"], lambda s: None)
    assert more.rounds == 6


def test_scaling_check_runs_its_rounds_side_by_side(monkeypatch) -> None:
    """The 16k/64k check (here 256/1024): one warm-up per size, then --scaling-rounds rounds in
    which the two sizes alternate; one ratio logged."""
    from sbm_transformer import bench

    calls: list[int] = []
    run_sbm = bench.Workload.run_sbm

    def counted(self: bench.Workload, backend: str) -> int:
        calls.append(self.case.n)
        return run_sbm(self, backend)

    monkeypatch.setattr(bench.Workload, "run_sbm", counted)
    logged: list[str] = []
    ratio, small, large = measure_scaling(
        Settings(clusters=8, scaling_rounds=3), 8, 256, 1024, logged.append
    )
    assert calls == [256, 1024] * 4
    assert small > 0 and large > 0 and ratio > 0
    assert len(logged) == 1 and "time(1024)/time(256)" in logged[0]


def test_sampler_runs_right_after_sparse_and_its_share_is_per_round(monkeypatch) -> None:
    """Each round runs the sampler right after the sparse method (which includes it); the
    sampling share is the median of the per-round ratios, not a ratio of medians."""
    from sbm_transformer import bench

    calls: list[str] = []
    fake = {"sparse": iter([1.0, 2.0, 4.0]), "sampling": iter([0.1, 1.0, 1.0])}  # seconds
    clock = [0.0]

    def method(self: bench.Workload, name: str):  # type: ignore[no-untyped-def]
        def run() -> int:
            calls.append(name)
            if len(calls) > 3:  # after the warm-up: advance a fake clock
                clock[0] += next(fake[name]) if name in fake else 0.0
            return 1

        return run

    monkeypatch.setattr(bench.Workload, "method", method)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    row = time_case(
        Case(256, density=0.05), Settings(clusters=8, rounds=3, min_time=0.0),
        ["sparse", "sdpa"], lambda s: None,
    )  # fmt: skip
    assert calls[:3] == ["sparse", "sampling", "sdpa"]
    assert calls[3:6] == ["sparse", "sampling", "sdpa"]
    assert row.times["sparse"] == pytest.approx(2.0) and row.times["sampling"] == pytest.approx(1.0)
    assert row.sampling_share == pytest.approx(0.25)  # per round 0.1, 0.5, 0.25 (not 1.0 / 2.0)
