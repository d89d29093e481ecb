"""Explain an exception raised by user code during a training stage.

:func:`explain_exception` turns the exception into a :class:`Finding` with a
code (``shape-mismatch``, ``device-mismatch``, ``dtype-mismatch``,
``inplace-modification``, ``out-of-memory``, ``target-out-of-range``,
``bn-small-batch`` (batch norm on one value per channel) or ``stage-error``),
the original error quoted, and a cause and a fix worded for
this very error: the numbers in torch's message (feature counts, channels,
batch sizes, class indices, dtypes, devices) are parsed out and used.

The classification is driven by what each error *is*: the exception type where
it is decisive (``torch.OutOfMemoryError``, ``MemoryError``), otherwise the
families of messages that torch's kernels, ``torch.nn`` modules and autograd
produce (matched with regular expressions that tolerate the wording of older
and newer releases). Anything else is ``stage-error`` with the original type
and text kept.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tlwidgets.core.catalog import get_spec, make_finding
from tlwidgets.core.findings import Code, Finding
from tlwidgets.core.stages import Stage

__all__ = ["classify_exception", "explain_exception"]

_MAX_QUOTE = 300
_MAX_CHAIN = 5

# ``torch.OutOfMemoryError`` (alias ``torch.cuda.OutOfMemoryError``) exists since torch 2.1/1.13.
_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t
    for t in (
        MemoryError,
        getattr(torch, "OutOfMemoryError", None),
        getattr(torch.cuda, "OutOfMemoryError", None),
    )
    if isinstance(t, type)
)


# --------------------------------------------------------------------------------------------------
# small helpers


@dataclasses.dataclass
class _Diagnosis:
    """What one rule concluded: the code, specific sentences and parsed numbers."""

    code: Code
    cause: str | None = None
    fix: str | None = None
    parsed: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Err:
    """The exception as the rules see it."""

    exc: BaseException
    text: str
    stage: Stage | None
    ctx: Mapping[str, Any]

    def search(self, pattern: str, flags: int = re.IGNORECASE) -> re.Match[str] | None:
        return re.search(pattern, self.text, flags)

    def has(self, pattern: str) -> bool:
        return self.search(pattern) is not None

    @property
    def at_loss(self) -> bool:
        return self.stage is Stage.LOSS


def _ints(text: str) -> list[int]:
    """``"64, 1, 28, 28"`` -> ``[64, 1, 28, 28]``."""
    return [int(v) for v in re.findall(r"-?\d+", text)]


def _shape_of(value: Any) -> list[int] | None:
    """A shape as a list of ints, from a torch.Size / tuple / list / tensor; None otherwise."""
    shape = getattr(value, "shape", value)
    if isinstance(shape, (tuple, list, torch.Size)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in shape
    ):
        return [int(v) for v in shape]
    return None


def _fmt_shape(value: Any) -> str:
    """Format a shape, a sequence of shapes or a mapping name -> shape."""
    shape = _shape_of(value)
    if shape is not None:
        return "[" + ", ".join(str(v) for v in shape) + "]"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_fmt_shape(v)}" for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(_fmt_shape(v) for v in value)
    return str(value)


def _first_shape(value: Any) -> list[int] | None:
    """The first shape found in a shape / sequence of shapes / mapping of shapes."""
    shape = _shape_of(value)
    if shape is not None:
        return shape
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, Sequence) and not isinstance(value, str):
        for item in value:
            found = _first_shape(item)
            if found is not None:
                return found
    return None


def _fmt_mapping(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(str(v) for v in value)
    return str(value)


def _num_classes(err: _Err) -> int | None:
    """Number of classes from the context: ``num_classes`` or dim 1 of the output shape."""
    n = err.ctx.get("num_classes")
    if isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0:
        return int(n)
    out = _first_shape(err.ctx.get("output_shape"))
    if out is not None and len(out) >= 2 and out[1] > 0:
        return out[1]
    return None


_DTYPE_NAMES = {
    "double": "float64",
    "float64": "float64",
    "float": "float32",
    "float32": "float32",
    "half": "float16",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "long": "int64",
    "int64": "int64",
    "int": "int32",
    "int32": "int32",
    "short": "int16",
    "int16": "int16",
    "char": "int8",
    "int8": "int8",
    "byte": "uint8",
    "uint8": "uint8",
    "uint8_t": "uint8",
    "bool": "bool",
    "complexfloat": "complex64",
    "complexdouble": "complex128",
}


def _dtype(name: str) -> str:
    """Normalize torch's many spellings of a dtype: Double, torch.cuda.DoubleTensor, CUDAFloatType..."""
    s = name.strip().strip("'\"").lower()
    s = s.replace("torch.", "").replace("cuda.", "")
    for suffix in ("tensor", "type"):
        if s.endswith(suffix) and s != suffix:
            s = s[: -len(suffix)]
    for prefix in ("cuda", "cpu", "mps", "xpu"):
        if s.startswith(prefix) and s[len(prefix) :] in _DTYPE_NAMES:
            s = s[len(prefix) :]
    return _DTYPE_NAMES.get(s, name.strip())


def _device_of_type(name: str) -> str | None:
    """Device implied by a legacy type name: torch.cuda.FloatTensor -> cuda; 'double' -> None."""
    s = name.strip().lower()
    for dev in ("cuda", "mps", "xpu", "hip"):
        if dev in s:
            return dev
    if s.startswith("torch.") or s.startswith("cpu"):
        return "cpu"
    return None


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))


def _is_int(dtype: str) -> bool:
    return dtype.startswith(("int", "uint")) or dtype == "bool"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if n < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} EiB"  # pragma: no cover


def _bytes_of(text: str) -> float | None:
    m = re.match(r"([\d.]+)\s*([KMGTPE]?i?B)", text.strip())
    if m is None:
        return None
    unit = m.group(2).upper().replace("I", "")
    power = {"B": 0, "KB": 1, "MB": 2, "GB": 3, "TB": 4, "PB": 5, "EB": 6}.get(unit, 0)
    return float(m.group(1)) * 1024**power


def _lower_first(text: str) -> str:
    """Lower-case a leading ordinary word ("The", "A") but not an identifier ("F.one_hot", "GradScaler")."""
    if re.match(r"[A-Z][a-z]*(?=[\s,:])", text):
        return text[0].lower() + text[1:]
    return text


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _text_of(exc: BaseException) -> str:
    """``str(exc)``, even for exceptions whose ``__str__`` itself fails."""
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the original error
        return repr(getattr(exc, "args", ()))


def _quote(exc: BaseException) -> str:
    """``Type: text`` with whitespace collapsed, trimmed to about 300 characters."""
    text = " ".join(_text_of(exc).split())
    if len(text) > _MAX_QUOTE:
        text = text[: _MAX_QUOTE - 3].rstrip() + "..."
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


# --------------------------------------------------------------------------------------------------
# rules: each looks at the error and returns a diagnosis or None; the first hit wins.

_Rule = Callable[[_Err], "_Diagnosis | None"]
_RULES: list[_Rule] = []


def _rule(fn: _Rule) -> _Rule:
    _RULES.append(fn)
    return fn


# ---- out of memory ----------------------------------------------------------------------------

_OOM_TEXT = (
    r"\bout of memory\b|can'?t allocate memory|_STATUS_ALLOC_FAILED|failed to allocate \d"
    r"|not enough memory|Unable to allocate"
)


@_rule
def _out_of_memory(err: _Err) -> _Diagnosis | None:
    if not (isinstance(err.exc, _OOM_TYPES) or err.has(_OOM_TEXT)):
        return None
    parsed: dict[str, Any] = {}
    m = err.search(r"Tried to allocate ([\d.]+\s*[KMGTPE]?i?B)")
    if m:
        parsed["requested"] = m.group(1)
        parsed["requested_bytes"] = _bytes_of(m.group(1))
    m = err.search(r"tried to allocate (\d+) bytes")
    if m:
        parsed["requested_bytes"] = float(m.group(1))
        parsed["requested"] = _human_bytes(float(m.group(1)))
    m = err.search(r"total capacity of ([\d.]+\s*[KMGTPE]?i?B)") or err.search(
        r"([\d.]+\s*[KMGTPE]?i?B) total capacity"
    )
    if m:
        parsed["total"] = m.group(1)
    m = err.search(r"of which ([\d.]+\s*[KMGTPE]?i?B) is free") or err.search(r"([\d.]+\s*[KMGTPE]?i?B) free")
    if m:
        parsed["free"] = m.group(1)
    m = err.search(r"\bGPU (\d+)")
    if m:
        parsed["gpu"] = int(m.group(1))
    if err.has(r"CPUAllocator|\bCPU\b") or isinstance(err.exc, MemoryError):
        parsed["device"] = "cpu"
    elif err.has(r"\bMPS\b"):
        parsed["device"] = "mps"
    elif err.has(r"CUDA|GPU|HIP|CUBLAS|CUDNN"):
        parsed["device"] = "cuda"

    need = f" {parsed['requested']}" if "requested" in parsed else " more memory"
    free = f" with only {parsed['free']} free" if "free" in parsed else ""
    of_total = f" of {parsed['total']}" if "total" in parsed else ""
    requested_bytes = parsed.get("requested_bytes") or 0.0
    if requested_bytes >= 2**40:
        # A single request of a terabyte or more is nearly always a shape bug, not a real limit.
        return _Diagnosis(
            Code.OUT_OF_MEMORY,
            cause=f"One operation asked for{need} at once, far more than any device has, so a tensor shape "
            "is almost certainly wrong (e.g. [N, 1] broadcast against [N] into [N, N], or a huge nn.Linear).",
            fix="Print the shapes going into the failing operation and fix the one that blew up "
            "(e.g. target.view_as(output) before the loss) rather than adding memory.",
            parsed=parsed,
        )
    stage = err.stage
    if stage is Stage.TO_DEVICE:
        cause = f"Copying the batch to the device needed{need}{free}{of_total}: the batch is too large, "
        cause += "or tensors kept on the device from earlier steps are filling it."
        fix = "Reduce the batch size and keep only numbers across steps (loss.item(), not loss), "
        fix += "deleting references to old batches and outputs."
    elif stage is Stage.STEP:
        cause = f"optimizer.step() needed{need}{free}{of_total} for the optimizer state, which for Adam or "
        cause += "AdamW is two extra copies of every trainable parameter."
        fix = "Train fewer parameters (freeze the backbone), use torch.optim.SGD, "
        fix += "or reduce the model size or batch size."
    elif stage in (Stage.FORWARD, Stage.LOSS, Stage.BACKWARD):
        cause = f"The {stage.value} stage needed{need}{free}{of_total}: the activations kept for backward "
        cause += "grow with the batch size and the model size, and this batch does not fit."
        fix = "Reduce the batch size, train in mixed precision with torch.autocast, use "
        fix += "torch.utils.checkpoint for the largest blocks, and log loss.item(), not the loss tensor."
    else:
        cause = f"The stage needed{need}{free}{of_total}, more than the device had available."
        fix = None
    return _Diagnosis(Code.OUT_OF_MEMORY, cause=cause, fix=fix, parsed=parsed)


# ---- devices ----------------------------------------------------------------------------------


def _device_diag(err: _Err, a: str | None, b: str | None, parsed: dict[str, Any]) -> _Diagnosis:
    pair = f" ({a} and {b})" if a and b else ""
    if err.at_loss:
        cause = f"The loss received the model output and the targets on different devices{pair}: "
        cause += "the targets were not moved along with the inputs."
        fix = "Move the targets too, e.g. targets = targets.to(outputs.device), "
        fix += "right where the inputs are moved to the device."
    elif err.stage is Stage.FORWARD:
        cause = f"The forward pass mixed devices{pair}: the batch and the weights are on different devices "
        cause += "(often a layer replaced after model.to(device)), or forward() creates a tensor on the "
        cause += "default device."
        fix = "Call model.to(device) and inputs.to(device) with the same device, and create tensors inside "
        fix += "forward() with device=x.device (or register them as buffers)."
    elif err.stage is Stage.STEP:
        cause = f"optimizer.step() mixed devices{pair}: the model was moved after the optimizer "
        cause += "was built or its state was loaded onto another device."
        fix = "Move the model to its device before creating the optimizer, and load optimizer state with "
        fix += "torch.load(..., map_location=device)."
    else:
        cause = f"An operation received tensors on different devices{pair}."
        fix = None
    return _Diagnosis(Code.DEVICE_MISMATCH, cause=cause, fix=fix, parsed=parsed)


@_rule
def _device_mismatch(err: _Err) -> _Diagnosis | None:
    m = err.search(r"found at least two devices,? (\S+?) and (\S+?)[!.]?(?:\s|$)")
    if m:
        return _device_diag(err, m.group(1), m.group(2), {"devices": [m.group(1), m.group(2)]})
    m = err.search(r"but got (\w+) is on (\S+?),? different from other tensors on (\S+?)(?:[\s.,(]|$)")
    if m:
        parsed = {"argument": m.group(1), "devices": [m.group(2), m.group(3)]}
        return _device_diag(err, m.group(2), m.group(3), parsed)
    if err.has(r"Expected all tensors to be on the same device"):
        return _device_diag(err, None, None, {})
    # Conv layers name both sides by their legacy type: the device decides, else it is a dtype clash.
    m = err.search(r"Input type \(([^)]+)\) and (weight|bias) type \(([^)]+)\) should be the same")
    if m:
        a, b = m.group(1), m.group(3)
        da, db = _device_of_type(a), _device_of_type(b)
        if da and db and da != db:
            return _Diagnosis(
                Code.DEVICE_MISMATCH,
                cause=f"The input is on {da} but the layer's {m.group(2)} is on {db}: the model (or a layer "
                "replaced after model.to(device), such as a new head) was not moved to the input's device.",
                fix="Call model.to(device) after the last change to the model, and move every batch with "
                "inputs.to(device).",
                parsed={"devices": [da, db], "types": [a, b]},
            )
        return _dtype_diag(err, _dtype(a), _dtype(b), {"dtypes": [_dtype(a), _dtype(b)], "types": [a, b]})
    for pattern in (
        r"expected device (\S+?),? but got device (\S+?)(?:[\s.,]|$)",
        r"Expected object of device type (\w+) but got device type (\w+)",
        r"is on (\w+), but expected (?:it )?to be on (\w+)",
    ):
        m = err.search(pattern)
        if m:
            return _device_diag(err, m.group(1), m.group(2), {"devices": [m.group(1), m.group(2)]})
    m = err.search(r"can't convert (\S+) device type tensor to numpy")
    if m:
        return _Diagnosis(
            Code.DEVICE_MISMATCH,
            cause=f"A tensor on {m.group(1)} was passed to numpy, which only reads host memory.",
            fix="Copy it to the host first: t.detach().cpu().numpy() (or use t.item() for a single number).",
            parsed={"devices": [m.group(1), "cpu"]},
        )
    if err.has(
        r"not compiled with CUDA|No CUDA GPUs are available|Found no NVIDIA driver|"
        r"torch\.cuda\.is_available\(\) is False|no CUDA-capable device|MPS backend is not available|"
        r"not built with MPS"
    ):
        return _Diagnosis(
            Code.DEVICE_MISMATCH,
            cause="The code asks for a GPU device that this machine or this PyTorch build does not have.",
            fix="Choose the device at run time, e.g. device = 'cuda' if torch.cuda.is_available() else "
            "'cpu', and use .to(device) and torch.load(..., map_location=device).",
        )
    m = err.search(r"Expected a '(\w+)' device type for generator but found '(\w+)'")
    if m:
        return _Diagnosis(
            Code.DEVICE_MISMATCH,
            cause=f"A random generator on {m.group(2)} was used where one on {m.group(1)} is required, "
            "typically the DataLoader's sampler after torch.set_default_device().",
            fix=f"Pass generator=torch.Generator(device='{m.group(1)}') to the DataLoader "
            "or stop changing the default device.",
            parsed={"devices": [m.group(1), m.group(2)]},
        )
    if err.has(
        r"Placeholder storage has not been allocated on MPS|should be either on cpu or on the same device|"
        r"must be on the same device|are on different devices|on a different device"
    ):
        return _device_diag(err, None, None, {})
    return None


# ---- in-place modification --------------------------------------------------------------------


@_rule
def _inplace(err: _Err) -> _Diagnosis | None:
    if err.has(r"modified by an inplace operation"):
        parsed: dict[str, Any] = {}
        m = err.search(r"\[(?:torch\.)?([\w.]+) \[([\d, ]*)\]\]")
        if m:
            parsed["tensor_type"] = m.group(1)
            parsed["shape"] = _ints(m.group(2))
        m = err.search(r"output (\d+) of (\w+?)(?:Backward\d*)?,")
        if m:
            parsed["output_index"] = int(m.group(1))
            parsed["op"] = m.group(2)
        m = err.search(r"is at version (\d+); expected version (\d+)")
        if m:
            parsed["version"] = int(m.group(1))
            parsed["expected_version"] = int(m.group(2))
        op = parsed.get("op")
        what = f"The output of {op}" if op else "A tensor"
        shape = f" (shape {_fmt_shape(parsed['shape'])})" if "shape" in parsed else ""
        versions = ""
        if "version" in parsed:
            versions = (
                f", so it is now at version {parsed['version']} where autograd saved "
                f"version {parsed['expected_version']}"
            )
        cause = f"{what}{shape} is needed by backward() but was modified in place afterwards{versions}."
        after = f" after {op}" if op else ""
        fix = (
            f"Replace the in-place change{after} (y.mul_(...), y += ..., y[i] = ..., or a following "
            "nn.ReLU(inplace=True)) with an out-of-place one such as y = y * 2, or modify y.clone() instead."
        )
        return _Diagnosis(Code.INPLACE_MODIFICATION, cause=cause, fix=fix, parsed=parsed)
    if err.has(r"leaf Variable that requires grad is being used in an in-place operation"):
        view = err.has(r"view of a leaf")
        return _Diagnosis(
            Code.INPLACE_MODIFICATION,
            cause="A parameter or another tensor created with requires_grad=True"
            + (" (through a view or slice of it)" if view else "")
            + " was modified in place while autograd was recording, e.g. w -= lr * w.grad or w.mul_(...).",
            fix="Do manual weight updates inside `with torch.no_grad():` (or let optimizer.step() do them), "
            "and use out-of-place ops on tensors that require grad.",
            parsed={"leaf": True, "view": view},
        )
    if err.has(
        r"is a view and (?:is being|its base or another view of its base has been) modified inplace|"
        r"view was created in no_grad mode and is being modified inplace|"
        r"Inplace update to inference tensor"
    ):
        return _Diagnosis(Code.INPLACE_MODIFICATION, parsed={})
    return None


# ---- class targets and indices ------------------------------------------------------------------


def _target_diag(err: _Err, target: int | None, n: int | None, parsed: dict[str, Any]) -> _Diagnosis:
    if target is not None:
        parsed["target"] = target
    if n is not None:
        parsed["num_classes"] = n
    if target is None:
        if n is None:
            return _Diagnosis(Code.TARGET_OUT_OF_RANGE, parsed=parsed)
        cause = f"A class target is negative or not smaller than {n}, the number of classes: "
        cause += f"targets must be in [0, {n - 1}]."
        fix = f"Check targets.min() and targets.max() against [0, {n - 1}] "
        fix += "and fix the label encoding or num_classes."
        return _Diagnosis(Code.TARGET_OUT_OF_RANGE, cause=cause, fix=fix, parsed=parsed)
    if target < 0:
        cause = f"Target {target} is negative: padding or 'unknown' labels reached the loss"
        cause += f", but targets must be in [0, {n - 1}]." if n else ", but class targets must be >= 0."
        fix = f"Pass ignore_index={target} to nn.CrossEntropyLoss / nn.NLLLoss (the default only skips -100) "
        fix += "or drop those examples; check the label encoding."
        return _Diagnosis(Code.TARGET_OUT_OF_RANGE, cause=cause, fix=fix, parsed=parsed)
    if n is None:
        cause = f"Target {target} is not a valid class index for the model's output: class targets must lie "
        cause += "in [0, C - 1], where C is the final layer's out_features."
        fix = f"Set the final layer's out_features to the number of classes (at least {target + 1}) or remap "
        fix += "the labels to start at 0; check the label encoding and num_classes."
        return _Diagnosis(Code.TARGET_OUT_OF_RANGE, cause=cause, fix=fix, parsed=parsed)
    cause = f"Target {target} with {n} classes: targets must be in [0, {n - 1}]"
    if target == n:
        cause += f", so the labels are probably 1-based (1..{n}) or the final layer has one class too few."
        fix = f"Subtract 1 from 1-based labels (targets - 1) or set out_features={n + 1} on the final layer; "
        fix += "check the label encoding and num_classes."
    else:
        cause += f", but the final layer has only {n} outputs."
        fix = f"Set the final layer's out_features to the real number of classes (at least {target + 1}) or "
        fix += f"remap the labels to [0, {n - 1}]; check the label encoding and num_classes."
    return _Diagnosis(Code.TARGET_OUT_OF_RANGE, cause=cause, fix=fix, parsed=parsed)


@_rule
def _target_out_of_range(err: _Err) -> _Diagnosis | None:
    m = err.search(r"Target (-?\d+) is out of bounds")
    if m:
        return _target_diag(err, int(m.group(1)), _num_classes(err), {})
    if err.has(r"t >= 0 && t < n_classes|cur_target >= 0 && cur_target < n_classes"):
        return _target_diag(err, None, _num_classes(err), {"device_side_assert": True})
    m = err.search(r"Class values must be (smaller than num_classes|non-negative)")
    if m:
        parsed = {"negative": m.group(1) == "non-negative"}
        n = _num_classes(err)
        return _Diagnosis(
            Code.TARGET_OUT_OF_RANGE,
            cause="F.one_hot got a label that is "
            + ("negative" if parsed["negative"] else "not smaller than num_classes")
            + ", so the labels and the number of classes disagree.",
            fix="Pass num_classes equal to the number of classes"
            + (f" ({n})" if n else "")
            + " and make the labels lie in [0, num_classes - 1] (shift 1-based labels down by 1).",
            parsed=parsed,
        )
    if err.at_loss:
        m = err.search(r"index (-?\d+) is out of bounds for dimension (\d+) with size (\d+)")
        if m:
            parsed = {"dim": int(m.group(2))}
            return _target_diag(err, int(m.group(1)), int(m.group(3)), parsed)
        if err.has(r"index out of range in self|srcIndex < srcSelectDimSize"):
            return _target_diag(err, None, _num_classes(err), {})
    if err.has(r"device-side assert"):
        # CUDA reports the failed assertion asynchronously, so the op (and stage) named may be a later one.
        return _Diagnosis(
            Code.TARGET_OUT_OF_RANGE,
            cause="A CUDA kernel hit an assertion, which in training is most often a class target outside "
            "[0, num_classes - 1] in the loss or an index >= num_embeddings in nn.Embedding.",
            fix="Check targets.min() and targets.max() against the number of outputs (run one batch on the "
            "CPU or with CUDA_LAUNCH_BLOCKING=1 to see the exact op), then restart the kernel.",
            parsed={"device_side_assert": True},
        )
    return None


# ---- dtypes -----------------------------------------------------------------------------------


def _dtype_diag(err: _Err, got: str, expected: str, parsed: dict[str, Any]) -> _Diagnosis:
    """Advice for a tensor of dtype ``got`` where ``expected`` was needed (or the pair of operands)."""
    pair = f"{got} and {expected}"
    about_targets = err.at_loss or err.has(r"target")
    if _is_int(expected) and _is_float(got):
        if about_targets:
            cause = f"The class targets are {got} but nn.CrossEntropyLoss / nn.NLLLoss needs {expected} "
            cause += "class indices, so the labels were stored or converted as floats."
            fix = "Use targets.long() for class indices (or give float targets the same shape as the output "
            fix += "if they are class probabilities)."
        else:
            cause = f"Indices are {got} where {expected} is required (e.g. token ids for nn.Embedding)."
            fix = "Convert the indices with .long() where they are created."
    elif _is_float(expected) and _is_int(got):
        if about_targets:
            cause = f"The targets are {got} but this loss needs {expected} targets "
            cause += "(MSE and BCE compare values, they do not take class indices)."
            fix = f"Use targets.float() (or .to({'torch.' + expected})), e.g. for BCEWithLogitsLoss "
            fix += "targets.float().view_as(output)."
        else:
            cause = f"Integer {got} data reached a floating-point ({expected}) layer or op."
            fix = "Convert the inputs with .float() (and scale them, e.g. / 255 for uint8 images) "
            fix += "in the dataset's transform."
    elif {got, expected} == {"float64", "float32"}:
        cause = "float64 and float32 tensors met in one operation: numpy arrays become float64 tensors, "
        cause += "while torch.nn layers are float32 by default."
        fix = "Call .float() on the inputs (e.g. torch.from_numpy(x).float()) or model.double() "
        fix += "to run everything in float64."
    elif {got, expected} & {"float16", "bfloat16"}:
        cause = f"Half- and full-precision tensors were mixed ({pair}), usually from a manual .half() "
        cause += "on the model or the inputs but not both."
        fix = "Use torch.autocast(device_type, dtype=torch.float16 or torch.bfloat16) for mixed precision "
        fix += "instead of casting by hand, or convert both sides with .to(dtype)."
    else:
        cause = f"An operation received tensors of different dtypes ({pair})."
        fix = f"Convert one side so both are the same, e.g. x.to(torch.{expected})."
    parsed.setdefault("dtypes", [got, expected])
    return _Diagnosis(Code.DTYPE_MISMATCH, cause=cause, fix=fix, parsed=parsed)


@_rule
def _dtype_mismatch(err: _Err) -> _Diagnosis | None:
    # Operand pairs: "mat1 and mat2 must have the same dtype, but got Double and Float" (and older forms).
    m = err.search(r"(\w+) and (\w+) (?:must|to) have the same dtype,? but got:? (\w+) (?:and|!=) (\w+)")
    if m:
        got, expected = _dtype(m.group(3)), _dtype(m.group(4))
        parsed = {"operands": [m.group(1), m.group(2)], "dtypes": [got, expected]}
        # mat1 is the input of a linear layer, mat2 its (transposed) weight.
        if got == "float32" and expected != "float32":
            got, expected = expected, got
        return _dtype_diag(err, got, expected, parsed)
    m = err.search(r"expected (?:object of )?scalar type (\w+) but (?:found|got)(?: scalar type)? (\w+)")
    if m:
        expected, got = _dtype(m.group(1)), _dtype(m.group(2))
        return _dtype_diag(err, got, expected, {"expected": expected, "found": got})
    m = err.search(r"Found dtype (\w+) but expected (\w+)")
    if m:
        got, expected = _dtype(m.group(1)), _dtype(m.group(2))
        return _dtype_diag(err, got, expected, {"expected": expected, "found": got})
    m = err.search(r"expected target dtype to be ([\w ]+?),? but got (\w+)")
    if m:
        got = _dtype(m.group(2))
        expected = _dtype(m.group(1).split()[0])
        return _dtype_diag(err, got, expected, {"expected": expected, "found": got, "target": True})
    m = err.search(r"Expected floating point type for target with class probabilities, got (\w+)")
    if m:
        got = _dtype(m.group(1))
        return _Diagnosis(
            Code.DTYPE_MISMATCH,
            cause=f"The targets have the output's shape, so the loss reads them as class probabilities, "
            f"but they are {got} (e.g. a one-hot tensor built as integers).",
            fix="Pass class indices of shape [N] instead (targets.argmax(1)), or convert one-hot targets "
            "with targets.float().",
            parsed={"found": got, "expected": "float32"},
        )
    m = err.search(r"result type (\w+) can't be cast to the desired output type (\w+)")
    if m:
        got, into = _dtype(m.group(1)), _dtype(m.group(2))
        parsed = {"result": got, "output": into}
        if err.at_loss:
            return _dtype_diag(err, into, got, parsed)
        return _Diagnosis(
            Code.DTYPE_MISMATCH,
            cause=f"An in-place operation produced {got} values into an {into} tensor (e.g. x /= 255 "
            "on uint8 images), which cannot hold them.",
            fix="Convert first and do it out of place, e.g. x = x.float() / 255.",
            parsed=parsed,
        )
    m = err.search(r"RNN input dtype \((\S+?)\) does not match weight dtype \((\S+?)\)")
    if m:
        got, expected = _dtype(m.group(1)), _dtype(m.group(2))
        return _dtype_diag(err, got, expected, {"found": got, "expected": expected})
    m = err.search(
        r"Expected tensor for argument #\d+ '(\w+)' to have (?:one of the following )?scalar types?:? "
        r"([\w, ]+?);? but got (\S+?) instead"
    )
    if m:
        got = _dtype(m.group(3))
        expected = _dtype(m.group(2).split(",")[0])
        return _dtype_diag(err, got, expected, {"argument": m.group(1), "found": got, "expected": expected})
    m = err.search(r"\"(\w+)\" not implemented for '(\w+)'")
    if m:
        op, got = m.group(1), _dtype(m.group(2))
        parsed = {"op": op, "found": got}
        if _is_int(got):
            cause = f"The op {op} only works on floating-point tensors but received {got} data, e.g. integer "
            cause += "inputs or logits."
            fix = "Convert the tensor with .float() before it reaches the model or the loss."
        elif got in ("float16", "bfloat16"):
            cause = f"The op {op} has no {got} kernel on this device (half precision is limited on the CPU)."
            fix = "Keep the model in float32 on the CPU, and use torch.autocast for mixed precision on a GPU."
        else:
            cause = f"The op {op} does not support tensors of dtype {got}."
            fix = "Convert the tensor with .float() (or .long() for indices) before this op."
        return _Diagnosis(Code.DTYPE_MISMATCH, cause=cause, fix=fix, parsed=parsed)
    if err.has(r"only Tensors of floating point (?:and complex )?dtype can require gradients"):
        return _Diagnosis(
            Code.DTYPE_MISMATCH,
            cause="requires_grad=True was set on an integer tensor, but only floating-point tensors can "
            "have gradients.",
            fix="Create the tensor as float (dtype=torch.float32 or .float()) before setting requires_grad.",
        )
    m = err.search(
        r"could not infer output dtype\. Input dtype must be either a floating point or complex dtype\. "
        r"Got: (\w+)"
    )
    if m:
        got = _dtype(m.group(1))
        return _Diagnosis(
            Code.DTYPE_MISMATCH,
            cause=f"A mean over {got} values was taken (e.g. a loss or metric on integer tensors).",
            fix="Convert with .float() before reducing, e.g. (pred == y).float().mean().",
            parsed={"found": got},
        )
    if err.has(r"Attempting to unscale FP16 gradients"):
        return _Diagnosis(
            Code.DTYPE_MISMATCH,
            cause="GradScaler found float16 parameters: the model was converted with .half(), "
            "so there are no float32 master weights to update.",
            fix="Keep the model in float32 and get the speed-up from torch.autocast with "
            "torch.amp.GradScaler.",
        )
    if err.has(r"mixed dtype|must have the same dtype|same datatype|dtype mismatch|expected scalar type"):
        return _Diagnosis(Code.DTYPE_MISMATCH)
    return None


# ---- shapes -----------------------------------------------------------------------------------


def _linear_diag(err: _Err, rows: int, got: int, expected: int, out: int) -> _Diagnosis:
    parsed = {"mat1": [rows, got], "mat2": [expected, out], "in_features": expected, "got_features": got}
    x = _first_shape(err.ctx.get("input_shapes"))
    cause = f"The layer expects {expected} input features but receives {got}"
    fix = f"Set in_features={got} (nn.Linear({got}, {out})) or flatten/reshape the input"
    fix += f" to {expected} features"
    if x is not None and len(x) > 2 and x[-1] == got:
        cause += f": the input {_fmt_shape(x)} was not flattened"
        cause += " and nn.Linear acts on the last dimension only"
        if math.prod(x[1:]) == expected:
            fix = f"Flatten the input first with nn.Flatten() or x.flatten(1) (giving {expected} features)"
    elif err.stage is Stage.FORWARD:
        cause += ", so in_features does not match what the previous layer (or the data) produces"
    return _Diagnosis(Code.SHAPE_MISMATCH, cause=_sentence(cause), fix=_sentence(fix), parsed=parsed)


def _elementwise_diag(err: _Err, a: int, b: int, dim: int, parsed: dict[str, Any]) -> _Diagnosis:
    if err.at_loss:
        out, tgt = err.ctx.get("output_shape"), err.ctx.get("target_shape")
        shapes = ""
        if out is not None and tgt is not None:
            shapes = f" (output {_fmt_shape(out)}, target {_fmt_shape(tgt)})"
        cause = f"The prediction and the target disagree in dimension {dim} ({a} vs {b}){shapes}, "
        cause += "so the loss cannot compare them element by element."
        fix = f"Make output and target the same shape: give the final layer out_features={b} if the target "
        fix += f"has {b} values per example, or reshape the target, e.g. target.view_as(output)."
    elif err.stage is Stage.FORWARD:
        cause = "Two tensors combined elementwise in forward() (e.g. a residual add, a mask or a bias) have "
        cause += f"sizes {a} and {b} in dimension {dim}."
        fix = f"Make dimension {dim} agree on both branches: fix the layer widths, add a projection "
        fix += "(nn.Linear or a 1x1 nn.Conv2d) on the shortcut, or reshape before combining."
    else:
        cause = f"Two tensors combined elementwise have sizes {a} and {b} in dimension {dim}, "
        cause += "and neither is 1, so they cannot broadcast."
        fix = f"Reshape one of them so dimension {dim} matches ({a} or {b}), or add a dimension of size 1 "
        fix += "with unsqueeze() where broadcasting is intended."
    return _Diagnosis(Code.SHAPE_MISMATCH, cause=cause, fix=fix, parsed=parsed)


@_rule
def _shape_mismatch(err: _Err) -> _Diagnosis | None:
    m = (
        err.search(r"shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")
        or err.search(r"size mismatch, m1: \[(\d+) x (\d+)\], m2: \[(\d+) x (\d+)\]")
        or err.search(r"must have same reduction dim, but got \[(\d+), (\d+)\] X \[(\d+), (\d+)\]")
    )
    if m:
        rows, got, expected, out = (int(v) for v in m.groups())
        return _linear_diag(err, rows, got, expected, out)

    m = err.search(
        r"size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\) at non-singleton "
        r"dimension (-?\d+)"
    )
    if m:
        a, b, dim = (int(v) for v in m.groups())
        return _elementwise_diag(err, a, b, dim, {"size_a": a, "size_b": b, "dim": dim})

    m = err.search(r"Expected input batch_size \((\d+)\) to match target batch_size \((\d+)\)")
    if m:
        i, t = int(m.group(1)), int(m.group(2))
        cause = f"The model output has batch size {i} but the targets have {t}"
        if t and i % t == 0 and i != t:
            cause += f": {i} is {i // t} x {t}, so a view or reshape in forward() folded another dimension "
            cause += "into the batch (e.g. x.view(-1, n) with n too small)."
        elif i and t % i == 0 and i != t:
            cause += f": {t} is {t // i} x {i}, so the output lost part of the batch (e.g. x.view(-1, n) "
            cause += "with n too large) or the targets were flattened."
        else:
            cause += ": a reshape changed the batch dimension,"
            cause += " or the inputs and targets come from different batches."
        fix = "Flatten with x.flatten(1) or x.view(x.size(0), -1) so dimension 0 stays the batch, "
        fix += "and take inputs and targets from the same batch."
        parsed = {"input_batch": i, "target_batch": t}
        return _Diagnosis(Code.SHAPE_MISMATCH, cause=cause, fix=fix, parsed=parsed)

    m = err.search(
        r"weight of size \[([\d, ]+)\], expected input\[([\d, ]+)\] to have (\d+) channels, "
        r"but got (\d+) channels"
    )
    if m:
        weight, x = _ints(m.group(1)), _ints(m.group(2))
        expected, got = int(m.group(3)), int(m.group(4))
        parsed = {"weight_shape": weight, "input_shape": x}
        parsed.update(expected_channels=expected, got_channels=got)
        if len(x) >= 3 and x[-1] == expected and got != expected:
            cause = f"The conv expects {expected} channels in dimension 1 but the input {_fmt_shape(x)} has "
            cause += f"{got} there and {expected} in its last dimension, so it is channels-last [N, H, W, C]."
            fix = "Permute it to channels-first with x.permute(0, 3, 1, 2) (or use transforms.ToTensor(), "
            fix += "which does this for images)."
        elif got == 1 and expected == 3:
            cause = f"Grayscale (1-channel) images reached a conv that expects {expected} channels "
            cause += f"(weight {_fmt_shape(weight)}), e.g. an ImageNet-pretrained backbone."
            fix = "Repeat the channel with x.expand(-1, 3, -1, -1) or "
            fix += "transforms.Grayscale(num_output_channels=3), or replace the first conv with one that has "
            fix += "in_channels=1."
        else:
            cause = f"The conv layer (weight {_fmt_shape(weight)}) expects {expected} input channels but the "
            cause += f"input {_fmt_shape(x)} has {got}."
            fix = f"Set in_channels={got} on this conv, or make the previous layer (or the data) produce "
            fix += f"{expected} channels."
        return _Diagnosis(Code.SHAPE_MISMATCH, cause=cause, fix=fix, parsed=parsed)

    m = err.search(
        r"Expected (\d)D \(unbatched\) or (\d)D \(batched\) input to (\w+), "
        r"but got input of size: \[([\d, ]*)\]"
    )
    if m:
        unbatched, batched, op, got = int(m.group(1)), int(m.group(2)), m.group(3), _ints(m.group(4))
        cause = f"{op} expects a {batched}-D batched input (or {unbatched}-D unbatched) but got shape "
        cause += f"{_fmt_shape(got)} with {len(got)} dimensions."
        if len(got) < unbatched:
            fix = "Add the missing dimensions with x.unsqueeze(...), e.g. x.unsqueeze(1) to give grayscale "
            fix += "images their channel dimension."
        else:
            fix = "Remove the extra dimensions with x.squeeze(...) or reshape so the layout is [N, C, ...]."
        parsed = {"op": op, "input_shape": got, "expected_dims": [unbatched, batched]}
        return _Diagnosis(Code.SHAPE_MISMATCH, cause=cause, fix=fix, parsed=parsed)

    m = err.search(r"shape '\[([-\d, ]*)\]' is invalid for input of size (\d+)")
    if m:
        shape, size = _ints(m.group(1)), int(m.group(2))
        known = math.prod(v for v in shape if v != -1)
        if -1 in shape:
            cause = f"view/reshape to {_fmt_shape(shape)} needs a multiple of {known} elements but the "
            cause += f"tensor has {size}, so the hard-coded sizes do not fit this input."
        else:
            cause = f"view/reshape to {_fmt_shape(shape)} needs {known} elements but the tensor has {size}."
        x = _first_shape(err.ctx.get("input_shapes"))
        per = ""
        if x and x[0] > 0 and size % x[0] == 0:
            per = f" and size the next layer for {size // x[0]} features per example"
        fix = "Compute the size from the tensor instead of hard-coding it, e.g. x.flatten(1) or "
        fix += f"x.view(x.size(0), -1){per}."
        parsed = {"shape": shape, "numel": size, "required_multiple": known}
        return _Diagnosis(Code.SHAPE_MISMATCH, cause=cause, fix=fix, parsed=parsed)

    if err.has(r"view size is not compatible with input tensor's size and stride"):
        return _Diagnosis(
            Code.SHAPE_MISMATCH,
            cause="view() was called on a tensor whose memory is not contiguous (after permute, transpose or "
            "slicing), so the new shape cannot be a view of it.",
            fix="Use x.reshape(...) or x.contiguous().view(...) instead.",
            parsed={"non_contiguous": True},
        )

    m = err.search(
        r"target size \(torch\.Size\(\[([\d, ]*)\]\)\) (?:must be the same as|that is different to)"
        r"(?: the)? input size \(torch\.Size\(\[([\d, ]*)\]\)\)"
    )
    if m:
        tgt, out = _ints(m.group(1)), _ints(m.group(2))
        cause = "The loss needs the target and the output to have the same shape but got target "
        cause += f"{_fmt_shape(tgt)} and output {_fmt_shape(out)}."
        if out == [*tgt, 1]:
            fix = f"Use output.squeeze(-1) or target.unsqueeze(-1) so both are {_fmt_shape(out)}."
        else:
            fix = "Reshape the target with target.view_as(output), or give the final layer as many outputs "
            fix += "as there are target values per example."
        parsed = {"target_shape": tgt, "output_shape": out}
        return _Diagnosis(Code.SHAPE_MISMATCH, cause=cause, fix=fix, parsed=parsed)

    if err.has(r"(?:0D or )?1D target tensor expected, multi-target not supported"):
        tgt = _first_shape(err.ctx.get("target_shape"))
        shown = f" {_fmt_shape(tgt)}" if tgt else ""
        return _Diagnosis(
            Code.SHAPE_MISMATCH,
            cause=f"nn.CrossEntropyLoss / nn.NLLLoss got a multi-dimensional target{shown} (e.g. [N, 1] or "
            "one-hot [N, C]) where a 1-D tensor of N class indices was expected.",
            fix="Pass targets of shape [N]: targets.squeeze(1) for [N, 1], targets.argmax(1) for one-hot, or "
            "float class probabilities with exactly the output's shape.",
            parsed={"target_shape": tgt} if tgt else {},
        )

    m = err.search(r"Expected target size \[([\d, ]*)\], got \[([\d, ]*)\]")
    if m:
        expected, got = _ints(m.group(1)), _ints(m.group(2))
        return _Diagnosis(
            Code.SHAPE_MISMATCH,
            cause="For an output with extra dimensions the loss expects targets of shape "
            f"{_fmt_shape(expected)} but got {_fmt_shape(got)}, usually because the class dimension is not "
            "dimension 1.",
            fix="Put the classes in dimension 1, e.g. output.permute(0, 2, 1) for [N, L, C] outputs, or "
            "reshape to output.reshape(-1, C) and target.reshape(-1).",
            parsed={"expected_target_shape": expected, "target_shape": got},
        )

    m = err.search(r"running_mean should contain (\d+) elements not (\d+)")
    if m:
        got, expected = int(m.group(1)), int(m.group(2))
        return _Diagnosis(
            Code.SHAPE_MISMATCH,
            cause=f"A batch-norm layer was built with num_features={expected}, "
            f"but its input has {got} channels.",
            fix=f"Set num_features={got} (e.g. nn.BatchNorm2d({got})) to match the previous layer's output.",
            parsed={"num_features": expected, "got_channels": got},
        )

    m = err.search(
        r"normalized_shape=\[([\d, ]*)\], expected input with shape \[\*, ([\d, ]*)\], "
        r"but got input of size ?\[([\d, ]*)\]"
    )
    if m:
        norm, got = _ints(m.group(1)), _ints(m.group(3))
        return _Diagnosis(
            Code.SHAPE_MISMATCH,
            cause=f"nn.LayerNorm({_fmt_shape(norm)}) needs the input's last dimensions to be "
            f"{_fmt_shape(norm)} but the input is {_fmt_shape(got)}.",
            fix=f"Build it for the input's trailing size, e.g. nn.LayerNorm({got[-1] if got else norm})"
            ", or fix the layer that feeds it.",
            parsed={"normalized_shape": norm, "input_shape": got},
        )

    m = err.search(
        r"stack expects each tensor to be equal size, but got \[([\d, ]*)\] at entry (\d+) and "
        r"\[([\d, ]*)\] at entry (\d+)"
    )
    m2 = err.search(
        r"Sizes of tensors must match except in dimension (\d+)\. "
        r"Expected size (\d+) but got size (\d+) for tensor number (\d+)"
    )
    if m or m2:
        if m:
            a, b = _ints(m.group(1)), _ints(m.group(3))
            parsed: dict[str, Any] = {"shapes": [a, b], "entries": [int(m.group(2)), int(m.group(4))]}
            sizes = f"{_fmt_shape(a)} vs {_fmt_shape(b)}"
        else:
            assert m2 is not None
            parsed = {"dim": int(m2.group(1)), "expected": int(m2.group(2)), "got": int(m2.group(3))}
            sizes = f"size {m2.group(2)} vs {m2.group(3)} outside dimension {m2.group(1)}"
        if err.stage is Stage.FETCH:
            cause = f"The examples of a batch have different shapes ({sizes}), so the DataLoader cannot "
            cause += "stack them into one tensor."
            fix = "Resize or crop every example to one size in the dataset's transform (e.g. "
            fix += "transforms.Resize((224, 224))), or pad them in a custom collate_fn."
        else:
            cause = f"torch.cat / torch.stack got tensors of different shapes ({sizes})."
            fix = "Make the tensors agree in every dimension except the one being concatenated."
        return _Diagnosis(Code.SHAPE_MISMATCH, cause=cause, fix=fix, parsed=parsed)

    m = err.search(r"input\.size\(-1\) must be equal to input_size\. Expected (\d+), got (\d+)")
    if m:
        expected, got = int(m.group(1)), int(m.group(2))
        return _Diagnosis(
            Code.SHAPE_MISMATCH,
            cause=f"The recurrent layer was built with input_size={expected} but its input has {got} "
            "features in the last dimension.",
            fix=f"Set input_size={got}, and check the layout: [seq, batch, features], or [batch, seq, "
            "features] with batch_first=True.",
            parsed={"input_size": expected, "got_features": got},
        )

    if err.has(r"Kernel size can't be greater than actual input size|Output size is too small"):
        return _Diagnosis(
            Code.SHAPE_MISMATCH,
            cause="The input is too small for this conv/pool stack: after the earlier layers its spatial "
            "size is smaller than the kernel.",
            fix="Use larger inputs (e.g. transforms.Resize to the size the architecture was designed for) or "
            "remove a pooling or stride-2 layer.",
        )

    m = err.search(
        r"Dimension out of range \(expected to be in range of \[(-?\d+), (-?\d+)\], but got (-?\d+)\)"
    )
    if m:
        lo, hi, got = (int(v) for v in m.groups())
        return _Diagnosis(
            Code.SHAPE_MISMATCH,
            cause=f"An operation asked for dimension {got} of a tensor with only {hi + 1} dimension(s), "
            "usually softmax(dim=1) or argmax(1) on an output that lost its batch dimension.",
            fix="Keep the batch dimension (x.unsqueeze(0) for a single example) or use dim=-1.",
            parsed={"dim": got, "valid_range": [lo, hi]},
        )

    m = err.search(
        r"size mismatch for (\S+?): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
        r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
    )
    if m:
        name, ckpt, model = m.group(1), _ints(m.group(2)), _ints(m.group(3))
        return _Diagnosis(
            Code.SHAPE_MISMATCH,
            cause=f"The checkpoint's {name} has shape {_fmt_shape(ckpt)} but the model's is "
            f"{_fmt_shape(model)}, typically a head built for a different number of classes.",
            fix=f"Delete the mismatched entries (here {name}) from the state dict before "
            "model.load_state_dict(sd, strict=False), so the new layer keeps its own initialization.",
            parsed={"param": name, "checkpoint_shape": ckpt, "model_shape": model},
        )

    m = err.search(
        r"expanded size of the tensor \((\d+)\) must match the existing size \((\d+)\) at "
        r"non-singleton dimension (\d+)"
    )
    if m:
        a, b, dim = (int(v) for v in m.groups())
        return _elementwise_diag(err, a, b, dim, {"size_a": a, "size_b": b, "dim": dim})

    if isinstance(err.exc, (RuntimeError, ValueError, AssertionError, IndexError)) and err.has(
        r"size mismatch|shape mismatch|shapes? .{0,60}(?:do(?:es)? not|doesn't|must|should) match|"
        r"must match the size|incompatible shapes?|Expected size for first two dimensions|"
        r"expected input with shape|Expected \d+D|Expected \d+-dimensional input"
    ):
        return _Diagnosis(Code.SHAPE_MISMATCH)
    return None


# ---- other errors with a known cause (stage-error where no more specific code exists) -----------


@_rule
def _known_stage_errors(err: _Err) -> _Diagnosis | None:
    def diag(cause: str, fix: str, **parsed: Any) -> _Diagnosis:
        return _Diagnosis(Code.STAGE_ERROR, cause=cause, fix=fix, parsed=parsed)

    m = err.search(
        r"Expected more than 1 value per channel when training, got input size torch\.Size\(\[([\d, ]*)\]"
    )
    if m:  # batch norm on one value per channel: the specific code, not a generic stage-error
        return _Diagnosis(
            Code.BN_SMALL_BATCH,
            "Batch norm cannot compute batch statistics from a single example (input "
            f"{_fmt_shape(_ints(m.group(1)))}) in training mode, typically on the last, incomplete batch of "
            "the epoch.",
            "Use DataLoader(..., drop_last=True) or a larger batch, or nn.GroupNorm / nn.LayerNorm instead "
            "of batch norm.",
            {"input_shape": _ints(m.group(1))},
        )
    if err.has(r"does not require grad and does not have a grad_fn"):
        return diag(
            "The loss is not connected to any parameter that requires grad: everything is frozen, or the "
            "loss was computed under torch.no_grad() or from detached values (.detach(), .item(), numpy).",
            "Unfreeze the layers you want to train (requires_grad_(True)) and compute the loss from the "
            "model's output tensor directly, outside torch.no_grad().",
            related="nothing-trainable",
        )
    if err.has(r"backward through the graph a second time"):
        return diag(
            "backward() ran through a graph that an earlier backward() already freed, usually a hidden state "
            "or a running total carried over from the previous batch.",
            "Detach what is carried across batches (hidden = hidden.detach(), total += loss.item()) "
            "rather than passing retain_graph=True.",
        )
    if err.has(r"grad can be implicitly created only for scalar outputs"):
        return diag(
            "backward() was called on a loss that is not a single number, e.g. a loss built with "
            "reduction='none' or per-example losses.",
            "Reduce it first, e.g. loss.mean().backward(), or use the loss's default reduction='mean'.",
        )
    if err.has(r"Can't call numpy\(\) on Tensor that requires grad"):
        return diag(
            "numpy() was called on a tensor that is part of the autograd graph.",
            "Use t.detach().cpu().numpy(), or t.item() for a single number.",
        )
    m = err.search(r"a Tensor with (\d+) elements cannot be converted to Scalar")
    if m:
        return diag(
            f".item() or float() was called on a tensor with {m.group(1)} elements, e.g. an unreduced loss.",
            "Reduce the tensor first (loss.mean().item()) or index a single element.",
            numel=int(m.group(1)),
        )
    if err.has(r"Boolean value of Tensor with more than one value is ambiguous"):
        return diag(
            "A tensor with several elements was used in an if or while condition.",
            "Reduce it to one value with .any(), .all() or .item() before testing it.",
        )
    if err.has(r"Inference tensors cannot be saved for backward"):
        return diag(
            "Tensors created under torch.inference_mode() (e.g. cached features or a batch) were used in a "
            "computation that needs gradients.",
            "Create them under torch.no_grad() instead, or pass t.clone() to the trained part.",
        )
    if err.has(r"index out of range in self|srcIndex < srcSelectDimSize"):
        return diag(
            "An index given to nn.Embedding (or index_select) is negative or not smaller than "
            "num_embeddings, so the ids go beyond the embedding table.",
            "Set num_embeddings to the largest id + 1 (e.g. len(vocab)) and map unknown or padding ids "
            "into that range.",
        )
    m = err.search(r"index (-?\d+) is out of bounds for dimension (\d+) with size (\d+)")
    if m:
        index, dim, size = (int(v) for v in m.groups())
        where = "The dataset was indexed" if err.stage is Stage.FETCH else "A tensor was indexed"
        return diag(
            f"{where} at {index} in dimension {dim}, which only has {size} entries (valid 0 to {size - 1}).",
            "Check the index arithmetic (and the Dataset's __len__ against __getitem__) so it stays below "
            "the size.",
            index=index,
            dim=dim,
            size=size,
        )
    if err.has(r"Can't (?:pickle|get) (?:local object|attribute)|Can't get attribute"):
        return diag(
            "DataLoader worker processes could not load a function or class defined in the notebook (or "
            "inside a function), which happens with num_workers > 0 when workers are spawned.",
            "Move the Dataset, transforms and collate_fn into an importable .py module, or use "
            "num_workers=0.",
        )
    m = err.search(r"DataLoader worker \(pid\(?s?\)? ?[\d, ]*\) (?:is killed by signal|exited unexpectedly)")
    if m:
        return diag(
            "A DataLoader worker process died, usually killed for using too much host memory or because "
            "shared memory (/dev/shm) is too small.",
            "Rerun with num_workers=0 to see the real error, then lower num_workers or the batch size, or "
            "give the container more shared memory.",
        )
    m = err.search(r"batch must contain tensors, numpy arrays, numbers, dicts or lists; found (.+?)$")
    if m:
        return diag(
            f"The dataset returns items that cannot be batched ({m.group(1).strip()}), e.g. PIL images "
            "without a tensor transform.",
            "Add transforms.ToTensor() (or torch.as_tensor) in the dataset, or pass a custom collate_fn.",
            found=m.group(1).strip(),
        )
    return None


# --------------------------------------------------------------------------------------------------
# public API


def _diagnose(
    exc: BaseException, stage: Stage | None, ctx: Mapping[str, Any]
) -> tuple[_Diagnosis, BaseException]:
    """First rule that matches ``exc`` (or a chained exception); returns it and the exception it matched."""
    seen: set[int] = set()
    current: BaseException | None = exc
    for _ in range(_MAX_CHAIN):
        if current is None or id(current) in seen:
            break
        seen.add(id(current))
        err = _Err(current, " ".join(_text_of(current).split()), stage, ctx)
        for rule in _RULES:
            found = rule(err)
            if found is not None:
                return found, current
        # Wrapped errors (``raise ValueError(...) from e`` or an error while handling one): look inside.
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return _Diagnosis(Code.STAGE_ERROR), exc


def classify_exception(exc: BaseException, stage: Stage | str | None = None) -> Code:
    """The finding code of an exception raised by user code.

    Parameters
    ----------
    exc
        The exception.
    stage
        The stage it was raised at, when known: an index error such as
        ``"index out of range in self"`` is a class target out of range only at
        ``LOSS`` (elsewhere it is an embedding / indexing error, ``stage-error``).

    Returns
    -------
    Code
        One of ``SHAPE_MISMATCH``, ``DEVICE_MISMATCH``, ``DTYPE_MISMATCH``,
        ``INPLACE_MODIFICATION``, ``OUT_OF_MEMORY``, ``TARGET_OUT_OF_RANGE``,
        ``BN_SMALL_BATCH`` or ``STAGE_ERROR``.
    """
    return _diagnose(exc, Stage(stage) if stage is not None else None, {})[0].code


_CONTEXT_KEYS: dict[Code, tuple[str, ...]] = {
    Code.SHAPE_MISMATCH: ("input_shapes", "output_shape", "target_shape"),
    Code.TARGET_OUT_OF_RANGE: ("num_classes", "output_shape", "target_shape"),
    Code.DEVICE_MISMATCH: ("devices",),
    Code.DTYPE_MISMATCH: ("dtypes",),
    Code.OUT_OF_MEMORY: ("input_shapes", "devices"),
    Code.INPLACE_MODIFICATION: (),
    Code.BN_SMALL_BATCH: ("input_shapes",),
    Code.STAGE_ERROR: ("input_shapes", "output_shape", "target_shape", "devices", "dtypes", "num_classes"),
}

_CONTEXT_LABELS = {
    "input_shapes": ("input shapes", _fmt_shape),
    "output_shape": ("output shape", _fmt_shape),
    "target_shape": ("target shape", _fmt_shape),
    "devices": ("devices", _fmt_mapping),
    "dtypes": ("dtypes", _fmt_mapping),
    "num_classes": ("num_classes", str),
}


def _context_line(code: Code, ctx: Mapping[str, Any]) -> str:
    parts = []
    for key in _CONTEXT_KEYS.get(code, ()):
        value = ctx.get(key)
        if value is None or (isinstance(value, (Mapping, list, tuple)) and len(value) == 0):
            continue
        label, fmt = _CONTEXT_LABELS[key]
        parts.append(f"{label}: {fmt(value)}")
    return "; ".join(parts)


def explain_exception(
    exc: BaseException,
    stage: Stage | str | None,
    context: Mapping[str, Any] | None = None,
    *,
    step: int | None = None,
) -> Finding:
    """A plain-words finding for an exception raised by user code during a stage.

    Parameters
    ----------
    exc
        The exception the model, loss or data code raised.
    stage
        The stage that was running.
    context
        What the stage knew, all optional: ``"input_shapes"`` (a shape, a list of
        shapes or a mapping name -> shape), ``"target_shape"``, ``"output_shape"``,
        ``"devices"``, ``"dtypes"`` (mappings name -> device / dtype),
        ``"num_classes"`` and ``"module"`` (name of the module that raised; it
        becomes the finding's ``params``).
    step
        Global step at which it happened.

    Returns
    -------
    Finding
        Code from :func:`classify_exception` (error severity), a message quoting
        the original error (``Type: text``, trimmed) plus what the context
        shows, a cause and a fix specific to this error, and
        ``evidence={"exception", "message", **parsed numbers}``.
    """
    ctx: Mapping[str, Any] = context if context is not None else {}
    st = Stage(stage) if stage is not None else None
    diagnosis, matched = _diagnose(exc, st, ctx)

    message = _sentence(_quote(exc))
    if matched is not exc:
        message += f" Caused by {_sentence(_quote(matched))}"
    extra = _context_line(diagnosis.code, ctx)
    if extra:
        message += f" ({extra})"

    evidence: dict[str, Any] = {"exception": type(exc).__name__, "message": _text_of(exc)}
    if matched is not exc:
        evidence["caused_by"] = type(matched).__name__
        evidence["caused_by_message"] = _text_of(matched)
    for key, value in diagnosis.parsed.items():
        evidence.setdefault(key, value)

    module = ctx.get("module")
    params = (module,) if isinstance(module, str) and module else ()
    cause = diagnosis.cause
    if params:
        base = cause if cause is not None else get_spec(diagnosis.code).cause
        cause = f"In {params[0]}: {_lower_first(base)}"
    return make_finding(
        diagnosis.code,
        message,
        severity="error",  # the stage failed (codes such as bn-small-batch default to a warning)
        step=step,
        stage=st,
        params=params,
        evidence=evidence,
        cause=cause,
        fix=diagnosis.fix,
    )
