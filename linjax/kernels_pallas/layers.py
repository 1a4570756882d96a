"""Attention layers (flax nnx) on the kernels of :mod:`linjax.kernels_pallas`.

* :class:`SoftmaxAttention` — causal multi-head softmax attention with a KV cache; parameter
  shapes as ``flax.nnx.MultiHeadAttention``.
* :class:`GatedLinearAttention` — the GLA layer (low-rank per-channel forget gates), chunkwise
  for training/prefill, :func:`~linjax.kernels_pallas.gla_decode_step` for decoding.
* :class:`LigerAttention` — ``0.5 * sliding-window softmax + 0.5 * GLA`` on shared
  query/key/value weights, gates from the key projection; :func:`linearize` builds one from a
  pretrained softmax layer.
* :class:`LocalAttention2D` — CLEAR's circular 2-D window attention over image tokens with a
  dense global prefix.

Every causal layer has ``__call__(x)`` for training, and ``prefill`` / ``decode_step`` with an
explicit cache (a NamedTuple pytree: :class:`KVCache`, :class:`GLACache`, :class:`LigerCache`)
for generation, so a decode loop can be jitted and scanned.
"""

from linjax.kernels_pallas._layers_clear import LocalAttention2D as LocalAttention2D
from linjax.kernels_pallas._layers_common import GLACache as GLACache
from linjax.kernels_pallas._layers_common import KVCache as KVCache
from linjax.kernels_pallas._layers_common import LigerCache as LigerCache
from linjax.kernels_pallas._layers_gla import GatedLinearAttention as GatedLinearAttention
from linjax.kernels_pallas._layers_liger import LigerAttention as LigerAttention
from linjax.kernels_pallas._layers_liger import linearize as linearize
from linjax.kernels_pallas._layers_softmax import SoftmaxAttention as SoftmaxAttention

__all__ = [
    "GLACache",
    "GatedLinearAttention",
    "KVCache",
    "LigerAttention",
    "LigerCache",
    "LocalAttention2D",
    "SoftmaxAttention",
    "linearize",
]
