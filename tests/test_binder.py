"""Binder: the environment built from ``binder/`` alone runs the tutorial.

repo2docker installs ``binder/requirements.txt`` with pip and then runs ``binder/postBuild`` from
the repository root. The slow test does the same in a fresh virtualenv (no system site-packages),
on a copy of the checkout's files (``git ls-files``: what a clone holds, plus files not yet
committed), then executes ``notebooks/GettingStarted.ipynb`` there with the environment's own
``jupyter nbconvert`` and kernel. It takes three to eight minutes (the latter on a loaded two-core
machine), most of it pip fetching some 110 packages from PyPI and unpacking torch, and deleting the
virtualenv; ``-m "not binder"`` leaves it out of a local run (CI runs everything).

pip is isolated from the host, so the test proves what ``binder/requirements.txt`` installs on its
own: ``PIP_CONFIG_FILE=os.devnull`` makes pip read no configuration file at all (no ``/etc/pip.conf``,
``/etc/xdg/pip/pip.conf``, ``~/.config/pip/pip.conf`` or the virtualenv's own), and every ``PIP_*``
variable of the host is dropped (``PIP_FIND_LINKS``, ``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``,
``PIP_CONSTRAINT``, ``PIP_CERT``, ...). On this project's machines those are exactly what would leak:
a find-links folder holding the CPU torch wheel, local package indexes and a constraints file. The only
``PIP_*`` variables set are the two in ``PIP_DELIBERATE``: the config-file one above and
``PIP_DISABLE_PIP_VERSION_CHECK`` (it only silences pip's "new release" notice).

One deviation from repo2docker remains, and only where it must: the CPU index line
``--extra-index-url https://download.pytorch.org/whl/cpu``. Where that index answers, requirements.txt
is used verbatim. Where it does not (this project's machines and CI reach PyPI and nothing else), pip
would fall back to PyPI's torch, a CUDA build of several GB, so the test installs from a copy of
requirements.txt in which that one line is replaced by a direct reference to a local CPU torch wheel
(``torch @ file:///...+cpu...whl``), named explicitly: the file ``TLW_BINDER_TORCH_WHEEL`` gives, or
the newest compatible ``torch-*+cpu-*.whl`` in a find-links folder of the host's pip configuration.
Every other line still comes from requirements.txt and every other package from PyPI. torch's
version is then the local wheel's rather than the newest ``+cpu`` release Binder would pick; that it
is a CPU build is still checked. Smaller differences, none of which changes what is installed: the
virtualenv uses the Python running the tests (repo2docker uses its own), and pip's download cache
(``~/.cache/pip``, which only stores what the named sources served) is kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.tags import sys_tags
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

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

# Variables that would let the outer Python or Jupyter leak into the fresh environment. Every PIP_*
# variable goes too (see _binder_env), and JUPYTER_* ones.
_DROP_ENV = {
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "VIRTUAL_ENV",
    "IPYTHONDIR",
}

# The only pip settings the test makes, all of them here (see the module docstring).
PIP_DELIBERATE = {
    # pip reads no configuration file: no global, user, site or virtualenv pip.conf.
    "PIP_CONFIG_FILE": os.devnull,
    # Only silences the "new pip release" notice (and its request to PyPI).
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}

# binder/requirements.txt's CPU index, the one line that may be replaced (see the module docstring).
CPU_INDEX_LINE = "--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_WHEEL_ENV = "TLW_BINDER_TORCH_WHEEL"


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


# Host pip settings of the kinds this project's machines have (and worse), for the fast tests below.
_HOST_PIP = {
    "PIP_FIND_LINKS": "/opt/wheels",
    "PIP_INDEX_URL": "https://mirror.invalid/simple",
    "PIP_EXTRA_INDEX_URL": "file:///opt/pypi/simple",
    "PIP_CONSTRAINT": "/etc/xdg/pip/constraints.txt",
    "PIP_NO_INDEX": "1",
    "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
    "PIP_CONFIG_FILE": "/etc/pip.conf",
}


def test_binder_env_leaves_no_host_pip_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the deliberate PIP_* variables reach the build's pip, and it reads no config file."""
    for key, value in _HOST_PIP.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    env = _binder_env(dict(os.environ), tmp_path / "venv", tmp_path / "home")
    pip_keys = {key for key in env if key.upper().startswith("PIP_")}
    assert pip_keys == {"PIP_CONFIG_FILE", "PIP_DISABLE_PIP_VERSION_CHECK"}, pip_keys
    assert env["PIP_CONFIG_FILE"] == os.devnull
    assert "PYTHONPATH" not in env
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "venv" / "bin")


def test_pip_reads_no_host_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip itself, run in that environment, reports no setting but the deliberate ones: none of the
    host's configuration files (this machine has /etc/pip.conf and a user pip.conf) is read."""
    monkeypatch.setenv("PIP_FIND_LINKS", _HOST_PIP["PIP_FIND_LINKS"])
    env = _binder_env(dict(os.environ), tmp_path / "venv", tmp_path / "home")
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    expected = {f":env:.{key[len('PIP_') :].lower().replace('_', '-')}" for key in PIP_DELIBERATE}
    seen = {line.split("=", 1)[0] for line in listing}
    assert seen == expected, listing


def test_swap_cpu_index_replaces_that_line_only() -> None:
    """The copy of requirements.txt the slow test may install differs in the CPU index line alone."""
    text = (ROOT / "binder" / "requirements.txt").read_text()
    wheel = Path("/somewhere/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    swapped = _swap_cpu_index(text, wheel).splitlines()
    original = text.splitlines()
    assert [line for line in original if line != CPU_INDEX_LINE] == [
        line for line in swapped if not line.startswith(("# Replaced by", "torch @ "))
    ]
    assert f"torch @ {wheel.as_uri()}" in swapped
    assert CPU_INDEX_LINE not in swapped
    with pytest.raises(ValueError, match=r"update tests/test_binder\.py"):
        _swap_cpu_index(text.replace(CPU_INDEX_LINE, "--extra-index-url https://elsewhere"), wheel)


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


def _binder_env(environ: Mapping[str, str], venv: Path, home: Path) -> dict[str, str]:
    """The environment for every command of the build: ``environ`` (the host's) with no ``PIP_*``,
    ``JUPYTER_*`` or Python-path variable left, plus :data:`PIP_DELIBERATE` and private Jupyter dirs.

    A separate function so that a fast test can check it without building anything.
    """
    env = {
        key: value
        for key, value in environ.items()
        if key not in _DROP_ENV and not key.upper().startswith(("PIP_", "JUPYTER"))
    }
    env.update(PIP_DELIBERATE)
    env.update(
        # As on Binder: the environment's bin first, so postBuild's `python` and jupyter's
        # subcommands (jupyter-nbconvert) are the environment's.
        PATH=f"{venv / 'bin'}{os.pathsep}{environ.get('PATH', '')}",
        # No user-level Jupyter or IPython configuration, kernelspecs or startup files.
        JUPYTER_CONFIG_DIR=str(home / "jupyter-config"),
        JUPYTER_DATA_DIR=str(home / "jupyter-data"),
        JUPYTER_RUNTIME_DIR=str(home / "jupyter-runtime"),
        JUPYTER_PLATFORM_DIRS="1",
        IPYTHONDIR=str(home / "ipython"),
    )
    return env


def _reachable(index_url: str, timeout: float = 10.0) -> bool:
    """Whether the package index at ``index_url`` answers (any HTTP status counts as an answer)."""
    request = urllib.request.Request(index_url.rstrip("/") + "/torch/", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _host_find_links() -> list[Path]:
    """The local folders the host's pip takes wheels from (``find-links``, from its configuration
    files and ``PIP_FIND_LINKS``), as ``pip config list`` reports them."""
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    folders = []
    for match in re.finditer(r"^\S*\.find-links='(.*)'$", listing, flags=re.MULTILINE):
        for entry in match.group(1).split():
            path = Path(entry[len("file://") :] if entry.startswith("file://") else entry)
            if path.is_dir() and path not in folders:
                folders.append(path)
    return folders


def _local_torch_wheel(specifier: str) -> Path | None:
    """A CPU torch wheel on this machine that this Python can install and ``specifier`` allows: the
    file ``$TLW_BINDER_TORCH_WHEEL`` names, else the newest ``torch-*+cpu-*.whl`` in the host's
    find-links folders. None when there is none."""
    if os.environ.get(TORCH_WHEEL_ENV):
        wheel = Path(os.environ[TORCH_WHEEL_ENV]).resolve()
        return wheel if wheel.is_file() else None
    supported = set(sys_tags())
    allowed = SpecifierSet(specifier)
    found = []
    for folder in _host_find_links():
        for wheel in folder.glob("torch-*+cpu*.whl"):
            try:
                name, version, _, tags = parse_wheel_filename(wheel.name)
            except InvalidWheelFilename:
                continue
            if name == "torch" and tags & supported and allowed.contains(version, prereleases=False):
                found.append((version, wheel.resolve()))
    return max(found)[1] if found else None


def _swap_cpu_index(requirements: str, torch_wheel: Path) -> str:
    """``requirements`` with :data:`CPU_INDEX_LINE` replaced by a direct reference to ``torch_wheel``;
    every other line is kept as it is. pip then takes torch from that file only (a direct reference
    excludes every other candidate; the ``torch>=...`` line still has to accept its version)."""
    lines = requirements.splitlines()
    if CPU_INDEX_LINE not in lines:
        raise ValueError(
            f"binder/requirements.txt has no line {CPU_INDEX_LINE!r}: update tests/test_binder.py"
        )
    swapped = [
        (
            "# Replaced by tests/test_binder.py (that index cannot be reached here): "
            f"{CPU_INDEX_LINE}\ntorch @ {torch_wheel.as_uri()}"
        )
        if line == CPU_INDEX_LINE
        else line
        for line in lines
    ]
    return "\n".join(swapped) + "\n"


def _requirements_file(repo: Path, scratch: Path) -> tuple[Path, str]:
    """The requirements file to install (and a note on where torch comes from): the copied
    ``binder/requirements.txt`` itself where its CPU index answers, else a copy in ``scratch`` with
    that one line swapped for a local CPU torch wheel (see the module docstring)."""
    original = repo / "binder" / "requirements.txt"
    if _reachable(CPU_INDEX_LINE.split()[1]):
        return original, "torch from the CPU index"
    text = original.read_text()
    torch_lines = [line for line in _requirement_lines() if _name(line) == "torch"]
    assert len(torch_lines) == 1, torch_lines
    wheel = _local_torch_wheel(torch_lines[0][len("torch") :])
    if wheel is None:
        message = (
            f"{CPU_INDEX_LINE.split()[1]} cannot be reached and there is no local CPU torch wheel "
            f"(set {TORCH_WHEEL_ENV} or a pip find-links folder holding torch-*+cpu-*.whl)"
        )
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    swapped = scratch / "requirements.binder.txt"
    swapped.write_text(_swap_cpu_index(text, wheel))
    return swapped, f"CPU index unreachable: torch from {wheel}"


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
    env = _binder_env(os.environ, venv, home)
    requirements, torch_source = _requirements_file(repo, tmp_path)
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
            f"pip install -r binder/requirements.txt ({torch_source})",
            [str(python), "-m", "pip", "install", "-r", str(requirements)],
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
            + f" ({torch_source}; logs in {tmp_path})"
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
