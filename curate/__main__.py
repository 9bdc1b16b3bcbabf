"""`python -m curate …` is the `curate` command."""

from curate.cli import app

app(prog_name="curate")
