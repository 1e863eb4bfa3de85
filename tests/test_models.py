"""timm conformance suite: one set of generic checks, parametrized over every family attnzoo supports.

It follows what timm's own tests/test_models.py checks (default-config consistency, TorchScript, FX
forward and backward, feature extraction, gradient checkpointing) and what timm's models document for
``forward_intermediates`` / ``prune_intermediate_layers``. attnzoo's families are discovered from the
modules of attnzoo.backbones; the timm-native families attnzoo supports (MaxViT, DaViT, SHViT, HaloNet)
run through the same tests. Full forward / backward runs on the smallest variant of each family, at
timm's test sizes (128 px where the model allows it); parameter counts are checked for every variant
on the meta device.

What a family must do to pass: see the ``PyramidBackbone`` / ``PyramidStage`` docstrings in
backbones/_pyramid.py. Where a timm-native family behaves differently, the difference is recorded
below as an exact expectation (timm's own message, where timm raises), not skipped.
"""
import re
import sys

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from attnzoo.backbones._families import TIMM_NATIVE_FAMILIES, attnzoo_families
from reference_params import OFFICIAL_PARAMS, README_PARAMS_M

# Sizes that timm's own models reject: (the timm file that raises, the message it raises with, why).
# HaloNet's check has an empty message, so the file is what identifies it.
TIMM_REJECTED_SIZES = {
    'maxxvit': ('timm/models/maxxvit.py', r'must be divisible by (window|grid)',
                'timm MaxViT needs the map at every stage to be a multiple of its 7x7 window and grid'),
    'byoanet': ('timm/layers/halo_attn.py', r'^$',
                'timm HaloNet needs every stage map to be a multiple of its 8x8 attention block'),
}

# timm's timm-native families only give NCHW intermediates; their forward_intermediates says so.
TIMM_NCHW_ONLY_MESSAGE = 'Output shape must be NCHW'

# Where the blocks live, per family: the modules gradient checkpointing wraps one at a time.
# attnzoo families follow PyramidStage (stages.N.blocks.M).
BLOCK_PATTERNS = {
    'maxxvit': r'stages\.\d+\.blocks\.\d+',
    'davit': r'stages\.\d+\.blocks\.\d+',
    'shvit': r'stages\.\d+\.blocks\.\d+',
    'byoanet': r'stages\.\d+\.\d+',
}
ATTNZOO_BLOCK_PATTERN = r'stages\.\d+\.blocks\.\d+'

# timm's DaVit checkpoints at two levels (each stage as a whole, in forward_features and
# forward_intermediates, and inside it each block), so with torch's nested checkpointing all but the
# last block of a multi-block stage run three times per training step. timm's to fix; recorded
# exactly (per block of the variant tested) so the day it changes, this test says so.
TIMM_BLOCK_FORWARDS_PER_STEP = {'davit_tiny': [2, 2, 3, 3, 2, 2]}

ODD_SIZE = (230, 190)
TEST_SIZE = 128  # timm's tests run TorchScript, FX and backward at 128 px where the model allows


ATTNZOO_FAMILIES = attnzoo_families()
FAMILIES = {**ATTNZOO_FAMILIES, **TIMM_NATIVE_FAMILIES}
ALL_VARIANTS = sorted(v for variants in FAMILIES.values() for v in variants)


def param_count(name, **kwargs):
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def smallest_variant(variants):
    """The smallest variant with released weights (timm's halonet_h1, for one, is untrained)."""
    trained = [v for v in variants if timm.get_pretrained_cfg(v).tag != 'untrained']
    return min(trained, key=param_count)


SMALLEST = {family: smallest_variant(variants) for family, variants in FAMILIES.items()}
FAMILY_OF = {variant: family for family, variants in FAMILIES.items() for variant in variants}
SMALL_MODELS = sorted(SMALLEST.values())
ATTNZOO_SMALL_MODELS = sorted(SMALLEST[family] for family in ATTNZOO_FAMILIES)


def default_size(name):
    return tuple(timm.get_pretrained_cfg(name).input_size[1:])


def size_for_tests(name, target=TEST_SIZE):
    """timm's rule (its tests' ``_get_input_size``): the default size capped at ``target``, unless the
    model declares a fixed input size, or a minimum one."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg.fixed_input_size:
        return tuple(cfg.input_size[1:])
    if cfg.min_input_size and max(cfg.input_size) > target:
        return tuple(cfg.min_input_size[1:])
    return tuple(min(s, target) for s in cfg.input_size[1:])


def build(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    return model.eval()


def images(size, batch=1, chans=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, chans, *size, generator=generator)


def family_module(model):
    return sys.modules[type(model).__module__]


def to_nchw(x, fmt):
    return x.permute(0, 3, 1, 2) if fmt == 'NHWC' else x


def feature_modules(model):
    """The modules whose outputs are the model's features, as its feature_info names them."""
    return [model.get_submodule(info['module']) for info in model.feature_info]


class ForwardCounter:
    """Counts the forward calls of modules (when each starts: a recomputation may stop early) and keeps
    each one's last output."""

    def __init__(self, modules):
        self.calls = [0] * len(modules)
        self.outputs = [None] * len(modules)
        self.handles = []
        for i, module in enumerate(modules):
            self.handles.append(module.register_forward_pre_hook(lambda m, args, i=i: self._start(i)))
            self.handles.append(module.register_forward_hook(lambda m, args, out, i=i: self._end(i, out)))

    def _start(self, i):
        self.calls[i] += 1

    def _end(self, i, out):
        self.outputs[i] = out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def assert_raised_by_timm(excinfo, timm_file, message):
    """The AssertionError came from ``timm_file`` (the innermost frame outside torch) with ``message``:
    a failure of the test's own asserts cannot pass for it."""
    assert re.search(message, str(excinfo.value)), f'timm raised {excinfo.value!r}, expected /{message}/'
    frames = [entry for entry in excinfo.traceback if '/torch/' not in str(entry.path)]
    assert str(frames[-1].path).endswith(timm_file), f'the AssertionError came from {frames[-1].path}, not {timm_file}'


@pytest.fixture(scope='module', params=SMALL_MODELS)
def small_model(request):
    """The smallest variant of each family, built once per family for the checks that do not change it."""
    return request.param, build(request.param)


def test_every_family_is_covered():
    assert 'cswin' in ATTNZOO_FAMILIES, 'CSWin, the first family, must be registered by attnzoo.backbones'
    for variant in ALL_VARIANTS:
        assert variant in OFFICIAL_PARAMS, f'{variant} has no official parameter count in tests/reference_params.py'


@pytest.mark.parametrize('name', ALL_VARIANTS)
def test_param_count_matches_official(name):
    """Against the official code's exact count. For the timm-native families that is the official
    code's count where it could be run (DaViT, SHViT); MaxViT (TensorFlow only) and HaloNet (no official
    code) are checked against timm's own count, i.e. timm against itself, and MaxViT also against the
    rounded count of its official README (provenance in tests/reference_params.py)."""
    count = param_count(name)
    assert count == OFFICIAL_PARAMS[name]
    if name in README_PARAMS_M:
        assert round(count / 1e6) == README_PARAMS_M[name]


def test_forward_default_size(small_model):
    name, model = small_model
    with torch.no_grad():
        logits = model(images(default_size(name), batch=2))
    assert logits.shape == (2, model.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_forward_odd_size(name):
    family = FAMILY_OF[name]
    model = build(name)
    if family in TIMM_REJECTED_SIZES:
        timm_file, message, _ = TIMM_REJECTED_SIZES[family]
        with torch.no_grad(), pytest.raises(AssertionError) as excinfo:
            model(images(ODD_SIZE))
        assert_raised_by_timm(excinfo, timm_file, message)
        return
    with torch.no_grad():
        logits = model(images(ODD_SIZE))
    assert logits.shape == (1, model.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize('name, size', [
    ('maxvit_tiny_tf_224', (230, 190)),
    ('maxvit_tiny_tf_224', (256, 320)),
    ('halonet26t', (224, 224)),
])
def test_sizes_timm_rejects_are_recorded(name, size):
    """The sizes measured to fail on timm's own MaxViT and HaloNet, each failing with timm's own check,
    so the day timm accepts them this test says so. attnzoo leaves timm's models as they are; its
    OpenMMLab wrapper pads them to what they take (tests/test_heads.py, the sizes reaching them)."""
    timm_file, message, _ = TIMM_REJECTED_SIZES[FAMILY_OF[name]]
    model = build(name)
    with torch.no_grad(), pytest.raises(AssertionError) as excinfo:
        model(images(size))
    assert_raised_by_timm(excinfo, timm_file, message)


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_default_cfg_agrees_with_the_model(name):
    """timm's test_model_default_cfgs: the pretrained config's input size, pool size, class count,
    classifier and first conv describe the model, and ``forward_features`` is unpooled in the layout
    the model declares (``output_fmt``). Shapes only, so on the meta device."""
    with torch.device('meta'):
        model = timm.create_model(name).eval()
        unpooled_model = timm.create_model(name, num_classes=0, global_pool='').eval()
        x = torch.empty(1, *model.pretrained_cfg['input_size'])
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    for field in ('input_size', 'pool_size', 'mean', 'std', 'num_classes', 'first_conv', 'classifier',
                  'crop_pct', 'interpolation'):
        assert cfg.get(field) is not None, f'pretrained_cfg of {name} has no {field}'
    assert cfg.get('url') or cfg.get('hf_hub_id') or cfg.get('file'), f'{name} names no weight source'
    assert model.num_classes == cfg['num_classes'] and model.num_features > 0 and model.head_hidden_size > 0
    classifiers = cfg['classifier'] if isinstance(cfg['classifier'], (tuple, list)) else (cfg['classifier'],)
    for classifier in classifiers:
        assert state_dict[f'{classifier}.weight'].shape[0] == cfg['num_classes'], f'{classifier} is not the classifier'
    first_convs = cfg['first_conv'] if isinstance(cfg['first_conv'], (tuple, list)) else (cfg['first_conv'],)
    for first_conv in first_convs:
        assert state_dict[f'{first_conv}.weight'].shape[1] == cfg['input_size'][0], f'{first_conv} does not take the image'

    fmt = getattr(model, 'output_fmt', 'NCHW')
    spatial, channel = get_spatial_dim(fmt), get_channel_dim(fmt)
    features = model.forward_features(x)
    assert features.ndim == 4 and tuple(features.shape[i] for i in spatial) == tuple(cfg['pool_size']), (
        f'unpooled features {list(features.shape)} ({fmt}) do not match pool_size {cfg["pool_size"]}')
    assert features.shape[channel] == model.num_features
    assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0
    assert model(x).shape == (1, model.head_hidden_size)
    model.reset_classifier(0, '')
    assert model(x).shape == features.shape
    assert unpooled_model(x).shape == features.shape


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_torchscript_forward(name):
    """timm's test_model_forward_torchscript, compared with eager."""
    with timm.set_scriptable(True):
        model = build(name)
    scripted = torch.jit.script(model)
    x = images(size_for_tests(name))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)


def fx_graph_model(model, train=False):
    """timm's ``_create_fx_model``: trace with timm's leaf modules and functions, return the output."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def test_fx_forward(small_model):
    """timm's test_model_forward_fx: the traced graph computes what the model computes."""
    name, model = small_model
    x = images(size_for_tests(name))
    with torch.no_grad():
        expected = model(x)
        (got,) = fx_graph_model(model)(x).values()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_fx_backward(name):
    """timm's test_model_backward_fx: every parameter gets a gradient through the traced graph."""
    model = build(name, num_classes=42).train()
    graph = fx_graph_model(model, train=True)
    (out,) = graph(images(size_for_tests(name), batch=2)).values()
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in graph.named_parameters() if p.grad is None]
    assert not missing, f'parameters without a gradient through FX: {missing[:10]}'


@pytest.mark.parametrize('name', ATTNZOO_SMALL_MODELS)
def test_plain_fx_symbolic_trace_keeps_the_input_checks(name):
    """attnzoo families trace with plain ``torch.fx.symbolic_trace`` too (no timm tracer), and the
    traced graph still checks its input: the checks are one recorded call, not dropped."""
    model = build(name)
    graph = torch.fx.symbolic_trace(model)
    x = images(size_for_tests(name))
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x))
        with pytest.raises(ValueError, match='channel'):
            graph(images(size_for_tests(name), chans=1))


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_fx_features_only(name):
    """``features_only=True, feature_cls='fx'`` (timm's FX feature extraction) gives the same features,
    in the layout its ``output_fmt`` declares, as the default feature extraction."""
    x = images(size_for_tests(name))
    fx_features = build(name, features_only=True, feature_cls='fx')
    with torch.no_grad():
        expected = build(name, features_only=True)(x)
        got = fx_features(x)
    assert len(got) == len(expected)
    fmt = getattr(fx_features, 'output_fmt', 'NCHW')
    for got_i, expected_i in zip(got, expected):
        torch.testing.assert_close(to_nchw(got_i, fmt), expected_i)


def test_features_only_matches_feature_info(small_model):
    name, _ = small_model
    model = build(name, features_only=True)
    size = default_size(name)
    with torch.no_grad():
        features = model(images(size))
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(features) == len(channels) == len(reductions)
    for feature, chans, reduction in zip(features, channels, reductions):
        assert feature.shape[1] == chans
        # padded strided convs round up (SHViT's reduction 64 on 224 px gives 4x4)
        assert feature.shape[2:] == (-(-size[0] // reduction), -(-size[1] // reduction))


def test_forward_intermediates_agree_with_stage_outputs(small_model):
    """What the plain forward computes at each feature_info module (captured by forward hooks, in the
    model's ``output_fmt``) is what ``forward_intermediates`` and ``features_only`` return (NCHW), and
    the final output of ``forward_intermediates`` is what the forward got from ``forward_features``."""
    name, model = small_model
    x = images(size_for_tests(name))
    fmt = getattr(model, 'output_fmt', 'NCHW')
    forward_features = model.forward_features
    features_seen = []
    model.forward_features = lambda x: features_seen.append(forward_features(x)) or features_seen[-1]
    try:
        with torch.no_grad(), ForwardCounter(feature_modules(model)) as stages:
            model(x)
    finally:
        del model.forward_features  # the instance attribute; the method is back
    expected = [to_nchw(out, fmt) for out in stages.outputs]
    with torch.no_grad():
        features = build(name, features_only=True)(x)
        final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) == len(features) == len(expected)
    for i, want in enumerate(expected):
        torch.testing.assert_close(intermediates[i], want, msg=f'forward_intermediates, feature {i}')
        torch.testing.assert_close(features[i], want, msg=f'features_only, feature {i}')
    torch.testing.assert_close(final, features_seen[0])


def test_forward_intermediates_stop_early(small_model):
    """``stop_early`` returns the same feature and runs none of the later stages."""
    name, model = small_model
    x = images(size_for_tests(name))
    modules = feature_modules(model)
    with torch.no_grad():
        _, everything = model.forward_intermediates(x)
        with ForwardCounter(modules) as stages:
            (early,) = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early, everything[1])
    assert stages.calls[:2] == [1, 1] and not any(stages.calls[2:]), (
        f'forward calls of the feature modules with stop_early at feature 1: {stages.calls}')


def test_forward_intermediates_norm(small_model):
    """``norm=True`` applies the final norm to the last intermediate: it is then ``forward_features``."""
    name, model = small_model
    x = images(size_for_tests(name))
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, norm=True)
        features = model.forward_features(x)
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(intermediates[-1], to_nchw(features, getattr(model, 'output_fmt', 'NCHW')))


def test_forward_intermediates_nhwc(small_model):
    """``output_fmt='NHWC'`` gives the NCHW intermediates, channels last."""
    name, model = small_model
    x = images(size_for_tests(name))
    if FAMILY_OF[name] in TIMM_NATIVE_FAMILIES:
        with pytest.raises(AssertionError, match=TIMM_NCHW_ONLY_MESSAGE):
            model.forward_intermediates(x, output_fmt='NHWC')
        return
    with torch.no_grad():
        nchw = model.forward_intermediates(x, intermediates_only=True)
        nhwc = model.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
    for a, b in zip(nchw, nhwc):
        assert b.shape == (a.shape[0], *a.shape[2:], a.shape[1])
        torch.testing.assert_close(b, a.permute(0, 2, 3, 1))


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_forward_intermediates_after_prune(name):
    """``prune_intermediate_layers`` drops what the kept features do not need (as timm's models do:
    the later stages, the final norm and the head) and the kept features do not change."""
    model = build(name)
    x = images(size_for_tests(name))
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
    keep = [0, len(full) - 2]
    before = sum(p.numel() for p in model.parameters())
    assert model.prune_intermediate_layers(keep, prune_norm=True) == keep
    assert model.num_classes == 0
    assert sum(p.numel() for p in model.parameters()) < before, 'the last stage was not pruned'
    assert model.num_features == model.feature_info[keep[-1]]['num_chs']
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=keep, intermediates_only=True)
        out = model(x)
    for i, got in zip(keep, pruned):
        torch.testing.assert_close(got, full[i], msg=f'feature {i} after pruning')
    assert out.shape[get_channel_dim(getattr(model, 'output_fmt', 'NCHW'))] == model.num_features


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_training_step_gradients_and_checkpointing(name):
    """One training step gives a finite gradient to every parameter (timm's test_model_backward). With
    gradient checkpointing (at one level), through ``forward`` and through ``forward_intermediates``,
    every block's forward runs exactly twice per step (once, and once recomputed in the backward
    pass) and the outputs and gradients are those without checkpointing."""
    pattern = re.compile(BLOCK_PATTERNS.get(FAMILY_OF[name], ATTNZOO_BLOCK_PATTERN) + '$')
    model = build(name).train()
    blocks = [m for n, m in model.named_modules() if pattern.match(n)]
    assert blocks, f'no module of {name} matches {pattern.pattern}'
    expected_calls = TIMM_BLOCK_FORWARDS_PER_STEP.get(name, [2] * len(blocks))
    x = images(size_for_tests(name), batch=2)

    def step(forward):
        model.zero_grad(set_to_none=True)
        with ForwardCounter(blocks) as counter:
            out = forward(x)
            out.float().square().mean().backward()
        return out.detach(), counter.calls, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    def through_intermediates(x):
        return torch.cat([f.flatten(1) for f in model.forward_intermediates(x, intermediates_only=True)], dim=1)

    torch.manual_seed(0)
    reference, calls, reference_grads = step(model)
    assert calls == [1] * len(blocks)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in reference_grads]
    assert not missing, f'parameters without a gradient: {missing[:10]}'
    broken = [n for n, grad in reference_grads.items() if not torch.isfinite(grad).all()]
    assert not broken, f'non-finite gradients: {broken[:10]}'

    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    out, calls, grads = step(model)
    assert calls == expected_calls, f'block forward calls in one step with checkpointing: {calls}'
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grads, reference_grads)

    out, calls, _ = step(through_intermediates)
    assert calls == expected_calls, f'block forward calls in one step through forward_intermediates: {calls}'
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        torch.testing.assert_close(out, through_intermediates(x))


def test_checkpoint_filter_fn_round_trips_own_state_dict(small_model):
    name, model = small_model
    filter_fn = getattr(family_module(model), 'checkpoint_filter_fn', None)
    assert filter_fn is not None, f'the module of {name} has no checkpoint_filter_fn'
    fresh = build(name, seed=123)
    state_dict = model.state_dict()
    fresh.load_state_dict(filter_fn(dict(state_dict), fresh), strict=True)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state_dict[key], msg=f'{key} changed in the round trip')


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_torch_compile_runs(family):
    """Dynamo + AOTAutograd trace the smallest variant and agree with eager; attnzoo families must trace
    as one graph (no data-dependent Python control flow). The aot_eager backend skips Inductor's C++
    code generation, which would cost minutes per model on 2 CPU cores and checks nothing of ours."""
    name = SMALLEST[family]
    model = build(name)
    x = images(default_size(name))
    # as a user's process: from a fresh Dynamo state (after tests/test_kernel_ops.py's compiles in the same
    # process, CSWin-T's trace took 118 s instead of 11 s)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend='aot_eager', fullgraph=family not in TIMM_NATIVE_FAMILIES)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


class TestBadInput:
    """attnzoo families say what was wrong with a bad input (timm's own families are timm's business)."""

    @pytest.fixture(scope='class', params=sorted(ATTNZOO_FAMILIES))
    def attnzoo_model(self, request):
        name = SMALLEST[request.param]
        return name, build(name)

    def test_unknown_model_name(self):
        with pytest.raises(RuntimeError, match='Unknown model'):
            timm.create_model('cswin_tiny_225')

    def test_wrong_channel_count(self, attnzoo_model):
        name, model = attnzoo_model
        with pytest.raises(ValueError, match='channel'):
            model(images(default_size(name), chans=1))

    def test_image_smaller_than_total_stride(self, attnzoo_model):
        _, model = attnzoo_model
        with pytest.raises(ValueError, match='stride|smaller'):
            model(images((16, 16)))

    def test_checkpoint_with_mismatched_keys_lists_them(self, attnzoo_model):
        name, model = attnzoo_model
        filter_fn = family_module(model).checkpoint_filter_fn
        state_dict = dict(model.state_dict())
        removed = next(iter(state_dict))
        state_dict.pop(removed)
        state_dict['not_a_layer.weight'] = torch.zeros(1)
        with pytest.raises((KeyError, ValueError, RuntimeError)) as info:
            model.load_state_dict(filter_fn(state_dict, model), strict=True)
        assert removed in str(info.value) and 'not_a_layer' in str(info.value)
