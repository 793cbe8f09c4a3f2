"""sbm-transformer: SBM-Transformer attention with linear-cost sparse forward and backward.

Every attention head learns a mixed-membership stochastic block model, samples a sparse
bipartite query-key graph from it for each input, and attends only along the sampled edges; a
straight-through estimator trains the edge probabilities (Cho et al., "Transformers meet
Stochastic Block Models: Attention with Data-Adaptive Sparsity and Cost", NeurIPS 2022,
arXiv:2210.15541).

Public API:
    :class:`SBMAttention`: batch-first multi-head attention module.
    :func:`sbm_attention` (also ``sbm_transformer.functional.sbm_attention``): functional form.
    :class:`SBMStats`: what a call sampled (density per head, the graph).
    :class:`AdaptiveThreads`: torch's thread count following the CPUs other processes leave.
    :class:`Graph`: sampled edges of every (batch, head) pair, CSR by query.
    :func:`sample_graph`, :func:`edge_probability`, :func:`expected_num_edges`,
    :func:`expected_adjacency`, :func:`block_matrix`: the SBM and its fastRG sampler.
"""

from sbm_transformer import functional
from sbm_transformer.attention import SBMAttention
from sbm_transformer.functional import BACKENDS, SBMStats, sbm_attention
from sbm_transformer.graph import Graph
from sbm_transformer.sampling import (
    DISTRIBUTIONS,
    block_matrix,
    edge_probability,
    expected_adjacency,
    expected_num_edges,
    sample_graph,
)
from sbm_transformer.threads import AdaptiveThreads

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DISTRIBUTIONS",
    "AdaptiveThreads",
    "Graph",
    "SBMAttention",
    "SBMStats",
    "__version__",
    "block_matrix",
    "edge_probability",
    "expected_adjacency",
    "expected_num_edges",
    "functional",
    "sample_graph",
    "sbm_attention",
]
