"""The same checks on a GPU, where one is present (skipped otherwise).

Everything follows the inputs' device: the sparse backend runs the torch.sparse kernels and the
torch sampler on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import padding_mask, sbm_inputs

from sbm_transformer import SBMAttention, edge_probability, sample_graph, sbm_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_sampler_frequencies_on_gpu() -> None:
    Y, Z, B = (t.cuda() for t in sbm_inputs(1, 2, 6, 7, 3, scale=2.0))
    Yr, Zr = Y.expand(4000, -1, -1, -1).contiguous(), Z.expand(4000, -1, -1, -1).contiguous()
    g = torch.Generator(device="cuda").manual_seed(0)
    graph = sample_graph(Yr, Zr, B, exploration=0.05, generator=g)
    assert graph.device.type == "cuda"
    freq = graph.to_dense().double().mean(0)
    prob = edge_probability(Y, Z, B, exploration=0.05)[0]
    se = (prob * (1 - prob) / 4000).sqrt()
    assert ((freq - prob).abs() / se).max() < 5


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_matches_dense_on_gpu(causal: bool) -> None:
    torch.manual_seed(0)
    n = 12
    q, k, v = (
        torch.randn(2, 2, n, 4, dtype=torch.float64, device="cuda", requires_grad=True)
        for _ in range(3)
    )
    Y, Z, B = (t.cuda().requires_grad_() for t in sbm_inputs(2, 2, n, n, 3, scale=1.5))
    mask = padding_mask(2, n).cuda()
    graph = sample_graph(
        Y.detach(), Z.detach(), B.detach(), exploration=0.1, key_padding_mask=mask, causal=causal
    )
    results = []
    for backend in ("dense", "sparse"):
        for t in (q, k, v, Y, Z, B):
            t.grad = None
        out, stats = sbm_attention(
            q, k, v, Y, Z, B, graph=graph, key_padding_mask=mask, causal=causal, backend=backend
        )
        (out.square().sum() + stats.density.sum()).backward()
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v, Y, Z, B)])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-10)


def test_module_on_gpu_bf16() -> None:
    attn = SBMAttention(32, 2, num_clusters=8).cuda()
    x = torch.randn(2, 64, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, stats = attn(x)
    out.float().sum().backward()
    assert out.device.type == "cuda" and torch.isfinite(out.float()).all()
    assert stats.graph.device.type == "cuda"
