"""What README.md and docs/ show is true: the site builds with `--strict`, every ```python block
runs, and every `bcjax` command shown in a ```bash block passes its parsers and either runs here
(or in the test named for it) or ends with a comment saying what it needs. Also: the layout names
paths that exist, README links to files that exist, the config tables list every field with its
default, and every `pip install ".[extra]"` names an extra pyproject.toml has.

The snippets and the commands run in one subprocess (5 fake CPU devices, `JAX_PLATFORMS=cpu`, a
fresh folder, a persistent compile cache shared by all of them): `python tests/test_docs.py
SPEC.json` is that subprocess. The blocks of one page run in order in one namespace; a page whose
blocks are the first blocks of another page (README's snippet is docs/python-api.md's first) is
covered by that page's run.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
import traceback
from pathlib import Path

from shared import xla_flags

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FAKE_DEVICES = "--xla_force_host_platform_device_count=5"
# the first line of a ```python block that cannot run here (e.g. it needs a checkpoint)
NOT_RUN = "# not run:"
# what a command shown but not run here must end with (a comment; ':' and more words may follow)
NEEDS = ("needs a checkpoint", "needs a GPU", "needs a TPU", "needs several hosts", "needs PyTorch",
         "needs upstream code", "long", "serves until stopped")
# commands shown in the docs that this test runs (cheap on a CPU), exactly as shown
RUN_HERE = (
    "bcjax info",
    f"XLA_FLAGS={FAKE_DEVICES} bcjax info",
    "bcjax generate --stagger P4 --blocks 4 --out latents.npy",
    f"XLA_FLAGS={FAKE_DEVICES} bcjax generate --stagger P4 --devices 5 --blocks 4 --out latents.npy",
    f"XLA_FLAGS={FAKE_DEVICES} bcjax generate --stagger P4 --devices 1 --model 2 --blocks 4 --out latents.npy",
    "bcjax bench comm",
    "bcjax bench comm --mask bidirectional",
    "bcjax bench comm --models 1 4 --preset wan2.1-14b",
    "bcjax bench cascade --skip-timing",
    "bcjax bench convert",
    'bcjax stream --prompts "red east fast@0;blue south slow@5" --blocks 12 --out stream.mp4',
    'bcjax stream --prompts "red east fast@0;red west fast@5" --interpolate 4 --out ramp.mp4',
)
# commands shown in the docs that another test runs: command -> (test file, the call it makes)
RUN_ELSEWHERE = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install . && bcjax demo": ("tests/test_demo.py",
                                                                                     'main(["demo"'),
    "bcjax demo": ("tests/test_demo.py", 'main(["demo"'),
    f"XLA_FLAGS={FAKE_DEVICES} bcjax tune --preset tiny --devices 2 --staggers sequential P4 --attention dense "
    "--ticks 2": ("tests/test_tune.py", 'main(["tune", "--preset", "tiny", "--devices", "2", "--staggers"'),
    f"XLA_FLAGS={FAKE_DEVICES} bcjax generate --preset tiny --stagger auto --attention auto --devices 2 --blocks 2": (
        "tests/test_tune.py", 'main(["generate", "--preset", "tiny", "--stagger", "auto", "--attention", "auto"'),
    "bcjax eval toyworld --num-prompts 2 --blocks 2 --staggers sequential,P4 --masks bidirectional "
    "--out eval-small": ("tests/test_toyworld_harness.py", 'main(["eval", "toyworld", "--checkpoint", ev.SHIPPED'),
}
# README's two commands, exactly (CI runs the second: .ci/run)
README_COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install . && bcjax demo",
    'python3 -m venv .venv && . .venv/bin/activate && pip install ".[test]" && python .ci/test || [ $? -eq 5 ]',
)


def _fenced(path: Path, lang: str) -> list[str]:
    """The ```lang blocks of a Markdown file, in order."""
    found, block, inside = [], [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not inside and stripped.startswith("```"):
            inside, keep, block = True, stripped[3:].strip().split(" ")[0] == lang, []
        elif inside and stripped == "```":
            inside = False
            if keep:
                found.append("\n".join(block) + "\n")
        elif inside:
            block.append(line)
    return found


def _split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of a shell line: the comment starts at a '#' outside quotes after a space."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1:].strip()
    return line.strip(), ""


def _commands(path: Path) -> list[tuple[str, str]]:
    """(command, comment) of every bcjax command line in the ```bash blocks (continuations joined)."""
    out = []
    for block in _fenced(path, "bash"):
        logical = re.sub(r"\\\n\s*", " ", block)
        for line in logical.splitlines():
            command, comment = _split_comment(line)
            if re.search(r"(^|[\s;&|'\"(])bcjax(\s|$)|python3? -m bcjax\.", command):
                out.append((command, comment))
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _pages_to_run() -> list[tuple[str, list[str]]]:
    """(page, its runnable ```python blocks) of every page not covered by another page's run."""
    pages = {_rel(p): [b for b in _fenced(p, "python") if not b.startswith(NOT_RUN)] for p in PAGES}
    pages = {k: v for k, v in pages.items() if v}
    covered = {k for k, v in pages.items() for k2, v2 in pages.items()
               if k != k2 and len(v) < len(v2) and v2[:len(v)] == v}
    return [(k, v) for k, v in pages.items() if k not in covered]


def _env(tmp: Path) -> dict:
    cache = str(tmp / "jax-cache")
    # the docs' fake devices, with the suite's compile flags (tests/shared.py)
    env = dict(os.environ, XLA_FLAGS=xla_flags(5), JAX_PLATFORMS="cpu", BCJAX_COMPILE_CACHE=cache,
               JAX_COMPILATION_CACHE_DIR=cache, XDG_CACHE_HOME=str(tmp / "xdg-cache"), NO_MKDOCS_2_WARNING="1",
               COLUMNS="100", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def test_readme_shows_the_two_commands_exactly_and_its_links_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in README_COMMANDS:
        assert command in text, f"README.md must show, exactly: {command}"
    assert len(text.splitlines()) <= 150, "README.md is over 150 lines: move the detail into docs/"
    missing = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"  # mkdocs checks docs/'s own


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    import ports

    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "usage: bcjax generate" in cli and "usage: bcjax bench comm" in cli  # rendered from the parsers
    table = (site / "reference" / "ports" / "index.html").read_text(encoding="utf-8")
    assert all(name in table for name in ports.NAMES)
    assert "make_runner" in (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")


def test_every_command_shown_runs_here_or_says_what_it_needs():
    shown = {}
    for page in PAGES:
        for command, comment in _commands(page):
            shown.setdefault(command, (_rel(page), comment))
    bad = [f"{page}: {command}" for command, (page, comment) in shown.items()
           if command not in RUN_HERE and command not in RUN_ELSEWHERE
           and not any(comment == need or comment.startswith(need + ":") for need in NEEDS)]
    assert not bad, ("commands shown that no test runs and that do not end with one of "
                     f"{[f'# {n}' for n in NEEDS]}:\n" + "\n".join(bad))
    stale = [c for c in (*RUN_HERE, *RUN_ELSEWHERE) if c not in shown]
    assert not stale, f"RUN_HERE / RUN_ELSEWHERE list commands no page shows any more: {stale}"
    for command, (test, call) in RUN_ELSEWHERE.items():
        assert call in (ROOT / test).read_text(encoding="utf-8"), f"{test} no longer runs {command!r} ({call})"


class _Parsed(BaseException):
    """Raised by the patched parse_args once a command's own parser accepted its arguments."""


def _invocations(command: str) -> list[list[str]]:
    """The bcjax / `python -m bcjax...` invocations in a shown command line (after `&&`, inside a
    gcloud `--command='...'`), each as argv without the environment assignments."""
    found, segment = [], []
    for word in [*shlex.split(command), "&&"]:
        if word.startswith("--command="):
            found += _invocations(word[len("--command="):])
        elif word in ("&&", "||", ";"):
            while segment and re.match(r"^[A-Z_]+=", segment[0]):
                segment.pop(0)
            module = len(segment) > 2 and segment[:2] == ["python", "-m"] and segment[2].startswith("bcjax.")
            if segment[:1] == ["bcjax"] or module:
                found.append(segment)
            segment = []
        else:
            segment.append(word)
    return found


def test_every_command_shown_parses(monkeypatch):
    """Every command shown, run or not, passes its parsers (a renamed flag shows up here): the
    command's own parser, and for `bcjax bench NAME ...` / `bcjax eval NAME ...` the target's; nothing
    after the parsing runs."""
    from bcjax.cli import main

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parsed = original(self, args, namespace)
        if self.prog == "bcjax" and getattr(parsed, "rest", None) is not None:
            return parsed  # a command that hands the rest to a target: parse that too
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setenv("BCJAX_COMPILE_CACHE", "off")
    bad, checked = [], 0
    for page in PAGES:
        for command, _ in _commands(page):
            for argv in _invocations(command):
                checked += 1
                try:
                    if argv[0] == "bcjax":
                        main(argv[1:])
                    else:
                        importlib.import_module(argv[2]).main(argv[3:])
                except _Parsed:
                    continue
                except SystemExit as e:
                    bad.append(f"{_rel(page)}: {command} (exit {e.code})")
                    continue
                bad.append(f"{_rel(page)}: {command} (its parser was never reached)")
    assert checked and not bad, "commands shown that their parsers refuse:\n" + "\n".join(bad)


def test_every_python_snippet_and_cheap_command_runs(tmp_path):
    pages = _pages_to_run()
    for page in PAGES:
        for block in _fenced(page, "python"):
            if block.startswith(NOT_RUN):
                assert block.splitlines()[0][len(NOT_RUN):].strip(), f"{_rel(page)}: '{NOT_RUN}' without a reason"
    assert pages, "no ```python block found"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"pages": pages, "commands": list(RUN_HERE)}))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, str(Path(__file__)), str(spec)], cwd=work, env=_env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    timeline = "\n".join(line for line in done.stdout.splitlines() if line.startswith("== "))
    assert done.returncode == 0, f"{done.stdout[-8000:]}\n\nwhat ran:\n{timeline}"


def _table(path: Path, section: str, header: str) -> dict[str, str]:
    """field -> default of the Markdown table under `## section` whose header row starts `header`."""
    text = path.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows, inside = {}, False
    for line in body.splitlines():
        if line.startswith(header):
            inside = True
        elif inside and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1].strip("`")
        elif inside and not line.startswith("|"):
            inside = False
    return rows


def test_the_layout_names_paths_that_exist():
    text = (ROOT / "docs" / "reference" / "layout.md").read_text(encoding="utf-8")
    paths = re.findall(r"^\| `([^`]+)` \|", text, re.M)
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert paths and not missing, f"docs/reference/layout.md names paths that do not exist: {missing}"


def test_the_config_tables_list_every_field_with_its_default():
    from bcjax.model.config import WanConfig
    from bcjax.schedule.config import PipelineConfig

    page = ROOT / "docs" / "reference" / "config.md"
    for cls in (WanConfig, PipelineConfig):
        rows = _table(page, cls.__name__, "| field | default |")
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert set(rows) == set(fields), (cls.__name__, sorted(set(rows) ^ set(fields)))
        for name, default in fields.items():
            assert ast.literal_eval(rows[name]) == default, (cls.__name__, name, rows[name], default)


def test_every_extra_installed_exists_and_the_cuda_plugin_is_the_one_named():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    text = "\n".join(p.read_text(encoding="utf-8") for p in [*PAGES, ROOT / "notebooks" / "README.md"])
    named = {e for group in re.findall(r"""pip install[^\n]*?["']\.\[([\w,-]+)\]""", text) for e in group.split(",")}
    assert named and named <= set(extras), f"extras shown that pyproject.toml lacks: {sorted(named - set(extras))}"
    plugin = set(re.findall(r"cuda(\d+)", " ".join(extras["cuda"])))
    shown = set(re.findall(r"CUDA (\d+)", text)) | set(re.findall(r"jax\[cuda(\d+)\]", text))
    assert shown == plugin, (f"the docs name CUDA {', '.join(sorted(shown))}; pyproject.toml's cuda extra installs "
                             f"jax[cuda{', '.join(sorted(plugin))}]")


# -- the subprocess: python tests/test_docs.py SPEC.json -------------------------------------------------------


def _run(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    failed, t0 = [], time.perf_counter()
    environ = dict(os.environ)  # what the commands run under; a snippet may change it for its own page
    for page, blocks in spec["pages"]:
        os.environ.clear()
        os.environ.update(environ)
        namespace = {"__name__": "__main__"}
        for i, code in enumerate(blocks):
            where = f"{page}, python block {i + 1}"
            print(f"== {time.perf_counter() - t0:6.1f} s: {where}", flush=True)
            try:
                exec(compile(code, where, "exec"), namespace)
            except BaseException:  # noqa: BLE001 - report every failing snippet, then fail
                failed.append(where)
                traceback.print_exc()
                break  # the page's later blocks build on this one
    os.environ.clear()
    os.environ.update(environ)
    from bcjax.cli import main

    for command in spec["commands"]:
        print(f"== {time.perf_counter() - t0:6.1f} s: {command}", flush=True)
        words = shlex.split(command)
        while "=" in words[0]:
            name, value = words.pop(0).split("=", 1)
            if not set(value.split()) <= set(os.environ.get(name, "").split()):  # XLA_FLAGS: the suite's added
                failed.append(f"{command}: runs with {name}={os.environ.get(name)!r}, not {value!r}")
        try:
            if words[0] == "bcjax":
                rc = main(words[1:])
            else:
                assert words[:2] == ["python", "-m"], words
                rc = importlib.import_module(words[2]).main(words[3:])
                rc = rc if isinstance(rc, int) else 0
        except BaseException:  # noqa: BLE001 - report every failing command, then fail
            traceback.print_exc()
            rc = 1
        if rc:
            failed.append(f"{command}: exit {rc}")
    print(f"== {time.perf_counter() - t0:6.1f} s: " + ("failed:\n" + "\n".join(failed) if failed else "all ran"),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1]))
