"""Both attention ops as registered torch.library ops: opcheck, torch.compile with no graph break,
TorchScript, FX, autocast, the process-wide backend switch, double backward, and the CPU kernels'
plug-in point.

The CPU runs compile with the ``aot_eager`` backend: it traces the whole graph (Dynamo, the fake
implementations, AOTAutograd's joint forward / backward) like inductor does, without the minutes of
C++ compilation inductor needs on a small CPU; one inductor run is in the slow set.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import attnzoo.kernels as kernels
from attnzoo.kernels import neighborhood as nb_module
from attnzoo.kernels import routing as routing_module
from attnzoo.kernels import neighborhood_attention_2d, routing_attention, routing_region_index, use_backend
from attnzoo.kernels._dispatch import triton_interpreted
from attnzoo.kernels.neighborhood import neighborhood_attention_2d_reference
from attnzoo.kernels.routing import routing_attention_reference

CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(
    not triton_interpreted(), reason='Triton kernels on CPU need TRITON_INTERPRET=1 (tests/conftest.py sets it)')


def leaves(*shapes, dtype=torch.float32, device='cpu', seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_() for shape in shapes]


def nbhd_args(device='cpu', dtype=torch.float32):
    """q, k, v, rpb, extra_k, extra_v of a small dilated call with every optional input."""
    q, k, v, rpb, extra_k, extra_v = leaves((1, 8, 9, 2, 16), (1, 8, 9, 2, 16), (1, 8, 9, 2, 16), (2, 5, 5),
                                            (1, 3, 2, 16), (1, 3, 2, 16), dtype=dtype, device=device)
    return dict(q=q, k=k, v=v, rpb=rpb, extra_k=extra_k, extra_v=extra_v)


def routing_args(device='cpu', dtype=torch.float32):
    q, k, v = leaves((1, 8, 8, 2, 16), (1, 8, 8, 2, 16), (1, 8, 8, 2, 16), dtype=dtype, device=device)
    region_index = torch.tensor([[[0, 1], [1, 2], [3, 0], [2, 2]]], device=device)
    return dict(q=q, k=k, v=v, region_index=region_index)


def nbhd_call(args, **options):
    return neighborhood_attention_2d(**args, kernel_size=3, dilation=(1, 2), scale=0.3, **options)


def routing_call(args, **options):
    return routing_attention(**args, regions=2, scale=0.3, **options)


def grads_of(fn, args):
    out = fn(args)
    inputs = [t for t in args.values() if t.requires_grad]
    return [out] + list(torch.autograd.grad(out, inputs, torch.ones_like(out)))


class CountingKernels:
    """Stands in for an op's CPU kernels: counts the calls and delegates to the reference kernels."""

    def __init__(self, reference):
        self.reference, self.calls = reference, []

    def forward(self, *args):
        self.calls.append('forward')
        return self.reference.forward(*args)

    def backward(self, *args):
        self.calls.append('backward')
        return self.reference.backward(*args)


@pytest.fixture(params=['neighborhood', 'routing'])
def op(request):
    """(module, call, args factory) of each op."""
    if request.param == 'neighborhood':
        return nb_module, nbhd_call, nbhd_args
    return routing_module, routing_call, routing_args


# ----------------------------------------------------------------------------- torch.library


def test_public_ops_are_registered():
    schemas = {name: str(getattr(torch.ops.attnzoo, name).default._schema)
               for name in ('neighborhood_attention_2d', 'routing_attention', 'routing_region_index')}
    assert schemas['neighborhood_attention_2d'].startswith('attnzoo::neighborhood_attention_2d(Tensor q, Tensor k')
    assert schemas['routing_attention'].startswith('attnzoo::routing_attention(Tensor q, Tensor k, Tensor v, Tensor '
                                                   'region_index, int[2] regions')
    assert schemas['routing_region_index'].startswith('attnzoo::routing_region_index(Tensor q, Tensor k, '
                                                      'int[2] regions, int topk')


def test_opcheck_neighborhood():
    args = nbhd_args()
    positional = (args['q'], args['k'], args['v'], [3, 3], [1, 2], 0.3, args['rpb'], 'clamp', args['extra_k'],
                  args['extra_v'])
    opcheck(torch.ops.attnzoo.neighborhood_attention_2d.default, positional + (None,))
    opcheck(torch.ops.attnzoo.neighborhood_attention_2d_forward.default, positional + ('cpu',))


def test_opcheck_neighborhood_with_extra_bias_and_window_weight():
    """TransNeXt's two inputs through the public op and the forward op (fake impl, autograd formula)."""
    args = nbhd_args()
    extra_bias, window_weight = leaves((1, 2, 8, 9, 3), (1, 8, 9, 2, 9), seed=1)
    positional = (args['q'], args['k'], args['v'], [3, 3], [1, 1], 0.3, args['rpb'], 'zero', args['extra_k'],
                  args['extra_v'])
    opcheck(torch.ops.attnzoo.neighborhood_attention_2d.default, positional + (None, extra_bias, window_weight))
    opcheck(torch.ops.attnzoo.neighborhood_attention_2d_forward.default,
            positional + ('cpu', extra_bias, window_weight))


def test_extra_bias_and_window_weight_run_the_default_kernels(monkeypatch):
    """TransNeXt's two inputs go to the device's kernels (here the CPU kernels' stand-in), forward and backward,
    with every gradient asked for."""
    counting = CountingKernels(nb_module._ReferenceKernels)
    monkeypatch.setattr(nb_module, '_cpu_kernels', lambda: counting)
    args = nbhd_args()
    args['extra_bias'], args['window_weight'] = leaves((1, 2, 8, 9, 3), (1, 8, 9, 2, 9), seed=1)
    grads = grads_of(lambda a: neighborhood_attention_2d(**a, kernel_size=3, border='zero'), args)
    assert counting.calls == ['forward', 'backward']
    assert len(grads) == 1 + len(args) and all(g.abs().sum() > 0 for g in grads[1:])


def test_opcheck_routing():
    args = routing_args()
    positional = (args['q'], args['k'], args['v'], args['region_index'], [2, 2], 0.3)
    opcheck(torch.ops.attnzoo.routing_attention.default, positional + (None,))
    opcheck(torch.ops.attnzoo.routing_attention_forward.default, positional + ('cpu',))
    opcheck(torch.ops.attnzoo.routing_region_index.default, (args['q'], args['k'], [2, 2], 3, None))


@needs_interpreter
def test_opcheck_triton_forward_ops():
    args = nbhd_args()
    opcheck(torch.ops.attnzoo.neighborhood_attention_2d_forward.default,
            (args['q'], args['k'], args['v'], [3, 3], [1, 2], 0.3, args['rpb'], 'zero', args['extra_k'],
             args['extra_v'], 'triton'), test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))
    args = routing_args()
    opcheck(torch.ops.attnzoo.routing_attention_forward.default,
            (args['q'], args['k'], args['v'], args['region_index'], [2, 2], 0.3, 'triton'),
            test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize('backend', [None, 'reference'])
def test_compile_fullgraph_matches_eager(op, backend):
    """fullgraph=True fails on any graph break; forward and every gradient equal the eager call's."""
    _, call, make_args = op
    args = make_args()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: call(a, backend=backend), fullgraph=True, backend='aot_eager')
    for got, expected in zip(grads_of(compiled, args), grads_of(lambda a: call(a, backend=backend), args)):
        torch.testing.assert_close(got, expected)


def test_compile_sees_the_switch(op):
    """The process-wide switch is read where Dynamo guards on it: changing it recompiles."""
    module, call, make_args = op
    args = make_args()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: call(a), fullgraph=True, backend='aot_eager')
    counting = CountingKernels(module._ReferenceKernels)
    original = module._cpu_kernels
    module._cpu_kernels = lambda: counting
    try:
        compiled(args)
        assert counting.calls == ['forward']
        with use_backend('reference'):
            compiled(args)
        assert counting.calls == ['forward']
    finally:
        module._cpu_kernels = original


def test_compile_nat_model_fullgraph():
    """A small NAT (every layer: padded maps, dilation, rpb as a parameter) in one graph, forward and backward."""
    from attnzoo.backbones.nat import NAT
    torch.manual_seed(0)
    model = NAT(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), kernel_size=3, mlp_ratio=1.,
                dilations=((1,), (2,), (1,), (1,)), num_classes=5)
    x = torch.randn(1, 3, 40, 48)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    out = compiled(x)
    out.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected = model(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=lambda m, n=name: f'{n}: {m}')


@pytest.mark.slow
def test_compile_inductor_on_cpu(op):
    _, call, make_args = op
    args = make_args()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: call(a), fullgraph=True)
    for got, expected in zip(grads_of(compiled, args), grads_of(lambda a: call(a), args)):
        torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- TorchScript and FX


class ScriptedNeighborhood(torch.nn.Module):
    """The pattern a scriptable model uses: the op under TorchScript, the Python function otherwise."""

    def forward(self, q: torch.Tensor, rpb: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.attnzoo.neighborhood_attention_2d(q, q, q, [3, 3], [2, 1], None, rpb, 'zero', None, None,
                                                               None)
        return neighborhood_attention_2d(q, q, q, 3, dilation=(2, 1), rpb=rpb, border='zero')


class ScriptedRouting(torch.nn.Module):
    def forward(self, q: torch.Tensor, region_index: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.attnzoo.routing_attention(q, q, q, region_index, [2, 2], 0.25, None)
        return routing_attention(q, q, q, region_index, 2, 0.25)


def test_torchscript_calls_the_ops():
    args = nbhd_args()
    scripted = torch.jit.script(ScriptedNeighborhood())
    torch.testing.assert_close(scripted(args['q'], args['rpb']), ScriptedNeighborhood()(args['q'], args['rpb']))
    args = routing_args()
    scripted = torch.jit.script(ScriptedRouting())
    out = scripted(args['q'], args['region_index'])
    torch.testing.assert_close(out, ScriptedRouting()(args['q'], args['region_index']))
    (grad,) = torch.autograd.grad(out.sum(), args['q'])
    assert torch.isfinite(grad).all()


class ScriptedRouter(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.attnzoo.routing_region_index(q, k, [2, 2], 3, None)
        return routing_region_index(q, k, 2, 3)


def test_torchscript_calls_the_routing_op():
    args = routing_args()
    scripted = torch.jit.script(ScriptedRouter())
    assert torch.equal(scripted(args['q'], args['k']), ScriptedRouter()(args['q'], args['k']))


def test_fx_leaf():
    """timm's FX feature extraction keeps both functions as single leaf calls."""
    from timm.layers import get_notrace_functions
    assert {neighborhood_attention_2d, routing_attention, routing_region_index} <= set(get_notrace_functions())

    class Block(torch.nn.Module):
        def forward(self, q, region_index):
            return neighborhood_attention_2d(q, q, q, 3) + routing_attention(q, q, q, region_index, 2)

    graph = torch.fx.Tracer(autowrap_functions=tuple(get_notrace_functions())).trace(Block())
    targets = [node.target for node in graph.nodes if node.op == 'call_function']
    assert targets[:2] == [neighborhood_attention_2d, routing_attention]


# ----------------------------------------------------------------------------- autocast


def test_autocast_mixes_float32_and_bfloat16(op):
    """Under autocast a float32 q next to bf16 k / v is cast like any autocast op (rpb stays float32)."""
    _, call, make_args = op
    args = make_args()
    mixed = {name: (t.detach().bfloat16() if name in ('k', 'v') else t) for name, t in args.items()}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = call(mixed)
    assert out.dtype == torch.bfloat16
    cast = {name: (t.detach().bfloat16() if name not in ('rpb', 'region_index') else t.detach())
            for name, t in args.items()}
    torch.testing.assert_close(out, call(cast, backend='reference'), atol=2e-2, rtol=2e-2)
    if 'rpb' in args:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = call({**mixed, 'rpb': args['rpb'].detach().half()})   # fp16 rpb next to bf16: as float32
        assert out.dtype == torch.bfloat16


def test_mixed_dtypes_without_autocast_raise(op):
    _, call, make_args = op
    args = make_args()
    with pytest.raises(TypeError, match='k is torch.bfloat16 but q is torch.float32|one dtype'):
        call({**args, 'k': args['k'].detach().bfloat16()})


# ----------------------------------------------------------------------------- the switch


def test_use_backend_switches_every_call_without_a_backend(op):
    module, call, make_args = op
    args = make_args()
    counting = CountingKernels(module._ReferenceKernels)
    original = module._cpu_kernels
    module._cpu_kernels = lambda: counting
    try:
        grads_of(call, args)
        assert counting.calls == ['forward', 'backward']    # CPU default: the op's CPU kernels
        with use_backend('reference'):
            assert kernels.get_backend() == 'reference'
            grads_of(call, args)
            grads_of(lambda a: call(a, backend='reference'), args)
        assert counting.calls == ['forward', 'backward'] and kernels.get_backend() is None
        kernels.set_backend('reference')
        try:
            grads_of(call, args)
        finally:
            kernels.set_backend(None)
        assert counting.calls == ['forward', 'backward']
    finally:
        module._cpu_kernels = original


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        with use_backend('cuda'):
            pass
    assert kernels.get_backend() is None


def test_environment_variable_sets_the_default():
    result = subprocess.run(
        [sys.executable, '-c', 'import attnzoo.kernels as k; print(k.get_backend())'],
        env={**os.environ, 'ATTNZOO_KERNEL_BACKEND': 'reference'}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'reference'


def test_environment_variable_with_a_bad_value_says_so():
    result = subprocess.run(
        [sys.executable, '-c', 'import attnzoo.kernels'],
        env={**os.environ, 'ATTNZOO_KERNEL_BACKEND': 'fast'}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ATTNZOO_KERNEL_BACKEND: unknown kernel backend 'fast'" in result.stderr


# ----------------------------------------------------------------------------- double backward


def test_double_backward_raises_clearly_on_the_kernels(op):
    _, call, make_args = op
    args = make_args()
    out = call(args)
    (grad,) = torch.autograd.grad(out.sum(), args['q'], create_graph=True)
    with pytest.raises(RuntimeError, match='double backward.*backend="reference"'):
        grad.sum().backward()


def test_double_backward_works_on_the_reference(op):
    _, call, make_args = op
    args = {name: t.detach().double().requires_grad_() if t.is_floating_point() else t
            for name, t in make_args().items()}
    inputs = tuple(t for t in args.values() if t.requires_grad)

    def fn(*tensors):
        return call({**args, **dict(zip([n for n, t in args.items() if t.requires_grad], tensors))},
                    backend='reference')
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason='needs a CUDA GPU')
class TestGPU:
    def test_opcheck(self):
        args = nbhd_args('cuda', torch.bfloat16)
        opcheck(torch.ops.attnzoo.neighborhood_attention_2d.default,
                (args['q'], args['k'], args['v'], [3, 3], [1, 2], 0.3, args['rpb'], 'clamp', args['extra_k'],
                 args['extra_v'], None))
        args = routing_args('cuda', torch.bfloat16)
        opcheck(torch.ops.attnzoo.routing_attention.default,
                (args['q'], args['k'], args['v'], args['region_index'], [2, 2], 0.3, None))

    @pytest.mark.parametrize('compile_backend', ['aot_eager', 'inductor'])
    def test_compile_fullgraph(self, op, compile_backend):
        _, call, make_args = op
        args = make_args('cuda')
        torch._dynamo.reset()
        compiled = torch.compile(lambda a: call(a), fullgraph=True, backend=compile_backend)
        for got, expected in zip(grads_of(compiled, args), grads_of(call, args)):
            torch.testing.assert_close(got, expected)

    def test_autocast(self, op):
        _, call, make_args = op
        args = make_args('cuda')
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = call({**args, 'k': args['k'].detach().bfloat16()})
        assert out.dtype == torch.bfloat16


def test_references_agree_with_the_ops():
    """The op with backend="reference" is the public reference function."""
    args = nbhd_args()
    torch.testing.assert_close(nbhd_call(args, backend='reference'),
                               neighborhood_attention_2d_reference(**args, kernel_size=3, dilation=(1, 2), scale=0.3))
    args = routing_args()
    torch.testing.assert_close(routing_call(args, backend='reference'),
                               routing_attention_reference(**args, regions=2, scale=0.3))
