"""Generative sampling tools: schedules, DDIM, EDICT, flow matching, flow maps and guidance.

Diffusion models enter only through ``eps_fn(x, t, cond) -> eps``; flow models through a
velocity in flow time ($t = 0$ noise, $t = 1$ data), time before state:
``velocity_fn(params, t, x)`` in :func:`flow_matching_loss`, ``velocity_fn(t, x)`` in
:func:`sample_ode`, ``velocity_fn(t, x, cond)`` in :func:`cfg_projection_sample`, and
flow-map networks ``net_fn(params, s, t, x)``. Any JAX callable works (flax, equinox, plain
functions); samples are arbitrary pytrees of floating arrays. Samplers are ``lax.scan``
loops, safe under ``jit`` and ``vmap``, and are not jitted inside.
"""

from linjax.generative._anderson import AndersonResult as AndersonResult
from linjax.generative._anderson import anderson_fixed_point as anderson_fixed_point
from linjax.generative._cfg_projection import cfg_projection_sample as cfg_projection_sample
from linjax.generative._cfg_projection import manifold_projection as manifold_projection
from linjax.generative._ddim import ddim_invert as ddim_invert
from linjax.generative._ddim import ddim_sample as ddim_sample
from linjax.generative._edict import EDICTState as EDICTState
from linjax.generative._edict import edict_invert as edict_invert
from linjax.generative._edict import edict_sample as edict_sample
from linjax.generative._eps import StatefulEpsFn as StatefulEpsFn
from linjax.generative._flow_map import eulerian_loss as eulerian_loss
from linjax.generative._flow_map import flow_map as flow_map
from linjax.generative._flow_map import lagrangian_loss as lagrangian_loss
from linjax.generative._flow_map import progressive_loss as progressive_loss
from linjax.generative._flow_map import sample_flow_map as sample_flow_map
from linjax.generative._flow_matching import flow_matching_loss as flow_matching_loss
from linjax.generative._flow_matching import sample_ode as sample_ode
from linjax.generative._guidance import APGState as APGState
from linjax.generative._guidance import apg as apg
from linjax.generative._guidance import apg_init as apg_init
from linjax.generative._guidance import cfg as cfg
from linjax.generative._guidance import guided_eps_fn as guided_eps_fn
from linjax.generative._schedules import Schedule as Schedule
from linjax.generative._schedules import cosine_schedule as cosine_schedule
from linjax.generative._schedules import ddim_timesteps as ddim_timesteps
from linjax.generative._schedules import eps_to_x0 as eps_to_x0
from linjax.generative._schedules import linear_schedule as linear_schedule
from linjax.generative._schedules import scaled_linear_schedule as scaled_linear_schedule
from linjax.generative._schedules import x0_to_eps as x0_to_eps
