"""explain_exception / classify_exception on real torch errors.

Every exception below is raised by torch itself on the CPU, except the few that
cannot happen on a CPU-only machine (device mismatch, CUDA out of memory, CUDA
device-side assert): those are constructed with torch's real message text and
say so where they are built.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tlwidgets.core.catalog import CATALOG
from tlwidgets.core.findings import Code, Finding
from tlwidgets.core.stages import Stage
from tlwidgets.diagnostics.explain import classify_exception, explain_exception


def raised(fn: Callable[[], object]) -> BaseException:
    """Run ``fn`` and return the exception it raises (fail if it does not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. mse_loss's broadcasting UserWarning
        try:
            fn()
        except BaseException as exc:
            return exc
    pytest.fail("expected an exception")


def check(finding: Finding, code: Code, stage: Stage | None, exc: BaseException) -> None:
    """What every explained finding must have."""
    assert finding.code == code.value
    assert finding.severity == "error"
    assert finding.stage is stage
    assert finding.evidence["exception"] == type(exc).__name__
    assert finding.evidence["message"] == str(exc)
    assert finding.message.startswith(f"{type(exc).__name__}: ")
    assert finding.cause and finding.fix
    assert classify_exception(exc, stage) is code


def said(finding: Finding) -> str:
    return " ".join((finding.message, finding.cause, finding.fix))


# ---- shape-mismatch ---------------------------------------------------------------------------------


def test_linear_in_features_mismatch():
    exc = raised(lambda: nn.Linear(100, 10)(torch.randn(64, 784)))
    f = explain_exception(exc, Stage.FORWARD, {"input_shapes": torch.Size([64, 784])}, step=5)
    check(f, Code.SHAPE_MISMATCH, Stage.FORWARD, exc)
    assert f.step == 5
    assert "mat1 and mat2 shapes cannot be multiplied (64x784 and 100x10)" in f.message
    assert "[64, 784]" in f.message  # the context is shown
    assert "100" in f.cause and "784" in f.cause
    assert "in_features=784" in f.fix
    assert f.evidence["in_features"] == 100
    assert f.evidence["got_features"] == 784
    assert f.evidence["mat1"] == [64, 784] and f.evidence["mat2"] == [100, 10]


def test_linear_on_unflattened_images_suggests_flatten():
    exc = raised(lambda: nn.Linear(784, 10)(torch.randn(64, 1, 28, 28)))
    f = explain_exception(exc, Stage.FORWARD, {"input_shapes": {"x": (64, 1, 28, 28)}})
    check(f, Code.SHAPE_MISMATCH, Stage.FORWARD, exc)
    assert "not flattened" in f.cause
    assert "flatten(1)" in f.fix or "nn.Flatten()" in f.fix
    assert "784" in f.fix


def test_conv_channel_mismatch_grayscale_into_rgb_conv():
    exc = raised(lambda: nn.Conv2d(3, 8, 3)(torch.randn(4, 1, 28, 28)))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.SHAPE_MISMATCH, Stage.FORWARD, exc)
    assert "3 channels" in f.cause
    assert "1-channel" in f.cause or "1 channel" in f.cause
    assert "in_channels=1" in f.fix or "Grayscale(num_output_channels=3)" in f.fix
    assert f.evidence["expected_channels"] == 3
    assert f.evidence["got_channels"] == 1
    assert f.evidence["weight_shape"] == [8, 3, 3, 3]
    assert f.evidence["input_shape"] == [4, 1, 28, 28]


def test_conv_channel_mismatch_channels_last_suggests_permute():
    exc = raised(lambda: nn.Conv2d(3, 8, 3)(torch.randn(4, 28, 28, 3)))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.SHAPE_MISMATCH, Stage.FORWARD, exc)
    assert "channels-last" in f.cause
    assert "permute(0, 3, 1, 2)" in f.fix


def test_conv_channel_mismatch_between_layers():
    exc = raised(lambda: nn.Conv2d(16, 8, 3)(torch.randn(2, 8, 12, 12)))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.SHAPE_MISMATCH, Stage.FORWARD, exc)
    assert "16" in f.cause and "8" in f.cause
    assert "in_channels=8" in f.fix


def test_broadcast_add_in_forward():
    exc = raised(lambda: torch.randn(4, 3) + torch.randn(4, 5))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.SHAPE_MISMATCH, Stage.FORWARD, exc)
    assert "3" in f.cause and "5" in f.cause and "dimension 1" in f.cause
    assert f.evidence["size_a"] == 3 and f.evidence["size_b"] == 5 and f.evidence["dim"] == 1


def test_prediction_target_size_mismatch_at_loss():
    exc = raised(lambda: F.mse_loss(torch.randn(32, 10), torch.randn(32, 5)))
    ctx = {"output_shape": (32, 10), "target_shape": (32, 5)}
    f = explain_exception(exc, Stage.LOSS, ctx)
    check(f, Code.SHAPE_MISMATCH, Stage.LOSS, exc)
    assert "10 vs 5" in f.cause
    assert "[32, 10]" in f.message and "[32, 5]" in f.message
    assert "view_as" in f.fix


def test_batch_size_mismatch_in_cross_entropy():
    exc = raised(lambda: F.cross_entropy(torch.randn(96, 10), torch.randint(0, 10, (32,))))
    assert isinstance(exc, ValueError)
    f = explain_exception(exc, Stage.LOSS)
    check(f, Code.SHAPE_MISMATCH, Stage.LOSS, exc)
    assert "96" in f.cause and "32" in f.cause and "3 x 32" in f.cause
    assert "x.flatten(1)" in f.fix or "x.size(0)" in f.fix
    assert f.evidence["input_batch"] == 96 and f.evidence["target_batch"] == 32


def test_view_to_incompatible_size():
    exc = raised(lambda: torch.randn(4, 3, 28, 28).view(-1, 1000))
    f = explain_exception(exc, Stage.FORWARD, {"input_shapes": [(4, 3, 28, 28)]})
    check(f, Code.SHAPE_MISMATCH, Stage.FORWARD, exc)
    assert "[-1, 1000]" in f.cause and "9408" in f.cause
    assert "x.flatten(1)" in f.fix
    assert "2352" in f.fix  # 9408 elements / batch of 4
    assert f.evidence["numel"] == 9408 and f.evidence["shape"] == [-1, 1000]


def test_bce_target_shape():
    exc = raised(lambda: F.binary_cross_entropy_with_logits(torch.randn(32, 1), torch.rand(32)))
    f = explain_exception(exc, Stage.LOSS)
    check(f, Code.SHAPE_MISMATCH, Stage.LOSS, exc)
    assert "[32]" in f.cause and "[32, 1]" in f.cause
    assert "squeeze" in f.fix
    assert f.evidence["target_shape"] == [32] and f.evidence["output_shape"] == [32, 1]


def test_cross_entropy_column_targets():
    exc = raised(lambda: F.cross_entropy(torch.randn(8, 10), torch.randint(0, 10, (8, 1))))
    f = explain_exception(exc, Stage.LOSS, {"target_shape": (8, 1)})
    check(f, Code.SHAPE_MISMATCH, Stage.LOSS, exc)
    assert "[8, 1]" in f.cause
    assert "squeeze(1)" in f.fix and "argmax(1)" in f.fix


def test_collate_of_different_image_sizes_at_fetch():
    exc = raised(lambda: torch.stack([torch.randn(3, 224, 224), torch.randn(3, 200, 300)]))
    f = explain_exception(exc, Stage.FETCH)
    check(f, Code.SHAPE_MISMATCH, Stage.FETCH, exc)
    assert "[3, 224, 224]" in f.cause and "[3, 200, 300]" in f.cause
    assert "Resize" in f.fix


def test_batchnorm_num_features_mismatch():
    exc = raised(lambda: nn.BatchNorm1d(4)(torch.randn(8, 5)))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.SHAPE_MISMATCH, Stage.FORWARD, exc)
    assert "num_features=5" in f.fix and "4" in f.cause


def test_softmax_dim_out_of_range():
    exc = raised(lambda: torch.softmax(torch.randn(5), dim=1))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.SHAPE_MISMATCH, Stage.FORWARD, exc)
    assert "dimension 1" in f.cause


# ---- dtype-mismatch ---------------------------------------------------------------------------------


def test_double_input_into_float_linear():
    exc = raised(lambda: nn.Linear(4, 2)(torch.randn(3, 4, dtype=torch.float64)))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.DTYPE_MISMATCH, Stage.FORWARD, exc)
    assert "float64" in f.cause and "float32" in f.cause
    assert ".float()" in f.fix and "model.double()" in f.fix
    assert set(f.evidence["dtypes"]) == {"float64", "float32"}


def test_double_input_into_float_conv():
    exc = raised(lambda: nn.Conv2d(3, 2, 3)(torch.randn(1, 3, 8, 8, dtype=torch.float64)))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.DTYPE_MISMATCH, Stage.FORWARD, exc)
    assert ".float()" in f.fix


def test_integer_input_into_float_linear():
    exc = raised(lambda: nn.Linear(4, 2)(torch.randint(0, 255, (3, 4))))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.DTYPE_MISMATCH, Stage.FORWARD, exc)
    assert "int64" in f.cause
    assert ".float()" in f.fix


@pytest.mark.parametrize("loss", [F.cross_entropy, F.nll_loss], ids=["cross_entropy", "nll_loss"])
def test_float_class_targets(loss):
    exc = raised(lambda: loss(torch.randn(3, 5), torch.tensor([1.0, 2.0, 3.0])))
    f = explain_exception(exc, Stage.LOSS)
    check(f, Code.DTYPE_MISMATCH, Stage.LOSS, exc)
    assert "float32" in f.cause and "int64" in f.cause
    assert "targets.long()" in f.fix
    assert f.evidence["found"] == "float32"


def test_integer_targets_for_bce():
    exc = raised(lambda: F.binary_cross_entropy(torch.rand(3), torch.tensor([1, 0, 1])))
    f = explain_exception(exc, Stage.LOSS)
    check(f, Code.DTYPE_MISMATCH, Stage.LOSS, exc)
    assert "targets.float()" in f.fix


def test_float_ids_into_embedding():
    exc = raised(lambda: nn.Embedding(10, 4)(torch.tensor([1.0, 2.0])))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.DTYPE_MISMATCH, Stage.FORWARD, exc)
    assert ".long()" in f.fix


def test_old_style_scalar_type_message():
    # Older torch releases (and some kernels) word it this way; the wording is torch's own.
    exc = RuntimeError("expected scalar type Long but found Float")
    f = explain_exception(exc, Stage.LOSS)
    check(f, Code.DTYPE_MISMATCH, Stage.LOSS, exc)
    assert "targets.long()" in f.fix
    exc = RuntimeError("expected scalar type Float but found Double")
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.DTYPE_MISMATCH, Stage.FORWARD, exc)
    assert ".float()" in f.fix and "model.double()" in f.fix


# ---- inplace-modification -----------------------------------------------------------------------------


def _sigmoid_then_inplace():
    x = torch.randn(5, requires_grad=True)
    y = torch.sigmoid(x)
    y.mul_(2)  # sigmoid saves its output for backward
    y.sum().backward()


def _exp_then_inplace():
    x = torch.randn(5, requires_grad=True)
    y = x.exp()
    y += 1  # exp saves its output for backward
    y.sum().backward()


@pytest.mark.parametrize(("fn", "op"), [(_sigmoid_then_inplace, "Sigmoid"), (_exp_then_inplace, "Exp")])
def test_inplace_modification_of_saved_tensor(fn, op):
    exc = raised(fn)
    f = explain_exception(exc, Stage.BACKWARD)
    check(f, Code.INPLACE_MODIFICATION, Stage.BACKWARD, exc)
    assert op in f.cause and op in f.fix
    assert "version 1" in f.cause and "version 0" in f.cause
    assert "[5]" in f.cause
    assert "clone()" in f.fix
    assert f.evidence["op"] == op
    assert f.evidence["version"] == 1 and f.evidence["expected_version"] == 0
    assert f.evidence["shape"] == [5]


def test_inplace_on_leaf_that_requires_grad():
    def fn():
        w = torch.randn(5, requires_grad=True)
        w -= 0.1  # a manual update outside torch.no_grad()

    exc = raised(fn)
    f = explain_exception(exc, Stage.STEP)
    check(f, Code.INPLACE_MODIFICATION, Stage.STEP, exc)
    assert "torch.no_grad()" in f.fix
    assert f.evidence["leaf"] is True


# ---- target-out-of-range ------------------------------------------------------------------------------


def test_cross_entropy_target_equal_to_num_classes():
    exc = raised(lambda: F.cross_entropy(torch.randn(3, 10), torch.tensor([1, 10, 3])))
    assert isinstance(exc, IndexError)
    f = explain_exception(exc, Stage.LOSS, {"output_shape": (3, 10)})
    check(f, Code.TARGET_OUT_OF_RANGE, Stage.LOSS, exc)
    assert "Target 10 with 10 classes" in f.cause
    assert "[0, 9]" in f.cause
    assert "1-based" in f.cause
    assert "label encoding" in f.fix and "num_classes" in f.fix
    assert f.evidence["target"] == 10 and f.evidence["num_classes"] == 10


def test_nll_loss_target_beyond_num_classes():
    exc = raised(lambda: F.nll_loss(torch.randn(3, 10).log_softmax(1), torch.tensor([1, 12, 3])))
    f = explain_exception(exc, Stage.LOSS, {"num_classes": 10})
    check(f, Code.TARGET_OUT_OF_RANGE, Stage.LOSS, exc)
    assert "Target 12 with 10 classes" in f.cause and "[0, 9]" in f.cause
    assert "13" in f.fix
    assert f.evidence["target"] == 12


def test_target_out_of_range_without_context():
    exc = raised(lambda: F.cross_entropy(torch.randn(3, 4), torch.tensor([0, 7, 1])))
    f = explain_exception(exc, Stage.LOSS)
    check(f, Code.TARGET_OUT_OF_RANGE, Stage.LOSS, exc)
    assert "7" in f.cause and "8" in f.fix
    assert "num_classes" not in f.evidence


def test_negative_target_suggests_ignore_index():
    exc = raised(lambda: F.cross_entropy(torch.randn(3, 10), torch.tensor([1, -1, 3])))
    f = explain_exception(exc, Stage.LOSS, {"num_classes": 10})
    check(f, Code.TARGET_OUT_OF_RANGE, Stage.LOSS, exc)
    assert "ignore_index=-1" in f.fix
    assert f.evidence["target"] == -1


def test_embedding_index_out_of_range_in_forward_is_an_indexing_error():
    exc = raised(lambda: nn.Embedding(10, 4)(torch.tensor([1, 10])))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.STAGE_ERROR, Stage.FORWARD, exc)
    assert "num_embeddings" in f.cause and "num_embeddings" in f.fix
    assert "index out of range in self" in f.message


def test_index_out_of_range_at_loss_is_a_target_error():
    # A loss that looks targets up with an embedding / index_select (e.g. label smoothing tables).
    table = nn.Embedding(10, 10)
    exc = raised(lambda: table(torch.tensor([3, 10])))
    f = explain_exception(exc, Stage.LOSS, {"num_classes": 10})
    check(f, Code.TARGET_OUT_OF_RANGE, Stage.LOSS, exc)
    assert "[0, 9]" in f.cause


def test_one_hot_with_too_few_classes():
    exc = raised(lambda: F.one_hot(torch.tensor([1, 10]), 10))
    f = explain_exception(exc, Stage.LOSS)
    check(f, Code.TARGET_OUT_OF_RANGE, Stage.LOSS, exc)
    assert "num_classes" in f.fix


def test_cuda_device_side_assert():
    # Cannot happen on the CPU: torch's real CUDA wording, constructed.
    exc = RuntimeError(
        "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported at some "
        "other API call, so the stacktrace below might be incorrect.\nFor debugging consider passing "
        "CUDA_LAUNCH_BLOCKING=1"
    )
    f = explain_exception(exc, Stage.BACKWARD)
    check(f, Code.TARGET_OUT_OF_RANGE, Stage.BACKWARD, exc)
    assert "CUDA_LAUNCH_BLOCKING=1" in f.fix
    assert "\n" not in f.message


# ---- device-mismatch (constructed: needs a GPU to happen for real) -------------------------------------


def test_device_mismatch_at_loss():
    # torch's message when e.g. F.cross_entropy gets cuda logits and cpu targets (cannot be raised on CPU).
    exc = RuntimeError(
        "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"
    )
    ctx = {"devices": {"output": "cuda:0", "target": "cpu"}}
    f = explain_exception(exc, Stage.LOSS, ctx, step=0)
    check(f, Code.DEVICE_MISMATCH, Stage.LOSS, exc)
    assert "cuda:0" in f.cause and "cpu" in f.cause
    assert "targets.to(" in f.fix
    assert "target cpu" in f.message
    assert f.evidence["devices"] == ["cuda:0", "cpu"]


def test_device_mismatch_newer_wording_in_forward():
    # torch >= 2.1 wording for a cpu batch into a cuda nn.Linear (cannot be raised on CPU).
    exc = RuntimeError(
        "Expected all tensors to be on the same device, but got mat1 is on cpu, different from other tensors "
        "on cuda:0 (when checking argument in method wrapper_CUDA_addmm)"
    )
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.DEVICE_MISMATCH, Stage.FORWARD, exc)
    assert "model.to(device)" in f.fix and "inputs.to(device)" in f.fix
    assert f.evidence["devices"] == ["cpu", "cuda:0"]
    assert f.evidence["argument"] == "mat1"


def test_conv_input_type_names_device_or_dtype():
    # A cuda batch into a cpu conv (cannot be raised on CPU): the legacy type names differ by device.
    exc = RuntimeError(
        "Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) should be the same or input "
        "should be a MKLDNN tensor and weight is a dense tensor"
    )
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.DEVICE_MISMATCH, Stage.FORWARD, exc)
    assert "cuda" in f.cause and "cpu" in f.cause
    # The same family with equal devices is a dtype clash (this one is real on CPU).
    exc = raised(lambda: nn.Conv2d(3, 2, 3)(torch.randn(1, 3, 8, 8, dtype=torch.float64)))
    assert "Input type" in str(exc)
    assert classify_exception(exc) is Code.DTYPE_MISMATCH


# ---- out-of-memory ------------------------------------------------------------------------------------


def test_cuda_out_of_memory_error_type():
    # torch.OutOfMemoryError (alias torch.cuda.OutOfMemoryError) with torch's real CUDA wording, constructed.
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    exc = oom_type(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.14 GiB of which "
        "3.56 MiB is free. Including non-PyTorch memory, this process has 79.13 GiB memory in use."
    )
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.OUT_OF_MEMORY, Stage.FORWARD, exc)
    assert "20.00 MiB" in f.cause and "3.56 MiB" in f.cause
    assert "batch size" in f.fix
    assert f.evidence["requested"] == "20.00 MiB"
    assert f.evidence["total"] == "79.14 GiB"
    assert f.evidence["gpu"] == 0


def test_out_of_memory_type_decides_without_text():
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    assert classify_exception(oom_type("")) is Code.OUT_OF_MEMORY
    assert classify_exception(MemoryError()) is Code.OUT_OF_MEMORY


def test_out_of_memory_at_step_mentions_optimizer_state():
    exc = MemoryError("out of memory")
    f = explain_exception(exc, Stage.STEP)
    check(f, Code.OUT_OF_MEMORY, Stage.STEP, exc)
    assert "Adam" in f.cause


def test_cpu_allocator_failure_of_absurd_size_points_to_a_shape_bug():
    # Real on CPU: the default allocator refuses a 4 EiB request at once.
    exc = raised(lambda: torch.empty(2**62, dtype=torch.uint8))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.OUT_OF_MEMORY, Stage.FORWARD, exc)
    assert "shape" in f.cause
    assert f.evidence["requested_bytes"] == float(2**62)
    assert f.evidence["device"] == "cpu"


# ---- stage-error ----------------------------------------------------------------------------------------


def test_unknown_value_error_keeps_type_and_text():
    exc = ValueError("my dataset returned None for index 17")
    f = explain_exception(exc, Stage.FETCH, step=2)
    check(f, Code.STAGE_ERROR, Stage.FETCH, exc)
    assert f.message == "ValueError: my dataset returned None for index 17."
    assert f.cause == CATALOG["stage-error"].cause
    assert f.fix == CATALOG["stage-error"].fix
    assert set(f.evidence) == {"exception", "message"}


def test_batchnorm_on_a_batch_of_one():
    exc = raised(lambda: nn.BatchNorm1d(4).train()(torch.randn(1, 4)))
    f = explain_exception(exc, Stage.FORWARD)
    check(f, Code.BN_SMALL_BATCH, Stage.FORWARD, exc)  # the specific code, at error severity
    assert "drop_last=True" in f.fix
    assert f.evidence["input_shape"] == [1, 4]


def test_backward_on_loss_without_graph():
    exc = raised(lambda: torch.randn(3).sum().backward())
    f = explain_exception(exc, Stage.BACKWARD)
    check(f, Code.STAGE_ERROR, Stage.BACKWARD, exc)
    assert "torch.no_grad()" in f.cause


def test_backward_on_unreduced_loss():
    exc = raised(lambda: (torch.randn(3, requires_grad=True) * 2).backward())
    f = explain_exception(exc, Stage.BACKWARD)
    check(f, Code.STAGE_ERROR, Stage.BACKWARD, exc)
    assert "loss.mean()" in f.fix


# ---- message, context, chaining, params ---------------------------------------------------------------


def test_long_messages_are_trimmed_but_evidence_keeps_all():
    exc = ValueError("x" * 2000)
    f = explain_exception(exc, Stage.FORWARD)
    assert len(f.message) < 400
    assert "..." in f.message
    assert f.evidence["message"] == "x" * 2000


def test_chained_exception_is_explained_by_its_cause():
    def fn():
        try:
            nn.Linear(100, 10)(torch.randn(64, 784))
        except RuntimeError as inner:
            raise ValueError("model step failed") from inner

    exc = raised(fn)
    f = explain_exception(exc, Stage.FORWARD)
    assert f.code == "shape-mismatch"
    assert f.message.startswith("ValueError: model step failed")
    assert "RuntimeError: mat1 and mat2" in f.message
    assert f.evidence["exception"] == "ValueError"
    assert f.evidence["caused_by"] == "RuntimeError"
    assert "784" in f.cause


def test_module_in_context_becomes_params_and_is_named():
    exc = raised(lambda: nn.Linear(100, 10)(torch.randn(64, 784)))
    f = explain_exception(exc, Stage.FORWARD, {"module": "classifier.fc"})
    assert f.params == ("classifier.fc",)
    assert f.cause.startswith("In classifier.fc: the layer expects 100")


def test_stage_may_be_a_string_or_none():
    exc = raised(lambda: nn.Linear(100, 10)(torch.randn(64, 784)))
    assert explain_exception(exc, "forward").stage is Stage.FORWARD
    f = explain_exception(exc, None)
    assert f.stage is None and f.code == "shape-mismatch"


def test_classify_returns_code_members():
    exc = raised(lambda: F.cross_entropy(torch.randn(3, 10), torch.tensor([1, 10, 3])))
    code = classify_exception(exc)
    assert isinstance(code, Code) and code is Code.TARGET_OUT_OF_RANGE
    assert classify_exception(KeyError("image")) is Code.STAGE_ERROR
    emb = raised(lambda: nn.Embedding(3, 2)(torch.tensor([5])))
    assert classify_exception(emb) is Code.STAGE_ERROR
    assert classify_exception(emb, Stage.LOSS) is Code.TARGET_OUT_OF_RANGE


_EXCEPTION_TYPES = [RuntimeError, ValueError, IndexError, TypeError, KeyError, AssertionError, MemoryError]


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(_EXCEPTION_TYPES),
    text=st.text(max_size=400),
    stage=st.none() | st.sampled_from(list(Stage)),
)
def test_never_raises_on_arbitrary_errors(kind, text, stage):
    exc = kind(text)
    f = explain_exception(exc, stage, {"input_shapes": "not a shape", "num_classes": "ten"})
    assert f.code in {c.value for c in Code}
    assert f.severity == "error"
    assert f.cause and f.fix
    assert f.evidence["exception"] == kind.__name__


def test_explain_does_not_import_widgets():
    code = (
        "import sys, tlwidgets.diagnostics.explain\n"
        "bad = [m for m in ('ipywidgets', 'bqplot', 'IPython') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env_path = {"PYTHONPATH": ":".join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env_path, timeout=120)


def test_numpy_num_classes_and_broken_str():
    np = pytest.importorskip("numpy")
    exc = raised(lambda: F.cross_entropy(torch.randn(3, 10), torch.tensor([1, 10, 3])))
    f = explain_exception(exc, Stage.LOSS, {"num_classes": np.int64(10)})
    assert "[0, 9]" in f.cause

    class Weird(RuntimeError):
        def __str__(self) -> str:
            raise TypeError("no text")

    f = explain_exception(Weird("x"), Stage.FORWARD)
    assert f.code == "stage-error"
    assert f.message.startswith("Weird")


def test_runner_style_context_is_rendered():
    """The Runner passes named input shapes and lists of parameter devices / dtypes."""
    exc = raised(lambda: nn.Linear(784, 10)(torch.randn(64, 1, 28, 28)))
    ctx = {
        "input_shapes": {"inputs": (64, 1, 28, 28)},
        "target_shape": (64,),
        "output_shape": None,
        "devices": ["cpu"],
        "dtypes": ["torch.float32"],
    }
    f = explain_exception(exc, Stage.FORWARD, ctx, step=0)
    assert "input shapes: inputs [64, 1, 28, 28]" in f.message
    assert "target shape: [64]" in f.message
    assert "output shape" not in f.message  # None values are left out
    assert "nn.Flatten()" in f.fix
    f = explain_exception(ValueError("boom"), Stage.FORWARD, ctx)
    assert "devices: cpu" in f.message and "dtypes: torch.float32" in f.message
