"""timm conformance suite: one set of generic checks, parametrized over every family attnzoo supports.

It follows what timm's own tests/test_models.py checks. attnzoo's families are discovered from the
modules of attnzoo.backbones; the timm-native families attnzoo supports (MaxViT, DaViT, SHViT,
HaloNet) run through the same tests. Full forward / backward runs on the smallest variant of each
family; parameter counts are checked for every variant on the meta device.
"""
import pkgutil
import sys

import pytest
import timm
import torch

import attnzoo.backbones
from reference_params import OFFICIAL_PARAMS

# timm-native families: timm module name -> the variants attnzoo supports (the papers' models).
TIMM_NATIVE = {
    'maxxvit': ['maxvit_tiny_tf_224', 'maxvit_tiny_tf_384', 'maxvit_tiny_tf_512', 'maxvit_small_tf_224',
                'maxvit_base_tf_224', 'maxvit_large_tf_224'],
    'davit': ['davit_tiny', 'davit_small', 'davit_base'],
    'shvit': ['shvit_s1', 'shvit_s2', 'shvit_s3', 'shvit_s4'],
    'byoanet': ['halonet_h1', 'halonet26t', 'sehalonet33ts', 'halonet50ts', 'eca_halonext26ts'],
}

# Sizes that timm's own models reject, each with the reason (recorded as expected failures until the
# dense-prediction work makes any size reach them).
TIMM_REJECTED_SIZES = {
    'maxxvit': 'timm MaxViT needs the map at every stage to be a multiple of its 7x7 window and grid',
    'byoanet': 'timm HaloNet needs every stage map to be a multiple of its 8x8 attention block',
}

ODD_SIZE = (230, 190)


def attnzoo_families():
    """attnzoo family module name -> its registered variants."""
    families = {}
    for info in pkgutil.iter_modules(attnzoo.backbones.__path__):
        if info.name.startswith('_'):
            continue
        variants = timm.list_models(module=info.name)
        if variants:
            families[info.name] = variants
    return families


FAMILIES = {**attnzoo_families(), **TIMM_NATIVE}
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


def default_size(name):
    return tuple(timm.get_pretrained_cfg(name).input_size[1:])


def build(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    return model.eval()


def images(size, batch=1, chans=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, chans, *size, generator=generator)


def family_module(model):
    return sys.modules[type(model).__module__]


@pytest.fixture(scope='module', params=SMALL_MODELS)
def small_model(request):
    """The smallest variant of each family, built once per family for the cheap checks."""
    return request.param, build(request.param)


def test_every_family_is_covered():
    attnzoo_names = set(attnzoo_families())
    assert 'cswin' in attnzoo_names, 'CSWin, the first family, must be registered by attnzoo.backbones'
    for variant in ALL_VARIANTS:
        assert variant in OFFICIAL_PARAMS, f'{variant} has no official parameter count in tests/reference_params.py'


@pytest.mark.parametrize('name', ALL_VARIANTS)
def test_param_count_matches_official(name):
    assert param_count(name) == OFFICIAL_PARAMS[name]


def test_forward_default_size(small_model):
    name, model = small_model
    with torch.no_grad():
        logits = model(images(default_size(name), batch=2))
    assert logits.shape == (2, model.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_forward_odd_size(name, request):
    family = FAMILY_OF[name]
    if family in TIMM_REJECTED_SIZES:
        request.applymarker(pytest.mark.xfail(reason=TIMM_REJECTED_SIZES[family], raises=AssertionError, strict=True))
    model = build(name)
    with torch.no_grad():
        logits = model(images(ODD_SIZE))
    assert logits.shape == (1, model.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize('name, size', [
    ('maxvit_tiny_tf_224', (230, 190)),
    ('maxvit_tiny_tf_224', (256, 320)),
    ('halonet26t', (224, 224)),
])
def test_sizes_timm_rejects_are_recorded(name, size, request):
    """The sizes measured to fail on timm's own MaxViT and HaloNet: an expected failure each, with its
    reason, so the day timm (or our dense-prediction work) accepts them this test says so."""
    request.applymarker(pytest.mark.xfail(reason=TIMM_REJECTED_SIZES[FAMILY_OF[name]], raises=AssertionError,
                                          strict=True))
    with torch.no_grad():
        build(name)(images(size))


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_backward_gives_finite_gradients_to_every_parameter(name):
    model = build(name).train()
    model(images(default_size(name), batch=2)).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'parameters without a gradient: {missing[:10]}'
    broken = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not broken, f'non-finite gradients: {broken[:10]}'


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


def test_forward_intermediates_agree_with_features_only(small_model):
    name, model = small_model
    features_model = build(name, features_only=True)
    x = images(default_size(name))
    with torch.no_grad():
        features = features_model(x)
        final, intermediates = model.forward_intermediates(x)
        only = model.forward_intermediates(x, intermediates_only=True)
        reference_final = model.forward_features(x)
    assert len(intermediates) == len(features)
    for got, expected, again in zip(intermediates, features, only):
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(again, expected)
    torch.testing.assert_close(final, reference_final)


def test_reset_classifier_and_num_features(small_model):
    name, _ = small_model
    model = build(name)
    model.reset_classifier(0)
    with torch.no_grad():
        pooled = model(images(default_size(name), batch=2))
    assert pooled.shape == (2, model.num_features if not hasattr(model, 'head_hidden_size') else model.head_hidden_size)
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(images(default_size(name))).shape == (1, 7)


@pytest.mark.parametrize('name', SMALL_MODELS)
def test_grad_checkpointing_gives_same_output(name):
    model = build(name).train()
    x = images(default_size(name), batch=2)
    torch.manual_seed(0)
    expected = model(x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    got = model(x)
    torch.testing.assert_close(got, expected)
    got.sum().backward()


def test_pretrained_cfg_fields(small_model):
    name, model = small_model
    cfg = model.pretrained_cfg
    for field in ('input_size', 'mean', 'std', 'num_classes', 'first_conv', 'classifier', 'crop_pct', 'interpolation'):
        assert cfg.get(field) is not None, f'pretrained_cfg of {name} has no {field}'
    assert cfg.get('url') or cfg.get('hf_hub_id') or cfg.get('file'), f'{name} names no weight source'
    modules = dict(model.named_modules())
    first_conv = modules[cfg['first_conv']]
    assert first_conv.in_channels == cfg['input_size'][0]
    classifier = modules[cfg['classifier']]
    out_features = classifier.out_features if hasattr(classifier, 'out_features') else classifier.out_channels
    assert out_features == cfg['num_classes'] == model.num_classes


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
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend='aot_eager', fullgraph=family not in TIMM_NATIVE)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


class TestBadInput:
    """attnzoo families say what was wrong with a bad input (timm's own families are timm's business)."""

    @pytest.fixture(scope='class', params=sorted(attnzoo_families()))
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
