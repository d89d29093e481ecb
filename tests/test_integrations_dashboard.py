"""``tlw.Dashboard(cb)`` for a framework DebugCallback: built before the fit, attached when the fit
creates its watcher, live during the fit, kept after it; rebuilt for a later fit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import one_thread  # noqa: F401  (fixture)

pytest.importorskip("lightning")
pytest.importorskip("ipywidgets")

from test_integrations_lightning import fit, loaders, module_class, serious, trainer
from test_ui_dashboard import callback_errors  # noqa: F401  (fixture)

import tlwidgets as tlw
from tlwidgets.integrations.lightning import DebugCallback

pytestmark = [
    pytest.mark.usefixtures("one_thread", "callback_errors"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def html_text(widget) -> str:
    """All HTML values under ``widget`` (what the notebook shows as text)."""
    out = [getattr(widget, "value", "")] if hasattr(widget, "value") and isinstance(widget.value, str) else []
    for child in getattr(widget, "children", ()) or ():
        out.append(html_text(child))
    return " ".join(out)


def test_dashboard_before_fit_waits_then_shows_the_fit() -> None:
    cb = DebugCallback()
    d = tlw.Dashboard(cb, clock=lambda: 0.0)  # a frozen clock: no throttled redraw ever falls due
    try:
        assert d.session is None and d.panels == {} and d.source is cb
        assert "tlw-dashboard" in d._dom_classes
        assert "waiting for the fit" in html_text(d)
        d.refresh()  # nothing to draw yet, and no error
        live = []

        Base = module_class("lightning.pytorch")

        class Module(Base):
            def training_step(self, batch, batch_idx):
                if self.global_step == 5 and not live:  # during the fit: the panels exist and follow it
                    d.refresh()
                    live.append((d.session is cb.session, d.status.text, len(d.loss.raw.y)))
                return super().training_step(batch, batch_idx)

        torch.manual_seed(0)
        trainer("lightning.pytorch", cb, max_epochs=2).fit(Module(skip_head=True), *loaders())
        assert live == [(True, live[0][1], 5)] and live[0][1].startswith("step 5")
        # No refresh here: the end of the fit draws the final state (redraws during it are throttled).
        assert d.session is cb.session
        assert "waiting for the fit" not in html_text(d)
        assert set(d.panels) >= {"controls", "status", "heatmap", "loss", "freeze", "lr", "findings"}
        assert d.status.text.startswith(f"step {len(cb.history.loss)}")
        np.testing.assert_allclose(d.loss.raw.y, cb.history.loss)
        np.testing.assert_allclose(d.loss.val.y, cb.history.val_loss[:, 1])
        assert d.findings.count >= 1 and d.findings.finding(0).code == "param-not-in-optimizer"
        assert d.controls.step_button.layout.display == "none"  # the framework does the stepping
    finally:
        d.close()


def test_dashboard_follows_a_second_fit_and_accepts_a_fitted_callback() -> None:
    cb = DebugCallback()
    d = tlw.Dashboard(cb)
    try:
        fit(cb=cb, max_epochs=1, limit_train_batches=4)
        first_loss = d.loss
        fit(cb=cb, max_epochs=1, limit_train_batches=3)
        d.refresh()
        assert d.session is cb.watchers[-1] and d.loss is not first_loss
        assert len(d.loss.raw.y) == 3 and serious(cb) == []
        later = tlw.Dashboard(cb)  # after the fit: built at once, on the last fit's watcher
        try:
            later.refresh()
            assert later.session is cb.session and later.status.text.startswith("step 3")
        finally:
            later.close()
    finally:
        d.close()
    assert cb._listeners == []  # closing the dashboards unsubscribed them


def test_dashboard_of_the_hf_callback(tmp_path) -> None:
    pytest.importorskip("transformers")
    from test_integrations_transformers import DigitsMLP, digits, train

    from tlwidgets.integrations.transformers import DebugCallback as HFCallback

    cb = HFCallback()
    d = tlw.Dashboard(cb)
    try:
        assert d.session is None
        torch.manual_seed(0)
        train(DigitsMLP(), *digits(), tmp_path, cb=cb, num_train_epochs=1)
        d.refresh()
        assert d.session is cb.session
        np.testing.assert_allclose(d.loss.raw.y, cb.history.loss)
        assert d.status.text.startswith("step 45")
    finally:
        d.close()


def test_fit_in_background_lets_the_dashboard_act_during_the_fit() -> None:
    """A slider moved on the kernel's thread while the fit runs in the background is applied at
    the next batch boundary (queued by the callback), and recorded."""
    import threading

    from tlwidgets.integrations import fit_in_background

    reached, moved = threading.Event(), threading.Event()
    lrs = []

    class Module(module_class("lightning.pytorch")):
        def training_step(self, batch, batch_idx):
            lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            if self.global_step == 3:
                reached.set()
                assert moved.wait(30)
            return super().training_step(batch, batch_idx)

    cb = DebugCallback()
    d = tlw.Dashboard(cb)
    try:
        torch.manual_seed(0)
        t = trainer("lightning.pytorch", cb, max_epochs=1, limit_train_batches=6)
        job = fit_in_background(t.fit, Module(), *loaders())
        assert reached.wait(60) and not job.done
        d.lr.sliders[0].value = 0.01  # the kernel's thread, during the fit
        moved.set()
        job.result(timeout=60)
        assert lrs == [0.05] * 4 + [0.01] * 2
        assert [(c.kind, c.step) for c in cb.history.controls] == [("set_lr", 4)]
    finally:
        moved.set()
        d.close()
