"""The package as installed, not the checkout: a built wheel carries its schemas; `import curate` changes nothing."""

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import curate

SOURCE = Path(curate.__file__).resolve().parent.parent
SCHEMA_FILES = sorted(p.name for p in (SOURCE / "curate" / "schemas").glob("*.json"))


def _run(code: str, cwd: Path, path: list[str]) -> str:
    """Run code in a fresh interpreter whose sys.path is `path` then site-packages, without .pth files (-S): the
    editable install's finder is never installed, so the checkout cannot be imported by accident."""
    prelude = f"import sys; sys.path[:] = {path!r} + sys.path + {site.getsitepackages()!r}\n"
    done = subprocess.run([sys.executable, "-I", "-S", "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_wheel_carries_and_loads_the_schemas(tmp_path: Path) -> None:
    # Build from a copy, so setuptools' build/ and egg-info never land in the shared checkout.
    tree = tmp_path / "tree"
    shutil.copytree(SOURCE / "curate", tree / "curate", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(SOURCE / name, tree / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheels), str(tree)], check=True, capture_output=True, timeout=120)
    (wheel,) = wheels.glob("curate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = sorted(Path(name).name for name in archive.namelist() if name.startswith("curate/schemas/"))
    assert SCHEMA_FILES and packed == SCHEMA_FILES

    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=120)
    out = _run("import json, curate.schema as s\n"
               "print(json.dumps([s.__file__, [f.name for f in s.table_schema('metadata')],"
               " s.json_schema('sample').get('type')]))", cwd=tmp_path, path=[str(target)])
    module_file, metadata_columns, sample_type = json.loads(out)
    assert Path(module_file).resolve().is_relative_to(target.resolve())
    assert metadata_columns[:2] == ["key", "row"]
    assert sample_type == "object"


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    code = """
import json, os, socket, sys, warnings
import numpy, pyarrow, PIL.Image  # their own import-time warning filters are theirs, not curate's
before = (dict(os.environ), PIL.Image.MAX_IMAGE_PIXELS, list(warnings.filters), socket.getdefaulttimeout(),
          socket.socket, socket.getaddrinfo)
import curate, curate.cli
after = (dict(os.environ), PIL.Image.MAX_IMAGE_PIXELS, list(warnings.filters), socket.getdefaulttimeout(),
         socket.socket, socket.getaddrinfo)
changed = [name for name, old, new in zip(["environ", "MAX_IMAGE_PIXELS", "warnings", "timeout", "socket",
                                           "getaddrinfo"], before, after) if old != new]
loaded = [name for name in ("img2dataset.resizer", "cv2", "torch") if name in sys.modules]
from curate.stages.download import DownloadOptions, resizer_for
resizer_for(DownloadOptions())
patched = sys.modules["img2dataset.resizer"].SuppressStdoutStderr.__name__
print(json.dumps([changed, loaded, os.environ.get("NO_ALBUMENTATIONS_UPDATE"), patched]))
"""
    changed, loaded, albumentations_flag, patched = json.loads(_run(code, cwd=tmp_path, path=[str(SOURCE)]))
    assert changed == []
    assert loaded == []
    # What the import no longer does, the download stage does when it starts.
    assert albumentations_flag == "1"
    assert patched == "nullcontext"
