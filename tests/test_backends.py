"""Every fused backend (Triton, CUDA) against the reference backend, on fresh random inputs.

One suite for all backends. A test takes a ``target``, a backend on a device:

* ``triton-cpu``: the Triton kernels on CPU tensors through Triton's interpreter (without CUDA,
  tests/conftest.py sets TRITON_INTERPRET=1; about a millisecond per program, so its shapes stay small);
* ``triton-cuda`` and ``cuda-cuda``: the Triton kernels and the compiled extension on CUDA tensors
  (marked ``gpu``: ``pytest -m gpu tests/test_backends*.py`` on the GPU machine).

Cases marked ``gpu`` as well (large blocks, the full grid of dtype combinations, unaligned views) run
only on the CUDA targets. Every step runs on buffers that are views into larger ones whose guard
bands hold ``POISON`` and must stay untouched, and is judged against the reference step on the same
inputs and against an fp64 evaluation of the documented update (``adamw_fp64``), with the bounds of
``TOLERANCES`` (one entry per backend and output dtype):

* fp32 outputs: per element within ``terms_rtol`` of the reference relative to the sum of the
  magnitudes of the terms the element is computed from (a cancellation in w - update or
  beta1 m + (1 - beta1) g is judged against what cancelled, as rounding errors are), and within
  ``rtol`` / ``atol`` of the reference (``torch.testing.assert_close``);
* bf16 / fp16 outputs (flash-attention's bar): the error against the fp64 result no worse than
  ``oracle_factor`` times the reference's own low-precision error; per element at most one unit in
  the last place from the reference (plus ``ulp_slack`` times the terms: fp32 noise where a result
  cancels to nearly zero); at most ``max_differ`` of the elements different at all;
* stochastic rounding (bf16 params without a master): every result within one ulp of the fp32
  value, at most ``max_not_neighbour`` of them not one of its two bf16 neighbours, and the mean
  over many seeds that value within 5 standard deviations of the rounding noise;
* the gradient norm: ``norm_rtol`` / ``norm_atol``.

The special cases live in small files of their own: CUDA graph capture (test_backends_graph.py),
the registered CUDA ops under torch.compile and their argument checks (test_backends_compile.py),
loading and building the extension (test_backends_build.py).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional

import pytest
import torch

from badam_kernels import ops
from badam_kernels.ops import cuda as cuda_backend
from badam_kernels.ops import reference
from badam_kernels.ops import triton_adamw
from badam_kernels.ops.interface import Backend

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
TENSORS = ("param", "grad", "master", "exp_avg", "exp_avg_sq", "step")
OUTPUTS = ("param", "master", "exp_avg", "exp_avg_sq")
GUARD = 37  # elements of POISON after each buffer (and `offset` before it)
POISON = -777.0  # a value no step writes
BLOCK_PAD = 2048  # the largest tile of any backend: the last one reaches at most this far beyond the end


# ----------------------------------------------------------------------------------------------------
# Targets: a backend on a device
# ----------------------------------------------------------------------------------------------------


class Target(NamedTuple):
    backend: str
    device: torch.device

    @property
    def module(self) -> Backend:
        return ops.load_backend(self.backend)


def triton_interpreting() -> bool:
    """Whether the Triton kernels run on CPU tensors here (through the interpreter)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and triton_adamw.supports_device("cpu")


TRITON_TARGETS = [
    pytest.param(("triton", "cpu"), id="triton-cpu",
                 marks=pytest.mark.skipif(not triton_interpreting(), reason="TRITON_INTERPRET is not 1")),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]
TARGETS = TRITON_TARGETS + [pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=TARGETS)
def target(request) -> Target:
    backend, device = request.param
    if ops.load_backend(backend) is None:
        reason = ops.backend_report()[backend]
        if backend == "triton":  # triton is optional; the compiled extension must load on a GPU machine
            pytest.skip(reason)
        pytest.fail(f"the {backend} backend did not load: {reason}")
    return Target(backend, torch.device(device))


def gpu_case(*values, id):
    """A case too large or too many for the interpreter: the CUDA targets only."""
    return pytest.param(*values, id=id, marks=pytest.mark.gpu)


def _short(dtype: torch.dtype) -> str:
    return {BF16: "bf16", FP16: "fp16", FP32: "fp32"}[dtype]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------
# The tolerance table
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tol:
    """How close a backend's output of one dtype must be to the reference's; None: not checked."""

    terms_rtol: Optional[float] = None  # fp32: |out - ref| <= terms_rtol * (sum of |terms|)
    rtol: Optional[float] = None  # fp32: torch.testing.assert_close(out, ref, rtol, atol)
    atol: float = 0.0
    oracle_factor: Optional[float] = None  # low precision: max error vs fp64 <= this * the reference's
    ulp_slack: float = 0.0  # low precision: |out - ref| <= ulp(ref) + ulp_slack * (sum of |terms|)
    max_differ: Optional[float] = None  # low precision: fraction of the elements that differ at all


# The bounds each backend was proven against. A check a backend has no number for was not run on a
# GPU with it yet: fill it in (tighter) after a GPU run passes with it, never loosen one.
_TRITON_LOW = Tol(oracle_factor=2.0, ulp_slack=1e-6, max_differ=0.01)
_CUDA_LOW = Tol(max_differ=0.01)
TOLERANCES: Dict[str, Dict[torch.dtype, Tol]] = {
    "triton": {FP32: Tol(terms_rtol=1e-6), BF16: _TRITON_LOW, FP16: _TRITON_LOW},
    "cuda": {FP32: Tol(rtol=1e-5, atol=1e-7), BF16: _CUDA_LOW, FP16: _CUDA_LOW},
}
# the gradient norm against the reference's, and (where clipping is tested) against the fp64 norm
NORM_TOL = {"triton": dict(rtol=1e-5, atol=0.0), "cuda": dict(rtol=2e-5, atol=1e-6)}
NORM_VS_FP64 = {"triton": 1e-6, "cuda": None}
MAX_NOT_NEIGHBOUR = {"triton": 1e-3, "cuda": 1e-3}  # stochastic rounding (see the module docstring)


# ----------------------------------------------------------------------------------------------------
# Inputs, the fp64 oracle and the comparisons
# ----------------------------------------------------------------------------------------------------


def make_block(n, param_dtype, has_master, state_dtype, device, step=5.0, grad_scale=1.0, grad_dtype=None,
               exp_avg_sq_dtype=None, offset=0, guard=GUARD) -> Dict:
    """A block's buffers with random, non-zero values, as they are mid-training.

    Each buffer is a view at ``offset`` into a larger one whose other elements (``offset`` before,
    ``guard`` after) hold POISON. ``state_dtype`` is exp_avg's dtype (and exp_avg_sq's unless
    ``exp_avg_sq_dtype`` is given), ``grad_dtype`` defaults to the param dtype.
    """
    w = torch.randn(n, device=device)
    g = torch.randn(n, device=device) * 0.5
    g = torch.where(g.abs() < 1e-3, torch.full_like(g, 1e-3), g) * grad_scale
    m = 0.1 * torch.randn(n, device=device)
    v = (0.1 * torch.randn(n, device=device)) ** 2 + 1e-4
    values = dict(
        param=w.to(param_dtype),
        grad=g.to(grad_dtype or param_dtype),
        master=w.clone() if has_master else None,
        exp_avg=m.to(state_dtype),
        exp_avg_sq=v.to(exp_avg_sq_dtype or state_dtype),
    )
    block = {name: None if t is None else _guarded(t, offset, guard) for name, t in values.items()}
    block["step"] = torch.tensor([step], device=device)
    return block


def _guarded(t: torch.Tensor, offset: int, guard: int) -> torch.Tensor:
    base = torch.full((offset + t.numel() + guard,), POISON, dtype=t.dtype, device=t.device)
    view = base[offset:offset + t.numel()]
    view.copy_(t)
    return view


def copy_block(block: Dict) -> Dict:
    """The buffers copied into new storage of the same layout (offset and guard bands included)."""
    out = {}
    for name, t in block.items():
        if t is None or t._base is None:
            out[name] = None if t is None else t.clone()
        else:
            out[name] = t._base.clone()[t.storage_offset():t.storage_offset() + t.numel()]
    return out


def clone_block(block: Dict) -> Dict:
    """Plain contiguous copies (for the reference)."""
    return {k: (None if t is None else t.clone()) for k, t in block.items()}


def assert_guards_untouched(block: Dict) -> None:
    for name, t in block.items():
        if t is None or t._base is None:
            continue
        start, end = t.storage_offset(), t.storage_offset() + t.numel()
        guard = torch.cat([t._base[:start], t._base[end:]])
        assert (guard == torch.tensor(POISON, dtype=t.dtype, device=t.device)).all(), f"{name}: wrote out of bounds"


def run(backend: str, block: Dict, **kwargs):
    kwargs = {**HYPER, **kwargs}
    return ops.adamw_step(*(block[k] for k in TENSORS), backend=backend, **kwargs)


def adamw_fp64(block: Dict, lr, betas, eps, weight_decay, decay_numel=None, grad_scale=None,
               max_grad_norm=None, **_) -> Dict:
    """The documented update evaluated in fp64 from the stored inputs: the ground truth of errors.

    Also returns, per output, the magnitude its rounding errors scale with: the sum of the absolute
    values of the terms it is computed from (``scale_*``), which is what a cancellation is relative to.
    """
    beta1, beta2 = betas
    lr = float(lr)
    grad_scale = None if grad_scale is None else float(grad_scale)
    w = (block["master"] if block["master"] is not None else block["param"]).double()
    g = block["grad"].double() / (grad_scale or 1.0)
    m, v = block["exp_avg"].double(), block["exp_avg_sq"].double()
    t = float(block["step"]) + 1.0
    if max_grad_norm is not None:
        g = g * min(1.0, max_grad_norm / (float(g.norm()) + 1e-6))
    decay_numel = w.numel() if decay_numel is None else decay_numel
    w[:decay_numel] *= 1.0 - lr * weight_decay
    scale_m = (beta1 * m).abs() + ((1.0 - beta1) * g).abs()
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    step_size = lr / (1.0 - beta1**t)
    denom = v.sqrt() / math.sqrt(1.0 - beta2**t) + eps
    scale_w = w.abs() + step_size * scale_m / denom
    w = w - step_size * m / denom
    return dict(param=w, master=w, exp_avg=m, exp_avg_sq=v,
                scale_param=scale_w, scale_master=scale_w, scale_exp_avg=scale_m, scale_exp_avg_sq=v)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of ``dtype`` at the magnitude of x (fp64; subnormals: their spacing)."""
    bits = {BF16: 8, FP16: 11, FP32: 24}[dtype]
    _, exponent = torch.frexp(x.double())
    smallest = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the spacing of the subnormals
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - bits).clamp_min(smallest)


def assert_fp32_close(name, out, ref, scale, tol: Tol, terms_rtol=None):
    """``terms_rtol`` replaces the table's bound where the backend has one."""
    if tol.terms_rtol is not None:
        terms_rtol = terms_rtol or tol.terms_rtol
        err = (out.double() - ref.double()).abs()
        bad = err > terms_rtol * scale
        assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements off, worst error "
                               f"{float((err / scale).max()):.3g} (relative to the terms) at {int((err / scale).argmax())}")
    if tol.rtol is not None:
        torch.testing.assert_close(out, ref, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{name}: {m}")


def assert_low_precision_close(name, out, ref, exact, scale, tol: Tol):
    """flash-attention's bar against the fp64 result, and per element at most one ulp from the reference."""
    if tol.oracle_factor is not None:
        out_err = float((out.double() - exact).abs().max())
        ref_err = float((ref.double() - exact).abs().max())
        assert out_err <= tol.oracle_factor * ref_err + 1e-12, f"{name}: error {out_err:.3g} vs the reference's {ref_err:.3g}"
    diff = (out.double() - ref.double()).abs()
    off = diff > ulp(ref, ref.dtype) * 1.001 + tol.ulp_slack * scale
    assert not off.any(), f"{name}: {int(off.sum())} elements more than one ulp from the reference"
    if tol.max_differ is not None:
        differ = (diff > 0).double().mean().item()
        assert differ <= tol.max_differ, f"{name}: {differ:.2%} of the elements differ"


def bf16_neighbours(x32: torch.Tensor):
    """The bf16 values below and above (in magnitude) each fp32 value, as fp32."""
    down = x32.contiguous().view(torch.int32) & -65536
    return down.view(FP32), (down + 65536).view(FP32)


def assert_stochastically_rounded(param: torch.Tensor, w: torch.Tensor, max_not_neighbour: float):
    """Each bf16 result is within one ulp of the fp32 value w, and (bar rare fp32 differences of w)
    one of its two bf16 neighbours."""
    r = param.float()
    ok = (r.double() - w.double()).abs() <= ulp(w, BF16) * 1.0001
    assert ok.all(), f"{int((~ok).sum())} stochastically rounded values are farther than one ulp from w"
    down, up = bf16_neighbours(w)
    neighbour = torch.where(down == w, r == down, (r == down) | (r == up))
    other = 1.0 - neighbour.double().mean().item()
    assert other <= max_not_neighbour, f"{other:.3%} of the elements are not a neighbour of their fp32 value"


def check_against_reference(target: Target, block: Dict, terms_rtol=None, **kwargs):
    """The target's step on a copy of ``block`` (same layout), the reference's on a plain copy; every
    output compared by the tolerance table. Returns (out, ref, the target's norm); ``block`` is kept."""
    out, ref = copy_block(block), clone_block(block)
    norm_out = run(target.backend, out, **kwargs)
    norm_ref = run("reference", ref, **kwargs)
    assert_guards_untouched(out)
    tol = TOLERANCES[target.backend]
    assert (norm_out is None) == (norm_ref is None)
    if norm_ref is not None:
        assert norm_out.shape == () and norm_out.dtype == FP32
        torch.testing.assert_close(norm_out, norm_ref, **NORM_TOL[target.backend])
    assert torch.equal(out["step"], ref["step"]), (out["step"], ref["step"])
    if torch.equal(ref["step"], block["step"]):  # the reference skipped the step: nothing may change
        for name in TENSORS:
            if block[name] is not None:
                assert torch.equal(out[name].view(torch.uint8), block[name].view(torch.uint8)), f"{name} changed"
        return out, ref, norm_out

    exact = adamw_fp64(block, **{**HYPER, **kwargs})
    stochastic = block["master"] is None and block["param"].dtype == BF16
    for name in OUTPUTS:
        if ref[name] is None:
            continue
        assert out[name].dtype == ref[name].dtype
        scale = exact["scale_" + name]
        if ref[name].dtype == FP32:
            # every element is written: the reference changes (nearly) each one, so an element the
            # kernel leaves untouched differs from it (one it does not change needs no write)
            assert (ref[name] != block[name]).float().mean() > 0.999, f"{name}: the inputs are too weak"
            assert_fp32_close(name, out[name], ref[name], scale, tol[FP32], terms_rtol)
        elif name == "param" and stochastic:
            continue  # checked against the fp32 w below
        else:
            assert_low_precision_close(name, out[name], ref[name], exact[name], scale, tol[ref[name].dtype])
    if out["master"] is not None and out["param"].dtype != FP32:
        assert torch.equal(out["param"], out["master"].to(out["param"].dtype)), "param is not master rounded"
    if stochastic:  # the reference draws other noise: compare with its fp32 result before rounding
        w = clone_block(block)
        w["master"] = w["param"].float()
        run("reference", w, **kwargs)
        assert_stochastically_rounded(out["param"], w["master"], MAX_NOT_NEIGHBOUR[target.backend])
    return out, ref, norm_out


# ----------------------------------------------------------------------------------------------------
# The fused AdamW step
# ----------------------------------------------------------------------------------------------------

SIZES = [1, 1000, 4099, 70001]  # none a multiple of the Triton block (2048)
PARAM_CASES = [  # (param dtype, fp32 master)
    (BF16, True),
    (BF16, False),  # stochastic rounding
    (FP16, True),
    (FP32, True),
    (FP32, False),  # updated in place
]
PARAM_IDS = [f"{_dtype_id(p)}-{'master' if m else 'nomaster'}" for p, m in PARAM_CASES]
STATE_DTYPES = [FP32, BF16]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("param_dtype,has_master", PARAM_CASES, ids=PARAM_IDS)
def test_step_matches_reference_for_every_dtype_and_size(target, n, param_dtype, has_master, state_dtype):
    block = make_block(n, param_dtype, has_master, state_dtype, target.device)
    check_against_reference(target, block, decay_numel=(2 * n) // 3, grad_scale=2.0, check_finite=True, seed=7)


def _every_dtype_combination():
    for param in (BF16, FP16, FP32):
        for grad in (BF16, FP16, FP32):
            for master in (True, False):
                if param == FP16 and not master:
                    continue  # fp16 params need a master (checked by the interface)
                for m in (FP32, BF16):
                    for v in (FP32, BF16):
                        yield gpu_case(param, grad, master, m, v,
                                       id=f"p{_short(param)}-g{_short(grad)}-{'master' if master else 'nomaster'}"
                                          f"-m{_short(m)}-v{_short(v)}")


@pytest.mark.parametrize("n, offset", [(7, 0), (4099, 0), (4099, 3), (65536, 1)])
@pytest.mark.parametrize("param_dtype, grad_dtype, has_master, m_dtype, v_dtype", list(_every_dtype_combination()))
def test_step_matches_reference_for_every_dtype_combination_and_offset(target, n, offset, param_dtype, grad_dtype,
                                                                        has_master, m_dtype, v_dtype):
    """Params, grads, m and v each in any dtype, also in buffers at odd (unaligned) offsets."""
    block = make_block(n, param_dtype, has_master, m_dtype, target.device, grad_dtype=grad_dtype,
                       exp_avg_sq_dtype=v_dtype, offset=offset)
    check_against_reference(target, block, lr=1e-2, decay_numel=n // 3 + 1, max_grad_norm=None, check_finite=True,
                            seed=3)


@pytest.mark.parametrize("n", [gpu_case(n, id=str(n)) for n in (1, 8, 15, 16, 17, 1000, 3 * 2**20 + 5)])
@pytest.mark.parametrize("param_dtype, has_master", [(BF16, True), (FP32, False), (BF16, False)],
                         ids=["bf16-master", "fp32-nomaster", "bf16-nomaster"])
def test_step_matches_reference_at_odd_sizes(target, n, param_dtype, has_master):
    """Sizes around a vector width, and one of several grid-stride rounds."""
    block = make_block(n, param_dtype, has_master, FP32, target.device)
    check_against_reference(target, block, lr=3e-3, decay_numel=n, seed=11)


@pytest.mark.parametrize("param_dtype,grad_dtype", [(BF16, FP32), (FP32, BF16)],
                         ids=["bf16-param-fp32-grad", "fp32-param-bf16-grad"])
def test_grads_in_another_dtype_than_the_params(target, param_dtype, grad_dtype):
    block = make_block(4099, param_dtype, True, FP32, target.device, grad_dtype=grad_dtype)
    check_against_reference(target, block, max_grad_norm=10.0)


@pytest.mark.parametrize("n, decay_numel, offset", [
    *[pytest.param(4099, d, 0, id=f"4099-{d}") for d in (0, 1, 2047, 2048, 2049, 4098, 4099)],
    *[gpu_case(5000, d, offset, id=f"5000-{d}-offset{offset}") for d in (0, 1, 8, 1003, 5000) for offset in (0, 5)],
])
def test_weight_decay_covers_exactly_the_first_decay_numel_elements(target, n, decay_numel, offset):
    block = make_block(n, BF16, True, FP32, target.device, offset=offset)
    out, ref, _ = check_against_reference(target, block, decay_numel=decay_numel, weight_decay=0.5, lr=0.1)
    # the boundary itself: the decayed prefix and the rest differ from an update without decay
    plain = copy_block(block)
    run(target.backend, plain, weight_decay=0.0, lr=0.1)
    decayed = (out["master"] != plain["master"])
    assert decayed[:decay_numel].all() and not decayed[decay_numel:].any()


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("scale, n, param_dtype, grad_dtype, lr, max_grad_norm", [
    pytest.param(1024.0, 4099, FP16, FP16, 1e-2, 1e3, id="1024-fp16"),
    *[gpu_case(s, 10_001, BF16, FP16, 1e-3, 1.0, id=f"{s:g}-bf16-fp16-grad") for s in (1.0, 1024.0, 3.0)],
])
def test_grad_scale_divides_the_grads(target, as_tensor, scale, n, param_dtype, grad_dtype, lr, max_grad_norm):
    block = make_block(n, param_dtype, True, FP32, target.device, grad_scale=scale, grad_dtype=grad_dtype)
    grad_scale = torch.tensor(scale, device=target.device) if as_tensor else scale
    check_against_reference(target, block, lr=lr, grad_scale=grad_scale, max_grad_norm=max_grad_norm)


def _found_inf(kind, value, device):
    return {"tensor": lambda: torch.full((1,), value, device=device), "float": lambda: value,
            "bool-tensor": lambda: torch.full((), bool(value), dtype=torch.bool, device=device)}[kind]()


@pytest.mark.parametrize("kind, value, has_master, kwargs", [
    pytest.param("tensor", 1.0, True, {}, id="tensor-1-master"),
    pytest.param("float", 1.0, True, {}, id="float-1-master"),
    pytest.param("bool-tensor", 1.0, True, {}, id="bool-tensor-1-master"),
    pytest.param("tensor", 0.0, False, dict(seed=3), id="tensor-0-nomaster"),
    *[gpu_case("tensor", value, master, dict(grad_scale="tensor-2"),
               id=f"tensor-{value:g}-{'master' if master else 'nomaster'}-scaled")
      for value in (0.0, 1.0, float("nan")) for master in (True, False)],
])
def test_found_inf_skips_the_step_and_keeps_step(target, kind, value, has_master, kwargs):
    """found_inf != 0 (also NaN) skips the step: nothing changes, step included; found_inf == 0 steps."""
    device = target.device
    block = make_block(4099, BF16, has_master, FP32, device)
    if kwargs.get("grad_scale") == "tensor-2":
        kwargs = {**kwargs, "grad_scale": torch.tensor(2.0, device=device)}
    out, _, _ = check_against_reference(target, block, found_inf=_found_inf(kind, value, device), **kwargs)
    skipped = value != 0.0
    for name in TENSORS:
        if block[name] is not None and name != "grad":
            assert torch.equal(out[name], block[name]) == skipped, name


@pytest.mark.parametrize("n, clip_ratio, param_dtype, has_master, check_finite", [
    *[pytest.param(70001, ratio, p, m, True, id=f"{name}-{pid}")
      for ratio, name in ((0.3, "clipped"), (3.0, "under-the-limit"))
      for p, m, pid in ((BF16, True, "bf16-master"), (FP32, False, "fp32"))],
    # clips hard, clips, never: the limits 0.05, 1 and 1e6 against a norm of 31.6
    *[gpu_case(100_003, ratio, p, m, False, id=f"ratio{ratio:g}-{pid}-nocheck")
      for ratio in (1.6e-3, 3.2e-2, 3.2e4)
      for p, m, pid in ((BF16, True, "bf16-master"), (FP32, False, "fp32"), (BF16, False, "bf16-nomaster"))],
])
def test_clipping_by_the_global_norm(target, n, clip_ratio, param_dtype, has_master, check_finite):
    block = make_block(n, param_dtype, has_master, FP32, target.device, grad_scale=4.0)
    true_norm = float((block["grad"].double() / 4.0).norm())
    # the clipping factor carries the error of each backend's norm into g: the reference's (torch's
    # fp32 vector_norm) is off by up to ~2e-6 here, so the states agree to 4e-6 rather than 1e-6
    _, _, norm = check_against_reference(target, block, terms_rtol=4e-6, grad_scale=4.0,
                                         max_grad_norm=clip_ratio * true_norm, check_finite=check_finite)
    assert norm is not None and norm.dim() == 0 and norm.dtype == FP32
    if NORM_VS_FP64[target.backend] is not None:  # Triton: per-lane fp32 sums, then a tree
        assert abs(float(norm) - true_norm) <= NORM_VS_FP64[target.backend] * true_norm


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf arithmetic
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", [0, 2048, 4098], ids=["first", "tile-start", "last"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["check", "check+clip"])
@pytest.mark.parametrize("state_dtype", [pytest.param(BF16, id="bf16-states"), gpu_case(FP32, id="fp32-states")])
def test_nonfinite_grads_change_nothing(target, bad, where, clip, state_dtype):
    block = make_block(4099, BF16, True, state_dtype, target.device)
    block["grad"][where] = bad
    out = copy_block(block)
    norm = run(target.backend, out, check_finite=True, max_grad_norm=clip, seed=1)
    assert not torch.isfinite(norm)
    for name in TENSORS:
        if block[name] is not None:
            assert torch.equal(out[name].view(torch.uint8), block[name].view(torch.uint8)), f"{name} changed"
    assert_guards_untouched(out)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's fp32 arithmetic
def test_fp32_sum_of_squares_overflow_counts_as_non_finite(target):
    block = make_block(4099, FP32, False, FP32, target.device)
    block["grad"][:4] = 1e19  # each square is finite, their sum is not (in fp32)
    before = block["param"].clone()
    norm = run(target.backend, block, check_finite=True)
    assert not torch.isfinite(norm) and torch.equal(block["param"], before)
    assert block["step"].item() == 5.0


@pytest.mark.parametrize("state_dtype", [pytest.param(FP32, id="fp32-states"), gpu_case(BF16, id="bf16-states")])
def test_without_norm_the_step_returns_none(target, state_dtype):
    block = make_block(4099, BF16, True, state_dtype, target.device)
    _, _, norm = check_against_reference(target, block, check_finite=False, max_grad_norm=None)
    assert norm is None


@pytest.mark.parametrize("n, step, lr_dtype, scaled", [
    *[pytest.param(4099, step, FP32, True, id=f"{step:g}-fp32-scaled") for step in (0.0, 1.0, 41.0, 2.0**20)],
    *[gpu_case(20_000, step, lr_dtype, False, id=f"{step:g}-{_short(lr_dtype) if lr_dtype != torch.float64 else 'fp64'}")
      for lr_dtype in (FP32, torch.float64, BF16) for step in (0.0, 1.0, 41.0, 9999.0)],
])
def test_lr_step_and_grad_scale_as_device_tensors(target, n, step, lr_dtype, scaled):
    """lr, grad_scale and found_inf as device tensors (of any dtype) do what the same floats do."""
    device = target.device
    block = make_block(n, BF16, True, FP32, device, step=step, grad_scale=8.0 if scaled else 1.0)
    lr = torch.tensor(3e-3 if scaled else 2e-3, dtype=lr_dtype, device=device)
    if scaled:
        kwargs = dict(grad_scale=torch.tensor([8.0], device=device), found_inf=torch.zeros((), device=device))
        floats = dict(grad_scale=8.0)
    else:
        kwargs = floats = dict(max_grad_norm=0.5)
    # clipping carries the error of the norm into g (see test_clipping_by_the_global_norm)
    out, _, _ = check_against_reference(target, block, terms_rtol=None if scaled else 4e-6, lr=lr, **kwargs)
    assert out["step"].item() == step + 1
    with_floats = copy_block(block)
    run(target.backend, with_floats, lr=float(lr), **floats)
    for name in ("param", "master", "exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(out[name], with_floats[name]), name


@pytest.mark.parametrize("step", [0.0, 1.0, 9.0, 999.0, 2.0**20])
def test_bias_corrections_at_every_step_count(target, step):
    """Small weights, so that the update dominates w and an error of the bias corrections would show
    (1 - 0.999^t computed naively in fp32 is off by ~1e-5 at small t)."""
    block = make_block(4099, FP32, False, FP32, target.device, step=step)
    block["param"].mul_(1e-3)
    check_against_reference(target, block, lr=1e-2, weight_decay=0.0)


@pytest.mark.parametrize("n, steps, grad_std, kwargs", [
    pytest.param(4099, 30, 1.0, dict(weight_decay=0.01), id="30-steps-decay"),
    gpu_case(50_001, 20, 0.1, dict(max_grad_norm=1.0), id="20-steps-clip"),
])
def test_many_steps_follow_the_reference_trajectory(target, n, steps, grad_std, kwargs):
    """Bias corrections over many steps (fp32 everything, the trajectory BlockOptimizer relies on)."""
    device = target.device
    block = make_block(n, FP32, False, FP32, device, step=0.0)
    out, ref = copy_block(block), clone_block(block)
    for _ in range(steps):
        grad = torch.randn(n, device=device) * grad_std
        out["grad"].copy_(grad)
        ref["grad"].copy_(grad)
        run(target.backend, out, lr=1e-2, **kwargs)
        run("reference", ref, lr=1e-2, **kwargs)
    assert float(out["step"]) == steps
    for name in ("param", "exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=1e-6)
    assert_guards_untouched(out)


@pytest.mark.parametrize("n", [1, 2049, 4099])
@pytest.mark.parametrize("param_dtype,has_master", [(BF16, True), (BF16, False)],
                         ids=["bf16-master", "bf16-stochastic"])
def test_nothing_outside_the_block_is_written(target, n, param_dtype, has_master):
    block = make_block(n, param_dtype, has_master, FP32, target.device, offset=BLOCK_PAD, guard=BLOCK_PAD)
    run(target.backend, block, max_grad_norm=1.0, seed=2)
    assert float(block["step"]) == 6.0
    assert_guards_untouched(block)
    ops.init_state(block["param"], block["master"], block["exp_avg"], block["exp_avg_sq"], backend=target.backend)
    assert_guards_untouched(block)


@pytest.mark.parametrize("target", TRITON_TARGETS, indirect=True)
def test_triton_refuses_blocks_beyond_int32_indexing(target, monkeypatch):
    monkeypatch.setattr(triton_adamw, "MAX_NUMEL", 4000)
    block = make_block(4099, FP32, False, FP32, target.device)
    with pytest.raises(ValueError, match="int32"):
        run("triton", block)


# ----------------------------------------------------------------------------------------------------
# Stochastic rounding
# ----------------------------------------------------------------------------------------------------


def _one_value_per_segment(device, param_values, segment):
    """A no-master bf16 block whose segments each hold one repeated input, so that every element of a
    segment computes the same fp32 w. Returns the block and that w (from the reference, in fp32)."""
    n = segment * len(param_values)
    block = dict(
        param=torch.tensor(param_values, device=device).repeat_interleave(segment).to(BF16),
        grad=torch.full((n,), 0.37, device=device).to(BF16),
        master=None,
        exp_avg=torch.full((n,), 0.2, device=device),
        exp_avg_sq=torch.full((n,), 0.1, device=device),
        step=torch.tensor([3.0], device=device),
    )
    fp32 = clone_block(block)
    fp32["master"] = fp32["param"].float()
    run("reference", fp32, lr=1e-2, weight_decay=0.0)
    return block, fp32["master"]


def test_stochastic_rounding_is_unbiased_for_each_value(target):
    segment, seeds = 4096, 8
    block, w = _one_value_per_segment(target.device, [1.0, -0.75, 3.0, 0.0234375, -1.5, 0.1], segment)
    w_seg = w.view(-1, segment)[:, 0].double()
    lo = (w.view(torch.int32) & -65536).view(FP32).view(-1, segment)[:, 0].double()  # toward 0
    step_away = ulp(w_seg, BF16) * torch.sign(w_seg)
    p = (w_seg - lo) / step_away  # probability of rounding away from zero
    assert ((p > 0.1) & (p < 0.95)).all(), f"choose inputs with a fractional part: p = {p.tolist()}"

    total = torch.zeros_like(w_seg)
    for seed in range(seeds):
        out = clone_block(block)
        run(target.backend, out, lr=1e-2, weight_decay=0.0, seed=1000 + seed)
        values = out["param"].double().view(-1, segment)
        on_grid = (values == lo[:, None]) | (values == (lo + step_away)[:, None])
        assert on_grid.all(), "a stochastically rounded value is neither neighbour of w"
        total += values.sum(dim=1)
    samples = segment * seeds
    mean = total / samples
    sigma = step_away.abs() * torch.sqrt(p * (1 - p) / samples)  # std of the mean of Bernoulli(p) steps
    z = (mean - w_seg) / sigma
    assert (z.abs() < 5).all(), f"bias of {z.tolist()} standard deviations (p = {p.tolist()})"


def _sr_pair(target: Target, n, seed, offset=0):
    """The same step twice from the same state, on the target: with an fp32 master (its fp32 result)
    and without (rounded)."""
    exact = make_block(n, BF16, True, FP32, target.device, step=0.0, offset=offset)
    exact["master"].copy_(exact["param"].float())  # the params are bf16: the master holds them exactly
    rounded = {**copy_block(exact), "master": None}
    run(target.backend, exact, weight_decay=0.0, seed=seed)
    run(target.backend, rounded, weight_decay=0.0, seed=seed)
    return exact["master"], rounded["param"]


@pytest.mark.parametrize("offset", [gpu_case(0, id="aligned"), gpu_case(3, id="offset3")])  # vector and scalar paths
def test_stochastic_rounding_is_unbiased_over_a_large_block(target, offset):
    n = 1 << 20
    x, r = _sr_pair(target, n, seed=2024, offset=offset)
    assert_stochastically_rounded(r, x, MAX_NOT_NEIGHBOUR[target.backend])
    down, up = bf16_neighbours(x)
    r = r.double()
    x64, down, up = x.double(), down.double(), up.double()
    variance = ((up - x64) * (x64 - down)).sum()  # Bernoulli: p (1 - p) (up - down)^2 per element
    z = ((r - x64).sum() / variance.sqrt()).item()
    assert abs(z) < 5.0, f"the rounding error's sum is {z:.2f} standard deviations from 0"
    # and it is not round-to-nearest: an element rounds away from its nearest neighbour w.p. min(p, 1-p)
    nearest = x.to(BF16).double()
    away = (r != nearest).double().mean().item()
    # distances in magnitude: for negative values `down` and `up` lie on the other side of x
    expected = torch.minimum((up - x64).abs(), (x64 - down).abs()).div((up - down).abs()).mean().item()
    assert abs(away - expected) < 5 * math.sqrt(expected * (1 - expected) / n), (away, expected)


@pytest.mark.parametrize("n", [4099, gpu_case(1 << 16, id=str(1 << 16))])
def test_stochastic_rounding_depends_on_the_seed_only(target, n):
    """Same seed, same result (also from an unaligned view: the noise hashes the element index);
    another seed, other roundings; m and v do not depend on it."""
    block = make_block(n, BF16, False, FP32, target.device)
    a, b, c = clone_block(block), clone_block(block), clone_block(block)
    d = copy_block(make_block(n, BF16, False, FP32, target.device, offset=3))
    for name in TENSORS:
        if block[name] is not None:
            d[name].copy_(block[name])
    run(target.backend, a, seed=11)
    run(target.backend, b, seed=11)
    run(target.backend, c, seed=12)
    run(target.backend, d, seed=11)
    assert torch.equal(a["param"], b["param"]) and torch.equal(a["param"], d["param"])
    assert (a["param"] != c["param"]).float().mean().item() > 0.01
    assert torch.equal(a["exp_avg"], c["exp_avg"]) and torch.equal(a["exp_avg_sq"], c["exp_avg_sq"])


def test_stochastic_rounding_keeps_nonfinite_params(target):
    block = make_block(4099, BF16, False, FP32, target.device)
    block["param"][:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    out = copy_block(block)
    run(target.backend, out, seed=5, check_finite=True)  # the grads are finite: the step is taken
    assert float(out["step"]) == float(block["step"]) + 1
    assert out["param"][0] == float("inf") and out["param"][1] == float("-inf") and out["param"][2].isnan()
    assert torch.isfinite(out["param"][3:].float()).all()


# ----------------------------------------------------------------------------------------------------
# State initialisation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, offset, m_dtype, v_dtype", [
    *[pytest.param(n, 0, s, s, id=f"{n}-{_dtype_id(s)}") for s in STATE_DTYPES for n in SIZES],
    *[gpu_case(n, offset, m, v, id=f"{n}-offset{offset}-m{_short(m)}-v{_short(v)}")
      for n, offset in ((1, 0), (7, 0), (4099, 0), (4099, 3), (3 * 2**20 + 1, 0))
      for m, v in ((FP32, FP32), (BF16, BF16), (FP32, BF16))],
])
@pytest.mark.parametrize("param_dtype,has_master", PARAM_CASES, ids=PARAM_IDS)
def test_init_state_writes_every_element(target, n, offset, param_dtype, has_master, m_dtype, v_dtype):
    block = make_block(n, param_dtype, has_master, m_dtype, target.device, exp_avg_sq_dtype=v_dtype, offset=offset)
    for name in ("master", "exp_avg", "exp_avg_sq"):  # poison what init_state must write
        if block[name] is not None:
            block[name].fill_(float("nan"))
    param, master, m, v = block["param"], block["master"], block["exp_avg"], block["exp_avg_sq"]
    before = param.clone()
    ops.init_state(param, master, m, v, backend=target.backend)
    assert torch.equal(param, before)
    if has_master:
        assert torch.equal(master, param.float())
    assert torch.equal(m, torch.zeros_like(m)) and torch.equal(v, torch.zeros_like(v))
    assert_guards_untouched(block)


# ----------------------------------------------------------------------------------------------------
# The backend contract
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, module", [("reference", reference), ("triton", triton_adamw), ("cuda", cuda_backend)],
                         ids=["reference", "triton", "cuda"])
def test_every_backend_module_satisfies_the_protocol(name, module):
    assert isinstance(module, Backend)
    assert module.NAME == name
    assert name in ops.BACKEND_NAMES
    if ops.load_backend(name) is not None:
        assert ops.load_backend(name) is module


def test_backend_contract_of_triton():
    assert triton_adamw.unavailable_reason() is None
    assert triton_adamw.supports_device(torch.device("cuda"))
    assert triton_adamw.supports_device("cpu") == triton_interpreting()
    assert ops.load_backend("triton") is triton_adamw


def test_backend_contract_of_cuda():
    assert cuda_backend.supports_device(torch.device("cuda")) and not cuda_backend.supports_device("cpu")
    assert (cuda_backend.unavailable_reason() is None) == (ops.load_backend("cuda") is cuda_backend)


# ----------------------------------------------------------------------------------------------------
# A whole BlockOptimizer run
# ----------------------------------------------------------------------------------------------------


def _train(backend, device, dtype, steps=8, **kwargs):
    """Eight steps of BlockOptimizer over three blocks (two switches) of a small MLP.

    Both runs see the same gradients, drawn from a generator rather than from backward: otherwise
    Adam's scale invariance would turn one-ulp differences of the weights into visibly different
    updates of the elements whose gradients are tiny, and the test would measure that, not the
    optimizer.
    """
    from badam_kernels import BlockOptimizer

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 24), torch.nn.Linear(24, 3),
                                torch.nn.LayerNorm(3)).to(device=device, dtype=dtype)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt = BlockOptimizer(base, list(model.named_parameters()),
                         block_prefix_list=[["0."], ["1."], ["2.", "3."]], switch_block_every=3,
                         switch_mode="ascending", verbose=0, backend=backend, **kwargs)
    grads = torch.Generator().manual_seed(2)
    trained = set()
    for _ in range(steps):
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=grads).to(device=device, dtype=dtype)
                trained.add(name)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert len(trained) == 8, "the schedule did not visit every block"
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype,kwargs", [
    (FP32, {}),
    (BF16, {}),
    (BF16, {"max_grad_norm": 0.5, "state_dtype": BF16}),
], ids=["fp32", "bf16-master", "bf16-clip-bf16-states"])
def test_block_optimizer_on_the_backend_matches_the_reference_run(target, dtype, kwargs, monkeypatch):
    pytest.importorskip("badam_kernels.optimizer")
    calls = []
    module = target.module
    fused_step = module.adamw_step
    monkeypatch.setattr(module, "adamw_step", lambda args: calls.append(1) or fused_step(args))
    got = _train(target.backend, target.device, dtype, **kwargs)
    assert len(calls) == 8, f"the {target.backend} step did not run at every step"
    want = _train("reference", target.device, dtype, **kwargs)
    for a, b in zip(got, want):
        if dtype == FP32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:  # bf16 weights may differ where fp32 noise flips a rounding: at most one ulp
            assert ((a.double() - b.double()).abs() <= ulp(b, BF16) * 1.001).all()


def test_auto_dispatch_picks_the_backend_measured_fastest_for_the_layout():
    """bench_step on the H200: CUDA for stochastic rounding with bf16 moments, Triton for the rest."""
    def layout(param_dtype, master, state_dtype):
        n = 128
        param = torch.zeros(n, dtype=param_dtype)
        return ops.pack_adamw_args(param, torch.zeros(n, dtype=param_dtype), torch.zeros(n) if master else None,
                                   torch.zeros(n, dtype=state_dtype), torch.zeros(n, dtype=state_dtype),
                                   torch.zeros(1), lr=1e-3)

    assert ops._fastest_for(layout(BF16, False, BF16))[0] == "cuda"
    for case in [(BF16, True, FP32), (BF16, True, BF16), (BF16, False, FP32), (FP32, False, FP32)]:
        assert ops._fastest_for(layout(*case))[0] == "triton", case
    # on CPU tensors the automatic choice stays the reference, whatever the layout
    assert ops.resolve_backend(None, "cpu", ops._fastest_for(layout(BF16, False, BF16))).NAME == "reference"
