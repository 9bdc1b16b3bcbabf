"""The `curate` command line: a thin typer app over curate.pipeline.run; the one place that writes to the terminal."""


import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional  # noqa: UP035 - typer reads Optional at runtime

import pyarrow as pa
import pyarrow.compute as pc
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from curate.config import OPTION_HELP, Config, default_of, load_config, option_fields
from curate.pipeline import run as pipeline
from curate.pipeline.accounting import drop_counts, skipped_steps
from curate.pipeline.steps import STAGE_NAMES
from curate.schema import DROP_REASON, DROP_STAGE, KEY
from curate.storage import files as storage


class _PlainFlags:
    """typer prints `<bool>` after every switch (`--verbose <bool>`); a switch takes no value, so show none."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_PlainFlags, TyperCommand):
    pass


class Group(_PlainFlags, TyperGroup):
    pass


app = typer.Typer(help="LAION-style parquet metadata to WebDataset shards for text-to-image training.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=Group)
console = Console(stderr=True)  # progress and errors
results = Console(soft_wrap=True)  # what a command found, on stdout; long paths stay on one line
STAGE_COMMANDS = STAGE_NAMES[1:]  # every stage after ingest re-runs from the previous one's checkpoint


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
    """One --long-option per Config field, with the Config default (shown by --help)."""
    parameters = []
    for field in option_fields():
        default = default_of(field)
        flag = "--" + field.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if "bool" in str(field.type) else [flag]
        option = typer.Option(",".join(default) if isinstance(default, list) else default, *decls,
                              help=OPTION_HELP[field.name], show_default=default is not None)
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=_option_type(field)))
    return parameters


def with_config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command every run option; it receives the ones given on the command line as `options: dict`.

    Options left at their default are left out, so they do not override curate.toml or the run's own settings.
    """
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "options"]
    names = [field.name for field in option_fields()]

    def wrapper(context: typer.Context, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names}
        options = {name: value for name, value in values.items() if _given(context, name)}
        return command(options=options, **kwargs)

    context = inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    wrapper.__signature__ = inspect.Signature([context, *own, *_config_parameters()])  # type: ignore[attr-defined]
    wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
    return wrapper


ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="TOML file; keys are the long option names.")]  # noqa: UP045
Output = Annotated[Path, typer.Option("--output", "-o", help="Output folder (created; a rerun resumes it).")]
# A folder or an fsspec URL (s3://bucket/out): kept a string, since Path would fold "s3://" into "s3:/".
OutputFolder = Annotated[str, typer.Option("--output", "-o", metavar="PATH",
                                           help="Output folder or fsspec URL such as s3://bucket/out "
                                                "(created; a rerun resumes it).")]
OutputArgument = Annotated[str, typer.Argument(metavar="OUTPUT", help="A curate output folder or fsspec URL.")]


def _given(context: typer.Context, name: str) -> bool:
    source = context.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


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


def print_funnel(title: str, dropped_by_stage: dict[str, dict[str, int]]) -> None:
    """The rows each stage dropped, by reason, as a table."""
    table = Table(title=title)
    for column in ("stage", "reason", "rows"):
        table.add_column(column, justify="right" if column == "rows" else "left")
    for stage, reasons in dropped_by_stage.items():
        for reason, count in reasons.items():
            table.add_row(stage, reason, str(count))
    results.print(table)


def print_summary(stats: dict[str, Any], folder: str | Path) -> None:
    output = storage.location(folder)
    print_funnel(f"curate: {stats['input_rows']} rows in, {stats['kept']} kept, {stats['dropped']} dropped",
                 stats["dropped_by_stage"])
    shards = stats["shards"]
    results.print(f"shards: {shards['num_shards']} x {shards['samples_per_shard']} samples in {output / 'shards'}")
    for name in ("ledger.parquet", "samples.parquet", "stats.json"):
        results.print(f"{name}: {output / name}")
    for skipped in skipped_steps(stats):
        results.print(f"[yellow]note:[/] {skipped}", highlight=False)
    if (output / "report.html").exists():
        results.print(f"report: {output / 'report.html'}")


def stage_funnel(output: str, stage: str) -> tuple[int, dict[str, dict[str, int]]]:
    """(input rows, {stage: {reason: rows}}) up to a stage: the rows each earlier stage dropped, then its checkpoint."""
    parts = pipeline.funnel_parts(output, stage)
    table = pa.concat_tables([storage.read_table(part, columns=[KEY, DROP_STAGE, DROP_REASON]) for part in parts])
    dropped = table.filter(pc.is_valid(table[DROP_REASON])).rename_columns([KEY, "stage", "reason"])
    return table.num_rows, drop_counts(dropped)


def print_stage_summary(output: str, stage: str) -> None:
    """The funnel up to a re-run stage, and the commands that bring the later stages up to date."""
    rows, counts = stage_funnel(output, stage)
    dropped = sum(sum(reasons.values()) for reasons in counts.values())
    print_funnel(f"{stage}: {rows} rows in, {rows - dropped} pass, {dropped} dropped", counts)
    later = STAGE_COMMANDS[STAGE_COMMANDS.index(stage) + 1:]
    steps = ", then ".join(f"`curate {name} {output}`" for name in later)
    results.print(f"shards, ledger and stats are now stale: run {steps} to write them")


@app.command(cls=Command)
@with_config_options
def run(inputs: Annotated[list[str], typer.Argument(help="Parquet files, globs, folders or fsspec URLs.")],
        output: OutputFolder, config: ConfigFile = None, options: Optional[dict] = None) -> None:  # noqa: UP045
    """Run every stage: ingest, prefilter, download, score, dedup, select, shard."""
    try:
        settings = load_config(config, options or {})
        bars, update = _progress()
        with bars:
            stats = pipeline.run_local(inputs, output, settings, update)
    except (ValueError, OSError) as error:  # OSError names its file
        _fail(error)
    print_summary(stats, output)


def _settings_of(output: str, config: Path | None, options: dict | None) -> Config:
    """The run's own settings, then the config file, then the options given on this command line."""
    from_file = load_config(config, {}).to_dict() if config is not None else {}
    given = {k: v for k, v in (options or {}).items() if v is not None}
    defaults = Config().to_dict()
    file_values = {k: v for k, v in from_file.items() if v != defaults[k]}
    return load_config(None, {**pipeline.load_run_config(output).to_dict(), **file_values, **given})


def _stage_command(stage: str) -> Callable[..., Any]:
    def command(output: OutputArgument,
                config: ConfigFile = None, options: Optional[dict] = None) -> None:  # noqa: UP045
        try:
            settings = _settings_of(output, config, options)
            stats = pipeline.rerun_stage(stage, output, settings)
        except (ValueError, OSError) as error:
            _fail(error)
        if stats is not None:
            print_summary(stats, output)
        else:
            print_stage_summary(output, stage)

    command.__name__ = stage
    command.__doc__ = f"Re-run the {stage} stage on an existing output folder (options override the run's)."
    return command


for _stage in STAGE_COMMANDS:
    app.command(name=_stage, cls=Command)(with_config_options(_stage_command(_stage)))


@app.command(cls=Command)
@with_config_options
def retry(output: OutputArgument,
          config: ConfigFile = None, options: Optional[dict] = None) -> None:  # noqa: UP045
    """Fetch again only the rows whose download failed transiently (timeout, connection, DNS, 429/5xx)."""
    try:
        settings = _settings_of(output, config, options)
        bars, update = _progress()
        with bars:
            stats = pipeline.retry_failed(output, settings, update)
    except (ValueError, OSError) as error:  # OSError names its file
        _fail(error)
    print_summary(stats, output)


@app.command(cls=Command)
def verify(output: OutputArgument) -> None:
    """Re-read every shard: sha256, sample counts, jpg/txt/json per sample; exit 1 on any mismatch."""
    from curate.wds.verify import verify as verify_output

    problems = verify_output(output)
    for problem in problems:
        results.print(f"[red]{problem}[/]", highlight=False)
    if problems:
        results.print(f"{output}: FAILED, {len(problems)} problem(s)", highlight=False)
        raise typer.Exit(1)
    results.print(f"{output}: OK, every shard matches index.json and samples.parquet", highlight=False)


@app.command(cls=Command)
def report(output: OutputArgument) -> None:
    """Rebuild OUT/report.html (funnel, distributions, image grids, shard plan) from a finished run."""
    from curate.report.build import build_report

    try:
        path = build_report(output)
    except ValueError as error:
        _fail(error)
    results.print(f"report: {path}")


@app.command(cls=Command)
def demo(output: Output = Path("demo-out"),
         rows: Annotated[int, typer.Option(help="Rows in the generated sample.")] = 400) -> None:
    """Build a LAION-schema sample, serve its images on 127.0.0.1 and run the pipeline on it."""
    from curate.tools.demo import run_demo

    bars, update = _progress()
    with bars:
        stats = run_demo(output, rows, update)
    print_summary(stats, output)
    results.print(f"verify with: curate verify {output}")


@app.command(name="score-embeddings", cls=Command)
def score_embeddings(
    embeddings: Annotated[Path, typer.Argument(help="CLIP ViT-L/14 image embeddings: .npy of rows x 768.")],
    metadata: Annotated[Optional[Path], typer.Argument(help="Parquet with the same rows in the same order.")] = None,  # noqa: UP045
    output: Annotated[Path, typer.Option("--output", "-o", help="Parquet file to write.")] = Path("scores.parquet"),
    aesthetic_weights: Annotated[Optional[str], typer.Option(help="Local file or URL of the head.")] = None,  # noqa: UP045
    aesthetic_head: Annotated[str, typer.Option(help="v2 (MLP) or v1 (linear).")] = "v2",
    model_cache: Annotated[str, typer.Option(help="Where official weights are downloaded.")] = "~/.cache/curate",
    safety_weights: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Local copy or URL of clip_autokeras_binary_nsfw.zip (the NSFW detector).")] = None,
) -> None:
    """Aesthetic scores and NSFW probabilities (punsafe) from precomputed CLIP embeddings (LAION's img_emb), before
    any image is downloaded."""
    from curate.tools.score_embeddings import score_embeddings as score

    try:
        rows = score(embeddings, output, metadata, aesthetic_weights, aesthetic_head, model_cache,
                     safety_weights=safety_weights)
    except ValueError as error:
        _fail(error)
    results.print(f"{rows} rows scored: {output}")


@app.command("dedup-embeddings", cls=Command)
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
    from curate.tools.dedup_embeddings import dedup_embeddings

    try:
        result = dedup_embeddings([str(path) for path in embeddings], str(output), threshold,
                                  str(metadata) if metadata else None, clusters, seed, workers)
    except ValueError as error:
        _fail(error)
    duplicates = result.num_rows - sum(result["keep"].to_pylist())
    results.print(f"{result.num_rows} embeddings, {duplicates} duplicates: {output}")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every step.")] = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


__all__ = ["app", "Config"]
