"""Seeded property tests of both ops' Triton path (the interpreter on CPU) and of their CPU kernels (what
``backend=None`` runs on CPU tensors: kernels/_neighborhood_cpu.py, kernels/_routing_cpu.py) against the
float64 reference.

Every drawn case runs forward and backward and compares the output and every gradient with the
reference evaluated in float64 on the same (rounded) inputs. CI runs a small draw; ``-m slow`` runs a
few hundred cases per op (``ATTNZOO_FUZZ_SEED`` shifts the seeds for a fresh draw). Invalid calls
must raise a ValueError / TypeError whose message names the argument. Also: int64 offsets, the grid
axis limit, one float32 precision rule for both ops.
"""
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch

from attnzoo.kernels import _dispatch, neighborhood_attention_2d, routing_attention, use_na_kernel
from attnzoo.kernels._dispatch import NA_KERNELS, dot_precision, triton_interpreted
from attnzoo.kernels.neighborhood import neighborhood_attention_2d_reference
from attnzoo.kernels.routing import routing_attention_reference

pytestmark = pytest.mark.skipif(
    not triton_interpreted() and not torch.cuda.is_available(),
    reason='the Triton path needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)')

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
SEED = int(os.environ.get('ATTNZOO_FUZZ_SEED', '0'))
FAST_DRAW, SLOW_DRAW = 6, 200
# One rule for both ops: max |error| <= tol * max(1, max |reference|), tensor by tensor.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
HEAD_DIMS = (16, 24, 32, 48, 64, 80, 128)
DTYPES = (torch.float32, torch.float32, torch.float16, torch.bfloat16)


def assert_matches(name, got, expected, dtype):
    assert got.shape == expected.shape, f'{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}'
    scale = max(1.0, expected.abs().max().item())
    error = (got.double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f'{name}: max error {error:.3g} > {TOLERANCE[dtype]} * {scale:.3g}'


@pytest.fixture(params=NA_KERNELS)
def na_kernel(request):
    """Runs a test of the Triton neighborhood path on each version of its kernels (ATTNZOO_NA_KERNEL)."""
    with use_na_kernel(request.param):
        yield request.param


def with_na_kernels(params, ids, v2_slow=()):
    """Each parametrization (a tuple) once per version of the Triton neighborhood kernels, the version last; v2's
    run of the cases at ``v2_slow`` (indices) goes under ``slow``: the interpreter's time in the default suite."""
    return [pytest.param(*values, version, id=f'{version}-{name}',
                         marks=[pytest.mark.slow] if version == 'v2' and index in v2_slow else [])
            for version in NA_KERNELS for index, (values, name) in enumerate(zip(params, ids))]


# the paths under test: (device of the tensors, backend argument)
PATHS = {'triton': (DEVICE, 'triton'), 'cpu': ('cpu', None)}


def heads_last(generator, shape, dtype, layout, device):
    """q, k, v ``[B, H, W, heads, D]``: contiguous, views into one qkv tensor, or a transposed map."""
    batch, height, width, heads, head_dim = shape
    if layout == 'qkv_views':
        qkv = torch.randn(batch, height, width, 3, heads, head_dim, generator=generator)
        return list(qkv.to(device, dtype).unbind(3))
    if layout == 'transposed':
        return [torch.randn(batch, width, height, heads, head_dim, generator=generator).to(device, dtype)
                .transpose(1, 2) for _ in range(3)]
    return [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(3)]


def check_against_reference(op, reference, tensors, options, grad_names, dtype, generator, backend='triton'):
    """Output and the gradients of ``grad_names`` of the path that ``backend`` selects vs the float64 reference."""
    leaves = {name: (t.detach().requires_grad_() if name in grad_names else t) for name, t in tensors.items()}
    out = op(**leaves, **options, backend=backend)
    grad_out = torch.randn(out.shape, generator=generator).to(out.device)
    grads = torch.autograd.grad(out, [leaves[n] for n in grad_names], grad_out.to(out.dtype))
    assert out.dtype == dtype and all(g.dtype == leaves[n].dtype for n, g in zip(grad_names, grads))
    leaves64 = {name: (t.detach().double().requires_grad_() if name in grad_names
                       else t.double() if t.is_floating_point() else t) for name, t in tensors.items()}
    out64 = reference(**leaves64, **options)
    grads64 = torch.autograd.grad(out64, [leaves64[n] for n in grad_names], grad_out.double())
    assert_matches('out', out, out64, dtype)
    for name, got, expected in zip(grad_names, grads, grads64):
        assert_matches(f'd_{name}', got, expected, dtype)


# ----------------------------------------------------------------------------- neighborhood_attention_2d


@dataclass
class NeighborhoodCase:
    shape: tuple
    kernel_size: tuple
    dilation: tuple
    border: str
    dtype: torch.dtype
    layout: str
    rpb: str              # 'none', 'float32' or 'q' (q's dtype)
    n_extra: int
    grads: list = field(default_factory=list)
    scale: float = None
    extra_bias: str = 'none'    # TransNeXt's: 'none', 'heads_tokens' ([heads, H*W, L]) or 'full' ([B, heads, H, W, L])
    window_weight: bool = False  # TransNeXt's learnable tokens


def interpreter_programs(case: NeighborhoodCase) -> int:
    """Programs of one forward launch (the interpreter's time grows with them): 16x8 query tiles per
    dilation group, per image and head."""
    batch, height, width, heads, _ = case.shape
    (dil_h, dil_w) = case.dilation
    tiles = -(-(-(-height // dil_h)) // 16) * -(-(-(-width // dil_w)) // 8)
    return batch * heads * dil_h * dil_w * tiles


def draw_neighborhood_case(rng: random.Random, max_programs: int) -> NeighborhoodCase:
    while True:
        case = _draw_neighborhood_case(rng)
        if interpreter_programs(case) <= max_programs:
            return case


def _draw_neighborhood_case(rng: random.Random) -> NeighborhoodCase:
    kernel_size, dilation, size = [], [], []
    for _ in range(2):
        kernel = rng.randint(1, 13)
        dil = rng.randint(1, max(1, 24 // kernel)) if rng.random() < 0.4 else 1
        kernel_size.append(kernel)
        dilation.append(dil)
        size.append(rng.randint(kernel * dil, min(kernel * dil + 9, 30)))
    if rng.random() < 0.05:   # a 1x1 map, where only a 1x1 window fits
        kernel_size, dilation, size = [1, 1], [1, 1], [1, 1]
    dtype = rng.choice(DTYPES)
    shape = (rng.randint(1, 2), size[0], size[1], rng.randint(1, 2), rng.choice(HEAD_DIMS))
    case = NeighborhoodCase(shape, tuple(kernel_size), tuple(dilation), rng.choice(('clamp', 'zero')), dtype,
                            rng.choice(('contiguous', 'qkv_views', 'transposed')),
                            rng.choice(('none', 'float32', 'q')), rng.choice((0, 0, 1, rng.randint(2, 17))))
    case.grads = ['q', 'k', 'v'] + [n for n, present in (('rpb', case.rpb != 'none'),
                                                          ('extra_k', case.n_extra), ('extra_v', case.n_extra))
                                     if present and rng.random() < 0.8]
    case.scale = rng.choice((None, rng.uniform(0.05, 1.0)))
    # drawn last, so the cases above stay what they were for every seed
    if case.n_extra and rng.random() < 0.3:
        case.extra_bias = rng.choice(('heads_tokens', 'full'))
        case.grads += ['extra_bias'] if rng.random() < 0.8 else []
    if rng.random() < 0.2:
        case.window_weight = True
        case.grads += ['window_weight'] if rng.random() < 0.8 else []
    return case


def run_neighborhood_case(case: NeighborhoodCase, seed: int, path='triton'):
    device, backend = PATHS[path]
    generator = torch.Generator().manual_seed(seed)
    batch, height, width, heads, head_dim = case.shape
    q, k, v = heads_last(generator, case.shape, case.dtype, case.layout, device)
    tensors = dict(q=q, k=k, v=v)
    if case.rpb != 'none':
        rpb_dtype = torch.float32 if case.rpb == 'float32' else case.dtype
        tensors['rpb'] = torch.randn(heads, 2 * case.kernel_size[0] - 1, 2 * case.kernel_size[1] - 1,
                                     generator=generator).to(device, rpb_dtype)
    if case.n_extra:
        tensors.update({name: torch.randn(batch, case.n_extra, heads, head_dim, generator=generator).to(device,
                                                                                                       case.dtype)
                        for name in ('extra_k', 'extra_v')})
    if case.extra_bias != 'none':
        bias_shape = ((heads, height * width, case.n_extra) if case.extra_bias == 'heads_tokens'
                      else (batch, heads, height, width, case.n_extra))
        tensors['extra_bias'] = torch.randn(*bias_shape, generator=generator).to(DEVICE)
    if case.window_weight:
        tensors['window_weight'] = torch.randn(batch, height, width, heads, case.kernel_size[0] * case.kernel_size[1],
                                               generator=generator).to(DEVICE, case.dtype)
    options = dict(kernel_size=case.kernel_size, dilation=case.dilation, border=case.border, scale=case.scale)
    check_against_reference(neighborhood_attention_2d, neighborhood_attention_2d_reference, tensors, options,
                            case.grads, case.dtype, generator, backend)


def seed_id(value):
    return f'seed{value}' if isinstance(value, int) else ''


def neighborhood_draw(count, first_seed, max_programs):
    return [(seed, draw_neighborhood_case(random.Random(seed), max_programs))
            for seed in range(first_seed, first_seed + count)]


FAST_NEIGHBORHOOD_DRAW = neighborhood_draw(FAST_DRAW, SEED, max_programs=8)


@pytest.mark.parametrize('seed, case, version',
                         with_na_kernels(FAST_NEIGHBORHOOD_DRAW, [seed_id(seed) for seed, _ in FAST_NEIGHBORHOOD_DRAW],
                                         v2_slow=range(2, FAST_DRAW)))
def test_neighborhood_fuzz(seed, case, version):
    with use_na_kernel(version):
        run_neighborhood_case(case, seed)


@pytest.mark.slow
@pytest.mark.parametrize('seed, case', neighborhood_draw(SLOW_DRAW, SEED + 10_000, max_programs=64),
                         ids=seed_id)
def test_neighborhood_fuzz_thorough(seed, case, na_kernel):
    run_neighborhood_case(case, seed)


# the CPU kernels: no interpreter to wait for, so larger maps, and draws of their own
@pytest.mark.parametrize('seed, case', neighborhood_draw(2 * FAST_DRAW, SEED + 20_000, max_programs=64), ids=seed_id)
def test_neighborhood_fuzz_cpu_kernels(seed, case):
    run_neighborhood_case(case, seed, path='cpu')


@pytest.mark.slow
@pytest.mark.parametrize('seed, case', neighborhood_draw(SLOW_DRAW, SEED + 30_000, max_programs=10 ** 6),
                         ids=seed_id)
def test_neighborhood_fuzz_cpu_kernels_thorough(seed, case):
    run_neighborhood_case(case, seed, path='cpu')


# ----------------------------------------------------------------------------- routing_attention


@dataclass
class RoutingCase:
    shape: tuple
    regions: tuple
    topk: int
    dtype: torch.dtype
    layout: str
    index: str            # 'routed' (top-k of region means) or 'random' (repeats allowed)
    index_dtype: torch.dtype
    scale: float = None


GRID_SIDES = (1, 1, 2, 3, 5, 7)   # 1xN grids and prime sizes


def draw_routing_case(rng: random.Random) -> RoutingCase:
    regions = (rng.choice(GRID_SIDES), rng.choice(GRID_SIDES))
    region_size = (rng.randint(1, 5), rng.randint(1, 5))
    n_regions = regions[0] * regions[1]
    topk = rng.choice((1, n_regions, rng.randint(1, n_regions)))
    shape = (rng.randint(1, 2), regions[0] * region_size[0], regions[1] * region_size[1], rng.randint(1, 2),
             rng.choice((8,) + HEAD_DIMS))
    return RoutingCase(shape, regions, topk, rng.choice(DTYPES), rng.choice(('contiguous', 'qkv_views', 'transposed')),
                       rng.choice(('routed', 'random')), rng.choice((torch.int32, torch.int64)),
                       rng.choice((None, rng.uniform(0.05, 1.0))))


def run_routing_case(case: RoutingCase, seed: int, path='triton'):
    device, backend = PATHS[path]
    generator = torch.Generator().manual_seed(seed)
    q, k, v = heads_last(generator, case.shape, case.dtype, case.layout, device)
    batch, n_regions = case.shape[0], case.regions[0] * case.regions[1]
    if case.index == 'routed':
        from attnzoo.kernels import routing_region_index
        region_index = routing_region_index(q, k, case.regions, case.topk)
    else:
        region_index = torch.randint(0, n_regions, (batch, n_regions, case.topk), generator=generator).to(device)
    tensors = dict(q=q, k=k, v=v, region_index=region_index.to(case.index_dtype))
    check_against_reference(routing_attention, routing_attention_reference, tensors,
                            dict(regions=case.regions, scale=case.scale), ['q', 'k', 'v'], case.dtype, generator,
                            backend)


def routing_draw(count, first_seed):
    return [(seed, draw_routing_case(random.Random(seed))) for seed in range(first_seed, first_seed + count)]


@pytest.mark.parametrize('seed, case', routing_draw(FAST_DRAW, SEED), ids=seed_id)
def test_routing_fuzz(seed, case):
    run_routing_case(case, seed)


@pytest.mark.slow
@pytest.mark.parametrize('seed, case', routing_draw(SLOW_DRAW, SEED + 10_000),
                         ids=seed_id)
def test_routing_fuzz_thorough(seed, case):
    run_routing_case(case, seed)


@pytest.mark.parametrize('seed, case', routing_draw(2 * FAST_DRAW, SEED + 20_000), ids=seed_id)
def test_routing_fuzz_cpu_kernels(seed, case):
    run_routing_case(case, seed, path='cpu')


@pytest.mark.slow
@pytest.mark.parametrize('seed, case', routing_draw(SLOW_DRAW, SEED + 30_000), ids=seed_id)
def test_routing_fuzz_cpu_kernels_thorough(seed, case):
    run_routing_case(case, seed, path='cpu')


# ----------------------------------------------------------------------------- invalid calls


def _nbhd_base(rng):
    shape = (rng.randint(1, 2), rng.randint(6, 12), rng.randint(6, 12), rng.randint(1, 3), rng.choice((16, 32)))
    q, k, v = (torch.randn(shape) for _ in range(3))
    return dict(q=q, k=k, v=v, kernel_size=3, dilation=1, border='clamp')


NEIGHBORHOOD_CORRUPTIONS = {
    # name: (argument changes, error type, the argument the message must name)
    'kernel_zero': (lambda a: dict(kernel_size=0), ValueError, 'kernel_size'),
    'kernel_negative': (lambda a: dict(kernel_size=(3, -1)), ValueError, 'kernel_size'),
    'kernel_triple': (lambda a: dict(kernel_size=(3, 3, 3)), TypeError, 'kernel_size'),
    'kernel_float': (lambda a: dict(kernel_size=2.5), TypeError, 'kernel_size'),
    'kernel_bool': (lambda a: dict(kernel_size=True), TypeError, 'kernel_size'),
    'kernel_larger_than_map': (lambda a: dict(kernel_size=a['q'].shape[2] + 1), ValueError, 'kernel_size'),
    'dilation_zero': (lambda a: dict(dilation=(1, 0)), ValueError, 'dilation'),
    'dilation_str': (lambda a: dict(dilation='2'), TypeError, 'dilation'),
    'dilated_window_too_wide': (lambda a: dict(dilation=a['q'].shape[1]), ValueError, 'dilation'),
    'scale_str': (lambda a: dict(scale='0.1'), TypeError, 'scale'),
    'scale_bool': (lambda a: dict(scale=True), TypeError, 'scale'),
    'border_unknown': (lambda a: dict(border='reflect'), ValueError, 'border'),
    'border_int': (lambda a: dict(border=0), ValueError, 'border'),
    'backend_unknown': (lambda a: dict(backend='cuda'), ValueError, 'backend'),
    'q_list': (lambda a: dict(q=a['q'].tolist()), TypeError, 'q'),
    'q_4d': (lambda a: dict(q=a['q'][..., 0]), ValueError, 'q'),
    'q_int': (lambda a: dict(q=a['q'].long(), k=a['k'].long(), v=a['v'].long()), TypeError, 'q'),
    'k_shape': (lambda a: dict(k=a['k'][:, :-1]), ValueError, 'k'),
    'v_dtype': (lambda a: dict(v=a['v'].half()), TypeError, 'v'),
    'k_device': (lambda a: dict(k=a['k'].to('meta')), ValueError, 'k'),
    'head_dim_small': (lambda a: {n: a[n][..., :8] for n in 'qkv'}, ValueError, 'head_dim'),
    'head_dim_large': (lambda a: {n: torch.cat([a[n]] * 9, -1)[..., :130] for n in 'qkv'}, ValueError, 'head_dim'),
    'rpb_shape': (lambda a: dict(rpb=torch.zeros(a['q'].shape[3], 3, 3)), ValueError, 'rpb'),
    'rpb_float64': (lambda a: dict(rpb=torch.zeros(a['q'].shape[3], 5, 5, dtype=torch.float64)), TypeError, 'rpb'),
    'rpb_list': (lambda a: dict(rpb=[0.0]), TypeError, 'rpb'),
    'extra_k_alone': (lambda a: dict(extra_k=a['q'][:, 0]), ValueError, 'extra_v'),
    'extra_shape': (lambda a: dict(extra_k=a['q'][:, 0, ..., :8], extra_v=a['q'][:, 0, ..., :8]), ValueError,
                    'extra_k'),
    'extra_dtype': (lambda a: dict(extra_k=a['q'][:, 0].half(), extra_v=a['q'][:, 0].half()), TypeError, 'extra_k'),
    'triton_float64': (lambda a: dict({n: a[n].double() for n in 'qkv'}, backend='triton'), TypeError, 'backend'),
}


def _routing_base(rng):
    regions = (rng.randint(1, 3), rng.randint(1, 3))
    shape = (rng.randint(1, 2), regions[0] * rng.randint(1, 3), regions[1] * rng.randint(1, 3), rng.randint(1, 2), 16)
    q, k, v = (torch.randn(shape) for _ in range(3))
    n = regions[0] * regions[1]
    return dict(q=q, k=k, v=v, region_index=torch.randint(0, n, (shape[0], n, rng.randint(1, n))), regions=regions)


ROUTING_CORRUPTIONS = {
    'index_float': (lambda a: dict(region_index=a['region_index'].float()), TypeError, 'region_index'),
    'index_list': (lambda a: dict(region_index=a['region_index'].tolist()), TypeError, 'region_index'),
    'index_2d': (lambda a: dict(region_index=a['region_index'][0]), ValueError, 'region_index'),
    'index_too_many_regions': (lambda a: dict(region_index=torch.cat([a['region_index']] * 2, 1)), ValueError,
                               'region_index'),
    'index_topk_too_large': (lambda a: dict(region_index=a['region_index'][..., :1].expand(
        -1, -1, a['region_index'].shape[1] + 1)), ValueError, 'region_index'),
    'index_out_of_range': (lambda a: dict(region_index=a['region_index'] + a['region_index'].shape[1]), ValueError,
                           'region_index'),
    'index_negative': (lambda a: dict(region_index=a['region_index'] - a['region_index'].shape[1]), ValueError,
                       'region_index'),
    'index_device': (lambda a: dict(region_index=a['region_index'].to('meta')), ValueError, 'region_index'),
    'regions_zero': (lambda a: dict(regions=(0, 1)), ValueError, 'regions'),
    'regions_str': (lambda a: dict(regions='2'), TypeError, 'regions'),
    'regions_do_not_divide': (lambda a: dict(regions=(a['q'].shape[1] + 1, 1)), ValueError, 'regions'),
    'scale_str': (lambda a: dict(scale='x'), TypeError, 'scale'),
    'backend_natten': (lambda a: dict(backend='natten'), ValueError, 'backend'),
    'q_list': (lambda a: dict(q=[1.0]), TypeError, 'q'),
    'k_shape': (lambda a: dict(k=a['k'][..., :8]), ValueError, 'k'),
    'v_dtype': (lambda a: dict(v=a['v'].bfloat16()), TypeError, 'v'),
    'triton_head_dim': (lambda a: dict({n: torch.cat([a[n]] * 9, -1) for n in 'qkv'}, backend='triton'), ValueError,
                        'head_dim'),
}


INVALID_CALLS = [(neighborhood_attention_2d, _nbhd_base, name, corruption)
                 for name, corruption in NEIGHBORHOOD_CORRUPTIONS.items()]
INVALID_CALLS += [(routing_attention, _routing_base, name, corruption)
                  for name, corruption in ROUTING_CORRUPTIONS.items()]


@pytest.mark.parametrize('op, make_base, name, corruption', INVALID_CALLS,
                         ids=[f'{op.__name__}-{name}' for op, _, name, _ in INVALID_CALLS])
def test_invalid_calls_name_the_argument(op, make_base, name, corruption):
    """Each corruption of a valid call (three random bases, every backend) raises the expected error,
    and its message names the op and the argument."""
    change, error, argument = corruption
    for seed in range(3):
        args = make_base(random.Random(seed))
        args.update(change(args))
        for backend in ((args.pop('backend'),) if 'backend' in args else (None, 'reference', 'triton')):
            with pytest.raises(error) as info:
                op(**args, backend=backend)
            assert argument in str(info.value) and op.__name__ in str(info.value), info.value


# ----------------------------------------------------------------------------- launch limits and precision


def test_batch_beyond_one_grid_axis(monkeypatch):
    """Launches split the batch where batch * heads (neighborhood) or batch (routing) programs would pass
    a grid axis; the limit is lowered here so the interpreter walks the split."""
    from attnzoo.kernels import _neighborhood_triton, _routing_triton
    monkeypatch.setattr(_dispatch, 'MAX_GRID_YZ', 2)
    launched = []   # (programs on the axis that holds the batch) of every launch

    def spy(module, name, per_image):
        launch = getattr(module, name)

        def counted(*args, **kwargs):
            q = args[1] if name == '_backward_launch' else args[0]   # (grad_out, q, ...) / (q, ...)
            launched.append(q.shape[0] * (q.shape[3] if per_image == 'heads' else 1))
            return launch(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)

    for name in ('_forward_launch', '_backward_launch'):
        spy(_neighborhood_triton, name, 'heads')
        spy(_routing_triton, name, 'images')
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 6, 7, 2, 16, generator=generator).to(DEVICE).requires_grad_() for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=generator).to(DEVICE).requires_grad_()
    extra = [torch.randn(3, 4, 2, 16, generator=generator).to(DEVICE).requires_grad_() for _ in range(2)]
    tensors = dict(q=q, k=k, v=v, rpb=rpb, extra_k=extra[0], extra_v=extra[1])
    check_against_reference(neighborhood_attention_2d, neighborhood_attention_2d_reference, tensors,
                            dict(kernel_size=3, dilation=(2, 1)), list(tensors), torch.float32, generator)
    q, k, v = (torch.randn(3, 4, 6, 2, 16, generator=generator).to(DEVICE) for _ in range(3))
    region_index = torch.randint(0, 6, (3, 6, 2), generator=generator).to(DEVICE)
    check_against_reference(routing_attention, routing_attention_reference,
                            dict(q=q, k=k, v=v, region_index=region_index), dict(regions=(2, 3)), ['q', 'k', 'v'],
                            torch.float32, generator)
    assert launched == [2, 2, 2, 2, 2, 2, 2, 1, 2, 1]   # 3 images: one per launch (2 heads), then 2 + 1
    with pytest.raises(ValueError, match='3 heads exceed the 2 programs of a CUDA grid axis'):
        neighborhood_attention_2d(torch.randn(1, 6, 6, 3, 16, device=DEVICE), *[torch.randn(1, 6, 6, 3, 16,
                                  device=DEVICE)] * 2, 3, backend='triton')


INT64_SCRIPT = textwrap.dedent('''
    # One image spanning 2**31 elements (rows 2**30 + 64 apart in a sparse 4 GiB buffer that is never
    # touched outside the view): 32-bit offsets of the last row would wrap around.
    import torch
    from attnzoo.kernels import neighborhood_attention_2d, routing_attention
    from attnzoo.kernels.neighborhood import neighborhood_attention_2d_reference
    from attnzoo.kernels.routing import routing_attention_reference
    row = 2 ** 30 + 64
    buffer = torch.empty(2 * row + 4 * 3 * 16, dtype=torch.float16)
    qkv = buffer.as_strided((1, 3, 4, 3, 1, 16), (0, row, 48, 16, 16, 1))
    values = torch.randn(qkv.shape, generator=torch.Generator().manual_seed(0)).half()
    qkv.copy_(values)
    q, k, v = qkv.unbind(3)
    expected = neighborhood_attention_2d_reference(*values.double().unbind(3), (3, 3))
    error = (neighborhood_attention_2d(q, k, v, (3, 3), backend='triton').double() - expected).abs().max()
    assert error < 1e-2, f'neighborhood: {error}'
    index = torch.tensor([[[0, 1], [1, 2], [2, 0]]])
    expected = routing_attention_reference(*values.double().unbind(3), index, (3, 1))
    error = (routing_attention(q, k, v, index, (3, 1), backend='triton').double() - expected).abs().max()
    assert error < 1e-2, f'routing: {error}'
    print('ok')
''')


@pytest.mark.skipif(not triton_interpreted(), reason='the CPU interpreter maps the sparse buffer without touching it')
def test_offsets_beyond_int32_inside_one_image():
    """Runs in a subprocess: before 64-bit offsets this read outside the buffer (a crash, not an assert)."""
    result = subprocess.run([sys.executable, '-c', INT64_SCRIPT], capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'TRITON_INTERPRET': '1'})
    assert result.returncode == 0 and result.stdout.strip().endswith('ok'), (result.returncode, result.stderr[-2000:])


def test_float32_dot_precision_is_one_rule_for_both_ops(monkeypatch):
    """Both ops' float32 dots follow torch's float32 matmul setting (TF32 only where torch.matmul may use
    it); 16-bit dots take Triton's default."""
    from attnzoo.kernels import _neighborhood_triton, _routing_triton
    assert _neighborhood_triton.dot_precision is dot_precision is _routing_triton.dot_precision
    monkeypatch.setattr(_dispatch, 'triton_interpreted', lambda: False)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('highest')
        assert dot_precision(torch.float32) == 'ieee'
        torch.set_float32_matmul_precision('high')
        assert dot_precision(torch.float32) == 'tf32'
        assert dot_precision(torch.bfloat16) is None and dot_precision(torch.float16) is None
    finally:
        torch.set_float32_matmul_precision(previous)
