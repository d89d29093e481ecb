"""Binder: the environment built from ``binder/`` alone runs the tutorial.

repo2docker installs ``binder/requirements.txt`` with pip and then runs ``binder/postBuild`` from
the repository root. The slow test does the same in a fresh virtualenv (no system site-packages),
on a copy of the checkout's files (``git ls-files``: what a clone holds, plus files not yet
committed), then executes ``notebooks/GettingStarted.ipynb`` there with the environment's own
``jupyter nbconvert`` and kernel. It takes about two to three minutes, most of it pip unpacking torch;
``-m "not binder"`` leaves it out of a local run (CI runs everything).

Two deviations from repo2docker, both for this machine and CI rather than for Binder:

- ``PIP_CONSTRAINT=constraints.txt`` pins torch to the version CI installs, so pip takes the local
  CPU wheel (or the cached one) instead of fetching another build;
- ``PIP_RETRIES=1``: where download.pytorch.org (the CPU index in requirements.txt) cannot be
  reached, pip's default five retries with back-off cost about a minute over the ~100 packages;
  one immediate retry costs nothing and still covers a transient PyPI error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = Path("notebooks") / "GettingStarted.ipynb"
PROBE_TAG = "BINDER_PROBE "
PROBE_SOURCE = f"""\
import json, sys
import torch, tlwidgets
print({PROBE_TAG!r} + json.dumps({{
    "executable": sys.executable,
    "prefix": sys.prefix,
    "tlwidgets": tlwidgets.__file__,
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
}}))
"""

# Variables that would let the outer environment leak into the fresh one.
_DROP_ENV = {
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "VIRTUAL_ENV",
    "IPYTHONDIR",
    "PIP_USER",
    "PIP_TARGET",
    "PIP_PREFIX",
    "PIP_ROOT",
    "PIP_NO_DEPS",
    "PIP_REQUIRE_VIRTUALENV",
    "PIP_CONSTRAINT",
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _requirement_lines() -> list[str]:
    lines = (ROOT / "binder" / "requirements.txt").read_text().splitlines()
    return [line.split(" #")[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def test_binder_requirements_cover_the_package():
    """postBuild installs tlwidgets with --no-deps: requirements.txt must hold all its dependencies
    (and the notebook extra, which the tutorial needs), with the same version ranges."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["notebook"]
    lines = _requirement_lines()
    missing = [req for req in wanted if req not in lines]
    assert not missing, f"binder/requirements.txt lacks (verbatim) {missing}; it has {lines}"
    names = [_name(line) for line in lines if not line.startswith("-")]
    assert len(names) == len(set(names)), f"a package is listed twice: {names}"


def _copy_checkout(dest: Path) -> None:
    """The checkout's files, as a clone (plus not yet committed files) would hold them."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as exc:
        message = f"the Binder test copies the git checkout's files; git ls-files failed: {exc}"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    copied = 0
    for rel in filter(None, listing.split("\0")):
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)  # keeps postBuild's executable bit
        copied += 1
    assert (dest / "binder" / "postBuild").is_file() and copied > 10, f"copied only {copied} files"


def _env(repo: Path, venv: Path, home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _DROP_ENV and not key.startswith("JUPYTER")
    }
    env.update(
        # As on Binder: the environment's bin first, so postBuild's `python` and jupyter's
        # subcommands (jupyter-nbconvert) are the environment's.
        PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        PIP_CONSTRAINT=str(repo / "constraints.txt"),
        PIP_RETRIES="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        # No user-level Jupyter or IPython configuration, kernelspecs or startup files.
        JUPYTER_CONFIG_DIR=str(home / "jupyter-config"),
        JUPYTER_DATA_DIR=str(home / "jupyter-data"),
        JUPYTER_RUNTIME_DIR=str(home / "jupyter-runtime"),
        JUPYTER_PLATFORM_DIRS="1",
        IPYTHONDIR=str(home / "ipython"),
    )
    return env


def _run(what: str, cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float, log: Path) -> float:
    """Run ``cmd``; its output goes to ``log``. Returns the wall time; fails with the log's tail."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        log.write_bytes(exc.stdout or b"")
        pytest.fail(f"{what} took more than {timeout:.0f}s; output:\n{(exc.stdout or b'')[-4000:].decode()}")
    log.write_bytes(proc.stdout)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit status {proc.returncode}); output:\n{proc.stdout[-4000:].decode()}")
    return time.perf_counter() - start


def _output_kinds(cell: dict) -> set[str]:
    kinds = set()
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            if out["name"] == "stdout":
                kinds.add("stdout")
        elif out["output_type"] in ("execute_result", "display_data"):
            kinds.update(out.get("data", {}))
    return kinds


def _stdout(cell: dict) -> str:
    return "".join(
        "".join(out["text"])
        for out in cell.get("outputs", [])
        if out["output_type"] == "stream" and out["name"] == "stdout"
    )


@pytest.mark.binder
@pytest.mark.slow
def test_binder_environment_runs_getting_started(tmp_path: Path):
    repo, venv, home = tmp_path / "repo", tmp_path / "venv", tmp_path / "home"
    _copy_checkout(repo)
    home.mkdir()
    env = _env(repo, venv, home)
    python = venv / "bin" / "python"
    timings: dict[str, float] = {}
    try:
        timings["venv"] = _run(
            "python -m venv",
            [sys.executable, "-m", "venv", str(venv)],
            cwd=tmp_path,
            env=env,
            timeout=300,
            log=tmp_path / "venv.log",
        )
        # repo2docker: `pip install -r binder/requirements.txt` from the repository root ...
        timings["requirements"] = _run(
            "pip install -r binder/requirements.txt",
            [str(python), "-m", "pip", "install", "-r", "binder/requirements.txt"],
            cwd=repo,
            env=env,
            timeout=900,
            log=tmp_path / "requirements.log",
        )
        # ... then binder/postBuild, executed directly (its shebang and executable bit matter).
        timings["postBuild"] = _run(
            "binder/postBuild",
            [str(repo / "binder" / "postBuild")],
            cwd=repo,
            env=env,
            timeout=300,
            log=tmp_path / "postBuild.log",
        )
        _run(
            "pip check",
            [str(python), "-m", "pip", "check"],
            cwd=repo,
            env=env,
            timeout=120,
            log=tmp_path / "pip-check.log",
        )

        # The tutorial plus one probe cell that reports where the kernel's packages come from.
        original = json.loads((repo / NOTEBOOK).read_text())
        probed = json.loads((repo / NOTEBOOK).read_text())
        probed["cells"].append(
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "binder-probe",
                "metadata": {},
                "outputs": [],
                "source": PROBE_SOURCE.splitlines(keepends=True),
            }
        )
        run_path = repo / NOTEBOOK.with_name("GettingStarted.binder.ipynb")
        run_path.write_text(json.dumps(probed))
        timings["notebook"] = _run(
            "jupyter nbconvert --execute GettingStarted",
            [
                str(venv / "bin" / "jupyter"),
                "nbconvert",
                "--to",
                "notebook",
                "--execute",
                "--ExecutePreprocessor.kernel_name=python3",
                "--ExecutePreprocessor.timeout=600",
                "--output-dir",
                str(tmp_path),
                "--output",
                "executed.ipynb",
                str(run_path),
            ],
            cwd=repo,
            env=env,
            timeout=600,
            log=tmp_path / "nbconvert.log",
        )
    finally:
        if not _in_ci():
            # About 1.5 GB in some 20,000 files, and pytest keeps its last three temp dirs. Deleting
            # them takes half a minute or more; a CI machine is thrown away instead.
            start = time.perf_counter()
            shutil.rmtree(venv, ignore_errors=True)  # the logs and the executed notebook stay
            timings["cleanup"] = time.perf_counter() - start
        print(
            "\nBinder environment: "
            + ", ".join(f"{step} {seconds:.0f}s" for step, seconds in timings.items())
            + f" (logs in {tmp_path})"
        )

    executed = json.loads((tmp_path / "executed.ipynb").read_text())
    cells = [c for c in executed["cells"] if c["cell_type"] == "code"]
    *tutorial, probe = cells
    expected = [c for c in original["cells"] if c["cell_type"] == "code"]
    assert len(tutorial) == len(expected)

    errors = [
        f"{cell.get('id')}: {out.get('ename')}: {out.get('evalue')}"
        for cell in cells
        for out in cell["outputs"]
        if out["output_type"] == "error"
    ]
    assert not errors, f"the tutorial raised in the Binder environment: {errors}"
    for ran, want in zip(tutorial, expected):
        source = "".join(want["source"])
        assert ran["execution_count"] is not None, f"cell {want.get('id')} did not run"
        # Every kind of output the committed notebook shows (printed text, widgets) is produced.
        missing = _output_kinds(want) - _output_kinds(ran)
        assert not missing, f"cell {want.get('id')} produced no {sorted(missing)}:\n{source}"
        if "NBVAL_CHECK_OUTPUT" in source:
            assert _stdout(ran) == _stdout(want), f"cell {want.get('id')} printed something else:\n{source}"
    widgets = sum("application/vnd.jupyter.widget-view+json" in _output_kinds(c) for c in tutorial)
    assert widgets >= 1, "no cell displayed a widget"

    text = _stdout(probe)
    assert PROBE_TAG in text, f"the probe cell printed {text!r}"
    facts = json.loads(text.split(PROBE_TAG, 1)[1])
    # The kernel is the fresh environment's Python, not the one running pytest ...
    assert Path(facts["prefix"]).resolve() == venv.resolve(), facts
    assert Path(facts["executable"]).parent.resolve() == (venv / "bin").resolve(), facts
    # ... its tlwidgets is the copied checkout (installed editable by postBuild) ...
    assert Path(facts["tlwidgets"]).resolve() == (repo / "tlwidgets" / "__init__.py").resolve(), facts
    # ... and its torch is a CPU build.
    assert facts["cuda"] is None, f"Binder's torch must be a CPU build: {facts}"
