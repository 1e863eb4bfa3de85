"""One rule for a checkpoint file that holds both trained and EMA weights, on every path that loads one:
the weights the family's official evaluation takes (BiFormer: ``model``, as ``load_release`` and the
dense initialisation take it; CSWin: ``state_dict_ema``, as its ``main.py --eval_checkpoint`` takes it).

Each file below holds two different sets of weights, so a path that takes the wrong one fails.
"""
import sys
from pathlib import Path

import pytest
import timm
import torch

import attnzoo.backbones  # noqa: F401  (registers the models)
from attnzoo.backbones._checkpoint import checkpoint_use_ema, unwrap_checkpoint

TOOLS = Path(__file__).resolve().parents[1] / 'tools'
sys.path.insert(0, str(TOOLS))
import _checkpoints as checkpoints  # noqa: E402
import convert as convert_tool  # noqa: E402
import eval as eval_tool  # noqa: E402

# model, small arguments, the wrappers of its official training script (trained, EMA), official rule
FILES = {
    'biformer': ('biformer_tiny', dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(2, 4, 6, 8),
                                       n_win=4, num_classes=10), ('model', 'model_ema'), 'trained'),
    'cswin': ('cswin_tiny_224', dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), num_classes=10),
              ('state_dict', 'state_dict_ema'), 'ema'),
}
# what each family's official evaluation loads from a file with both (the source that says so)
OFFICIAL_RULES = {
    'biformer': False,     # main.py: pretrained=args.load_release -> checkpoint['model']
    'crossformer': False,  # Swin-style main.py: checkpoint['model'] (no EMA)
    'cswin': True,         # main.py: load_checkpoint(model, args.eval_checkpoint, args.model_ema), default True
    'dat': False,          # Swin-style main.py / utils.load_pretrained: checkpoint['model'] (no EMA)
    'litv2': False,        # DeiT-style main.py --eval --resume: checkpoint['model'] (saves model_ema beside it)
    'nat': False,          # validate.py: --use-ema off by default
    'transnext': False,    # DeiT-style main.py: checkpoint['model'] (EMA commented out)
}


@pytest.fixture(params=sorted(FILES))
def both_weights_file(request, tmp_path):
    """(model name, its kwargs, path of a file with trained and EMA weights, the weights it must give)."""
    name, kwargs, (trained_key, ema_key), rule = FILES[request.param]
    torch.manual_seed(0)
    trained, ema = (timm.create_model(name, **kwargs).state_dict() for _ in range(2))
    path = tmp_path / 'both.pth'
    torch.save({trained_key: trained, ema_key: ema, 'epoch': 299}, path)
    return name, kwargs, path, trained if rule == 'trained' else ema


def assert_weights(state_dict, expected):
    assert state_dict.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state_dict[key], value), key


@pytest.mark.parametrize('family', sorted(OFFICIAL_RULES))
def test_each_family_declares_its_official_rule(family):
    name = timm.list_models(module=family)[0]
    with torch.device('meta'):
        model = timm.create_model(name)
    assert checkpoint_use_ema(model) is OFFICIAL_RULES[family]


def test_pretrained_url_and_file_overlay(both_weights_file, monkeypatch):
    name, kwargs, path, expected = both_weights_file
    # (num_classes: the files' heads have 10 classes, which timm keeps only where the cfg says so)
    # a URL source: timm hands the whole downloaded file to the family's filter
    monkeypatch.setattr(timm.models._builder, 'load_state_dict_from_url', lambda *a, **k: torch.load(path))
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url='https://host/w.pth', num_classes=10), **kwargs)
    assert_weights(model.state_dict(), expected)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **kwargs)
    assert_weights(model.state_dict(), expected)
    # AttnzooBackbone(checkpoint=...)'s call
    features = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 features_only=True, **kwargs)
    assert_part_of(features.state_dict(), expected)


def assert_part_of(state_dict, expected):
    """Every tensor of a feature model (its keys under timm's 'model.' of the getter) is the expected one."""
    assert state_dict
    for key, value in state_dict.items():
        assert torch.equal(value, expected[key.removeprefix('model.')]), key


def test_attnzoo_backbone_checkpoint(both_weights_file):
    backbone_module = pytest.importorskip('attnzoo.heads.backbone', reason='needs mmengine')
    name, kwargs, path, expected = both_weights_file
    backbone = backbone_module.AttnzooBackbone(model_name=name, checkpoint=str(path), **kwargs)
    backbone.init_weights()   # where OpenMMLab backbones load their weights
    assert_part_of(backbone.features.state_dict(), expected)


def test_convert_and_eval_tools(both_weights_file, tmp_path, monkeypatch):
    name, kwargs, path, expected = both_weights_file
    model_kwargs = {k: v for k, v in kwargs.items() if k != 'num_classes'}
    written = convert_tool.convert(name, str(path), str(tmp_path / 'out.safetensors'),
                                   model_kwargs=dict(model_kwargs, num_classes=10))
    assert_weights(written, expected)

    class Loaded(Exception):
        pass

    def load_and_stop(model, state_dict, source):  # the weights tools/eval.py loads, before it evaluates
        assert_weights(checkpoints.fit_to_model(model, state_dict, source), expected)
        raise Loaded
    monkeypatch.setattr(checkpoints, 'load_weights', load_and_stop)
    model_args = [f'{k}={v!r}'.replace(' ', '') for k, v in model_kwargs.items()]
    with pytest.raises(Loaded):  # digits: 10 classes
        eval_tool.main(['--model', name, '--device', 'cpu', '--checkpoint', str(path), '--model-kwargs', *model_args])


def test_a_file_with_one_kind_of_weights_gives_them_under_either_rule():
    only_ema, only_trained = {'model_ema': {'w': torch.ones(1)}}, {'state_dict': {'w': torch.zeros(1)}}
    for use_ema in (True, False):
        assert unwrap_checkpoint(only_ema, use_ema) == {'w': torch.ones(1)}
        assert unwrap_checkpoint(only_trained, use_ema) == {'w': torch.zeros(1)}
