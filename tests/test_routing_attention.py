"""routing_attention (BiFormer's bi-level routing attention): Triton kernels against the reference,
the reference against an independent dense masked formulation, routing against BiFormer's rule.

CPU runs use Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are tiny;
the GPU class compiles the kernels for real, in bf16 and at BiFormer's stage shapes.
"""
import re

import pytest
import torch

from attnzoo.kernels import _routing_cpu
from attnzoo.kernels._dispatch import triton_interpreted
from attnzoo.kernels.routing import routing_attention, routing_attention_reference, routing_region_index

needs_interpreter = pytest.mark.skipif(
    not triton_interpreted(), reason='Triton kernels on CPU need TRITON_INTERPRET=1 (tests/conftest.py sets it)')

# Tolerances of a kernel run in `dtype` against the float64 reference on the same (rounded) inputs.
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3),
              torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def make_qkv(batch, height, width, heads, head_dim, dtype=torch.float32, device='cpu', seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, height, width, heads, head_dim, generator=generator).to(device, dtype).requires_grad_()
            for _ in range(3)]


def biformer_scale(q):
    """BiFormer's quirk: ``dim ** -0.5`` of the full width, not of the head."""
    return (q.shape[-2] * q.shape[-1]) ** -0.5


def run_with_grads(fn, q, k, v, region_index, regions, scale, grad_out):
    out = fn(q, k, v, region_index, regions, scale)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_matches_reference(q, k, v, region_index, regions, scale, backend='triton'):
    """The op's output and q/k/v gradients against the reference evaluated in float64."""
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, q.dtype)
    actual = run_with_grads(lambda *a: routing_attention(*a, backend=backend), q, k, v, region_index, regions, scale,
                            grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = run_with_grads(routing_attention_reference, q64, k64, v64, region_index, regions, scale,
                              grad_out.double())
    for name, a, e in zip(('out', 'dq', 'dk', 'dv'), actual, expected):
        assert a.dtype == q.dtype and a.shape == q.shape
        torch.testing.assert_close(a.double(), e, **TOLERANCES[q.dtype], msg=lambda m: f'{name}: {m}')


def region_of_token(height, width, regions, device='cpu'):
    """Row-major region id of every token of the map, ``[H * W]``."""
    p_h, p_w = regions
    rows = torch.arange(height, device=device) // (height // p_h)
    cols = torch.arange(width, device=device) // (width // p_w)
    return (rows[:, None] * p_w + cols[None, :]).flatten()


def dense_routed_attention(q, k, v, region_index, regions, scale):
    """Independent oracle: full attention over the map with a token mask built from the routing.

    A key region listed ``c`` times in a query region's list enters its softmax with weight ``c``
    (``+ log c`` on the logit), which is what gathering it ``c`` times means.
    """
    batch, height, width, heads, head_dim = q.shape
    n_regions = regions[0] * regions[1]
    counts = torch.zeros(batch, n_regions, n_regions, dtype=q.dtype, device=q.device)
    counts.scatter_add_(2, region_index.long(), torch.ones(region_index.shape, dtype=q.dtype, device=q.device))
    token_region = region_of_token(height, width, regions, q.device)
    multiplicity = counts[:, token_region][:, :, token_region]                        # [B, HW, HW]
    flat = [t.reshape(batch, height * width, heads, head_dim) for t in (q, k, v)]
    logits = torch.einsum('bqhd,bkhd->bhqk', flat[0] * scale, flat[1]) + multiplicity.log()[:, None]
    out = torch.einsum('bhqk,bkhd->bqhd', logits.softmax(-1), flat[2])
    return out.reshape(q.shape)


# (map H, map W, regions, topk): regions of 1x1, 4x4, 8x8 and non-square 3x5 tokens, topk = 1.
GEOMETRIES = {
    'region_1x1': (3, 3, (3, 3), 3),
    'region_4x4': (8, 8, (2, 2), 2),
    'region_8x8': (16, 16, (2, 2), 2),
    'region_3x5': (6, 10, (2, 2), 3),
    'topk_1': (8, 12, (2, 3), 1),
}


@needs_interpreter
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('geometry', list(GEOMETRIES), ids=list(GEOMETRIES))
def test_triton_matches_reference(geometry, dtype):
    height, width, regions, topk = GEOMETRIES[geometry]
    batch = 2 if geometry == 'region_4x4' else 1   # the interpreter's time grows with the program count
    q, k, v = make_qkv(batch, height, width, 2, 16, dtype)
    region_index = routing_region_index(q, k, regions, topk)
    assert_matches_reference(q, k, v, region_index, regions, biformer_scale(q))


@needs_interpreter
@pytest.mark.parametrize('dtype, head_dim', [(torch.bfloat16, 16), (torch.bfloat16, 64), (torch.float16, 128)],
                         ids=['bf16-d16', 'bf16-d64', 'fp16-d128'])
def test_triton_low_precision_and_wide_heads(dtype, head_dim):
    q, k, v = make_qkv(1, 8, 8, 2, head_dim, dtype)
    assert_matches_reference(q, k, v, routing_region_index(q, k, 2, 2), (2, 2), biformer_scale(q))


@needs_interpreter
def test_triton_random_routing_with_repeats():
    """Random lists with repeated regions (within a list and across query regions), head_dim 24 (padded)."""
    q, k, v = make_qkv(2, 6, 8, 1, 24)
    region_index = torch.randint(0, 4, (2, 4, 3), generator=torch.Generator().manual_seed(3))
    region_index[0, :, 0] = 1   # one hot key region, chosen by every query region
    assert_matches_reference(q, k, v, region_index.int(), (2, 2), 0.4)


@needs_interpreter
def test_triton_repeated_region_equals_single_route():
    """Routing to one region three times gives every copy a third of the weight: same as routing once."""
    q, k, v = make_qkv(1, 8, 8, 2, 16)
    grad_out = torch.randn(q.shape)
    once = run_with_grads(lambda *a: routing_attention(*a, backend='triton'), q, k, v,
                          torch.tensor([[[1], [3], [3], [0]]]), (2, 2), 0.3, grad_out)
    thrice = run_with_grads(lambda *a: routing_attention(*a, backend='triton'), q, k, v,
                            torch.tensor([[[1, 1, 1], [3, 3, 3], [3, 3, 3], [0, 0, 0]]]), (2, 2), 0.3, grad_out)
    for a, b in zip(once, thrice):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_triton_strided_views_of_a_qkv_projection():
    """q, k, v as views into one qkv Linear output, the layout a backbone hands over."""
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 8, 8, 3, 2, 16, generator=generator).requires_grad_()
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    region_index = routing_region_index(q, k, (2, 2), 2)
    assert_matches_reference(q, k, v, region_index, (2, 2), biformer_scale(q))


@needs_interpreter
@pytest.mark.parametrize('backend', ['triton', 'reference'])
def test_topk_all_regions_is_full_attention(backend):
    """With every region routed (in any order), each query attends to the whole map."""
    q, k, v = make_qkv(1, 6, 6, 2, 16)
    generator = torch.Generator().manual_seed(2)
    region_index = torch.stack([torch.randperm(9, generator=generator) for _ in range(9)])[None]
    scale = 0.25
    out = routing_attention(q, k, v, region_index, (3, 3), scale, backend=backend)
    flat = [t.reshape(1, 36, 2, 16).transpose(1, 2) for t in (q, k, v)]
    full = torch.softmax(flat[0] @ flat[1].transpose(-2, -1) * scale, -1) @ flat[2]
    full = full.transpose(1, 2).reshape(q.shape)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(q.shape)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), grad_out),
                               torch.autograd.grad(full, (q, k, v), grad_out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('geometry', list(GEOMETRIES), ids=list(GEOMETRIES))
def test_reference_matches_dense_masked_attention(geometry):
    height, width, regions, topk = GEOMETRIES[geometry]
    q, k, v = (t.detach().double() for t in make_qkv(2, height, width, 2, 8))
    n_regions = regions[0] * regions[1]
    region_index = torch.randint(0, n_regions, (2, n_regions, topk), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(routing_attention_reference(q, k, v, region_index, regions, 0.3),
                               dense_routed_attention(q, k, v, region_index, regions, 0.3))


def test_reference_gradcheck():
    q, k, v = (t.detach().double().requires_grad_() for t in make_qkv(1, 2, 6, 2, 2))
    region_index = torch.tensor([[[0, 2], [2, 2], [1, 0]]])   # 2x2-token regions, a repeat in one list
    assert torch.autograd.gradcheck(lambda *qkv: routing_attention_reference(*qkv, region_index, (1, 3), 0.5),
                                    (q, k, v))


def test_default_backend_on_cpu_is_the_cpu_kernels():
    q, k, v = make_qkv(1, 4, 4, 1, 8)
    region_index = routing_region_index(q, k, 2, 2)
    expected, _ = _routing_cpu.forward(q, k, v, region_index.int(), (2, 2), 0.3)
    assert torch.equal(routing_attention(q, k, v, region_index, 2, 0.3), expected)


def test_routing_region_index_follows_biformer():
    """Mean-pooled full-width region queries and keys, scaled dot product, top-k; no gradient."""
    q, k = (torch.randn(2, 6, 8, 12, generator=torch.Generator().manual_seed(s)).requires_grad_() for s in (5, 6))
    regions, topk, scale = (3, 2), 4, 12 ** -0.5
    index = routing_region_index(q, k, regions, topk, scale)
    assert index.shape == (2, 6, 4) and index.dtype == torch.int64 and not index.requires_grad

    def region_mean(x, r):
        ry, rx = divmod(r, regions[1])
        return x[:, 2 * ry:2 * ry + 2, 4 * rx:4 * rx + 4].mean((1, 2))
    q_win = torch.stack([region_mean(q.detach(), r) for r in range(6)], 1)
    k_win = torch.stack([region_mean(k.detach(), r) for r in range(6)], 1)
    expected = torch.topk((q_win * scale) @ k_win.transpose(1, 2), topk, dim=-1).indices
    assert torch.equal(index, expected)
    # heads-last input routes on the same full-width channels
    assert torch.equal(routing_region_index(q.view(2, 6, 8, 3, 4), k.view(2, 6, 8, 3, 4), regions, topk, scale),
                       index)


def _bad_call(change):
    """A valid call with one argument replaced (``change`` maps argument name -> value factory)."""
    q, k, v = (t.detach() for t in make_qkv(1, 8, 8, 2, 8))
    args = dict(q=q, k=k, v=v, region_index=torch.zeros(1, 4, 2, dtype=torch.long), regions=(2, 2), scale=0.3)
    args.update({name: make(args) for name, make in change.items()})
    return args


BAD_INPUTS = {
    'q_4d': ({'q': lambda a: a['q'][..., 0, :]}, ValueError, 'heads-last'),
    'k_shape': ({'k': lambda a: a['k'][:, :4]}, ValueError, 'same'),
    'v_dtype': ({'v': lambda a: a['v'].half()}, TypeError, 'one dtype'),
    'k_device': ({'k': lambda a: a['k'].to('meta')}, ValueError, 'one device'),
    'grid_mismatch': ({'regions': lambda a: (3, 2)}, ValueError, 'pad'),
    'regions_type': ({'regions': lambda a: 'two'}, TypeError, 'pair of ints'),
    'index_float': ({'region_index': lambda a: a['region_index'].float()}, TypeError, 'int32 or int64'),
    'index_shape': ({'region_index': lambda a: torch.zeros(1, 5, 2, dtype=torch.long)}, ValueError, '[B, p_h * p_w'),
    'topk_too_large': ({'region_index': lambda a: torch.zeros(1, 4, 5, dtype=torch.long)}, ValueError, 'topk'),
    'index_too_large': ({'region_index': lambda a: torch.full((1, 4, 2), 4)}, ValueError, 'outside'),
    'index_negative': ({'region_index': lambda a: torch.full((1, 4, 2), -1)}, ValueError, 'outside'),
    'scale_type': ({'scale': lambda a: 'dim'}, TypeError, 'scale'),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS), ids=list(BAD_INPUTS))
@pytest.mark.parametrize('backend', [None, 'reference'])
def test_bad_inputs(case, backend):
    change, error, fragment = BAD_INPUTS[case]
    with pytest.raises(error, match=re.escape(fragment)):
        routing_attention(**_bad_call(change), backend=backend)


def test_bad_backend_and_routing_arguments():
    args = _bad_call({})
    with pytest.raises(ValueError, match='unknown backend'):
        routing_attention(**args, backend='natten')
    with pytest.raises(ValueError, match='topk'):
        routing_region_index(args['q'], args['k'], (2, 2), 5)
    with pytest.raises(ValueError, match='pad'):
        routing_region_index(args['q'], args['k'], (3, 3), 2)


@needs_interpreter
def test_triton_rejects_float64():
    args = _bad_call({name: (lambda a, n=name: a[n].double()) for name in ('q', 'k', 'v')})
    with pytest.raises(TypeError, match='backend="reference"'):
        routing_attention(**args, backend='triton')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='compiled kernels (tensor-core dots, tiles, warps) at BiFormer shapes need a CUDA GPU')
class TestRoutingAttentionGPU:
    """Compiled kernels on a GPU at BiFormer's shapes (batch 2): 224 px stages 1-3, the detection
    stages' 13x19- and 4x5-token regions, and strided views."""

    @pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32], ids=['bf16', 'fp16', 'fp32'])
    @pytest.mark.parametrize('shape', [(56, 56, 2, 7, 1), (28, 28, 4, 7, 4), (14, 14, 8, 7, 16), (104, 152, 2, 8, 2),
                                       (32, 40, 8, 8, 16)], ids=['s1', 's2', 's3', 'region_13x19', 'region_4x5'])
    def test_matches_reference(self, shape, dtype):
        height, width, heads, n_win, topk = shape
        q, k, v = make_qkv(2, height, width, heads, 32, dtype, 'cuda')
        region_index = routing_region_index(q, k, n_win, topk)
        assert_matches_reference(q, k, v, region_index, (n_win, n_win), biformer_scale(q))

    def test_default_backend_is_triton_and_takes_views(self):
        qkv = torch.randn(2, 28, 28, 3, 4, 32, device='cuda', dtype=torch.bfloat16).requires_grad_()
        q, k, v = qkv.unbind(3)
        region_index = routing_region_index(q, k, 7, 4)
        assert_matches_reference(q, k, v, region_index, (7, 7), biformer_scale(q), backend=None)
