"""Faults every family must survive: a non-finite value in one sample, an empty batch, half precision.

One set of checks, parametrized over the smallest variant of every family (tests/test_models.py's choice;
both CrossFormer designs), at a small input. What must hold (DESIGN.md, Faults):

- no input takes the process down (the checks that could crash run in a child process, so a segfault is
  a test failure, not the end of pytest);
- a non-finite value stays in its own sample: the rest of the batch is bit-identical to the same batch
  without it, and the sample keeps it (its output is not finite);
- an empty batch gives empty outputs (forward, ``forward_intermediates``, ``features_only``) and
  gradients (zero, for the parameters), and leaves the running statistics alone (timm's MaxViT and
  HaloNet through the guard backbones/_timm_empty_batch.py installs, which changes nothing at B > 0);
- every family runs after ``.half()`` / ``.bfloat16()`` and under autocast (fp16 and bf16), close to its
  float32 output.
"""
import copy
import multiprocessing
import signal

import pytest
import timm
import torch
import torch.nn.functional as F

import child_checks
from attnzoo.backbones._families import TIMM_NATIVE_FAMILIES
from attnzoo.backbones._timm_empty_batch import GUARDED_FAMILIES, GUARDED_FORWARDS
from test_models import FAMILY_OF, SMALLEST, images

MODELS = sorted({*SMALLEST.values(), 'crossformer_tiny'})  # CrossFormer and CrossFormer++ differ in design
SIZE = 64
# timm's MaxViT fixes its window and grid to img_size / 32; HaloNet needs every stage map to be a
# multiple of its 8x8 block
MODEL_KWARGS = {'maxxvit': {'img_size': SIZE}}
SIZES = {'byoanet': 256}

# every variant of the timm families whose modules needed the empty-batch guard; beyond the smallest, slow
GUARDED_VARIANTS = [pytest.param(name, marks=pytest.mark.slow) for family in GUARDED_FAMILIES
                    for name in TIMM_NATIVE_FAMILIES[family] if name not in MODELS]

# max |half - float32| / max |float32| of the logits (measured: bf16 <= 0.02, fp16 <= 0.003)
HALF_TOLERANCE = {torch.bfloat16: 0.05, torch.float16: 0.01}


def gpu_param(*values):
    return pytest.param(*values, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason='needs a GPU')])


DEVICES = ['cpu', gpu_param('cuda')]

CHILD_TIMEOUT_S = 300

_models = {}


@pytest.fixture(scope='module', autouse=True)
def release_models():
    """The models built for this module are kept for its tests only."""
    yield
    _models.clear()


def size_of(name):
    return SIZES.get(FAMILY_OF[name], SIZE)


def built(name, device='cpu', **kwargs):
    """A fresh copy of ``name`` in float32 eval mode on ``device`` (built once, seeded)."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _models:
        torch.manual_seed(0)
        _models[key] = timm.create_model(name, **MODEL_KWARGS.get(FAMILY_OF[name], {}), **kwargs).eval()
    return copy.deepcopy(_models[key]).to(device)


def batch(name, size=2, device='cpu'):
    return images((size_of(name),) * 2, batch=size).to(device)


def run_in_child(check, *args, start='fork'):
    """Runs ``check(*args)`` in a child process: a crash in a native kernel fails the test with the signal
    that ended the child instead of ending pytest; a failed check fails it with the child's traceback.
    ``start='spawn'`` for checks that run a backward (see tests/child_checks.py); forking is quicker."""
    context = multiprocessing.get_context(start)
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=child_checks.report_to, args=(sender, check, args))
    child.start()
    sender.close()
    child.join(CHILD_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f'the check did not end within {CHILD_TIMEOUT_S} s')
    if child.exitcode < 0:
        pytest.fail(f'the process died of {signal.Signals(-child.exitcode).name}')
    report = receiver.recv() if receiver.poll() else f'the child ended (exit status {child.exitcode}) without a report'
    assert not report, report


# ----------------------------------------------------------------------------- a NaN stays in its sample

def check_nan_stays_in_its_sample(model, x, poisoned_value):
    with torch.no_grad():
        clean = model(x)
        x = x.clone()
        x[1, :, 5, 7] = poisoned_value
        out = model(x)
    assert torch.equal(out[0], clean[0]), 'a non-finite value in sample 1 changed the output of sample 0'
    assert not torch.isfinite(out[1]).all(), 'sample 1 had a non-finite pixel, its output is all finite'


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', MODELS)
def test_nan_stays_in_its_sample(name, device, one_thread):
    model, x = built(name, device), batch(name, device=device)
    if device == 'cpu':
        run_in_child(check_nan_stays_in_its_sample, model, x, float('nan'))
    else:  # CUDA does not survive a fork
        check_nan_stays_in_its_sample(model, x, float('nan'))


@pytest.mark.parametrize('poisoned_value', [float('inf'), float('-inf')])
def test_inf_stays_in_its_sample_litv2(poisoned_value, one_thread):
    """LITv2 (NaN offsets segfaulted torchvision's CPU kernel): an infinite pixel too."""
    run_in_child(check_nan_stays_in_its_sample, built('litv2_small'), batch('litv2_small'), poisoned_value)


def test_deform_conv_nonfinite_offsets(one_thread):
    """LITv2's deformable conv with NaN / +-inf offsets (torchvision's CPU kernel indexes memory with NaN
    ones): no crash, forward or backward; NaN exactly at the positions whose offsets are not finite."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=generator, requires_grad=True)
    weight = torch.randn(5, 3, 2, 2, generator=generator, requires_grad=True)
    run_in_child(child_checks.check_deform_conv_nonfinite_offsets, x, weight, torch.zeros(5, requires_grad=True),
                 start='spawn')


def test_train_step_with_nan_litv2(one_thread):
    """A diverging training step (non-finite activations in training mode, where BatchNorm mixes the
    batch) ends in a non-finite loss for the trainer to see, not in a dead process."""
    run_in_child(child_checks.check_train_step_with_nan, built('litv2_small'), batch('litv2_small'), start='spawn')


# ----------------------------------------------------------------------------- an empty batch

def check_empty_batch(name, device):
    """Forward and backward at B=0 in training mode; forward_intermediates and features_only at B=0,
    each shaped as at B=1 but for the batch."""
    model = built(name, device).train()
    # torch's BatchNorm counts every training call, empty or not (num_batches_tracked); the statistics stay
    buffers = {k: v.clone() for k, v in model.named_buffers() if not k.endswith('num_batches_tracked')}
    x = batch(name, size=0, device=device).requires_grad_()
    logits = model(x)
    assert logits.shape == (0, model.num_classes)
    logits.sum().backward()
    assert x.grad.shape == x.shape
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads, 'no parameter got a gradient from an empty batch'
    assert all(not g.any() for g in grads.values()), 'an empty batch gave a non-zero gradient'
    for key, value in model.named_buffers():
        assert key not in buffers or torch.equal(value, buffers[key]), f'an empty batch changed the buffer {key}'

    model.eval()
    one, empty = batch(name, size=1, device=device), batch(name, size=0, device=device)
    with torch.no_grad():
        final_one, inter_one = model.forward_intermediates(one)
        final, inter = model.forward_intermediates(empty)
        features_model = built(name, device, features_only=True)
        features_one, features = features_model(one), features_model(empty)
    for what, want, got in [('forward_intermediates', [final_one, *inter_one], [final, *inter]),
                            ('features_only', features_one, features)]:
        assert [t.shape[1:] for t in got] == [t.shape[1:] for t in want] and all(t.shape[0] == 0 for t in got), (
            f'{what} at B=0: {[tuple(t.shape) for t in got]}, at B=1: {[tuple(t.shape) for t in want]}')


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', MODELS + GUARDED_VARIANTS)
def test_empty_batch(name, device, one_thread):
    """An empty batch gives empty outputs and zero gradients (see :func:`check_empty_batch`)."""
    check_empty_batch(name, device)


@pytest.fixture
def without_empty_batch_guard(monkeypatch):
    """timm's own forward on the classes backbones/_timm_empty_batch.py guards, for this test."""
    for cls in GUARDED_FORWARDS:
        monkeypatch.setattr(cls, 'forward', cls._timm_forward)


def training_step(model, x):
    """Logits, input gradient and parameter gradients of one backward of a fixed function of the logits."""
    x = x.clone().requires_grad_()
    logits = model(x)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return [logits, x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize('name', [SMALLEST['maxxvit'], 'eca_halonext26ts'])  # every guarded class
def test_empty_batch_guard_changes_nothing_at_b2(name, request, one_thread):
    """At B > 0 the guarded timm models compute exactly what timm's own modules do: logits and gradients
    bit-identical with and without the guard (training mode)."""
    model, x = built(name).train(), batch(name)
    guarded = training_step(model, x)
    assert {type(m) for m in model.modules()} & set(GUARDED_FORWARDS), f'{name} has no guarded module'
    request.getfixturevalue('without_empty_batch_guard')
    model.zero_grad(set_to_none=True)
    timm_own = training_step(model, x)
    assert all(torch.equal(a, b) for a, b in zip(guarded, timm_own, strict=True))


@pytest.mark.slow
def test_empty_batch_guard_exports(one_thread):
    """torch.export of a guarded model (MaxViT) with a dynamic batch: the program computes what the eager
    model does at another batch size."""
    name = SMALLEST['maxxvit']
    model = built(name)
    program = torch.export.export(model, (batch(name),), dynamic_shapes=({0: torch.export.Dim('batch', max=64)},))
    x = batch(name, size=3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.slow
def test_empty_batch_guard_compiles(one_thread):
    """torch.compile of a guarded model (HaloNet with ECA): the eager model's outputs at B=2 and at B=0."""
    name = 'eca_halonext26ts'
    model = built(name)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        for size in (2, 0):
            x = batch(name, size=size)
            torch.testing.assert_close(compiled(x), model(x))


# ----------------------------------------------------------------------------- half precision

def assert_close_to_float(out, reference, dtype):
    assert torch.isfinite(out).all(), f'{dtype} output is not finite'
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error <= HALF_TOLERANCE[dtype], f'{dtype}: max error {error:.4f} of the largest logit'


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('name', MODELS)
def test_half_precision(name, dtype, device, one_thread):
    """The model converted (``.to(dtype)``: what ``.half()`` / ``.bfloat16()`` do), and the float32 model
    under autocast: finite, and close to the float32 output."""
    model, x = built(name, device), batch(name, device=device)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast(device, dtype=dtype):
            out = model(x)
        assert_close_to_float(out, reference, dtype)
        model = model.to(dtype)
        out = model(x.to(dtype))
    assert out.dtype == dtype
    assert_close_to_float(out, reference, dtype)


@pytest.mark.parametrize('dtype, device', [
    (torch.bfloat16, 'cpu'),  # CPU mixed precision is bf16 (tools/train.py --amp)
    # fp16 convolution backward on CPU runs a slow path (HaloNet's takes ~100 s)
    pytest.param(torch.float16, 'cpu', marks=pytest.mark.slow),
    gpu_param(torch.bfloat16, 'cuda'),
    gpu_param(torch.float16, 'cuda'),
], ids=['bf16-cpu', 'fp16-cpu', 'bf16-cuda', 'fp16-cuda'])
@pytest.mark.parametrize('name', MODELS)
def test_autocast_training_step(name, dtype, device, one_thread):
    """Forward and backward of a classification loss under autocast (mixed-precision training): the
    parameters' gradients are finite."""
    model, x = built(name, device).train(), batch(name, device=device)
    targets = torch.arange(x.shape[0], device=device)
    with torch.autocast(device, dtype=dtype):
        loss = F.cross_entropy(model(x).float(), targets)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and torch.isfinite(loss)
    broken = [n for n, grad in grads.items() if not torch.isfinite(grad).all()]
    assert not broken, f'non-finite gradients under {dtype} autocast: {broken[:5]}'
