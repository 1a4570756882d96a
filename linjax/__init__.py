"""linjax: pure, jit-compiled JAX transforms for curvature, verification and generative tools.

Subpackages: :mod:`linjax.lintools` (matrix-free linear algebra on pytrees),
:mod:`linjax.curvature`, :mod:`linjax.verify`, :mod:`linjax.generative` and
:mod:`linjax.kernels_pallas`.
"""

from linjax import curvature as curvature
from linjax import generative as generative
from linjax import kernels_pallas as kernels_pallas
from linjax import lintools as lintools
from linjax import verify as verify

__version__ = "0.1.0"
