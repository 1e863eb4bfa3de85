"""The CPU kernels of both attention ops (kernels/_neighborhood_cpu.py, kernels/_routing_cpu.py: a
``forward`` -> (out, lse) and ``backward`` -> gradients pair) against their references in float64
(forward and every gradient) over a seeded draw of cases, against the independent dense oracles of
the op tests, in float32 / bfloat16 / float16, and the neighborhood tiling's window coverage against
the reference's window rule.

CI runs a small draw; ``-m slow`` runs a large one.
"""
import random

import pytest
import torch

from attnzoo.kernels import _neighborhood_cpu, _routing_cpu
from attnzoo.kernels import neighborhood as neighborhood_module
from attnzoo.kernels import routing as routing_module
from attnzoo.kernels._neighborhood_cpu import _axis_windows, axis_tiling, default_tile
from attnzoo.kernels.neighborhood import (axis_neighbors, neighborhood_attention_2d, neighborhood_attention_2d_reference,
                                          validate)
from attnzoo.kernels.routing import routing_attention, routing_attention_reference, routing_region_index
from test_neighborhood_attention import dense_attention
from test_routing_attention import dense_routed_attention

LOW_PRECISION_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
FAST_DRAWS, SLOW_DRAWS = 10, 150


def _leaf(*shape, gen, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()


def _assert_same_outputs_and_grads(fn, expected_fn, inputs, grad_out, atol, rtol=None):
    """``fn(inputs, grad_out) -> (out, grads)`` (a kernels pair) against ``expected_fn`` on float64 copies
    and its autograd gradients for every input."""
    out, grads = fn(inputs, grad_out.to(inputs['q'].dtype))
    inputs64 = {name: t.detach().double().requires_grad_() for name, t in inputs.items()}
    expected = expected_fn(**inputs64)
    expected_grads = torch.autograd.grad(expected, list(inputs64.values()), grad_out.double())
    for name, got, want in zip(['out'] + list(inputs), [out, *grads], [expected, *expected_grads]):
        assert got.shape == want.shape and got.is_contiguous(), name
        assert got.dtype == (inputs[name].dtype if name in inputs else inputs['q'].dtype), name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol if rtol is None else rtol,
                                   msg=lambda m: f'{name}: {m}')


# ----------------------------------------------------------------------------- neighborhood: tiling


def _tiling_covers_windows(length, kernel, dilation, border, tile):
    """Every real query's keys inside its tile's span are exactly its window under the reference's rule."""
    axis = axis_tiling(length, kernel, dilation, border, tile)
    inside, _, _ = _axis_windows(axis, border)                                # [groups, tiles, tile, span]
    keys, valid, _ = axis_neighbors(length, kernel, dilation, border)
    for position in range(length):
        group, index = position % dilation, position // dilation
        slot = index + axis.query_pad
        tile_index, slot_in_tile = divmod(slot, axis.tile)
        span_keys = tile_index * axis.tile - axis.key_pad + torch.arange(axis.span)
        seen = sorted((span_keys[inside[group, tile_index, slot_in_tile]] * dilation + group).tolist())
        if seen != sorted(keys[position][valid[position]].tolist()):
            return False
    return True


@pytest.mark.parametrize('border', ['clamp', 'zero'])
def test_tiling_covers_every_window(border):
    """Odd and even kernels up to 13, dilations 1-3, lengths from the kernel up (including lengths a tile
    does not divide and dilation groups of unequal length), tiles from 1 (raised) to 9."""
    rng = random.Random(0)
    for _ in range(300):
        kernel, dilation, tile = rng.randint(1, 13), rng.randint(1, 3), rng.randint(1, 9)
        length = kernel * dilation + rng.randint(0, 25)
        assert _tiling_covers_windows(length, kernel, dilation, border, tile), (length, kernel, dilation, tile)


@pytest.mark.slow
@pytest.mark.parametrize('border', ['clamp', 'zero'])
def test_tiling_covers_every_window_exhaustive(border):
    for kernel in range(1, 14):
        for dilation in (1, 2, 3):
            for length in range(kernel * dilation, kernel * dilation + 30):
                for tile in (1, 4, 7):
                    assert _tiling_covers_windows(length, kernel, dilation, border, tile), (length, kernel, dilation,
                                                                                          tile)


def test_tiling_is_cheaper_than_one_tile_on_large_maps():
    """Spans of tile + kernel - 1 keys, not the whole axis: the work per query stays bounded as the map grows."""
    axis = axis_tiling(56, 7, 1, 'clamp', 4)
    assert axis.tiles > 1 and axis.span == axis.tile + 6 and axis.span < 20
    assert axis_tiling(7, 7, 1, 'clamp', 4).tiles == 1          # a map no wider than the window: one tile


# ----------------------------------------------------------------------------- neighborhood: against the reference

# DiNAT-L / NAT kernels (7, 9, 11, 13) weigh more than small ones
KERNELS = [1, 2, 3, 4, 5, 6, 7, 7, 9, 11, 13]


def draw_neighborhood_case(rng):
    kernel = (rng.choice(KERNELS), rng.choice(KERNELS)) if rng.random() < 0.3 else (rng.choice(KERNELS),) * 2
    dilation = (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3]))
    size = [k * d + rng.choice([0, 0, 1, 3, 6, 11]) for k, d in zip(kernel, dilation)]
    return dict(shape=(rng.randint(1, 2), size[0], size[1], rng.randint(1, 3), 16), kernel_size=kernel,
                dilation=dilation, border=rng.choice(['clamp', 'zero']), rpb=rng.random() < 0.7,
                n_extra=rng.choice([0, 0, 1, 5]), tile=rng.choice([None, None, (1, 1), (3, 5), (9, 2)]),
                scale=rng.choice([None, 0.3]))


def neighborhood_inputs(shape, kernel_size, rpb, n_extra, dtype=torch.float64, seed=0):
    batch, _, _, heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(q=_leaf(*shape, gen=gen, dtype=dtype), k=_leaf(*shape, gen=gen, dtype=dtype),
                  v=_leaf(*shape, gen=gen, dtype=dtype))
    if rpb:
        inputs['rpb'] = _leaf(heads, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1, gen=gen, dtype=torch.float32
                              if dtype != torch.float64 else dtype)
    if n_extra:
        inputs['extra_k'] = _leaf(batch, n_extra, heads, head_dim, gen=gen, dtype=dtype)
        inputs['extra_v'] = _leaf(batch, n_extra, heads, head_dim, gen=gen, dtype=dtype)
    return inputs


def neighborhood_pair(inputs, grad_out, tile=None, **geometry):
    """Output and gradients of every input (those present) from the CPU kernels' forward / backward."""
    spec = validate(**inputs, **geometry)
    tensors = [inputs.get(name) for name in ('q', 'k', 'v', 'rpb', 'extra_k', 'extra_v')]
    out, lse = _neighborhood_cpu.forward(*tensors, spec, tile=tile)
    assert lse.shape == (out.shape[0], out.shape[3], out.shape[1], out.shape[2]) and lse.dtype == torch.float32
    grads = _neighborhood_cpu.backward(grad_out, *tensors, out, lse, spec, True, True, tile=tile)
    return out, [g for g, t in zip(grads, tensors) if t is not None]


def assert_neighborhood_matches_reference(case, dtype=torch.float64, seed=0, atol=1e-10):
    inputs = neighborhood_inputs(case['shape'], case['kernel_size'], case['rpb'], case['n_extra'], dtype, seed)
    geometry = dict(kernel_size=case['kernel_size'], dilation=case['dilation'], border=case['border'],
                    scale=case['scale'])
    grad_out = torch.randn(case['shape'], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    _assert_same_outputs_and_grads(
        lambda t, g: neighborhood_pair(t, g, case['tile'], **geometry),
        lambda **t: neighborhood_attention_2d_reference(**t, **geometry), inputs, grad_out, atol)


@pytest.mark.parametrize('seed', range(FAST_DRAWS))
def test_neighborhood_matches_reference(seed):
    assert_neighborhood_matches_reference(draw_neighborhood_case(random.Random(seed)), seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize('seed', range(FAST_DRAWS, FAST_DRAWS + SLOW_DRAWS))
def test_neighborhood_matches_reference_large_draw(seed):
    assert_neighborhood_matches_reference(draw_neighborhood_case(random.Random(seed)), seed=seed)


@pytest.mark.parametrize('border', ['zero', 'clamp'])
def test_neighborhood_padding_slots_past_every_window(border):
    """Tiles padded with query slots whose window holds no key of the map (kernels 1 and 2, zero border):
    those rows must stay finite, or their NaNs reach the key and value gradients."""
    case = dict(shape=(1, 13, 11, 2, 16), kernel_size=(1, 2), dilation=(1, 2), border=border, rpb=True, n_extra=0,
                tile=(4, 4), scale=None)
    assert_neighborhood_matches_reference(case)


@pytest.mark.parametrize('kernel, dilation, border', [(7, 1, 'clamp'), (9, 2, 'clamp'), (11, 1, 'zero'),
                                                      (13, 1, 'clamp')])
def test_neighborhood_large_kernels_on_stage_maps(kernel, dilation, border):
    """NAT / DiNAT-L kernels on a 28x28 map (DiNAT-L stage 2 at 224 px), with rpb, default tiling."""
    case = dict(shape=(1, 28, 28, 2, 32), kernel_size=(kernel, kernel), dilation=(dilation, dilation), border=border,
                rpb=True, n_extra=0, tile=None, scale=None)
    assert_neighborhood_matches_reference(case)


@pytest.mark.parametrize('kernel_size, dilation, border, n_extra', [((11, 11), (1, 1), 'clamp', 0),
                                                                    ((13, 9), (1, 2), 'clamp', 0),
                                                                    ((5, 4), (3, 2), 'zero', 4)])
def test_neighborhood_matches_dense_oracle(kernel_size, dilation, border, n_extra):
    """Against a full softmax over the map with the window as a mask (independent of both implementations)."""
    inputs = {n: t.detach() for n, t in neighborhood_inputs((1, 27, 30, 2, 16), kernel_size, True, n_extra).items()}
    out, _ = neighborhood_pair(inputs, torch.zeros(1, 27, 30, 2, 16, dtype=torch.float64), kernel_size=kernel_size,
                               dilation=dilation, scale=0.6, border=border)
    expected = dense_attention(**inputs, kernel_size=kernel_size, dilation=dilation, border=border, scale=0.6)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('shape, kernel_size, dilation, border, rpb, dtype', [
    ((2, 14, 14, 2, 16), (7, 7), (1, 1), 'clamp', True, torch.float64),      # NAT stage 3 (k 7 on 14x14)
    ((1, 7, 9, 3, 16), (7, 5), (1, 1), 'zero', True, torch.float64),         # NAT stage 4-like, zero border
    ((1, 15, 13, 2, 16), (5, 3), (2, 3), 'clamp', True, torch.float64),      # DiNAT: unequal dilation groups
    ((1, 9, 8, 2, 16), (3, 3), (3, 2), 'zero', False, torch.float64),       # no rpb: the window mask alone
    ((2, 14, 14, 2, 32), (7, 7), (1, 1), 'clamp', True, torch.float32),
    ((1, 7, 7, 2, 16), (7, 7), (1, 1), 'clamp', True, torch.bfloat16),
])
def test_neighborhood_whole_map_path(shape, kernel_size, dilation, border, rpb, dtype, monkeypatch):
    """A call whose tiling is one tile per dilation group runs as one dense attention per group
    (``_whole_map_forward`` / ``_whole_map_backward``): values and every gradient (rpb included) against the
    reference, the backward over one image at a time as well."""
    rows = axis_tiling(shape[1], kernel_size[0], dilation[0], border, default_tile(kernel_size[0]))
    cols = axis_tiling(shape[2], kernel_size[1], dilation[1], border, default_tile(kernel_size[1]))
    assert _neighborhood_cpu._whole_map(shape[3], rows, cols, None, None, None)
    case = dict(shape=shape, kernel_size=kernel_size, dilation=dilation, border=border, rpb=rpb, n_extra=0,
                tile=None, scale=None)
    one_image = shape[3] * rows.groups * cols.groups * (rows.tile * cols.tile) ** 2
    for logits_per_step in (_neighborhood_cpu.WHOLE_MAP_LOGITS, one_image):   # every image at once, then one a step
        monkeypatch.setattr(_neighborhood_cpu, 'WHOLE_MAP_LOGITS', logits_per_step)
        assert _neighborhood_cpu._whole_map(shape[3], rows, cols, None, None, None)
        assert_neighborhood_matches_reference(case, dtype=dtype, atol=LOW_PRECISION_TOLERANCE.get(dtype, 1e-10))


@pytest.mark.parametrize('chunk', ['tile row', 'dilation group'])
def test_neighborhood_backward_in_small_chunks(chunk, monkeypatch):
    """The backward's chunks (one tile row, or one dilation group of one head, at a time; whole heads is the
    default on small maps) meet every gradient, with extra tokens and rpb."""
    case = dict(shape=(1, 23, 31, 2, 16), kernel_size=(5, 3), dilation=(1, 2), border='zero', rpb=True, n_extra=3,
                tile=None, scale=None)
    rows, cols = axis_tiling(23, 5, 1, 'zero', default_tile(5)), axis_tiling(31, 3, 2, 'zero', default_tile(3))
    assert rows.tiles > 1 and cols.tiles > 1
    logits_per_tile = rows.tile * cols.tile * (rows.span * cols.span + case['n_extra'])
    per_group = rows.tiles * cols.tiles * logits_per_tile
    monkeypatch.setattr(_neighborhood_cpu, 'LOGITS_PER_CHUNK', 1 if chunk == 'tile row' else per_group)
    chunks = list(_neighborhood_cpu._chunks(1, 2, rows, cols, logits_per_tile))
    assert len(chunks) == 2 * cols.groups * (rows.tiles if chunk == 'tile row' else 1)
    assert_neighborhood_matches_reference(case)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_neighborhood_low_precision(dtype):
    """Outputs and gradients in the input's dtype (rpb stays float32), within the op tests' tolerances."""
    case = dict(shape=(1, 16, 19, 2, 32), kernel_size=(7, 7), dilation=(2, 1), border='clamp', rpb=True, n_extra=5,
                tile=None, scale=None)
    assert_neighborhood_matches_reference(case, dtype, atol=LOW_PRECISION_TOLERANCE[dtype])


def test_neighborhood_bf16_peaked_softmax():
    """bf16, head_dim 128, a large scale (near one-hot probabilities), extra tokens: the backward must use
    the probabilities the forward used (a bf16 recomputation of the logits was off by 5%)."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 18, 28, 3, 2, 128, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    inputs = dict(zip('qkv', (t.requires_grad_() for t in qkv.unbind(3))))
    inputs.update(extra_k=_leaf(2, 4, 2, 128, gen=gen, dtype=torch.bfloat16),
                  extra_v=_leaf(2, 4, 2, 128, gen=gen, dtype=torch.bfloat16))
    geometry = dict(kernel_size=(5, 8), dilation=(3, 3), scale=0.83)
    grad_out = torch.randn(2, 18, 28, 2, 128, generator=gen, dtype=torch.float64)
    out, grads = neighborhood_pair(inputs, grad_out.to(torch.bfloat16), **geometry)
    inputs64 = {name: t.detach().double().requires_grad_() for name, t in inputs.items()}
    expected = neighborhood_attention_2d_reference(**inputs64, **geometry)
    expected_grads = torch.autograd.grad(expected, list(inputs64.values()), grad_out)
    for name, got, want in zip(['out'] + list(inputs), [out, *grads], [expected, *expected_grads]):
        error = (got.double() - want).abs().max().item()
        assert error <= 0.02 * max(1.0, want.abs().max().item()), (name, error)


def test_neighborhood_strided_views_of_a_qkv_projection():
    """q, k, v as views into one qkv tensor (the layout NAT hands over); the inputs are left untouched."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 15, 12, 3, 2, 16, generator=gen, dtype=torch.float64).requires_grad_()
    before = qkv.detach().clone()
    inputs = dict(zip('qkv', qkv.unbind(3)), rpb=torch.randn(2, 9, 9, generator=gen, dtype=torch.float64))
    assert not inputs['q'].is_contiguous()
    grad_out = torch.randn(2, 15, 12, 2, 16, generator=gen, dtype=torch.float64)
    _assert_same_outputs_and_grads(
        lambda t, g: neighborhood_pair(t, g, kernel_size=5, dilation=(1, 2), scale=0.25),
        lambda **t: neighborhood_attention_2d_reference(**t, kernel_size=5, dilation=(1, 2), scale=0.25), inputs,
        grad_out, atol=1e-12)
    assert torch.equal(qkv.detach(), before)


# ----------------------------------------------------------------------------- routing

ROUTING_PATHS = {'auto': None, 'gathered': False, 'dense': True}   # the kernels' `dense` argument


def routing_pair(inputs, grad_out, region_index, regions, scale, path='auto'):
    """Output and q, k, v gradients from the CPU kernels' forward / backward (int32 index, as the op passes)."""
    q, k, v = inputs['q'], inputs['k'], inputs['v']
    index, dense = region_index.to(torch.int32).contiguous(), ROUTING_PATHS[path]
    out, lse = _routing_cpu.forward(q, k, v, index, regions, scale, dense=dense)
    assert lse.shape == (q.shape[0], q.shape[3], q.shape[1], q.shape[2]) and lse.dtype == torch.float32
    return out, _routing_cpu.backward(grad_out, q, k, v, out, lse, index, regions, scale, dense=dense)


def draw_routing_case(rng):
    """Region grids 1xN, Nx1, prime and square; non-square regions down to one token; topk from 1 to all;
    routing from the top-k rule or random lists with repeats; int32 or int64 indices."""
    regions = rng.choice([(1, 1), (1, 5), (3, 1), (2, 3), (5, 7), (7, 7), (4, 4), (1, 7)])
    region_size = (rng.randint(1, 4), rng.randint(1, 4))
    n_regions = regions[0] * regions[1]
    return dict(shape=(rng.randint(1, 2), regions[0] * region_size[0], regions[1] * region_size[1], rng.randint(1, 3),
                       16), regions=regions, topk=rng.randint(1, n_regions), repeats=rng.random() < 0.4,
                index_dtype=rng.choice([torch.int32, torch.int64]), scale=rng.choice([0.25, 0.9]))


def routing_inputs(case, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (_leaf(*case['shape'], gen=gen, dtype=dtype) for _ in range(3))
    n_regions = case['regions'][0] * case['regions'][1]
    if case['repeats']:
        region_index = torch.randint(0, n_regions, (case['shape'][0], n_regions, case['topk']), generator=gen)
    else:
        region_index = routing_region_index(q, k, case['regions'], case['topk'])
    return dict(q=q, k=k, v=v), region_index.to(case['index_dtype'])


def assert_routing_matches_reference(case, path, dtype=torch.float64, seed=0, atol=1e-10):
    inputs, region_index = routing_inputs(case, dtype, seed)
    grad_out = torch.randn(case['shape'], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    _assert_same_outputs_and_grads(
        lambda t, g: routing_pair(t, g, region_index, case['regions'], case['scale'], path),
        lambda **t: routing_attention_reference(**t, region_index=region_index, regions=case['regions'],
                                                scale=case['scale']), inputs, grad_out, atol)


@pytest.mark.parametrize('path', list(ROUTING_PATHS))
@pytest.mark.parametrize('seed', range(FAST_DRAWS))
def test_routing_matches_reference(seed, path):
    assert_routing_matches_reference(draw_routing_case(random.Random(seed)), path, seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize('path', list(ROUTING_PATHS))
@pytest.mark.parametrize('seed', range(FAST_DRAWS, FAST_DRAWS + SLOW_DRAWS))
def test_routing_matches_reference_large_draw(seed, path):
    assert_routing_matches_reference(draw_routing_case(random.Random(seed)), path, seed=seed)


@pytest.mark.parametrize('heads, topk, map_size, dense', [(2, 1, 56, False), (4, 4, 28, False), (8, 16, 14, True)])
def test_routing_biformer_stages(heads, topk, map_size, dense):
    """BiFormer-S's three routed stages at 224 px (7x7 regions), each on the path chosen for it."""
    case = dict(shape=(1, map_size, map_size, heads, 32), regions=(7, 7), topk=topk, repeats=False,
                index_dtype=torch.int64, scale=(heads * 32) ** -0.5)
    assert _routing_cpu.prefers_dense(49, heads, topk) == dense
    assert_routing_matches_reference(case, 'auto')


@pytest.mark.parametrize('path', ['gathered', 'dense'])
def test_routing_matches_dense_oracle(path):
    """Against full attention with a log-multiplicity mask (independent of both implementations)."""
    case = dict(shape=(2, 6, 15, 2, 16), regions=(2, 5), topk=4, repeats=True, index_dtype=torch.int64, scale=0.4)
    inputs, region_index = routing_inputs(case)
    inputs = {n: t.detach() for n, t in inputs.items()}
    out, _ = routing_pair(inputs, torch.zeros(case['shape'], dtype=torch.float64), region_index, (2, 5), 0.4, path)
    torch.testing.assert_close(out, dense_routed_attention(**inputs, region_index=region_index, regions=(2, 5),
                                                           scale=0.4), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize('path', ['gathered', 'dense'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_routing_low_precision(dtype, path):
    case = dict(shape=(2, 14, 14, 4, 32), regions=(7, 7), topk=9, repeats=True, index_dtype=torch.int32,
                scale=0.1)
    assert_routing_matches_reference(case, path, dtype, atol=LOW_PRECISION_TOLERANCE[dtype])


@pytest.mark.parametrize('path', ['gathered', 'dense'])
def test_routing_strided_views_of_a_qkv_projection(path):
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 8, 12, 3, 2, 16, generator=gen, dtype=torch.float64).requires_grad_()
    before = qkv.detach().clone()
    inputs = dict(zip('qkv', qkv.unbind(3)))
    region_index = routing_region_index(inputs['q'], inputs['k'], (2, 3), 2)
    grad_out = torch.randn(2, 8, 12, 2, 16, generator=gen, dtype=torch.float64)
    _assert_same_outputs_and_grads(
        lambda t, g: routing_pair(t, g, region_index, (2, 3), 0.3, path),
        lambda **t: routing_attention_reference(**t, region_index=region_index, regions=(2, 3), scale=0.3), inputs,
        grad_out, atol=1e-12)
    assert torch.equal(qkv.detach(), before)


# ----------------------------------------------------------------------------- the op's lse output


@pytest.mark.parametrize('border, n_extra, tile', [('clamp', 0, None), ('zero', 3, (3, 5))])
def test_neighborhood_lse_matches_reference_kernels(border, n_extra, tile):
    """The base-2 log-sum-exp the forward returns (padding slots dropped) equals the reference kernels'."""
    inputs = {n: t.detach() for n, t in neighborhood_inputs((2, 13, 11, 2, 16), (5, 5), True, n_extra).items()}
    spec = validate(**inputs, kernel_size=5, dilation=(2, 1), border=border)
    tensors = [inputs.get(name) for name in ('q', 'k', 'v', 'rpb', 'extra_k', 'extra_v')]
    _, lse = _neighborhood_cpu.forward(*tensors, spec, tile=tile)
    _, expected = neighborhood_module._ReferenceKernels.forward(*tensors, spec)
    torch.testing.assert_close(lse, expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize('path', ['gathered', 'dense'])
def test_routing_lse_matches_reference_kernels(path):
    case = dict(shape=(2, 6, 15, 2, 16), regions=(2, 5), topk=4, repeats=True, index_dtype=torch.int32, scale=0.4)
    inputs, region_index = routing_inputs(case)
    q, k, v = (t.detach() for t in inputs.values())
    _, lse = _routing_cpu.forward(q, k, v, region_index, (2, 5), 0.4, dense=ROUTING_PATHS[path])
    _, expected = routing_module._ReferenceKernels.forward(q, k, v, region_index, (2, 5), 0.4)
    torch.testing.assert_close(lse, expected, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------- through the registered ops


def test_neighborhood_op_runs_the_cpu_kernels_by_default():
    """The public op on CPU tensors (backend=None, through its autograd formula) against backend="reference"."""
    inputs = neighborhood_inputs((2, 12, 15, 2, 16), (7, 5), True, 2)
    geometry = dict(kernel_size=(7, 5), dilation=(1, 2), border='clamp')
    grad_out = torch.randn(2, 12, 15, 2, 16, dtype=torch.float64)

    def op(inputs, grad, backend):
        out = neighborhood_attention_2d(**inputs, **geometry, backend=backend)
        return out, torch.autograd.grad(out, list(inputs.values()), grad)

    _assert_same_outputs_and_grads(lambda t, g: op(t, g, None),
                                   lambda **t: neighborhood_attention_2d(**t, **geometry, backend='reference'), inputs,
                                   grad_out, atol=1e-10)


def test_neighborhood_op_follows_rpb_changes_between_calls():
    """The CPU kernels keep the bias built from an rpb for later calls: a change of its values, in place
    (an optimizer step) or through ``.data`` (which leaves the version counter alone), must reach the next
    call's output and gradients."""
    inputs = neighborhood_inputs((1, 14, 13, 2, 16), (5, 5), True, 0)
    rpb = inputs['rpb']
    grad_out = torch.randn(1, 14, 13, 2, 16, dtype=torch.float64)

    def op(inputs, grad, backend):
        out = neighborhood_attention_2d(**inputs, kernel_size=5, backend=backend)
        return out, torch.autograd.grad(out, list(inputs.values()), grad)

    for change in (None, lambda: rpb.add_(0.5), lambda: rpb.data.mul_(-2.0)):
        if change is not None:
            with torch.no_grad():
                change()
        _assert_same_outputs_and_grads(lambda t, g: op(t, g, None),
                                       lambda **t: neighborhood_attention_2d(**t, kernel_size=5, backend='reference'),
                                       inputs, grad_out, atol=1e-10)


def test_neighborhood_op_on_a_map_of_one_tile():
    """One image, one head, a map the size of the window (one tile, no padding: NAT's stage 4): the op's
    gradients come out of the kernels' shared dK / dV map as separate tensors (a custom op's outputs may not
    share memory)."""
    inputs = neighborhood_inputs((1, 7, 7, 1, 16), (7, 7), True, 0)
    grad_out = torch.randn(1, 7, 7, 1, 16, dtype=torch.float64)

    def op(inputs, grad, backend):
        out = neighborhood_attention_2d(**inputs, kernel_size=7, backend=backend)
        return out, torch.autograd.grad(out, list(inputs.values()), grad)

    _assert_same_outputs_and_grads(lambda t, g: op(t, g, None),
                                   lambda **t: neighborhood_attention_2d(**t, kernel_size=7, backend='reference'),
                                   inputs, grad_out, atol=1e-10)


def test_routing_op_runs_the_cpu_kernels_by_default():
    case = dict(shape=(2, 14, 14, 8, 16), regions=(7, 7), topk=16, repeats=False, index_dtype=torch.int64, scale=0.2)
    inputs, region_index = routing_inputs(case)
    grad_out = torch.randn(case['shape'], dtype=torch.float64)

    def op(inputs, grad, backend):
        out = routing_attention(**inputs, region_index=region_index, regions=(7, 7), scale=0.2, backend=backend)
        return out, torch.autograd.grad(out, list(inputs.values()), grad)

    _assert_same_outputs_and_grads(
        lambda t, g: op(t, g, None),
        lambda **t: routing_attention(**t, region_index=region_index, regions=(7, 7), scale=0.2, backend='reference'),
        inputs, grad_out, atol=1e-10)
