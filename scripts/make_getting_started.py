# ruff: noqa: E501  (notebook cell sources are kept as written, long lines included)
"""Write notebooks/GettingStarted.ipynb (run: python scripts/make_getting_started.py).

The notebook is generated so that its cells stay reviewable as code; outputs
are not stored (nbval executes every cell; cells marked NBVAL_CHECK_OUTPUT get
their output compared, so they are executed once here and stored).

Two layers check the tutorial's claims: a cell that claims something ("head moved",
a finding code, "weights unchanged") asserts it, so it fails under --nbval-lax even
where the printed text is not compared; and a cell whose printed output is
deterministic (booleans, finding codes, no timings or float noise) is marked
NBVAL_CHECK_OUTPUT. tests/test_getting_started_claims.py keeps both in place.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "notebooks" / "GettingStarted.ipynb"

CELLS: list[tuple[str, str]] = [
    (
        "md",
        """# Getting started with tlwidgets

tlwidgets lets you **step through PyTorch training one stage at a time**, see what every stage did to
each tensor and parameter, flip freeze toggles and drag learning-rate sliders while it runs, and get a
**named diagnosis** (cause and fix) when training does not learn.

This tutorial fine-tunes a small convolutional network on scikit-learn's handwritten digits. Everything
is offline: the data ships with scikit-learn, and the "pretrained" backbone was trained by tlwidgets itself
on the digits 0-4. We fine-tune it on the digits 5-9 with a new head, and on the way reproduce and fix the
classic bugs.

Every section shows a **dashboard** (click around!) and the **code that does the same thing**, so the
notebook also runs top to bottom without a person. The `assert` lines check what the text claims; they are
how this notebook is tested.""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
import torch
from torch import nn
from torch.utils.data import DataLoader

import tlwidgets as tlw
from tlwidgets.zoo import digits

torch.manual_seed(0)
split = digits.split_digits()  # digits 0-4 were used for pretraining; we fine-tune on 5-9
train_loader = DataLoader(split.finetune_train, batch_size=32, shuffle=True)
val_loader = DataLoader(split.finetune_val, batch_size=256)


def fresh_model(n_classes: int = 5) -> nn.Module:
    \"\"\"The pretrained backbone (loaded offline) with a new, untrained head.\"\"\"
    return digits.DigitsNet(digits.pretrained_backbone(), nn.Linear(digits.DigitsBackbone.out_features, n_classes))


print(len(split.finetune_train), "training and", len(split.finetune_val), "validation images of the digits",
      split.finetune_classes)""",
    ),
    (
        "md",
        """## 1. One batch, stage by stage

A training step is seven stages: **fetch** a batch, **zero_grad**, move it **to_device**, **forward**,
**loss**, **backward** and optimizer **step**. `runner.step_stage()` runs exactly one and returns a record of
what it saw. In the dashboard, *Step stage* does the same; the highlighted chip is the stage that runs next,
and clicking a chip shows its record. The cells below share the dashboard's runner, so they pick up
wherever your clicks left it.""",
    ),
    (
        "code",
        """model = fresh_model()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
runner = tlw.Runner(model, nn.CrossEntropyLoss(), optimizer, train_loader, val_data=val_loader)
tlw.Dashboard(runner)""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
if runner.stage is not tlw.Stage.FETCH:  # you clicked "Step stage" above: finish that batch first
    runner.step()
fetch = runner.step_stage()
print("ran:", fetch.stage.value, "| next:", runner.stage.value)
print("inputs:", fetch["tensors"]["inputs"]["shape"], fetch["tensors"]["inputs"]["dtype"])
print("labels in this batch:", fetch["label_counts"].sum(), "examples of", len(fetch["label_counts"]), "classes")
assert fetch.stage is tlw.Stage.FETCH and runner.stage is tlw.Stage.ZERO_GRAD, "step_stage() runs exactly one stage\"""",
    ),
    (
        "code",
        """runner.step()  # the rest of this batch: zero_grad, to_device, forward, loss, backward, step
loss = runner.records[tlw.Stage.LOSS]
print(f"loss {loss['loss']:.3f} (ln 5 = {loss['expected_initial_loss']:.3f} for equal odds on 5 classes)")
step = runner.records[tlw.Stage.STEP]
for name, ratio in zip(runner.param_names, step["update_ratio"]):
    print(f"{name:24s} update/weight = {ratio:.1e}")""",
    ),
    (
        "md",
        """A model that gives every class the same probability has a loss of exactly ln 5. This one starts
higher: the new head's random weights are already confidently wrong on some digits.

The **update/weight ratio** is the size of a step's change relative to the weights. What is healthy
depends on the optimizer and on how far training is. On its first steps **Adam** (here AdamW) moves every
weight by about the learning rate, so small weights (biases, a fresh head) see ratios of 1e-2 and more;
as training settles the ratios fall to between about 1e-4 and 1e-2 (this run: 3e-4 to 9e-3 after two
epochs). **SGD with momentum** starts small and grows while momentum builds up. So tlwidgets never judges
one step: it calls a learning rate too high when the median ratio stays above 5e-2 *and* the loss rises
or jumps, and too low when it stays below 3e-5 while the loss barely moves. The heatmap in the dashboard
colours exactly this number, parameters by recent steps, against that band.""",
    ),
    (
        "md",
        """## 2. The classic: the new head is not in the optimizer

A very common fine-tuning bug: the optimizer is built, *then* the head is replaced. The model trains
"fine" (no error!) but the new head never changes, so accuracy stays at chance. tlwidgets audits the setup
when the runner is built.""",
    ),
    (
        "code",
        """model = digits.DigitsNet(digits.pretrained_backbone(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
model.head = nn.Linear(128, 5)  # replaced AFTER the optimizer was built
runner = tlw.Runner(model, nn.CrossEntropyLoss(), optimizer, train_loader, val_data=val_loader)
dashboard = tlw.Dashboard(runner)
dashboard""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
finding = runner.findings[0]
print(finding.code, finding.params)
print("cause:", finding.cause)
print("fix button:", [a.label for a in finding.actions])
assert finding.code == "param-not-in-optimizer" and "head.weight" in finding.params, "the head is not in the optimizer"
assert finding.resolved or [a.label for a in finding.actions][:1] == ["Add to optimizer"], "the card's fix button\"""",
    ),
    (
        "md",
        """In the dashboard's **Freeze** panel the head shows as trainable but in no optimizer group, with an
**add to optimizer** button; its *freeze* toggle is locked, because freezing stops a parameter from
training and would not add it to the optimizer. The finding's card has the same fix as a button,
**Add to optimizer**: click either, or run the cell below,
which applies the same action from code. It adds the head to the optimizer as a new parameter group,
with the learning rate of the group that holds its neighbours; by hand that is
`runner.unfreeze("head", lr=0.05)`. The finding is then **resolved**: it stays listed, greyed, after the
active ones, so the story of the run is kept.""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
if finding.actions:  # empty once the fix is applied (if you clicked the button, say)
    print(finding.actions[0].apply())  # what the button does; by hand: runner.unfreeze("head", lr=0.05)
runner.run(steps=20)
head_rows = [runner.param_names.index(n) for n in ("head.weight", "head.bias")]
head_moved = bool((runner.history.update_norm[:, head_rows] > 0).all())
print("head moved:", head_moved)
assert head_moved, "the head should move once it is in the optimizer"
codes = [f.code for f in runner.active_findings if f.severity != "info"]
print("active findings:", codes)
print("resolved:", [f.code for f in runner.resolved_findings])
assert "param-not-in-optimizer" not in codes, "the finding should be resolved once the head is in the optimizer"
assert "param-not-in-optimizer" in [f.code for f in runner.resolved_findings], "resolved findings stay listed\"""",
    ),
    (
        "md",
        """## 3. Learning rate too high

With SGD at a learning rate far too large, each step overshoots: the loss jumps around or rises and the
update/weight ratios sit far above the band (here a median of more than 1e-2 even on SGD's first steps).
We keep a **checkpoint** of the start, run, and let the finding's fix compare with a learning rate the
numbers support, from the same starting point (`rewind` restores weights, optimizer, RNG and data position
exactly).""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
model = fresh_model()
optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
runner = tlw.Runner(model, nn.CrossEntropyLoss(), optimizer, train_loader, val_data=val_loader)
start = runner.checkpoint("before")
too_high = runner.run(steps=30)
print(too_high)
codes = [f.code for f in runner.findings]
print("findings:", codes)
assert "lr-too-high" in codes, "30 steps of SGD at lr=1.0 should be diagnosed as lr-too-high\"""",
    ),
    (
        "code",
        """median_ratio = float(torch.tensor(runner.history.update_ratio).nanmedian())
print(f"median update/weight ratio: {median_ratio:.1e}")
assert median_ratio > 1e-2, "at lr=1.0 the steps should be far above the band"
tlw.Dashboard(runner)""",
    ),
    (
        "md",
        """The finding's card offers **Rewind to step 0 and set lr=…**. The new learning rate is not a blind
"divide by ten": it is the one whose first steps change the weights by about 1e-2 of their size, from the
update/weight ratio per unit of learning rate measured on the first steps. Click the button, or run the
cell below (the same action from code; by hand it is `runner.rewind(start)` then `runner.set_lr(...)`),
and train the same 30 steps again. The dashboard above overlays the abandoned run, dashed, on the new one.""",
    ),
    (
        "code",
        """finding = next(f for f in runner.findings if f.code == "lr-too-high")
if finding.actions:  # empty once the fix is applied (if you clicked the button, say)
    fix = finding.actions[0]
    print(fix.label)
    print(fix.apply())
runner.run(steps=30)
loss_too_high = runner.history.branches[-1].loss  # the abandoned run, kept by the rewind
loss_fixed = runner.history.loss
print(f"mean loss of the last 10 steps: lr=1.0 -> {loss_too_high[-10:].mean():.3f}, "
      f"lr={runner.lrs[0]:.2g} -> {loss_fixed[-10:].mean():.3f}")
assert loss_fixed[-10:].mean() < loss_too_high[-10:].mean(), "the lower learning rate should reach a lower loss"
assert finding.resolved, "rewound past its cause, the finding is resolved\"""",
    ),
    (
        "md",
        """## 4. Freeze the backbone, train the head, then unfreeze gradually

Fine-tuning usually starts with the pretrained backbone frozen (so a random head cannot wreck its
features), then unfreezes it from the top with a lower learning rate. `freeze` sets `requires_grad=False`
*and* clears the gradients, so momentum or weight decay cannot move frozen weights;
`bn_eval=True` also stops the batch-norm running statistics from drifting.""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
model = fresh_model()
optimizer = torch.optim.AdamW(model.head.parameters(), lr=3e-3)
runner = tlw.Runner(model, nn.CrossEntropyLoss(), optimizer, train_loader, val_data=val_loader)
runner.freeze("backbone", bn_eval=True)
frozen_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # weights and BN statistics
runner.run(epochs=1)
backbone_untouched = all(torch.equal(v, frozen_before[k]) for k, v in model.backbone.state_dict().items())
print("backbone untouched:", backbone_untouched)
assert backbone_untouched, "a frozen backbone (bn_eval=True) keeps its weights and batch-norm statistics\"""",
    ),
    (
        "code",
        """print(f"after 1 epoch with a frozen backbone: val loss {runner.history.epochs[-1].val_loss:.3f}, "
      f"accuracy {runner.history.epochs[-1].val_metrics['accuracy']:.2f}")
tlw.Dashboard(runner)""",
    ),
    (
        "code",
        """runner.unfreeze("backbone.conv3", "backbone.bn3", lr=3e-4)  # the top block first, 10x lower LR
runner.run(epochs=1)
group_lrs = [g["lr"] for g in optimizer.param_groups]
print("optimizer groups (lr):", [f"{lr:.0e}" for lr in group_lrs])
assert group_lrs == [3e-3, 3e-4], "the top block trains in its own group at a 10x lower LR"
print(f"val accuracy {runner.history.epochs[-1].val_metrics['accuracy']:.2f}")""",
    ),
    (
        "md",
        """## 5. A NaN: stop before the weights are damaged

A `log` of features that can be zero produces `-inf`, and the loss becomes NaN. `run()` stops at the first
non-finite loss or gradient, **before** the optimizer step applies it, and names the module where the
non-finite values start (it replays the forward pass with checks on every module).""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
class LogFeatures(nn.Module):
    def forward(self, x):
        return torch.log(x)  # ReLU features are often exactly 0 -> -inf


model = digits.DigitsNet(digits.pretrained_backbone(), nn.Sequential(LogFeatures(), nn.Linear(128, 5)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
runner = tlw.Runner(model, nn.CrossEntropyLoss(), optimizer, train_loader)
weights_before = [p.detach().clone() for p in model.parameters()]
result = runner.run(steps=10)
print(result)
assert result.steps == 0 and result.stopped_by == "finding", "run() stops before the first optimizer step"
weights_unchanged = all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters()))
print("weights unchanged:", weights_unchanged)
assert weights_unchanged, "the NaN must not reach the weights"
for f in runner.findings:
    print(f)
first = runner.findings[0]
assert first.code == "non-finite-loss" and "head.0" in first.params, "the NaN is traced to LogFeatures (head.0)\"""",
    ),
    (
        "code",
        """tlw.Dashboard(runner)  # the LOSS chip is red; the finding's "show step" opens the record that caught it""",
    ),
    (
        "md",
        """## 6. Overfit one batch, and find a learning rate

Two checks worth running before any long training: a model that works can drive the loss on **one batch**
to nearly zero; and an **LR range test** sweeps the learning rate up exponentially to show where the loss
falls fastest. Both restore the weights and optimizer afterwards.""",
    ),
    (
        "code",
        """from tlwidgets.diagnostics.checks import lr_range_test, overfit_one_batch

model = fresh_model()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
runner = tlw.Runner(model, nn.CrossEntropyLoss(), optimizer, train_loader)
weights_before = [p.detach().clone() for p in model.parameters()]
overfit = overfit_one_batch(runner, steps=60)
print(overfit)
assert overfit.passed, "a model that works drives the loss on one batch to nearly zero"
sweep_view = tlw.Dashboard(runner, parts=["lr"])  # the LR tab alone: its "LR range test" button runs this
sweep = sweep_view.lr.range_test(start_lr=1e-5, end_lr=1.0, num_steps=60)  # = lr_range_test(runner, ...)
print(f"suggested learning rate: {sweep.suggestion:.1e}")
assert 1e-4 < sweep.suggestion < 1e-1, "a sensible AdamW learning rate, far from both ends of the sweep"
restored = optimizer.param_groups[0]["lr"] == 1e-3 and all(
    torch.equal(a, b) for a, b in zip(weights_before, model.parameters())
)
print("weights and learning rate restored:", restored)
assert restored, "both checks put the weights and the optimizer back\"""",
    ),
    (
        "code",
        """sweep_view  # loss against the learning rate on a log axis; the dashed line is the suggestion""",
    ),
    (
        "md",
        """## 7. Your own training loop

Already have a loop? `tlw.watch` attaches with public hooks only (forward hooks, gradient hooks, optimizer
step hooks, a hook on the loss module) and leaves your code unchanged. Validation under `torch.no_grad()` is
not counted as training. Here the loop forgets `optimizer.zero_grad()`, so gradients pile up across steps.""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
model = fresh_model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
criterion = nn.CrossEntropyLoss()
with tlw.watch(model, optimizer, loss_fn=criterion) as watcher:
    for step, (x, y) in enumerate(train_loader):
        loss = criterion(model(x), y)
        loss.backward()  # no optimizer.zero_grad(): gradients accumulate across steps
        optimizer.step()
        if step == 5:
            break
codes = [f.code for f in watcher.findings]
print(codes)
assert "grads-not-zeroed" in codes, "watch() should notice the missing optimizer.zero_grad()\"""",
    ),
    ("code", """tlw.Dashboard(watcher)"""),
    (
        "md",
        """## 8. Keep the bugs away: checks as pytest assertions

The same checks exist as assertions for a test suite (`tlwidgets.testing`): parameters update, frozen ones
stay frozen, nothing is NaN, the loss falls on one batch. Each restores the model afterwards.""",
    ),
    (
        "code",
        """# NBVAL_CHECK_OUTPUT
from tlwidgets import testing

model = fresh_model()
batch = next(iter(train_loader))
testing.assert_params_update(model, nn.CrossEntropyLoss(), batch)
testing.assert_finite(model, batch)
testing.assert_loss_decreases(model, nn.CrossEntropyLoss(), batch, steps=20)
print("all checks passed")  # each assert_* raises AssertionError (naming the problem) when its check fails""",
    ),
    (
        "md",
        """## Where next

- `runner.history` holds per-step numbers as numpy arrays (`loss`, `lr`, and per parameter `grad_norm`,
  `weight_norm`, `update_norm`, `update_ratio`); `runner.history.to_dataframe()` and `.to_tensorboard()` export them.
- `runner.findings` lists the diagnoses, most likely root cause first; each has a `cause` and a `fix`.
- `tlwidgets.zoo` has many more broken training setups, each with a healthy twin, to practise on.""",
    ),
]


def execute_checked_cells(nb: nbformat.NotebookNode) -> None:
    """Run the notebook once; keep outputs only of the cells nbval compares (NBVAL_CHECK_OUTPUT)."""
    from nbclient import NotebookClient

    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    # Only printed text is kept, so the widget state nbclient saves (about 1.4 MB, for outputs that are
    # dropped below) and the per-cell execution timestamps would only make every regeneration a big diff.
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        if "NBVAL_CHECK_OUTPUT" not in cell.source:
            cell.outputs = []
            cell.execution_count = None
        else:
            # nbval compares every output of a marked cell, so a marked cell may only print to
            # stdout: a widget, a rich display or a warning on stderr would be compared too.
            extra = [o for o in cell.outputs if o.get("output_type") != "stream" or o.get("name") != "stdout"]
            if extra or not cell.outputs:
                kinds = [o.get("name", o.get("output_type")) for o in extra] or ["no output"]
                raise SystemExit(
                    f"{cell.id}: a NBVAL_CHECK_OUTPUT cell must print to stdout only, got {kinds}"
                )


def main() -> None:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(CELLS):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell["id"] = f"cell-{i:02d}"
        nb.cells.append(cell)
    execute_checked_cells(nb)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, OUT)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(nb.cells)} cells)")


if __name__ == "__main__":
    main()
