"""The Triton kernels (``ops/_triton_kernels.py``, backend ``"sparse-triton"``) against the dense
reference: outputs and every gradient (q, k, v, memberships, block matrix, the module's
parameters through the membership inputs).

On a CPU they run under the Triton interpreter, ``TRITON_INTERPRET=1`` set per test (the
``interpreter`` fixture); the CUDA tests at the end run compiled where a GPU is present (the
variable removed; skipped without a GPU). Where Triton reads the variable (checked on 3.9): when
``triton.jit`` decorates a function (``knobs.runtime.interpret`` looks the environment up at
each access), so at ``import triton`` for its own library (``tl.sum``, ``tl.zeros``, ...), not
at launch; and ``import sbm_transformer`` already imports triton (through ``torch._dynamo``), so
a test module's ``os.environ`` comes too late for that. The kernel module therefore wraps its
kernels itself, by the variable's value at each call, and calls none of triton's library
functions (see ``ops/_triton_kernels.py``): one process runs both modes. The interpreter is slow:
small sizes. ``test_kernels_compile_for_sm90`` compiles the kernels to cubin without a GPU
(Triton's bundled ptxas): the interpreter accepts code the compiler may reject.
"""

from __future__ import annotations

import pytest
import torch
from conftest import padding_mask, sbm_inputs
from test_functional import assert_close_all, make_case, run

from sbm_transformer import Graph, SBMAttention, sample_graph, sbm_attention
from sbm_transformer.ops.kernels import Memberships, TorchKernels, get_kernels

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

F64 = torch.float64
BACKEND = "sparse-triton"


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from sbm_transformer.ops import _triton_kernels as tk

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled kernels
    if tk.interpreting():
        pytest.skip("triton was imported under TRITON_INTERPRET=1: its library is interpreted")


def sampled(inputs, *, pad: bool, causal: bool, seed: int = 1):
    b, m = inputs[0].shape[0], inputs[1].shape[2]
    mask = padding_mask(b, m) if pad else None
    Y, Z, B = (t.detach() for t in inputs[3:])
    graph = sample_graph(
        Y, Z, B, exploration=0.05, key_padding_mask=mask, causal=causal,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    assert graph.num_edges > 0
    return graph, dict(key_padding_mask=mask, causal=causal)


# (B, H, N, M, D, Dv, K): head sizes 16, 24 (not a power of two: padded and masked) and 64
CASES = {
    "self, padding, D=16": dict(dims=(2, 2, 13, 13, 16, 16, 4), pad=True, causal=False),
    "cross, D=24, Dv=20": dict(dims=(2, 2, 9, 14, 24, 20, 5), pad=True, causal=False),
    "causal, padding, D=64": dict(dims=(1, 2, 12, 12, 64, 64, 3), pad=True, causal=True),
}


# -------------------------------------------------------------- the interpreter, on the CPU
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_matches_dense_in_float64(interpreter, case: str, dropout_p: float) -> None:
    """The tolerance of the other sparse backends' test (tests/test_functional.py)."""
    spec = CASES[case]
    inputs = make_case(*spec["dims"])
    graph, kw = sampled(inputs, pad=spec["pad"], causal=spec["causal"])
    gen = dict(generator=torch.Generator().manual_seed(9), dropout_p=dropout_p)  # a fixed mask
    want = run(inputs, graph, "dense", **gen, **kw)
    gen["generator"] = torch.Generator().manual_seed(9)
    got = run(inputs, graph, BACKEND, **gen, **kw)
    assert_close_all(got, want)


@pytest.mark.parametrize("case", ["cross, D=24, Dv=20", "causal, padding, D=64"])
def test_matches_dense_in_float32(interpreter, case: str) -> None:
    """float32 inputs, float32 accumulation, against the float64 reference."""
    spec = CASES[case]
    inputs64 = make_case(*spec["dims"])
    graph, kw = sampled(inputs64, pad=spec["pad"], causal=spec["causal"])
    want = run(
        inputs64, graph, "dense", dropout_p=0.2, generator=torch.Generator().manual_seed(3), **kw
    )
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    got = run(
        inputs32, graph, BACKEND, dropout_p=0.2, generator=torch.Generator().manual_seed(3), **kw
    )
    assert all(t.dtype == torch.float32 for t in got)
    assert_close_all([t.double() for t in got], want, rtol=1e-5, atol=1e-7)


def test_clipped_straight_through_gradients(interpreter) -> None:
    """A large loss: many edges' gradients exceed 1 and hardtanh clips them (as the dense op)."""
    inputs = make_case(1, 2, 10, 10, 16, 16, 3)
    Y, Z, B = (t.detach() for t in inputs[3:])
    graph = sample_graph(Y, Z, B, exploration=0.1, generator=torch.Generator().manual_seed(2))
    want = run(inputs, graph, "dense", loss_scale=300.0, density_weight=210.0)
    got = run(inputs, graph, BACKEND, loss_scale=300.0, density_weight=210.0)
    assert_close_all(got, want)


def test_empty_rows_and_pairs_and_int64_indices(interpreter) -> None:
    inputs = make_case(2, 2, 6, 5, 16, 16, 2)
    mask = torch.rand(2, 2, 6, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    mask[:, :, 0] = False  # query 0 has no edge in any head
    mask[:, :, :, 4] = False  # key 4 has no edge
    mask[1, 1] = False  # a pair without any edge
    graph = Graph.from_dense(mask)
    want = run(inputs, graph, "dense")
    got = run(inputs, graph, BACKEND)
    assert_close_all(got, want)
    assert torch.all(got[0][:, :, 0] == 0) and torch.all(got[0][1, 1] == 0)
    assert all(torch.isfinite(t).all() for t in got)
    wide = Graph(graph.crow_indices.long(), graph.col_indices.long(), graph.shape)
    assert_close_all(run(inputs, wide, BACKEND), want)
    none = Graph.from_dense(torch.zeros(2, 2, 6, 5, dtype=torch.bool))
    out, density, *grads = run(inputs, none, BACKEND)
    assert not out.any() and not density.any() and not any(g.any() for g in grads)
    # the kernels themselves on a graph without edges (the op skips them)
    graph, q, k, v, go, ste, _ = _kernel_case(torch.float32, 16, sizes=(1, 2, 4, 3))
    none = Graph.from_dense(torch.zeros(1, 2, 4, 3, dtype=torch.bool))
    kern = get_kernels("triton", q)
    out, soft = kern.forward(none, q, k, v, None, 0.5)
    grads = kern.backward(none, q, k, v, None, soft, out, go, 0.5, ste)
    assert not out.any() and not any(g.any() for g in grads if g is not None)


@pytest.mark.parametrize("cross", [False, True])
def test_module_gradients_through_membership_inputs(interpreter, cross: bool) -> None:
    """SBMAttention (memberships given as MembershipInputs: the op returns the features' and
    clusters' gradients) on one graph, dense against sparse-triton, every parameter, dropout
    off (the module draws its mask per call)."""
    torch.manual_seed(0)
    attn = SBMAttention(
        32, 2, num_clusters=5, exploration=0.05, kdim=10 if cross else None,
        vdim=6 if cross else None, init_density=0.3, dropout=0.0,
    ).double()  # fmt: skip
    x = torch.randn(2, 9, 32, dtype=F64)
    kv = torch.randn(2, 7, 10, dtype=F64) if cross else None
    vv = torch.randn(2, 7, 6, dtype=F64) if cross else None
    mask = padding_mask(2, 7 if cross else 9)
    _, stats = attn(x, kv, vv, key_padding_mask=mask)
    results = {}
    for name in ("dense", BACKEND):
        attn.zero_grad()
        attn.backend = name
        out, st = attn(x, kv, vv, key_padding_mask=mask, graph=stats.graph)
        ((out**2).mean() + 0.5 * st.density.mean()).backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        results[name] = (out.detach(), grads)
    (out_d, grads_d), (out_t, grads_t) = results["dense"], results[BACKEND]
    assert torch.allclose(out_t, out_d, rtol=1e-9, atol=1e-12)
    assert set(grads_t) == set(grads_d) and {"clusters", "log_rate_scale"} <= set(grads_t)
    for name, g in grads_d.items():
        assert torch.allclose(grads_t[name], g, rtol=1e-6, atol=1e-12), name


def _kernel_case(dtype: torch.dtype, d: int, *, device: str = "cpu", sizes=(2, 2, 12, 10)):
    """Flat inputs of the kernels (q, k, v, grad_out in ``dtype``; memberships float32), a
    graph with an empty row, and dropout factors."""
    b, h, n, m = sizes
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(b, h, n, m, generator=g) < min(0.5, 64 / m)
    mask[:, :, 1] = False
    graph = Graph.from_dense(mask.to(device))
    rows, cols = b * h * n, b * h * m
    q, k, v, go = (
        torch.randn(size, d, generator=g).to(device, dtype) for size in (rows, cols, cols, rows)
    )
    ste = Memberships(
        torch.rand(rows, 7, generator=g).to(device),
        torch.rand(cols, 7, generator=g).to(device),
        torch.randn(b * h, generator=g).to(device) * 0.1,
    )
    drop = ((torch.rand(graph.num_edges, generator=g) >= 0.5).float() * 2.0).to(device)
    return graph, q, k, v, go, ste, drop


def _check_kernels(kern, graph, q, k, v, go, ste, drop, rtol: float) -> None:
    """``kern`` on (q, k, v) against the torch kernels in float64 on the same (rounded)
    values: out and every gradient, within ``rtol`` of each reference's largest entry. The
    dropout factors (0 or 2) are exact in every dtype."""
    ref = TorchKernels()
    scale = q.shape[1] ** -0.5
    out, soft = kern.forward(graph, q, k, v, drop.to(q.dtype), scale)
    q64, k64, v64, go64 = (t.double() for t in (q, k, v, go))
    ste64 = Memberships(*(t.double() for t in ste))
    want, soft64 = ref.forward(graph, q64, k64, v64, drop.double(), scale)
    grads = kern.backward(graph, q, k, v, drop.to(q.dtype), soft, out, go, scale, ste)
    wants = ref.backward(graph, q64, k64, v64, drop.double(), soft64, want, go64, scale, ste64)
    assert out.dtype == q.dtype and grads.q.dtype == q.dtype and grads.v.dtype == q.dtype
    assert grads.gz is not None and grads.gz.dtype == ste.z.dtype
    names = ["out", "q", "k", "v", "gz", "gy"]
    for name, a, b in zip(names, (out, *grads), (want, *wants), strict=True):
        err = (a.double() - b).abs().max()
        assert err <= rtol * b.abs().max() + 1e-6, f"{name}: {err:.2e} of {b.abs().max():.2e}"


def test_autocast_hands_the_kernels_bfloat16(interpreter, monkeypatch) -> None:
    """Under bf16 autocast, SBMAttention passes bfloat16 q, k, v to the Triton kernels as they
    are (half the gathered bytes of float32) and matches the float32 torch.sparse path to bf16
    rounding, values and input gradients (same graph, same dropout mask)."""
    from sbm_transformer.ops import _triton_kernels as tk

    seen: list[torch.dtype] = []
    forward = tk.TritonKernels.forward

    def spy(self, graph, q, k, v, drop, scale):
        seen.append(q.dtype)
        return forward(self, graph, q, k, v, drop, scale)

    monkeypatch.setattr(tk.TritonKernels, "forward", spy)
    torch.manual_seed(0)
    outs, grads = [], []
    state = SBMAttention(32, 2, num_clusters=8).state_dict()
    for backend in (BACKEND, "sparse-torch"):
        attn = SBMAttention(32, 2, num_clusters=8, backend=backend, dropout=0.1)
        attn.load_state_dict(state)
        x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attn(x, generator=torch.Generator().manual_seed(1))
        out.float().pow(2).mean().backward()
        outs.append(out.float())
        grads.append(x.grad)
    assert seen == [torch.bfloat16]
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=4e-3)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-5)


@pytest.mark.parametrize(
    ("dtype", "d", "rtol"),
    [(torch.bfloat16, 24, 2e-2), (torch.float16, 16, 4e-3), (torch.float32, 64, 1e-5)],
)
def test_half_precision_inputs(interpreter, dtype: torch.dtype, d: int, rtol: float) -> None:
    """The kernels called directly with float16/bfloat16 tensors: float32 accumulation,
    outputs and gradients in the inputs' dtype, straight-through products in the
    memberships'."""
    kern = get_kernels("triton", torch.empty(0))
    _check_kernels(kern, *_kernel_case(dtype, d), rtol=rtol)


def test_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors: Triton only when asked by name, and then only under the interpreter."""
    from sbm_transformer.ops import _triton_kernels as tk

    x = torch.zeros(2, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if tk.interpreting():  # triton imported under TRITON_INTERPRET=1: interpreted for good
        monkeypatch.setattr(tk, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_kernels("triton", x)
    inputs = make_case(1, 1, 4, 4, 16, 16, 2)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sbm_attention(*inputs, backend=BACKEND)
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_kernels("triton", x).name == "triton"
    assert get_kernels("auto", x).name in ("numba", "torch")  # never Triton on the CPU
    assert get_kernels("auto", x.double()).name in ("numba", "torch")


def test_compiled_core_matches_eager(interpreter) -> None:
    """torch.compile (aot_eager, fullgraph) of the attention core on CPU tensors: the custom ops
    of ops/library.py dispatch to the Triton kernels by name, as they will on CUDA."""
    from sbm_transformer.ops import library

    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        attn = SBMAttention(32, 2, 4, backend=BACKEND, dropout=0.0).double()
        x = torch.randn(2, 12, 32, dtype=F64, requires_grad=True)
        _, stats = attn(x, generator=torch.Generator().manual_seed(1))
        graph = stats.graph
        calls: list[str] = []
        real = library.get_kernels

        def spy(name: str, *tensors: torch.Tensor):
            calls.append(name)
            return real(name, *tensors)

        def core(x: torch.Tensor) -> torch.Tensor:
            out, s = attn(x, graph=graph)
            return out.square().sum() + s.density.sum()

        eager = core(x)
        eager.backward()
        expected = [x.grad.clone(), *(p.grad.clone() for p in attn.parameters())]
        x.grad = None
        attn.zero_grad()
        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setattr(library, "get_kernels", spy)
        try:
            compiled = torch.compile(core, fullgraph=True, backend="aot_eager")(x)
            compiled.backward()
        finally:
            monkeypatch.undo()
        assert calls == ["triton", "triton"]  # forward and backward custom ops
        torch.testing.assert_close(compiled, eager)
        got = [x.grad, *(p.grad for p in attn.parameters())]
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b)
    finally:
        torch._dynamo.reset()


def test_custom_ops_pass_opcheck_with_triton(interpreter) -> None:
    """The fake implementations give the Triton softmax's shapes and dtypes (no per-edge
    weights; a float32 log-sum-exp per row)."""
    from sbm_transformer.ops import library

    torch.manual_seed(0)
    q, k, v = torch.randn(6, 16), torch.randn(6, 16), torch.randn(6, 16)
    crow = torch.tensor([0, 2, 3, 3, 5, 6, 6], dtype=torch.int32)  # (B, H, N, M) = (1, 2, 3, 3)
    col = torch.tensor([0, 2, 1, 0, 1, 2], dtype=torch.int32)
    empty = torch.empty(0)
    args = (q, k, v, crow, col, empty, [1, 2, 3, 3], -1, 0.5, "triton")
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(library.edge_attention, args, test_utils=utils)
    out, weights, lse = library.edge_attention(*args)
    assert weights.shape == (0,) and lse.shape == (6,)
    y, z, g_pair = torch.rand(6, 3), torch.rand(6, 3), torch.randn(2)
    bwd = (torch.randn_like(out), q, k, v, crow, col, empty, weights, lse, out, y, z, g_pair,
           [1, 2, 3, 3], -1, 0.5, "triton")  # fmt: skip
    torch.library.opcheck(library.edge_attention_backward, bwd, test_utils=utils)
    none = torch.zeros(7, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    torch.library.opcheck(library.edge_attention, (q, k, v, *none, *args[5:]), test_utils=utils)


def test_kernels_compile_for_sm90() -> None:
    """Every kernel, for each input dtype, compiles to sm_90 cubin (no GPU needed: Triton's
    bundled ptxas). The interpreter runs code the compiler may reject (loop-carried types,
    scalar shapes): this is the CPU's only check of the compiled path."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends or not hasattr(triton, "knobs"):
        pytest.skip("triton without its CUDA backend, or older than 3.4 (another compile API)")
    from sbm_transformer.ops import _triton_kernels as tk

    fns = tk._build(interpret=False)
    target = GPUTarget("cuda", 90, 32)
    scalars = {"n", "m", "d", "dv", "kz"}
    indices = {"crow", "col", "ptr", "trow", "perm"}
    accumulators = {"lse", "delta", "scale_ptr"}
    for dtype, idx, acc, flags in (
        ("fp32", "i32", "fp32", True), ("bf16", "i64", "fp32", False),
        ("fp16", "i32", "fp32", True), ("fp64", "i32", "fp64", True),
    ):  # fmt: skip
        for fn in (fns.forward, fns.backward_rows, fns.backward_cols):
            consts = dict(
                HAS_DROP=flags, HAS_STE=flags, ACC=triton.language.float64 if acc == "fp64"
                else triton.language.float32, BLOCK_E=32, BLOCK_D=64, BLOCK_DV=32, BLOCK_K=16,
            )  # fmt: skip
            consts = {name: c for name, c in consts.items() if name in fn.arg_names}
            sig = {
                name: "constexpr" if name in consts else "i32" if name in scalars
                else f"*{idx}" if name in indices else f"*{acc}" if name in accumulators
                else f"*{dtype}"
                for name in fn.arg_names
            }  # fmt: skip
            src = ASTSource(fn, sig, constexprs=consts)
            kernel = triton.compile(
                src, target=target, options=dict(num_warps=4, enable_fp_fusion=True)
            )
            assert kernel.asm["cubin"], (fn.__name__, dtype)


# ---------------------------------------------------------------------- CUDA (compiled)
def _realistic(device: str, *, n: int, m: int, causal: bool, density: float, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    b, h = 2, 4
    mask = torch.rand(b, h, n, m, generator=g, device=device) < density
    if causal:
        mask &= torch.ones(n, m, dtype=torch.bool, device=device).tril()
    mask[:, :, 3] = False  # an empty row in every pair
    pad = padding_mask(b, m).to(device)
    mask &= ~pad[:, None, None, :]
    return Graph.from_dense(mask), pad


@pytest.mark.parametrize(
    ("n", "m", "d", "causal"),
    [(1024, 1024, 64, False), (1024, 1024, 128, True), (768, 1536, 32, False)],
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cuda_matches_float64_reference(gpu, n, m, d, causal, dropout_p) -> None:
    """float32 through sbm_attention (every gradient) against sparse-torch in float64, and
    float64 sparse-triton at the functional tests' tolerance."""
    graph, pad = _realistic("cuda", n=n, m=m, causal=causal, density=48 / m)
    b, h = 2, 4
    inputs = [t.cuda().detach().requires_grad_() for t in make_case(b, h, n, m, d, d, 16)]
    kw = dict(key_padding_mask=pad, causal=causal, dropout_p=dropout_p)

    def gen():
        return torch.Generator(device="cuda").manual_seed(5)

    want = run(inputs, graph, "sparse-torch", generator=gen(), **kw)
    assert_close_all(run(inputs, graph, BACKEND, generator=gen(), **kw), want)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    got = run(inputs32, graph, BACKEND, generator=gen(), **kw)
    assert_close_all([t.double() for t in got], want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_half_precision_kernels(gpu, dtype: torch.dtype, rtol: float, d: int) -> None:
    kern = get_kernels("triton", torch.empty(0, device="cuda"))
    case = _kernel_case(dtype, d, device="cuda", sizes=(2, 4, 512, 640))
    _check_kernels(kern, *case, rtol=rtol)


def test_cuda_auto_picks_triton(gpu) -> None:
    x = torch.zeros(2, 2, device="cuda")
    assert get_kernels("auto", x).name == "triton"
    assert get_kernels("auto", x.bfloat16()).name == "triton"
    assert get_kernels("auto", x.double()).name == "torch"  # float64: cuSPARSE


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cuda_compiled_module_matches_eager(gpu, compiler: str) -> None:
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        attn = SBMAttention(256, 4, 32, backend="sparse", dropout=0.0).cuda()
        x = torch.randn(2, 1024, 256, device="cuda", requires_grad=True)
        _, stats = attn(x, generator=torch.Generator(device="cuda").manual_seed(1))

        def core(x: torch.Tensor) -> torch.Tensor:
            out, s = attn(x, graph=stats.graph)
            return out.square().mean() + s.density.sum()

        eager = core(x)
        eager.backward()
        expected = [x.grad.clone(), *(p.grad.clone() for p in attn.parameters())]
        x.grad = None
        attn.zero_grad()
        compiled = torch.compile(core, fullgraph=True, backend=compiler)(x)
        compiled.backward()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        got = [x.grad, *(p.grad for p in attn.parameters())]
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_cuda_module_trains_under_bf16_autocast(gpu) -> None:
    torch.manual_seed(0)
    attn = SBMAttention(128, 4, num_clusters=16, backend=BACKEND, dropout=0.1).cuda()
    opt = torch.optim.SGD(attn.parameters(), lr=0.1)
    x = torch.randn(4, 2048, 128, device="cuda")
    before = attn.clusters.detach().clone()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, stats = attn(x)
            loss = out.float().square().mean() + 1e-2 * stats.density.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert stats.num_edges > 0 and torch.isfinite(out.float()).all()
    assert not torch.equal(before, attn.clusters)


def test_cuda_sbm_sampled_graph(gpu) -> None:
    """A sampled graph on the GPU (the torch sampler), 4k tokens, through sbm_attention."""
    b, h, n, d, k = 1, 2, 4096, 64, 16
    Y, Z, B = (t.cuda().float() for t in sbm_inputs(b, h, n, n, k, dtype=torch.float32))
    q, kk, v = (torch.randn(b, h, n, d, device="cuda") for _ in range(3))
    B = B * 64 / n  # about 16 edges per query
    graph = sample_graph(Y, Z, B, exploration=0.0)
    out_t, _ = sbm_attention(q, kk, v, Y, Z, B, graph=graph, backend=BACKEND)
    out_r, _ = sbm_attention(q, kk, v, Y, Z, B, graph=graph, backend="sparse-torch")
    torch.testing.assert_close(out_t, out_r, rtol=1e-4, atol=1e-5)
