"""Models: every head with every attention; padding handled explicitly; densities reported."""

from __future__ import annotations

import pytest
import torch

from sbm_transformer.config import ModelConfig
from sbm_transformer.data.base import TaskInfo, collate_fn
from sbm_transformer.mechanisms import ATTENTIONS, build_attention
from sbm_transformer.models import build_model, is_stochastic, set_sampling_seed

ATTN = list(ATTENTIONS)


def small(attention: str, **kw) -> ModelConfig:
    cfg = ModelConfig(
        attention=attention,
        dim=16,
        heads=2,
        layers=2,
        mlp_dim=32,
        dropout=0.0,
        attention_dropout=0.0,
        num_clusters=4,
        performer_features=16,
        linformer_k=8,
        nystrom_landmarks=4,
        nystrom_conv=3,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def examples(kind: str, n: int = 3):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 5 + 3 * i
        toks = torch.randint(1, 9, (length,), generator=g)
        if kind == "match":
            out.append((toks, torch.randint(1, 9, (length + 1,), generator=g), i % 2))
        elif kind == "tag":
            out.append((toks, torch.randint(0, 2, (length,), generator=g)))
        elif kind == "lm":
            out.append((toks, None))
        else:
            out.append((toks, i % 3))
    return collate_fn(kind)(out)


@pytest.mark.parametrize("attention", ATTN)
@pytest.mark.parametrize("kind", ["classify", "match", "tag", "lm"])
def test_every_head_with_every_attention(attention: str, kind: str) -> None:
    if kind == "lm" and attention not in ("sbm", "softmax", "linear", "none"):
        with pytest.raises(ValueError, match="cannot be causal"):
            build_model(TaskInfo("t", kind, 10, 10, 16), small(attention))
        return
    classes = 10 if kind == "lm" else 3
    torch.manual_seed(0)
    model = build_model(TaskInfo("t", kind, 10, classes, 16), small(attention))
    batch = examples(kind)
    out = model(batch.tokens, batch.padding_mask)
    b = batch.labels.shape[0]
    expected = (
        (b, classes) if kind in ("classify", "match") else (b, batch.tokens.shape[-1], classes)
    )
    assert out.logits.shape == expected
    assert torch.isfinite(out.logits).all()
    assert (len(out.densities) == 2) == (attention == "sbm")
    loss = out.logits.float().logsumexp(-1).mean() + (out.mean_density() or 0.0)
    loss.backward()
    assert (
        all(p.grad is not None for n, p in model.named_parameters() if "cls_token" not in n)
        or attention == "none"
    )


def test_padding_does_not_change_predictions() -> None:
    torch.manual_seed(0)
    model = build_model(TaskInfo("t", "classify", 10, 3, 32), small("softmax")).eval()
    toks = torch.randint(1, 9, (1, 12))
    mask = torch.zeros(1, 12, dtype=torch.bool)
    padded = torch.cat([toks, torch.zeros(1, 5, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.ones(1, 5, dtype=torch.bool)], 1)
    a = model(toks, mask).logits
    b = model(padded, pmask).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_cls_pooling_and_length_check() -> None:
    model = build_model(TaskInfo("t", "classify", 10, 3, 8), small("softmax", pooling="cls"))
    batch = examples("classify", 1)
    assert model(batch.tokens, batch.padding_mask).logits.shape == (1, 3)
    with pytest.raises(ValueError, match="exceeds the model's max_len 8"):
        model(torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"model\.pooling must be 'mean' or 'cls'"):
        build_model(TaskInfo("t", "classify", 10, 3, 8), small("softmax", pooling="max"))


def test_causal_lm_does_not_look_ahead() -> None:
    torch.manual_seed(0)
    for attention in ("sbm", "softmax", "linear"):
        model = build_model(
            TaskInfo("t", "lm", 10, 10, 16), small(attention, exploration=0.2)
        ).eval()
        toks = torch.randint(1, 9, (1, 10))
        mask = torch.zeros(1, 10, dtype=torch.bool)
        set_sampling_seed(model, 3)
        a = model(toks, mask).logits
        toks2 = toks.clone()
        toks2[0, 7:] = 9
        set_sampling_seed(model, 3)
        b = model(toks2, mask).logits
        assert torch.allclose(a[0, :7], b[0, :7], atol=1e-5), attention


def test_sampling_seed_fixes_sbm_graphs() -> None:
    model = build_model(TaskInfo("t", "classify", 10, 3, 16), small("sbm")).eval()
    assert is_stochastic(model)
    assert not is_stochastic(build_model(TaskInfo("t", "classify", 10, 3, 16), small("softmax")))
    batch = examples("classify")
    set_sampling_seed(model, 5)
    a = model(batch.tokens, batch.padding_mask)
    set_sampling_seed(model, 5)
    b = model(batch.tokens, batch.padding_mask)
    assert torch.equal(a.logits, b.logits)
    set_sampling_seed(model, None)


def test_build_attention_errors() -> None:
    with pytest.raises(ValueError, match="unknown attention 'flash'; valid: sbm, softmax"):
        build_attention("flash", 16, 2)
    with pytest.raises(ValueError, match="unknown option"):
        build_attention("softmax", 16, 2, num_clusters=3)


def test_sbm_forms_set_distribution_and_scale() -> None:
    from sbm_transformer.attention import DEFAULT_RATE_SCALE, SBMAttention
    from sbm_transformer.models import attention_options

    def first_sbm(cfg: ModelConfig) -> SBMAttention:
        model = build_model(TaskInfo("t", "classify", 10, 3, 16), cfg)
        return next(m for m in model.modules() if isinstance(m, SBMAttention))

    default = first_sbm(ModelConfig(num_clusters=4))
    assert default.distribution == "poisson" and default.log_rate_scale is not None
    assert torch.allclose(default.log_rate_scale.exp(), torch.tensor(DEFAULT_RATE_SCALE))
    original = first_sbm(ModelConfig(num_clusters=4, sbm="original"))
    assert original.distribution == "bernoulli" and original.log_rate_scale is None
    paper = first_sbm(ModelConfig(num_clusters=4, sbm="paper"))
    assert paper.distribution == "poisson" and paper.log_rate_scale is None
    own = attention_options(ModelConfig(distribution="bernoulli", rate_scale=4.0))
    assert own["distribution"] == "bernoulli" and own["rate_scale"] == 4.0
    same = attention_options(ModelConfig(sbm="original", distribution="bernoulli"))
    assert same["distribution"] == "bernoulli" and same["rate_scale"] is None
    with pytest.raises(ValueError, match=r"model\.sbm=paper sets distribution itself"):
        attention_options(ModelConfig(sbm="paper", distribution="bernoulli"))
    with pytest.raises(ValueError, match=r"unknown model\.sbm 'released'"):
        attention_options(ModelConfig(sbm="released"))
