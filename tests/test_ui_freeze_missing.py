"""The freeze panel as a learner meets it (#16 points 2 and 10).

A parameter that is trainable but in no optimizer group gets its own control ("add to optimizer"):
its freeze toggle, which would make the setup look consistent and the finding go away while the head
still never trains, is locked. The batch-norm option shows what ``freeze(..., bn_eval=True)`` did, and a
closed session's controls are not clickable.
"""

from __future__ import annotations

import pytest
import torch
from helpers import one_thread  # noqa: F401

import tlwidgets as tlw
from tlwidgets import zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def _finding(session, code):
    return next(f for f in session.findings if f.code == code)


def test_a_head_in_no_optimizer_group_gets_add_to_optimizer_not_a_freeze_toggle():
    runner = zoo.get("head-not-in-optimizer").runner(0)
    d = tlw.Dashboard(runner)
    panel = d.freeze
    head = panel.toggles["head"]
    assert head.disabled and "add to optimizer" in head.tooltip
    assert panel.add_buttons["head"].layout.display != "none"
    assert "will not train" in panel.infos["head"].value
    assert panel.add_buttons["backbone"].layout.display == "none" and not panel.toggles["backbone"].disabled
    finding = _finding(runner, "param-not-in-optimizer")
    assert not finding.resolved

    panel.add_buttons["head"].click()

    groups = runner.param_group_of()
    assert groups["head.weight"] is not None and groups["head.bias"] is not None
    assert runner.history.controls[-1].kind == "unfreeze"
    assert finding.resolved and runner.applied_actions  # through the finding's own action
    assert panel.add_buttons["head"].layout.display == "none"
    assert not head.disabled and head.description == "trainable"
    assert "will not train" not in panel.infos["head"].value
    runner.run(steps=10)
    head_rows = [runner.param_names.index(n) for n in ("head.weight", "head.bias")]
    assert (runner.history.update_norm[-5:, head_rows] > 0).all()  # the head trains now
    d.close()
    runner.close()


def test_add_to_optimizer_on_a_plain_model_adds_a_group_at_the_neighbours_lr():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
    runner = tlw.Runner(model, torch.nn.CrossEntropyLoss(), opt, data)
    d = tlw.Dashboard(runner)
    assert d.freeze.toggles["2"].disabled and not d.freeze.toggles["0"].disabled
    assert d.freeze.add_to_optimizer("2") == ["2.weight", "2.bias"]
    assert runner.param_group_of()["2.weight"] == 1
    assert runner.optimizer.param_groups[1]["lr"] == pytest.approx(0.1)
    assert d.freeze.add_to_optimizer("2") == []  # nothing left to add
    d.close()
    runner.close()


def test_the_batch_norm_option_shows_a_freeze_with_bn_eval():
    runner = zoo.get("finetune-digits").runner(0)
    d = tlw.Dashboard(runner)
    assert not d.freeze.bn_stats.value
    runner.freeze("backbone", bn_eval=True)
    d.refresh()
    assert d.freeze.bn_stats.value  # was unchecked right after freeze(..., bn_eval=True)
    runner.unfreeze("backbone")
    d.refresh()
    assert not d.freeze.bn_stats.value
    d.close()
    runner.close()


def test_a_closed_watchers_controls_are_not_clickable():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with tlw.watch(model, opt, loss_fn=torch.nn.CrossEntropyLoss()) as watcher:
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
            opt.step()
    d = tlw.Dashboard(watcher)
    assert all(t.disabled for t in d.freeze.toggles.values())
    assert d.freeze.bn_stats.disabled and d.freeze.next_button.disabled
    assert all(b.layout.display == "none" for b in d.freeze.add_buttons.values())
    d.close()


def test_lr_groups_name_their_modules_and_the_tensors_the_model_no_longer_holds():
    """#16 point 10: a group listing 7,290 params for a 6,645-param model, with no word why (the old
    head replaced after the optimizer was built is still in it), and groups without names."""
    from tlwidgets.ui.lr import group_owners

    runner = zoo.get("head-not-in-optimizer").runner(0)
    old_head = sum(
        p.numel()
        for p in runner.optimizer.param_groups[0]["params"]
        if all(p is not q for _, q in runner.named_params)
    )
    assert old_head > 0  # the setup: the optimizer still holds the replaced head
    d = tlw.Dashboard(runner)
    assert group_owners(runner) == [("backbone", old_head)]
    text = d.lr.infos[0].value
    assert "backbone" in text and f"{old_head:,} of them not in the model" in text
    _finding(runner, "param-not-in-optimizer").actions[0].apply()
    d.refresh()
    assert group_owners(runner)[1] == ("head", 0)
    assert "head" in d.lr.infos[1].value and "not in the model" not in d.lr.infos[1].value
    d.close()
    runner.close()
