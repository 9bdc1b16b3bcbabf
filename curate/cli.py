"""The `curate` command line: a thin typer app over curate.pipeline; the one place that writes to the terminal."""


import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional  # noqa: UP035 - typer reads Optional at runtime

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from curate import pipeline
from curate.config import OPTION_HELP, Config, default_of, load_config, option_fields

app = typer.Typer(help="LAION-style parquet metadata to WebDataset shards for text-to-image training.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)
STAGE_COMMANDS = ["prefilter", "download", "score", "dedup", "select", "shard"]


def _option_type(field: Any) -> Any:
    text = str(field.type)
    if "bool" in text:
        return Optional[bool]  # noqa: UP045
    if "list" in text or "str" in text:
        return Optional[str]  # noqa: UP045
    if "float" in text:
        return Optional[float]  # noqa: UP045
    return Optional[int]  # noqa: UP045


def _config_parameters() -> list[inspect.Parameter]:
    """One --long-option per Config field, defaulting to None so curate.toml values are not overridden."""
    parameters = []
    for field in option_fields():
        default = default_of(field)
        shown = ",".join(default) if isinstance(default, list) else default
        flag = "--" + field.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if "bool" in str(field.type) else [flag]
        option = typer.Option(None, *decls, help=f"{OPTION_HELP[field.name]} [default: {shown}]",
                              show_default=False)
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=_option_type(field)))
    return parameters


def with_config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command every run option; it receives them gathered as `options: dict`."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "options"]
    names = [field.name for field in option_fields()]

    def wrapper(**kwargs: Any) -> Any:
        options = {name: kwargs.pop(name) for name in names}
        return command(options=options, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + _config_parameters())  # type: ignore[attr-defined]
    wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
    return wrapper


ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="TOML file; keys are the long option names.")]  # noqa: UP045
Output = Annotated[Path, typer.Option("--output", "-o", help="Output folder (created; a rerun resumes it).")]


def _progress() -> tuple[Progress, Callable[[str, int, int], None]]:
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    return bars, update


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(2)


def print_summary(stats: dict[str, Any], output: Path) -> None:
    table = Table(title=f"curate: {stats['input_rows']} rows in, {stats['kept']} kept, {stats['dropped']} dropped")
    for column in ("stage", "reason", "rows"):
        table.add_column(column, justify="right" if column == "rows" else "left")
    for stage, reasons in stats["dropped_by_stage"].items():
        for reason, count in reasons.items():
            table.add_row(stage, reason, str(count))
    console.print(table)
    shards = stats["shards"]
    console.print(f"shards: {shards['num_shards']} x {shards['samples_per_shard']} samples in {output / 'shards'}")
    for name in ("ledger.parquet", "samples.parquet", "stats.json"):
        console.print(f"{name}: {output / name}")
    if (output / "report.html").exists():
        console.print(f"report: {output / 'report.html'}")


@app.command()
@with_config_options
def run(inputs: Annotated[list[str], typer.Argument(help="Parquet files, globs, folders or fsspec URLs.")],
        output: Output, config: ConfigFile = None, options: Optional[dict] = None) -> None:  # noqa: UP045
    """Run every stage: ingest, prefilter, download, score, dedup, select, shard."""
    try:
        settings = load_config(config, options or {})
        bars, update = _progress()
        with bars:
            stats = pipeline.run_local(inputs, output, settings, update)
    except ValueError as error:
        _fail(error)
    print_summary(stats, output)


def _settings_of(output: Path, config: Path | None, options: dict | None) -> Config:
    """The run's own settings, then the config file, then the options given on this command line."""
    from_file = load_config(config, {}).to_dict() if config is not None else {}
    given = {k: v for k, v in (options or {}).items() if v is not None}
    defaults = Config().to_dict()
    file_values = {k: v for k, v in from_file.items() if v != defaults[k]}
    return load_config(None, {**pipeline.load_run_config(output).to_dict(), **file_values, **given})


def _stage_command(stage: str) -> Callable[..., Any]:
    def command(output: Annotated[Path, typer.Argument(help="A curate output folder.")],
                config: ConfigFile = None, options: Optional[dict] = None) -> None:  # noqa: UP045
        try:
            settings = _settings_of(output, config, options)
            stats = pipeline.rerun_stage(stage, output, settings)
        except ValueError as error:
            _fail(error)
        if stats is not None:
            print_summary(stats, output)
        else:
            console.print(f"{stage}: done; run `curate shard {output}` to write shards, ledger and stats")

    command.__name__ = stage
    command.__doc__ = f"Re-run the {stage} stage on an existing output folder (options override the run's)."
    return command


for _stage in STAGE_COMMANDS:
    app.command(name=_stage)(with_config_options(_stage_command(_stage)))


@app.command()
@with_config_options
def retry(output: Annotated[Path, typer.Argument(help="A curate output folder.")],
          config: ConfigFile = None, options: Optional[dict] = None) -> None:  # noqa: UP045
    """Fetch again only the rows whose download failed transiently (timeout, connection, DNS, 429/5xx)."""
    try:
        settings = _settings_of(output, config, options)
        bars, update = _progress()
        with bars:
            stats = pipeline.retry_failed(output, settings, update)
    except ValueError as error:
        _fail(error)
    print_summary(stats, output)


@app.command()
def verify(output: Annotated[Path, typer.Argument(help="A curate output folder.")]) -> None:
    """Re-read every shard: sha256, sample counts, jpg/txt/json per sample; exit 1 on any mismatch."""
    from curate.verify import verify as verify_output

    problems = verify_output(output)
    for problem in problems:
        console.print(f"[red]{problem}[/]")
    if problems:
        raise typer.Exit(1)
    console.print(f"{output}: every shard matches index.json and samples.parquet")


@app.command()
def report(output: Annotated[Path, typer.Argument(help="A curate output folder.")]) -> None:
    """Rebuild OUT/report.html (funnel, distributions, image grids, shard plan) from a finished run."""
    from curate.report import build_report

    try:
        path = build_report(output)
    except ValueError as error:
        _fail(error)
    console.print(f"report: {path}")


@app.command()
def demo(output: Output = Path("demo-out"),
         rows: Annotated[int, typer.Option(help="Rows in the generated sample.")] = 400) -> None:
    """Build a LAION-schema sample, serve its images on 127.0.0.1 and run the pipeline on it."""
    from curate.demo import run_demo

    bars, update = _progress()
    with bars:
        stats = run_demo(output, rows, update)
    print_summary(stats, output)
    console.print(f"verify with: curate verify {output}")


@app.command(name="score-embeddings")
def score_embeddings(
    embeddings: Annotated[Path, typer.Argument(help="CLIP ViT-L/14 image embeddings: .npy of rows x 768.")],
    metadata: Annotated[Optional[Path], typer.Argument(help="Parquet with the same rows in the same order.")] = None,  # noqa: UP045
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file to write.")] = Path("scores.parquet"),
    aesthetic_weights: Annotated[Optional[str], typer.Option(help="Local file or URL of the head.")] = None,  # noqa: UP045
    aesthetic_head: Annotated[str, typer.Option(help="v2 (MLP) or v1 (linear).")] = "v2",
    model_cache: Annotated[str, typer.Option(help="Where official weights are downloaded.")] = "~/.cache/curate",
) -> None:
    """Aesthetic scores from precomputed CLIP embeddings (LAION's img_emb), before any image is downloaded."""
    from curate.score_embeddings import score_embeddings as score

    try:
        rows = score(embeddings, output, metadata, aesthetic_weights, aesthetic_head, model_cache)
    except ValueError as error:
        _fail(error)
    console.print(f"{rows} rows scored: {output}")


@app.command("dedup-embeddings")
def dedup_embeddings_command(
        embeddings: Annotated[list[Path], typer.Argument(help="Embedding .npy files (n x d float16).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Parquet: index, cluster, keep, duplicate_of.")],
        threshold: Annotated[float, typer.Option(help="Cosine similarity that makes two images duplicates.")] = 0.95,
        metadata: Annotated[Optional[Path], typer.Option(  # noqa: UP045
            help="Metadata parquet in the same row order: survivor by aesthetic, size, index.")] = None,
        clusters: Annotated[Optional[int], typer.Option(  # noqa: UP045
            help="k-means clusters [default: rows / 10,000, 1 to 50,000].")] = None,
        seed: Annotated[int, typer.Option(help="Seed of the k-means.")] = 0,
        workers: Annotated[int, typer.Option(help="Processes for the per-cluster search.")] = 1) -> None:
    """Find semantic near-duplicates in precomputed CLIP embeddings, before any image is downloaded."""
    from curate.dedup_embeddings import dedup_embeddings

    try:
        result = dedup_embeddings([str(path) for path in embeddings], str(output), threshold,
                                  str(metadata) if metadata else None, clusters, seed, workers)
    except ValueError as error:
        _fail(error)
    duplicates = result.num_rows - sum(result["keep"].to_pylist())
    console.print(f"{result.num_rows} embeddings, {duplicates} duplicates: {output}")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every step.")] = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


__all__ = ["app", "Config"]
