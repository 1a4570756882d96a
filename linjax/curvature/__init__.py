"""linjax.curvature (see DESIGN.md). Public names are re-exported here as they land."""

from linjax.curvature._gauss_newton import GaussNewtonState as GaussNewtonState
from linjax.curvature._gauss_newton import gauss_newton as gauss_newton
from linjax.curvature._gauss_newton import gauss_newton_direction as gauss_newton_direction
from linjax.curvature._gauss_newton import gauss_newton_unlearn as gauss_newton_unlearn
from linjax.curvature._mfac import MFACState as MFACState
from linjax.curvature._mfac import mfac as mfac
from linjax.curvature._mfac import mfac_from_grads as mfac_from_grads
from linjax.curvature._mfac import mfac_ihvp as mfac_ihvp
from linjax.curvature._mfac import mfac_init as mfac_init
from linjax.curvature._mfac import mfac_inverse_diagonal as mfac_inverse_diagonal
from linjax.curvature._mfac import mfac_update as mfac_update
from linjax.curvature._obs import obs_prune as obs_prune
from linjax.curvature._obs import obs_saliency as obs_saliency
from linjax.curvature._products import fisher as fisher
from linjax.curvature._products import ggn as ggn
from linjax.curvature._products import hvp as hvp
from linjax.curvature._products import per_example_grads as per_example_grads
from linjax.curvature._products import (
    sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy,
)
from linjax.curvature._products import softmax_cross_entropy as softmax_cross_entropy
from linjax.curvature._products import squared_error as squared_error
from linjax.curvature._spectrum import SharpnessReport as SharpnessReport
from linjax.curvature._spectrum import hessian_density as hessian_density
from linjax.curvature._spectrum import hessian_eigs as hessian_eigs
from linjax.curvature._spectrum import sharpness as sharpness
