"""linjax.verify: sound bounds on neural networks by bound propagation (see DESIGN.md §5).

``fn`` is any JAX function of one array; it is traced to a jaxpr and interpreted primitive
by primitive (:func:`ibp`, :func:`crown`, :func:`alpha_crown`, :func:`linear_bounds`).
New primitives are taught with :func:`register_rule`.
"""

# Importing the rule modules fills the rule table.
from linjax.verify import _crown_rules as _crown_rules
from linjax.verify import _ibp_rules as _ibp_rules
from linjax.verify._alpha_crown import alpha_crown as alpha_crown
from linjax.verify._attack import AttackResult as AttackResult
from linjax.verify._attack import pgd_attack as pgd_attack
from linjax.verify._bab import BaBResult as BaBResult
from linjax.verify._bab import branch_and_bound as branch_and_bound
from linjax.verify._box import Box as Box
from linjax.verify._box import LinearBounds as LinearBounds
from linjax.verify._certified import certified_loss as certified_loss
from linjax.verify._crown import crown as crown
from linjax.verify._crown import linear_bounds as linear_bounds
from linjax.verify._game_flow import game_flow as game_flow
from linjax.verify._games import GameConstants as GameConstants
from linjax.verify._games import game_constants as game_constants
from linjax.verify._games import sampled_game_constants as sampled_game_constants
from linjax.verify._ibp import ibp as ibp
from linjax.verify._jacobian import jacobian_bounds as jacobian_bounds
from linjax.verify._lipschitz import local_lipschitz as local_lipschitz
from linjax.verify._lipschitz import naive_lipschitz as naive_lipschitz
from linjax.verify._mirror import EntropicGame as EntropicGame
from linjax.verify._mirror import entropic_matrix_game as entropic_matrix_game
from linjax.verify._rules import LinearRelaxation as LinearRelaxation
from linjax.verify._rules import register_rule as register_rule
from linjax.verify._sgn import SGNCertificate as SGNCertificate
from linjax.verify._sgn import metric_lipschitz as metric_lipschitz
from linjax.verify._sgn import sgn_band as sgn_band
from linjax.verify._sgn import sgn_certificate as sgn_certificate
from linjax.verify._sgn import sgn_margin as sgn_margin
from linjax.verify._vnnlib import read_vnnlib as read_vnnlib
