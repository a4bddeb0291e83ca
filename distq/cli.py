"""``distq`` command line: train, eval, plan, export, predict."""

from __future__ import annotations

import argparse
import json
import os
import sys

from distq.errors import DistqError

EPILOG = """examples:
  distq train configs/digits_w4a4.yaml
  distq train configs/digits_w4a4.yaml train.epochs=5 run.dir=runs/quick
  distq train configs/digits_w4a4.yaml --resume auto
  distq eval runs/digits_w4a4
  distq export runs/digits_w4a4 --out w4a4.safetensors
  distq eval --engine int w4a4.safetensors
  distq predict w4a4.safetensors image.jpg
  distq export runs/digits_w4a4 --format onnx --out w4a4.onnx
  distq eval --engine onnx w4a4.onnx
"""


def _train(args) -> int:
    from distq.config import describe_keys, load_config

    if args.help_config:
        print("\n".join(describe_keys()))
        return 0
    if args.config is None:
        raise DistqError("distq train needs a CONFIG file, e.g. distq train configs/digits_w4a4.yaml")
    cfg = load_config(args.config, args.overrides)
    from distq.train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    results = trainer.fit()
    trainer.say(json.dumps(results))
    return 0


def _eval(args) -> int:
    if args.engine in ("int", "onnx"):
        from distq.infer.cli import eval_export

        return eval_export(args)
    from distq.evaluate import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.checkpoint, data_root=args.data)))
    return 0


def _plan(args) -> int:
    from distq.config import load_config
    from distq.plan import plan_lines

    cfg = load_config(args.config, args.overrides)
    print("\n".join(plan_lines(cfg, train_images=args.train_images, world_size=args.world_size, every_step=args.every_step)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distq",
        description="Train, evaluate and export low-bitwidth (quantized) CNNs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train a model from a YAML config. One job at a time owns run.dir (a second one is refused). "
        "Exit status: 0 trained (or nothing left to train); 2 an input error, said in one line; 3 checkpointed on "
        "SIGUSR1 or SIGTERM, continue with --resume auto; 4 stopped because the loss or the gradients were not finite.",
    )
    train.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. train.epochs=5")
    train.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="'auto': continue from run.dir's newest complete checkpoint if there is one (on any number of processes); "
        "or a run directory or checkpoint folder (RUN_DIR/checkpoints/step_*). The config must define the same run "
        "(model, quantizer, bits, policies, data, seed, optimizer, schedule); train.epochs, logging, workers and process "
        "settings may change",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run.dir that holds a run: its checkpoints, TensorBoard events, configs and results are deleted "
        "first (without it, and without --resume, such a run.dir is refused)",
    )
    train.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    train.set_defaults(func=_train)

    plan = sub.add_parser(
        "plan",
        help="print the precision schedule of a config as a timeline, without training",
        description="Print, per epoch, the bits of every model, SP probability, aux factor, AQE alpha and which models train.",
    )
    plan.add_argument("config", metavar="CONFIG", help="YAML config file")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    plan.add_argument("--train-images", type=int, help="training-set size (default: counted, or ImageNet-1k's if data.root is absent)")
    plan.add_argument("--world-size", type=int, default=1, help="data-parallel processes (steps per epoch shrink with it)")
    plan.add_argument("--every-step", action="store_true", help="one row per optimizer step instead of per epoch")
    plan.set_defaults(func=_plan)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on the validation split", description="Evaluate a checkpoint.")
    ev.add_argument("checkpoint", metavar="CHECKPOINT", help="a run directory (its newest checkpoint) or a checkpoint folder written by distq train")
    ev.add_argument("--data", metavar="ROOT", help="ImageNet-layout folder (default: the one the run was trained on)")
    ev.add_argument(
        "--engine",
        choices=("float", "int", "onnx"),
        default="float",
        help="float: the PyTorch model of a checkpoint; int: the integer engine on a file written by distq export; "
        "onnx: onnxruntime (CPU) on a file written by distq export --format onnx",
    )
    ev.set_defaults(func=_eval)

    from distq.data.cli import add_commands as add_data_commands
    from distq.export.cli import add_commands as add_export_commands
    from distq.infer.cli import add_commands as add_infer_commands

    add_export_commands(sub)
    add_infer_commands(sub)
    add_data_commands(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parser.parse_args``, but KEY=VALUE overrides may also follow options
    (``distq train CFG --resume auto run.dir=X``): argparse stops filling a positional list at
    the first option, and hands what follows back as unknown arguments."""
    args, rest = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    unknown = [item for item in rest if not takes_overrides or item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides += rest
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    from distq.distributed import close_process_group
    from distq.errors import SaidByRankZero
    from distq.train.nonfinite import NONFINITE_EXIT_CODE, NonFiniteTraining
    from distq.train.preemption import REQUEUE_EXIT_CODE, Preempted

    try:
        code = args.func(args)
        close_process_group()
        return code
    except Preempted as exc:
        close_process_group()  # every rank stops at the same step (RankVote)
        print(f"distq: {exc}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except NonFiniteTraining as exc:
        close_process_group()  # every rank stops at the same step (an all-reduce agreed)
        if args.debug:
            raise
        from distq.distributed import detect

        if detect().is_main:
            print(f"distq: error: {exc}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    except SaidByRankZero as exc:
        close_process_group()
        if args.debug:
            raise
        return exc.exit_code
    except DistqError as exc:
        if args.debug:
            raise
        print(f"distq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distq: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from distq.distributed.failures import lost_peer_message

        message = lost_peer_message(exc)
        if message is None or args.debug:
            raise
        print(f"distq: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not a normal exit: tearing down a process group whose peer is gone makes gloo abort
        # (std::terminate) and hides this line behind a core dump message.
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
