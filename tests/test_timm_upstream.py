"""timm's own model tests (its tests/test_models.py, vendored as tests/timm_upstream_test_models.py) on every
attnzoo variant and every MaxViT and HaloNet variant attnzoo ships (timm's models with attnzoo's empty-batch
guard): the checks every timm model passes (forward, backward, default cfgs, TorchScript, features,
forward_intermediates, FX, FX + TorchScript), run as timm runs them.

All of them are ``slow`` (TorchScript and FX of every variant take minutes on 2 CPU cores) but the cases
that broke before (TransNeXt under FX + TorchScript, the empty-batch guard and CrossFormer++ under
TorchScript); the families' own tests and tests/test_models.py cover the same API cheaply by default.
Tests that download pretrained weights are left out (no network here; the families' own tests load
official layouts).
"""
import importlib.util
import warnings
from pathlib import Path

import pytest

import attnzoo.backbones  # noqa: F401  (registers the models)
from attnzoo.backbones._families import TIMM_NATIVE_FAMILIES, attnzoo_families
from attnzoo.backbones._timm_empty_batch import GUARDED_FAMILIES

_SPEC = importlib.util.spec_from_file_location(
    'timm_upstream_test_models', Path(__file__).with_name('timm_upstream_test_models.py'))
upstream = importlib.util.module_from_spec(_SPEC)
with warnings.catch_warnings():  # its CI marks (base, timeout), which this suite does not register
    warnings.simplefilter('ignore', pytest.PytestUnknownMarkWarning)
    _SPEC.loader.exec_module(upstream)

# the per-model tests of the upstream file (the pretrained-download ones and single-model ones left out)
MODEL_TESTS = (
    'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_torchscript',
    'test_model_forward_features', 'test_model_forward_intermediates_features', 'test_model_forward_intermediates',
    'test_model_forward_fx', 'test_model_backward_fx', 'test_model_forward_fx_torchscript',
)
# attnzoo's variants, and timm's MaxViT and HaloNet ones, whose modules attnzoo guards for an empty batch
# (backbones/_timm_empty_batch.py: timm's tests check that the guard keeps TorchScript, FX and features working)
VARIANTS = ([name for names in attnzoo_families().values() for name in names]
            + [name for family in GUARDED_FAMILIES for name in TIMM_NATIVE_FAMILIES[family]])
# in the default run, cases that failed: TransNeXt's FX + TorchScript ('Don't support conversion in
# JoinedStr', the op's Python checks); the empty-batch guard under TorchScript ("Can't redefine method"),
# on the variant that has both kinds of guarded module; CrossFormer++ (its activation cooling) under
# TorchScript, reported failing
DEFAULT = {('test_model_forward_fx_torchscript', 'transnext_micro'),
           ('test_model_forward_torchscript', 'eca_halonext26ts'),
           ('test_model_forward_torchscript', 'crossformer_pp_small')}
CASES = [pytest.param(test, name, marks=() if (test, name) in DEFAULT else pytest.mark.slow, id=f'{test}-{name}')
         for name in VARIANTS for test in MODEL_TESTS]


def _batch_size(test):
    """The batch size the upstream test is parametrized with."""
    for mark in getattr(test, 'pytestmark', ()):
        if mark.name == 'parametrize' and mark.args[0] == 'batch_size':
            return mark.args[1][0]
    raise LookupError(f'{test.__name__}: no batch_size parametrization upstream')


@pytest.mark.parametrize('test_name, model_name', CASES)
def test_upstream(test_name, model_name):
    test = getattr(upstream, test_name, None)
    if test is None:  # defined upstream only where its requirements are met (torchvision's FX tools, not on CI)
        pytest.skip(f'{test_name} is not defined by the upstream module in this environment')
    test(model_name, _batch_size(test))
