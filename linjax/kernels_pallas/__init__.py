"""Pallas kernels with XLA fallbacks and pure-jnp references (see DESIGN.md §7).

* :func:`local_attention` — 1-D sliding-window softmax attention.
* :func:`local_attention_2d` — CLEAR's 2-D local attention: a disc ``dy² + dx² < r²`` on an
  image grid plus a prefix of global tokens that see and are seen by everything.
* :func:`gated_linear_attention` / :func:`gla_decode_step` — gated linear attention
  (per-channel forget gates), chunkwise for training/prefill and one step for decoding.

Every op takes ``impl="auto" | "pallas" | "xla" | "reference"``: ``"auto"`` runs the Pallas
kernel on GPU/TPU and the blocked XLA implementation on CPU; Pallas runs through its
interpreter on CPU. Each op has an ``<op>_reference`` oracle.
"""

from linjax.kernels_pallas import layers as layers
from linjax.kernels_pallas._gla import gated_linear_attention as gated_linear_attention
from linjax.kernels_pallas._gla import (
    gated_linear_attention_reference as gated_linear_attention_reference,
)
from linjax.kernels_pallas._gla import gla_decode_step as gla_decode_step
from linjax.kernels_pallas._local_attention import local_attention as local_attention
from linjax.kernels_pallas._local_attention import (
    local_attention_reference as local_attention_reference,
)
from linjax.kernels_pallas._local_attention_2d import local_attention_2d as local_attention_2d
from linjax.kernels_pallas._local_attention_2d import (
    local_attention_2d_reference as local_attention_2d_reference,
)
