"""The CUDA backend (``badam_kernels._C``) against the reference, on fresh random inputs.

GPU tests (``pytest -m gpu tests/test_cuda_ops.py``): every dtype combination, odd sizes and unaligned
buffers (views into larger buffers whose guard bands must stay untouched), weight-decay split points,
loss scaling, found_inf and non-finite skips, clipping, tensor lr and step, exact state
initialisation, unbiased stochastic rounding, CUDA-graph replay and torch.compile. Low-precision
results may differ from the reference by one unit in the last place where the fp32 values straddle
a rounding boundary (both round the same fp32 arithmetic up to FMA contraction), so they are held to
"within one ulp, and rarely different". The CPU test checks that the package imports and says why
the backend is unavailable.
"""
import math

import pytest
import torch

import badam_kernels  # noqa: F401  (the package imports without the extension)
from badam_kernels import _build
from badam_kernels import ops
from badam_kernels.ops import backend_report, load_backend

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
GUARD = 37  # elements of poison after each buffer (and `offset` before it)
POISON = -777.0
HYPER = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


# ------------------------------------------------------------------------------------------------
# CPU: the package imports and explains itself
# ------------------------------------------------------------------------------------------------

def test_backend_report_says_why_cuda_is_unavailable():
    report = backend_report()
    assert set(report) >= {"cuda", "triton", "reference"}
    assert report["reference"] == "available"
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the gpu tests cover the backend")
    assert report["cuda"].startswith("unavailable (")
    assert len(report["cuda"]) > len("unavailable (ImportError: )") + 10, report["cuda"]
    ext, reason = _build.load_extension()
    assert ext is None and isinstance(reason, str) and reason
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ops.resolve_backend("cuda", torch.device("cpu"))


def test_jit_opt_out_is_reported(monkeypatch):
    monkeypatch.setattr(_build, "_result", None)
    monkeypatch.setenv(_build.JIT_ENV, "0")
    monkeypatch.setattr("importlib.import_module", _raise_module_not_found)
    ext, reason = _build.load_extension()
    assert ext is None and f"{_build.JIT_ENV}=0" in reason


def _raise_module_not_found(name, package=None):
    raise ModuleNotFoundError(f"No module named {name!r}")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def cuda():
    module = load_backend("cuda")
    if module is None:
        pytest.fail(f"the cuda backend did not load: {backend_report()['cuda']}")
    return module


class Block:
    """A block's flat buffers, each a view into a larger buffer with poisoned guard bands."""

    def __init__(self, n, param_dtype, grad_dtype, master, m_dtype, v_dtype, offset=0, seed=0, step=5.0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        randn = lambda scale=1.0: torch.randn(n, device="cuda", generator=gen) * scale  # noqa: E731
        w32 = randn()
        values = {
            "param": w32.to(param_dtype),
            "grad": randn(0.1).to(grad_dtype),
            "master": w32 if master else None,
            "exp_avg": randn(0.01).to(m_dtype),
            "exp_avg_sq": (torch.rand(n, device="cuda", generator=gen) * 1e-3).to(v_dtype),
        }
        self.n, self.offset, self.bases, self.t = n, offset, {}, {}
        for name, value in values.items():
            if value is None:
                self.t[name] = None
                continue
            base = torch.full((offset + n + GUARD,), POISON, dtype=value.dtype, device="cuda")
            self.t[name] = base[offset:offset + n]
            self.t[name].copy_(value)
            self.bases[name] = base
        self.t["step"] = torch.full((1,), step, device="cuda")

    def tensors(self):
        t = self.t
        return t["param"], t["grad"], t["master"], t["exp_avg"], t["exp_avg_sq"], t["step"]

    def clone(self):
        """Plain contiguous copies (for the reference)."""
        other = object.__new__(Block)
        other.n, other.offset, other.bases = self.n, 0, {}
        other.t = {k: (None if v is None else v.clone()) for k, v in self.t.items()}
        return other

    def assert_guards_untouched(self):
        for name, base in self.bases.items():
            guard = torch.cat([base[:self.offset], base[self.offset + self.n:]])
            assert torch.all(guard == torch.tensor(POISON, dtype=base.dtype, device="cuda")), f"{name}: wrote out of bounds"


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of dtype at the magnitude of x (fp32 tensor)."""
    bits = {BF16: 8, FP16: 11}[dtype]
    _, e = torch.frexp(x.abs())
    tiny = {BF16: 2.0 ** -133, FP16: 2.0 ** -24}[dtype]
    return torch.ldexp(torch.ones_like(x), (e - bits).float()).clamp_min(tiny)


def assert_close_in(actual: torch.Tensor, expected: torch.Tensor, what: str):
    """fp32: close to rounding; bf16/fp16: within one ulp, and rarely different."""
    assert actual.dtype == expected.dtype, what
    if actual.dtype == FP32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")
        return
    a, b = actual.float(), expected.float()
    diff = (a - b).abs()
    bound = ulp(torch.maximum(a.abs(), b.abs()), actual.dtype)
    worst = (diff / bound).max().item() if diff.numel() else 0.0
    assert worst <= 1.0 + 1e-6, f"{what}: off by {worst:.2f} ulp"
    differ = (diff > 0).float().mean().item() if diff.numel() else 0.0
    assert differ <= 0.01, f"{what}: {differ:.2%} of the elements differ"


def bf16_neighbours(x32: torch.Tensor):
    """The bf16 values below and above (in magnitude) each fp32 value, as fp32."""
    bits = x32.contiguous().view(torch.int32)
    down = bits & -65536
    return down.view(FP32), (down + 65536).view(FP32)


def run(block: Block, backend: str, **kwargs):
    return ops.adamw_step(*block.tensors(), backend=backend, **{**HYPER, **kwargs})


def compare_with_reference(block: Block, **kwargs):
    """One CUDA step on `block`, one reference step on a copy; everything must agree."""
    param = block.t["param"]
    stochastic = block.t["master"] is None and param.dtype == BF16
    ref = block.clone()
    if stochastic:  # the reference draws other noise: compare with its fp32 result before rounding
        exact = block.clone()
        exact.t["master"] = exact.t["param"].float()
        run(exact, "reference", **kwargs)
    ref_norm = run(ref, "reference", **kwargs)
    norm = run(block, "cuda", **kwargs)

    block.assert_guards_untouched()
    if ref_norm is None:
        assert norm is None
    else:
        torch.testing.assert_close(norm, ref_norm, rtol=2e-5, atol=1e-6)
    assert torch.equal(block.t["step"], ref.t["step"]), (block.t["step"], ref.t["step"])
    for name in ("master", "exp_avg", "exp_avg_sq"):
        if block.t[name] is not None:
            assert_close_in(block.t[name], ref.t[name], name)
    if stochastic:
        assert_rounded_down_or_up(param, exact.t["master"], "param")
    else:
        assert_close_in(param, ref.t["param"], "param")
    return norm


def assert_rounded_down_or_up(rounded: torch.Tensor, x32: torch.Tensor, what: str, max_other=1e-3):
    """Each bf16 value is one of the two neighbours of its fp32 value (bar rare 1-ulp fp32 differences)."""
    r = rounded.float()
    down, up = bf16_neighbours(x32)
    exact = down == x32
    neighbour = torch.where(exact, r == down, (r == down) | (r == up))
    assert (r - x32).abs().le(ulp(x32, BF16) * 1.0001).all(), f"{what}: farther than one ulp from its fp32 value"
    other = 1.0 - neighbour.float().mean().item()
    assert other <= max_other, f"{what}: {other:.3%} of the elements are not a neighbour of their fp32 value"


def all_dtype_combinations():
    for param in (BF16, FP16, FP32):
        for grad in (BF16, FP16, FP32):
            for master in (True, False):
                if param == FP16 and not master:
                    continue  # fp16 params need a master (checked by the interface)
                for m in (FP32, BF16):
                    for v in (FP32, BF16):
                        yield pytest.param(param, grad, master, m, v,
                                           id=f"p{_short(param)}-g{_short(grad)}-{'master' if master else 'nomaster'}"
                                              f"-m{_short(m)}-v{_short(v)}")


def _short(dtype):
    return {BF16: "bf16", FP16: "fp16", FP32: "fp32"}[dtype]


# ------------------------------------------------------------------------------------------------
# the fused AdamW step
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("n, offset", [(7, 0), (4099, 0), (4099, 3), (65536, 1)])
@pytest.mark.parametrize("param_dtype, grad_dtype, master, m_dtype, v_dtype", list(all_dtype_combinations()))
def test_adamw_step_matches_reference_for_every_dtype(cuda, n, offset, param_dtype, grad_dtype, master, m_dtype,
                                                     v_dtype):
    block = Block(n, param_dtype, grad_dtype, master, m_dtype, v_dtype, offset=offset, seed=n + offset)
    compare_with_reference(block, lr=1e-2, decay_numel=n // 3 + 1, max_grad_norm=None, check_finite=True, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 8, 15, 16, 17, 1000, 3 * 2**20 + 5])  # the last: several grid-stride rounds
@pytest.mark.parametrize("param_dtype, master", [(BF16, True), (FP32, False), (BF16, False)])
def test_adamw_step_matches_reference_at_odd_sizes(cuda, n, param_dtype, master):
    block = Block(n, param_dtype, param_dtype, master, FP32, FP32, seed=n)
    compare_with_reference(block, lr=3e-3, decay_numel=n, seed=11)


@pytest.mark.gpu
@pytest.mark.parametrize("decay_numel", [0, 1, 8, 1003, 5000])
@pytest.mark.parametrize("offset", [0, 5])
def test_weight_decay_applies_to_the_first_decay_numel_elements(cuda, decay_numel, offset):
    block = Block(5000, BF16, BF16, True, FP32, FP32, offset=offset, seed=decay_numel)
    compare_with_reference(block, lr=1e-1, decay_numel=decay_numel)


@pytest.mark.gpu
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1024.0, 3.0])
def test_grad_scale_divides_the_gradient(cuda, as_tensor, scale):
    block = Block(10_001, BF16, FP16, True, FP32, FP32, seed=int(scale))
    block.t["grad"].mul_(scale)
    grad_scale = torch.tensor(scale, device="cuda") if as_tensor else scale
    compare_with_reference(block, lr=1e-3, grad_scale=grad_scale, max_grad_norm=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0, 1e6])  # clips hard, clips a little / not, never
@pytest.mark.parametrize("param_dtype, master", [(BF16, True), (FP32, False), (BF16, False)])
def test_clipping_by_global_norm(cuda, max_grad_norm, param_dtype, master):
    block = Block(100_003, param_dtype, param_dtype, master, FP32, FP32, seed=7)
    norm = compare_with_reference(block, lr=1e-3, max_grad_norm=max_grad_norm, check_finite=False)
    assert norm is not None and norm.dim() == 0 and norm.dtype == FP32


@pytest.mark.gpu
def test_without_clipping_or_check_no_norm_is_returned(cuda):
    block = Block(4099, BF16, BF16, True, BF16, BF16)
    assert compare_with_reference(block, lr=1e-3, max_grad_norm=None, check_finite=False) is None


@pytest.mark.gpu
@pytest.mark.parametrize("found", [0.0, 1.0, float("nan")])
@pytest.mark.parametrize("master", [True, False])
def test_found_inf_skips_the_step(cuda, found, master):
    block = Block(4099, BF16, BF16, master, FP32, FP32)
    before = {k: v.clone() for k, v in block.t.items() if v is not None}
    found_inf = torch.tensor([found], device="cuda")
    compare_with_reference(block, lr=1e-2, found_inf=found_inf, grad_scale=torch.tensor(2.0, device="cuda"))
    skipped = found != 0.0
    for name, value in before.items():
        if name != "grad":
            assert torch.equal(block.t[name], value) == skipped, name


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 4098])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_non_finite_gradient_skips_the_step(cuda, bad, where, max_grad_norm):
    block = Block(4099, BF16, BF16, True, FP32, FP32)
    block.t["grad"][where] = bad
    before = {k: v.clone() for k, v in block.t.items() if v is not None}
    norm = ops.adamw_step(*block.tensors(), backend="cuda", lr=1e-2, max_grad_norm=max_grad_norm,
                          check_finite=True, **HYPER)
    assert not torch.isfinite(norm)
    for name, value in before.items():
        if name != "grad":
            assert torch.equal(block.t[name], value), name
    block.assert_guards_untouched()


@pytest.mark.gpu
def test_fp32_sum_of_squares_overflow_counts_as_non_finite(cuda):
    block = Block(4099, FP32, FP32, False, FP32, FP32)
    block.t["grad"][:4] = 1e19  # each square is finite, their sum is not (in fp32)
    before = block.t["param"].clone()
    norm = ops.adamw_step(*block.tensors(), backend="cuda", lr=1e-2, check_finite=True, **HYPER)
    assert not torch.isfinite(norm) and torch.equal(block.t["param"], before)
    assert block.t["step"].item() == 5.0


@pytest.mark.gpu
@pytest.mark.parametrize("lr_dtype", [FP32, torch.float64, BF16])
@pytest.mark.parametrize("step", [0.0, 1.0, 41.0, 9999.0])
def test_tensor_lr_and_step(cuda, lr_dtype, step):
    block = Block(20_000, BF16, BF16, True, FP32, FP32, step=step)
    lr = torch.tensor(2e-3, dtype=lr_dtype, device="cuda")
    compare_with_reference(block, lr=lr, max_grad_norm=0.5)
    assert block.t["step"].item() == step + 1


@pytest.mark.gpu
def test_several_steps_track_the_reference(cuda):
    block = Block(50_001, FP32, FP32, False, FP32, FP32, step=0.0)
    ref = block.clone()
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(20):
        grad = torch.randn(block.n, device="cuda", generator=gen) * 0.1
        block.t["grad"].copy_(grad)
        ref.t["grad"].copy_(grad)
        run(block, "cuda", lr=1e-2, max_grad_norm=1.0)
        run(ref, "reference", lr=1e-2, max_grad_norm=1.0)
    for name in ("param", "exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(block.t[name], ref.t[name], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_op_checks_its_arguments(cuda):
    block = Block(100, BF16, BF16, True, FP32, FP32)
    p, g, w, m, v, step = block.tensors()
    lr = torch.tensor([1e-3], device="cuda")
    op = torch.ops.badam_kernels.adamw_step
    args = lambda **kw: dict(dict(param=p, grad=g, master=w, exp_avg=m, exp_avg_sq=v, step=step, lr=lr,  # noqa: E731
                                  beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decay_numel=100,
                                  grad_scale=None, found_inf=None, max_grad_norm=0.0, check_finite=False,
                                  seed=0), **kw)
    with pytest.raises(RuntimeError, match="exp_avg must be float32 or bfloat16"):
        op(**args(exp_avg=m.half()))
    with pytest.raises(RuntimeError, match="grad has 99 elements"):
        op(**args(grad=g[:99]))
    with pytest.raises(RuntimeError, match="master must be contiguous"):
        op(**args(master=torch.zeros(200, device="cuda")[::2]))
    with pytest.raises(RuntimeError, match="float16 params need a float32 master"):
        op(**args(param=p.half(), master=None))
    with pytest.raises(RuntimeError, match="lr is on cpu"):
        op(**args(lr=torch.tensor([1e-3])))
    with pytest.raises(RuntimeError, match="decay_numel=101"):
        op(**args(decay_numel=101))


# ------------------------------------------------------------------------------------------------
# state initialisation
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("n, offset", [(1, 0), (7, 0), (4099, 0), (4099, 3), (3 * 2**20 + 1, 0)])
@pytest.mark.parametrize("param_dtype, master", [(BF16, True), (BF16, False), (FP16, True), (FP32, True), (FP32, False)])
@pytest.mark.parametrize("m_dtype, v_dtype", [(FP32, FP32), (BF16, BF16), (FP32, BF16)])
def test_init_state_is_exact(cuda, n, offset, param_dtype, master, m_dtype, v_dtype):  # fp16 always has a master
    block = Block(n, param_dtype, param_dtype, master, m_dtype, v_dtype, offset=offset)
    for name in ("master", "exp_avg", "exp_avg_sq"):  # poison what init_state must write
        if block.t[name] is not None:
            block.t[name].fill_(float("nan"))
    param_before = block.t["param"].clone()
    ops.init_state(block.t["param"], block.t["master"], block.t["exp_avg"], block.t["exp_avg_sq"], backend="cuda")
    assert torch.equal(block.t["param"], param_before)
    if master:
        assert torch.equal(block.t["master"], param_before.float())
    assert torch.equal(block.t["exp_avg"], torch.zeros_like(block.t["exp_avg"]))
    assert torch.equal(block.t["exp_avg_sq"], torch.zeros_like(block.t["exp_avg_sq"]))
    block.assert_guards_untouched()


# ------------------------------------------------------------------------------------------------
# stochastic rounding
# ------------------------------------------------------------------------------------------------

def _sr_pair(n, seed, step=0.0, lr=1e-2, offset=0):
    """The same step twice from the same state: with an fp32 master (its fp32 result) and without (rounded)."""
    exact = Block(n, BF16, BF16, True, FP32, FP32, offset=offset, seed=123, step=step)
    exact.t["master"].copy_(exact.t["param"].float())  # the params are bf16: the master holds them exactly
    rounded = Block(n, BF16, BF16, False, FP32, FP32, offset=offset, seed=123, step=step)
    ops.adamw_step(*exact.tensors(), backend="cuda", lr=lr, betas=(0.9, 0.999), eps=1e-8, seed=seed)
    ops.adamw_step(*rounded.tensors(), backend="cuda", lr=lr, betas=(0.9, 0.999), eps=1e-8, seed=seed)
    return exact.t["master"], rounded.t["param"]


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 3])  # vectorised and scalar paths
def test_stochastic_rounding_is_unbiased(cuda, offset):
    n = 1 << 20
    x, r = _sr_pair(n, seed=2024, offset=offset)
    assert_rounded_down_or_up(r, x, "param")
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


@pytest.mark.gpu
def test_stochastic_rounding_is_reproducible_from_the_seed(cuda):
    n = 1 << 16
    _, a = _sr_pair(n, seed=1)
    _, b = _sr_pair(n, seed=1)
    _, c = _sr_pair(n, seed=2)
    _, d = _sr_pair(n, seed=1, offset=3)  # the unaligned (scalar) path draws the same noise
    assert torch.equal(a, b) and torch.equal(a, d)
    assert (a != c).float().mean().item() > 0.01


# ------------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("master", [True, False])
def test_cuda_graph_replay_equals_eager(cuda, master):
    n = 300_007
    graphed = Block(n, BF16, BF16, master, FP32, FP32, step=0.0)
    eager = graphed.clone()
    lr, scale = torch.tensor([1e-3], device="cuda"), torch.tensor([8.0], device="cuda")
    found_inf = torch.zeros(1, device="cuda")
    kwargs = dict(lr=lr, grad_scale=scale, found_inf=found_inf, max_grad_norm=1.0, seed=5, **HYPER)

    def step(block):
        return ops.adamw_step(*block.tensors(), backend="cuda", **kwargs)

    side = torch.cuda.Stream()  # warm-up outside the graph (caches the launch configuration)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(graphed)
    torch.cuda.current_stream().wait_stream(side)
    step(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_norm = step(graphed)

    gen = torch.Generator(device="cuda").manual_seed(9)
    for i in range(6):
        grad = (torch.randn(n, device="cuda", generator=gen) * 8.0 * 0.1).to(BF16)
        lr.fill_(1e-3 * (i + 1))
        found_inf.fill_(1.0 if i == 3 else 0.0)
        graphed.t["grad"].copy_(grad)
        eager.t["grad"].copy_(grad)
        graph.replay()
        eager_norm = step(eager)
        torch.cuda.synchronize()
        assert torch.equal(graph_norm, eager_norm), i
        for name in ("param", "master", "exp_avg", "exp_avg_sq", "step"):
            if graphed.t[name] is not None:
                assert torch.equal(graphed.t[name], eager.t[name]), (i, name)
    assert graphed.t["step"].item() == 1 + 5  # one warm-up step, six replays of which one was skipped


@pytest.mark.gpu
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_ops_compose_with_torch_compile(cuda, compile_backend):
    compiled_block = Block(10_003, BF16, BF16, True, FP32, FP32, step=0.0)
    eager_block = compiled_block.clone()
    lr = torch.tensor([1e-3], device="cuda")

    def step_and_reinit(param, grad, master, m, v, step):
        norm = torch.ops.badam_kernels.adamw_step(param, grad, master, m, v, step, lr, 0.9, 0.999, 1e-8, 0.1, 5000,
                                                  None, None, 1.0, True, 0)
        torch.ops.badam_kernels.init_state(param, None, m, v)  # m = v = 0 again, master kept
        return norm * 2

    compiled = torch.compile(step_and_reinit, backend=compile_backend, fullgraph=True)
    for _ in range(2):
        out_c = compiled(*compiled_block.tensors())
        out_e = step_and_reinit(*eager_block.tensors())
        torch.testing.assert_close(out_c, out_e)
        for name in ("param", "master", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(compiled_block.t[name], eager_block.t[name]), name
