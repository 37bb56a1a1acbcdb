"""Stage ``evaluate``: the exported policy of one run in its OGBench singletask env -> metrics JSON + rollout GIF.

    python -m stages.evaluate --agent rql --dataset cube-single-play-v0 --task 2 --seed 0

``evaluate.episodes`` episodes over ``evaluate.envs`` environments in ``evaluate.workers`` processes, one batched
policy call per chunk; success rate with its Wilson 95% interval, returns and lengths. The env processes start
before this one imports JAX and compiles the policy, and the GIF episode is replayed and rendered by a process of
its own while the other episodes run (see benchmarks/evaluate_stage.py for the wall times).
"""

from __future__ import annotations

import logging

from stages import cli, layout
from stages.core.ogbench_names import env_for_task

log = logging.getLogger("stages.evaluate")
GIF_FRAME_SKIP = 2
GIF_SHADOWS = 0  # shadow map size of GIF frames; 0: none (the shadow pass was most of a CPU-rendered frame's cost)
VIDEO_PROCESSES = 1  # processes replaying the GIF episode (2, each rendering every other frame, measured slower)


def main(argv: list[str]) -> None:
    args, params = cli.stage_args("stages.evaluate", __doc__, argv, per_run=True)
    from stages.core import rollout  # numpy only: no JAX, no envs in this process

    e, task = params.evaluate, args.task_name
    num_envs = min(e.envs, e.episodes)
    # The env processes start first and build their envs (and the video process its renderer) while this process
    # imports JAX and the agent, loads the policy and compiles it (the warm-up call); this process steps no env.
    with rollout.Evaluator(env_for_task(task), num_envs=num_envs, workers=min(e.workers, num_envs),
                           in_process=False, video_processes=VIDEO_PROCESSES if e.video else 0,
                           shadow_size=GIF_SHADOWS) as evaluator:
        cli.select_device(params.train.device)
        from stages.agent_setup import config_from_metadata, make_policy
        from stages.core import policy_file

        policy_path = layout.run_dir(args.agent, args.dataset, args.task, args.seed) / "policy.msgpack"
        loaded = policy_file.load_policy(policy_path, expected_metadata={"agent": args.agent, "task": task,
                                                                         "seed": args.seed})
        algorithm, config = config_from_metadata(loaded.metadata)
        result = evaluator.run(
            make_policy(algorithm, config, loaded.params), episodes=e.episodes, seed=rollout.EVAL_SEED + args.seed,
            video_episodes=1 if e.video else 0, frame_skip=GIF_FRAME_SKIP, progress=not args.no_progress,
            warm_up=True, obs_shape=(config.obs_dim,),
        )
    from stages.core import video

    s = result.summary
    gif = layout.eval_gif(args.agent, args.dataset, args.task, args.seed)
    gif.parent.mkdir(parents=True, exist_ok=True)  # a DVC output, empty without video
    if e.video and result.videos:
        video.write_gif(gif, next(iter(result.videos.values())))
    record = {"agent": args.agent, "algorithm": algorithm, "task": task, "seed": args.seed,
              "steps": loaded.metadata.get("steps"), "success": 100 * s.success_rate,
              "success_ci95": [100 * s.success_ci95[0], 100 * s.success_ci95[1]], **result.to_dict()}
    cli.write_json(layout.eval_json(args.agent, args.dataset, args.task, args.seed), record)
    log.info("%s on %s seed %d: success %.1f%% [%.1f, %.1f] over %d episodes (%.1f s, %.0f env steps/s)",
             args.agent, task, args.seed, 100 * s.success_rate, 100 * s.success_ci95[0],
             100 * s.success_ci95[1], s.episodes, s.wall_time_s, s.env_steps_per_s)


if __name__ == "__main__":
    cli.run(main)
