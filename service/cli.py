"""`moe-serve` command line: train | evaluate | extract | calibrate | export | serve | bench. Thin wrappers."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from service.backends.variants import ALL_PRECISIONS, BACKENDS, REFERENCE, runs_summary
from service.config import Settings
from service.modeling.windows import LONG_TEXT_MODES, LongTextPolicy

SPLITS = ("train", "validation", "test")
Subparsers = argparse._SubParsersAction  # what add_subparsers returns


def _train(args: argparse.Namespace) -> int:
    from service.training.recipe import Recipe
    from service.training.train import train

    recipe = Recipe.from_file(args.recipe)
    if args.epochs is not None:
        recipe.training.epochs = args.epochs
    out = args.output or f"models/{recipe.name}"
    summary = train(recipe, out, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from service.backends import load_backend
    from service.modeling.artifacts import load_model
    from service.training.evaluate import evaluate_model

    loaded = load_model(args.model)
    folder = loaded.folder
    out = args.output_dir
    variant = "" if (args.backend, args.precision) == ("torch", "fp32") else f"-{args.backend}-{args.precision}"
    policy = LongTextPolicy(args.long_text, args.chunk_overlap, args.max_windows)
    if out is None:
        data_name = Path(args.data).stem if args.data else folder.training.get("dataset", "data")
        mode = "" if policy == Settings().long_text_policy() else f"-{policy.mode}"
        out = Path("reports") / f"{folder.name}-{data_name}-{args.split}{variant}{mode}"
    if folder.tasks or args.task:
        return _evaluate_tasks(args, loaded, out, variant)
    backend = load_backend(folder, "cpu", args.backend, precision=args.precision) if variant else None
    report = evaluate_model(
        loaded, args.data, args.split, out, args.text_column, args.label_column, backend, policy=policy
    )
    print(json.dumps(report, indent=2))
    print(f"report and plots written to {out}", file=sys.stderr)
    return 0


def _evaluate_tasks(args: argparse.Namespace, loaded: Any, out: Path, variant: str) -> int:
    """A multi-task folder: every task (or those of --task), each as a single-task report, and the summary."""
    from service.backends import load_backend
    from service.training.task_eval import evaluate_tasks

    if args.text_column or args.label_column:
        raise ValueError("--text-column and --label-column are per task: a multi-task folder records its own")
    backend = load_backend(loaded.folder, "cpu", args.backend, precision=args.precision) if variant else None
    summary = evaluate_tasks(loaded, args.split, out, args.task, args.data, backend)
    print(json.dumps(summary, indent=2))
    print(f"report and plots written to {out}", file=sys.stderr)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from service.training.extract import extract_task

    result = extract_task(args.model, args.task, args.output, args.min_share)
    print(json.dumps(result, indent=2))
    print(f"task {args.task} written to {args.output}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from service.modeling.onnx_export import export_model

    for path in export_model(args.model, int8=args.quantize == "int8"):
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    if args.choose:
        print(json.dumps(_choose_backend(Path(args.model), args.threads), indent=2))
    return 0


def _choose_backend(model_dir: Path, threads: int | None) -> dict:
    """Measure every variant on the model's validation split and record the fastest correct one."""
    from service.backends import load_backend
    from service.bench.backends import choice_texts, choose, measure_budgets, measure_variants, write_choice
    from service.bench.run import machine
    from service.config import Settings
    from service.modeling.artifacts import load_model

    loaded = load_model(model_dir)
    folder = loaded.folder
    texts = choice_texts(loaded, "validation")
    rows = measure_variants(model_dir, texts, "validation", threads=threads)
    best = choose(rows)
    backend = load_backend(model_dir, "cpu", best["backend"], threads, best["precision"])
    budgets = measure_budgets(backend, texts, Settings.model_fields["max_batch_size"].default)
    m = machine()
    choice = write_choice(model_dir, best, rows, f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}", budgets)
    return {"model": folder.name, "chosen": choice, "variants": rows, "budgets": budgets}


def _calibrate(args: argparse.Namespace) -> int:
    from service.modeling.artifacts import load_model, write_temperature
    from service.training.evaluate import calibrate, model_examples

    loaded = load_model(args.model)
    if loaded.folder.tasks:
        return _calibrate_tasks(args, loaded)
    examples, _ = model_examples(loaded.folder, None, args.split)
    temperature, section = calibrate(loaded, examples)
    write_temperature(args.model, temperature)
    result = {"model": loaded.folder.name, "split": args.split, "examples": len(examples), **section}
    print(json.dumps(result, indent=2))
    print(f"temperature {temperature} written to {Path(args.model) / 'config.json'}", file=sys.stderr)
    return 0


def _calibrate_tasks(args: argparse.Namespace, loaded: Any) -> int:
    """A temperature per task, each fitted on that task's own split, written into config.json's tasks."""
    from service.modeling.folder import write_task_temperatures
    from service.modeling.task_view import task_names, task_view
    from service.training.evaluate import calibrate, model_examples

    result, temperatures = {"model": loaded.folder.name, "split": args.split, "tasks": {}}, {}
    for task in task_names(loaded):
        view = task_view(loaded, task)
        examples, _ = model_examples(view.folder, None, args.split)
        temperatures[task], section = calibrate(view, examples)
        result["tasks"][task] = {"examples": len(examples), **section}
    write_task_temperatures(args.model, temperatures)
    print(json.dumps(result, indent=2))
    print(f"temperatures {temperatures} written to {Path(args.model) / 'config.json'}", file=sys.stderr)
    return 0


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The flags given (serve's, and the top-level --log-level) over the MOE_* variables over the defaults."""
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.server import serve

    settings = settings_from_args(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    app = create_app(settings)
    serve(app, settings.host, settings.port, settings.log_level, settings.shutdown_drain_s, settings.shutdown_grace_s)
    engine = getattr(app.state, "engine", None)
    if engine is not None and engine.fatal:
        print(f"moe-serve serve: stopped: {engine.fatal}", file=sys.stderr)
        return 3  # non-zero: an orchestrator restarts the process
    return 0


def _bench(args: argparse.Namespace) -> int:
    from service.bench.run import run_bench

    mode = "quick" if args.quick else "full"
    out = Path(args.output_dir or f"bench-results/{mode}")
    results = run_bench(Path(args.model), mode, out, skip_served=args.engine_only)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print((out / "bench.md").read_text())
    print(f"results, table and plots written to {out}", file=sys.stderr)
    return 0


def _flag_type(annotation: Any) -> tuple[Callable[[str], Any] | None, tuple[str, ...] | None]:
    """(argparse type, choices) of a settings field's type; type None: a bool, --x / --no-x. Lists, paths and secrets
    pass as the raw string: the Settings validators parse them, exactly as they parse the MOE_* variable."""
    if get_origin(annotation) in (Union, UnionType):  # X | None: the flag gives an X
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return str, get_args(annotation)
    if annotation is bool:
        return None, None
    return (annotation if annotation in (int, float) else str), None


def _add_setting_flag(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    """--name-with-dashes for the settings field `name`: its type and choices, its description as help. Not given:
    absent from the namespace (SUPPRESS), so the environment and the default apply."""
    kind, choices = _flag_type(field.annotation)
    env = f"{Settings.model_config['env_prefix']}{name.upper()}"
    shown = str(field.default).lower() if isinstance(field.default, bool) else field.default
    default = "" if field.default is None else f", default {shown}"
    secret = (
        " (a flag shows in the process list: prefer the variable)" if SecretStr in get_args(field.annotation) else ""
    )
    help_text = f"{field.description}{secret} [{env}{default}]".replace("%", "%%")
    flag = "--" + name.replace("_", "-")
    if kind is None:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
    else:
        parser.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS, help=help_text)


def _add_train(sub: Subparsers) -> None:
    t = sub.add_parser("train", help="train a model from a recipe (YAML or JSON)")
    t.add_argument("--recipe", required=True, help="recipe file, e.g. recipes/bbc-news-moe.yaml")
    t.add_argument("--output", help="model folder to write (default: models/<recipe name>)")
    t.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)


def _add_extract(sub: Subparsers) -> None:
    x = sub.add_parser("extract", help="one task of a multi-task folder as its own folder, with the experts it uses")
    x.add_argument("--model", required=True, help="a multi-task model folder")
    x.add_argument("--task", required=True)
    x.add_argument("--output", required=True, help="the folder to write")
    x.add_argument(
        "--min-share",
        type=float,
        default=0.01,
        help="drop experts taking less than this share of the task's validation tokens (every layer keeps as many "
        "as the layer that needs the most)",
    )
    x.set_defaults(func=_extract)


def _add_evaluate(sub: Subparsers) -> None:
    e = sub.add_parser("evaluate", help="evaluate a model folder; JSON report on stdout, report + plots on disk")
    e.add_argument("--model", required=True, help="model folder, e.g. models/bbc-news-moe")
    e.add_argument("--data", help="built-in dataset name or .csv/.jsonl file (default: the model's training data)")
    e.add_argument("--split", default="test", choices=SPLITS)
    e.add_argument("--text-column")
    e.add_argument("--label-column")
    e.add_argument("--output-dir", help="where to write eval.json and plots (default: reports/<model>-<data>-<split>)")
    e.add_argument("--task", action="append", help="multi-task folders: evaluate this task (repeatable; default all)")
    e.add_argument("--backend", default=REFERENCE.backend, choices=BACKENDS, help="onnx needs `moe-serve export` first")
    e.add_argument("--precision", default=REFERENCE.precision, choices=ALL_PRECISIONS, help=runs_summary())
    served = Settings.model_fields  # long texts are read as served by default: the same defaults
    e.add_argument("--long-text", default=served["long_text"].default, choices=LONG_TEXT_MODES, help="as MOE_LONG_TEXT")
    e.add_argument("--chunk-overlap", type=int, default=served["chunk_overlap"].default, help="as MOE_CHUNK_OVERLAP")
    e.add_argument("--max-windows", type=int, default=served["max_windows"].default, help="as MOE_MAX_WINDOWS")
    e.set_defaults(func=_evaluate)


def _add_export(sub: Subparsers) -> None:
    x = sub.add_parser(
        "export",
        help="export a model folder to ONNX (model.onnx; with --quantize int8 also model.int8.onnx)",
        description="Dynamic batch and sequence axes, sparse routing kept in the graph, onnxruntime's offline "
        "graph optimisations applied; int8 is onnxruntime's dynamic quantisation of every MatMul/Gemm.",
    )
    x.add_argument("--model", required=True, help="model folder, e.g. models/bbc-news-moe")
    x.add_argument("--quantize", choices=["int8"], help="also write the int8 graph")
    x.add_argument(
        "--choose",
        action="store_true",
        help="then time every backend/precision and check it against torch fp32 on the validation split, and "
        'record the fastest correct one in config.json "serving" (what --backend auto serves)',
    )
    x.add_argument("--threads", type=int, help="threads while measuring (default: the library's choice)")
    x.set_defaults(func=_export)


def _add_calibrate(sub: Subparsers) -> None:
    c = sub.add_parser(
        "calibrate",
        help="fit the temperature on the model's own validation split and store it in its config.json",
        description="Temperature scaling: one scalar T minimising the NLL of softmax(logits / T) on the split. "
        "Prints T and the 15-bin expected calibration error before (T = 1) and after, on that split.",
    )
    c.add_argument("--model", required=True, help="model folder, e.g. models/bbc-news-moe")
    c.add_argument("--split", default="validation", choices=SPLITS)
    c.set_defaults(func=_calibrate)


def _add_serve(sub: Subparsers) -> None:
    s = sub.add_parser(
        "serve",
        help="serve every model in the model repository over HTTP",
        description="Every setting has a flag here and a MOE_* environment variable; a flag overrides its variable, "
        "which overrides the default (README: Configuration).",
    )
    for name, field in Settings.model_fields.items():
        _add_setting_flag(s, name, field)
    s.set_defaults(func=_serve)


def _add_bench(sub: Subparsers) -> None:
    b = sub.add_parser("bench", help="benchmark the engine and the server against the machine's limit")
    b.add_argument("--model", default="models/bbc-news-moe")
    b.add_argument("--quick", action="store_true", help="CI-sized run (under 3 minutes)")
    b.add_argument("--engine-only", action="store_true", help="skip the HTTP benchmarks")
    b.add_argument("--json", help="also write the results to this file")
    b.add_argument("--output-dir", help="default: bench-results/<mode>")
    b.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-serve", description="Train, evaluate and serve MoE text classifiers.")
    levels = " | ".join(get_args(Settings.model_fields["log_level"].annotation))
    p.add_argument("--log-level", help=f"{levels} (default: info, or MOE_LOG_LEVEL)")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_evaluate, _add_extract, _add_export, _add_calibrate, _add_serve, _add_bench):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from service.training.data import DataError

    try:
        return args.func(args)
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"moe-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
