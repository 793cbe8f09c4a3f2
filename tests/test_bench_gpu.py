"""The GPU benchmark's code on the CPU (its figures come from a GPU: docs/benchmarks-gpu.md) and
the GPU check script's syntax and dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sbm_transformer import Graph
from sbm_transformer.bench import Case, Settings, run
from sbm_transformer.bench_gpu import (
    GpuOptions,
    GpuRow,
    Planner,
    block_occupancy,
    expand_occupancy,
    graph_block_mask,
    nominal_bandwidth,
    order_cases,
    targets,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_check_dry_run_plans_without_a_gpu(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, SBMT_GPU_OUT=str(tmp_path))
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "plan: N= 131072" in done.stdout and "phase setup" in done.stdout
    plan = (ROOT / "build" / "gpu-check" / "benchmarks-gpu-dry.md").read_text()
    assert "Not measured yet" in plan and "| 131,072 | 5% density |" in plan


def test_cuda_suite_runs_on_the_cpu(tmp_path: Path) -> None:
    """The GPU suite's code path (--suite gpu) at small N: arms that need CUDA are skipped with
    a note; the others report times, edges and memory; the report has its sections."""
    out, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    rows = run(
        ["--suite", "gpu", "--device", "cpu", "--dtype", "float32", "--sizes", "256",
         "--edges-per-query", "8", "--densities", "0.05", "--clusters", "8", "--arms",
         "sbm-triton", "sbm-torch", "sampling", "sdpa-flash", "sdpa", "flex", "--rounds", "1",
         "--min-time", "0", "--out", str(out), "--json", str(js)],
        log=lambda s: None,
    )  # fmt: skip
    by = {(r.case.label, r.arm): r for r in rows if isinstance(r, GpuRow)}
    assert len(by) == 12
    for label in ("8 edges/query", "5% density"):
        assert "CUDA" in by[label, "sbm-triton"].note and not by[label, "sbm-triton"].measured
        assert "CUDA" in by[label, "sdpa-flash"].note
        torch_arm = by[label, "sbm-torch"]
        assert torch_arm.fwd and torch_arm.bwd and torch_arm.step and torch_arm.edges > 0
        assert torch_arm.kv_bytes == torch_arm.edges * 2 * 64 * 4
        assert by[label, "sampling"].fwd and by[label, "sdpa"].step
        flex = by[label, "flex"]
        assert flex.fwd and flex.step is None and "forward only" in flex.note
        assert flex.blocks == 1.0 and flex.err is not None and flex.err < 1e-5
    text = out.read_text()
    assert "## Targets" in text and "| 256 | 5% density |" in text and "not measured" in text
    assert len(json.loads(js.read_text())) == 12


def test_block_mask_holds_the_blocks_with_edges() -> None:
    """Occupancy from the CSR graph equals the block-reduced dense mask; FlexAttention with the
    block mask equals SDPA with the dense mask of those whole blocks."""
    torch.manual_seed(0)
    b, h, n, block = 1, 2, 300, 128  # 3 x 3 blocks, the last ones partial
    dense = torch.zeros(b, h, n, n, dtype=torch.bool)
    dense[..., 0, 0] = dense[..., 130, 5] = dense[..., 260, 299] = True  # each block row
    dense[0, 0, 3, 200] = dense[0, 1, 140, 140] = dense[0, 1, 141, 140] = True
    graph = Graph.from_dense(dense)
    occupied = block_occupancy(graph, block, chunk=7)  # several chunks
    pad = torch.zeros(b, h, 384, 384, dtype=torch.bool)
    pad[..., :n, :n] = dense
    assert torch.equal(occupied, pad.view(b, h, 3, block, 3, block).any(-1).any(-2))
    assert not occupied.all()
    q, k, v = (torch.randn(b, h, n, 16) for _ in range(3))
    from torch.nn.attention.flex_attention import flex_attention

    mask = graph_block_mask(graph, block, exact_mask_mod=True)
    with warnings.catch_warnings(), torch.no_grad():  # uncompiled on the CPU (warns once)
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=expand_occupancy(occupied, block, n, n))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_nominal_bandwidth_by_name_and_override() -> None:
    assert nominal_bandwidth("NVIDIA H100 80GB HBM3", {})[0] == 3.35e12
    assert nominal_bandwidth("NVIDIA H100 PCIe", {})[0] == 2.0e12
    assert nominal_bandwidth("NVIDIA H200", {})[0] == 4.8e12
    assert nominal_bandwidth("NVIDIA GH200 480GB", {})[0] == 4.0e12
    assert nominal_bandwidth("NVIDIA A100-SXM4-80GB", {})[0] == 2.039e12
    assert nominal_bandwidth("NVIDIA A100-SXM4-40GB", {})[0] == 1.555e12
    assert nominal_bandwidth("Some GPU", {})[0] is None
    value, source = nominal_bandwidth("NVIDIA H200", {"SBMT_GPU_BANDWIDTH_TBPS": "4.1"})
    assert value == pytest.approx(4.1e12) and "SBMT_GPU_BANDWIDTH_TBPS" in source


def _row(n: int, arm: str, **kw: float) -> GpuRow:
    label = kw.pop("epq", None)
    case = Case(n, edges_per_query=label) if label else Case(n, density=0.01)
    return GpuRow(case, arm, edges=1000, **kw)  # type: ignore[arg-type]


def test_targets_pass_fail_and_not_measured() -> None:
    bw = 1e12
    rows = [
        _row(16384, "sbm-triton", fwd=1e-3, bwd=2e-3, step=4e-3, kv_bytes=0.6e9),
        _row(16384, "sdpa-flash", fwd=4e-3, bwd=8e-3, step=10e-3),
        _row(16384, "sbm-torch", fwd=20e-3, bwd=40e-3, step=30e-3, kv_bytes=0.6e9),
        _row(131072, "sbm-triton", epq=32, fwd=1e-3, bwd=4e-3, step=6e-3, peak_bytes=2**30),
    ]
    got = {goal: (measured, verdict) for goal, measured, verdict in targets(rows, bw)}
    verdicts = [v for _, v in got.values()]
    assert verdicts == ["PASS", "FAIL", "PASS", "PASS", "FAIL"]  # bwd 4x fwd; torch only 7.5x
    assert targets(rows, None)[0][2] == "not measured"
    none = targets([_row(16384, "sbm-triton", note="backend unknown")], bw)  # type: ignore[arg-type]
    assert all(v.startswith("not measured") for _, _, v in none)
    assert "backend unknown" in none[0][2]


def test_planner_skips_by_memory_time_and_failures() -> None:
    s = Settings(heads=2, head_dim=64, clusters=128)
    planner = Planner(GpuOptions(memory_limit=64 * 2**30, arm_cap=10.0))
    big = Case(131072, density=0.05)
    assert "est. memory" in (planner.skip("sbm-torch", big, s, 1.7e9) or "")
    assert planner.skip("sdpa-flash", big, s, 1.7e9) is None
    small = Case(4096, edges_per_query=32)
    planner.learn(GpuRow(small, "sbm-triton", edges=10**6, step=0.5, peak_bytes=1e8), s)
    assert "arm cap" in (planner.skip("sbm-triton", Case(16384, density=0.05), s, 2.7e7) or "")
    planner.fail("flex", "failed: RuntimeError: no")
    assert "earlier case" in (planner.skip("flex", small, s, 1e5) or "")
    planner.opts.deadline = 0.0
    assert planner.skip("sdpa", small, s, 1e5) == "time budget spent"


def test_cases_cheapest_first() -> None:
    s = Settings(heads=2)
    cases = [Case(131072, edges_per_query=32), Case(16384, density=0.01), Case(4096, density=0.05)]
    assert [c.n for c in order_cases(cases, s)] == [4096, 16384, 131072]


def test_deadline_skips_every_case(tmp_path: Path) -> None:
    rows = run(
        ["--suite", "gpu", "--device", "cpu", "--sizes", "256", "--edges-per-query", "8",
         "--densities", "--arms", "sdpa", "--deadline", "0", "--out", str(tmp_path / "r.md")],
        log=lambda s: None,
    )  # fmt: skip
    assert [r.note for r in rows] == ["time budget spent"]  # type: ignore[union-attr]


def test_the_gpu_page_exists_and_says_how_to_run() -> None:
    text = (ROOT / "docs" / "benchmarks-gpu.md").read_text()
    assert "make gpu-check" in text and "## Targets" in text and "## Columns" in text
