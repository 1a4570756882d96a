"""Matrix-free linear algebra on pytrees.

Operators are functions ``matvec(v, *params)`` linear in ``v``; vectors are arbitrary
pytrees. Everything here is a pure function safe under ``jit``, ``vmap`` and sharding.
"""

from linjax.lintools._cg import CGResult as CGResult
from linjax.lintools._cg import cg as cg
from linjax.lintools._eigsh import eigsh as eigsh
from linjax.lintools._hutchinson import hutchinson_diagonal as hutchinson_diagonal
from linjax.lintools._hutchinson import hutchinson_trace as hutchinson_trace
from linjax.lintools._lanczos import LanczosResult as LanczosResult
from linjax.lintools._lanczos import lanczos as lanczos
from linjax.lintools._lanczos import tridiagonal as tridiagonal
from linjax.lintools._operators import MatVec as MatVec
from linjax.lintools._operators import add as add
from linjax.lintools._operators import compose as compose
from linjax.lintools._operators import damped as damped
from linjax.lintools._operators import dense as dense
from linjax.lintools._operators import scale as scale
from linjax.lintools._slq import Quadrature as Quadrature
from linjax.lintools._slq import gauss_quadrature as gauss_quadrature
from linjax.lintools._slq import slq as slq
from linjax.lintools._slq import spectral_density as spectral_density
from linjax.lintools._slq import trace_f as trace_f
