"""Real-browser test harness: JupyterLab and Voila in headless Chromium, driven by Playwright.

Follows /work/shared/e2e-recipe.md. One JupyterLab server and one browser are shared by the whole
test session; every test gets a fresh browser context through the ``lab`` fixture::

    def test_something(lab):                                # marked e2e automatically
        page = lab.open_notebook(NOTEBOOKS_DIR / "my.ipynb")  # waits for Lab and an idle kernel
        lab.run_all(page)                                     # runs every cell, fails on cell errors
        page.locator("button.tlw-step").click()               # find widgets by their add_class names
        assert lab.execute(page, "print(runner.global_step)").strip() == "1"  # read kernel state
        vpage = lab.voila(NOTEBOOKS_DIR / "my.ipynb")         # standalone Voila server
        lab.screenshot(page, "after-step")                    # artifacts/<test>-after-step.png
        lab.line_curves(page.locator(".tlw-loss"))            # bqplot lines: stroke, point count
        lab.heatmap_fills(page.locator(".tlw-heatmap"))       # GridHeatMap cell fills, row by row

``lab.write_notebook(name, [source, ...])`` builds a notebook from code strings. On failure the
fixture saves screenshots of every open page and the browser console under the artifacts folder
(server and Voila logs are there too).

Everything collected under ``tests/e2e`` gets the ``e2e`` marker. Without a Chromium executable
the tests are skipped locally and fail when the ``CI`` environment variable is set.
Environment overrides: ``TLW_CHROMIUM`` (browser path), ``TLW_E2E_ARTIFACTS`` (screenshot folder),
``TLW_E2E_HEADED=1`` (show the browser window, for debugging on a desktop).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
NOTEBOOKS_DIR = E2E_DIR / "notebooks"
ARTIFACTS_DIR = Path(os.environ.get("TLW_E2E_ARTIFACTS") or E2E_DIR / "artifacts")

DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # sessions run as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--mute-audio",
]
SERVER_START_TIMEOUT_S = 60.0
KERNEL_READY_TIMEOUT_S = 90.0
RUN_ALL_TIMEOUT_S = 180.0
VOILA_TIMEOUT_S = 90.0
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
#: Notebook 7 (the ``notebook`` package) adds ``/notebooks/<path>`` to the same server.
HAS_NOTEBOOK7 = importlib.util.find_spec("notebook") is not None

# Notebooks under tests/e2e/ are browser-test fixtures, not nbval tests.
collect_ignore_glob = ["notebooks/*", "artifacts/*"]


# --------------------------------------------------------------------------- environment


def in_ci() -> bool:
    """True when the CI environment variable is set (to anything but an explicit false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def chromium_path() -> str | None:
    """The Chromium executable to use, or None. ``TLW_CHROMIUM`` overrides (and disables fallbacks)."""
    override = os.environ.get("TLW_CHROMIUM")
    candidates = [override] if override else [DEFAULT_CHROMIUM, shutil.which("chromium")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_or_skip(reason: str) -> None:
    """Skip locally; in CI a missing prerequisite is a failure, never a skip."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: browser tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_process_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a process started with start_new_session=True, and its children."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _slug(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:limit] or "test"


def write_notebook(path: Path, cells: Sequence[str]) -> Path:
    """Write a notebook of code cells (sources as strings) with a python3 kernelspec."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: regenerating gives the same file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def _jupyter_env(base: Path) -> dict[str, str]:
    """Environment for server/kernel processes: isolated Jupyter dirs, the repo on PYTHONPATH."""
    env = dict(os.environ)
    for name in ("config", "data", "runtime", "ipython"):
        (base / name).mkdir(parents=True, exist_ok=True)
    env["JUPYTER_CONFIG_DIR"] = str(base / "config")
    env["JUPYTER_DATA_DIR"] = str(base / "data")
    env["JUPYTER_RUNTIME_DIR"] = str(base / "runtime")
    env["IPYTHONDIR"] = str(base / "ipython")
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # 2-core machines: keep kernels from oversubscribing
    return env


def _http(method: str, url: str, token: str | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """A small HTTP call; returns (status, parsed JSON or text). HTTP errors return their status."""
    request = urllib.request.Request(url, method=method, data=b"" if method != "GET" else None)
    if token:
        request.add_header("Authorization", f"token {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode("utf-8", errors="replace")
            status = response.status
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", errors="replace")
    try:
        return status, json.loads(body) if body else None
    except json.JSONDecodeError:
        return status, body


# --------------------------------------------------------------------------- JupyterLab server


class JupyterServer:
    """A JupyterLab server on 127.0.0.1 with isolated config/data/runtime dirs and a token."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.root_dir = self.base / "root"
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = ARTIFACTS_DIR / "jupyter-server.log"
        self.env = _jupyter_env(self.base)
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")  # one log per session
        self._write_user_settings()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_user_settings(self) -> None:
        settings = self.base / "user-settings"
        files = {
            # No "Jupyter news" toast over the lower right corner.
            "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
                "fetchNews": "false",
                "checkForUpdates": False,
            },
            # Render every cell, so widgets far down a notebook exist in the DOM and are clickable.
            "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        }
        for rel, content in files.items():
            path = settings / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content))
        (self.base / "workspaces").mkdir(exist_ok=True)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.allow_root=True",
            "--LabApp.expose_app_in_browser=True",
            f"--LabApp.user_settings_dir={self.base / 'user-settings'}",
            f"--LabApp.workspaces_dir={self.base / 'workspaces'}",
        ] + (
            # Notebook 7 exposes window.jupyterapp only when asked (its own flag), so that
            # ``Lab.execute`` reads kernel state there as in Lab.
            ["--JupyterNotebookApp.expose_app_in_browser=True"] if HAS_NOTEBOOK7 else []
        )

    def start(self, timeout: float = SERVER_START_TIMEOUT_S, attempts: int = 3) -> None:
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(attempts):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.command(),
                    cwd=self.root_dir,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last_error = f"server exited with {self.proc.returncode}"
                    break  # probably lost the port race: retry on another port
                try:
                    status, _ = _http("GET", f"{self.url}/api/status", self.token, timeout=2)
                    if status == 200:
                        return
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.1)
            else:
                last_error = f"no 200 from /api/status within {timeout:.0f} s"
                self.stop()
        raise RuntimeError(f"JupyterLab did not start: {last_error}\n{_log_tail(self.log_path)}")

    def api(self, method: str, path: str) -> tuple[int, Any]:
        return _http(method, f"{self.url}{path}", self.token)

    def shutdown_sessions(self) -> None:
        """Delete every session (and its kernel), so each test starts from a clean server."""
        with contextlib.suppress(OSError, urllib.error.URLError):
            status, sessions = self.api("GET", "/api/sessions")
            if status == 200 and isinstance(sessions, list):
                for session in sessions:
                    self.api("DELETE", f"/api/sessions/{session['id']}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.api("POST", "/api/shutdown")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        _kill_process_group(self.proc)  # also reaps kernels left in the group
        self.proc = None


# --------------------------------------------------------------------------- per-test helper

_JS_FIND_PANEL = """
window.__tlwFindPanel = (path) => {
  const app = window.jupyterapp;
  if (!app || !app.shell) return null;
  for (const w of app.shell.widgets('main')) {
    if (w.context && w.context.path === path && w.sessionContext && w.content) return w;
  }
  return null;
};
"""

_JS_KERNEL_READY = """
(path) => {
  const panel = window.__tlwFindPanel && window.__tlwFindPanel(path);
  if (!panel || !panel.context.isReady || !panel.sessionContext.isReady) return false;
  const session = panel.sessionContext.session;
  const kernel = session && session.kernel;
  return !!kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
}
"""

_JS_START_RUN_ALL = """
(path) => {
  const app = window.jupyterapp;
  const panel = window.__tlwFindPanel(path);
  if (!panel) throw new Error('notebook panel not found: ' + path);
  app.shell.activateById(panel.id);
  const state = {done: false, ok: null, error: null, replies: 0, byReplies: false};
  window.__tlwRunAll = state;
  // The command's promise has been seen never to settle with ten notebooks open in the workspace,
  // though every cell ran: also count the kernel's execute replies (one per code cell run).
  const cells = panel.content.model.cells;
  let codeCells = 0;
  for (let i = 0; i < cells.length; i++) if (cells.get(i).type === 'code') codeCells++;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  if (kernel && codeCells) {
    const onMessage = (_, args) => {
      if (args.direction !== 'recv' || args.msg.header.msg_type !== 'execute_reply') return;
      state.replies++;
      if (state.replies >= codeCells && !state.done) {
        state.byReplies = true;
        // Normally the command settles right after; only if it has not 20 s later is the run
        // taken as done (the widgets of the last outputs have rendered by then).
        setTimeout(() => { state.done = true; }, 20000);
      }
    };
    kernel.anyMessage.connect(onMessage);
  }
  app.commands.execute('notebook:run-all-cells').then(
    (ok) => { state.ok = ok; state.done = true; },
    (err) => { state.error = String(err); state.done = true; },
  );
}
"""

_JS_CELL_ERRORS = """
(path) => {
  const panel = window.__tlwFindPanel(path);
  const errors = [];
  const cells = panel.content.model.cells;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    for (let j = 0; j < cell.outputs.length; j++) {
      const out = cell.outputs.get(j).toJSON();
      if (out.output_type === 'error') errors.push(`cell ${i}: ${out.ename}: ${out.evalue}`);
    }
  }
  return errors;
}
"""


_JS_EXECUTE = """
async ([path, code, timeoutMs]) => {
  const panel = window.__tlwFindPanel(path);
  const kernel = panel.sessionContext.session.kernel;
  const future = kernel.requestExecute({code, silent: false, store_history: false});
  const result = {out: '', error: null};
  future.onIOPub = (msg) => {
    const type = msg.header.msg_type;
    if (type === 'stream') result.out += msg.content.text;
    else if (type === 'execute_result') result.out += msg.content.data['text/plain'] || '';
    else if (type === 'error') result.error = `${msg.content.ename}: ${msg.content.evalue}`;
  };
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`kernel did not answer within ${timeoutMs} ms`)), timeoutMs);
  });
  try { await Promise.race([future.done, timeout]); } finally { clearTimeout(timer); }
  return result;
}
"""


# Reading what bqplot drew. bqplot also draws background and clip-path rects in every figure, so
# "the figure has a rect" proves nothing: GridHeatMap draws one ``g.heatmaprow`` per row (in row
# order, whatever the scale's direction) holding one ``rect.heatmapcell`` per column, filled from
# the colour scale. A Lines mark draws each line as ``path.line`` inside a ``.curve`` group (the
# legend draws ``path.line`` too, outside any ``.curve``); its ``d`` attribute has one M or L
# command per finite point (d3 leaves NaN points out and starts a new M segment after them).
_JS_HEATMAP_FILLS = """
(root) => Array.from(root.querySelectorAll('g.heatmaprow')).map(
  (row) => Array.from(row.querySelectorAll('rect.heatmapcell')).map((cell) => getComputedStyle(cell).fill)
)
"""

_JS_LINE_CURVES = """
(root) => Array.from(root.querySelectorAll('.curve path.line')).map((path) => {
  const d = path.getAttribute('d') || '';
  return {
    stroke: getComputedStyle(path).stroke,
    points: (d.match(/[ML]/g) || []).length,
    segments: (d.match(/M/g) || []).length,
  };
})
"""

# The browser's own spelling of a CSS colour ("#d0d0d0" -> "rgb(208, 208, 208)"), to compare with
# computed fills and strokes.
_JS_CSS_COLOUR = """
(colour) => {
  const probe = document.createElement('div');
  probe.style.color = colour;
  document.body.appendChild(probe);
  const spelled = getComputedStyle(probe).color;
  probe.remove();
  return spelled;
}
"""


class Lab:
    """Per-test access to the shared JupyterLab server and browser (the ``lab`` fixture)."""

    def __init__(self, server: JupyterServer, browser: Any, request: pytest.FixtureRequest):
        self.server = server
        self.browser = browser
        self.test_name = _slug(request.node.name)
        self.workdir = server.root_dir / _slug(request.node.nodeid, 120)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.set_default_timeout(30_000)
        self.pages: list[Any] = []
        self.console: list[str] = []
        self._voila_procs: list[subprocess.Popen] = []
        self._paths: dict[int, str] = {}  # id(page) -> notebook path relative to the server root

    # -- pages ------------------------------------------------------------------------------

    def new_page(self) -> Any:
        page = self.context.new_page()
        label = f"page{len(self.pages)}"
        page.on("console", lambda msg: self.console.append(f"[{label} {msg.type}] {msg.text}"))
        page.on("pageerror", lambda err: self.console.append(f"[{label} pageerror] {err}"))
        self.pages.append(page)
        return page

    def add_notebook(self, source: Path, name: str | None = None, extra_files: Sequence[Path] = ()) -> str:
        """Copy a notebook (and ``extra_files`` it reads, side by side) into this test's folder on
        the server; return its server-relative path."""
        import nbformat

        for extra in extra_files:
            shutil.copy2(extra, self.workdir / Path(extra).name)
        source = Path(source)
        target = self.workdir / (name or source.name)
        nb = nbformat.read(str(source), as_version=4)
        nb.metadata.setdefault("kernelspec", dict(KERNELSPEC))  # no "Select Kernel" dialog
        nbformat.write(nb, str(target))
        return target.relative_to(self.server.root_dir).as_posix()

    def write_notebook(self, name: str, cells: Sequence[str]) -> Path:
        """Create a notebook from code-cell sources in this test's folder; returns its path."""
        return write_notebook(self.workdir / name, cells)

    def open_notebook(
        self,
        path: Path,
        *,
        name: str | None = None,
        extra_files: Sequence[Path] = (),
        timeout: float = KERNEL_READY_TIMEOUT_S,
    ) -> Any:
        """Copy ``path`` to the server, open it in JupyterLab and wait until its kernel is idle."""
        return self._open(path, "lab/tree", name, extra_files, timeout)

    def open_notebook7(
        self,
        path: Path,
        *,
        name: str | None = None,
        extra_files: Sequence[Path] = (),
        timeout: float = KERNEL_READY_TIMEOUT_S,
    ) -> Any:
        """Like ``open_notebook``, in Notebook 7 (``/notebooks/<path>``) instead of JupyterLab.

        Skips (fails in CI) when the ``notebook`` package is not installed. ``execute`` works on
        the page; drive the notebook itself through its menu, as a person does.
        """
        if not HAS_NOTEBOOK7:
            require_or_skip("Notebook 7 is not installed (pip install 'notebook>=7')")
        return self._open(path, "notebooks", name, extra_files, timeout)

    def _open(
        self, path: Path, route: str, name: str | None, extra_files: Sequence[Path], timeout: float
    ) -> Any:
        """Copy ``path`` to the server, open it at ``/<route>/<path>`` (JupyterLab's or Notebook 7's
        application, both exposed as ``window.jupyterapp``) and wait until its kernel is idle."""
        rel = self.add_notebook(path, name, extra_files)
        page = self.new_page()
        self._paths[id(page)] = rel
        url = f"{self.server.url}/{route}/{urllib.parse.quote(rel)}?token={self.server.token}"
        page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
        page.wait_for_function(
            "() => window.jupyterapp !== undefined && window.jupyterapp.shell !== undefined",
            timeout=timeout * 1000,
        )
        page.evaluate("async () => { await window.jupyterapp.restored; }")
        page.evaluate(_JS_FIND_PANEL)
        page.wait_for_function(_JS_KERNEL_READY, arg=rel, timeout=timeout * 1000, polling=100)
        return page

    def notebook_path(self, page: Any) -> str:
        return self._paths[id(page)]

    def run_all(self, page: Any, *, timeout: float = RUN_ALL_TIMEOUT_S, check: bool = True) -> list[str]:
        """Run every cell (``notebook:run-all-cells``) and wait for the run to finish.

        Returns the error outputs ("cell i: Name: value"); with ``check`` a cell error fails the test.
        After a failing cell, whether the later queued cells still run depends on timing (the
        kernel's stop_on_error abort), so do not rely on either.
        """
        rel = self.notebook_path(page)
        page.evaluate(_JS_START_RUN_ALL, rel)
        page.wait_for_function(
            "() => window.__tlwRunAll && window.__tlwRunAll.done", timeout=timeout * 1000, polling=100
        )
        state = page.evaluate("() => window.__tlwRunAll")
        errors = page.evaluate(_JS_CELL_ERRORS, rel)
        if state.get("error"):
            errors.append(f"run-all-cells command failed: {state['error']}")
        if check and errors:
            self.screenshot(page, "run-all-errors")
            pytest.fail("notebook cells failed:\n" + "\n".join(errors), pytrace=False)
        return errors

    def execute(self, page: Any, code: str, *, timeout: float = 60.0) -> str:
        """Run ``code`` in the notebook's kernel (not as a cell); return its stdout and repr output.

        A Python exception in ``code`` fails the test. Handy to read kernel state after clicks.
        """
        result = page.evaluate(_JS_EXECUTE, [self.notebook_path(page), code, int(timeout * 1000)])
        if result["error"]:
            pytest.fail(f"kernel code failed: {result['error']}\n{code}", pytrace=False)
        return result["out"]

    # -- Voila ------------------------------------------------------------------------------

    def voila(
        self,
        path: Path,
        *,
        standalone: bool = True,
        extra_files: Sequence[Path] = (),
        timeout: float = VOILA_TIMEOUT_S,
    ) -> Any:
        """Render a notebook with Voila and return the page (widgets appear as the kernel runs).

        ``standalone=True`` starts ``python -m voila NB`` on its own port (as a user would);
        ``False`` uses the Lab server's ``/voila/render/`` route (faster: no second server).
        """
        rel = self.add_notebook(path, extra_files=extra_files)
        page = self.new_page()
        if standalone:
            port, token = self._start_voila(self.server.root_dir / rel, timeout)
            url = f"http://127.0.0.1:{port}/?token={token}"
        else:
            url = f"{self.server.url}/voila/render/{urllib.parse.quote(rel)}?token={self.server.token}"
        page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
        return page

    def _start_voila(self, notebook: Path, timeout: float) -> tuple[int, str]:
        token = secrets.token_hex(16)
        log_path = ARTIFACTS_DIR / f"voila-{self.test_name}.log"
        log_path.write_bytes(b"")
        env = dict(self.server.env)
        last_error = ""
        for _ in range(3):
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "voila",
                str(notebook),
                "--no-browser",
                f"--port={port}",
                "--Voila.ip=127.0.0.1",
                f"--token={token}",
            ]
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    cmd,
                    cwd=notebook.parent,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._voila_procs.append(proc)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    last_error = f"voila exited with {proc.returncode}"
                    break
                try:
                    # Voila's /api/status answers 403 even with the token: any HTTP answer means up.
                    _http("GET", f"http://127.0.0.1:{port}/", timeout=2)
                    return port, token
                except (urllib.error.URLError, OSError):
                    time.sleep(0.1)
            else:
                last_error = f"no HTTP answer within {timeout:.0f} s"
                _kill_process_group(proc)
        raise RuntimeError(f"Voila did not start: {last_error}\n{_log_tail(log_path)}")

    # -- reading bqplot figures -------------------------------------------------------------

    def heatmap_fills(self, root: Any) -> list[list[str]]:
        """Computed fill of every GridHeatMap cell under ``root`` (a Locator), one list per row."""
        return root.evaluate(_JS_HEATMAP_FILLS)

    def line_curves(self, root: Any) -> list[dict[str, Any]]:
        """Every bqplot line under ``root`` (a Locator): ``{"stroke", "points", "segments"}``."""
        return root.evaluate(_JS_LINE_CURVES)

    def css_colour(self, page: Any, colour: str) -> str:
        """``colour`` as the browser writes computed colours, e.g. ``rgb(208, 208, 208)``."""
        return page.evaluate(_JS_CSS_COLOUR, colour)

    def expect_heatmap(
        self,
        root: Any,
        *,
        rows: int,
        columns: int,
        grey: str,
        grey_rows: Sequence[int] | None = (),
        grey_columns: Sequence[int] = (),
        timeout: float = 30.0,
    ) -> list[list[str]]:
        """Wait until the GridHeatMap under ``root`` shows ``rows`` x ``columns`` cells, filled
        ``grey`` exactly in ``grey_rows`` and ``grey_columns``, and in more than one colour
        elsewhere (a broken colour scale paints everything alike); fail with what it shows.

        ``grey_rows=None``: the caller does not know which rows are frozen; any row may be grey
        as a whole, but not every row (then grey would be all the heatmap shows).
        """
        want_grey = self.css_colour(root.page, grey)
        grey_columns = set(grey_columns)
        data_columns = columns - len(grey_columns)

        def problems(fills: list[list[str]]) -> list[str]:
            found = []
            if len(fills) != rows:
                found.append(f"{len(fills)} rows, expected {rows}")
            lengths = sorted({len(row) for row in fills})
            if lengths != [columns]:
                found.append(f"cells per row {lengths}, expected {columns}")
            if grey_rows is None:
                frozen = {r for r, row in enumerate(fills) if row and all(f == want_grey for f in row)}
                if data_columns and len(frozen) == len(fills):
                    found.append("every row is grey")
            else:
                frozen = set(grey_rows)
            wrong = [
                (r, c)
                for r, row in enumerate(fills)
                for c, fill in enumerate(row)
                if (fill == want_grey) != (r in frozen or c in grey_columns)
            ]
            if wrong:
                found.append(
                    f"{len(wrong)} cells grey where they should not be or not grey where they should, e.g. {wrong[:5]}"
                )
            coloured = {fill for row in fills for fill in row if fill != want_grey}
            if len(coloured) < 2 and (len(fills) - len(frozen)) * data_columns > 1:
                found.append(f"the data cells are all one colour: {coloured}")
            return found

        fills = self.poll(lambda: self.heatmap_fills(root), lambda f: not problems(f), timeout=timeout)
        found = problems(fills)
        assert not found, "heatmap: " + "; ".join(found)
        return fills

    def expect_line_points(self, root: Any, colour: str, points: int, *, timeout: float = 30.0) -> None:
        """Wait until the one bqplot line under ``root`` stroked ``colour`` holds ``points`` finite
        points in one unbroken segment; fail with what the lines hold otherwise."""
        stroke = self.css_colour(root.page, colour)

        def matching(curves: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [c for c in curves if c["stroke"] == stroke]

        def ok(curves: list[dict[str, Any]]) -> bool:
            found = matching(curves)
            return len(found) == 1 and found[0]["points"] == points and found[0]["segments"] == min(points, 1)

        curves = self.poll(lambda: self.line_curves(root), ok, timeout=timeout)
        assert ok(curves), f"expected one {colour} ({stroke}) line with {points} points; lines: {curves}"

    @staticmethod
    def poll(read: Any, done: Any, *, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Call ``read()`` until ``done(value)`` or ``timeout`` seconds; return the last value.

        For state the dashboard redraws on a throttle: the caller then asserts on the value, so
        a failure shows what the page held instead of a bare timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = read()
            if done(value) or time.monotonic() >= deadline:
                return value
            time.sleep(interval)

    # -- debugging --------------------------------------------------------------------------

    def artifact(self, name: str) -> Path:
        """A path under the (git-ignored) artifacts folder, for files a test wants to keep."""
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        return ARTIFACTS_DIR / name

    def screenshot(self, page: Any, name: str) -> Path:
        """Save a full-page PNG under the artifacts folder; returns its path."""
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS_DIR / f"{self.test_name}-{_slug(name)}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    def dump_artifacts(self, tag: str = "failure") -> None:
        """Screenshots of every open page plus the browser console, for a failed test."""
        for i, page in enumerate(self.pages):
            if not page.is_closed():
                with contextlib.suppress(Exception):
                    self.screenshot(page, f"{tag}-page{i}")
        with contextlib.suppress(OSError):
            ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS_DIR / f"{self.test_name}-{tag}-console.log").write_text("\n".join(self.console))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.context.close()
        for proc in self._voila_procs:
            _kill_process_group(proc)
        self.server.shutdown_sessions()


# --------------------------------------------------------------------------- fixtures and hooks

_REPORTS = pytest.StashKey[dict]()  # item -> {"setup"|"call"|"teardown": TestReport}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[Any]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    path = chromium_path()
    if path is None:
        wanted = os.environ.get("TLW_CHROMIUM") or DEFAULT_CHROMIUM
        require_or_skip(f"no Chromium executable at {wanted} (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="session")
def e2e_browser(chromium_executable: str) -> Iterator[Any]:
    """One headless Chromium (Debian's) for the whole session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_or_skip("the playwright package is not installed (pip install -e '.[test]')")
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(
            executable_path=chromium_executable,
            headless=os.environ.get("TLW_E2E_HEADED", "") in ("", "0"),
            args=CHROMIUM_ARGS,
            timeout=60_000,
        )
        yield browser
        browser.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="session")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """One JupyterLab server for the whole session (started on first use)."""
    base = Path(tempfile.mkdtemp(prefix="tlw-jupyter-", dir=tmp_path_factory.getbasetemp()))
    server = JupyterServer(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def lab(request: pytest.FixtureRequest, e2e_browser: Any, jupyter_server: JupyterServer) -> Iterator[Lab]:
    """Per-test helper: ``open_notebook``, ``run_all``, ``voila``, ``screenshot`` (see ``Lab``)."""
    helper = Lab(jupyter_server, e2e_browser, request)
    try:
        yield helper
    finally:
        reports = request.node.stash.get(_REPORTS, {})
        if any(r.failed for r in reports.values()):
            helper.dump_artifacts()
        helper.close()
