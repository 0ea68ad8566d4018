"""Train Ling 2.5: `python train.py --config configs/<name>.yaml --workdir DIR [key=value ...]`.

Resumes from the newest complete checkpoint in DIR/checkpoints (params, optimizer, step, data position, RNG), logs
to DIR/metrics.jsonl and DIR/tb, saves on SIGTERM, and stops before saving if the loss is not finite.
"""
import argparse
import logging
import os
import sys

import jax


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (configs/*.yaml)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and plots go here")
    p.add_argument("--profile", default=None, help="START:END steps to trace with the jax profiler")
    p.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="join jax.distributed: 'on' on TPU pod slices / multi-slice (auto-detected topology), "
                        "'auto' when SLURM or coordinator settings are present")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host GPU without SLURM)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=20")
    return p.parse_args(argv)


def maybe_initialize_distributed(args) -> None:
    """Join the multi-host runtime when launched on several hosts (TPU pod slices, SLURM, explicit flags)."""
    if args.distributed == "off":
        return
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed == "on" or int(os.environ.get("SLURM_NTASKS", "1")) > 1 or any(
            k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")):
        jax.distributed.initialize()


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    maybe_initialize_distributed(args)
    from trainer.config import load_train_config
    from trainer.loop import run

    cfg = load_train_config(args.config, args.overrides)
    profile = tuple(int(x) for x in args.profile.split(":")) if args.profile else None
    return run(cfg, args.workdir, profile=profile)


if __name__ == "__main__":
    sys.exit(main())
