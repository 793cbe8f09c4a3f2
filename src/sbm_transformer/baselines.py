"""Efficient-attention baselines to compare SBM attention against.

Four multi-head self-attention mechanisms behind the interface of
:mod:`sbm_transformer.mechanisms` (``forward(x, key_padding_mask) -> AttentionResult``, batch
first, ``key_padding_mask`` True = padding key that never influences any output):

- :class:`LinearAttention`: Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive
  Transformers with Linear Attention", ICML 2020, arXiv:2006.16236.
- :class:`PerformerAttention`: Choromanski et al., "Rethinking Attention with Performers"
  (FAVOR+), ICLR 2021, arXiv:2009.14794.
- :class:`LinformerAttention`: Wang et al., "Linformer: Self-Attention with Linear Complexity",
  2020, arXiv:2006.04768.
- :class:`NystromAttention`: Xiong et al., "Nystromformer: A Nystrom-Based Algorithm for
  Approximating Self-Attention", AAAI 2021, arXiv:2102.03902.

Shapes in comments: B batch, N sequence, E model dimension, H heads, D head dimension.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sbm_transformer.attention_result import AttentionResult

__all__ = ["LinearAttention", "LinformerAttention", "NystromAttention", "PerformerAttention"]

#: Feature maps of :class:`PerformerAttention`.
PERFORMER_KERNELS = ("relu", "softmax")


def _zero_padded(t: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    """Zero the rows of padded positions of a ``(B, H, N, D)`` tensor."""
    if key_padding_mask is None:
        return t
    return t.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def _linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, eps: float) -> Tensor:
    """``phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j) + eps)``, non-causal."""
    kv = phi_k.transpose(-1, -2) @ v  # (B, H, D, D): sum_j phi(k_j) v_j^T
    num = phi_q @ kv  # (B, H, N, D)
    den = phi_q @ phi_k.sum(2).unsqueeze(-1)  # (B, H, N, 1)
    return num / (den + eps)


def _exclusive_cumsum(t: Tensor, dim: int) -> Tensor:
    """Sums over the entries strictly before each one along ``dim`` (no later entry is read)."""
    shifted = torch.cat(
        [torch.zeros_like(t.narrow(dim, 0, 1)), t.narrow(dim, 0, t.shape[dim] - 1)], dim
    )
    return shifted.cumsum(dim)


def _causal_linear_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, eps: float, chunk: int
) -> Tensor:
    """:func:`_linear_attention` with sums over ``j <= i`` only, in chunks of ``chunk`` positions.

    Earlier chunks enter through prefix sums of their ``(D, D)`` states, positions of the same
    chunk through a lower-triangular ``(chunk, chunk)`` score matrix: memory ``O(N D^2 / chunk +
    N chunk)`` per head instead of ``O(N D^2)`` for a prefix sum over every position.
    """
    b, h, n, _ = phi_q.shape
    pad = -n % chunk
    # zero features of the padded tail add nothing to any sum; its outputs are cut off below
    q, k, v = (
        F.pad(t, (0, 0, 0, pad)).reshape(b, h, -1, chunk, t.shape[-1]) for t in (phi_q, phi_k, v)
    )
    # q, k, v: (B, H, C, L, D) for C chunks of L = chunk positions
    kv = _exclusive_cumsum(k.transpose(-1, -2) @ v, dim=2)  # (B, H, C, D, D): earlier chunks
    ksum = _exclusive_cumsum(k.sum(3), dim=2).unsqueeze(-1)  # (B, H, C, D, 1)
    scores = (q @ k.transpose(-1, -2)).tril()  # (B, H, C, L, L): phi(q_i)^T phi(k_j), j <= i
    num = q @ kv + scores @ v  # (B, H, C, L, D)
    den = q @ ksum + scores.sum(-1, keepdim=True)  # (B, H, C, L, 1)
    return (num / (den + eps)).reshape(b, h, n + pad, -1)[:, :, :n]  # (B, H, N, D)


class _MultiHeadSelfAttention(nn.Module):
    """Shared parts: argument checks, the q/k/v and output projections and the dropout."""

    #: Whether the mechanism supports ``causal=True``.
    supports_causal: ClassVar[bool] = False

    def __init__(self, dim: int, heads: int, *, causal: bool, dropout: float, max_len: int) -> None:
        super().__init__()
        name = type(self).__name__
        if heads < 1:
            raise ValueError(f"{name}: heads must be a positive int, got heads={heads}")
        if dim < 1 or dim % heads:
            raise ValueError(
                f"{name}: dim must be a positive multiple of heads, got dim={dim} and heads={heads}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1], got dropout={dropout}")
        if max_len < 0:
            raise ValueError(f"{name}: max_len must be >= 0, got max_len={max_len}")
        if causal and not self.supports_causal:
            raise ValueError(
                f"{name} cannot be causal (got causal=True): every query attends to all keys; "
                "use causal=False"
            )
        self.heads, self.causal, self.max_len = heads, causal, max_len
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project ``(B, N, E)`` inputs to queries, keys and values, each ``(B, H, N, D)``."""
        b, n, e = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _merge_heads(self, out: Tensor) -> AttentionResult:
        """Concatenate ``(B, H, N, D)`` head outputs and apply the output projection."""
        b, h, n, d = out.shape
        return AttentionResult(self.out(out.transpose(1, 2).reshape(b, n, h * d)))  # (B, N, E)


class LinearAttention(_MultiHeadSelfAttention):
    """Linear attention with the feature map ``elu(x) + 1`` (Katharopoulos et al., ICML 2020).

    ``out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps)`` with
    ``eps = 1e-6`` as in the reference implementation (fast-transformers); with ``causal=True``
    the sums run over ``j <= i``. Padded keys get zero features and values. No attention matrix
    exists, so ``dropout`` applies to the per-head outputs (training only).

    Args:
        chunk_size: positions per chunk of the causal computation (memory/speed trade-off; the
            result does not depend on it). Unused when not causal.
    """

    supports_causal = True
    #: Added to the normaliser (a fully padded row then gives zeros, never NaN).
    eps: ClassVar[float] = 1e-6

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        max_len: int = 0,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(dim, heads, causal=causal, dropout=dropout, max_len=max_len)
        if chunk_size < 1:
            raise ValueError(
                f"LinearAttention: chunk_size must be >= 1, got chunk_size={chunk_size}"
            )
        self.chunk_size = chunk_size

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> AttentionResult:
        q, k, v = self._split_heads(x)  # (B, H, N, D)
        phi_q = F.elu(q) + 1
        phi_k = _zero_padded(F.elu(k) + 1, key_padding_mask)
        v = _zero_padded(v, key_padding_mask)
        if self.causal:
            out = _causal_linear_attention(phi_q, phi_k, v, self.eps, self.chunk_size)
        else:
            out = _linear_attention(phi_q, phi_k, v, self.eps)
        return self._merge_heads(self.dropout(out))


def _orthogonal_gaussian(rows: int, cols: int) -> Tensor:
    """``(rows, cols)`` random features of FAVOR+: orthogonal Gaussian directions.

    Stacked blocks of ``cols`` orthonormal rows (QR of Gaussian matrices), each row rescaled to
    the norm of an independent Gaussian vector so that rows are marginally ``N(0, I)``. Drawn
    from torch's global random generator. Unlike the reference implementations, the QR factor is
    sign-corrected: raw LAPACK ``Q`` is not Haar-distributed (its first column always has a
    negative first entry), which biases the kernel estimate for any number of features.
    """
    blocks = []
    for _ in range(-(-rows // cols)):
        q, r = torch.linalg.qr(torch.randn(cols, cols))
        # signs of diag(R) fixed: Q is then Haar-distributed and its columns isotropic
        blocks.append((q * r.diagonal().sign()).T)
    norms = torch.randn(rows, cols).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:rows] * norms


class PerformerAttention(_MultiHeadSelfAttention):
    """FAVOR+ attention with orthogonal random features (Choromanski et al., ICLR 2021).

    Queries and keys are scaled by ``D**-0.25`` and mapped by random features ``W``
    (``(num_features, D)``, orthogonal Gaussian, drawn once at construction from torch's global
    generator and stored as the buffer ``projection``, so it is part of the ``state_dict``):

    - ``kernel="relu"``: ``phi(x) = relu(W x) + 1e-3`` (the paper's generalised attention);
    - ``kernel="softmax"``: positive random features
      ``phi(x) = (exp(W x - |x|^2 / 2 - c) + 1e-4) / sqrt(num_features)``, an unbiased estimate
      of the softmax kernel ``exp(q.k / sqrt(D))``; the stabiliser ``c`` is a max over features
      (per query) or over all keys and features (keys) and cancels in the normalisation.

    followed by the normalisation of :class:`LinearAttention`. Constants follow the reference
    implementation performer-pytorch. Padded keys are zeroed before and after the feature map.
    ``dropout`` applies to the per-head outputs (training only). Non-causal only.

    Args:
        num_features: random features m (the SBM-Transformer LRA configuration used 256).
        kernel: ``"relu"`` or ``"softmax"``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        max_len: int = 0,
        num_features: int = 256,
        kernel: str = "relu",
    ) -> None:
        super().__init__(dim, heads, causal=causal, dropout=dropout, max_len=max_len)
        if num_features < 1:
            raise ValueError(
                f"PerformerAttention: num_features must be >= 1, got num_features={num_features}"
            )
        if kernel not in PERFORMER_KERNELS:
            raise ValueError(
                f"PerformerAttention: unknown kernel {kernel!r}; valid kernels: {PERFORMER_KERNELS}"
            )
        self.kernel = kernel
        self.projection: Tensor
        self.register_buffer("projection", _orthogonal_gaussian(num_features, dim // heads))

    def _features(self, x: Tensor, is_query: bool) -> Tensor:
        """``(B, H, N, D)`` -> ``(B, H, N, num_features)`` positive features."""
        x = x * x.shape[-1] ** -0.25
        wx = x @ self.projection.to(x.dtype).T  # (B, H, N, M)
        if self.kernel == "relu":
            return F.relu(wx) + 1e-3
        stabiliser = wx.amax(dim=-1 if is_query else (-2, -1), keepdim=True).detach()
        sq_norm = x.pow(2).sum(-1, keepdim=True) / 2  # (B, H, N, 1)
        return (torch.exp(wx - sq_norm - stabiliser) + 1e-4) * wx.shape[-1] ** -0.5

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> AttentionResult:
        q, k, v = self._split_heads(x)  # (B, H, N, D)
        # zeroed padded keys cannot move the key stabiliser; their features are zeroed after
        k, v = _zero_padded(k, key_padding_mask), _zero_padded(v, key_padding_mask)
        phi_q = self._features(q, is_query=True)
        phi_k = _zero_padded(self._features(k, is_query=False), key_padding_mask)
        # features are positive, so the normaliser is 0 only for a fully padded row (output 0)
        out = _linear_attention(phi_q, phi_k, v, torch.finfo(q.dtype).tiny)
        return self._merge_heads(self.dropout(out))


class LinformerAttention(_MultiHeadSelfAttention):
    """Linformer attention: keys and values projected along the sequence (Wang et al., 2020).

    Learned projections ``E`` and ``F`` (``nn.Linear(max_len, proj_len, bias=False)``, shared
    by all heads, as the paper's headwise-shared variant) map the ``N`` keys and values to
    ``proj_len`` rows; softmax attention then runs over those rows. Inputs shorter than
    ``max_len`` are zero-padded along the sequence up to ``max_len`` (equivalently, only the
    first ``N`` columns of ``E`` and ``F`` are used). Padded keys and values are zeroed before the
    projection. ``dropout`` applies to the ``(N, proj_len)`` attention probabilities (training
    only). Non-causal only.

    Args:
        max_len: longest accepted sequence (>= 1); longer inputs raise ValueError.
        proj_len: projected length k (the SBM-Transformer LRA configuration used 256).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        max_len: int = 0,
        proj_len: int = 256,
    ) -> None:
        super().__init__(dim, heads, causal=causal, dropout=dropout, max_len=max_len)
        if max_len < 1:
            raise ValueError(
                f"LinformerAttention needs max_len >= 1 (the longest sequence its projections "
                f"accept), got max_len={max_len}"
            )
        if proj_len < 1:
            raise ValueError(f"LinformerAttention: proj_len must be >= 1, got proj_len={proj_len}")
        self.proj_k = nn.Linear(max_len, proj_len, bias=False)  # E
        self.proj_v = nn.Linear(max_len, proj_len, bias=False)  # F

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> AttentionResult:
        n = x.shape[1]
        if n > self.max_len:
            raise ValueError(
                f"LinformerAttention: sequence length N={n} exceeds max_len={self.max_len}; "
                f"build it with max_len >= {n}"
            )
        q, k, v = self._split_heads(x)  # (B, H, N, D)
        k, v = _zero_padded(k, key_padding_mask), _zero_padded(v, key_padding_mask)
        # (P, N) @ (B, H, N, D) -> (B, H, P, D): zero-padding N to max_len would add nothing
        k = self.proj_k.weight[:, :n] @ k
        v = self.proj_v.weight[:, :n] @ v
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout.p if self.training else 0.0
        )
        return self._merge_heads(out)


def _iterative_pinv(mat: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of ``(..., L, L)`` matrices, Nystromformer eq. (16).

    ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from ``Z_0 = A^T / (||A||_1 ||A||_inf)``.
    The norms are taken per matrix (the official code takes one maximum over the whole batch,
    which couples batch elements). Zero rows and columns of ``A`` stay zero in ``Z``.
    """
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    norm = mat.abs().sum(-2).amax(-1) * mat.abs().sum(-1).amax(-1)  # (...,)
    z = mat.transpose(-1, -2) / norm.clamp_min(torch.finfo(mat.dtype).tiny)[..., None, None]
    for _ in range(iterations):
        az = mat @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(_MultiHeadSelfAttention):
    """Nystromformer attention with segment-mean landmarks (Xiong et al., AAAI 2021).

    With ``q`` scaled by ``D**-0.5`` and landmarks ``q~``, ``k~`` the means of ``num_landmarks``
    consecutive segments (the sequence is zero-padded up to a multiple of ``num_landmarks``):
    ``out = softmax(q k~^T) pinv(softmax(q~ k~^T)) softmax(q~ k^T) v``, the pseudo-inverse by
    ``pinv_iterations`` steps of the iterative method of the paper. Following the official code,
    a depthwise ``Conv2d`` over the sequence (kernel ``(conv_kernel_size, 1)``, one filter per
    head) of ``v`` is added. Sequences with ``N <= num_landmarks`` use exact softmax attention
    (plus the convolution), as the official code does when they are equal.

    Padding: padded queries, keys and values are zeroed and left out of the landmark means;
    padded keys are masked before the softmaxes; landmarks whose segment is all padding are
    dropped (their rows and columns of ``softmax(q~ k~^T)`` are zero, which the pseudo-inverse
    preserves). ``dropout`` applies to the per-head outputs (training only). Non-causal only.

    Args:
        num_landmarks: landmarks m (the SBM-Transformer LRA configuration used 32).
        conv_kernel_size: odd kernel length of the convolution on ``v``; 0 disables it.
        pinv_iterations: iterations of the pseudo-inverse (paper: 6).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        max_len: int = 0,
        num_landmarks: int = 32,
        conv_kernel_size: int = 35,
        pinv_iterations: int = 6,
    ) -> None:
        super().__init__(dim, heads, causal=causal, dropout=dropout, max_len=max_len)
        if num_landmarks < 1:
            raise ValueError(
                f"NystromAttention: num_landmarks must be >= 1, got num_landmarks={num_landmarks}"
            )
        if conv_kernel_size < 0 or (conv_kernel_size > 0 and conv_kernel_size % 2 == 0):
            raise ValueError(
                "NystromAttention: conv_kernel_size must be 0 (no convolution) or an odd "
                f"positive int, got conv_kernel_size={conv_kernel_size}"
            )
        if pinv_iterations < 1:
            raise ValueError(
                "NystromAttention: pinv_iterations must be >= 1, "
                f"got pinv_iterations={pinv_iterations}"
            )
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.conv = (
            nn.Conv2d(
                heads,
                heads,
                (conv_kernel_size, 1),
                padding=(conv_kernel_size // 2, 0),
                groups=heads,
                bias=False,
            )
            if conv_kernel_size
            else None
        )

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> AttentionResult:
        b, n, _ = x.shape
        q, k, v = self._split_heads(x)  # (B, H, N, D)
        q = q * q.shape[-1] ** -0.5
        q, k, v = (_zero_padded(t, key_padding_mask) for t in (q, k, v))
        keep = (
            torch.ones(b, n, dtype=torch.bool, device=x.device)
            if key_padding_mask is None
            else ~key_padding_mask
        )
        if n <= self.num_landmarks:
            out = self._exact(q, k, v, keep)
        else:
            out = self._nystrom(q, k, v, keep)
        if self.conv is not None:
            out = out + self.conv(v)  # padded values are zero
        return self._merge_heads(self.dropout(out))

    @staticmethod
    def _exact(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
        """Softmax attention of scaled ``q`` over the kept keys, ``(B, H, N, D)``."""
        scores = (q @ k.transpose(-1, -2)).masked_fill(
            ~keep[:, None, None, :], torch.finfo(q.dtype).min
        )
        return scores.softmax(-1) @ v

    def _nystrom(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
        """The Nystrom approximation for scaled, padding-zeroed ``q``, ``k``, ``v``."""
        b, h, n, d = q.shape
        m = self.num_landmarks
        pad = -n % m
        # segment sums of zeroed q and k over kept positions, divided by the kept counts
        count = F.pad(keep, (0, pad)).reshape(b, m, -1).sum(-1)  # (B, m)
        q_land, k_land = (F.pad(t, (0, 0, 0, pad)).reshape(b, h, m, -1, d).sum(3) for t in (q, k))
        q_land, k_land = (
            t / count.clamp_min(1)[:, None, :, None].to(q.dtype) for t in (q_land, k_land)
        )
        # q_land, k_land: (B, H, m, D); landmarks of all-padding segments are masked out
        valid = (count > 0)[:, None, None, :]  # (B, 1, 1, m)
        padded_key = ~keep[:, None, None, :]  # (B, 1, 1, N)
        neg = torch.finfo(q.dtype).min
        k_land_t = k_land.transpose(-1, -2)  # (B, H, D, m)
        kernel_1 = (q @ k_land_t).masked_fill(~valid, neg).softmax(-1)  # (B, H, N, m)
        kernel_2 = (q_land @ k_land_t).masked_fill(~valid, neg).softmax(-1)  # (B, H, m, m)
        kernel_2 = kernel_2 * valid.transpose(-1, -2)  # zero the rows of dropped landmarks too
        kernel_3 = (q_land @ k.transpose(-1, -2)).masked_fill(padded_key, neg).softmax(-1)
        # kernel_3: (B, H, m, N)
        return (kernel_1 @ _iterative_pinv(kernel_2, self.pinv_iterations)) @ (kernel_3 @ v)
