"""The ``defectscope`` command (typer): train, evaluate, predict, and the commands of later tasks.

Errors a user can fix (bad recipe, bad data, missing run) print one clear
message and exit with status 2; nothing already written is removed.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Defect inspection for metal surfaces and laser welds.")
console = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from defectscope.config import ConfigError
    from defectscope.data.images import DatasetError, ImageReadError
    from defectscope.engine.run import RunError
    from defectscope.models.weights import WeightsUnavailableError

    return (ConfigError, DatasetError, ImageReadError, RunError, WeightsUnavailableError, FileNotFoundError, KeyError, ValueError,
            FloatingPointError)


def friendly(fn: Callable) -> Callable:
    """Turn user errors into one red line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            console.print(f"[bold red]error:[/] {msg}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


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


@app.command()
@friendly
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see configs/).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    override: Annotated[Optional[list[str]], typer.Option("-o", "--override", help="key.sub=value, repeatable.")] = None,
) -> None:
    """Train a recipe, evaluate its held-out split and write the run folder."""
    from defectscope.config import load_raw, validate
    from defectscope.engine.run import RunFolder
    from defectscope.engine.tasks import get_task

    raw = load_raw(recipe, override)
    if "task" not in raw:
        from defectscope.config import ConfigError

        raise ConfigError(f"{recipe}: missing 'task' key")
    task = get_task(raw["task"])
    cfg = validate(raw, task.recipe, str(recipe))
    run = RunFolder(out).create()
    run.write_config(cfg.model_dump(mode="json"))
    result = task.fit(cfg, out, source=recipe)
    if result is None:  # a non-zero DDP rank
        return
    console.print(_summary_table(f"{task.name}: {out}", result.get("test", {}),
                                 ["accuracy", "weighted_f1", "macro_auroc", "image_auroc", "map_50", "map", "box_mae", "dice"]))
    console.print(f"train_seconds={result.get('train_seconds')}  report: {run.report_path}")


@app.command()
@friendly
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder from 'defectscope train'.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled data to evaluate on (a folder; for detection also a COCO .json file).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default RUN/evaluations/<data name>).")] = None,
) -> None:
    """Re-evaluate a trained run on another labelled folder."""
    from defectscope.engine.tasks import get_task

    metrics = get_task(_run_task(run)).evaluate(run, data, out)
    console.print(_summary_table(f"{run} on {data}", metrics, ["n", "accuracy", "weighted_f1", "macro_auroc", "image_auroc", "map_50", "map", "box_mae", "dice"]))


@app.command()
@friendly
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder from 'defectscope train'.")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    out: Annotated[Path, typer.Option("--out", help="Output file (CSV, JSON or folder, per task).")] = Path("preds.csv"),
    save_images: Annotated[bool, typer.Option("--save-images", help="Also write overlays/masks/boxes as images.")] = False,
) -> None:
    """Predict files with a trained run; unreadable files are skipped and reported."""
    from defectscope.engine.tasks import get_task

    summary = get_task(_run_task(run)).predict(run, inputs, out, save_images=save_images)
    for f, err in summary.get("skipped", []):
        console.print(f"[yellow]skipped[/] {err}", highlight=False, soft_wrap=True)
    console.print(f"predicted {summary.get('predicted')} file(s), skipped {len(summary.get('skipped', []))}: {out}")


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
) -> None:
    """Export a run's model to ONNX (dynamic batch axis, metadata for standalone use)."""
    from defectscope.deploy.export import export_onnx

    info = export_onnx(run, out, opset=opset)
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
) -> None:
    """Serve a model over HTTP: POST /v1/predict, GET /healthz, /docs, and the operator page at /."""
    from defectscope.deploy.service import serve as run_service

    console.print(f"serving {model} on http://{host}:{port}/ (docs: /docs)", highlight=False)
    run_service(model, host=host, port=port, workers=workers, queue=queue, max_bytes=int(max_mb * 1024 * 1024), threads=threads)


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    samples: Annotated[int, typer.Option("--samples", "-n", help="Simulated coupons (paper 000: 603).")] = 603,
    override: Annotated[Optional[list[str]], typer.Option("-o", "--override", help="key.sub=value, repeatable.")] = None,
) -> None:
    """Weld demo, no data needed: simulate coupons, train the seam U-Net and the fusion model, evaluate (8:2)."""
    from defectscope.config import parse_overrides, validate, _set_dotted
    from defectscope.engine.run import RunFolder
    from defectscope.engine.tasks import get_task
    from defectscope.engine.weld import demo_recipe

    raw = demo_recipe(samples)
    for key, value in parse_overrides(override):
        _set_dotted(raw, key, value, "demo (override)")
    task = get_task("weld")
    cfg = validate(raw, task.recipe, "demo")
    run = RunFolder(out).create()
    run.write_config(cfg.model_dump(mode="json"))
    result = task.fit(cfg, out)
    console.print(_summary_table(f"weld demo (SYNTHETIC data): {out}", result["test"], ["n", "accuracy", "weighted_f1", "macro_auroc"]))
    console.print(f"seam Dice={result['seam_dice_test']}  channels={result['selected_wavelengths_nm']} nm  "
                  f"total_seconds={result['total_seconds']}  report: {run.report_path}")


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
