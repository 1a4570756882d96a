"""Diffusion sampling tools: noise schedules, DDIM, EDICT exact inversion and guidance.

Models enter only through ``eps_fn(x, t, cond) -> eps`` (any JAX callable: flax, equinox,
plain functions); samples are arbitrary pytrees of floating arrays. Samplers are one
``lax.scan`` each, safe under ``jit`` and ``vmap``, and are not jitted inside.
"""

from linjax.generative._ddim import ddim_invert as ddim_invert
from linjax.generative._ddim import ddim_sample as ddim_sample
from linjax.generative._edict import EDICTState as EDICTState
from linjax.generative._edict import edict_invert as edict_invert
from linjax.generative._edict import edict_sample as edict_sample
from linjax.generative._eps import StatefulEpsFn as StatefulEpsFn
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
