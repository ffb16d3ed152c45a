"""The registered CUDA ops (``torch.ops.badam_kernels``) called directly, as torch.compile sees them:
their own argument checks, and compiled graphs that call them equal eager calls."""
import pytest
import torch
from test_backends import BF16, FP32, make_block

from badam_kernels import ops

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    module = ops.load_backend("cuda")
    if module is None:
        pytest.fail(f"the cuda backend did not load: {ops.backend_report()['cuda']}")
    return module


def _tensors(block):
    return tuple(block[k] for k in ("param", "grad", "master", "exp_avg", "exp_avg_sq", "step"))


def test_op_checks_its_arguments(cuda):
    p, g, w, m, v, step = _tensors(make_block(100, BF16, True, FP32, "cuda"))
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


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_ops_compose_with_torch_compile(cuda, compile_backend):
    compiled_block = make_block(10_003, BF16, True, FP32, "cuda", step=0.0)
    eager_block = {k: t.clone() for k, t in compiled_block.items()}
    lr = torch.tensor([1e-3], device="cuda")

    def step_and_reinit(param, grad, master, m, v, step):
        norm = torch.ops.badam_kernels.adamw_step(param, grad, master, m, v, step, lr, 0.9, 0.999, 1e-8, 0.1, 5000,
                                                  None, None, 1.0, True, 0)
        torch.ops.badam_kernels.init_state(param, None, m, v)  # m = v = 0 again, master kept
        return norm * 2

    compiled = torch.compile(step_and_reinit, backend=compile_backend, fullgraph=True)
    for _ in range(2):
        out_c = compiled(*_tensors(compiled_block))
        out_e = step_and_reinit(*_tensors(eager_block))
        torch.testing.assert_close(out_c, out_e)
        for name in ("param", "master", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(compiled_block[name], eager_block[name]), name
