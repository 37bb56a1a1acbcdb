"""Stage ``evaluate``: the exported policy of one run in its OGBench singletask env -> metrics JSON + rollout GIF.

    python -m stages.evaluate --agent rql --task cube-single-play-singletask-task2-v0 --seed 0

``evaluate.episodes`` episodes over ``evaluate.envs`` environments in ``evaluate.workers`` processes, one batched
policy call per chunk; success rate with its Wilson 95% interval, returns and lengths.
"""

from __future__ import annotations

import logging

from stages import cli, layout
from stages.params import env_for_task

log = logging.getLogger("stages.evaluate")
GIF_FRAME_SKIP = 2


def main(argv: list[str]) -> None:
    args, params = cli.stage_args("stages.evaluate", __doc__, argv, per_run=True)
    cli.select_device(params.train.device)

    from stages.agent_setup import config_from_metadata, make_policy
    from stages.core import checkpoints, rollout, video

    policy_path = layout.run_dir(args.agent, args.task, args.seed) / "policy.msgpack"
    loaded = checkpoints.load_policy(policy_path, expected_metadata={"agent": args.agent, "task": args.task,
                                                                     "seed": args.seed})
    algorithm, config = config_from_metadata(loaded.metadata)
    e = params.evaluate
    result = rollout.evaluate(
        make_policy(algorithm, config, loaded.params), env_for_task(args.task), episodes=e.episodes,
        seed=rollout.EVAL_SEED + args.seed, num_envs=min(e.envs, e.episodes), workers=min(e.workers, e.envs),
        video_episodes=1 if e.video else 0, frame_skip=GIF_FRAME_SKIP, progress=not args.no_progress,
    )
    s = result.summary
    gif = layout.eval_gif(args.agent, args.task, args.seed)
    gif.parent.mkdir(parents=True, exist_ok=True)  # a DVC output, empty without video
    if e.video and result.videos:
        video.write_gif(gif, next(iter(result.videos.values())))
    record = {"agent": args.agent, "algorithm": algorithm, "task": args.task, "seed": args.seed,
              "steps": loaded.metadata.get("steps"), "success": 100 * s.success_rate,
              "success_ci95": [100 * s.success_ci95[0], 100 * s.success_ci95[1]], **result.to_dict()}
    cli.write_json(layout.eval_json(args.agent, args.task, args.seed), record)
    log.info("%s on %s seed %d: success %.1f%% [%.1f, %.1f] over %d episodes (%.1f s, %.0f env steps/s)",
             args.agent, args.task, args.seed, 100 * s.success_rate, 100 * s.success_ci95[0],
             100 * s.success_ci95[1], s.episodes, s.wall_time_s, s.env_steps_per_s)


if __name__ == "__main__":
    cli.run(main)
