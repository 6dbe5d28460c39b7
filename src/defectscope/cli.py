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


MaxMegapixels = Annotated[Optional[float], typer.Option(
    "--max-megapixels", show_default=False,
    help="Largest image accepted, megapixels (default 40; decompression-bomb guard). Raise it for line-scan "
         "images (a 13000 x 13000 px image is 169). Same as the environment variable DEFECTSCOPE_MAX_MEGAPIXELS.")]


def _set_pixel_limit(max_megapixels: float | None) -> None:
    """Apply ``--max-megapixels`` to every image reader of this process and of its workers (through
    ``DEFECTSCOPE_MAX_MEGAPIXELS``, which :func:`defectscope.data.images.pixel_limit` reads)."""
    import math
    import os

    from defectscope.config import ConfigError
    from defectscope.data.images import MAX_MEGAPIXELS_ENV

    if max_megapixels is None:
        return
    if not math.isfinite(max_megapixels) or max_megapixels <= 0:
        raise ConfigError(f"--max-megapixels {max_megapixels:g}: expected a positive number of megapixels (e.g. 200)")
    os.environ[MAX_MEGAPIXELS_ENV] = f"{max_megapixels:g}"


def _summary_table(title: str, metrics: dict, keys: list[str]) -> Table:
    table = Table(title=title, min_width=min(len(title) + 4, 120))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in keys:
        if k in metrics and not isinstance(metrics[k], (dict, list)):
            v = metrics[k]
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


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
    cands = result.get("candidates") or {}
    if len(cands) > 1:
        key = result.get("selection_metric", "accuracy")
        console.print(f"candidates, validation {key}: " + ", ".join(
            f"{n} {c['val'].get(key, float('nan')):.4f}" for n, c in cands.items())
            + f"; chosen: {result['chosen']} -> {out / 'model.ckpt'} (the test figures above are the chosen model's, "
            "no choice read the test part; the others' runs: " + f"{out / 'candidates'})", highlight=False, soft_wrap=True)
    cut = "  (CUT SHORT by train.max_minutes: the schedule did not finish)" if result.get("cut_short") else ""
    console.print(f"train_seconds={result.get('train_seconds')}{cut}  report: {out / 'report.html'}")


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
    max_megapixels: MaxMegapixels = None,
) -> None:
    """Train a recipe (or a data folder with a recipe sized to it), evaluate it and write the run folder.

    The data are checked first, for a recipe as for a data folder (duplicates across classes or
    within a class, empty classes, unreadable files are warned about; the check is written to
    RUN/data_check.json). With a data folder, k-fold cross-validation is chosen when a single split
    would hold fewer than 10 test images of some class; ``--folds 1`` forces a single split.
    """
    from defectscope import api

    if nested:
        override = [*(override or []), "eval.nested=true"]
    _set_pixel_limit(max_megapixels)

    def log(message: str) -> None:
        if message.startswith("warning: "):
            console.print(f"[bold red]warning:[/] {escape(message[9:])}", highlight=False, soft_wrap=True)
        else:
            console.print(escape(message), highlight=False, soft_wrap=True)

    if task_name and not recipe.is_dir():
        from defectscope.config import ConfigError

        raise ConfigError("--task is for data folders; a recipe names its task in its 'task' key")
    if recipe.is_dir():
        import yaml

        raw, check = api.recipe_for_folder(recipe, task_name, override, log)
        console.print("[bold]recipe[/] (written to RUN/config.yaml; edit it and run 'defectscope train RUN/config.yaml'):\n"
                      + escape(yaml.safe_dump(raw, sort_keys=False)), highlight=False)
        folds_eff = folds if folds is not None else raw.get("eval", {}).get("folds")
        if folds_eff and folds_eff > 1:
            console.print(f"evaluation: {folds_eff}-fold cross-validation (a single split would leave fewer than "
                          "10 test images of some class; --folds 1 forces one split)", highlight=False)
        run = api.train(raw, out, folds=folds, group_by=group_by, overwrite=overwrite, resume=resume)
        if run is not None and check:
            from defectscope.utils.io import write_json

            write_json(out / "data_check.json", check)
    else:  # the same data check as for a folder runs once the recipe is valid (api.check_recipe_data)
        run = api.train(recipe, out, folds=folds, group_by=group_by, overwrite=overwrite, resume=resume, override=override,
                        log=log)
    if run is None:  # a non-zero DDP rank
        return
    _print_result(_task_of(run), out, run.result)


def _task_of(run):
    """The task hooks of a :class:`~defectscope.api.Run` (for its summary keys)."""
    from defectscope.engine.tasks import get_task

    return get_task(run.task)


@app.command()
@friendly
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder from 'defectscope train', or an .onnx file from 'defectscope export'.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled data to evaluate on (a folder; for detection also a COCO .json file).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default RUN/evaluations/<data name>).")] = None,
    max_megapixels: MaxMegapixels = None,
) -> None:
    """Re-evaluate a trained run (or an exported .onnx file) on another labelled folder."""
    from defectscope import api

    _set_pixel_limit(max_megapixels)
    metrics = api.evaluate(run, data, out)
    console.print(_summary_table(f"{run} on {data}", metrics, ["n", "accuracy", "weighted_f1", "macro_auroc", "image_auroc", "map_50", "map", "box_mae", "dice"]))


@app.command()
@friendly
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder from 'defectscope train', or an .onnx file from 'defectscope export'.")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file; default per task: preds.csv (classification, anomaly, weld), masks.csv (segmentation, run-length encoded), boxes.json (detection, COCO).")] = None,
    save_images: Annotated[bool, typer.Option("--save-images", help="Also write masks / boxes as images (segmentation, detection).")] = False,
    max_megapixels: MaxMegapixels = None,
) -> None:
    """Predict files with a trained run (or an exported .onnx file); unreadable files are skipped and
    reported, and so is an animated GIF / multi-page TIFF ("frame 1 of N used")."""
    import warnings

    from defectscope import api
    from defectscope.data.images import MultiFrameWarning
    from defectscope.utils.io import display_path

    _set_pixel_limit(max_megapixels)
    options = {"save_images": save_images} if save_images else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", MultiFrameWarning)
        summary = api.predict(run, inputs, out, **options)
    for w in caught:
        if issubclass(w.category, MultiFrameWarning):
            console.print(f"[yellow]warning:[/] {error_line(ValueError(str(w.message)))}", highlight=False, soft_wrap=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for f, err in summary.get("skipped", []):
        console.print(f"[yellow]skipped[/] {escape(display_path(f))}: {error_line(ValueError(err))}", highlight=False, soft_wrap=True)
    console.print(f"predicted {summary.get('predicted')} file(s), skipped {len(summary.get('skipped', []))}: "
                  f"{escape(display_path(Path(summary['out'])))}", highlight=False)


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
    member: Annotated[Optional[str], typer.Option("--member", help="Anomaly runs: optional, the run's own model name (a run holds one anomaly model).")] = None,
) -> None:
    """Export a run's model to ONNX (dynamic batch axis, metadata for standalone use)."""
    from defectscope import api

    info = api.export(run, out, opset=opset, member=member)
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
    threads: Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads for every runtime (default: the CPUs this process may use).", show_default=False)] = None,
    iters: Annotated[int, typer.Option("--iters", help="Batch-1 latency samples (at most).")] = 50,
    budget: Annotated[float, typer.Option("--budget", help="Seconds of batch-1 sampling per runtime (at most, 5 samples minimum).")] = 8.0,
    test_limit: Annotated[Optional[int], typer.Option("--test-limit", help="Use at most this many held-out images.")] = None,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Skip torch.compile.")] = False,
) -> None:
    """Parameters, FLOPs, latency, throughput and accuracy of eager, bf16, compile, ONNX Runtime fp32/int8."""
    from defectscope.deploy.benchmark import benchmark as run_benchmark
    from defectscope.deploy.benchmark import render_table

    from defectscope.machine import resolve_threads

    res = run_benchmark(run, out, threads=resolve_threads(threads), iters=iters, budget_s=budget, test_limit=test_limit,
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
    threads: Annotated[Optional[int], typer.Option("--threads", help="Intra-op threads of the model (default: the CPUs this process may use).", show_default=False)] = None,
    member: Annotated[Optional[str], typer.Option("--member", help="Anomaly run folders: optional, the run's own model name (a run holds one anomaly model).")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="For an .onnx file: onnxruntime, openvino, or auto (the faster exact fp32 runtime, timed at start).")] = "auto",
    max_megapixels: MaxMegapixels = None,
) -> None:
    """Serve a model over HTTP: POST /v1/predict, GET /healthz, /docs, and the operator page at /."""
    import math

    from defectscope.config import ConfigError
    from defectscope.deploy.service import serve as run_service

    if not math.isfinite(max_mb) or max_mb <= 0:
        raise ConfigError(f"--max-mb {max_mb:g}: the upload limit must be a positive number of MiB (e.g. 10)")
    from defectscope.machine import resolve_threads

    threads = resolve_threads(threads) if threads is None else threads
    if workers < 1 or queue < 0 or threads < 1:
        raise ConfigError(f"--workers {workers}, --queue {queue}, --threads {threads}: need workers >= 1, queue >= 0, threads >= 1")
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: must be in 1..65535")
    _set_pixel_limit(max_megapixels)
    console.print(f"serving {model} on http://{host}:{port}/ (docs: /docs)", highlight=False)
    run_service(model, host=host, port=port, workers=workers, queue=queue, max_bytes=int(max_mb * 1024 * 1024), threads=threads,
                member=member, runtime=runtime)


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
    runtime: Annotated[str, typer.Option("--runtime", help="For an .onnx file: onnxruntime, openvino, or auto (the faster exact fp32 runtime, timed once at start).")] = "auto",
    max_megapixels: MaxMegapixels = None,
) -> None:
    """Score image archives on Ray Data: streaming reads, one model copy per worker, Parquet results, resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    _set_pixel_limit(max_megapixels)

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
            res = inspect_archive(model, sources, out, workers=workers, threads=threads, batch_size=batch_size, runtime=runtime,
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
def doctor(
    no_measure: Annotated[bool, typer.Option("--no-measure", help="Skip the matrix-product measurements.")] = False,
) -> None:
    """What this machine is and what train, serve and inspect would use here (before a long run).

    Prints the CPU model, torch's CPU capability, whether bf16 is native, the measured fp32 (and, where
    native, bf16) matrix-product rate, the precision and threads ``train`` chooses with ``auto``, and the
    runtime ``serve`` / ``inspect`` use (exact fp32: the faster of ONNX Runtime and OpenVINO, timed at start, for an ``.onnx`` file; PyTorch for a run
    folder). Nothing is written.
    """
    from defectscope.machine import environment, matmul_rates, resolve_precision, resolve_threads

    prec = resolve_precision("auto")
    env = environment(prec, resolve_threads("auto"))
    table = Table(title="defectscope doctor: this machine", show_header=False)
    table.add_column("fact", justify="left")
    table.add_column("value", justify="left")
    for k, v in env.items():
        table.add_row(k, ", ".join(v) if isinstance(v, list) else ("n/a" if v is None else str(v)))
    if not no_measure:
        rates = matmul_rates(1024, seconds=0.3, min_reps=3)
        table.add_row("fp32 matmul (1024^2, measured)", f"{rates['fp32']:.0f} GFLOP/s")
        table.add_row("bf16 matmul (1024^2, measured)", f"{rates['bf16']:.0f} GFLOP/s" if rates["bf16"] is not None else
                      "not measured: bf16 is emulated here (one product would take seconds)")
    table.add_row("train (precision: auto)", f"precision {prec.value}, {env['threads']} threads (num_threads: auto)")
    table.add_row("serve / inspect", "for a .onnx file the faster exact fp32 runtime (ONNX Runtime or OpenVINO, "
                  "timed at start: --runtime auto), PyTorch fp32 for a run folder; threads = the CPUs this process may use")
    Console(width=200).print(table)


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    samples: Annotated[int, typer.Option("--samples", "-n", help="Simulated coupons (paper 000: 603).")] = 603,
    override: Annotated[Optional[list[str]], typer.Option("-o", "--override", help="key.sub=value, repeatable.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
) -> None:
    """Weld demo, no data needed: simulate coupons, train the seam U-Net and the fusion model, evaluate (8:2)."""
    from defectscope import api
    from defectscope.engine.weld import demo_recipe

    run = api.train(demo_recipe(samples), out, overwrite=overwrite, override=override)
    if run is None:
        return
    result = run.result
    _print_result(_task_of(run), out, result, f"weld demo (SYNTHETIC data): {out}")
    if "selected_channel_names" in result:
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
    max_megapixels: MaxMegapixels = None,
) -> None:
    """Health of a data set: images per class, sizes, modes, bit depths, unreadable files, duplicates, empty classes."""
    _set_pixel_limit(max_megapixels)
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
