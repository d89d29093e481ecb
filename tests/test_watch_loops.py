"""watch() reads loops by the autograd graph, not by call counts.

Ordinary loops that are not the plain ``zero_grad / loss / backward / step``:
a linear probe trained with the same criterion on detached features, a GAN
(two watchers, the generator step backpropagating through the discriminator),
an auxiliary loss from a second criterion call, an exception that ends the
block, LBFGS (``optimizer.step(closure)``). None of them is a loop bug; the
real bugs (no ``step()``, no ``zero_grad()``) are still found (see also
``test_rules_loop.py`` and ``test_core_watch.py``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from helpers import one_thread  # noqa: F401  (fixture)
from test_rules_support import classification, find, loader, problems
from torch import nn

import tlwidgets as tlw
from tlwidgets import Stage

pytestmark = pytest.mark.usefixtures("one_thread")

LOOP_ERRORS = ("optimizer-not-stepping", "grads-not-zeroed")


def loop_errors(w: tlw.Watcher) -> list[str]:
    return [f.code for f in w.findings if f.code in LOOP_ERRORS]


# ------------------------------------------------------------------ (a) a probe with the same criterion
class Encoder(nn.Module):
    """A classifier that also returns its features (for a probe)."""

    def __init__(self, features: int = 20, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), h


@pytest.mark.parametrize("order", ["sequential", "interleaved"])
def test_probe_on_detached_features_with_the_same_criterion_is_not_a_loop_bug(order: str) -> None:
    torch.manual_seed(0)
    model, probe = Encoder(), nn.Linear(32, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_probe = torch.optim.SGD(probe.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=256)
    losses, probe_losses = [], []
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for _ in range(2):
            for xb, yb in loader(x, y):
                opt.zero_grad()
                logits, feats = model(xb)
                loss = crit(logits, yb)
                if order == "sequential":
                    loss.backward()
                    opt.step()
                    opt_probe.zero_grad()
                    probe_loss = crit(probe(feats.detach()), yb)
                    probe_loss.backward()
                    opt_probe.step()
                else:  # both losses first, then both backward passes and both steps
                    opt_probe.zero_grad()
                    probe_loss = crit(probe(feats.detach()), yb)
                    loss.backward()
                    probe_loss.backward()
                    opt.step()
                    opt_probe.step()
                losses.append(loss.item())
                probe_losses.append(probe_loss.item())
    assert loop_errors(w) == [] and problems(w) == []
    assert w.loop.backwards == w.loop.steps == len(losses)
    # The watched model's loss, not the probe's.
    np.testing.assert_allclose(w.history.loss, losses, rtol=1e-6)
    assert w.diagnostic_errors == []


# ------------------------------------------------------------------ (b) a GAN, both networks watched
def _gan(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    d = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    return g, d


def _real(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=gen) * 0.5 + torch.tensor([2.0, -1.0])


@pytest.mark.parametrize("style", ["dcgan", "combined"])
def test_gan_loop_is_not_a_loop_bug_for_either_network(style: str) -> None:
    """The DCGAN example's loop (``netD.zero_grad()``, two backward calls, the generator step
    backpropagating through D while optD does not step) and the combined-loss variant."""
    G, D = _gan()
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    d_losses, g_losses = [], []
    iters = 30
    with tlw.watch(D, opt_d, loss_fn=bce) as wd, tlw.watch(G, opt_g, loss_fn=bce) as wg:
        for i in range(iters):
            real = _real(16, i)
            ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
            noise = torch.randn(16, 8)
            if style == "dcgan":
                D.zero_grad()
                err_real = bce(D(real), ones)
                err_real.backward()
                fake = G(noise)
                err_fake = bce(D(fake.detach()), zeros)
                err_fake.backward()
                opt_d.step()
                G.zero_grad()
                err_g = bce(D(fake), ones)  # through D: D's grads fill, then D.zero_grad() resets them
                err_g.backward()
                opt_g.step()
                d_losses.append((err_real.item() + err_fake.item()) / 2)  # two passes: their mean
            else:
                opt_d.zero_grad()
                fake = G(noise)
                loss_d = bce(D(real), ones) + bce(D(fake.detach()), zeros)
                loss_d.backward()
                opt_d.step()
                opt_g.zero_grad()
                err_g = bce(D(fake), ones)
                err_g.backward()
                opt_g.step()
                d_losses.append(loss_d.item())  # one pass, two terms: their sum
            g_losses.append(err_g.item())
    for w in (wd, wg):
        assert loop_errors(w) == [], w.findings
        assert w.loop.steps == iters and w.global_step == iters
        assert w.diagnostic_errors == []
    assert wg.loop.backwards == iters  # D's passes on fake.detach() never reach G
    np.testing.assert_allclose(wg.history.loss, g_losses, rtol=1e-5)
    np.testing.assert_allclose(wd.history.loss, d_losses, rtol=1e-5)


def test_gan_that_forgets_to_reset_the_discriminator_grads_is_found() -> None:
    """Without D.zero_grad(), D's step applies the generator step's gradients on top of its own."""
    G, D = _gan()
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4)
    bce = nn.BCEWithLogitsLoss()
    with tlw.watch(D, opt_d, loss_fn=bce) as wd:
        for i in range(6):
            real, noise = _real(16, i), torch.randn(16, 8)
            fake = G(noise)
            (bce(D(real), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))).backward()
            opt_d.step()
            opt_g.zero_grad()
            bce(D(fake), torch.ones(16, 1)).backward()
            opt_g.step()
    assert "grads-not-zeroed" in loop_errors(wd)


# ------------------------------------------------------------------ (c) several criterion calls, one loss
class TwoHeads(nn.Module):
    def __init__(self, features: int = 20, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        self.aux = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.head(h), self.aux(h)


@pytest.mark.parametrize("weight", [0.3, -0.3])
def test_auxiliary_loss_terms_combine_into_the_steps_loss(weight: float) -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=256)
    losses = []
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for _ in range(3):
            for xb, yb in loader(x, y):
                opt.zero_grad()
                o1, o2 = model(xb)
                loss = crit(o1, yb) + weight * crit(o2, yb)
                loss.backward()
                opt.step()
                losses.append(loss.item())
    assert find(w, "disconnected-param") == []
    assert w.loop.backwards == w.loop.steps == len(losses)
    # The objective that was backpropagated: the terms with their weights.
    np.testing.assert_allclose(w.history.loss, losses, rtol=1e-5)
    rec = w.records[Stage.LOSS]
    assert rec.data["terms"] == 2
    assert w.diagnostic_errors == []
    if weight > 0:
        assert problems(w) == []


def test_the_steps_loss_leaves_out_a_common_factor_of_the_terms() -> None:
    """Gradient accumulation divides the loss by the micro-batch count, a loss scaler multiplies
    it: the history keeps the criterion's own scale (the mean over the step's micro-batches)."""
    torch.manual_seed(0)
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=128)
    batches = list(loader(x, y, batch_size=16))
    expected = []
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for k in range(0, len(batches), 4):
            opt.zero_grad()
            micro = []
            for xb, yb in batches[k : k + 4]:
                o1, o2 = model(xb)
                loss = crit(o1, yb) + 0.5 * crit(o2, yb)
                (loss * 1024.0 / 4).backward()  # scaled, and divided over 4 micro-batches
                micro.append(loss.item())
            for p in model.parameters():
                p.grad /= 1024.0
            opt.step()
            expected.append(np.mean(micro))
    assert w.loop.steps == 2 and w.loop.backwards == 8 and w.loop.accumulating
    np.testing.assert_allclose(w.history.loss, expected, rtol=1e-5)
    assert loop_errors(w) == []


def test_one_loss_backpropagated_twice_is_two_passes() -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=64)
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for xb, yb in loader(x, y, batch_size=16):
            opt.zero_grad()
            o1, _ = model(xb)
            loss = crit(o1, yb)
            loss.backward(retain_graph=True)
            loss.backward()
            opt.step()
    assert w.loop.backwards == 2 * w.loop.steps and loop_errors(w) == []
    np.testing.assert_allclose(w.history.loss[-1], loss.item(), rtol=1e-6)


@pytest.mark.parametrize("when", ["before backward", "after backward"])
def test_record_loss_names_the_loss_of_its_pass(when: str) -> None:
    """An explicit loss (before or right after backward) replaces the criterion terms of its pass."""
    torch.manual_seed(0)
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=128)
    losses = []
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for xb, yb in loader(x, y):
            opt.zero_grad()
            o1, o2 = model(xb)
            loss = (crit(o1, yb) + crit(o2, yb)) / 2 + 0.01 * sum(p.pow(2).sum() for p in model.parameters())
            if when == "before backward":
                w.record_loss(loss)
            loss.backward()
            if when == "after backward":
                w.record_loss(loss)
            opt.step()
            losses.append(loss.item())
    np.testing.assert_allclose(w.history.loss, losses, rtol=1e-6)
    assert loop_errors(w) == [] and w.diagnostic_errors == []


# ------------------------------------------------------------------ (d) an exception ends the block
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_after_the_first_backward_is_not_a_missing_step(exc: type[BaseException]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=64)
    with pytest.raises(exc), tlw.watch(model, opt, loss_fn=crit) as w:
        for xb, yb in loader(x, y):
            opt.zero_grad()
            crit(model(xb), yb).backward()
            raise exc("the user's own failure")
    assert w.closed and w.loop.backwards == 1 and w.loop.steps == 0
    assert find(w, "optimizer-not-stepping") == []


def test_exception_after_several_steps_keeps_what_was_found() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=128)
    with pytest.raises(ValueError), tlw.watch(model, opt, loss_fn=crit) as w:
        for i, (xb, yb) in enumerate(loader(x, y)):
            opt.zero_grad()
            crit(model(xb), yb).backward()  # never steps: a real bug, found before the exception
            if i == 3:
                raise ValueError("bad batch")
    assert len(find(w, "optimizer-not-stepping")) == 1


# ------------------------------------------------------------------ (e) LBFGS: step(closure)
def test_lbfgs_closure_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1, max_iter=8, history_size=10, line_search_fn="strong_wolfe"
    )
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=256)
    returned = []
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for _ in range(2):
            for xb, yb in loader(x, y, batch_size=64):

                def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                    opt.zero_grad()
                    loss = crit(model(xb), yb)
                    loss.backward()
                    return loss

                returned.append(opt.step(closure).item())
    assert loop_errors(w) == [] and problems(w) == []
    assert w.loop.steps == len(returned) == 8 and w.loop.backwards > w.loop.steps
    # One loss per optimizer step: the closure's first evaluation, which is what LBFGS returns.
    assert len(w.history.loss) == len(returned)
    np.testing.assert_allclose(w.history.loss, returned, rtol=1e-6)
    assert w.diagnostic_errors == []


def test_closure_that_forgets_zero_grad_inside_a_step_is_silent_but_outside_is_found() -> None:
    """SGD with a closure: the closure's pass is the step's; a loop that never zeroes is still found."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=128)
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for xb, yb in loader(x, y):

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                loss = crit(model(xb), yb)  # no zero_grad anywhere
                loss.backward()
                return loss

            opt.step(closure)
    assert w.loop.steps == 4
    assert find(w, "optimizer-not-stepping") == []


# ------------------------------------------------------------------ the real bugs are still found
def test_missing_step_with_a_probe_present_is_still_found() -> None:
    torch.manual_seed(0)
    model, probe = Encoder(), nn.Linear(32, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_probe = torch.optim.SGD(probe.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=128)
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for xb, yb in loader(x, y):
            opt.zero_grad()
            logits, feats = model(xb)
            crit(logits, yb).backward()  # opt.step() forgotten
            opt_probe.zero_grad()
            crit(probe(feats.detach()), yb).backward()
            opt_probe.step()
    (f,) = find(w, "optimizer-not-stepping")
    assert f.severity == "error" and "never called" in f.message


def test_grads_not_zeroed_with_an_auxiliary_loss_is_still_found() -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=128)
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for xb, yb in loader(x, y):
            o1, o2 = model(xb)
            (crit(o1, yb) + 0.3 * crit(o2, yb)).backward()
            opt.step()
    assert w.loop.stale_steps == 3
    assert "grads-not-zeroed" in loop_errors(w)


def test_grads_zeroed_through_data_are_not_stale() -> None:
    """``p.grad.data.zero_()`` (an old idiom) zeroes without bumping the tensor's version."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=128)
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for xb, yb in loader(x, y):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.data.zero_()
            crit(model(xb), yb).backward()
            opt.step()
    assert w.loop.stale_steps == 0 and loop_errors(w) == []


def test_freezing_the_hooked_parameters_keeps_the_loop_tracked() -> None:
    """The gradient hooks sit on a few parameters; when those are frozen, others take over."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=256)
    losses = []
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for i, (xb, yb) in enumerate(loader(x, y, batch_size=16)):
            if i == 4:
                model[0].requires_grad_(False)
                model[4].requires_grad_(False)
            opt.zero_grad()
            loss = crit(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert w.loop.backwards == w.loop.steps == 16
    np.testing.assert_allclose(w.history.loss, losses, rtol=1e-6)


class _StepCountingSGD(torch.optim.SGD):
    """An optimizer subclass whose step() calls super().step(), as custom optimizers do."""

    def step(self, closure=None):
        return super().step(closure)


def test_a_subclass_step_calling_super_counts_once() -> None:
    # Another SGD made first: torch then wraps both SGD.step and the subclass's step with the
    # step hooks, so the watcher's hooks fire for the outer and the inner call.
    other = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    other.step()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = _StepCountingSGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(8)]
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for x, y in batches:
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    assert w.global_step == 8 and len(w.history) == 8
    assert w.loop.steps == 8
    assert not [f for f in w.findings if f.severity in ("error", "warning")]


class _FlakySGD(torch.optim.SGD):
    """Raises once, before touching the weights (a user's loop catches it and goes on)."""

    failed = False

    def step(self, closure=None):
        if not self.failed:
            self.failed = True
            raise RuntimeError("flaky step")
        return super().step(closure)


def test_a_step_that_raised_once_does_not_stop_the_counting() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = _FlakySGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(8)]
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for x, y in batches:
            opt.zero_grad()
            crit(model(x), y).backward()
            with contextlib.suppress(RuntimeError):
                opt.step()
    assert w.global_step == 7 and len(w.history) == 7


def _amp_loop(
    model: nn.Module, steps: int, *, seed: int
) -> tuple[tlw.Watcher, torch.amp.GradScaler, list[float]]:
    """Mixed precision the documented way: autocast float16 and a GradScaler whose first scales
    overflow (as a large model's often do on a GPU), so its first steps are skipped."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    x = torch.randn(512, 64)
    y = x[:, :10].argmax(1)
    losses = []
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for step in range(steps):
            i = (step * 32) % 512
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = crit(model(x[i : i + 32]), y[i : i + 32])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
    return w, scaler, losses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradscaler_skipping_its_first_steps_is_healthy(seed: int) -> None:
    # GradScaler skips a step whose scaled gradients overflow and halves the scale: several skipped
    # steps in a row at the start are how mixed precision finds its scale, not a loop bug.
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    w, scaler, losses = _amp_loop(model, 300, seed=seed)
    assert problems(w) == []
    assert scaler.get_scale() < 2.0**24  # it did back off: steps were skipped
    assert w.loop.steps < 300 and np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    scales = w.loss_scales(64)
    assert scales and all(v == scaler.get_scale() for v in scales[-5:])  # what the scaler used


def test_gradscaler_that_skips_every_step_is_named_with_the_scales() -> None:
    # A backward that yields NaN in one layer whatever the scale (a finite loss, as from a bad custom op).
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model[0].weight.register_hook(lambda g: g * float("nan"))
    w, _scaler, losses = _amp_loop(model, 45, seed=0)
    assert np.isfinite(losses).all() and w.loop.steps == 0  # a finite loss, and not one step taken
    found = find(w, "optimizer-not-stepping")
    assert len(found) == 1 and "GradScaler skipped the last" in found[0].message, [
        g.message for g in w.findings
    ]
    f = found[0]
    assert f.evidence["backwards_without_step"] >= 30
    scales = f.evidence["loss_scales"]
    assert scales[0] > scales[-1] and all(b == a / 2 for a, b in zip(scales, scales[1:]))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_step_before_backward_is_named_as_the_order_not_a_disconnected_parameter(seed: int) -> None:
    # zero_grad(); loss = ...; optimizer.step(); loss.backward(): each step sees no gradient, and the
    # gradients backward computes are cleared by the next zero_grad() unused.
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    before = [p.detach().clone() for p in model.parameters()]
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for x, y in loader(*classification(seed=seed), batch_size=16):
            opt.zero_grad()
            loss = crit(model(x), y)
            opt.step()
            loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing trained
    assert find(w, "disconnected-param") == []
    found = find(w, "param-not-updating")
    assert len(found) == 1 and "optimizer.step() runs before loss.backward()" in found[0].message
    assert set(found[0].params) == {n for n, _ in model.named_parameters()}
