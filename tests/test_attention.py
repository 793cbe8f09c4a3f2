"""SBMAttention: a drop-in batch-first module whose backends agree and which trains."""

from __future__ import annotations

import pytest
import torch
from conftest import SPARSE_BACKENDS, padding_mask
from torch import nn

from sbm_transformer import SBMAttention


def grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("distribution", ["poisson", "bernoulli"])
def test_module_backends_agree_on_every_parameter_gradient(
    backend: str, cross: bool, distribution: str
) -> None:
    torch.manual_seed(0)
    attn = SBMAttention(
        24,
        3,
        num_clusters=5,
        exploration=0.05,
        kdim=10 if cross else None,
        vdim=6 if cross else None,
        init_density=0.3,
        distribution=distribution,
    ).double()
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    kv = torch.randn(2, 7, 10, dtype=torch.float64) if cross else None
    vv = torch.randn(2, 7, 6, dtype=torch.float64) if cross else None
    mask = padding_mask(2, 7 if cross else 11)
    _, stats = attn(x, kv, vv, key_padding_mask=mask)
    results = {}
    for name in ("dense", backend):
        attn.zero_grad()
        attn.backend = name
        out, st = attn(x, kv, vv, key_padding_mask=mask, graph=stats.graph)
        ((out**2).mean() + 0.5 * st.density.mean()).backward()
        results[name] = (out.detach(), grads_of(attn))
    out_d, grads_d = results["dense"]
    out_s, grads_s = results[backend]
    assert torch.allclose(out_s, out_d, rtol=1e-9, atol=1e-12)
    assert set(grads_s) == set(grads_d) and "clusters" in grads_s and "log_rate_scale" in grads_s
    assert grads_d["log_rate_scale"].abs().min() > 0  # the scale trains through the estimator
    for name, g in grads_d.items():
        assert torch.allclose(grads_s[name], g, rtol=1e-6, atol=1e-12), name


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_tiny_model_trains(backend: str) -> None:
    """Token task needing attention: predict the token at position 0 from every position."""
    torch.manual_seed(0)
    vocab, length, dim = 8, 16, 32

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(length, dim) * 0.1)
            self.attn = SBMAttention(dim, 2, num_clusters=8, exploration=0.05, backend=backend)
            self.head = nn.Linear(dim, vocab)

        def forward(self, tokens: torch.Tensor):
            h = self.emb(tokens) + self.pos
            a, stats = self.attn(h)
            return self.head(h + a), stats

    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(200):
        tokens = torch.randint(0, vocab, (16, length), generator=gen)
        logits, stats = model(tokens)
        target = tokens[:, :1].expand(-1, length)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))
        (loss + 1e-4 * stats.density.mean()).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"


def test_causal_output_ignores_the_future() -> None:
    torch.manual_seed(0)
    attn = SBMAttention(16, 2, num_clusters=4, causal=True, backend="sparse")
    x = torch.randn(1, 10, 16)
    out, stats = attn(x)
    x2 = x.clone()
    x2[:, 6:] += 5.0
    out2, _ = attn(x2, graph=stats.graph)
    assert torch.allclose(out[:, :6], out2[:, :6])
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


def test_padded_keys_never_matter() -> None:
    torch.manual_seed(0)
    attn = SBMAttention(16, 2, num_clusters=4, exploration=0.5)
    x = torch.randn(2, 9, 16)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 6:] = True
    out, stats = attn(x, key_padding_mask=mask, generator=torch.Generator().manual_seed(3))
    b, _, _, j = stats.graph.edges()
    assert not mask[b, j].any()  # no edge reaches a padded key
    kv = x.clone()
    kv[:, 6:] = 100.0  # garbage in the padding: keys and values only
    out2, _ = attn(x, kv, kv, key_padding_mask=mask, graph=stats.graph)
    assert torch.allclose(out, out2, atol=1e-5)


def test_generator_reproduces_output_and_eval_disables_dropout() -> None:
    torch.manual_seed(0)
    attn = SBMAttention(16, 4, num_clusters=4, dropout=0.5)
    x = torch.randn(2, 12, 16)
    a, _ = attn(x, generator=torch.Generator().manual_seed(1))
    b, _ = attn(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    attn.eval()
    c, sc = attn(x, generator=torch.Generator().manual_seed(1))
    d, _ = attn(x, graph=sc.graph)
    assert torch.equal(c, d)  # no dropout in eval: the graph determines the output


def test_init_density_sets_the_starting_density() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 400, 64)
    paper = SBMAttention(64, 2, num_clusters=128, rate_scale=None)
    assert paper.log_rate_scale is None
    _, st = paper(x)
    assert 0.15 < st.density.mean().item() < 0.35  # the original's ~25 % at initialisation
    _, st = SBMAttention(64, 2, num_clusters=128)(x)  # the default: a dense start
    assert st.density.mean().item() > 0.9
    for distribution in ("poisson", "bernoulli"):
        sparse_start = SBMAttention(
            64, 2, num_clusters=128, init_density=0.02, distribution=distribution
        )
        _, st = sparse_start(x)
        assert 0.014 < st.density.mean().item() < 0.028, distribution
        with pytest.raises(ValueError, match="exploration floor"):
            SBMAttention(64, 2, exploration=0.01, init_density=0.005, distribution=distribution)


def test_rate_scale_multiplies_the_rate() -> None:
    """The scale enters as s_h * Y B Z^T: the block matrix the sampler sees is scaled per head."""
    torch.manual_seed(0)
    a = SBMAttention(16, 2, num_clusters=4, rate_scale=None)
    b = SBMAttention(16, 2, num_clusters=4, rate_scale=3.0)
    b.load_state_dict({**a.state_dict(), "log_rate_scale": torch.log(torch.tensor([3.0, 0.5]))})
    ratio = b.block_matrix() / a.block_matrix()
    assert torch.allclose(ratio[0], torch.tensor(3.0)) and torch.allclose(
        ratio[1], torch.tensor(0.5)
    )


def test_state_dict_round_trip_and_repr() -> None:
    a = SBMAttention(32, 4, num_clusters=6, init_density=0.1)
    b = SBMAttention(32, 4, num_clusters=6, init_density=0.1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 5, 32)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(a(x, generator=g)[0], b(x, generator=torch.Generator().manual_seed(0))[0])
    assert "num_clusters=6" in repr(a) and "init_density=0.1" in repr(a)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(embed_dim=30, num_heads=4), r"embed_dim \(30\) must be divisible by num_heads \(4\)"),
        (dict(embed_dim=32, num_heads=0), "num_heads must be a positive int"),
        (dict(embed_dim=32, num_heads=4, backend="cuda"), "unknown backend 'cuda'"),
        (dict(embed_dim=32, num_heads=4, dropout=1.5), r"dropout must be in \[0, 1\)"),
        (dict(embed_dim=32, num_heads=4, exploration=float("inf")), "exploration must be finite"),
        (dict(embed_dim=32, num_heads=4, init_density=2.0), r"init_density must be in \(0, 1\)"),
        (dict(embed_dim=32, num_heads=4, rate_scale=0.0), "rate_scale must be a finite number > 0"),
        (
            dict(embed_dim=32, num_heads=4, rate_scale=float("nan")),
            "rate_scale must be a finite number > 0",
        ),
        (dict(embed_dim=32, num_heads=4, distribution="binomial"), "unknown distribution"),
    ],
)
def test_bad_configuration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SBMAttention(**kwargs)


def test_bad_call_arguments() -> None:
    attn = SBMAttention(16, 2, num_clusters=4, kdim=8)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, length, 16\)"):
        attn(x[0])
    with pytest.raises(ValueError, match=r"key must have shape \(batch, length, 8\)"):
        attn(x, x, x)
    with pytest.raises(ValueError, match="share the batch size"):
        attn(x, torch.randn(3, 5, 8), torch.randn(3, 5, 16))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        attn(x, torch.randn(2, 5, 8), x, key_padding_mask=torch.zeros(2, 5))
    causal = SBMAttention(16, 2, num_clusters=4, causal=True)
    with pytest.raises(ValueError, match="causal=True needs as many queries as keys"):
        causal(x, torch.randn(2, 7, 16))


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("chunk_bytes", [None, 64, 1100])
def test_attend_takes_membership_gradients_to_the_features(
    backend: str, chunk_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SBMAttention.attend (gradients straight to the node features and clusters, by chunks of
    rows or of whole pairs) against sbm_attention on memberships(), with autograd through the
    sigmoid, on one graph; also with dropout and through the density."""
    from sbm_transformer.functional import sbm_attention
    from sbm_transformer.ops import memberships

    if chunk_bytes is not None:  # 64: a row block per row; 1100: two whole pairs at a time
        monkeypatch.setattr(memberships, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    attn = SBMAttention(24, 3, num_clusters=5, exploration=0.1, dropout=0.2, backend=backend)
    attn = attn.double()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (13, 9, 9))
    results = []
    for fused in (True, False):
        attn.zero_grad()
        qkv = [t.clone().requires_grad_(True) for t in (q, k, v)]
        gen = torch.Generator().manual_seed(2)
        if fused:
            out, st = attn.attend(*qkv, generator=gen)
        else:
            Y, Z = attn.memberships(qkv[0], qkv[1])
            out, st = sbm_attention(
                *qkv, Y, Z, attn.block_matrix(), exploration=0.1, dropout_p=0.2,
                backend=backend, generator=gen,
            )  # fmt: skip
        ((out**2).sum() + 3.0 * st.density.sum()).backward()
        grads = {name: p.grad for name, p in attn.named_parameters() if p.grad is not None}
        results.append((out.detach(), st.num_edges, [t.grad for t in qkv], grads))
    (out_f, e_f, qkv_f, par_f), (out_p, e_p, qkv_p, par_p) = results
    assert e_f == e_p > 0
    assert torch.allclose(out_f, out_p, rtol=1e-12, atol=1e-14)
    for a, b in zip(qkv_f, qkv_p, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert set(par_f) == set(par_p) and {"clusters", "node_mlp.0.weight"} <= set(par_f)
    for name, grad in par_p.items():
        assert torch.allclose(par_f[name], grad, rtol=1e-9, atol=1e-12), name


def test_attend_without_edges_gives_zero_gradients() -> None:
    from sbm_transformer import Graph

    attn = SBMAttention(16, 2, num_clusters=4, backend="sparse").double()
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    empty = Graph.from_dense(torch.zeros(1, 2, 5, 5, dtype=torch.bool))
    out, st = attn.attend(x, x, x, graph=empty)
    (out.sum() + st.density.sum()).backward()
    assert not out.any() and x.grad is not None and not x.grad.any()
    assert attn.clusters.grad is not None and not attn.clusters.grad.any()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_cpu_autocast_bfloat16(backend: str) -> None:
    """Under CPU autocast (bfloat16 matmuls) the module samples, attends and trains."""
    torch.manual_seed(0)
    attn = SBMAttention(32, 2, num_clusters=8, backend=backend)
    x = torch.randn(2, 80, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = attn(x)
        loss = out.float().square().mean() + 1e-2 * stats.density.mean()
    loss.backward()
    assert stats.num_edges > 0 and torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)
    assert attn.clusters.grad is not None and attn.clusters.grad.abs().sum() > 0


def test_attend_inputs_must_match_the_memberships() -> None:
    from sbm_transformer.functional import attend
    from sbm_transformer.ops.memberships import MembershipInputs

    q = torch.randn(1, 2, 5, 8)
    Y, Z, B = torch.rand(1, 2, 5, 4), torch.rand(1, 2, 5, 4), torch.rand(2, 4, 4) / 16
    good = MembershipInputs(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"inputs.clusters must have shape \(H=2, K=4"):
        attend(q, q, q, Y, Z, B, inputs=good._replace(clusters=torch.randn(2, 3, 8)))
    with pytest.raises(ValueError, match=r"inputs.key_features must have shape \(1, 2, 5, 8\)"):
        attend(q, q, q, Y, Z, B, inputs=good._replace(key_features=torch.randn(1, 2, 4, 8)))
    with pytest.raises(ValueError, match="Y and Z must not require gradients"):
        attend(q, q, q, Y.requires_grad_(True), Z, B, inputs=good, backend="sparse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_product_by_row_blocks(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The memberships, computed by row blocks (here of 3 rows: the last one short), with the
    clusters broadcast over the batch, equal the plain product's sigmoid."""
    from sbm_transformer import attention

    monkeypatch.setattr(attention, "_SIGMOID_CHUNK_BYTES", 3 * 5 * torch.finfo(dtype).bits // 8)
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 7, 4, generator=gen, dtype=dtype)
    centers = torch.randn(3, 4, 5, generator=gen, dtype=dtype)
    got = attention._sigmoid_product(features, centers)
    assert got.shape == (2, 3, 7, 5) and got.dtype == dtype
    torch.testing.assert_close(got, torch.sigmoid(features @ centers), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ empty inputs, bad numbers
@pytest.mark.parametrize("backend", ["dense", *SPARSE_BACKENDS])
@pytest.mark.parametrize(
    ("query_shape", "key_shape"),
    [((2, 0, 32), None), ((0, 5, 32), None), ((2, 5, 32), (2, 0, 32)), ((2, 0, 32), (2, 4, 32))],
)
def test_empty_sequences_give_empty_outputs(backend: str, query_shape, key_shape) -> None:
    """As nn.MultiheadAttention: no queries give no output rows; no keys give the rows of a
    query without edges (zeros before the output projection)."""
    attn = SBMAttention(32, 2, 8, backend=backend)
    query = torch.randn(query_shape, requires_grad=True)
    key = None if key_shape is None else torch.randn(key_shape, requires_grad=True)
    out, stats = attn(query, key)
    assert out.shape == query_shape
    if key_shape is not None and key_shape[1] == 0 and query_shape[1] > 0:
        assert torch.allclose(out, attn.out_proj.bias.expand_as(out))
    out.sum().backward()
    assert stats.graph is None or stats.graph.num_edges == 0
    assert torch.isfinite(stats.density).all()


@pytest.mark.parametrize("backend", ["dense", *SPARSE_BACKENDS])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_numbers_given_a_graph_stay_in_their_sequence(deadline, backend, value) -> None:
    """With the graph given (no sampling), NaN or inf in one sequence's queries, keys or values
    makes that sequence's output non-finite and leaves the other sequence's exact, quickly."""
    attn = SBMAttention(32, 2, 8, backend=backend).eval()
    x = torch.randn(2, 40, 32)
    _, stats = attn(x, generator=torch.Generator().manual_seed(0))
    clean, _ = attn(x, graph=stats.graph)
    for where in ("query", "key", "value"):
        bad = x.clone()
        bad[0, 7, 3] = value
        args = {"query": x, "key": x, "value": x}
        args[where] = bad
        out, _ = attn(args["query"], args["key"], args["value"], graph=stats.graph)
        assert not torch.isfinite(out[0]).all(), where
        assert torch.equal(out[1], clean[1]), where


def test_nan_in_a_parameter_is_named(deadline) -> None:
    attn = SBMAttention(32, 2, 8)
    with torch.no_grad():
        attn.log_rate_scale[1] = float("nan")
    with pytest.raises(ValueError, match=r"B \(block matrix\) contains NaN"):
        attn(torch.randn(2, 20, 32))
