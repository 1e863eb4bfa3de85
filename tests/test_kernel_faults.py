"""Faults at the attention ops (issue 25, items 5 and 6), on every backend: a non-finite key or value
reaches exactly the queries whose window (neighborhood) or routed regions (routing) hold it, in the
output and every gradient, as in the reference (a masked key is selected out, never multiplied by a
zero weight); the other images of the batch are untouched; a non-finite scale is refused; an empty
batch gives empty outputs and gradients, eagerly and compiled.
"""
import pytest
import torch

from attnzoo.kernels import (_neighborhood_cpu, _routing_cpu, neighborhood_attention_2d, routing_attention,
                             routing_region_index, use_na_kernel)
from attnzoo.kernels.neighborhood import axis_neighbors
from test_neighborhood_attention import make_inputs, with_transnext_inputs

NAN, INF = float('nan'), float('inf')
# (tensor, position, value): interior, corners and an edge of a 12 x 11 map
PLANTS = [('k', (5, 4), NAN), ('v', (6, 5), NAN), ('k', (0, 0), INF), ('v', (11, 10), NAN), ('v', (0, 6), INF),
          ('k', (11, 3), NAN)]
SHAPE = (2, 12, 11, 1, 16)
SLOW = pytest.mark.slow   # the interpreter takes ~10 s a call here: the default run keeps a few
FAULTY_IMAGE = 1


def _backend(name):
    # the CPU kernels are what backend=None runs on CPU tensors; 'triton-v2': the banded neighborhood kernel
    return {'cpu': None, 'triton-v2': 'triton'}.get(name, name)


def _neighborhood_outputs_and_grads(inputs, backend, **options):
    with use_na_kernel('v2' if backend == 'triton-v2' else 'v1'):
        return _outputs_and_grads(neighborhood_attention_2d, inputs, backend=_backend(backend), **options)


def _planted(inputs, name, position, value):
    with torch.no_grad():
        inputs[name][(FAULTY_IMAGE,) + position + (0, 0)] = value
    return inputs


def _outputs_and_grads(op, inputs, **options):
    """The output and the gradient of every leaf, for one fixed output gradient."""
    out = op(**inputs, **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    leaves = {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    return dict(out=out, **dict(zip(['d' + name for name in leaves], torch.autograd.grad(out, list(leaves.values()),
                                                                                          grad_out))))


def _nonfinite(x):
    """Which tokens (``[B, H, W]``) hold a non-finite value; other shapes (rpb, extra tokens) whole."""
    return ~torch.isfinite(x).flatten(3).all(-1) if x.dim() == 5 else ~torch.isfinite(x).all()


def _assert_same_faults(got, want, tol=1e-4):
    """Non-finite in exactly the same tokens as the reference, and the same values everywhere else."""
    for name in want:
        assert torch.equal(_nonfinite(got[name]), _nonfinite(want[name])), \
            (name, int(_nonfinite(got[name]).sum()), int(_nonfinite(want[name]).sum()))
        finite = torch.isfinite(want[name]) & torch.isfinite(got[name])
        torch.testing.assert_close(got[name][finite], want[name][finite].to(got[name].dtype), atol=tol, rtol=tol,
                                   msg=lambda m: f'{name}: {m}')


def _windows_holding(position, shape, kernel_size, border):
    """``[H, W]`` bool: the queries whose window holds the key at ``position`` (the op's window rule)."""
    holds = []
    for length, key in zip(shape, position):
        keys, valid, _ = axis_neighbors(length, kernel_size, 1, border)
        holds.append(((keys == key) & valid).any(1))
    return holds[0][:, None] & holds[1][None, :]


# ----------------------------------------------------------------------------- neighborhood


def _neighborhood_cases():
    for backend in ('cpu', 'triton', 'triton-v2', 'reference'):
        for border in ('clamp', 'zero'):
            for index, plant in enumerate(PLANTS):
                default = not backend.startswith('triton') or (border, index) in (('clamp', 0), ('zero', 2), ('clamp', 3))
                yield pytest.param(backend, border, *plant, marks=() if default else SLOW)


@pytest.mark.parametrize('backend, border, name, position, value', _neighborhood_cases())
def test_neighborhood_nonfinite_key_reaches_only_its_windows(backend, border, name, position, value):
    options = dict(kernel_size=3, border=border)
    inputs = _planted(make_inputs(SHAPE, 3, rpb=True), name, position, value)
    got = _neighborhood_outputs_and_grads(inputs, backend, **options)
    want = _outputs_and_grads(neighborhood_attention_2d, inputs, backend='reference', **options)
    _assert_same_faults(got, want)
    nonfinite = _nonfinite(got['out'])
    assert not nonfinite[1 - FAULTY_IMAGE].any()
    if value != value:   # a NaN reaches its windows' queries whatever their logits (an Inf may weigh zero there)
        assert torch.equal(nonfinite[FAULTY_IMAGE], _windows_holding(position, SHAPE[1:3], 3, border))


@pytest.mark.parametrize('backend, name, position, value', [
    ('cpu', 'v', (4, 4), NAN), ('cpu', 'k', (0, 10), INF), ('triton', 'v', (4, 4), NAN),
    pytest.param('triton', 'k', (0, 10), INF, marks=SLOW), ('triton-v2', 'v', (4, 4), NAN),
    pytest.param('triton-v2', 'k', (0, 10), INF, marks=SLOW)])
def test_neighborhood_nonfinite_key_with_extra_tokens_and_window_weight(backend, name, position, value):
    """TransNeXt's call (zero border, 3 x 3 window, extra tokens with a per-query bias, window weights)."""
    inputs = with_transnext_inputs(make_inputs(SHAPE, 3, rpb=True, n_extra=4), 3)
    inputs = _planted(inputs, name, position, value)
    options = dict(kernel_size=3, border='zero')
    got = _neighborhood_outputs_and_grads(inputs, backend, **options)
    want = _outputs_and_grads(neighborhood_attention_2d, inputs, backend='reference', **options)
    _assert_same_faults(got, want)


@pytest.mark.parametrize('name', ['q', 'k', 'v'])
@pytest.mark.parametrize('chunk', [None, 1])
def test_neighborhood_cpu_other_images_bit_identical(name, chunk, monkeypatch):
    """A NaN in one image leaves the CPU kernels' outputs and gradients of the others bit for bit (also with
    the backward one tile row at a time)."""
    if chunk:
        monkeypatch.setattr(_neighborhood_cpu, 'LOGITS_PER_CHUNK', chunk)
    clean = _outputs_and_grads(neighborhood_attention_2d, make_inputs(SHAPE, 5, rpb=True), kernel_size=5)
    faulty = _outputs_and_grads(neighborhood_attention_2d, _planted(make_inputs(SHAPE, 5, rpb=True), name, (3, 3), NAN),
                                kernel_size=5)
    for key in ('out', 'dq', 'dk', 'dv'):
        assert torch.equal(faulty[key][1 - FAULTY_IMAGE], clean[key][1 - FAULTY_IMAGE]), key
    assert not torch.isfinite(faulty['drpb']).all()   # rpb is shared: the faulty image's NaN reaches it


# ----------------------------------------------------------------------------- routing


def _routing_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a 12 x 12 map in 3 x 3 regions of 4 x 4 tokens, each routed to 2 of the 9
    q, k, v = (torch.randn(2, 12, 12, 1, 16, generator=gen).requires_grad_() for _ in range(3))
    region_index = torch.stack([torch.randperm(9, generator=gen)[:2] for _ in range(18)]).view(2, 9, 2)
    return dict(q=q, k=k, v=v, region_index=region_index, regions=3)


def _routed_to(region_index, position):
    """``[H, W]`` bool: the queries whose regions route to the region of ``position`` (4 x 4 regions, 3 x 3)."""
    region = (position[0] // 4) * 3 + position[1] // 4
    routed = (region_index[FAULTY_IMAGE] == region).any(1).view(3, 3)
    return routed.repeat_interleave(4, 0).repeat_interleave(4, 1)


def _routing_cases():
    plants = [('k', (5, 4), NAN), ('v', (0, 0), NAN), ('v', (11, 10), INF), ('k', (11, 0), INF)]
    for backend in ('cpu-dense', 'cpu-gathered', 'triton', 'reference'):
        for index, plant in enumerate(plants):
            yield pytest.param(backend, *plant, marks=SLOW if backend == 'triton' and index in (1, 2) else ())


@pytest.mark.parametrize('backend, name, position, value', _routing_cases())
def test_routing_nonfinite_key_reaches_only_routed_queries(backend, name, position, value, monkeypatch):
    if backend.startswith('cpu'):
        monkeypatch.setattr(_routing_cpu, 'prefers_dense', lambda *args: backend == 'cpu-dense')
    inputs = _planted(_routing_inputs(), name, position, value)
    got = _outputs_and_grads(routing_attention, inputs, backend=_backend(backend.split('-')[0]))
    want = _outputs_and_grads(routing_attention, inputs, backend='reference')
    _assert_same_faults(got, want)
    nonfinite = _nonfinite(got['out'])
    assert not nonfinite[1 - FAULTY_IMAGE].any()
    if value != value:
        assert torch.equal(nonfinite[FAULTY_IMAGE], _routed_to(inputs['region_index'], position))


def test_routing_cpu_dense_other_images_bit_identical(monkeypatch):
    monkeypatch.setattr(_routing_cpu, 'prefers_dense', lambda *args: True)
    clean = _outputs_and_grads(routing_attention, _routing_inputs())
    faulty = _outputs_and_grads(routing_attention, _planted(_routing_inputs(), 'v', (2, 2), NAN))
    for key in ('out', 'dq', 'dk', 'dv'):
        assert torch.equal(faulty[key][1 - FAULTY_IMAGE], clean[key][1 - FAULTY_IMAGE]), key


# ----------------------------------------------------------------------------- scale


@pytest.mark.parametrize('scale', [NAN, INF, -INF])
@pytest.mark.parametrize('op', ['neighborhood', 'routing', 'region_index'])
def test_nonfinite_scale_is_refused(op, scale):
    q = torch.randn(1, 8, 8, 2, 16)
    calls = dict(neighborhood=lambda: neighborhood_attention_2d(q, q, q, 3, scale=scale),
                 routing=lambda: routing_attention(q, q, q, torch.zeros(1, 4, 1, dtype=torch.long), 2, scale=scale),
                 region_index=lambda: routing_region_index(q, q, 2, 1, scale=scale))
    with pytest.raises(ValueError, match='scale must be a finite float'):
        calls[op]()


# ----------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize('backend', ['cpu', 'triton', 'triton-v2', 'reference', 'natten'])
def test_neighborhood_empty_batch(backend):
    if backend == 'natten':
        pytest.importorskip('natten')
    inputs = make_inputs((0, 9, 8, 2, 16), 3, rpb=backend != 'natten', n_extra=2)   # NATTEN has no rpb
    got = _neighborhood_outputs_and_grads(inputs, backend, kernel_size=3)
    for name, tensor in inputs.items():
        grad = got['d' + name]
        assert grad.shape == tensor.shape and grad.dtype == tensor.dtype, name
    assert got['out'].shape == inputs['q'].shape
    if backend != 'natten':
        assert torch.equal(got['drpb'], torch.zeros_like(inputs['rpb']))   # no image: no gradient


@pytest.mark.parametrize('backend', ['cpu', 'triton', 'reference'])
def test_routing_empty_batch(backend):
    q, k, v = (torch.randn(0, 8, 8, 2, 16).requires_grad_() for _ in range(3))
    region_index = routing_region_index(q, k, 2, 2)
    assert region_index.shape == (0, 4, 2)
    got = _outputs_and_grads(routing_attention, dict(q=q, k=k, v=v, region_index=region_index, regions=2),
                             backend=_backend(backend))
    assert all(got[name].shape == q.shape for name in ('out', 'dq', 'dk', 'dv'))


@pytest.mark.parametrize('backend', ['cpu', 'triton'])
def test_empty_batch_compiled(backend):
    """Both ops under torch.compile (fake tensors through the registered ops' fake implementations)."""
    def both(q, k, v, rpb):
        region_index = routing_region_index(q, k, 2, 2)
        return (neighborhood_attention_2d(q, k, v, 3, rpb=rpb, backend=_backend(backend))
                + routing_attention(q, k, v, region_index, 2, backend=_backend(backend)))

    inputs = make_inputs((0, 8, 8, 2, 16), 3, rpb=True)
    out = torch.compile(both, backend='aot_eager', fullgraph=True)(**inputs)
    grads = torch.autograd.grad(out.sum(), list(inputs.values()))
    assert out.shape == inputs['q'].shape
    assert [g.shape for g in grads] == [t.shape for t in inputs.values()]
