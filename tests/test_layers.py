"""The package's shape: one top-level package, layers that only import downwards, a public handler API."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import sentpipe

PKG = Path(sentpipe.__file__).resolve().parent
REPO = PKG.parent

# Lower number = lower layer. A module may import its own layer's siblings (within its part) and anything
# below; the three middle parts never import each other.
LAYERS: dict[str, int] = {
    "schemas": 0,
    "loop_metrics": 0,  # imports nothing of sentpipe; sentpipe.metrics declares its collectors
    "settings": 1,
    "logs": 1,
    "metrics": 1,
    "broker": 1,
    "kafka": 1,
    "guarded_http": 1,
    "parent_death": 1,
    "open_files": 1,
    "ingress": 2,
    "processors": 2,
    "sender": 2,
    "cli": 3,
    "cli_base": 3,
    "cli_send": 3,
    "launch": 3,
    "devstack": 3,
    "console": 3,
    "__main__": 4,
}


def part_of(module: str) -> str:
    """sentpipe.processors.worker -> processors; sentpipe.kafka -> kafka."""
    return module.split(".")[1]


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(["sentpipe", *parts])] = path
    return out


def sentpipe_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sentpipe.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sentpipe."):
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "sentpipe":
            found |= {f"sentpipe.{a.name}" for a in node.names}
    return found


def test_every_module_belongs_to_a_known_layer() -> None:
    unknown = {m for m in modules() if m != "sentpipe" and part_of(m) not in LAYERS}
    assert not unknown, f"add these to LAYERS: {sorted(unknown)}"


def test_imports_only_go_down_and_the_middle_parts_never_import_each_other() -> None:
    wrong = []
    for module, path in modules().items():
        if module == "sentpipe":
            continue  # the public API re-exports lazily (PEP 562), it imports nothing at import time
        mine = part_of(module)
        for imported in sentpipe_imports(path):
            theirs = part_of(imported)
            if theirs == mine:
                continue
            if LAYERS[theirs] > LAYERS[mine] or (LAYERS[theirs] == LAYERS[mine] == 2):
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_contract_layer_imports_nothing_else_of_sentpipe() -> None:
    for module, path in modules().items():
        if module.startswith("sentpipe.schemas"):
            assert all(i.startswith("sentpipe.schemas") for i in sentpipe_imports(path)), module


def test_no_module_imports_the_old_top_level_names() -> None:
    old = re.compile(r"^\s*(from|import) (schemas|ingress|processors|sender)\b", re.M)
    offenders = [str(p) for p in modules().values() if old.search(p.read_text())]
    for folder in ("tests", "bench"):
        offenders += [str(p) for p in (REPO / folder).rglob("*.py") if old.search(p.read_text())]
    assert not offenders


def test_the_public_handler_api_is_one_import() -> None:
    code = (
        "import sys\n"
        "from sentpipe import CanonicalEvent, HandlerContext, PermanentError, RetryableError, handler\n"
        "assert 'faust' not in sys.modules\n"
        "from sentpipe.processors.handlers import registry\n"
        "@handler('message.status.updated')\n"
        "async def on_status(event: CanonicalEvent, ctx: HandlerContext) -> None:\n"
        "    raise RetryableError('x') if event.status == 'queued' else PermanentError('y')\n"
        "assert registry.for_type('message.status.updated')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_the_readme_handler_example_runs_as_written() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("### Your handlers", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = block + (
        "\nfrom sentpipe.processors.handlers import registry\n"
        "assert [n for n, _ in registry.for_type('message.status.updated')]\n"
        "assert [n for n, _ in registry.for_type('message.inbound.received')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_the_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    """Built as a user gets it: only `sentpipe` at the top, data files inside, no stray `schemas`."""
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("sentpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"sentpipe", wheel.name.split("-py3")[0] + ".dist-info"}
    for needed in (
        "sentpipe/processors/migrations/0001_projections.sql",
        "sentpipe/schemas/ingress.openapi.json",
        "sentpipe/schemas/json/message.status.updated.schema.json",
        "sentpipe/ingress/app.py",
        "sentpipe/sender/delivery.py",
        "sentpipe/console/static/app.js",
        "sentpipe/console/static/index.html",
        "sentpipe/console/static/app.css",
    ):
        assert needed in names, needed
    # Only the wheel on the path (no site-packages, no working directory): the old names are gone.
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(wheel)!r})\n"
        "import sentpipe, sentpipe.schemas.topics\n"
        "for old in ('schemas', 'ingress', 'processors', 'sender'):\n"
        "    try:\n"
        "        __import__(old)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'{old} is importable')\n"
    )
    subprocess.run([sys.executable, "-I", "-S", "-c", probe], check=True, cwd="/")
