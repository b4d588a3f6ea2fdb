"""Schedules and solvers: pure tensor functions (samplers know no model)."""

from .guidance import cfg, cfg_batched, skip_layer_guidance, slg_active
from .schedules import flux_mu, flux_schedule, sd3_schedule
from .solvers import SOLVERS, Step, dpmpp_2m, euler, euler_step, get_solver, heun

__all__ = [
    "SOLVERS",
    "Step",
    "cfg",
    "cfg_batched",
    "dpmpp_2m",
    "euler",
    "euler_step",
    "flux_mu",
    "flux_schedule",
    "get_solver",
    "heun",
    "sd3_schedule",
    "skip_layer_guidance",
    "slg_active",
]
