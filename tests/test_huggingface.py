"""The transformers integration: SBM attention inside tiny, randomly initialised HF models.

With the graph forced complete (Bernoulli edges with exploration >= 1: every visible pair is an
edge) SBM attention is softmax attention, so each model must reproduce its own eager attention.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from conftest import SPARSE_BACKENDS
from torch import nn

transformers = pytest.importorskip("transformers")

from sbm_transformer import SBMAttention  # noqa: E402
from sbm_transformer.integrations.huggingface import (  # noqa: E402
    SBMHead,
    _dispatches_through_interface,
    _mask_plan,
    sbm_density,
    sbm_graphs,
    sbm_heads,
    sbmify,
)

#: Options that make every visible (query, key) pair an edge: min(1, rate + eps) = 1.
COMPLETE = {"exploration": 2.0, "distribution": "bernoulli"}
VOCAB, LENGTH = 100, 10


def bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
    )
    return transformers.BertModel(config)


def roberta() -> nn.Module:
    config = transformers.RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=LENGTH + 4,
    )
    return transformers.RobertaModel(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32
    )
    return transformers.GPT2LMHeadModel(config)


def llama(kv_heads: int = 2) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def qwen2() -> nn.Module:
    config = transformers.Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return transformers.Qwen2ForCausalLM(config)


#: name -> (factory, is a decoder (left padding, causal), where its attention modules are)
MODELS: dict[str, tuple[Callable[[], nn.Module], bool, str]] = {
    "bert": (bert, False, "encoder.layer.0.attention.self.sbm.clusters"),
    "roberta": (roberta, False, "encoder.layer.0.attention.self.sbm.clusters"),
    "gpt2": (gpt2, True, "transformer.h.0.attn.sbm.clusters"),
    "llama": (llama, True, "model.layers.0.self_attn.sbm.clusters"),
    "qwen2": (qwen2, True, "model.layers.0.self_attn.sbm.clusters"),
}


def dispatching(name: str) -> bool:
    """Whether the model's attention calls transformers' attention interface (BERT and RoBERTa
    do from transformers 5 on)."""
    return any(_dispatches_through_interface(m) for m in MODELS[name][0]().modules())


def skip_unless_dispatching(name: str) -> None:
    if not dispatching(name):
        pytest.skip(
            f"{name} predates the attention interface in transformers {transformers.__version__}"
        )


def batch(decoder: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (3, LENGTH) and an attention mask (1 = token): padding on the left for
    decoders, on the right for encoders; one row unpadded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, LENGTH), generator=g)
    mask = torch.ones(3, LENGTH, dtype=torch.long)
    for row, pad in ((1, 3), (2, 6)):
        if decoder:
            mask[row, :pad] = 0
        else:
            mask[row, LENGTH - pad :] = 0
    return ids, mask


def output(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def sbm_and_eager(name: str, **options: object) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    return sbmify(model, num_clusters=6, **options), reference


@pytest.mark.parametrize("backend", ["dense", *SPARSE_BACKENDS])
@pytest.mark.parametrize("name", list(MODELS))
def test_complete_graph_matches_eager_attention(name: str, backend: str) -> None:
    skip_unless_dispatching(name)
    model, reference = sbm_and_eager(name, backend=backend, **COMPLETE)
    decoder = MODELS[name][1]
    ids, mask = batch(decoder)
    with torch.no_grad():
        got, want = output(model, ids, mask), output(reference, ids, mask)
        # A decoder's left-padding positions see no key: SBM attention gives them zeros, eager
        # attention a fully masked (uniform) softmax row. Compare real tokens only.
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
        # No padding: transformers passes no mask (plain causal or full attention).
        torch.testing.assert_close(output(model, ids, None), output(reference, ids, None))
    assert model.config._attn_implementation == "sbm"
    density = sbm_density(model)
    assert len(density) == 2 and all(d.shape == (4,) for d in density)


@pytest.mark.parametrize("backend", ["dense", "sparse"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_gradients_reach_the_sbm_parameters(name: str, backend: str) -> None:
    skip_unless_dispatching(name)
    torch.manual_seed(0)
    factory, decoder, where = MODELS[name]
    model = sbmify(factory().train(), num_clusters=6, backend=backend, init_density=0.5)
    ids, mask = batch(decoder)
    loss = output(model, ids, mask).square().mean()
    density = torch.cat(sbm_density(model))
    assert density.requires_grad
    (loss + 0.1 * density.mean()).backward()
    names = {n for n, _ in model.named_parameters()}
    sbm_names = {n for n in names if ".sbm." in n}
    assert where in sbm_names
    assert len(sbm_names) == 2 * 6  # per layer: clusters, 2 x (weight, bias), log_rate_scale
    for n, p in model.named_parameters():
        if ".sbm." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_density_term_reaches_clusters_and_rate_scale() -> None:
    """The density term alone reaches the clusters and rate scale (the sparsity term)."""
    torch.manual_seed(0)
    model = sbmify(llama(), num_clusters=6, init_density=0.5)
    ids, mask = batch(True)
    model(input_ids=ids, attention_mask=mask)
    torch.cat(sbm_density(model)).mean().backward()
    head = model.model.layers[0].self_attn.sbm
    assert head.log_rate_scale.grad is not None and head.log_rate_scale.grad.abs().min() > 0
    assert head.clusters.grad is not None and head.clusters.grad.abs().sum() > 0


def test_density_and_graphs_belong_to_the_latest_forward() -> None:
    skip_unless_dispatching("bert")
    torch.manual_seed(0)
    model = sbmify(bert().eval(), num_clusters=6)
    with pytest.raises(RuntimeError, match="no SBM attention ran"):
        sbm_density(model)
    ids, mask = batch(False)
    model(input_ids=ids, attention_mask=mask)
    first = sbm_density(model)
    model(input_ids=ids[:2], attention_mask=mask[:2])
    second, graphs = sbm_density(model), sbm_graphs(model)
    assert len(second) == len(graphs) == 2  # one per layer, nothing left from the first forward
    assert all(a is not b for a, b in zip(first, second, strict=True))
    assert all(g.shape[0] == 2 for g in graphs)  # (B, H, N, M) of the second batch
    heads = sbm_heads(model)
    assert list(heads) == [f"encoder.layer.{i}.attention.self.sbm" for i in range(2)]
    assert heads["encoder.layer.1.attention.self.sbm"].last_stats.graph is graphs[1]


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_with_cache_matches_eager(cache: str | None) -> None:
    model, reference = sbm_and_eager("llama", **COMPLETE)
    ids, mask = batch(True)
    kwargs = {
        "max_new_tokens": 4,
        "do_sample": False,
        "pad_token_id": 0,
        "cache_implementation": cache,
    }
    got = model.generate(ids, attention_mask=mask, **kwargs)
    want = reference.generate(ids, attention_mask=mask, **kwargs)
    assert got.shape == (3, LENGTH + 4)
    assert torch.equal(got, want)
    # The last step decoded one token with the cache: one query per row.
    assert sbm_graphs(model)[0].shape[2] == 1


def test_head_attends_as_sbm_attention() -> None:
    """SBMHead is SBMAttention's core: same parameters, same graph -> same output, gradients."""
    torch.manual_seed(0)
    attn = SBMAttention(24, 3, num_clusters=5, init_density=0.4).double()
    head = SBMHead(3, 8, 5, init_density=0.4, dtype=torch.float64)
    head.load_state_dict(attn.state_dict(), strict=False)  # all but the projections
    for name, p in head.named_parameters():
        torch.testing.assert_close(p, attn.get_parameter(name))
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weight = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    names = [name for name, _ in head.named_parameters()]
    for backend in ["dense", *SPARSE_BACKENDS]:
        attn.backend = head.backend = backend
        want, stats = attn.attend(q, k, v)
        got, got_stats = head.attend(q, k, v, graph=stats.graph)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_stats.density, stats.density)
        wanted = [attn.get_parameter(name) for name in names]
        g_want = torch.autograd.grad((want * weight).sum(), [*wanted, q, k, v])
        g_got = torch.autograd.grad((got * weight).sum(), [*head.parameters(), q, k, v])
        for name, a, b in zip([*names, "q", "k", "v"], g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, msg=name)


def test_heads_follow_the_model() -> None:
    model = llama().double().eval()
    sbmify(model, num_clusters=3, rate_scale=None)
    head = model.model.layers[1].self_attn.sbm
    assert head.clusters.dtype == torch.float64 and head.clusters.shape == (4, 3, 8)
    assert head.log_rate_scale is None and not head.training


def test_mask_plans() -> None:
    padding = torch.tensor([[False, False, True], [True, False, False]])
    full = (~padding)[:, None, None, :].expand(2, 1, 3, 3)
    plan = _mask_plan(full, 2, 3, 3, True)
    assert not plan.causal and torch.equal(plan.key_padding_mask, padding)
    causal = full & torch.ones(3, 3, dtype=torch.bool).tril()
    plan = _mask_plan(causal.clone(), 2, 3, 3, False)
    assert plan.causal and torch.equal(plan.key_padding_mask, padding)
    additive = torch.zeros(2, 4, 3, 3).masked_fill(~causal, torch.finfo(torch.float32).min)
    plan = _mask_plan(additive, 2, 3, 3, False)  # per-head copies, float
    assert plan.causal and torch.equal(plan.key_padding_mask, padding)
    plan = _mask_plan(None, 2, 3, 5, True)  # a static cache's prefill: sdpa's upper-left crop
    assert plan.causal and plan.num_keys == 3 and plan.key_padding_mask is None
    plan = _mask_plan(None, 2, 1, 5, True)  # one query: all keys
    assert not plan.causal and plan.num_keys == 5
    unpadded = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    assert _mask_plan(unpadded, 2, 3, 3, True).key_padding_mask is None
    band = torch.ones(3, 3, dtype=torch.bool).tril() & torch.ones(3, 3, dtype=torch.bool).triu(-1)
    with pytest.raises(ValueError, match="sliding-window"):
        _mask_plan(band[None, None].clone(), 1, 3, 3, True)
    with pytest.raises(ValueError, match="additive attention bias"):
        _mask_plan(torch.randn(1, 1, 3, 3), 1, 3, 3, True)
    with pytest.raises(ValueError, match="differ by head"):
        _mask_plan(torch.stack([full[:, 0], causal[:, 0]], 1), 2, 3, 3, True)
    with pytest.raises(ValueError, match="4D attention mask"):
        _mask_plan(padding, 2, 3, 3, True)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_unsupported_masks_raise() -> None:
    torch.manual_seed(0)
    model = sbmify(llama().eval(), num_clusters=3)
    ids, _ = batch(True)
    # Packed sequences: position ids restarting within a row make a block-diagonal mask.
    positions = torch.cat([torch.arange(4), torch.arange(6)])[None].expand(3, -1)
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids=ids, position_ids=positions, use_cache=False)
    # Several new tokens after a cache: the causal triangle no longer starts at key 0.
    out = model(input_ids=ids[:, :6], use_cache=True)
    with pytest.raises(ValueError, match="cached keys"):
        model(input_ids=ids[:, 6:], past_key_values=out.past_key_values)
    # The failed forwards left no forward "under way": the next one records as usual.
    assert model.model.layers[0].self_attn.sbm._scope.depth == 0
    model(input_ids=ids)
    assert len(sbm_density(model)) == 2


def test_bad_arguments_raise_and_leave_the_model_alone() -> None:
    model = gpt2()
    with pytest.raises(TypeError, match="PreTrainedModel"):
        sbmify(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unknown SBM option"):
        sbmify(model, num_cluster=4)
    with pytest.raises(ValueError, match="num_clusters"):
        sbmify(model, num_clusters=0)
    with pytest.raises(TypeError, match="num_clusters"):
        sbmify(model, num_clusters=8.0)
    with pytest.raises(ValueError, match="rate_scale"):
        sbmify(model, rate_scale=-1.0)
    with pytest.raises(ValueError, match="exploration"):
        sbmify(model, exploration=-1.0)
    with pytest.raises(ValueError, match="backend"):
        sbmify(model, backend="fast")
    with pytest.raises(ValueError, match="init_density"):
        sbmify(model, init_density=0.001, exploration=0.1)
    assert not sbm_heads(model) and model.config._attn_implementation != "sbm"
    with pytest.raises(ValueError, match="no SBM heads"):
        sbm_density(model)
    sbmify(model, num_clusters=4)
    with pytest.raises(ValueError, match="already sbmified"):
        sbmify(model, num_clusters=4)


def test_model_without_attention_interface_raises() -> None:
    class Plain(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self, config: object) -> None:
            super().__init__(config)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    with pytest.raises(ValueError, match="AttentionInterface"):
        sbmify(Plain(transformers.PretrainedConfig()))


def test_sbm_implementation_without_heads_raises() -> None:
    model = llama()
    model.set_attn_implementation("sbm")  # registered by importing the integration
    with pytest.raises(RuntimeError, match="sbmify"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_importing_the_package_does_not_import_transformers() -> None:
    code = (
        "import sys, sbm_transformer, sbm_transformer.integrations as i\n"
        "assert 'transformers' not in sys.modules\n"
        "assert callable(i.sbmify) and 'transformers' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
