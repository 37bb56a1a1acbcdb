"""Faster stepping of OGBench environments, with exactly the outputs of ``gymnasium.make(env_id).step``.

Why: evaluating a policy spends most of its time inside ``env.step``. For an OGBench manipulation env (cube, scene,
puzzle) a step is 25 MuJoCo physics substeps plus a lot of Python: the end-effector controller (lie-group objects and
a differential-IK loop), and three builds of a ~30-entry "ob_info" dict per step -- one before the physics (kept only
for the info dict's ``prev_*`` fields and, in scene/puzzle, for detecting button presses), one for the observation and
one for the info dict. An evaluation reads only the observation, reward, terminated, truncated and ``info['success']``.

:class:`ManipStepper` steps the unwrapped env and produces exactly those five values, bitwise identical to the
gymnasium-made env (wrappers included: the time limit is enforced here), with the same arithmetic but without:

* the gymnasium wrappers (TimeLimit, OrderEnforcing, PassiveEnvChecker) -- negligible, a few microseconds;
* the pre-physics ob_info dict: only what ``post_step`` reads is kept (button joint positions, ``prev_*`` copies);
* the info dict (``get_step_info``): not built at all;
* the generic observation path: the observation is assembled from MuJoCo's arrays by index instead of name lookups
  and dict copies;
* the lie-group objects of the controller and the IK loop's Python overhead (same numpy/MuJoCo operations, in the
  same order, on the same values -- so the same bits).

Physics (``mj_step``), ``post_step`` (success, button logic, colours, scene's locks) and the rewards run unchanged,
through OGBench's own code. tests/test_rollout.py runs plain and fast envs side by side over whole episodes and
compares every output bit for bit. Any other environment gets :class:`PlainStepper` (the gymnasium env as is).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

_XYZ_CENTER = np.array([0.425, 0.0, 0.0])
_XYZ_SCALER = 10.0
_GRIPPER_SCALER = 3.0
_BUTTON_SCALER = 120.0
_DRAWER_SCALER = 18.0
_WINDOW_SCALER = 15.0
_TAYLOR_EPS = 1e-10  # ogbench.manipspace.lie.utils.get_epsilon(float64)

try:  # the gufunc behind np.linalg.solve(a, b) for a vector b (numpy >= 1.8)
    from numpy.linalg._umath_linalg import solve1 as _SOLVE1
except ImportError:  # pragma: no cover - then np.linalg.solve is used
    _SOLVE1 = None


class Step(NamedTuple):
    """What an evaluation reads from one env step."""

    observation: np.ndarray
    reward: float
    terminated: bool
    truncated: bool
    success: bool


# --------------------------------------------------------------------------------------------------------------------
# Scalar helpers: the arithmetic of ogbench.manipspace.lie.SO3 and np.clip, operation for operation, on Python floats
# (IEEE-754 doubles like numpy's float64 scalars: +, -, *, /, sqrt and pow give the same bits; the transcendental
# functions stay numpy's own). Quaternions are (w, x, y, z) tuples.
# --------------------------------------------------------------------------------------------------------------------

Quat = tuple[float, float, float, float]


def clip(x: float, lo: float, hi: float) -> float:
    """``np.clip`` of one float: ``lo`` below, ``hi`` above, else ``x`` itself (a signed zero or NaN stays as it is)."""
    return lo if x < lo else min(x, hi)


def yaw_of(wxyz) -> float:
    """``SO3(wxyz).compute_yaw_radians()``."""
    q0, q1, q2, q3 = wxyz
    return float(np.arctan2(2 * (q0 * q3 + q1 * q2), 1 - 2 * (q2**2 + q3**2)))


def quat_from_z(theta: float) -> Quat:
    """``SO3.from_z_radians(theta).wxyz`` (``SO3.exp`` of the tangent (0, 0, theta), Taylor branch included)."""
    theta_squared = theta * theta  # = tangent @ tangent: the two zero terms add nothing
    theta_pow_4 = theta_squared * theta_squared
    if theta_squared < _TAYLOR_EPS:
        real = 1.0 - theta_squared / 8.0 + theta_pow_4 / 384.0
        imaginary = 0.5 - theta_squared / 48.0 + theta_pow_4 / 3840.0
    else:
        safe_theta = math.sqrt(theta_squared)
        safe_half_theta = 0.5 * safe_theta
        real = float(np.cos(safe_half_theta))
        imaginary = float(np.sin(safe_half_theta)) / safe_theta
    return (real, imaginary * 0.0, imaginary * 0.0, imaginary * theta)


def quat_mul(a, b) -> Quat:
    """``(SO3(a) @ SO3(b)).wxyz``: the Hamilton product written exactly as OGBench writes it."""
    w0, x0, y0, z0 = a
    w1, x1, y1, z1 = b
    return (
        -x0 * x1 - y0 * y1 - z0 * z1 + w0 * w1,
        x0 * w1 + y0 * z1 - z0 * y1 + w0 * x1,
        -x0 * z1 + y0 * w1 + z0 * x1 + w0 * y1,
        x0 * y1 - y0 * x1 + z0 * w1 + w0 * z1,
    )


def quat_inverse(q) -> Quat:
    """``SO3(q).inverse().wxyz`` (q times (1, -1, -1, -1))."""
    w, x, y, z = q
    return (w * 1.0, x * -1.0, y * -1.0, z * -1.0)


def quat_apply(q, v) -> tuple[float, float, float]:
    """``SO3(q) @ v``: a 3-vector rotated as OGBench does, q * (0, v) * q^-1."""
    return quat_mul(quat_mul(q, (0.0, *v)), quat_inverse(q))[1:]


# --------------------------------------------------------------------------------------------------------------------
# Steppers
# --------------------------------------------------------------------------------------------------------------------


class PlainStepper:
    """Any gymnasium env, stepped as is: the reference behaviour, and the fallback for non-manipulation envs."""

    fast = False

    def __init__(self, env):
        self.env = env

    def reset(self, seed: int) -> np.ndarray:
        """Reset with ``seed`` (OGBench's reset samples random actions too: its action space is seeded as well)."""
        self.env.unwrapped.action_space.seed(seed)
        obs, _ = self.env.reset(seed=seed)
        return obs

    def step(self, action: np.ndarray) -> Step:
        """One env step."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        return Step(obs, reward, bool(terminated), bool(truncated), bool(info.get("success", False)))


def _manipspace_kind(unwrapped: Any) -> str | None:
    """'cube', 'scene' or 'puzzle' for OGBench's state-based task-mode manipulation envs; None otherwise."""
    try:
        from ogbench.manipspace.envs.cube_env import CubeEnv
        from ogbench.manipspace.envs.puzzle_env import PuzzleEnv
        from ogbench.manipspace.envs.scene_env import SceneEnv
    except ImportError:  # pragma: no cover - ogbench is a dependency
        return None
    kinds = {CubeEnv: "cube", SceneEnv: "scene", PuzzleEnv: "puzzle"}
    kind = kinds.get(type(unwrapped))  # exact types: a subclass may override what is replicated here
    if kind is None or unwrapped._ob_type != "states" or unwrapped._mode != "task":
        return None
    return kind


def _time_limit(env) -> int | None:
    """The ``max_episode_steps`` of the env's TimeLimit wrapper (None without one)."""
    import gymnasium

    while isinstance(env, gymnasium.Wrapper):
        if isinstance(env, gymnasium.wrappers.TimeLimit):
            return env._max_episode_steps
        env = env.env
    return None


def _mjcf_objects(value: Any, found: dict, depth: int = 0) -> None:
    """Collect the dm_control MJCF elements in ``value`` (and lists/tuples/dicts of them, a few levels deep)."""
    from dm_control.mjcf import element

    if isinstance(value, element._ElementImpl):
        found[id(value)] = value
    elif depth < 4 and isinstance(value, (list, tuple, set)):
        for item in value:
            _mjcf_objects(item, found, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            _mjcf_objects(item, found, depth + 1)


def clone_env(env):
    """A copy of an OGBench manipulation env made by ``gymnasium.make``, in a fraction of the time of making one.

    Making one builds the MJCF tree with dm_control and compiles two MuJoCo models from XML; a clone deep-copies
    the compiled ``MjModel``/``MjData`` (its own, so per-env colour and damping changes stay per env) and everything
    else, and shares only the MJCF elements, which OGBench reads but never changes after compiling (dm_control cannot
    copy them anyway). Only for envs not rendered yet (a GL context cannot be copied).

    Raises:
        ValueError: not an OGBench state-based cube/scene/puzzle env, or already rendered.
    """
    import copy

    unwrapped = env.unwrapped
    if _manipspace_kind(unwrapped) is None:
        raise ValueError(f"clone_env copies OGBench cube/scene/puzzle envs, not {type(unwrapped).__name__}")
    if unwrapped._renderer is not None or unwrapped._passive_viewer_handle is not None:
        raise ValueError("clone_env needs an env that has not rendered yet (a GL context cannot be copied)")
    shared: dict = {}
    _mjcf_objects(list(vars(unwrapped).values()), shared)
    return copy.deepcopy(env, shared)


def make_stepper(env, fast: bool = True) -> PlainStepper | ManipStepper:
    """A :class:`ManipStepper` for OGBench's state-based manipulation envs when ``fast``, else a :class:`PlainStepper`."""
    if fast and _manipspace_kind(env.unwrapped) is not None:
        return ManipStepper(env)
    return PlainStepper(env)


class ManipStepper:
    """Steps an OGBench cube/scene/puzzle env made by ``gymnasium.make``, returning what its ``step`` would.

    Resets go through the gymnasium env unchanged (they are rare). Steps bypass the wrappers and OGBench's info
    bookkeeping; see the module docstring. The env must not be stepped through ``env.step`` between a
    :meth:`reset` and the end of the episode (the time limit is counted here).
    """

    fast = True

    def __init__(self, env):
        import mujoco

        kind = _manipspace_kind(env.unwrapped)
        if kind is None:
            raise ValueError(
                f"ManipStepper needs a state-based OGBench cube, scene or puzzle env in task mode, got "
                f"{type(env.unwrapped).__name__}; use make_stepper() for a fallback"
            )
        self.env = env
        self.kind = kind
        self.u = env.unwrapped
        self.time_limit = _time_limit(env)
        self._mj = mujoco
        self._elapsed: int | None = None
        self._compiled_for = None

    # -- indices, refreshed whenever OGBench recompiles its model ----------------------------------------------------
    def _cache(self) -> None:
        u, m = self.u, self.u._model
        self.model, self.data = m, u._data
        self._pinch = u._pinch_site_id
        self._arm_joints = u._arm_joint_ids
        self._arm_acts = u._arm_actuator_ids
        self._grip_acts = u._gripper_actuator_ids
        self._grip_joint = u._gripper_opening_joint_id  # OGBench indexes qpos by this joint id: so do we
        self._pad_body = m.body("ur5e/robotiq/right_pad").id
        self._action_low = u.action_low
        self._action_span = u.action_high - u.action_low  # as unnormalize_action computes it, once
        self._workspace = u._workspace_bounds.tolist()
        from ogbench.manipspace.lie import SE3

        self._se3 = SE3
        self._down = tuple(u._effector_down_rotation.wxyz.tolist())
        self._down_inv = tuple(u._effector_down_rotation.inverse().wxyz.tolist())
        self._t_pa = tuple(u._T_pa.wxyz_xyz.tolist())
        cubes = getattr(u, "_num_cubes", 0) if self.kind != "puzzle" else 0
        self._cube_qpos = [int(m.jnt_qposadr[m.joint(f"object_joint_{i}").id]) for i in range(cubes)]
        buttons = getattr(u, "_num_buttons", 0)
        self._button_joints = [m.joint(f"buttonbox_joint_{i}") for i in range(buttons)]
        self._button_qpos = [int(m.jnt_qposadr[j.id]) for j in self._button_joints]
        self._button_qvel = [int(m.jnt_dofadr[j.id]) for j in self._button_joints]
        if self.kind == "scene":
            self._slides = [
                (int(m.jnt_qposadr[m.joint(n).id]), int(m.jnt_dofadr[m.joint(n).id]))
                for n in ("drawer_slide", "window_slide")
            ]
        self._button_states = int(getattr(u, "_num_button_states", 0))
        self._obs_size = 19 + 9 * len(self._cube_qpos) + (self._button_states + 2) * buttons
        self._obs_size += 4 if self.kind == "scene" else 0
        ik = u._ik
        if len(ik._site_ids) != 1 or ik._qp0 is not None or ik._err.shape != (1, 6):
            raise ValueError("ManipStepper replicates OGBench's single-site IK without a posture target")
        self._ik = ik
        self._ik_site = int(ik._site_ids[0])
        self._ik_views = _IKViews(ik, self._ik_site)
        self._compiled_for = (m, u._data)

    # -- the gymnasium-equivalent API ---------------------------------------------------------------------------------
    def reset(self, seed: int) -> np.ndarray:
        """Reset through the gymnasium env (wrappers included) with ``seed``; returns the first observation."""
        self.u.action_space.seed(seed)
        obs, _ = self.env.reset(seed=seed)
        if self._compiled_for != (self.u._model, self.u._data):
            self._cache()
        self._elapsed = 0
        return obs

    def step(self, action: np.ndarray) -> Step:
        """One step: ``gymnasium.make(env_id).step(action)``'s observation, reward, flags and ``info['success']``."""
        if self._elapsed is None:
            raise RuntimeError("ManipStepper.step called before reset()")
        u, mj = self.u, self._mj
        pre = u._success_timing == "pre"
        if pre:
            success = u._success
            terminated = u.terminate_episode()
            reward = u.compute_reward()
        self._set_control(np.array(action))
        self._pre_step()
        mj.mj_step(self.model, self.data, nstep=u._n_steps)
        mj.mj_rnePostConstraint(self.model, self.data)
        u.post_step()
        if not pre:
            success = u._success
            terminated = u.terminate_episode()
            reward = u.compute_reward()
        truncated = bool(u.truncate_episode())
        obs = self._observation()
        self._elapsed += 1
        if self.time_limit is not None and self._elapsed >= self.time_limit:
            truncated = True
        return Step(obs, reward, bool(terminated), truncated, bool(success))

    # -- the pieces of ManipSpaceEnv.step ------------------------------------------------------------------------------
    def _pre_step(self) -> None:
        """``pre_step`` minus the ob_info dict: the ``prev_*`` state and the button positions ``post_step`` reads."""
        u, d = self.u, self.data
        if self.kind != "cube":
            u._prev_button_states = u._cur_button_states.copy()
        u._prev_qpos = d.qpos.copy()
        u._prev_qvel = d.qvel.copy()
        u._prev_ob_info = {
            f"privileged/button_{i}_pos": d.qpos[a : a + 1].copy() for i, a in enumerate(self._button_qpos)
        }

    def _set_control(self, action: np.ndarray) -> None:
        """``ManipSpaceEnv.set_control``: relative end-effector target -> IK joint targets and gripper command."""
        u, d = self.u, self.data
        action = (0.5 * (action + 1) * self._action_span + self._action_low).tolist()  # unnormalize_action
        a_ori, a_gripper = action[3], action[4]
        effector_pos = d.site_xpos[self._pinch].tolist()
        effector_yaw = yaw_of(self._site_quat(d, self._pinch).tolist())
        gripper_opening = clip(float(d.qpos[self._grip_joint]) / 0.8, 0.0, 1.0)
        target_translation = [p + a for p, a in zip(effector_pos, action[:3], strict=True)]
        orientation = quat_mul(quat_mul(quat_from_z(a_ori), quat_from_z(effector_yaw)), self._down_inv)
        target_gripper_opening = gripper_opening + a_gripper
        target_translation = [clip(x, lo, hi) for x, lo, hi in zip(target_translation, *self._workspace, strict=True)]
        yaw = clip(yaw_of(orientation), -math.pi, math.pi)
        orientation = quat_mul(quat_from_z(yaw), self._down)
        target_gripper_opening = clip(target_gripper_opening, 0.0, 1.0)
        u._target_effector_pose = self._se3(wxyz_xyz=np.array([*orientation, *target_translation]))
        # T_wa = target pose @ T_pa (SE3 product: rotations multiplied, T_pa's translation rotated and shifted)
        attach_quat = quat_mul(orientation, self._t_pa[:4])
        attach_pos = [r + t for r, t in zip(quat_apply(orientation, self._t_pa[4:]), target_translation, strict=True)]
        qpos_target = self._ik_solve(np.array(attach_pos), np.array(attach_quat), d.qpos[self._arm_joints])
        d.ctrl[self._arm_acts] = qpos_target
        d.ctrl[self._grip_acts] = 255.0 * target_gripper_opening

    def _site_quat(self, d, site: int) -> np.ndarray:
        """``SO3.from_matrix(site_xmat).wxyz``."""
        wxyz = np.zeros(4, dtype=np.float64)
        self._mj.mju_mat2Quat(wxyz, d.site_xmat[site])
        return wxyz

    def _ik_solve(
        self,
        pos: np.ndarray,
        quat: np.ndarray,
        curr_qpos: np.ndarray,
        max_iters: int = 20,
        pos_thresh: float = 1e-4,
        ori_thresh: float = 1e-4,
    ) -> np.ndarray:
        """``DiffIKController.solve`` for one site and no posture target, on the controller's own buffers."""
        mj, ik = self._mj, self._ik
        m, d, site = ik._model, ik._data, self._ik_site
        v = self._ik_views
        d.qpos = curr_qpos
        for _ in range(max_iters):
            mj.mj_kinematics(m, d)
            mj.mj_comPos(m, d)  # (_forward_kinematics)
            np.subtract(pos, v.site_pos, out=v.pos_err)  # err[:, :3] = pos - site_xpos
            mj.mju_mat2Quat(v.site_quat, v.site_mat)
            mj.mju_negQuat(v.site_quat_inv, v.site_quat)
            mj.mju_mulQuat(v.err_quat, quat, v.site_quat_inv)
            mj.mju_quat2Vel(v.ori_err, v.err_quat, 1.0)
            # np.linalg.norm(x) of a float vector is sqrt(x.dot(x)); OGBench computes both norms (no side effects)
            pos_norm, ori_norm = math.sqrt(v.pos_err.dot(v.pos_err)), math.sqrt(v.ori_err.dot(v.ori_err))
            if pos_norm <= pos_thresh and ori_norm <= ori_thresh:
                break
            mj.mj_jacSite(m, d, v.jac_pos, v.jac_rot, site)
            h = np.matmul(v.jac, v.jac_t, out=v.h)  # _solve: jac @ jac.T + damping, solve, jac.T @ x
            h += ik._damping
            update = v.jac_t @ _lapack_solve(h, v.err_flat)
            update_max = np.abs(update).max()  # _scale_update
            if update_max > ik._max_angle_change:
                update *= ik._max_angle_change / update_max
            mj.mj_integratePos(m, d.qpos, update, 1.0)
        return d.qpos.copy()

    def _observation(self) -> np.ndarray:
        """``compute_observation()`` (state observations) of a cube, scene or puzzle env, filled in place."""
        u, d = self.u, self.data
        qpos, qvel = d.qpos, d.qvel
        ob = np.empty(self._obs_size)
        ob[0:6] = qpos[self._arm_joints]
        ob[6:12] = qvel[self._arm_joints]
        ob[12:15] = (d.site_xpos[self._pinch] - _XYZ_CENTER) * _XYZ_SCALER
        yaw = yaw_of(self._site_quat(d, self._pinch).tolist())
        ob[15] = np.cos(yaw)
        ob[16] = np.sin(yaw)
        ob[17] = clip(float(qpos[self._grip_joint]) / 0.8, 0.0, 1.0) * _GRIPPER_SCALER
        force = d.cfrc_ext[self._pad_body]
        ob[18] = clip(math.sqrt(force.dot(force)) / 50, 0.0, 1.0)  # np.linalg.norm = sqrt(x.dot(x))
        i = 19
        for a in self._cube_qpos:
            ob[i : i + 3] = (qpos[a : a + 3] - _XYZ_CENTER) * _XYZ_SCALER
            ob[i + 3 : i + 7] = qpos[a + 3 : a + 7]
            yaw = yaw_of(qpos[a + 3 : a + 7].tolist())
            ob[i + 7] = np.cos(yaw)
            ob[i + 8] = np.sin(yaw)
            i += 9
        states = self._button_states
        for b, (qa, va) in enumerate(zip(self._button_qpos, self._button_qvel, strict=True)):
            ob[i : i + states] = 0.0  # np.eye(states)[state]: a one-hot row
            ob[i + int(u._cur_button_states[b])] = 1.0
            ob[i + states] = qpos[qa] * _BUTTON_SCALER
            ob[i + states + 1] = qvel[va]
            i += states + 2
        if self.kind == "scene":
            (dq, dv), (wq, wv) = self._slides
            ob[i : i + 4] = (qpos[dq] * _DRAWER_SCALER, qvel[dv], qpos[wq] * _WINDOW_SCALER, qvel[wv])
            i += 4
        return ob


class _IKViews:
    """Views into a ``DiffIKController``'s buffers and MjData (stable: the controller never reallocates them)."""

    def __init__(self, ik, site: int):
        self.site_pos = ik._data.site_xpos[site]
        self.site_mat = ik._data.site_xmat[site]
        self.pos_err, self.ori_err, self.err_flat = ik._err[0, :3], ik._err[0, 3:], ik._err.reshape(-1)
        self.site_quat, self.site_quat_inv, self.err_quat = ik._site_quat[0], ik._site_quat_inv[0], ik._err_quat[0]
        self.jac, self.jac_t = ik._jac, ik._jac.T
        self.jac_pos, self.jac_rot = ik._jac[0:3], ik._jac[3:6]
        self.h = np.empty((ik._jac.shape[0], ik._jac.shape[0]))


def _lapack_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.linalg.solve(a, b)`` for a square float64 ``a`` and vector ``b``: the same LAPACK gufunc, called directly
    (np.linalg.solve spends most of its time at this size in argument checks and an errstate context).

    A singular ``a`` gives non-finite values (or a FloatingPointError under ``np.errstate(invalid='raise')``);
    then np.linalg.solve itself is called, raising its LinAlgError as OGBench's controller would.
    """
    if _SOLVE1 is None:
        return np.linalg.solve(a, b)
    try:
        x = _SOLVE1(a, b, signature="dd->d")
    except FloatingPointError:
        return np.linalg.solve(a, b)
    if not np.isfinite(x).all():
        return np.linalg.solve(a, b)
    return x
