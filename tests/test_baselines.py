"""Baseline attentions: shapes, gradients, padding, causality, agreement with exact formulas."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sbm_transformer.baselines import (
    LinearAttention,
    LinformerAttention,
    NystromAttention,
    PerformerAttention,
)
from sbm_transformer.mechanisms import AttentionResult, SoftmaxAttention, build_attention

DIM, HEADS, N = 16, 2, 11

#: Configurations under test: class and keyword options (small sizes, every code path).
CONFIGS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "linear": (LinearAttention, {}),
    "linear-causal": (LinearAttention, {"causal": True, "chunk_size": 4}),
    "performer-relu": (PerformerAttention, {"num_features": 24, "kernel": "relu"}),
    "performer-softmax": (PerformerAttention, {"num_features": 24, "kernel": "softmax"}),
    "linformer": (LinformerAttention, {"max_len": 16, "proj_len": 5}),
    "nystromformer": (NystromAttention, {"num_landmarks": 4, "conv_kernel_size": 3}),
    "nystromformer-exact": (NystromAttention, {"num_landmarks": 16, "conv_kernel_size": 3}),
}


def make(name: str, dtype: torch.dtype = torch.float64, **kw: Any) -> nn.Module:
    cls, options = CONFIGS[name]
    torch.manual_seed(0)
    return cls(DIM, HEADS, **{**options, **kw}).to(dtype)


def inputs(dtype: torch.dtype = torch.float64, n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def padding(n: int = N) -> torch.Tensor:
    """Row 0 unpadded, row 1 a padded tail covering a whole landmark segment, row 2 holes."""
    mask = torch.zeros(3, n, dtype=torch.bool)
    mask[1, n - 5 :] = True
    mask[2, [0, 4, 5]] = True
    return mask


def heads_of(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``(B, H, N, D)`` with the layout of ``SoftmaxAttention``."""
    b, n, e = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, HEADS, e // HEADS).permute(2, 0, 3, 1, 4)
    return q, k, v


def copy_projections(src: nn.Module, dst: nn.Module) -> None:
    dst.qkv.load_state_dict(src.qkv.state_dict())
    dst.out.load_state_dict(src.out.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CONFIGS)
def test_output_shape_and_dtype(name: str, dtype: torch.dtype) -> None:
    result = make(name, dtype)(inputs(dtype), key_padding_mask=padding())
    assert isinstance(result, AttentionResult)
    assert result.output.shape == (3, N, DIM)
    assert result.output.dtype == dtype
    assert torch.isfinite(result.output).all()
    assert result.density is None and result.graph is None


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_parameter(name: str) -> None:
    attn = make(name, torch.float32, dropout=0.1).train()
    attn(inputs(torch.float32), key_padding_mask=padding()).output.square().mean().backward()
    for pname, p in attn.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", CONFIGS)
def test_padded_positions_do_not_change_unpadded_outputs(name: str) -> None:
    attn = make(name).eval()
    mask = padding()
    x = inputs()
    changed = x.clone()
    changed[mask] = 10 * torch.randn(int(mask.sum()), DIM, dtype=x.dtype)
    out = attn(x, key_padding_mask=mask).output
    out_changed = attn(changed, key_padding_mask=mask).output
    torch.testing.assert_close(out_changed[~mask], out[~mask], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", CONFIGS)
def test_fully_padded_row_stays_finite(name: str) -> None:
    mask = padding()
    mask[1] = True
    attn = make(name, torch.float32)
    out = attn(inputs(torch.float32), key_padding_mask=mask).output
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", CONFIGS)
def test_dropout_only_in_training(name: str) -> None:
    attn = make(name, dropout=0.5)
    x = inputs()
    attn.eval()
    torch.testing.assert_close(attn(x).output, attn(x).output, rtol=0, atol=0)
    attn.train()
    assert not torch.allclose(attn(x).output, attn(x).output)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_causal_linear_attention_does_not_look_ahead(chunk_size: int) -> None:
    attn = make("linear-causal", chunk_size=chunk_size)
    x = inputs()
    out = attn(x).output
    for t in (1, 4, 7, N - 1):
        changed = x.clone()
        changed[:, t:] = torch.randn(3, N - t, DIM, dtype=x.dtype)
        out_changed = attn(changed).output
        torch.testing.assert_close(out_changed[:, :t], out[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out_changed[:, t:], out[:, t:])


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_matches_quadratic_formula(causal: bool) -> None:
    attn = make("linear", causal=causal, chunk_size=3)
    x, mask = inputs(), padding()
    q, k, v = heads_of(attn, x)
    phi_q, phi_k = nn.functional.elu(q) + 1, nn.functional.elu(k) + 1
    scores = phi_q @ phi_k.transpose(-1, -2)  # (B, H, N, N)
    scores = scores.masked_fill(mask[:, None, None, :], 0.0)
    if causal:
        scores = scores.tril()
    heads = (scores @ v) / (scores.sum(-1, keepdim=True) + attn.eps)
    expected = attn.out(heads.transpose(1, 2).reshape(3, N, DIM))
    torch.testing.assert_close(
        attn(x, key_padding_mask=mask).output, expected, rtol=1e-10, atol=1e-12
    )


def centred_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation of outputs with each feature's mean over tokens removed."""
    a, b = (t.detach() - t.detach().mean(1, keepdim=True) for t in (a, b))
    return float((a * b).sum() / (a.norm() * b.norm()))


def identity_output(attn: nn.Module) -> None:
    with torch.no_grad():
        attn.out.weight.copy_(torch.eye(DIM))
        attn.out.bias.zero_()


@pytest.mark.parametrize("seed", range(4))
def test_performer_softmax_kernel_approximates_softmax_attention(seed: int) -> None:
    torch.manual_seed(seed)
    exact = SoftmaxAttention(DIM, HEADS).double()
    identity_output(exact)
    performer = PerformerAttention(DIM, HEADS, num_features=4096, kernel="softmax").double()
    copy_projections(exact, performer)
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    want = exact(x).output
    assert centred_correlation(performer(x).output, want) > 0.9
    # the measure is discriminative: outputs of the wrong tokens score low (max 0.37 over
    # 24 seeds, while the performer scored at least 0.968)
    assert centred_correlation(want[:, torch.randperm(16)], want) < 0.6


def test_nystrom_with_enough_landmarks_is_softmax_attention() -> None:
    exact = SoftmaxAttention(DIM, HEADS).double()
    nystrom = make("nystromformer-exact", conv_kernel_size=0)
    copy_projections(exact, nystrom)
    x, mask = inputs(), padding()
    want = exact(x, key_padding_mask=mask).output
    torch.testing.assert_close(nystrom(x, key_padding_mask=mask).output[~mask], want[~mask])


def test_nystrom_landmarks_exact_on_segment_constant_input() -> None:
    # tokens constant over each segment make the landmarks exact; the approximation then equals
    # softmax attention up to the convergence of the pseudo-inverse
    exact = SoftmaxAttention(DIM, HEADS).double()
    nystrom = make("nystromformer", conv_kernel_size=0, pinv_iterations=30)
    copy_projections(exact, nystrom)
    x = 2 * torch.randn(2, 4, 1, DIM, dtype=torch.float64).expand(2, 4, 3, DIM).reshape(2, 12, DIM)
    torch.testing.assert_close(nystrom(x).output, exact(x).output, rtol=1e-6, atol=1e-6)


def test_nystrom_uneven_length_uses_landmarks_and_conv() -> None:
    attn = make("nystromformer")
    x = inputs()
    without_conv = make("nystromformer", conv_kernel_size=0)
    copy_projections(attn, without_conv)
    assert not torch.allclose(attn(x).output, without_conv(x).output)


def test_linformer_accepts_shorter_inputs_and_uses_first_columns() -> None:
    attn = make("linformer")
    short = attn(inputs(n=7)).output
    assert short.shape == (3, 7, DIM)
    with torch.no_grad():
        attn.proj_k.weight[:, 7:] = 100.0
        attn.proj_v.weight[:, 7:] = 100.0
    torch.testing.assert_close(attn(inputs(n=7)).output, short)


def test_performer_projection_is_a_seeded_buffer() -> None:
    a, b = make("performer-softmax"), make("performer-softmax")
    assert "projection" in a.state_dict()
    assert a.projection.shape == (24, DIM // HEADS)
    torch.testing.assert_close(a.projection, b.projection)
    # blocks of head-dim rows are orthogonal
    block = a.projection[: DIM // HEADS]
    gram = block @ block.T
    torch.testing.assert_close(gram, torch.diag(gram.diagonal()), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("cls", "kw", "match"),
    [
        (LinearAttention, {"heads": 3}, r"dim=16 and heads=3"),
        (LinearAttention, {"heads": 0}, r"heads=0"),
        (LinearAttention, {"chunk_size": 0}, r"chunk_size=0"),
        (LinearAttention, {"dropout": 1.5}, r"dropout=1\.5"),
        (PerformerAttention, {"kernel": "cosine"}, r"'cosine'.*'relu', 'softmax'"),
        (PerformerAttention, {"num_features": 0}, r"num_features=0"),
        (PerformerAttention, {"causal": True}, r"PerformerAttention cannot be causal"),
        (
            LinformerAttention,
            {"max_len": 8, "causal": True},
            r"LinformerAttention cannot be causal",
        ),
        (LinformerAttention, {"max_len": 0}, r"max_len >= 1.*max_len=0"),
        (LinformerAttention, {"max_len": 8, "proj_len": 0}, r"proj_len=0"),
        (NystromAttention, {"causal": True}, r"NystromAttention cannot be causal"),
        (NystromAttention, {"conv_kernel_size": 4}, r"odd.*conv_kernel_size=4"),
        (NystromAttention, {"num_landmarks": 0}, r"num_landmarks=0"),
        (NystromAttention, {"pinv_iterations": 0}, r"pinv_iterations=0"),
    ],
)
def test_invalid_arguments_raise(cls: type[nn.Module], kw: dict[str, Any], match: str) -> None:
    kw = {"dim": DIM, "heads": HEADS, **kw}
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_linformer_rejects_inputs_longer_than_max_len() -> None:
    with pytest.raises(ValueError, match=r"N=17 exceeds max_len=16"):
        make("linformer")(inputs(n=17))


@pytest.mark.parametrize("name", ["linear", "performer", "linformer", "nystromformer"])
def test_build_attention_builds_every_baseline(name: str) -> None:
    torch.manual_seed(0)
    attn = build_attention(name, 32, 2, max_len=64)
    x = torch.randn(2, 40, 32)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 30:] = True
    result = attn(x, key_padding_mask=mask)
    assert isinstance(result, AttentionResult)
    assert result.output.shape == (2, 40, 32)
    assert torch.isfinite(result.output).all()
