"""The ``defectscope`` command (typer): train, evaluate, predict, and the commands of later tasks.

Errors a user can fix (bad recipe, bad data, missing or unsafe run, an output path that
cannot be written) are :class:`~defectscope.errors.DefectscopeError` subclasses (and missing
files / permissions); they print one clear message and exit with status 2; nothing already
written is removed. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Defect inspection for metal surfaces and laser welds.")
console = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types shown as one line: the project's own errors, missing files and
    permissions (their messages name the path), and a training run that diverged."""
    from defectscope.errors import DefectscopeError

    return (DefectscopeError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
            FloatingPointError)


def error_line(exc: BaseException) -> str:
    """The message of ``exc`` as rich markup-safe text (``[10, 10, 5]`` is printed, not eaten as markup);
    file names that are not UTF-8 are shown with backslash escapes."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    msg = str(msg).encode("utf-8", errors="backslashreplace").decode("utf-8")
    return escape(msg)


def friendly(fn: Callable) -> Callable:
    """Turn user errors (:func:`_user_errors`) into one red line and exit status 2; other exceptions keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            console.print(f"[bold red]error:[/] {error_line(exc)}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _get_task(name: str, source: str):
    """The registered task ``name``; an unknown name is a :class:`ConfigError` naming ``source``."""
    from defectscope.config import ConfigError
    from defectscope.engine.tasks import get_task

    if not isinstance(name, str):
        raise ConfigError(f"{source}: expected a task name (text), got {name!r}")
    try:
        return get_task(name)
    except KeyError as exc:
        raise ConfigError(f"{source}: {exc.args[0] if exc.args else exc}") from None


def _summary_table(title: str, metrics: dict, keys: list[str]) -> Table:
    table = Table(title=title, min_width=min(len(title) + 4, 120))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in keys:
        if k in metrics and not isinstance(metrics[k], (dict, list)):
            v = metrics[k]
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


def _run_task(run: Path) -> str:
    from defectscope.engine.run import RunFolder

    return RunFolder(run).read_config()["task"]


def _print_result(task, out: Path, result: dict, title: str | None = None) -> None:
    """Console summary of a finished run (single split or cross-validation)."""
    keys = list(getattr(task, "summary_keys", ())) or ["accuracy", "weighted_f1", "macro_auroc", "image_auroc",
                                                         "map_50", "map", "box_mae", "dice"]
    if "folds" in result and "pooled" in result:
        table = Table(title=title or f"{task.name}: {out} ({result['k']}-fold cross-validation)")
        table.add_column("metric")
        table.add_column("mean +- std over folds", justify="right")
        table.add_column("pooled out-of-fold", justify="right")
        for k in keys:
            if k in result["mean"]:
                p = result["pooled"].get(k)
                table.add_row(k, f"{result['mean'][k]:.4f} +- {result['std'][k]:.4f}",
                              f"{p:.4f}" if isinstance(p, float) else str(p))
        console.print(table)
        cands = result.get("candidates") or {}
        key = result.get("selection_metric", "accuracy")
        if len(cands) > 1:
            console.print(f"candidates, pooled out-of-fold {key}: " + ", ".join(
                f"{n} {c['pooled'].get(key, float('nan')):.4f}" for n, c in cands.items())
                + f"; chosen: {result['chosen']} (the figures above; selected on these folds, so optimistic"
                + (f"; nested selection: {result['nested']['pooled'].get(key, float('nan')):.4f}" if result.get("nested") else
                   ", --nested for an unbiased figure") + ")", highlight=False, soft_wrap=True)
        if result.get("model"):
            console.print(f"model: {out / 'model.ckpt'} ({result['model']['candidate']} refit on all the data; "
                          "its expected performance is the pooled out-of-fold figure)", highlight=False, soft_wrap=True)
        console.print(f"crossval: {out / 'crossval.json'}  out-of-fold: {out / 'oof_predictions.csv'}  report: {out / 'report.html'}")
        return
    console.print(_summary_table(title or f"{task.name}: {out}", result.get("test", {}), keys))
    cut = "  (CUT SHORT by train.max_minutes: the schedule did not finish)" if result.get("cut_short") else ""
    console.print(f"train_seconds={result.get('train_seconds')}{cut}  report: {out / 'report.html'}")


def _train(raw: dict, source: str, out: Path, folds: int | None, group_by: str | None, overwrite: bool,
           resume: bool = False) -> tuple:
    """Validate ``raw`` against its task's schema and run the pipeline; ``(task, result)``."""
    from defectscope.config import ConfigError, validate
    from defectscope.engine.pipeline import train as run_pipeline

    if "task" not in raw:
        raise ConfigError(f"{source}: missing 'task' key")
    task = _get_task(raw["task"], f"{source}: field 'task'")
    cfg = validate(raw, task.recipe, source)
    return task, run_pipeline(cfg, out, folds=folds, group_by=group_by, overwrite=overwrite, resume=resume)


def _run_task_obj(run: Path):
    from defectscope.engine.run import RunFolder

    return _get_task(_run_task(run), f"{RunFolder(run).config_path}: field 'task'")


def _recipe_for_folder(folder: Path, task: str | None, override: list[str] | None) -> tuple[dict, dict]:
    """A recipe sized to an unknown data folder: data check, layout guess, :func:`size_recipe`.

    Returns ``(raw recipe, data check result)``; prints the evidence, the warnings and the choices.
    """
    import yaml

    from defectscope.config import _set_dotted, parse_overrides
    from defectscope.data.check import check_dataset, warn_on_leaks
    from defectscope.data.layout import guess_layout
    from defectscope.engine.autorecipe import explain, size_recipe

    guess = guess_layout(folder, task)
    check = check_dataset(folder) if guess.task in ("classification", "segmentation", "detection") else {}
    for line in warn_on_leaks(check) if check else []:
        console.print(f"[bold red]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    d = guess.details
    console.print(f"{escape(str(folder))}: {guess.task} ({guess.layout} layout); " + "; ".join(map(escape, guess.evidence)),
                  highlight=False, soft_wrap=True)
    args = (guess.task, d["n_images"], d.get("class_counts"), d.get("image_hw"))
    raw = size_recipe(*args, root=d["root"], layout=guess.layout)
    if guess.task in ("segmentation", "detection"):
        layout = raw.get("data", {}).pop("layout", None)
        if guess.task == "segmentation" and layout not in (None, "kolektor"):
            from defectscope.data.images import DatasetError

            raise DatasetError(f"{folder}: segmentation data in the '{layout}' layout needs a manifest.csv "
                               "(id,split,defective) beside images/ and masks/ (see README, Data layouts)")
    for key, value in parse_overrides(override):
        _set_dotted(raw, key, value, f"{folder} (override)")
    console.print(escape(explain(*args, root=d["root"], layout=guess.layout)), highlight=False, soft_wrap=True)
    console.print("[bold]recipe[/] (written to RUN/config.yaml; edit it and run 'defectscope train RUN/config.yaml'):\n"
                  + escape(yaml.safe_dump(raw, sort_keys=False)), highlight=False)
    return raw, check


@app.command()
@friendly
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see configs/), or a data folder: the layout is recognised and a recipe sized to it.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    override: Annotated[Optional[list[str]], typer.Option("-o", "--override", help="key.sub=value, repeatable.")] = None,
    folds: Annotated[Optional[int], typer.Option("--folds", help="1: one held-out split; K >= 2: stratified K-fold cross-validation (default: the recipe's eval.folds).")] = None,
    group_by: Annotated[Optional[str], typer.Option("--group-by", help="Metadata column or regex on sample ids; matching samples share a fold.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder (only once the new run succeeded).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted train into --out from its last checkpoints (same recipe and options).")] = False,
    task_name: Annotated[Optional[str], typer.Option("--task", help="With a data folder: the task to train (overrides the guess).")] = None,
    nested: Annotated[bool, typer.Option("--nested", help="Cross-validation: also select the candidate inside each outer fold (inner CV) for an unbiased figure (eval.nested).")] = False,
) -> None:
    """Train a recipe (or a data folder with a recipe sized to it), evaluate it and write the run folder.

    With a data folder, the data are checked first (duplicates across classes, empty classes,
    unreadable files are warned about) and k-fold cross-validation is chosen when a single split
    would hold fewer than 10 test images of some class; ``--folds 1`` forces a single split.
    """
    from defectscope.config import load_raw
    from defectscope.utils.io import write_json

    check = None
    if nested:
        override = [*(override or []), "eval.nested=true"]
    if recipe.is_dir():
        raw, check = _recipe_for_folder(recipe, task_name, override)
        source = str(recipe)
        folds_eff = folds if folds is not None else raw.get("eval", {}).get("folds")
        if folds_eff and folds_eff > 1:
            console.print(f"evaluation: {folds_eff}-fold cross-validation (a single split would leave fewer than "
                          "10 test images of some class; --folds 1 forces one split)", highlight=False)
    else:
        if task_name:
            from defectscope.config import ConfigError

            raise ConfigError("--task is for data folders; a recipe names its task in its 'task' key")
        raw = load_raw(recipe, override)
        source = str(recipe)
    task, result = _train(raw, source, out, folds, group_by, overwrite, resume)
    if result is None:  # a non-zero DDP rank
        return
    if check:
        write_json(out / "data_check.json", check)
    _print_result(task, out, result)


@app.command()
@friendly
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder from 'defectscope train'.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled data to evaluate on (a folder; for detection also a COCO .json file).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default RUN/evaluations/<data name>).")] = None,
) -> None:
    """Re-evaluate a trained run on another labelled folder."""
    from defectscope.utils.io import check_output_path

    task = _run_task_obj(run)
    check_output_path(out if out else Path(run) / "evaluations" / Path(data).name, "dir")
    metrics = task.evaluate(run, data, out)
    console.print(_summary_table(f"{run} on {data}", metrics, ["n", "accuracy", "weighted_f1", "macro_auroc", "image_auroc", "map_50", "map", "box_mae", "dice"]))


@app.command()
@friendly
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder from 'defectscope train'.")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file; default per task: preds.csv (classification, anomaly, weld), masks.csv (segmentation, run-length encoded), boxes.json (detection, COCO).")] = None,
    save_images: Annotated[bool, typer.Option("--save-images", help="Also write masks / boxes as images (segmentation, detection).")] = False,
) -> None:
    """Predict files with a trained run; unreadable files are skipped and reported."""
    from defectscope.utils.io import check_output_path, display_path

    task = _run_task_obj(run)
    out = out or Path(getattr(task, "default_predict_out", "preds.csv"))
    check_output_path(out, "file")  # before the work, not after it
    options = {"save_images": save_images} if save_images else {}
    summary = task.predict(run, inputs, out, **options)
    for f, err in summary.get("skipped", []):
        console.print(f"[yellow]skipped[/] {escape(display_path(f))}: {error_line(ValueError(err))}", highlight=False, soft_wrap=True)
    console.print(f"predicted {summary.get('predicted')} file(s), skipped {len(summary.get('skipped', []))}: "
                  f"{escape(display_path(out))}", highlight=False)


@app.command()
def backbones() -> None:
    """List the registered backbones and where their weights come from here."""
    from defectscope.models.backbones import get_spec, list_backbones

    table = Table(title="Backbones")
    table.add_column("name")
    table.add_column("library")
    table.add_column("ImageNet weights here")
    for n in list_backbones():
        s = get_spec(n)
        table.add_row(n, f"{s.source}:{s.arch}", s.pretrained_source or "none (random init or a local file)")
    Console().print(table)


@app.command()
@friendly
def export(
    run: Annotated[Path, typer.Argument(help="Run folder from 'defectscope train'.")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write.")] = Path("model.onnx"),
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version.")] = 17,
    member: Annotated[Optional[str], typer.Option("--member", help="Anomaly runs: patchcore (default) or grad_mobilenet.")] = None,
) -> None:
    """Export a run's model to ONNX (dynamic batch axis, metadata for standalone use)."""
    from defectscope.deploy.export import export_onnx
    from defectscope.utils.io import check_output_path

    check_output_path(out, "file")
    info = export_onnx(run, out, opset=opset, member=member)
    console.print(f"wrote {out}: {info.task} '{info.model_name}', input {info.inputs}, outputs {info.outputs}, "
                  f"classes {info.class_names}", highlight=False)


@app.command("weld-simulate")
@friendly
def weld_simulate(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the simulated weld data set to.")],
    samples: Annotated[int, typer.Option("--samples", "-n", help="Number of coupons (paper 000: 603).")] = 603,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same data).")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Coupon image side in pixels.")] = 256,
) -> None:
    """Simulate laser-weld coupons (seven Table-2 conditions) in the weld data format; marked synthetic."""
    import time

    from rich.progress import Progress

    from defectscope.data.weld.simulate import simulate_weld_dataset

    start = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("simulating welds", total=samples)
        manifest = simulate_weld_dataset(out, samples, seed, image_size, progress=lambda d, n: bar.update(job, completed=d))
    console.print(f"wrote {samples} synthetic samples to {manifest} in {time.perf_counter() - start:.1f} s")


@app.command()
@friendly
def benchmark(
    run: Annotated[Path, typer.Argument(help="Run folder from 'defectscope train'.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for model.onnx, model.int8.onnx, benchmark.json (default RUN/deploy).")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Intra-op threads for every runtime.")] = 2,
    iters: Annotated[int, typer.Option("--iters", help="Batch-1 latency samples (at most).")] = 50,
    budget: Annotated[float, typer.Option("--budget", help="Seconds of batch-1 sampling per runtime (at most, 5 samples minimum).")] = 8.0,
    test_limit: Annotated[Optional[int], typer.Option("--test-limit", help="Use at most this many held-out images.")] = None,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Skip torch.compile.")] = False,
) -> None:
    """Parameters, FLOPs, latency, throughput and accuracy of eager, bf16, compile, ONNX Runtime fp32/int8."""
    from defectscope.deploy.benchmark import benchmark as run_benchmark
    from defectscope.deploy.benchmark import render_table

    res = run_benchmark(run, out, threads=threads, iters=iters, budget_s=budget, test_limit=test_limit,
                        compile_=not no_compile, log=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    Console(width=250).print(render_table(res))


@app.command()
@friendly
def serve(
    model: Annotated[Path, typer.Argument(help="Run folder (PyTorch) or .onnx file (ONNX Runtime).")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    workers: Annotated[int, typer.Option("--workers", help="Inference threads.")] = 1,
    queue: Annotated[int, typer.Option("--queue", help="Requests allowed to wait; more get 503.")] = 64,
    max_mb: Annotated[float, typer.Option("--max-mb", help="Largest upload per file, MiB.")] = 10.0,
    threads: Annotated[int, typer.Option("--threads", help="Intra-op threads of the model.")] = 2,
    member: Annotated[Optional[str], typer.Option("--member", help="Anomaly run folders: patchcore (default) or grad_mobilenet (PyTorch only).")] = None,
) -> None:
    """Serve a model over HTTP: POST /v1/predict, GET /healthz, /docs, and the operator page at /."""
    import math

    from defectscope.config import ConfigError
    from defectscope.deploy.service import serve as run_service

    if not math.isfinite(max_mb) or max_mb <= 0:
        raise ConfigError(f"--max-mb {max_mb:g}: the upload limit must be a positive number of MiB (e.g. 10)")
    if workers < 1 or queue < 0 or threads < 1:
        raise ConfigError(f"--workers {workers}, --queue {queue}, --threads {threads}: need workers >= 1, queue >= 0, threads >= 1")
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: must be in 1..65535")
    console.print(f"serving {model} on http://{host}:{port}/ (docs: /docs)", highlight=False)
    run_service(model, host=host, port=port, workers=workers, queue=queue, max_bytes=int(max_mb * 1024 * 1024), threads=threads,
                member=member)


@app.command("inspect")
@friendly
def inspect_cmd(
    model: Annotated[Path, typer.Argument(help="Run folder (PyTorch) or .onnx file from 'defectscope export' (ONNX Runtime).")],
    sources: Annotated[list[str], typer.Argument(help="Image folders (recursive), globs ('dir/**/*.png') or .txt lists of image paths.")],
    out: Annotated[Path, typer.Option("--out", help="Results file (.parquet): one row per image.")] = Path("preds.parquet"),
    workers: Annotated[Optional[int], typer.Option("--workers", help="Ray actors, one model copy each (default: CPUs // --threads; on a cluster its CPUs // --threads).", show_default=False)] = None,
    threads: Annotated[int, typer.Option("--threads", help="Intra-op threads (and reserved CPUs) per worker.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 32,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster to run on (e.g. ray://head:10001); default: a private local Ray.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue: skip images already in --out or its .parts folder.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard earlier results of --out.")] = False,
    flush_every: Annotated[int, typer.Option("--flush-every", help="Write a results part every N rows (or 10 s); a kill loses at most that much work.")] = 1000,
    save_maps: Annotated[Optional[Path], typer.Option("--save-maps", help="Folder for each image's mask / anomaly map / boxes / attention overlay as PNG (column map_path).")] = None,
) -> None:
    """Score image archives on Ray Data: streaming reads, one model copy per worker, Parquet results, resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from defectscope.deploy.inspect import inspect_archive
    from defectscope.utils.io import display_path

    state = {"last": 0.0}
    with Progress(TextColumn("inspect"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]:.1f} img/s"),
                  TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(), console=console,
                  disable=not console.is_terminal) as bar:
        job = bar.add_task("inspect", total=None, rate=0.0, errors=0)

        def on_progress(done: int, total: int, errors: int, rate: float) -> None:
            import time

            bar.update(job, completed=done, total=total, rate=rate, errors=errors)
            now = time.monotonic()
            if not console.is_terminal and (now - state["last"] >= 5.0 or done == total):  # logs: a line every 5 s
                state["last"] = now
                console.print(f"inspect: {done}/{total} images, {rate:.1f} img/s, {errors} errors", highlight=False)

        try:
            res = inspect_archive(model, sources, out, workers=workers, threads=threads, batch_size=batch_size,
                                  address=address, resume=resume, overwrite=overwrite, flush_rows=max(flush_every, 1),
                                  on_progress=on_progress, save_maps=save_maps)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]: the rows received so far are in {escape(display_path(out))}.parts/; "
                          "run the same command with --resume to finish", highlight=False)
            raise typer.Exit(130) from None
    s = res.summary
    table = Table(title=f"inspect: {escape(display_path(res.out))}")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("images (inputs)", str(res.inputs))
    table.add_row("rows", str(res.rows))
    table.add_row("scored now / already done", f"{res.new} / {res.resumed}")
    table.add_row("errors", str(s["errors"]))
    for c, n in s.get("classes", {}).items():
        table.add_row(f"class {escape(str(c))}", f"{n} ({100.0 * n / max(s['scored'], 1):.1f} %)")
    if s.get("defect_rate") is not None:
        table.add_row(f"defect rate ({s['defect_column']})", f"{100.0 * s['defect_rate']:.2f} %")
    if s.get("drift"):
        d = s["drift"]
        text = (f"{d['alarms']} of {d['windows']} windows of {d['window']} alarm (alpha {d['alpha']:g} per window)"
                if d["windows"] else f"not tested: fewer than {d['window']} scored images")
        if d.get("first_alarm"):
            text += f"; first: {d['first_alarm']['first']} .. {d['first_alarm']['last']} ({', '.join(d['first_alarm']['triggered_by'])})"
        table.add_row("drift (path order)", escape(text))
        r = d.get("random") or {}
        if r.get("windows"):
            table.add_row("drift (random windows)", f"{r['alarms']} of {r['windows']} random windows of {d['window']} alarm "
                          f"({100 * r['rate']:.1f} %; in distribution: about {100 * d['alpha']:g} %)")
    if res.new:
        table.add_row("images/s (this run, after Ray start)", f"{res.images_per_s:.1f} ({res.workers} worker(s) x {threads} thread(s))")
        table.add_row("seconds: Ray start / run / total", "{:.1f} / {:.1f} / {:.1f}".format(
            res.timings.get("ray_init", 0.0), res.timings.get("run", 0.0), res.timings["total"]))
    if save_maps is not None:
        table.add_row("maps (PNG, column map_path)", escape(display_path(save_maps)))
    table.add_row("model", escape(f"{res.identity['model']} {res.identity['model_backend']} sha256 {res.identity['model_sha256'][:16]}"))
    console.print(table)


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    samples: Annotated[int, typer.Option("--samples", "-n", help="Simulated coupons (paper 000: 603).")] = 603,
    override: Annotated[Optional[list[str]], typer.Option("-o", "--override", help="key.sub=value, repeatable.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
) -> None:
    """Weld demo, no data needed: simulate coupons, train the seam U-Net and the fusion model, evaluate (8:2)."""
    from defectscope.config import _set_dotted, parse_overrides
    from defectscope.engine.weld import demo_recipe

    raw = demo_recipe(samples)
    for key, value in parse_overrides(override):
        _set_dotted(raw, key, value, "demo (override)")
    task, result = _train(raw, "demo", out, None, None, overwrite)
    _print_result(task, out, result, f"weld demo (SYNTHETIC data): {out}")
    if result is not None and "selected_channel_names" in result:
        console.print(f"seam Dice={result['test'].get('seam_dice')}  channels={', '.join(result['selected_channel_names'])}",
                      highlight=False)


signals_app = typer.Typer(no_args_is_help=True, help="Bring your own process recordings (CSV, audio, photos) into the weld format.")
app.add_typer(signals_app, name="signals")


@signals_app.command("import")
@friendly
def signals_import(
    spec: Annotated[Path, typer.Argument(help="Import spec (YAML, see docs/weld.md).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (defectscope-weld/2); must not exist or be empty.")],
) -> None:
    """Import recording folders (sensor CSV + photos + optional audio) into a weld data folder."""
    from defectscope.data.weld.importer import import_recordings

    res = import_recordings(spec, out)
    table = Table(title=f"imported {res.n_runs} runs -> {res.manifest.parent}")
    table.add_column("item")
    table.add_column("value")
    table.add_row("classes", ", ".join(f"{c}: {n}" for c, n in res.class_counts.items()))
    table.add_row("channels", ", ".join(res.channels))
    if res.group_counts:
        table.add_row("groups", ", ".join(f"{g}: {n}" for g, n in sorted(res.group_counts.items())))
    table.add_row("rows per run (min/median/max)", "{} / {:g} / {}".format(*res.rows))
    table.add_row("seconds per run (min/median/max)", "{:.1f} / {:.1f} / {:.1f}".format(*res.durations_s))
    console.print(table)


data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect data folders before training.")
app.add_typer(data_app, name="data")


@data_app.command("check")
@friendly
def data_check(
    folder: Annotated[Path, typer.Argument(help="Data folder (any layout defectscope reads).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for data_check.json, report.html, thumbnails/.")] = None,
    near: Annotated[int, typer.Option("--near", help="pHash Hamming distance (of 64 bits) for near duplicates.")] = 8,
) -> None:
    """Health of a data set: images per class, sizes, modes, bit depths, unreadable files, duplicates, empty classes."""
    from rich.markup import escape

    from defectscope.data.check import check_dataset, render_table

    result = check_dataset(folder, out, near_threshold=near)
    Console().print(render_table(result))
    for w in result["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    if not result["warnings"]:
        console.print("no problems found", highlight=False)
    if out is not None:
        console.print(f"written: {out / 'data_check.json'}, {out / 'report.html'}", highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
