"""Flow agents with one interface: Config, TrainState, init, make_update, policy_params, sample_actions."""

from stages.core.agents import bc_flow, fql, rql

AGENTS = {"rql": rql, "fql": fql, "bc_flow": bc_flow}
